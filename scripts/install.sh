#!/usr/bin/env bash
# Install slimflow and its test tools into the current Python environment.
# Where no torch is installed yet, pin torch==2.13.0 (on CPU-only machines this resolves to a local CPU build);
# GPU users install the torch build for their CUDA first, and this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# The test extra holds llama-cpp-python, which pip compiles from source (llama.cpp, several minutes on 2 cores).
# slimflow uses only its text models, so its multimodal library is not built unless CMAKE_ARGS asks for it.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
"$PY" -m pip install -q -e ".[test]"
# Build the cached help text of the Lightning subcommands once, so that `slimflow fit --help` starts at once.
slimflow fit --help >/dev/null 2>&1 || true
