#!/usr/bin/env bash
# `kubectl get ns` against MEMBERS members (default 30), each with its own
# agent: a sequential `for` loop over the `tower-NAME` contexts against
# `towerctl kubectl --parallel PARALLEL -- get ns`. Wall-clock seconds, best
# and median of ROUNDS rounds, after one warm-up round of each (kubectl's
# discovery cache is warm for both).
#
# Everything runs on loopback in a private temp dir; the member API server
# is a small python3 stand-in answering just what `kubectl get ns` asks.
#
#   bench/fanout.sh                          # MEMBERS=30 PARALLEL=8 ROUNDS=3
#   MEMBERS=10 bench/fanout.sh
#
# Environment: MEMBERS, PARALLEL, ROUNDS, TOWERCTL (default target/release,
# else target/debug), KUBECTL (default kubectl), KEEP_WORKDIR=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
MEMBERS=${MEMBERS:-30}
PARALLEL=${PARALLEL:-8}
ROUNDS=${ROUNDS:-3}
KUBECTL=${KUBECTL:-kubectl}
if [[ -z ${TOWERCTL:-} ]]; then
    TOWERCTL=$ROOT/target/release/towerctl
    [[ -x $TOWERCTL ]] || TOWERCTL=$ROOT/target/debug/towerctl
fi
[[ -x $TOWERCTL ]] || { echo "fanout: build towerctl first (cargo build --release)" >&2; exit 1; }
T=$TOWERCTL

W=$(mktemp -d /tmp/twfan.XXXXXX)
UP_PID=""
cleanup() {
    for f in "$W"/run/towerctl/*.pid; do
        [[ -f $f ]] && kill "$(<"$f")" 2>/dev/null || true
    done
    [[ -n $UP_PID ]] && kill "$UP_PID" 2>/dev/null || true
    if [[ ${KEEP_WORKDIR:-0} == 1 ]]; then echo "workdir: $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
mkdir -p "$W"/{home,config,data,state,run}
chmod 700 "$W/run"
export HOME=$W/home XDG_CONFIG_HOME=$W/config XDG_DATA_HOME=$W/data XDG_STATE_HOME=$W/state XDG_RUNTIME_DIR=$W/run NO_COLOR=1
unset KUBECONFIG TOWERCTL_TOKEN RUST_LOG

# The member API server: discovery and the namespace list, nothing else.
cat >"$W/upstream.py" <<'EOF'
import json, sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
DOCS = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
         "verbs": ["get", "list"], "shortNames": ["ns"]}]},
    "/api/v1/namespaces": {"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
        "items": [{"metadata": {"name": n, "creationTimestamp": "2026-01-01T00:00:00Z"},
                   "status": {"phase": "Active"}} for n in ("default", "kube-system", "kube-public")]},
}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        doc = DOCS.get(self.path.split("?")[0])
        body = json.dumps(doc if doc is not None else {"kind": "Status", "code": 404}).encode()
        self.send_response(200 if doc is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
EOF
python3 "$W/upstream.py" >"$W/upstream.port" &
UP_PID=$!
for _ in $(seq 100); do [[ -s $W/upstream.port ]] && break; sleep 0.1; done
UPPORT=$(<"$W/upstream.port")
cat >"$W/member.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: up, cluster: {server: "http://127.0.0.1:$UPPORT"}}]
users: [{name: up, user: {token: bench}}]
contexts: [{name: up, context: {cluster: up, user: up}}]
current-context: up
EOF

timeout 60 "$T" up --listen 127.0.0.1:0 --gateway 127.0.0.1:0 --metrics off >"$W/up.out" 2>&1 ||
    { echo "towerctl up failed: $(cat "$W/up.out")" >&2; exit 1; }
echo "==> $MEMBERS members, each with its own agent ($T)" >&2
names=()
for i in $(seq -w 1 "$MEMBERS"); do
    n=m$i
    names+=("$n")
    line=$(timeout 20 "$T" cluster add "$n" --label bench=fanout 2>/dev/null)
    read -r -a join <<<"$line"
    timeout 60 "$T" "${join[@]:1}" --kubeconfig "$W/member.kubeconfig" >"$W/join-$n.out" 2>&1 ||
        { echo "join $n failed: $(cat "$W/join-$n.out")" >&2; exit 1; }
done
timeout 60 "$T" kubeconfig >"$W/kubeconfig"

sequential() {
    for n in "${names[@]}"; do
        "$KUBECTL" --kubeconfig "$W/kubeconfig" --context "tower-$n" get ns >/dev/null
    done
}
parallel() {
    "$T" kubectl -l bench=fanout --parallel "$PARALLEL" -- get ns >"$W/merged.out"
}
seconds() {
    local s e
    s=$(date +%s.%N)
    "$@"
    e=$(date +%s.%N)
    python3 -c "print(f'{$e - $s:.2f}')"
}
sequential
parallel
rows=$(grep -c ' kube-system ' "$W/merged.out" || true)
[[ $rows == "$MEMBERS" ]] || { echo "merged output has $rows kube-system rows, not $MEMBERS" >&2; exit 1; }
seq_t=() par_t=()
for _ in $(seq "$ROUNDS"); do
    seq_t+=("$(seconds sequential)")
    par_t+=("$(seconds parallel)")
done
summary() { python3 -c 'import sys, statistics as s; v = [float(x) for x in sys.argv[1:]]; print("best %.2fs  median %.2fs  (%s)" % (min(v), s.median(v), " ".join(sys.argv[1:])))' "$@"; }
echo "kubectl get ns x $MEMBERS members, $(nproc) CPUs, towerctl $(basename "$(dirname "$T")") build"
echo "  sequential for loop:             $(summary "${seq_t[@]}")"
echo "  towerctl kubectl --parallel $PARALLEL:  $(summary "${par_t[@]}")"
