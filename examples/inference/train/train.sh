#!/usr/bin/env bash
# Re-creates examples/inference/models/*.onnx and data/ from scikit-learn's
# bundled breast-cancer data set: installs the pinned requirements into a
# virtual environment of its own (no download of data), trains, exports with
# skl2onnx, checks each export with onnxruntime, writes the expected outputs.
# The tests do not run this: they use the committed files.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${VENV:-"$here/.venv"}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
"$venv/bin/python" "$here/train.py"
