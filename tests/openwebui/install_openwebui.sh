#!/usr/bin/env bash
# Install Open-WebUI into a venv WITHOUT torch/CUDA (CPU-only machine, offline use).
#
#   bash install_openwebui.sh            # venv at $OWUI_VENV (default /tmp/owui-venv)
#   OWUI_VERSION=0.12.4 PYTHON=python3.11 bash install_openwebui.sh
#   WITH_CHROMIUM=1 bash install_openwebui.sh   # also apt-get install chromium (for --screenshot)
#
# A venv that already holds open-webui $OWUI_VERSION is kept as it is (CI caches it), so a
# second run costs nothing.
#
# Why not `pip install open-webui`: its sentence-transformers and accelerate pins pull
# torch 2.15 + the CUDA 13 wheels (nvidia-*, triton, ~several GB). Those only serve
# local embeddings / reranking / whisper, which the check turns off by env
# (RAG_EMBEDDING_MODEL='' etc.), and Open-WebUI imports them lazily. So: install every
# pinned dependency except those two, then the wheel itself with --no-deps.
set -euo pipefail
VENV=${OWUI_VENV:-/tmp/owui-venv}
VER=${OWUI_VERSION:-0.12.4}
PY=${PYTHON:-python3}
SKIP='^(sentence-transformers|accelerate)(\[.*\])?([=<>!~ ;]|$)'

install_chromium() {
  if [ "${WITH_CHROMIUM:-0}" = 1 ] && ! command -v chromium >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-dejavu-core
  fi
}

if [ -x "$VENV/bin/open-webui" ] &&
   [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('open-webui'))" 2>/dev/null)" = "$VER" ]; then
  echo "open-webui $VER already in $VENV"
  install_chromium
  exit 0
fi

"$PY" -c 'import sys; assert (3,11) <= sys.version_info[:2] < (3,13), "open-webui needs Python 3.11 or 3.12"'
t0=$(date +%s)
dl=$(mktemp -d /tmp/owui-dl.XXXXXX)
trap 'rm -rf "$dl"' EXIT
"$PY" -m pip download -q --no-deps "open-webui==$VER" -d "$dl"
whl=$(ls "$dl"/open_webui-*.whl)
echo "wheel: $(basename "$whl") $(du -h "$whl" | cut -f1)"
"$PY" - "$whl" > "$dl/reqs.txt" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
for line in z.read(meta).decode().splitlines():
    if line.startswith('Requires-Dist: ') and 'extra ==' not in line:
        print(line[len('Requires-Dist: '):])
EOF
grep -Eiv "$SKIP" "$dl/reqs.txt" > "$dl/reqs-notorch.txt"
echo "deps: $(wc -l < "$dl/reqs.txt") pinned, skipping: $(grep -Ei "$SKIP" "$dl/reqs.txt" | tr '\n' ' ')"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q -r "$dl/reqs-notorch.txt"
"$VENV/bin/pip" install -q --no-deps "$whl"

if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "WARNING: torch is importable in $VENV (not expected)"
fi
echo "open-webui $("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('open-webui'))") in $VENV, entry point $VENV/bin/open-webui"
echo "venv: $VENV $(du -sh "$VENV" | cut -f1), install took $(( $(date +%s) - t0 ))s"

install_chromium
