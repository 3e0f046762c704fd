#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20) and prints one line per target:
#   <target> execs=<n> exit=<code>
# Exits non-zero when any target crashes, leaks past -rss_limit_mb, or times out.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Only the stable toolchain is needed:
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags. Default `--sanitizer none` (no
# instrumentation cost, one build shared by all targets); FUZZ_SANITIZER=address builds an
# AddressSanitizer variant in target-asan/ (the stable toolchain ships the ASan runtime).
# FUZZ_TARGETS="a b" limits the run to some targets. FUZZ_TARGET_DIR=DIR builds there instead of
# fuzz/target (CI points it at a cache outside the clone so later runs only rebuild llmd's crates).
# Corpora: seeds/<target> (committed), regressions/<target> (committed: every crash found),
# corpus/<target> (grown by runs, ignored by git). Crashes land in artifacts/<target>/.
set -uo pipefail
SECONDS_EACH="${1:-20}"
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
TARGETS="${FUZZ_TARGETS:-control_frame config_toml openai_request safetensors chat_template tokenizer_decode store_listing}"
SAN="${FUZZ_SANITIZER:-none}"
FUZZ=(cargo fuzz)
if [ "$SAN" = none ]; then
    OPTS=(--sanitizer none -O --target-dir "${FUZZ_TARGET_DIR:-target}")
else
    OPTS=(--sanitizer "$SAN" -O --target-dir "${FUZZ_TARGET_DIR:-target}-asan")
fi
"${FUZZ[@]}" build "${OPTS[@]}" >/dev/null || { echo "cargo fuzz build failed" >&2; exit 2; }
failed=0
for t in $TARGETS; do
    mkdir -p "corpus/$t" "seeds/$t" "regressions/$t"
    log="artifacts/$t.log"
    mkdir -p artifacts
    # Regressions first: each must pass on its own.
    if [ -n "$(ls -A "regressions/$t")" ]; then
        if ! "${FUZZ[@]}" run "${OPTS[@]}" "$t" regressions/$t/* -- -runs=1 >"artifacts/$t.regressions.log" 2>&1; then
            echo "$t regression inputs fail: artifacts/$t.regressions.log" >&2
            failed=1
        fi
    fi
    "${FUZZ[@]}" run "${OPTS[@]}" "$t" "corpus/$t" "seeds/$t" "regressions/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1
    code=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    echo "$t execs=${execs:-?} exit=$code"
    if [ "$code" -ne 0 ]; then
        failed=1
        grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5 >&2
    fi
done
exit "$failed"
