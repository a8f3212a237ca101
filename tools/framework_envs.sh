#!/usr/bin/env bash
# Creates the framework environments of the cross-framework parity tests (tests/test_parity_frameworks.py):
# .venv-tf (TensorFlow/Keras + tf2onnx), .venv-jax (JAX/Flax + jax2onnx) and .venv-paddle (PaddlePaddle +
# paddle2onnx), each from tests/frameworks/requirements-<name>.txt. They cannot share the main environment or
# each other: tf2onnx and jax2onnx bring onnx 1.23 (onnx-gbp pins <1.23), paddle2onnx pins onnx<=1.17. Idempotent: a venv whose requirements file has not
# changed since it was built is kept. Any failure exits non-zero: a framework that cannot be installed fails the
# test run, it is never skipped.
#   bash tools/framework_envs.sh            # all three
#   bash tools/framework_envs.sh tf         # one
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(tf jax paddle)
for name in "${names[@]}"; do
    req="tests/frameworks/requirements-$name.txt"
    venv=".venv-$name"
    [ -f "$req" ] || { echo "framework_envs: no $req" >&2; exit 2; }
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
        continue
    fi
    start=$SECONDS
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    echo "$want" > "$venv/.requirements.sha256"
    echo "framework_envs: $venv ready in $((SECONDS - start)) s"
done
