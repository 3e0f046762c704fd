#!/usr/bin/env bash
# Issue 8's tensor-parallel run on a 4-GPU machine, one command: TP=4 (and TP=2) correctness on every
# check architecture, then decode speed of Llama-3-8B-shaped weights at TP 1/2/4 and of
# Llama-3-70B-shaped weights at TP 2/4 (random bf16, real safetensors through the real loader),
# next to the measured copy bandwidth. Checkpoints that already exist are kept (a warm machine).
# Expects .bin/llmd-cuda-check.xz (built with --features require-kernels,checks).
# All-reduces go through peer memory for steps of up to 128 tokens (the default); the same TP=4
# benches are then repeated with --nccl-only, and rank 0 of 70B TP=4 is profiled op by op both ways.
# env: SKIP_CHECK=1 (benches only), TP_CHECK (GPU lists to check, default "0,1,2,3 0,1"), GEN (decode steps per batch, default 64),
#      SKIP_AB=1 (no NCCL-only repeat, no profile).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ck
SECONDS=0
stamp() { echo "[+${SECONDS}s] $*"; }
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.bin/llmd-cuda-check.xz'), open('/tmp/llmd-cuda-check','wb'))"
chmod +x /tmp/llmd-cuda-check
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
want=()
[ -e /tmp/ck/llama3-8b-random/model.safetensors.index.json ] || want+=(--bench-8b)
[ -e /tmp/ck/llama3-70b-random/model.safetensors.index.json ] || want+=(--bench-70b)
small=--no-small
[ -e /tmp/ck/check-qwen3_moe/config.json ] || small=
stamp "writing checkpoints: ${want[*]:-none} ${small:+(small ones exist)}"
if [ ${#want[@]} -gt 0 ] || [ -z "$small" ]; then
  python3 bench/gpu/make_checkpoints.py /tmp/ck $small "${want[@]}" 2>&1 | grep -v Writing | tail -8
fi
du -sh /tmp/ck/llama3-8b-random /tmp/ck/llama3-70b-random
status=0
# A quick TP=2 run first: a collective that hangs shows here within a minute, not after every check.
stamp "smoke: check-llama --gpus 0,1"
if ! timeout 90 /tmp/llmd-cuda-check check /tmp/ck/check-llama --gpus 0,1 > "$OUT/smoke.txt" 2>&1; then
  tail -20 "$OUT/smoke.txt"; echo "FAILED: smoke check (TP=2)"; exit 1
fi
if [ -z "${SKIP_CHECK:-}" ]; then
  for tp in ${TP_CHECK:-0,1,2,3 0,1}; do
    for m in /tmp/ck/check-*; do
      echo "== $m --gpus $tp"
      timeout 120 /tmp/llmd-cuda-check check "$m" --gpus "$tp" || echo "FAILED: $m --gpus $tp"
    done
  done 2>&1 | tee "$OUT/tp-check.txt" | grep -E "^==|tensor parallel|PASS|FAIL"
  grep -q "^FAILED" "$OUT/tp-check.txt" && status=1
fi
stamp "checks done"
python3 bench/gpu/bandwidth.py | tee "$OUT/bandwidth.txt"
{
  for g in 0 0,1 0,1,2,3; do
    stamp "bench llama3-8b --gpus $g"
    timeout 150 /tmp/llmd-cuda-check bench /tmp/ck/llama3-8b-random --gpus "$g" --batch 1,64 --prompt 512 --gen "${GEN:-64}"
  done
  for g in 0,1 0,1,2,3; do
    stamp "bench llama3-70b --gpus $g"
    timeout 240 /tmp/llmd-cuda-check bench /tmp/ck/llama3-70b-random --gpus "$g" --batch 1,64 --prompt 512 --gen "${GEN:-64}"
  done
  if [ -z "${SKIP_AB:-}" ]; then
    stamp "bench llama3-8b --gpus 0,1,2,3 --nccl-only"
    timeout 150 /tmp/llmd-cuda-check bench /tmp/ck/llama3-8b-random --gpus 0,1,2,3 --batch 1,64 --prompt 512 --gen "${GEN:-64}" --nccl-only
    stamp "bench llama3-70b --gpus 0,1,2,3 --nccl-only"
    timeout 240 /tmp/llmd-cuda-check bench /tmp/ck/llama3-70b-random --gpus 0,1,2,3 --batch 1,64 --prompt 512 --gen "${GEN:-64}" --nccl-only
  fi
} 2>&1 | tee "$OUT/tp-bench.txt"
if [ -z "${SKIP_AB:-}" ]; then
  for mode in "" --nccl-only; do
    stamp "profile llama3-70b --gpus 0,1,2,3 $mode"
    timeout 200 /tmp/llmd-cuda-check profile /tmp/ck/llama3-70b-random --gpus 0,1,2,3 --batch 1,64 --prompt 512 --max-model-len 1024 $mode
  done 2>&1 | tee "$OUT/tp-profile.txt"
fi
stamp "done"
exit $status
