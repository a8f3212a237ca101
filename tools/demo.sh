#!/usr/bin/env bash
# The demo command: creates its own environment (.venv-demo) on a fresh machine, installs onnx-gbp with the CPU
# runtime, and runs the bundled EfficientNet-Lite0 on the bundled photos, with no network after the install.
# The pictures land in ./gbp-demo: open gbp-demo/grid.png. Extra arguments go to `onnx-gbp demo`
# (e.g. -o other-folder, --model mnist, --colour).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-demo/bin/python ]; then
    "$PY" -m venv .venv-demo
fi
.venv-demo/bin/python -m pip install -q --disable-pip-version-check -e ".[cpu]"
exec .venv-demo/bin/onnx-gbp demo "$@"
