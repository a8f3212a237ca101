#!/usr/bin/env bash
# The test command: creates its own environment (.venv-test) on a fresh machine, installs onnx-gbp with its
# test dependencies, and runs the whole suite. Extra arguments go to pytest (e.g. -k conv, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-test/bin/python ]; then
    "$PY" -m venv .venv-test
fi
.venv-test/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The cross-framework parity tests run TensorFlow, JAX and Paddle in environments of their own
# (.venv-tf, .venv-jax, .venv-paddle; tools/framework_envs.sh keeps them once built).
bash tools/framework_envs.sh
exec .venv-test/bin/python -m pytest "$@"
