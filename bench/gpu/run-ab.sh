#!/usr/bin/env bash
# Side-by-side decode speed of two llmd-cuda-check builds in one run (same machine, same
# checkpoints): .bin/llmd-cuda-check-base.xz (before a change) and .bin/llmd-cuda-check.xz (after).
# Run after bench/gpu/run-tp-bench.sh on the same warm machine (it writes /tmp/ck).
# env: AB_RUNS ("model gpus" pairs, default 70B at TP 4 and 8B at TP 1 and 4), GEN (default 64).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 CUDA_DEVICE_ORDER=PCI_BUS_ID
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for b in llmd-cuda-check-base llmd-cuda-check; do
  [ -e /tmp/$b ] || python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.bin/$b.xz'), open('/tmp/$b','wb'))"
  chmod +x /tmp/$b
done
runs=${AB_RUNS:-"llama3-70b-random:0,1,2,3 llama3-8b-random:0 llama3-8b-random:0,1,2,3"}
for r in $runs; do
  m=${r%%:*} g=${r#*:}
  for b in llmd-cuda-check-base llmd-cuda-check; do
    echo "== $b $m --gpus $g"
    timeout 240 /tmp/$b bench /tmp/ck/$m --gpus "$g" --batch 1,64 --prompt 512 --gen "${GEN:-64}"
  done
done 2>&1 | tee "$OUT/ab.txt"
