#!/usr/bin/env bash
# One command for the proxy benchmark: wsgate against nginx, HAProxy and a direct connection.
#
#   benches/run.sh                 # full run: three rounds, 10 s per throughput workload (about 14 minutes)
#   benches/run.sh --quick         # 2 s per workload, fewer idle connections: a smoke test
#   benches/run.sh --duration 20s  # any option of `cargo bench --bench proxy -- all --help`
#
# Installs nginx and HAProxy from Debian when they are missing (a peer that cannot be
# installed is skipped with the reason printed), raises the open-file limit, builds wsgate in
# release mode and runs the harness (benches/proxy.rs). Output: one markdown table on stdout,
# target/bench/results.json and target/bench/ratios.svg. See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

skip_args=()

# --- peers -------------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]} with apt-get" >&2
    if [ "$(id -u)" -ne 0 ]; then
        sudo_cmd=(sudo)
    else
        sudo_cmd=()
    fi
    updated=0
    for pkg in "${missing[@]}"; do
        if [ "$updated" -eq 0 ]; then
            "${sudo_cmd[@]}" apt-get update -qq >&2 || echo "apt-get update failed" >&2
            updated=1
        fi
        if ! DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
            --no-install-recommends "$pkg" >&2; then
            echo "== skipping $pkg: apt-get install $pkg failed" >&2
            skip_args+=(--skip "$pkg")
        fi
    done
fi
# Debian's packages start their services on install; the harness runs its own instances
# on its own ports, so stop the system ones (they would only compete for the CPUs).
for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$svc" ] && pgrep -x "$svc" >/dev/null 2>&1; then
        "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
done

# --- limits ------------------------------------------------------------------------------
# 5,000 idle proxied connections are 10,000 descriptors in the proxy. Children inherit this;
# the harness also raises its own soft limit to the hard limit.
hard=$(ulimit -Hn)
ulimit -n "$hard" || echo "cannot raise the open-file limit to $hard (now $(ulimit -n))" >&2

# --- build and run -----------------------------------------------------------------------
echo "== cargo build --release" >&2
cargo build --release --bin wsgate >&2
echo "== cargo bench --bench proxy -- all $*" >&2
exec cargo bench --bench proxy -- all "${skip_args[@]}" "$@"
