#!/usr/bin/env bash
# Issue 6's benchmark on one GPU machine (an H100): a Llama-3-8B-shaped checkpoint with random
# bf16 weights (real safetensors, config.json and tokenizer) served by the real llmd through
# `llmctl load` and the OpenAI HTTP API, with HF transformers (eager, same shapes) as the
# baseline. One device command may run 600 s, so the work is split into phases, each well under:
#
#   bash bench/gpu/run-issue6.sh llmd     # bandwidth, roofline, load, 1/8/32/64/256 streams, the
#                                         # offline run (1,000 requests at once) if it fits (< 480 s)
#   bash bench/gpu/run-issue6.sh offline  # the offline run alone, when `llmd` had no time for it
#   bash bench/gpu/run-issue6.sh hf       # HF transformers baseline (< 540 s)
#   python3 bench/gpu/report_issue6.py llmd.json hf.json [offline.json] > report.md
#
# ISSUE6_SHAPE picks the model: llama3-8b (default; results under $OUT/issue6) or qwen3-30b-a3b
# (Qwen3-30B-A3B shapes at full depth, 61 GB, for the MoE issue; results under $OUT/moe, report
# with bench/gpu/report_moe.py). The checkpoint goes under /tmp/ck, or /dev/shm/ck when /tmp lacks
# the room (the GPU machine's disk is 64 GB).
#
# Every phase creates the checkpoint when /tmp/ck/llama3-8b-random is missing (a fresh machine)
# and writes at most 4 files under $OUT/issue6/: PHASE.json (every raw result, the loadgen's
# JSON reports verbatim), PHASE-console.txt and, for the daemon phases, PHASE-daemon.log and
# PHASE-metrics.txt (a /metrics snapshot).
# Expects .bin/{llmd,llmctl,llmd-loadgen}.xz: llmd built with --features cuda, llmd-loadgen
# from this tree (it needs --calibrate-prompt, --json-out and --max-duration-s).
# Env: ISSUE6_BUDGET_S (seconds for the phase), LLMD_LOG_LEVEL (the daemon's log.level), LLMD_COMMIT
# (the commit the binaries were built from; the device copy's git metadata may be stale); for a
# dry run of the script on a CPU: ISSUE6_DEVICE=cpu, ISSUE6_PROMPT, ISSUE6_GEN, ISSUE6_CK.
set -uo pipefail
phase=${1:-}
case $phase in
  llmd) budget=${ISSUE6_BUDGET_S:-480} ;;
  offline | hf) budget=${ISSUE6_BUDGET_S:-540} ;;
  *) echo "usage: $0 llmd|offline|hf" >&2; exit 2 ;;
esac
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
R=$OUT/issue6
W=/tmp/issue6-$phase          # raw pieces; assembled into $R/$phase.json on exit
SHAPE=${ISSUE6_SHAPE:-llama3-8b}
case $SHAPE in
  llama3-8b) CK_NAME=llama3-8b-random; MAKE_FLAG=--bench-8b; MODEL=llama8b; CK_GB=17; R=$OUT/issue6 ;;
  qwen3-30b-a3b) CK_NAME=qwen3-30b-a3b-random; MAKE_FLAG=--bench-30b-a3b; MODEL=qwen3-30b-a3b; CK_GB=62; R=$OUT/moe ;;
  *) echo "ISSUE6_SHAPE: llama3-8b or qwen3-30b-a3b, not $SHAPE" >&2; exit 2 ;;
esac
CK_ROOT=/tmp/ck
if [ ! -d "$CK_ROOT/$CK_NAME" ] && [ "$(df --output=avail -B1G /tmp | tail -1)" -lt $((CK_GB + 4)) ]; then
  CK_ROOT=/dev/shm/ck
fi
CK=${ISSUE6_CK:-$CK_ROOT/$CK_NAME}
PROMPT=${ISSUE6_PROMPT:-512}  # prompt tokens (the loadgen calibrates words to tokens via /tokenize)
GEN=${ISSUE6_GEN:-256}        # output tokens per request
SOCK=/tmp/llmd-run/llmd.sock
URL=http://127.0.0.1:8000
rm -rf "$W" && mkdir -p "$R" "$W" "$CK_ROOT" /tmp/llmd-run /tmp/models
exec > >(tee -a "$R/$phase-console.txt") 2>&1
SECONDS=0

log() { printf '[%s +%ss] %s\n' "$(date -u +%T)" "$SECONDS" "$*"; }
left() { echo $((budget - SECONDS)); }
# put FILE KEY VALUE...: a flat JSON object; values that parse as numbers are numbers.
put() {
  python3 - "$@" <<'PY'
import json, sys
f, kv = sys.argv[1], sys.argv[2:]
def val(s):
    if s in ("true", "false"):
        return s == "true"
    for t in (int, float):
        try:
            return t(s)
        except ValueError:
            pass
    return s
json.dump({kv[i]: val(kv[i + 1]) for i in range(0, len(kv) - 1, 2)}, open(f, "w"), indent=1)
PY
}

env_info() {
  python3 - "$W/env.json" "$phase" "$budget" <<'PY'
import datetime, json, os, platform, re, subprocess, sys
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]} failed: {e}"
full = sh("nvidia-smi")
m = re.search(r"CUDA Version:\s*([\d.]+)", full)
env = {
    "phase": sys.argv[2], "budget_s": int(sys.argv[3]),
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
    "nvidia_smi": sh("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
    "nvidia_smi_L": sh("nvidia-smi", "-L"),
    "cuda_version": m.group(1) if m else None,
    # The GPU machine's copy of the tree may carry stale git metadata: pass LLMD_COMMIT.
    "git_commit": os.environ.get("LLMD_COMMIT") or sh("git", "rev-parse", "HEAD") or None,
}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("GPU:", env["nvidia_smi"], "| CUDA", env["cuda_version"], "|", env["date_utc"])
PY
}

ensure_checkpoint() {
  if [ -f "$CK/model.safetensors.index.json" ] && [ -f "$CK/tokenizer.json" ] && [ -f "$CK/config.json" ]; then
    put "$W/checkpoint.json" path "$CK" created_in_phase false
    return 0
  fi
  log "writing the checkpoint $CK (random bf16 weights, real 128k tokenizer)"
  local t0=$SECONDS rc
  python3 bench/gpu/make_checkpoints.py "$CK_ROOT" --no-small "$MAKE_FLAG" > "$W/checkpoint.txt" 2>&1
  rc=$?
  grep -v Writing "$W/checkpoint.txt" | tail -3
  put "$W/checkpoint.json" path "$CK" created_in_phase true create_s $((SECONDS - t0)) rc "$rc"
  [ -f "$CK/model.safetensors.index.json" ]
}

weights_and_warm() {
  python3 - "$CK" "$W/weights.json" <<'PY'
import glob, json, os, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors")))
n = sum(os.path.getsize(f) for f in files)
config = json.load(open(os.path.join(sys.argv[1], "config.json")))
json.dump({"files": len(files), "bytes": n, "config": config}, open(sys.argv[2], "w"), indent=1)
print(f"weights: {len(files)} safetensors files, {n} bytes ({n / 1e9:.2f} GB)")
PY
  local t0 t1
  t0=$(date +%s.%N)
  cat "$CK"/*.safetensors > /dev/null
  t1=$(date +%s.%N)
  put "$W/warm.json" page_cache_read_s "$(python3 -c "print(round($t1 - $t0, 2))")"
}

bandwidth() {
  python3 bench/gpu/bandwidth.py "$W/bandwidth.json"
}

unpack() {
  local b
  for b in llmd llmctl llmd-loadgen; do
    if [ ! -f ".bin/$b.xz" ]; then echo "missing .bin/$b.xz" >&2; return 1; fi
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(f'.bin/{sys.argv[1]}.xz'), open(f'/tmp/{sys.argv[1]}','wb'))" "$b" || return 1
    chmod +x "/tmp/$b"
  done
  if ! /tmp/llmd-loadgen --help | grep -q -- --calibrate-prompt; then
    echo ".bin/llmd-loadgen.xz is older than this script: rebuild it from this tree (cargo build --release -p llmd-loadgen)" >&2
    return 1
  fi
}

ctl() { /tmp/llmctl --socket "$SOCK" "$@"; }
pid=

start_daemon() {
  cat > /tmp/llmd-issue6.toml <<TOML
[server]
listen = "127.0.0.1:8000"
[control]
socket = "$SOCK"
group = "root"
dbus = "off"
[storage]
models_dir = "/tmp/models"
offline = true
[engine]
device = "${ISSUE6_DEVICE:-cuda}"
gpu_memory_utilization = 0.85
max_num_seqs = 256
max_num_batched_tokens = 8192
max_queue = 2048
[log]
level = "${LLMD_LOG_LEVEL:-info,llmd_engine=debug}"
target = "stderr"
TOML
  rm -f "$SOCK"
  RUST_LOG=${LLMD_LOG_LEVEL:-info,llmd_engine=debug} /tmp/llmd --config /tmp/llmd-issue6.toml > "$W/llmd.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do [ -S "$SOCK" ] && break; sleep 0.2; done
  [ -S "$SOCK" ] || { echo "llmd did not open its control socket; log tail:"; tail -20 "$W/llmd.log"; return 1; }
  ctl status 2>&1 | tail -5
}

load_model() {
  log "llmctl load $CK --name $MODEL --max-model-len 4096"
  local t0 t1 rc
  t0=$(date +%s.%N)
  ctl load "$CK" --name "$MODEL" --max-model-len 4096 > "$W/load.txt" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  tail -3 "$W/load.txt"
  ctl ps > "$W/ps.txt" 2>&1; cat "$W/ps.txt"
  put "$W/load.json" rc "$rc" load_s "$(python3 -c "print(round($t1 - $t0, 3))")" \
    gpu_mem_used_mib_after_load "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)" \
    output "$(tail -5 "$W/load.txt")" ps "$(cat "$W/ps.txt")"
  log "load (llmctl load until ready): $(python3 -c "print(round($t1 - $t0, 2))") s, rc $rc"
  return "$rc"
}

# loadgen NAME CONCURRENCY REQUESTS STOP_STARTING_AFTER_S HARD_LIMIT_S [MAX_TOKENS]
loadgen() {
  local name=$1 c=$2 n=$3 d=$4 hard=$5 mt=${6:-$GEN} rc
  # Disjoint prompt seeds per level: a repeated prompt would be served from the prefix cache.
  SEED_BASE=$((${SEED_BASE:-0} + 100000))
  log "== $name: concurrency $c, $n requests (none started after ${d} s; killed at ${hard} s), $PROMPT-token prompts, $mt output tokens, ignore_eos"
  timeout -k 5 "$hard" /tmp/llmd-loadgen --url "$URL" --model "$MODEL" --endpoint completions \
    --concurrency "$c" --requests "$n" --prompt-tokens "$PROMPT" --calibrate-prompt --max-tokens "$mt" \
    --ignore-eos true --max-duration-s "$d" --timeout-s "$hard" --json-out "$W/lg-$name.json" --first-seed "$SEED_BASE"
  rc=$?
  put "$W/lgrc-$name.json" name "$name" concurrency "$c" requests "$n" rc "$rc" max_duration_s "$d" hard_limit_s "$hard"
  return 0
}

# The offline run: every request submitted at once.
offline_run() {
  local hard=$1
  loadgen offline 1000 1000 "$hard" "$hard"
}

stop_daemon() {
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid"; put "$W/stop.json" exit_code "$?" note "already exited"; pid=; return 0; }
  curl -s --max-time 10 "$URL/metrics" > "$W/metrics.txt"
  local t0=$SECONDS rc
  kill -TERM "$pid"
  for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  wait "$pid"; rc=$?
  put "$W/stop.json" exit_code "$rc" stop_s $((SECONDS - t0))
  log "llmd exit code $rc"
  pid=
}

# Gathers the raw pieces into $R/$phase.json (and the daemon's log and metrics beside it).
assemble() {
  python3 - "$W" "$R" "$phase" "$SECONDS" <<'PY'
import glob, json, os, re, sys
w, r, phase, elapsed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def load(name):
    p = os.path.join(w, name)
    if not os.path.exists(p):
        return None
    try:
        return json.load(open(p))
    except ValueError as e:
        return {"error": f"unreadable {name}: {e}"}
def lg(name):
    rc = load(f"lgrc-{name}.json")
    rep = load(f"lg-{name}.json")
    if rc is None and rep is None:
        return None
    out = {"run": rc, "loadgen": rep}
    if rep is None:
        out["error"] = ("killed at the hard limit (%s s)" % rc["hard_limit_s"]) if rc and rc["rc"] in (124, 137) \
            else f"no report (loadgen exit code {rc['rc'] if rc else '?'})"
    return out
res = {"phase": phase, "elapsed_s": elapsed}
for k in ("env", "checkpoint", "weights", "warm", "bandwidth", "daemon", "load", "stop", "hf_run"):
    v = load(k + ".json")
    if v is not None:
        res[k] = v
bw, wt = res.get("bandwidth"), res.get("weights")
if bw and wt and bw.get("copy_gb_s") and wt.get("bytes"):
    res["roofline_tok_s"] = round(bw["copy_gb_s"] * 1e9 / wt["bytes"], 1)
    res["roofline_note"] = "copy bandwidth / bytes of the safetensors files (KV reads at 512-768 tokens add < 1%)"
if os.path.exists(os.path.join(w, "lgrc-warmup.json")):
    res["warmup"] = lg("warmup")
levels = []
for p in glob.glob(os.path.join(w, "lgrc-c*.json")):
    levels.append(lg(re.fullmatch(r"lgrc-(c\d+)\.json", os.path.basename(p)).group(1)))
for p in sorted(glob.glob(os.path.join(w, "skip-c*.json"))):
    levels.append(load(os.path.basename(p)))
if levels:
    res["levels"] = sorted(levels, key=lambda x: (x.get("run") or x)["concurrency"])
off = lg("offline") or load("offline-skipped.json")
if off is not None:
    res["offline"] = off
m = os.path.join(w, "metrics.txt")
if os.path.exists(m):
    met = {}
    for line in open(m):
        if line.startswith("llmd:") and "_bucket" not in line:
            k, _, v = line.rpartition(" ")
            try:
                met[k.strip()] = float(v)
            except ValueError:
                pass
    res["metrics"] = met
    os.replace(m, os.path.join(r, f"{phase}-metrics.txt"))
logf = os.path.join(w, "llmd.log")
if os.path.exists(logf):
    dst = os.path.join(r, f"{phase}-daemon.log")
    size, cap = os.path.getsize(logf), 15 << 20
    if size <= cap:
        os.replace(logf, dst)
    else:  # files back from $OUT are capped at 16 MiB: keep the head and the tail
        with open(logf, "rb") as f, open(dst, "wb") as o:
            o.write(f.read(2 << 20))
            o.write(f"\n[... {size - (14 << 20)} bytes left out ...]\n".encode())
            f.seek(size - (12 << 20))
            o.write(f.read())
    res["llmd_log"] = {"file": os.path.basename(dst), "bytes": size, "truncated": size > cap}
json.dump(res, open(os.path.join(r, f"{phase}.json"), "w"), indent=1)
print(f"wrote {os.path.join(r, phase + '.json')}")
PY
}

# The HF phase: bench/gpu/hf_baseline.py writes $R/hf.json itself (after every level).
hf_phase() {
  local rc
  python3 bench/gpu/hf_baseline.py "$CK" "$R/hf.json" --prompt "$PROMPT" --gen "$GEN" --budget-s "$(left)" \
    --merge "env=$W/env.json" --merge "checkpoint=$W/checkpoint.json" --merge "weights=$W/weights.json" \
    --merge "warm=$W/warm.json"
  rc=$?
  log "phase hf done in $SECONDS s (budget $budget s), hf_baseline.py exit code $rc"
  return "$rc"
}

finish() {
  stop_daemon
  assemble
  log "phase $phase done in $SECONDS s (budget $budget s)"
  sleep 1  # lets tee write the console file
}

# The daemon phases (llmd, offline): after the checkpoint, until the trap stops the daemon.
daemon_phase() {
  unpack || return 1
  [ "$phase" = llmd ] && bandwidth
  start_daemon || return 1
  load_model || return 1
  # Warm-up (not reported as a level): first requests through every path; checks the prompt length.
  loadgen warmup 8 8 30 60 32
  if [ "$phase" = offline ]; then
    offline_run $(( $(left) - 25 ))
    return 0
  fi
  local reserve=40 c n d hard est  # reserve: the offline decision, /metrics and a clean stop
  for c in 1 8 32 64 256; do
    if [ "$c" = 1 ]; then n=8; d=20; else n=$((2 * c)); d=40; fi
    hard=$(( $(left) - reserve ))
    [ "$hard" -gt 180 ] && hard=180
    [ "$d" -gt $((hard / 2)) ] && d=$((hard / 2))  # leaves time for the requests in flight
    if [ "$hard" -lt 30 ]; then
      put "$W/skip-c$c.json" concurrency "$c" error "skipped: time budget ($(left) s left)"
      log "c=$c skipped: time budget"
      continue
    fi
    loadgen "c$c" "$c" "$n" "$d" "$hard"
  done
  # The offline run if it fits: estimated from the best throughput measured so far.
  est=$(python3 - "$W" "$GEN" <<'PY'
import glob, json, sys
best = 0.0
for p in glob.glob(sys.argv[1] + "/lg-c*.json"):
    best = max(best, json.load(open(p)).get("output_tokens_per_s") or 0.0)
print(int(1000 * int(sys.argv[2]) / best * 1.15 + 20) if best > 0 else 100000)
PY
)
  hard=$(( $(left) - 25 ))
  if [ "$est" -le "$hard" ]; then
    offline_run "$hard"
  else
    put "$W/offline-skipped.json" skipped "time budget: estimated ${est} s, ${hard} s left; run \`bash bench/gpu/run-issue6.sh offline\`"
    log "offline run skipped: estimated $est s, $hard s left (run the 'offline' phase)"
  fi
}

log "phase $phase, budget $budget s"
env_info
case $phase in
  hf)
    ensure_checkpoint || exit 1
    weights_and_warm
    hf_phase
    rc=$?
    sleep 1  # lets tee write the console file
    exit "$rc"
    ;;
  *)
    trap finish EXIT
    trap 'exit 143' TERM INT  # so that finish runs (stops llmd, writes the JSON) when killed
    ensure_checkpoint || exit 1
    weights_and_warm
    daemon_phase
    ;;
esac
