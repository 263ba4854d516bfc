#!/usr/bin/env bash
# Runs every libFuzzer target for SECONDS each (default 60) and fails on the first crash.
#
#   bash fuzz/run.sh          # 60 s per target
#   bash fuzz/run.sh 600      # longer, before a release
#
# Installs cargo-fuzz from crates.io when it is missing. The targets build with the stable
# toolchain: cargo-fuzz passes a few nightly-only compiler flags, which RUSTC_BOOTSTRAP=1
# allows. Crashing inputs are kept in fuzz/artifacts/TARGET/; docs/fuzzing.md says how to
# replay them.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-60}
# One line per target: adding a target is adding its name here (and a [[bin]] in Cargo.toml).
TARGETS=(
    parse_frame
    head_guard
    upstream_head
    raw_body
)

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz >&2
fi

echo "== building ${#TARGETS[@]} targets" >&2
cargo fuzz build -O >&2

failed=0
for target in "${TARGETS[@]}"; do
    log=$(mktemp)
    if cargo fuzz run -O "$target" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 >"$log" 2>&1; then
        runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo "?")
        echo "ok      $target: $runs runs in ${SECONDS_PER_TARGET}s, no crash"
    else
        echo "FAILED  $target: see the log below; the input is in fuzz/artifacts/$target/"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written' -A4 "$log" | head -40
        failed=1
    fi
    rm -f "$log"
done
exit "$failed"
