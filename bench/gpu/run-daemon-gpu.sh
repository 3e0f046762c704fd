#!/usr/bin/env bash
# On the GPU machine: the real llmd (CUDA build) + llmctl + llmd-loadgen end to end.
# Captures `llmctl gpus` / `llmctl doctor` (incl. the NCCL all-reduce check), loads a
# Llama-3-8B-shaped random checkpoint through the control socket, drives the OpenAI HTTP API at
# several concurrencies, and (with 2+ GPUs) loads the same model with --tp 2.
# Expects .bin/{llmd,llmctl,llmd-loadgen}.xz built here with `--features cuda` (llmd).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ck /tmp/llmd-run /tmp/models
for b in llmd llmctl llmd-loadgen; do
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(f'.bin/{sys.argv[1]}.xz'), open(f'/tmp/{sys.argv[1]}','wb'))" $b
  chmod +x /tmp/$b
done
python3 bench/gpu/make_checkpoints.py /tmp/ck --no-small --bench-8b 2>&1 | grep -v Writing | tail -2
cat /tmp/ck/llama3-8b-random/*.safetensors > /dev/null
cat > /tmp/llmd.toml <<TOML
[server]
listen = "127.0.0.1:8000"
[control]
socket = "/tmp/llmd-run/llmd.sock"
group = "root"
dbus = "off"
[storage]
models_dir = "/tmp/models"
offline = true
[engine]
device = "cuda"
gpu_memory_utilization = 0.85
max_num_seqs = 256
max_num_batched_tokens = 8192
TOML
/tmp/llmd --config /tmp/llmd.toml > "$OUT/llmd.log" 2>&1 &
pid=$!
for i in $(seq 1 100); do [ -S /tmp/llmd-run/llmd.sock ] && break; sleep 0.2; done
ctl() { /tmp/llmctl --socket /tmp/llmd-run/llmd.sock "$@"; }
{ echo '$ llmctl status'; ctl status; echo; echo '$ llmctl gpus'; ctl gpus; echo; echo '$ llmctl doctor'; ctl doctor; } 2>&1 | tee "$OUT/gpus-doctor.txt"
t0=$(date +%s.%N)
ctl load /tmp/ck/llama3-8b-random --name llama8b --max-model-len 4096 2>&1 | tail -3
t1=$(date +%s.%N)
echo "load (llmctl load until ready): $(python3 -c "print(round($t1-$t0,2))") s" | tee "$OUT/serve.txt"
ctl ps 2>&1 | tee -a "$OUT/serve.txt"
for c in 1 8 32 64 256; do
  n=$(( c < 8 ? 8 : c * 2 ))
  echo "== concurrency $c, $n requests, 512-word prompts, 256 output tokens (ignore_eos)"
  timeout 200 /tmp/llmd-loadgen --url http://127.0.0.1:8000 --model llama8b --endpoint completions \
    --concurrency $c --requests $n --prompt-tokens 512 --max-tokens 256
done 2>&1 | tee -a "$OUT/serve.txt"
ngpu=$(nvidia-smi -L | wc -l)
if [ "$ngpu" -ge 2 ]; then
  ctl unload llama8b
  ctl load /tmp/ck/llama3-8b-random --name llama8b-tp2 --tp 2 --max-model-len 4096 2>&1 | tail -2
  ctl ps 2>&1 | tee -a "$OUT/serve.txt"
  for c in 1 64; do
    echo "== tp 2, concurrency $c"
    timeout 200 /tmp/llmd-loadgen --url http://127.0.0.1:8000 --model llama8b-tp2 --endpoint completions \
      --concurrency $c --requests $(( c < 8 ? 8 : c * 2 )) --prompt-tokens 512 --max-tokens 256
  done 2>&1 | tee -a "$OUT/serve.txt"
  ctl gpus 2>&1 | tee -a "$OUT/gpus-doctor.txt"
fi
curl -s http://127.0.0.1:8000/metrics | grep -E "^llmd:(generation_tokens|num_preemptions|time_to_first_token_seconds_(sum|count))|^DCGM_FI_DEV_(GPU_UTIL|FB_USED)" | head -20 | tee "$OUT/metrics.txt"
kill -TERM $pid; wait $pid; echo "llmd exit code $?" | tee -a "$OUT/serve.txt"
