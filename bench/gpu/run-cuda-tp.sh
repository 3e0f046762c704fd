#!/usr/bin/env bash
# On a multi-GPU machine: tensor-parallel correctness (TP=N vs TP=1 and vs the CPU f32 runner on
# every architecture) and decode speed of Llama-3-shaped random checkpoints at several TP sizes.
# env: TP_LIST (e.g. "0,1" or "0,1,2,3"), BENCH (8b|70b|none), BENCH_GPUS (space-separated GPU lists).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ck
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.bin/llmd-cuda-check.xz'), open('/tmp/llmd-cuda-check','wb'))"
chmod +x /tmp/llmd-cuda-check
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
flag=""; [ "${BENCH:-none}" != none ] && flag="--bench-${BENCH}"
python3 bench/gpu/make_checkpoints.py /tmp/ck $flag 2>&1 | grep -v Writing | tail -8
status=0
for m in /tmp/ck/check-*; do
  echo "== $m --gpus $TP_LIST"
  timeout 120 /tmp/llmd-cuda-check check "$m" --gpus "$TP_LIST" || echo "FAILED: $m"
done 2>&1 | tee "$OUT/tp-check.txt"
grep -q "^FAILED" "$OUT/tp-check.txt" && status=1
python3 bench/gpu/bandwidth.py | tee "$OUT/bandwidth.txt"
if [ "${BENCH:-none}" != none ]; then
  cat /tmp/ck/llama3-${BENCH}-random/*.safetensors > /dev/null
  for g in ${BENCH_GPUS:-0}; do
    echo "== bench llama3-${BENCH} --gpus $g"
    timeout 240 /tmp/llmd-cuda-check bench /tmp/ck/llama3-${BENCH}-random --gpus "$g" --batch ${BATCHES:-1,64} --prompt 512 --gen 64
  done 2>&1 | tee "$OUT/tp-bench.txt"
fi
exit $status
