#!/usr/bin/env bash
# Pull benchmark: llmd-store vs `curl -o /dev/null` on one multi-GB file over loopback.
# Writes bench/results/2026-11-21-cpu-pull.md. Options go to the example:
#   --size-gib N (default 4)  --rounds N (default 2)  --dir /tmp  --out PATH
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
exec cargo run --release -p llmd-store --example bench_pull -- "$@"
