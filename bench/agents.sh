#!/usr/bin/env bash
# Idle agents against one hub (or several on etcd): hub RSS per idle agent,
# hub CPU at idle, time for every agent to be back after a hub restart (one
# hub) or after one of several hubs is stopped (HUBS=2 or more).
#
#   bench/agents.sh [N]            # default 1000; release build
#   HUBS=3 bench/agents.sh 1000    # three hubs on one etcd (etcd on PATH)
#
# Environment: PROFILE=debug|release (default release), BUILD=0 to use what
# is built, KEEPALIVE=S (default 10), HUBS=N (default 1), KEEP=1 keeps the
# temp dir.
#
# Loopback only, private temp dir; every wait is bounded. Agents come from
# examples/agents_load.rs (real WebSocket + SSH + keepalives, one process).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
KEEPALIVE=${KEEPALIVE:-10}
PROFILE=${PROFILE:-release}
HUBS=${HUBS:-1}
if [ "${BUILD:-1}" = 1 ]; then
    if [ "$PROFILE" = release ]; then
        # apart, so the binary is the one `cargo install` gives (see run.sh)
        cargo build -q --release --bin towerctl && cargo build -q --release --example agents_load
    else
        cargo build -q --bin towerctl --example agents_load
    fi
fi
T=$PWD/target/$PROFILE/towerctl
LOAD=$PWD/target/$PROFILE/examples/agents_load
ulimit -n "$(ulimit -Hn)" || true

D=$(mktemp -d /tmp/twbench.XXXXXX)
export NO_COLOR=1
LOADPID=
ETCDPID=
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Hub k's own XDG directories (its pid file, data dir, control socket).
on() {
    local k=$1
    shift
    HOME=$D/h$k/home XDG_CONFIG_HOME=$D/h$k/config XDG_DATA_HOME=$D/h$k/data \
        XDG_STATE_HOME=$D/h$k/state XDG_RUNTIME_DIR=$D/h$k/run "$@"
}
cleanup() {
    [ -n "$LOADPID" ] && kill "$LOADPID" 2>/dev/null || true
    for k in $(seq 1 "$HUBS"); do on "$k" "$T" down >/dev/null 2>&1 || true; done
    [ -n "$ETCDPID" ] && kill "$ETCDPID" 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "kept $D" || rm -rf "$D"
}
trap cleanup EXIT

STORE=()
if [ "$HUBS" -gt 1 ]; then
    ETCD=$(command -v etcd || true)
    [ -n "$ETCD" ] || { echo "HUBS=$HUBS needs etcd on PATH (Debian: apt-get install etcd-server)" >&2; exit 1; }
    CP=$(port); PP=$(port)
    "$ETCD" --name b --data-dir "$D/etcd" --listen-client-urls "http://127.0.0.1:$CP" \
        --advertise-client-urls "http://127.0.0.1:$CP" --listen-peer-urls "http://127.0.0.1:$PP" \
        --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "b=http://127.0.0.1:$PP" \
        >"$D/etcd.log" 2>&1 &
    ETCDPID=$!
    for _ in $(seq 1 100); do
        curl -sf -XPOST --data '{"key":"AA=="}' "http://127.0.0.1:$CP/v3/kv/range" >/dev/null 2>&1 && break
        sleep 0.2
    done
    STORE=(--store "etcd://127.0.0.1:$CP")
fi

declare -a TP GP
HUBURLS=()
for k in $(seq 1 "$HUBS"); do
    mkdir -p "$D/h$k/home" "$D/h$k/run" && chmod 700 "$D/h$k/run"
    TP[$k]=$(port); GP[$k]=$(port)
    HUBURLS+=(--hub "ws://127.0.0.1:${TP[$k]}/tunnel")
done
up() {
    on "$1" "$T" up --listen "127.0.0.1:${TP[$1]}" --gateway "127.0.0.1:${GP[$1]}" --metrics off \
        --keepalive "${KEEPALIVE}s" "${STORE[@]}" >/dev/null
}
hubpid() { cat "$D/h$1/run/towerctl/hub.pid"; }
rss_kib() { awk '/VmRSS/ {print $2}' /proc/"$(hubpid "$1")"/status; }
cpu_ticks() { awk '{print $14 + $15}' /proc/"$(hubpid "$1")"/stat; }
sum() { local t=0; for k in $(seq 1 "$HUBS"); do t=$((t + $("$@" "$k"))); done; echo $t; }

for k in $(seq 1 "$HUBS"); do up "$k"; done
echo "registering $N members…"
t0=$(date +%s)
# Four registrations at a time (each is one control-socket request), each
# answer in its own file (concurrent writers would interleave lines).
mkdir "$D/reg"
seq 1 "$N" | on 1 xargs -P 4 -I{} sh -c '"$0" cluster add "load{}" -o json > "$1/reg/{}.json"' "$T" "$D"
python3 -c 'import glob,json,sys
for f in glob.glob(sys.argv[1] + "/reg/*.json"):
    d = json.load(open(f)); print(d["name"], d["token"])' "$D" > "$D/tokens"
[ "$(wc -l < "$D/tokens")" -eq "$N" ] || { echo "registered only $(wc -l < "$D/tokens") of $N members" >&2; exit 1; }
echo "registered $N members in $(( $(date +%s) - t0 )) s"
sleep 2
RSS0=$(sum rss_kib)
: > "$D/load.log"
"$LOAD" "${HUBURLS[@]}" --tokens "$D/tokens" --keepalive "$KEEPALIVE" --secs 900 > "$D/load.log" 2>&1 &
LOADPID=$!
wait_all() {
    local before=$1
    local limit=${2:-300}
    for _ in $(seq 1 "$limit"); do
        [ "$(grep -c '^all ' "$D/load.log")" -gt "$before" ] && return 0
        sleep 1
    done
    echo "not every agent connected within $limit s: $(grep '^t=' "$D/load.log" | tail -1)" >&2
    return 1
}
wait_all 0
grep '^all ' "$D/load.log" | tail -1
sleep 5
RSS1=$(sum rss_kib)
echo "hub RSS ($HUBS hub(s) together): $RSS0 KiB with no agent, $RSS1 KiB with $N idle agents: $(( (RSS1 - RSS0) / N )) KiB per agent"
[ "$HUBS" -gt 1 ] && grep '^t=' "$D/load.log" | tail -1
C0=$(sum cpu_ticks); sleep 30; C1=$(sum cpu_ticks)
HZ=$(getconf CLK_TCK)
python3 -c "print('hub CPU at idle with $N agents (keepalive ${KEEPALIVE}s, $HUBS hub(s) together): %.2f%% of one core' % (($C1-$C0)/$HZ/30*100))"

before=$(grep -c '^all ' "$D/load.log")
if [ "$HUBS" = 1 ]; then
    echo "restarting the hub…"
    on 1 "$T" down >/dev/null
    t0=$(date +%s.%N)
    up 1
    wait_all "$before" 120
    t1=$(date +%s.%N)
    python3 -c "print('all $N agents back %.1f s after the hub was up again' % ($t1-$t0))"
else
    echo "stopping hub 1 of $HUBS…"
    t0=$(date +%s.%N)
    on 1 "$T" down >/dev/null
    wait_all "$before" 120
    t1=$(date +%s.%N)
    python3 -c "print('all $N agents connected again (to the other hubs) %.1f s after hub 1 was told to stop' % ($t1-$t0))"
    grep '^t=' "$D/load.log" | tail -1
fi
