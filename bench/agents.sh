#!/usr/bin/env bash
# Idle agents against one hub: hub RSS per idle agent, hub CPU at idle,
# time for every agent to be back after a hub restart.
#
#   bench/agents.sh [N]            # default 1000; uses target/{release,debug}/towerctl
#
# Loopback only, private temp dir; every wait is bounded. Agents come from
# examples/agents_load.rs (real WebSocket + SSH + keepalives, one process).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
KEEPALIVE=${KEEPALIVE:-10}
PROFILE=${PROFILE:-debug}
[ "$PROFILE" = release ] && cargo build -q --release --bin towerctl --example agents_load || cargo build -q --bin towerctl --example agents_load
T=target/$PROFILE/towerctl
LOAD=target/$PROFILE/examples/agents_load
ulimit -n "$(ulimit -Hn)" || true

D=$(mktemp -d /tmp/twbench.XXXXXX)
export HOME=$D/home XDG_CONFIG_HOME=$D/config XDG_DATA_HOME=$D/data XDG_STATE_HOME=$D/state XDG_RUNTIME_DIR=$D/run NO_COLOR=1
mkdir -p "$HOME" "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
LOADPID=
cleanup() {
    [ -n "$LOADPID" ] && kill "$LOADPID" 2>/dev/null || true
    "$T" down >/dev/null 2>&1 || true
    [ -n "${KEEP:-}" ] && echo "kept $D" || rm -rf "$D"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TP=$(port); GP=$(port)
up() { "$T" up --listen 127.0.0.1:$TP --gateway 127.0.0.1:$GP --metrics off --keepalive ${KEEPALIVE}s >/dev/null; }
hubpid() { cat "$XDG_RUNTIME_DIR/towerctl/hub.pid"; }
rss_kib() { awk '/VmRSS/ {print $2}' /proc/"$(hubpid)"/status; }
cpu_ticks() { awk '{print $14 + $15}' /proc/"$(hubpid)"/stat; }

up
echo "registering $N members…"
for i in $(seq 1 "$N"); do
    "$T" cluster add "load$i" -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["name"], d["token"])'
done > "$D/tokens"
sleep 2
RSS0=$(rss_kib)
"$LOAD" --hub "ws://127.0.0.1:$TP/tunnel" --tokens "$D/tokens" --keepalive "$KEEPALIVE" --secs 600 > "$D/load.log" 2>&1 &
LOADPID=$!
wait_all() {
    local limit=${2:-300}
    local before=$1
    for _ in $(seq 1 "$limit"); do
        [ "$(grep -c '^all ' "$D/load.log")" -gt "$before" ] && return 0
        sleep 1
    done
    echo "not every agent connected within 300 s: $(tail -1 "$D/load.log")" >&2
    return 1
}
wait_all 0
grep '^all ' "$D/load.log" | tail -1
sleep 5
RSS1=$(rss_kib)
echo "hub RSS: $RSS0 KiB with no agent, $RSS1 KiB with $N idle agents: $(( (RSS1 - RSS0) / N )) KiB per agent"
C0=$(cpu_ticks); sleep 30; C1=$(cpu_ticks)
HZ=$(getconf CLK_TCK)
python3 -c "print('hub CPU at idle with $N agents (keepalive ${KEEPALIVE}s): %.2f%% of one core' % (($C1-$C0)/$HZ/30*100))"

echo "restarting the hub…"
"$T" down >/dev/null
before=$(grep -c '^all ' "$D/load.log")
t0=$(date +%s.%N)
up
wait_all "$before" 60 || { echo "TP=$TP"; ss -ltnp | grep ":$TP " ; tail -2 "$D/load.log"; grep -v "^t=" "$D/load.log" | uniq -c | tail -5; tail -20 "$XDG_STATE_HOME/towerctl/hub.log"; exit 1; }
t1=$(date +%s.%N)
python3 -c "print('all $N agents back %.1f s after the hub was up again' % ($t1-$t0))"
