#!/usr/bin/env bash
# Open-WebUI's browser chat with a reasoning model, against the real llmd (issue 24).
#
#   tests/openwebui/install_openwebui.sh     # once: Open-WebUI venv without torch (~1.8 GB);
#                                            # WITH_CHROMIUM=1 (root) also apt-installs chromium
#   tests/openwebui/run.sh                   # builds llmd if needed, runs the checks
#
# Starts target/debug/llmd (or $LLMD) on a free loopback port with an API key, serving
# tests/fixtures/models/r1_chain with reasoning_parser = "deepseek_r1": a model whose every reply
# is "\nOkay, the data is in that string." as reasoning_content and " The object will return!"
# as content. Then:
#   1. stream_clients.py: curl -N and the openai SDK (create(stream=True), the stream() helper,
#      non-streaming) accumulate exactly that reasoning and answer;
#   2. check_openwebui.py: Open-WebUI (from $OWUI_VENV) lists the model, chats through its REST
#      API, and the real chat page in headless Chromium shows the reasoning block and then the
#      answer; the saved chat holds the answer. Screenshot: $OUT_DIR/openwebui-chat.png.
# Exits non-zero if any check fails. Environment: OWUI_VENV (default /tmp/owui-venv), LLMD,
# CHROMIUM, OUT_DIR (screenshot, llmd.log, Open-WebUI's log and database; default a new temp
# dir, removed after a run that passed).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here="$root/tests/openwebui"
venv=${OWUI_VENV:-/tmp/owui-venv}
llmd=${LLMD:-$root/target/debug/llmd}
out=${OUT_DIR:-$(mktemp -d /tmp/llmd-openwebui.XXXXXX)}
[ -n "${OUT_DIR:-}" ] || remove_out_if_passed=1
mkdir -p "$out"
model_dir="$root/tests/fixtures/models/r1_chain"
reasoning=$'\nOkay, the data is in that string.'
answer=' The object will return!'
key="sk-openwebui-check"

if [ ! -x "$venv/bin/open-webui" ]; then
    echo "FAIL no Open-WebUI in $venv: run tests/openwebui/install_openwebui.sh (or set OWUI_VENV)" >&2
    exit 2
fi
if ! command -v "${CHROMIUM:-chromium}" >/dev/null; then
    echo "FAIL no chromium: apt-get install chromium (WITH_CHROMIUM=1 install_openwebui.sh does it as root)" >&2
    exit 2
fi
if [ -z "${LLMD:-}" ]; then
    (cd "$root" && cargo build -q -p llmd)
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$out/llmd.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
api_keys = ["$key"]
shutdown_timeout_secs = 5

[control]
socket = "$out/llmd.sock"
group = "$(id -gn)"
dbus = "off"

[storage]
models_dir = "$out/models"
offline = true

[log]
level = "info"
target = "stderr"

[[models]]
source = "$model_dir"
name = "r1"
reasoning_parser = "deepseek_r1"
EOF

"$llmd" --config "$out/llmd.toml" > "$out/llmd.log" 2>&1 &
llmd_pid=$!
trap 'kill "$llmd_pid" 2>/dev/null || true; wait "$llmd_pid" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "$llmd_pid" 2>/dev/null || { echo "FAIL llmd exited; log:" >&2; cat "$out/llmd.log" >&2; exit 1; }
    sleep 0.5
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "FAIL llmd not ready in 60 s" >&2; exit 1; }
echo "INFO llmd pid $llmd_pid on 127.0.0.1:$port serving r1_chain as r1 (log $out/llmd.log)"

status=0
"$venv/bin/python" "$here/stream_clients.py" "http://127.0.0.1:$port/v1" "$key" r1 \
    --reasoning "$reasoning" --content "$answer" || status=1
python3 "$here/check_openwebui.py" "http://127.0.0.1:$port/v1" "$key" r1 --venv "$venv" \
    --expect-reasoning --expect-text "${answer# }" --screenshot "$out/openwebui-chat.png" \
    --work-dir "$out/openwebui" || status=1
if [ "$status" -eq 0 ] && [ -n "${remove_out_if_passed:-}" ]; then
    rm -rf "$out"
else
    echo "INFO screenshot $out/openwebui-chat.png, logs in $out"
fi
exit "$status"
