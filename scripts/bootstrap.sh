#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repo root and install llava-san into it.
#   bash scripts/bootstrap.sh        -> runtime dependencies
#   bash scripts/bootstrap.sh dev    -> plus the test tools
# torch is installed first and pinned to the tested version. The pin picks the version, not the build:
# pip's default index serves the CUDA build on Linux (multi-GB). For a CPU-only machine set
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (where pip is already configured to serve CPU wheels, as on this project's CI machines, no need).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  $py -m pip install -q --disable-pip-version-check --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
else
  $py -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
if [ -n "$extra" ]; then
  $py -m pip install -q --disable-pip-version-check -e ".[$extra]"
else
  $py -m pip install -q --disable-pip-version-check -e .
fi
# PyPI's torchvision is built against CUDA torch; beside a CPU-only torch its compiled operators cannot
# load and its import fails unless two operator schemas are declared first (llava_san/torchvision_compat.py).
# This adds a start-up hook that does so, where (and only where) this environment needs it.
$py -c "from llava_san.torchvision_compat import main; main(['--install'])"
