#!/usr/bin/env bash
# User-space instructions per operation in wsgate, counted by callgrind: the same count for
# the same binary whatever else the machine is doing, where CPU-time figures move by 10-20%
# from run to run on a shared box. Use it to compare two builds of wsgate; kernel time (most
# of a proxy's CPU, see docs/performance.md) is not counted.
#
#   benches/instructions.sh                      # this tree's target/release/wsgate
#   benches/instructions.sh path/to/other/wsgate # another build, for a before/after
#   WORKLOADS=handshakes benches/instructions.sh # only the rows whose name contains this
#
# The "with JWT" handshake rows route through `[routes.echo.auth] jwt = { jwks = ... }` with
# a fresh key (RS256: made by `openssl`; ES256) and send `Authorization: Bearer TOKEN`.
#
# wsgate runs under valgrind on its own; the echo upstream and the load client of
# benches/proxy.rs drive it for a short and a long window. The difference in instructions
# divided by the difference in operations is the cost of one operation, with start-up and
# connection set-up cancelled out. Takes about a minute per workload.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    echo "== installing valgrind with apt-get" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >&2 ||
        { echo "valgrind is missing and could not be installed" >&2; exit 1; }
fi

wsgate=${1:-target/release/wsgate}
if [ $# -eq 0 ]; then
    cargo build --release --bin wsgate >&2
fi
bench=$(cargo bench --bench proxy --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "proxy" and m.get("executable"):
        print(m["executable"])')
[ -x "$bench" ] || { echo "could not build the proxy benchmark" >&2; exit 1; }

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port=$(port)
"$bench" upstream --port "$up_port" --lifetime 30m >"$work/upstream.log" 2>&1 &
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$up_port") 2>/dev/null && break; sleep 0.1; done

# Instructions and operations for one window: "INSTRUCTIONS OPS". The fifth argument is
# passed to the load client, except --jwt=ALG, which puts the route behind a JWT check.
measure() {
    local mode=$1 size=$2 conns=$3 duration=$4 text=${5:-}
    local plain admin out auth=""
    if [[ $text == --jwt=* ]]; then
        local alg=${text#--jwt=}
        "$bench" jwt --alg "$alg" --dir "$work" >/dev/null
        auth=$(printf '[routes.echo.auth]\njwt = { jwks = "%s" }' "$work/jwks-$alg.json")
        text="--bearer-file $work/token-$alg.txt"
    fi
    plain=$(port)
    admin=$(port)
    cat >"$work/wsgate.toml" <<EOF
[log]
level = "warn"
[runtime]
worker_threads = 1
[admin]
bind = "127.0.0.1:$admin"
[listeners.plain]
bind = "127.0.0.1:$plain"
[limits]
max_connections_per_ip = 100000
handshake_rate_per_ip = "1000000/s"
[upstreams.echo]
servers = ["127.0.0.1:$up_port"]
[routes.echo]
path = "/"
upstream = "echo"
$auth
EOF
    out="$work/callgrind.out"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$wsgate" --config "$work/wsgate.toml" \
        >"$work/valgrind.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$plain") 2>/dev/null && break; sleep 0.1; done
    local ops
    ops=$("$bench" load --url "ws://127.0.0.1:$plain/" --mode "$mode" --size "$size" \
        --conns "$conns" --duration "$duration" --warmup 0s $text |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["ops"])')
    kill -INT "$pid"
    wait "$pid" || true
    local total
    total=$(grep -m1 '^summary:' "$out" | awk '{print $2}')
    echo "$total $ops"
}

printf '| workload | instructions per operation |\n| --- | --- |\n'
for spec in "handshake 32 16 handshakes" "handshake 32 16 handshakes-with-JWT-RS256 --jwt=rs256" \
    "handshake 32 16 handshakes-with-JWT-ES256 --jwt=es256" "echo 32 64 32-B-echo-round-trips" \
    "echo 16384 64 16-KiB-echo-round-trips" "echo 32 64 32-B-JSON-text-echo-round-trips --text=json" \
    "echo 16384 64 16-KiB-JSON-text-echo-round-trips --text=json" \
    "echo 16384 64 16-KiB-mixed-text-echo-round-trips --text=mixed" \
    "http 32 64 plain-HTTP-GETs"; do
    set -- $spec
    if [ -n "${WORKLOADS:-}" ] && [[ ${4//-/ } != *"$WORKLOADS"* ]]; then
        continue
    fi
    read -r i1 o1 < <(measure "$1" "$2" "$3" 2s "${5:-}")
    read -r i2 o2 < <(measure "$1" "$2" "$3" 6s "${5:-}")
    if [ "$o2" -le "$o1" ]; then
        echo "$4: the long window completed no more operations than the short one" >&2
        exit 1
    fi
    printf '| %s | %s |\n' "${4//-/ }" "$(( (i2 - i1) / (o2 - o1) ))"
done
