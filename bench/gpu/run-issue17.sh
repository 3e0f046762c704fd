#!/usr/bin/env bash
# The MoE issue's GPU work on one machine, in device commands of under 600 s each:
#
#   bash bench/gpu/run-issue17.sh check   # every kernel vs the CPU path (MoE cases included), the
#                                         # whole Qwen3-MoE check model vs the CPU runner, the
#                                         # Qwen3-30B-A3B checkpoint, then the decode step profile of
#                                         # .bin/llmd-cuda-check.xz (and of .bin/base/ when present)
#   bash bench/gpu/run-issue17.sh bench   # run-issue6.sh's llmd phase on that checkpoint
#                                         # (ISSUE6_SHAPE=qwen3-30b-a3b), results under $OUT/moe
#   bash bench/gpu/run-issue17.sh quick   # kernel checks and moe-bench, then `bench` with a shorter
#                                         # budget (ISSUE6_BUDGET_S, default 380 s), in one command
#
# .bin/*.xz: this tree's binaries (llmd with --features cuda, llmctl, llmd-loadgen, llmd-cuda-check
# with require-kernels,checks); .bin/base/*.xz: the same from the commit before the work, for the
# before/after profile (BASE=0 skips it). Carry .bin and tests/fixtures/cache (the 128k tokenizer).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ck
phase=${1:-}
SECONDS=0
log() { printf '[%s +%ss] %s\n' "$(date -u +%T)" "$SECONDS" "$*"; }
unxz_to() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
case $phase in
  check)
    exec > >(tee -a "$OUT/check-console.txt") 2>&1
    unxz_to .bin/llmd-cuda-check.xz /tmp/llmd-cuda-check || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    df -h /tmp /dev/shm | tail -2
    status=0
    log "kernel checks"
    /tmp/llmd-cuda-check kernels > "$OUT/kernel-checks.txt" 2>&1 || status=1
    grep -iE "moe|FAIL|summary|passed" "$OUT/kernel-checks.txt" | tail -30
    log "moe-bench (Qwen3-30B-A3B layer shapes)"
    /tmp/llmd-cuda-check moe-bench 2>&1 | tee "$OUT/moe-bench.txt"
    [ "${CHECK_ONLY_MOE:-0}" = 1 ] && exit $status
    log "small check models"
    python3 bench/gpu/make_checkpoints.py /tmp/ck 2>&1 | tail -3
    /tmp/llmd-cuda-check attention > "$OUT/attention-check.txt" 2>&1 || status=1
    grep -E "decode step|FAIL|PASS" "$OUT/attention-check.txt" | tail -12
    for m in qwen3_moe qwen3 llama; do
      /tmp/llmd-cuda-check check "/tmp/ck/check-$m" 2>&1 | tail -4 || status=1
    done
    log "Qwen3-30B-A3B checkpoint"
    ISSUE6_SHAPE=qwen3-30b-a3b bash -c '
      CK_ROOT=/tmp/ck; [ "$(df --output=avail -B1G /tmp | tail -1)" -lt 66 ] && CK_ROOT=/dev/shm/ck
      mkdir -p $CK_ROOT; echo "checkpoint root $CK_ROOT"
      [ -f $CK_ROOT/qwen3-30b-a3b-random/model.safetensors.index.json ] || python3 bench/gpu/make_checkpoints.py $CK_ROOT --no-small --bench-30b-a3b 2>&1 | tail -2
      ln -sfn $CK_ROOT/qwen3-30b-a3b-random /tmp/moe-ck'
    log "checkpoint ready"
    cat /tmp/moe-ck/*.safetensors > /dev/null
    log "page cache warm"
    /tmp/llmd-cuda-check profile /tmp/moe-ck --batch ${BATCHES:-1,8,64,256} --prompt 512 2>&1 | tee "$OUT/profile-new.txt"
    if [ -f .bin/base/llmd-cuda-check.xz ] && [ "${BASE:-1}" = 1 ]; then
      unxz_to .bin/base/llmd-cuda-check.xz /tmp/llmd-cuda-check-base
      log "profile of the base binary"
      /tmp/llmd-cuda-check-base profile /tmp/moe-ck --batch ${BATCHES:-1,8,64,256} --prompt 512 2>&1 | tee "$OUT/profile-base.txt"
    fi
    log "done"
    exit $status
    ;;
  bench)
    ISSUE6_SHAPE=qwen3-30b-a3b bash bench/gpu/run-issue6.sh llmd
    ;;
  quick)
    # Kernel checks and moe-bench, then the HTTP benchmark, in one device command.
    CHECK_ONLY_MOE=1 bash "$0" check
    ISSUE6_SHAPE=qwen3-30b-a3b ISSUE6_BUDGET_S=${ISSUE6_BUDGET_S:-380} bash bench/gpu/run-issue6.sh llmd
    ;;
  *) echo "usage: $0 check|bench|quick" >&2; exit 2 ;;
esac
