#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repo root and install llava-san into it.
#   bash scripts/bootstrap.sh        -> runtime dependencies
#   bash scripts/bootstrap.sh dev    -> plus the test tools
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check "torch==2.13.0"
if [ -n "$extra" ]; then
  $py -m pip install -q --disable-pip-version-check -e ".[$extra]"
else
  $py -m pip install -q --disable-pip-version-check -e .
fi
