#!/usr/bin/env bash
# Idle CPU of `towerctl ui` with 100 clusters: a hub on loopback with 100
# members (AGENTS of them joined by live agents on this machine, so the
# dashboard follows 1 + AGENTS control sockets), the dashboard in a private
# tmux server at 160x48, and its CPU time (utime+stime from /proc) over
# SECONDS once settled. Everything runs in a private temp dir and is
# stopped at the end.
#
#   bench/ui-idle-cpu.sh                          # target/release/towerctl, 0 agents, 30s
#   AGENTS=100 SECONDS_=30 bench/ui-idle-cpu.sh
set -euo pipefail
T=${TOWERCTL:-$(cd "$(dirname "$0")/.." && pwd)/target/release/towerctl}
AGENTS=${AGENTS:-0}
SECS=${SECONDS_:-30}
command -v tmux >/dev/null || { echo "error: tmux is needed (apt-get install tmux)" >&2; exit 1; }
[ -x "$T" ] || { echo "error: no towerctl at '$T': cargo build --release, or set TOWERCTL" >&2; exit 1; }

D=$(mktemp -d /tmp/twcpu.XXXXXX)
mkdir -p "$D"/{home,config,data,state,run}
chmod 700 "$D/run"
export HOME=$D/home XDG_CONFIG_HOME=$D/config XDG_DATA_HOME=$D/data XDG_STATE_HOME=$D/state XDG_RUNTIME_DIR=$D/run LANG=C.UTF-8
TMUX_SOCK=$D/tmux.sock
cleanup() {
    tmux -S "$TMUX_SOCK" kill-server 2>/dev/null || true
    for i in $(seq 0 $((AGENTS - 1))); do "$T" leave "$(printf edge-%03d "$i")" >/dev/null 2>&1 || true; done
    "$T" down >/dev/null 2>&1 || true
    rm -rf "$D"
}
trap cleanup EXIT

# The members' agents need an upstream kubeconfig; nothing dials it.
cat > "$D/member.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: m, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
contexts: [{name: m, context: {cluster: m, user: m}}]
current-context: m
users: [{name: m, user: {token: unused}}]
KC

"$T" up --listen 127.0.0.1:0 --gateway 127.0.0.1:0 >/dev/null
for i in $(seq 0 99); do
    name=$(printf edge-%03d "$i")
    join=$("$T" cluster add "$name" 2>/dev/null)
    if [ "$i" -lt "$AGENTS" ]; then
        # shellcheck disable=SC2086
        "$T" ${join#towerctl } --kubeconfig "$D/member.kubeconfig" >/dev/null
    fi
done

tmux -S "$TMUX_SOCK" -f /dev/null -u new-session -d -s ui -x 160 -y 48 "exec $T ui"
sleep 5
pid=$(tmux -S "$TMUX_SOCK" list-panes -t ui -F '#{pane_pid}')
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
a=$(ticks)
sleep "$SECS"
b=$(ticks)
hz=$(getconf CLK_TCK)
echo "towerctl ui, 100 members, $AGENTS local agents: $((b - a)) ticks of CPU in ${SECS}s = $(echo "scale=2; 100 * ($b - $a) / $hz / $SECS" | bc)% of one core"
tmux -S "$TMUX_SOCK" capture-pane -p -t ui | head -3
