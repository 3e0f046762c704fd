#!/usr/bin/env bash
# On the GPU machine: checks every kernel against the CPU path of llmd-models on random inputs
# (`llmd-cuda-check kernels`), builds random checkpoints with transformers/torch, checks the
# CUDA runner against the CPU runner on every architecture (dense and Qwen3-MoE), the device token picker
# against the host rule, the tiled prefill attention against the split kernel, times the decode
# GEMVs, then times the runner on a Llama-3-8B-shaped checkpoint (greedy and sampled) next to the
# measured memory bandwidth (the decode roofline).
# Expects the release binary at .bin/llmd-cuda-check.xz (built here with --features cuda).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ck
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.bin/llmd-cuda-check.xz'), open('/tmp/llmd-cuda-check','wb'))"
chmod +x /tmp/llmd-cuda-check
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
# Per-kernel checks first: a kernel bug shows here by name before it blurs a whole-model check.
/tmp/llmd-cuda-check kernels 2>&1 | tee "$OUT/kernel-checks.txt" || status=1
python3 bench/gpu/make_checkpoints.py /tmp/ck ${BENCH_8B:+--bench-8b} 2>&1 | tail -8
# Each group exits non-zero on a failed check; pipefail carries that through tee.
for m in /tmp/ck/check-*; do
  echo "== $m"
  /tmp/llmd-cuda-check check "$m" || echo "FAILED: $m"
done 2>&1 | tee "$OUT/check.txt"
grep -q "^FAILED" "$OUT/check.txt" && status=1
{ st=0; /tmp/llmd-cuda-check pick || st=1; /tmp/llmd-cuda-check attention || st=1; /tmp/llmd-cuda-check gemv; exit $st; } 2>&1 | tee "$OUT/kernels.txt" || status=1
python3 bench/gpu/bandwidth.py | tee "$OUT/bandwidth.txt"
if [ -n "${BENCH_8B:-}" ]; then
  cat /tmp/ck/llama3-8b-random/*.safetensors > /dev/null  # page cache, as "load from the page cache"
  /tmp/llmd-cuda-check bench /tmp/ck/llama3-8b-random --batch ${BATCHES:-1,8,32,64} --prompt 512 --gen 128 2>&1 | tee "$OUT/bench.txt"
  echo "== sampled on the device: temperature 0.8, top-p 0.95" | tee -a "$OUT/bench.txt"
  /tmp/llmd-cuda-check bench /tmp/ck/llama3-8b-random --batch ${BATCHES:-1,8,32,64} --prompt 512 --gen 128 --temperature 0.8 --top-p 0.95 2>&1 | tee -a "$OUT/bench.txt"
fi
exit $status
