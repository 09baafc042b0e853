#!/usr/bin/env bash
# Regenerates link/hot-text.ld: the functions an idle hub and an agent run,
# which build.rs has the linker place together ahead of the rest of the code
# (release builds on Linux), so that the hub's resident code is what it uses.
#
#   bench/hot-text.sh            # builds, measures, rewrites link/hot-text.ld
#
# It starts the same scene as bench/run.sh before its first measurement: a
# hub, one member whose agent's upstream is bench_upstream, one gateway
# request, one `towerctl port-forward` carried by the hub and one through the
# gateway, each with a request. The hub and the agent run under valgrind's
# callgrind (Debian package `valgrind`), which lists every function they ran;
# callgrind is dumped while both are idle. The hub's functions come first,
# then those only the agent ran. Everything runs in a private temporary
# directory on loopback and is stopped at the end.
#
# Environment: CARGO_TARGET_DIR as for cargo; KEEP_WORKDIR=1 keeps the
# temporary directory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
OUT=$ROOT/link/hot-text.ld
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null ||
    { echo "hot-text: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
command -v curl >/dev/null || { echo "hot-text: curl is not installed" >&2; exit 1; }

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# Built apart: built together, the example's dev-dependencies would change the
# features (and so the symbol hashes) of the binary operators install.
(cd "$ROOT" && cargo build --release --locked --bin towerctl && cargo build --release --locked --example bench_upstream)
T=$TARGET_DIR/release/towerctl
UPSTREAM=$TARGET_DIR/release/examples/bench_upstream

W=$(mktemp -d "${TMPDIR:-/tmp}/towerctl-hot-text.XXXXXX")
PIDS=()
cleanup() {
    set +e
    if [[ -n ${XDG_RUNTIME_DIR:-} ]]; then
        timeout 30 "$T" leave alpha >/dev/null 2>&1
        timeout 30 "$T" down >/dev/null 2>&1
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for f in "$W"/run/towerctl/*.pid; do
        [[ -f $f ]] && kill "$(<"$f")" 2>/dev/null
    done
    [[ ${KEEP_WORKDIR:-} == 1 ]] && echo "hot-text: kept $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W"/{home,config,data,state,run,cg}
chmod 700 "$W/run"

"$UPSTREAM" >"$W/upstream.out" 2>"$W/upstream.err" </dev/null &
PIDS+=($!)
# printed_port FILE SED: the port a process prints in FILE (SED picks it
# out), waited for up to 15 s; empty if it never comes.
printed_port() {
    local port=""
    for ((i = 0; i < 75; i++)); do
        port=$(sed -n "$2" "$1")
        [[ -n $port ]] && break
        sleep 0.2
    done
    echo "$port"
}
UPPORT=$(printed_port "$W/upstream.out" 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p')
[[ -n $UPPORT ]] || { echo "hot-text: bench_upstream did not start" >&2; exit 1; }

export HOME=$W/home XDG_CONFIG_HOME=$W/config XDG_DATA_HOME=$W/data XDG_STATE_HOME=$W/state XDG_RUNTIME_DIR=$W/run
unset KUBECONFIG TOWERCTL_TOKEN RUST_LOG
# --trace-children: `up` starts the hub (and `join` the agent) as a child.
CG=(valgrind -q --tool=callgrind --demangle=no --trace-children=yes "--callgrind-out-file=$W/cg/%p")
timeout 120 "${CG[@]}" "$T" up --listen 127.0.0.1:0 --gateway 127.0.0.1:0 --metrics off >"$W/up.out" 2>&1 ||
    { echo "hot-text: towerctl up failed: $(cat "$W/up.out")" >&2; exit 1; }
"$T" status -o json >"$W/status.json"
GATEWAY=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["hub"]["gatewayURL"].rstrip("/"))' "$W/status.json")
AUTH="Authorization: Bearer $(tr -d '[:space:]' <"$XDG_DATA_HOME/towerctl/admin.token")"
member_kubeconfig "http://127.0.0.1:$UPPORT" "$W/member.kubeconfig"
read -r -a JOIN <<<"$("$T" cluster add alpha 2>/dev/null)"
[[ ${JOIN[0]:-} == TOWERCTL_TOKEN=* && ${JOIN[2]:-} == join ]] || { echo "hot-text: unexpected join line" >&2; exit 1; }
timeout 120 env "${JOIN[0]}" "${CG[@]}" "$T" "${JOIN[@]:2}" --kubeconfig "$W/member.kubeconfig" --allow 127.0.0.0/8 >"$W/join.out" 2>&1 ||
    { echo "hot-text: towerctl join failed: $(cat "$W/join.out")" >&2; exit 1; }
HUB=$(<"$W/run/towerctl/hub.pid")
AGENT=$(<"$W/run/towerctl/agent-alpha.pid")
get() { # get URL [curl args]: retried until it answers (valgrind is slow to start)
    local url=$1
    shift
    for ((i = 0; i < 150; i++)); do
        curl -sf --max-time 10 "$@" "$url" >/dev/null && return 0
        sleep 0.2
    done
    echo "hot-text: no answer from $url" >&2
    return 1
}
get "$GATEWAY/clusters/alpha/version" -k -H "$AUTH"
for via in hub gateway; do
    env TOWERCTL_FORWARD_VIA=$via "$T" port-forward alpha svc/web :80 --address 127.0.0.1 \
        >"$W/pf-$via.out" 2>"$W/pf-$via.err" </dev/null &
    PIDS+=($!)
    port=$(printed_port "$W/pf-$via.out" 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) -> 80$/\1/p')
    [[ -n $port ]] || { echo "hot-text: port-forward via $via did not start: $(cat "$W/pf-$via.err")" >&2; exit 1; }
    get "http://127.0.0.1:$port/version"
done
sleep 2 # let both go idle (timers, keepalive set-up)
callgrind_control -d "$HUB" >/dev/null 2>&1
callgrind_control -d "$AGENT" >/dev/null 2>&1
for ((i = 0; i < 100; i++)); do
    [[ -s $(ls "$W"/cg/"$HUB".* 2>/dev/null | head -1) && -s $(ls "$W"/cg/"$AGENT".* 2>/dev/null | head -1) ]] && break
    sleep 0.2
done

nm --defined-only "$T" | awk '$2 ~ /^[tTwW]$/ { print $1, $3 }' >"$W/symbols.txt"
python3 - "$W/symbols.txt" "$OUT" "$W"/cg/"$HUB".* -- "$W"/cg/"$AGENT".* <<'EOF'
import re, sys

symbols_file, out = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
split = rest.index("--")
hub_dumps, agent_dumps = rest[:split], rest[split + 1:]

address = {}
for line in open(symbols_file):
    a, name = line.split()
    address.setdefault(name, int(a, 16))

def ran(paths):
    """Functions with a cost in callgrind dumps (names are compressed: fn=(N) NAME once, then fn=(N))."""
    names, seen = {}, set()
    for path in paths:
        for line in open(path, errors="replace"):
            m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if not m:
                continue
            kind, ident, name = m.groups()
            if name:
                names[ident] = name
            if kind == "fn":
                seen.add(ident)
    return {names[i] for i in seen if i in names and names[i] in address}

def glob(name):
    # Hashes change with dependency versions, features and compiler flags;
    # the paths do not. LTO may add or drop a ".llvm.N" suffix.
    p = re.sub(r"\.llvm\.\d+$", "", name)
    p = re.sub(r"17h[0-9a-f]{16}E$", "17h", p)
    if p.startswith("_R"):
        p = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", p)
    return p + "*"

# A legacy-mangled generic function has one path for all its instances
# (`<&T as Debug>::fmt`): there the hash is what tells the one that ran, so
# such a name keeps it. It goes stale when the dependencies change; the
# function then just lands with the cold code.
matches = {}
for name in address:
    matches[glob(name)] = matches.get(glob(name), 0) + 1

def pattern(name):
    p = glob(name)
    return p if matches[p] == 1 else re.sub(r"\.llvm\.\d+$", "", name) + "*"

hub = ran(hub_dumps)
agent = ran(agent_dumps) - hub
if len(hub) < 500:
    sys.exit(f"hot-text: only {len(hub)} hub functions found; is this build's symbol table stripped?")
lines, seen = [], set()
for group in (hub, agent):
    for name in sorted(group, key=address.get):  # today's order within the group
        p = pattern(name)
        if re.search(r'[(){};,="\s]', p):
            continue  # not expressible as a linker-script pattern
        if p not in seen:
            seen.add(p)
            # LLVM puts cold functions (#[cold], slow paths) in .text.unlikely.NAME.
            lines.append(f"    *(.text.{p} .text.unlikely.{p})\n")
with open(out + ".tmp", "w") as f:
    f.write("/* The functions an idle hub runs, then those only an agent runs, placed\n"
            "   together ahead of the rest of the code (see build.rs). Made by\n"
            "   bench/hot-text.sh; regenerate it after large changes or dependency updates.\n"
            "   Hashes are \"*\" where the path alone names one function. */\n")
    f.write("SECTIONS\n{\n  .text.hot : {\n")
    f.writelines(lines)
    f.write("  }\n}\nINSERT BEFORE .text;\n")
import os
os.replace(out + ".tmp", out)
print(f"hot-text: {len(hub)} hub and {len(agent)} agent-only functions, {len(lines)} patterns -> {out}")
EOF
