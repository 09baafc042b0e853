#!/usr/bin/env bash
# Concurrent watch streams through the gateway: W watches spread over C
# clusters (C real agents, one tunnel each), then one event at a time from
# the upstream: how long until it has reached every watch (goal: 2 s).
#
#   bench/watches.sh [WATCHES] [CLUSTERS]     # default 10000 over 100
#
# Loopback only, private temp dir; every wait is bounded. The upstream is
# examples/bench_upstream.rs (its configmaps watch carries one event per
# POST /trigger), the watchers examples/watch_load.rs (HTTPS to the gateway
# with the admin operator's token, as kubectl would). PROFILE=debug to use
# debug builds (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
W=${1:-10000}
C=${2:-100}
PROFILE=${PROFILE:-release}
if [ "${BUILD:-1}" = 1 ]; then
    if [ "$PROFILE" = release ]; then
        # apart, so the binary is the one `cargo install` gives (see run.sh)
        cargo build -q --release --bin towerctl && cargo build -q --release --example bench_upstream --example watch_load
    else
        cargo build -q --bin towerctl --example bench_upstream --example watch_load
    fi
fi
T=$PWD/target/$PROFILE/towerctl
UP=$PWD/target/$PROFILE/examples/bench_upstream
LOAD=$PWD/target/$PROFILE/examples/watch_load
ulimit -n "$(ulimit -Hn)" || true

D=$(mktemp -d /tmp/twwatch.XXXXXX)
export HOME=$D/home XDG_CONFIG_HOME=$D/config XDG_DATA_HOME=$D/data XDG_STATE_HOME=$D/state XDG_RUNTIME_DIR=$D/run NO_COLOR=1
mkdir -p "$HOME" "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
UPPID=
cleanup() {
    for f in "$XDG_RUNTIME_DIR"/towerctl/agent-*.pid; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    "$T" down >/dev/null 2>&1 || true
    [ -n "$UPPID" ] && kill "$UPPID" 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "kept $D" || rm -rf "$D"
}
trap cleanup EXIT

"$UP" >"$D/upstream.out" 2>&1 &
UPPID=$!
for _ in $(seq 1 50); do grep -q listening "$D/upstream.out" && break; sleep 0.1; done
UPADDR=$(awk '/listening on/ {print $3}' "$D/upstream.out")
[ -n "$UPADDR" ] || { echo "the upstream did not start" >&2; exit 1; }

member_kubeconfig "http://$UPADDR" "$D/member.kubeconfig"

"$T" up --listen 127.0.0.1:0 --gateway 127.0.0.1:0 --metrics off >/dev/null
GATEWAY_URL=$("$T" status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["hub"]["gatewayURL"].rstrip("/"))')
HOST=$(python3 -c 'import sys,urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).hostname)' "$GATEWAY_URL")
TOKEN=$(tr -d '[:space:]' <"$XDG_DATA_HOME/towerctl/admin.token")
echo "starting $C agents…"
t0=$(date +%s)
: >"$D/targets"
for i in $(seq 1 "$C"); do
    read -r -a JOIN <<<"$("$T" cluster add "w$i" 2>/dev/null | grep -m1 'towerctl join')"
    # Printed as ` TOWERCTL_TOKEN=… towerctl join …`: run it as printed,
    # with this build's binary for `towerctl`.
    JOIN=("${JOIN[@]/#towerctl/$T}")
    env "${JOIN[@]}" --kubeconfig "$D/member.kubeconfig" --allow 127.0.0.0/8 >"$D/join-$i.out" 2>&1 ||
        { echo "join w$i failed: $(cat "$D/join-$i.out")" >&2; exit 1; }
    echo "$GATEWAY_URL/clusters/w$i $HOST" >>"$D/targets"
done
echo "$C agents up in $(( $(date +%s) - t0 )) s"
HUBPID=$(cat "$XDG_RUNTIME_DIR/towerctl/hub.pid")
rss() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }
RSS0=$(rss "$HUBPID")
set +e
"$LOAD" --targets "$D/targets" --token "$TOKEN" --ca "$XDG_DATA_HOME/towerctl/ca.crt" \
    --watches "$W" --trigger "$UPADDR" --events 3 --secs 180 &
LOADPID=$!
sleep 20
RSS1=$(rss "$HUBPID")
AG=0
for f in "$XDG_RUNTIME_DIR"/towerctl/agent-*.pid; do AG=$((AG + $(rss "$(cat "$f")"))); done
wait $LOADPID
rc=$?
echo "hub RSS $RSS0 KiB before the watches, $RSS1 KiB 20 s into the run; agents together $AG KiB"
exit $rc
