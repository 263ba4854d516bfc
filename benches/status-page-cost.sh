#!/usr/bin/env bash
# What the status page costs: wsgate's CPU while it holds N idle WebSockets (default 5,000),
# first with no page open, then with the status page open in headless Chromium (which
# reads /events every 2 s and pages /connections after each event), each for DURATION
# seconds (default 60). Prints the CPU per second of wall time for both windows.
#
#   benches/status-page-cost.sh [N] [DURATION]
#
# Needs a release build (cargo build --release --bin wsgate --example hold_connections,
# done here) and Debian's chromium (apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
DURATION=${2:-60}
command -v chromium >/dev/null || { echo "chromium is needed: apt-get install chromium" >&2; exit 1; }
cargo build --release --quiet --bin wsgate --example hold_connections
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"   # two descriptors per connection on each side
cat > "$work/proxy.toml" <<TOML
[log]
level = "warn"
[runtime]
worker_threads = 1
[admin]
bind = "127.0.0.1:19090"
[listeners.public]
bind = "127.0.0.1:18080"
[limits]
max_connections_per_ip = 0
[routes.echo]
path = "/echo"
builtin = "echo"
TOML
taskset -c 0 target/release/wsgate --config "$work/proxy.toml" & pids+=($!)
wsgate=$!
for _ in $(seq 50); do curl -sf http://127.0.0.1:19090/readyz >/dev/null && break; sleep 0.1; done
taskset -c 1 target/release/examples/hold_connections ws://127.0.0.1:18080/echo "$N" > "$work/hold.out" & pids+=($!)
for _ in $(seq 600); do grep -q holding "$work/hold.out" 2>/dev/null && break; sleep 0.1; done
grep holding "$work/hold.out"

# utime + stime of wsgate, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$wsgate/stat"; }
hz=$(getconf CLK_TCK)
window() {
  local before after
  before=$(ticks); sleep "$DURATION"; after=$(ticks)
  awk -v t=$((after - before)) -v hz="$hz" -v d="$DURATION" \
    'BEGIN { printf "%.2f ms of CPU per second (%.2f%% of a core)\n", t * 1000 / hz / d, t * 100 / hz / d }'
}
echo -n "no page open:          "; window
taskset -c 1 chromium --headless=new --no-sandbox --disable-gpu --no-first-run \
  --user-data-dir="$work/profile" http://127.0.0.1:19090/ >/dev/null 2>&1 & pids+=($!)
sleep 5   # the page loads and starts its stream
echo -n "status page open:      "; window
echo "rss: $(awk '/VmRSS/ {print $2, $3}' "/proc/$wsgate/status")"
