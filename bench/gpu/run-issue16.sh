#!/usr/bin/env bash
# Issue 16's GPU checks in one device command (< 10 min on an H200): the CUDA runner against the
# CPU runner and every kernel (run-cuda-check.sh), then llmd's CUDA engine against transformers at
# real shapes (numerics_vs_hf.py: Llama-3.2-1B, Qwen2.5-1.5B, Qwen3-1.7B, Mistral-7B-v0.3 and
# Qwen3-30B-A3B layouts and a Llama with o_proj and MLP biases), and the CPU fixture with every
# bias (tests/fixtures/models/llama_bias, written by transformers; copied to $OUT to commit).
# Expects .bin/llmd-cuda-check.xz (built with --features require-kernels,checks).
# Env: NUMERICS_GPUS (default "0"; "0;0,1" adds a TP=2 pass on a 2-GPU machine).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
status=0
bash bench/gpu/run-cuda-check.sh || status=1
# The bias fixture: make_golden.py trains the fixture tokenizer and saves the model with
# transformers; only this fixture is rebuilt.
python3 tests/fixtures/make_golden.py --only llama_bias 2>&1 | tail -4
tar -C tests/fixtures/models -czf "$OUT/llama_bias.tgz" llama_bias
python3 bench/gpu/numerics_vs_hf.py --check /tmp/llmd-cuda-check --out "$OUT" --gpus "${NUMERICS_GPUS:-0}" 2>&1 \
    | tee "$OUT/numerics.txt" || status=1
exit $status
