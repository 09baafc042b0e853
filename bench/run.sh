#!/usr/bin/env bash
# towerctl benchmark: bulk throughput, small-request rate/latency and
# connection-setup latency of the towerctl gateway path and of the raw-channel
# path (`towerctl port-forward`: HTTP CONNECT through the gateway, then raw
# bytes over an SSH channel to the agent), against the same upstream reached
# directly, through OpenSSH local and reverse forwards (`ssh -L`, `ssh -R`,
# each with and without a pty) and, when `rathole` is on PATH, through
# rathole's encrypted (noise) transport.
#
# Everything runs on loopback, in a private temp dir, and every load loop is
# bounded in time. See bench/README.md for what each figure means.
#
#   bench/run.sh                      # BYTES=1GiB DURATION=10s
#   BYTES=256MiB DURATION=5s bench/run.sh
#
# Environment:
#   BYTES         bulk download size: N, NK/NKiB, NM/NMiB, NG/NGiB (binary), NKB/NMB/NGB (decimal); default 1GiB
#   DURATION      wrk duration per path (wrk syntax: 10s, 1m); default 10s
#   WARMUP        wrk warm-up per path before measuring (0 to skip); default 1s
#   LIGHT_DURATION  wrk -t1 -c1 run per path for unloaded latency (0 to skip); default 5s
#   CONNECTIONS   wrk connections; default 16
#   THREADS       wrk threads; default 2
#   PATHS         which paths to measure; default
#                 "direct gateway portfwd portfwd_gw ssh_L ssh_tt_L ssh_N ssh_tt ssh_dflt rathole bore"
#                 (rathole and bore only when they are on PATH)
#   SETUP_CONNECTIONS  fresh connections per path for the connection-setup latency
#                 (connect -> first byte of GET /version); default 200 (0 to skip)
#   SETUP_MAX_SECONDS  time bound of that loop per path; default 60
#   CLOSE_DURATION  wrk run per path with "Connection: close" (a new connection per
#                 request, THREADS x CONNECTIONS); default 5s (0 to skip)
#   HELD          connections held open per path (one request each) to measure the
#                 memory a held connection costs each side; default 100 (0 to skip)
#   SSH_CIPHER    cipher for the OpenSSH baseline; default aes256-gcm@openssh.com
#                 (towerctl's first choice); "default" lets OpenSSH negotiate.
#                 Path ssh_dflt is `ssh -tt -L` with OpenSSH's own negotiation
#                 (chacha20-poly1305) whatever SSH_CIPHER says: OpenSSH as an
#                 operator runs it, reported apart, not one of the rows the
#                 targets compare with
#   BULK_TIMEOUT  seconds allowed for one bulk download or upload; default 300
#   H2_STREAMS    HTTP/2 streams at a time on the one connection of the gateway's
#                 HTTP/2 run (h2load, when on PATH); default 16
#   UPLOAD        1 measures the upload direction too (POST of BYTES to /sink); 0 skips it
#   QUIET_WAIT    before each path, wait up to this many seconds for the machine to
#                 be idle (other work at most QUIET_MAX_BUSY % of all CPUs); default 120
#   QUIET_MAX_BUSY  default 10
#   RETRIES       times a path is measured again when other work was found running
#                 right after it (its figures would be polluted); default 2
#   BUILD         1 builds the release binaries first (default); 0 uses what is built
#   JOBS          cargo build jobs; default 1
#   KEEP_WORKDIR  1 keeps the temp dir (logs, configs) after the run
#   RESULTS_DIR   where latest.json and the daemons' logs go; default bench/results
#   TOWERCTL_REV  label for the towerctl build in the report; default: git describe of this tree
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/sshd-config.sh
source "$HERE/sshd-config.sh"
ROOT=$(cd "$HERE/.." && pwd)
. "$ROOT/bench/lib.sh"

BYTES_SPEC=${BYTES:-1GiB}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
LIGHT_DURATION=${LIGHT_DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-2}
SSH_CIPHER=${SSH_CIPHER:-aes256-gcm@openssh.com}
BULK_TIMEOUT=${BULK_TIMEOUT:-300}
UPLOAD=${UPLOAD:-1}
QUIET_WAIT=${QUIET_WAIT:-120}
QUIET_MAX_BUSY=${QUIET_MAX_BUSY:-10}
RETRIES=${RETRIES:-2}
BUILD=${BUILD:-1}
JOBS=${JOBS:-1}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SETUP_CONNECTIONS=${SETUP_CONNECTIONS:-200}
SETUP_MAX_SECONDS=${SETUP_MAX_SECONDS:-60}
CLOSE_DURATION=${CLOSE_DURATION:-5s}
HELD=${HELD:-100}
ALL_PATHS="direct gateway portfwd portfwd_gw ssh_L ssh_tt_L ssh_N ssh_tt ssh_dflt rathole bore"
PATHS=${PATHS:-$ALL_PATHS}
CLUSTER=bench

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'bench: warning: %s\n' "$*" >&2; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

# --- inputs -----------------------------------------------------------------

parse_bytes() {
    local s=$1
    [[ $s =~ ^([0-9]+)([A-Za-z]*)$ ]] || return 1
    local n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2],,}
    case $u in
    "" | b) echo "$n" ;;
    k | kib) echo $((n * 1024)) ;;
    m | mib) echo $((n * 1024 * 1024)) ;;
    g | gib) echo $((n * 1024 * 1024 * 1024)) ;;
    kb) echo $((n * 1000)) ;;
    mb) echo $((n * 1000 * 1000)) ;;
    gb) echo $((n * 1000 * 1000 * 1000)) ;;
    *) return 1 ;;
    esac
}
BYTES_N=$(parse_bytes "$BYTES_SPEC") || die "BYTES='$BYTES_SPEC' is not a size (examples: 1073741824, 1GiB, 512MiB, 100MB)"
((BYTES_N > 0)) || die "BYTES must be more than 0"
[[ $DURATION =~ ^[0-9]+[smh]?$ ]] || die "DURATION='$DURATION' is not a wrk duration (examples: 10s, 1m)"
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "WARMUP='$WARMUP' is not a wrk duration (examples: 1s, 0)"
[[ $LIGHT_DURATION =~ ^[0-9]+[smh]?$ ]] || die "LIGHT_DURATION='$LIGHT_DURATION' is not a wrk duration (examples: 5s, 0)"
[[ $CLOSE_DURATION =~ ^[0-9]+[smh]?$ ]] || die "CLOSE_DURATION='$CLOSE_DURATION' is not a wrk duration (examples: 5s, 0)"
[[ $HELD =~ ^[0-9]+$ ]] || die "HELD must be a number of connections"
[[ $CONNECTIONS =~ ^[0-9]+$ && $THREADS =~ ^[0-9]+$ ]] || die "CONNECTIONS and THREADS must be numbers"
for p in $PATHS; do
    [[ " $ALL_PATHS " == *" $p "* ]] || die "PATHS: unknown path '$p' (known: $ALL_PATHS)"
done
wants() { [[ " $PATHS " == *" $1 "* ]]; }
[[ $SETUP_CONNECTIONS =~ ^[0-9]+$ && $SETUP_MAX_SECONDS =~ ^[0-9]+$ ]] ||
    die "SETUP_CONNECTIONS and SETUP_MAX_SECONDS must be numbers"
[[ $BULK_TIMEOUT =~ ^[0-9]+$ ]] || die "BULK_TIMEOUT must be a number of seconds"
[[ $QUIET_WAIT =~ ^[0-9]+$ && $QUIET_MAX_BUSY =~ ^[0-9]+$ && $RETRIES =~ ^[0-9]+$ ]] ||
    die "QUIET_WAIT, QUIET_MAX_BUSY and RETRIES must be numbers"

SSHD=${SSHD:-/usr/sbin/sshd}
missing=()
for tool in curl wrk ssh ssh-keygen python3 timeout; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[[ -x $SSHD ]] || missing+=("sshd ($SSHD)")
if [[ $BUILD == 1 ]]; then command -v cargo >/dev/null || missing+=(cargo); fi
if ((${#missing[@]})); then
    die "missing tools: ${missing[*]}; on Debian: apt-get install -y wrk openssh-server openssh-client curl python3"
fi

# --- cleanup: only what this script started ---------------------------------

PIDS=()           # background processes started here, in start order
W=""              # work dir
T=""              # towerctl binary
MADE_PRIVSEP=0    # whether we created sshd's privilege separation dir
TOWERCTL_UP=0
REPORTING=0

kill_pid() {
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    { wait "$pid"; } 2>/dev/null || true
}

cleanup() {
    local rc=$? i f pid
    set +e
    trap - EXIT INT TERM
    [[ -n ${UPLOAD_FILE:-} ]] && rm -f "$UPLOAD_FILE"
    if ((TOWERCTL_UP)); then
        timeout 20 "$T" leave "$CLUSTER" >/dev/null 2>&1
        timeout 20 "$T" down >/dev/null 2>&1
        # Daemons that outlived leave/down: stop them by the pid files they
        # wrote in this run's private runtime dir (checking it is towerctl).
        for f in "$W"/run/towerctl/*.pid; do
            [[ -f $f ]] || continue
            pid=$(<"$f")
            [[ $pid =~ ^[0-9]+$ ]] || continue
            if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$T"; then
                warn "towerctl daemon (pid $pid, $(basename "$f" .pid)) outlived leave/down; stopping it"
                kill_pid "$pid"
            fi
        done
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill_pid "${PIDS[i]}"
    done
    if [[ -n $W && -d $W ]]; then
        if [[ -d $W/state/towerctl ]]; then
            mkdir -p "$RESULTS_DIR/logs"
            cp "$W"/state/towerctl/*.log "$RESULTS_DIR/logs/" 2>/dev/null
        fi
        # towerctl port-forward's own output (a line per connection, and its errors).
        for f in portfwd.out portfwd.err portfwd_gw.out portfwd_gw.err; do
            [[ -f $W/$f ]] && mkdir -p "$RESULTS_DIR/logs" && cp "$W/$f" "$RESULTS_DIR/logs/port-forward${f#portfwd}"
        done
        if ((REPORTING)); then
            warn "the report failed; the raw results stay in $W (results.tsv, cpu-*.txt, held-*.txt)"
            log "work dir kept: $W"
        elif [[ $KEEP_WORKDIR == 1 ]]; then
            log "work dir kept: $W"
        else
            rm -rf "$W"
        fi
    fi
    ((MADE_PRIVSEP)) && rmdir /run/sshd 2>/dev/null
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_bg() { # start_bg OUT ERR CMD... ; sets BG_PID
    local out=$1 err=$2
    shift 2
    "$@" >"$out" 2>"$err" </dev/null &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # wait_port PORT SECONDS PID
    local port=$1 secs=$2 pid=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# wait_http URL SECONDS PID [curl args...]: until URL answers 200.
wait_http() {
    local url=$1 secs=$2 pid=$3 i code
    shift 3
    for ((i = 0; i < secs * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" 2>/dev/null) || true
        [[ $code == 200 ]] && return 0
        sleep 0.2
    done
    return 1
}

# --- build -------------------------------------------------------------------

if [[ $BUILD == 1 ]]; then
    log "building release binaries (cargo build --release -j$JOBS; several minutes from scratch)"
    # Built apart: built together, the example's dev-dependencies would change
    # the binary's dependency features, so the bench would not measure the
    # binary `cargo install` gives (nor the code layout of link/hot-text.ld).
    (cd "$ROOT" && cargo build --release --locked -j"$JOBS" --bin towerctl &&
        cargo build --release --locked -j"$JOBS" --example bench_upstream)
fi
T=$TARGET_DIR/release/towerctl
UPSTREAM_BIN=$TARGET_DIR/release/examples/bench_upstream
[[ -x $T && -x $UPSTREAM_BIN ]] || die "release binaries not found under $TARGET_DIR/release (run with BUILD=1)"

W=$(mktemp -d "${TMPDIR:-/tmp}/towerctl-bench.XXXXXX")
mkdir -p "$W"/{home,config,data,state,run,ssh,rathole}
chmod 700 "$W/run" "$W/ssh"
RESULTS_TSV=$W/results.tsv
: >"$RESULTS_TSV"
mkdir -p "$RESULTS_DIR"
rm -rf "$RESULTS_DIR/logs"

# --- the upstream --------------------------------------------------------------

start_bg "$W/upstream.out" "$W/upstream.err" "$UPSTREAM_BIN"
UPSTREAM_PID=$BG_PID
UPPORT=""
for ((i = 0; i < 100; i++)); do
    if read -r line 2>/dev/null <"$W/upstream.out" && [[ $line =~ ^listening\ on\ 127\.0\.0\.1:([0-9]+)$ ]]; then
        UPPORT=${BASH_REMATCH[1]}
        break
    fi
    kill -0 "$UPSTREAM_PID" 2>/dev/null || break
    sleep 0.1
done
[[ -n $UPPORT ]] || die "bench_upstream did not start: $(cat "$W/upstream.err")"
DIRECT=http://127.0.0.1:$UPPORT
wait_http "$DIRECT/version" 10 "$UPSTREAM_PID" || die "bench_upstream does not answer on $DIRECT"
# The same answers over TLS (HTTP/2 or HTTP/1.1), as a kube-apiserver serves
# them: the gateway is also reported against this direct path.
UPTLS=$(sed -n 's/^tls on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$W/upstream.out")
DIRECT_TLS=${UPTLS:+https://127.0.0.1:$UPTLS}
log "upstream on 127.0.0.1:$UPPORT"

# --- towerctl: hub, member, agent -------------------------------------------------

export HOME=$W/home XDG_CONFIG_HOME=$W/config XDG_DATA_HOME=$W/data XDG_STATE_HOME=$W/state XDG_RUNTIME_DIR=$W/run
unset KUBECONFIG TOWERCTL_TOKEN RUST_LOG

TOWERCTL_UP=1
# --metrics off: the hub's Prometheus endpoint defaults to the fixed 127.0.0.1:9464.
timeout 60 "$T" up --listen 127.0.0.1:0 --gateway 127.0.0.1:0 --metrics off >"$W/up.out" 2>&1 ||
    die "towerctl up failed: $(cat "$W/up.out")"
timeout 20 "$T" status -o json >"$W/status.json" || die "towerctl status failed"
GATEWAY_URL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["hub"]["gatewayURL"].rstrip("/"))' "$W/status.json")
ADMIN_TOKEN=$(tr -d '[:space:]' <"$XDG_DATA_HOME/towerctl/admin.token")
[[ -n $ADMIN_TOKEN ]] || die "no operator token in $XDG_DATA_HOME/towerctl/admin.token"

member_kubeconfig "http://127.0.0.1:$UPPORT" "$W/member.kubeconfig"

JOIN_LINE=$(timeout 20 "$T" cluster add "$CLUSTER" 2>"$W/cluster-add.err") || die "towerctl cluster add failed: $(cat "$W/cluster-add.err")"
read -r -a JOIN <<<"$JOIN_LINE"
# Printed as ` TOWERCTL_TOKEN=… towerctl join …` (the token in the
# environment): run it as printed, with this build's binary.
[[ ${JOIN[0]:-} == TOWERCTL_TOKEN=* && ${JOIN[1]:-} == towerctl && ${JOIN[2]:-} == join ]] || die "unexpected output of 'towerctl cluster add': $JOIN_LINE"
JOIN[1]=$T
timeout 60 env "${JOIN[@]}" --kubeconfig "$W/member.kubeconfig" --allow 127.0.0.0/8 >"$W/join.out" 2>&1 ||
    die "towerctl join failed: $(cat "$W/join.out")"
GATEWAY=$GATEWAY_URL/clusters/$CLUSTER
AUTH="Authorization: Bearer $ADMIN_TOKEN"
HUB_PID=$(<"$W/run/towerctl/hub.pid")
AGENT_PID=$(<"$W/run/towerctl/agent-$CLUSTER.pid")
wait_http "$GATEWAY/version" 20 "$HUB_PID" -k -H "$AUTH" ||
    die "the gateway does not serve $GATEWAY/version: $(curl -sk --max-time 5 -H "$AUTH" "$GATEWAY/version")"
log "towerctl: gateway $GATEWAY_URL, hub pid $HUB_PID, agent pid $AGENT_PID"

# --- towerctl port-forward: the raw-channel path ----------------------------------
#
# bench_upstream also answers the two API reads the agent makes to resolve
# Service default/web (port 80, named "http") to its one endpoint,
# 127.0.0.1:UPPORT. Every local connection then becomes an HTTP CONNECT to
# web.default.svc.bench:80 through the gateway (TLS), a raw SSH channel to the
# agent, a Service lookup on the upstream and a TCP dial of the upstream.

# start_pf NAME [ENV...]: starts `towerctl port-forward` (with ENV set) and
# sets PF_PID_<NAME>, URL_<NAME> (empty when it does not serve) and NOTE_<NAME>.
start_pf() {
    local name=$1 pid port="" line note="" url=""
    shift
    start_bg "$W/$name.out" "$W/$name.err" env "$@" "$T" port-forward "$CLUSTER" svc/web :80 --address 127.0.0.1
    pid=$BG_PID
    for ((i = 0; i < 100; i++)); do
        if read -r line 2>/dev/null <"$W/$name.out" && [[ $line =~ ^Forwarding\ from\ 127\.0\.0\.1:([0-9]+)\ -\>\ 80$ ]]; then
            port=${BASH_REMATCH[1]}
            break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $port ]]; then
        note="towerctl port-forward did not start: $(head -c 300 "$W/$name.err" | tr '\n' ' ')"
    elif ! wait_http "http://127.0.0.1:$port/version" 20 "$pid"; then
        note="towerctl port-forward on :$port does not serve /version: $(head -c 300 "$W/$name.err" | tr '\n' ' ')"
    else
        url=http://127.0.0.1:$port
        log "towerctl port-forward $CLUSTER svc/web :80 on :$port (pid $pid) $*"
    fi
    [[ -z $note ]] || warn "$note"
    printf -v "PF_PID_$name" %s "$pid"
    printf -v "URL_$name" %s "$url"
    printf -v "NOTE_$name" %s "$note"
}

# On the hub's machine port-forward hands its listener to the hub (the row
# operators get there); portfwd_gw is the same command made to go through
# the gateway, as from any other machine.
PF_PID="" PORTFWD="" PORTFWD_NOTE="" PFG_PID="" PORTFWD_GW="" PORTFWD_GW_NOTE=""
if wants portfwd; then
    start_pf portfwd TOWERCTL_FORWARD_VIA=hub
    PF_PID=$PF_PID_portfwd PORTFWD=$URL_portfwd PORTFWD_NOTE=$NOTE_portfwd
fi
if wants portfwd_gw; then
    start_pf portfwd_gw TOWERCTL_FORWARD_VIA=gateway
    PFG_PID=$PF_PID_portfwd_gw PORTFWD_GW=$URL_portfwd_gw PORTFWD_GW_NOTE=$NOTE_portfwd_gw
fi

# --- OpenSSH: a private sshd, local and reverse forwards ----------------------------

SSHD_PID=""
SSH_PIDS=()         # every ssh client started here
declare -A SSH_URL=() # path name -> http://127.0.0.1:PORT
if wants ssh_L || wants ssh_tt_L || wants ssh_N || wants ssh_tt || wants ssh_dflt; then
    if [[ $(id -u) == 0 && ! -d /run/sshd ]]; then
        mkdir -m 0755 /run/sshd # sshd's privilege separation dir (Debian), removed at exit
        MADE_PRIVSEP=1
    fi
    ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$W/ssh/host_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C bench-client -f "$W/ssh/client_ed25519"
    cp "$W/ssh/client_ed25519.pub" "$W/ssh/authorized_keys"
    SSHD_PORT=$(free_port)
    sshd_config "$SSHD_PORT" "$W/ssh/host_ed25519" "$W/ssh/authorized_keys" >"$W/ssh/sshd_config"
    start_bg "$W/sshd.out" "$W/sshd.log" "$SSHD" -f "$W/ssh/sshd_config" -D -e
    SSHD_PID=$BG_PID
    wait_port "$SSHD_PORT" 10 "$SSHD_PID" || die "sshd did not start: $(cat "$W/sshd.log")"

    SSH_OPTS=(-F /dev/null -p "$SSHD_PORT" -i "$W/ssh/client_ed25519"
        -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
        -o ExitOnForwardFailure=yes -o Compression=no -o LogLevel=ERROR)

    SSH_USER=$(id -un)

    # ssh_tunnel NAME MODE DIRECTION [CIPHER]: one forward from a free local port to
    # the upstream. MODE -N (no session) or -tt (a pty: both OpenSSH ends
    # then treat the connection as interactive and set TCP_NODELAY); DIRECTION
    # -L (ssh listens, sshd dials the upstream) or -R (sshd listens, ssh dials);
    # CIPHER, when given, "default" (OpenSSH's negotiation) or a cipher name.
    ssh_tunnel() {
        local name=$1 mode=$2 dir=$3 cipher=${4:-$SSH_CIPHER} port
        local args=() copt=()
        port=$(free_port)
        if [[ $cipher != default ]]; then copt=(-c "$cipher"); fi
        args=(ssh "$mode" "${SSH_OPTS[@]}" ${copt[@]+"${copt[@]}"} "$dir" "127.0.0.1:$port:127.0.0.1:$UPPORT" "$SSH_USER@127.0.0.1")
        if [[ $mode == -tt ]]; then args+=("exec sleep 86400"); fi
        start_bg "$W/$name.out" "$W/$name.err" "${args[@]}"
        SSH_PIDS+=("$BG_PID")
        wait_http "http://127.0.0.1:$port/version" 20 "$BG_PID" ||
            die "ssh $mode $dir tunnel did not come up: $(cat "$W/$name.err" "$W/sshd.log")"
        SSH_URL[$name]=http://127.0.0.1:$port
        log "OpenSSH: ssh $mode $dir on :$port"
    }
    if wants ssh_L; then ssh_tunnel ssh_L -N -L; fi
    if wants ssh_tt_L; then ssh_tunnel ssh_tt_L -tt -L; fi
    if wants ssh_N; then ssh_tunnel ssh_N -N -R; fi
    if wants ssh_tt; then ssh_tunnel ssh_tt -tt -R; fi
    if wants ssh_dflt; then ssh_tunnel ssh_dflt -tt -L default; fi
    log "OpenSSH: sshd on 127.0.0.1:$SSHD_PORT, cipher $SSH_CIPHER"
fi

# --- rathole (optional) ------------------------------------------------------------

RATHOLE=""
RATHOLE_NOTE=""
if ! wants rathole; then
    RATHOLE_NOTE="skipped: not in PATHS"
elif command -v rathole >/dev/null; then
    RH_CTRL=$(free_port)
    RH_PORT=$(free_port)
    rathole --genkey >"$W/rathole/keys.txt" 2>&1 || true
    RH_PRIV=$(awk '/Private Key/{getline; print; exit}' "$W/rathole/keys.txt")
    RH_PUB=$(awk '/Public Key/{getline; print; exit}' "$W/rathole/keys.txt")
    if [[ -z $RH_PRIV || -z $RH_PUB ]]; then
        RATHOLE_NOTE="skipped: 'rathole --genkey' gave no key pair"
    else
        cat >"$W/rathole/server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$RH_CTRL"
[server.transport]
type = "noise"
[server.transport.noise]
local_private_key = "$RH_PRIV"
[server.services.up]
token = "bench"
bind_addr = "127.0.0.1:$RH_PORT"
nodelay = true
EOF
        cat >"$W/rathole/client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$RH_CTRL"
[client.transport]
type = "noise"
[client.transport.noise]
remote_public_key = "$RH_PUB"
[client.services.up]
token = "bench"
local_addr = "127.0.0.1:$UPPORT"
nodelay = true
EOF
        start_bg "$W/rathole/server.out" "$W/rathole/server.err" rathole --server "$W/rathole/server.toml"
        RH_SERVER_PID=$BG_PID
        wait_port "$RH_CTRL" 10 "$RH_SERVER_PID" || true
        start_bg "$W/rathole/client.out" "$W/rathole/client.err" rathole --client "$W/rathole/client.toml"
        RH_CLIENT_PID=$BG_PID
        if wait_http "http://127.0.0.1:$RH_PORT/version" 20 "$RH_CLIENT_PID"; then
            RATHOLE=http://127.0.0.1:$RH_PORT
            log "rathole (noise transport) on :$RH_PORT"
        else
            RATHOLE_NOTE="skipped: the rathole tunnel did not come up (see its logs with KEEP_WORKDIR=1)"
        fi
    fi
else
    RATHOLE_NOTE="skipped: rathole is not on PATH"
fi
[[ -z $RATHOLE_NOTE ]] || log "rathole $RATHOLE_NOTE"

# --- bore (optional, unencrypted) -------------------------------------------------
# bore's control port is fixed (7835); it needs --bind-addr (bore >= 0.6) so
# that nothing listens beyond loopback.

BORE=""
BORE_NOTE=""
if ! wants bore; then
    BORE_NOTE="skipped: not in PATHS"
elif ! command -v bore >/dev/null; then
    BORE_NOTE="skipped: bore is not on PATH"
elif ! bore server --help 2>/dev/null | grep -q -- --bind-addr; then
    BORE_NOTE="skipped: this bore has no --bind-addr (needs bore-cli >= 0.6)"
elif ! python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 7835))' 2>/dev/null; then
    BORE_NOTE="skipped: bore's fixed control port 127.0.0.1:7835 is taken"
else
    BORE_PORT=$(free_port)
    start_bg "$W/bore-server.out" "$W/bore-server.err" bore server --bind-addr 127.0.0.1 --min-port "$BORE_PORT" --max-port "$BORE_PORT"
    BORE_SERVER_PID=$BG_PID
    wait_port 7835 10 "$BORE_SERVER_PID" || true
    start_bg "$W/bore-client.out" "$W/bore-client.err" bore local "$UPPORT" --local-host 127.0.0.1 --to 127.0.0.1 --port "$BORE_PORT"
    BORE_CLIENT_PID=$BG_PID
    if wait_http "http://127.0.0.1:$BORE_PORT/version" 20 "$BORE_CLIENT_PID"; then
        BORE=http://127.0.0.1:$BORE_PORT
        log "bore on :$BORE_PORT"
    else
        BORE_NOTE="skipped: the bore tunnel did not come up (see its logs with KEEP_WORKDIR=1)"
    fi
fi
[[ -z $BORE_NOTE ]] || log "bore $BORE_NOTE"

# --- measurements -----------------------------------------------------------------

LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
# The hub with one agent and nothing measured yet.
IDLE_HUB_KIB=$(awk '/^VmRSS:/ { print $2 }' "/proc/$HUB_PID/status" 2>/dev/null || echo -)
# Of which private (anonymous) memory; the rest is mostly the binary's code,
# shared with every other towerctl process on the machine.
IDLE_HUB_ANON_KIB=$(awk '/^RssAnon:/ { print $2 }' "/proc/$HUB_PID/status" 2>/dev/null || echo -)

# cpu_busy: percent of all CPUs busy (with anything) over the next second.
cpu_busy() {
    local a b i total=0 idle
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep 1
    read -r -a b < <(grep '^cpu ' /proc/stat)
    for ((i = 1; i <= 8 && i < ${#a[@]}; i++)); do total=$((total + b[i] - a[i])); done
    idle=$((b[4] + b[5] - a[4] - a[5]))
    echo $((total > 0 ? 100 * (total - idle) / total : 0))
}

# wait_quiet NAME: waits (bounded by QUIET_WAIT) until the machine is idle
# apart from this benchmark's idle daemons; prints the last busy percentage.
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) busy
    while :; do
        busy=$(cpu_busy)
        if ((busy <= QUIET_MAX_BUSY)); then break; fi
        if ((SECONDS >= deadline)); then
            warn "$1: the machine is still ${busy}% busy with other work after ${QUIET_WAIT}s; measuring anyway"
            break
        fi
    done
    echo "$busy"
}

CLK_TCK=$(getconf CLK_TCK)

# descendants PID...: the PIDs and all their descendants.
descendants() {
    local p c
    for p in "$@"; do
        echo "$p"
        for c in $(ps -o pid= --ppid "$p"); do descendants "$c"; done
    done
}

# tunnel_pids NAME: the processes that carry path NAME's tunnel (both ends).
tunnel_pids() {
    case $1 in
    gateway) echo "$HUB_PID $AGENT_PID" ;;
    portfwd) echo "$PF_PID $HUB_PID $AGENT_PID" ;;
    portfwd_gw) echo "$PFG_PID $HUB_PID $AGENT_PID" ;;
    ssh_*) echo "${SSH_PIDS[*]} $(descendants "$SSHD_PID" | tr '\n' ' ')" ;;
    rathole) echo "$RH_SERVER_PID $RH_CLIENT_PID" ;;
    bore) echo "$BORE_SERVER_PID $BORE_CLIENT_PID" ;;
    esac
}

# cpu_ticks PID...: user+system CPU time used so far by these processes (all threads).
cpu_ticks() {
    local t=0 p v
    for p in "$@"; do
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || true
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# role PID: which part of a tunnel process PID is, for the CPU split.
role() {
    case $1 in
    "$HUB_PID") echo hub ;;
    "$AGENT_PID") echo agent ;;
    "${PF_PID:-}" | "${PFG_PID:-}") echo port-forward ;;
    "${RH_SERVER_PID:-}") echo rathole-server ;;
    "${RH_CLIENT_PID:-}") echo rathole-client ;;
    "${BORE_SERVER_PID:-}") echo bore-server ;;
    "${BORE_CLIENT_PID:-}") echo bore-client ;;
    *) cat "/proc/$1/comm" 2>/dev/null || echo exited ;;
    esac
}

# cpu_snapshot PID...: "PID TICKS" for each process.
cpu_snapshot() {
    local p v
    for p in "$@"; do
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || true
        echo "$p ${v:-0}"
    done
}

# cpu_split BEFORE OUT PID...: CPU ticks used by each role (hub, agent, sshd,
# ...) since the snapshot in file BEFORE, as "ROLE TICKS" lines in file OUT.
cpu_split() {
    local before=$1 out=$2 p v
    shift 2
    cpu_snapshot "$@" | while read -r p v; do echo "$(role "$p") $p $v"; done |
        awk 'NR == FNR { b[$1] = $2; next } { t[$1] += $3 - b[$2] } END { for (r in t) print r, t[r] }' "$before" - >"$out"
}

# CPU of a path's tunnel processes around one measurement: cpu_begin NAME
# TAG notes what they have used so far; cpu_end NAME TAG prints the ticks
# used since and writes their split by process to cpu-NAME-TAG.txt.
cpu_begin() {
    # shellcheck disable=SC2046 # a list of PIDs
    cpu_snapshot $(tunnel_pids "$1") >"$W/cpu0-$1-$2.txt"
}
cpu_end() {
    local before=$W/cpu0-$1-$2.txt pids t0
    pids=$(awk '{ print $1 }' "$before")
    t0=$(awk '{ t += $2 } END { print t + 0 }' "$before")
    # shellcheck disable=SC2086 # a list of PIDs
    echo $(($(cpu_ticks $pids) - t0))
    # shellcheck disable=SC2086
    cpu_split "$before" "$W/cpu-$1-$2.txt" $pids
}

# Durations as wrk and h2load print them (850us, 1.20ms, 1.5s, 2m), in ms.
AWK_MS='function ms(v) {
    if (v ~ /us$/) return v / 1000
    if (v ~ /ms$/) return v + 0
    if (v ~ /m$/) return v * 60000
    if (v ~ /s$/) return v * 1000
    return v + 0
}'

# bulk NAME URL [curl args...]: prints "code bytes seconds tunnel_cpu_ticks".
bulk() {
    local name=$1 url=$2 out
    shift 2
    log "$name: bulk download of $BYTES_N bytes"
    cpu_begin "$name" bulk
    out=$(curl -sS -o /dev/null --max-time "$BULK_TIMEOUT" -w '%{http_code} %{size_download} %{time_total}' \
        "$@" "$url/bulk?bytes=$BYTES_N" 2>"$W/curl-$name.err") || true
    echo "${out:-- - -} $(cpu_end "$name" bulk)"
}

# upload NAME URL [curl args...]: POSTs a file of BYTES zero bytes to /sink;
# prints "code bytes_received seconds tunnel_cpu_ticks". The file lives in
# /dev/shm when it can (curl reads a pipe at half the speed of a file in
# memory, which would cap every row), and is removed at exit.
UPLOAD_FILE=""
upload() {
    local name=$1 url=$2 pids t0 out code secs got
    shift 2
    log "$name: bulk upload of $BYTES_N bytes"
    pids=$(tunnel_pids "$name")
    # shellcheck disable=SC2086 # a list of PIDs
    t0=$(cpu_ticks $pids)
    out=$(curl -sS -o "$W/sink-$name.out" --max-time "$BULK_TIMEOUT" \
        -H 'Expect:' -H 'Content-Type: application/octet-stream' -T "$UPLOAD_FILE" -X POST \
        -w '%{http_code} %{time_total}' "$@" "$url/sink" 2>"$W/curl-up-$name.err") || true
    read -r code secs <<<"${out:-- -}"
    got=$(tr -dc '0-9' <"$W/sink-$name.out" 2>/dev/null)
    # shellcheck disable=SC2086
    echo "${code:--} ${got:--} ${secs:--} $(($(cpu_ticks $pids) - t0))"
}

# wrk_run NAME TAG THREADS CONNECTIONS DURATION URL [wrk args...]:
# prints "rps p50_ms p99_ms requests non2xx socket_errors tunnel_cpu_ticks".
wrk_run() {
    local name=$1 tag=$2 threads=$3 conns=$4 duration=$5 url=$6 ticks
    shift 6
    cpu_begin "$name" "wrk$tag"
    wrk -t"$threads" -c"$conns" -d"$duration" --timeout 5s --latency "$@" "$url/version" \
        >"$W/wrk-$name$tag.txt" 2>&1 || true
    ticks=$(cpu_end "$name" "wrk$tag")
    cp "$W/wrk-$name$tag.txt" "$RESULTS_DIR/wrk-$name$tag.txt"
    awk -v ticks="$ticks" "$AWK_MS"'
        /^ +50%/ { p50 = ms($2) }
        /^ +99%/ { p99 = ms($2) }
        /requests in/ { reqs = $1 }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx or 3xx responses:/ { non2xx = $NF }
        /Socket errors:/ { gsub(/,/, ""); sockerr = $4 + $6 + $8 + $10 }
        END {
            if (rps == "") { print "- - - - - - -"; exit }
            printf "%s %s %s %s %d %d %d\n", rps, p50, p99, reqs, non2xx, sockerr, ticks
        }' "$W/wrk-$name$tag.txt"
}

# rate NAME URL [wrk args...]: the loaded run (THREADS x CONNECTIONS).
rate() {
    local name=$1 url=$2
    shift 2
    if [[ ! $WARMUP =~ ^0+[smh]?$ ]]; then
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$WARMUP" --timeout 5s "$@" "$url/version" >/dev/null 2>&1 || true
    fi
    log "$name: wrk -t$THREADS -c$CONNECTIONS -d$DURATION /version"
    wrk_run "$name" "" "$THREADS" "$CONNECTIONS" "$DURATION" "$url" "$@"
}

# light NAME URL [wrk args...]: one connection, one request at a time: the
# latency of the path itself, without queueing behind 15 other connections.
light() {
    local name=$1 url=$2
    shift 2
    [[ $LIGHT_DURATION =~ ^0+[smh]?$ ]] && { echo "- - - - - - -"; return; }
    log "$name: wrk -t1 -c1 -d$LIGHT_DURATION /version"
    wrk_run "$name" "-c1" 1 1 "$LIGHT_DURATION" "$url" "$@"
}

# The connection-setup probe: SETUP_CONNECTIONS fresh TCP connections, one
# after the other, each carrying one "GET /version" with "Connection: close".
# A sample is the time from just before connect() to the first byte of the
# response (for https, the TLS handshake is included; no SNI is sent). Bounded
# by SETUP_MAX_SECONDS and a 10 s timeout per connection. Prints
# "samples p50_ms p99_ms max_ms failures" and writes every sample to OUT.
cat >"$W/setup.py" <<'PY'
import math, socket, ssl, sys, time, urllib.parse

url, count, max_s, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
headers = "".join(h + "\r\n" for h in sys.argv[5:])
u = urllib.parse.urlsplit(url)
tls = u.scheme == "https"
host, port = u.hostname, u.port or (443 if tls else 80)
req = (f"GET {u.path.rstrip('/')}/version HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench-setup\r\n"
       f"{headers}Connection: close\r\n\r\n").encode()
ctx = None
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE


def complete(data):
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v)
    return False


samples, failures, first_error = [], 0, ""
deadline = time.monotonic() + max_s
for _ in range(count):
    if time.monotonic() >= deadline:
        break
    s = None
    try:
        t0 = time.perf_counter()
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx:
            s = ctx.wrap_socket(s)
        s.sendall(req)
        data = s.recv(65536)
        t1 = time.perf_counter()
        while data and not complete(data):
            more = s.recv(65536)
            if not more:
                break
            data += more
        if not data.startswith(b"HTTP/1.1 200") or not complete(data):
            raise OSError("answer: " + data[:60].decode(errors="replace").split("\r\n")[0])
        samples.append((t1 - t0) * 1000)
    except OSError as e:
        failures += 1
        first_error = first_error or str(e)
    finally:
        if s:
            s.close()
with open(out, "w") as fh:
    fh.write("".join(f"{v:.4f}\n" for v in samples))
    if first_error:
        fh.write(f"# {failures} failed; first error: {first_error}\n")


def pct(q):
    v = sorted(samples)
    return f"{v[max(0, math.ceil(q * len(v)) - 1)]:.4f}"


if samples:
    print(len(samples), pct(0.50), pct(0.99), f"{max(samples):.4f}", failures)
else:
    print(0, "-", "-", "-", failures)
PY

# setup NAME URL [header...]: the connection-setup probe on path NAME.
setup() {
    local name=$1 url=$2
    shift 2
    ((SETUP_CONNECTIONS > 0)) || { echo "- - - - -"; return; }
    log "$name: $SETUP_CONNECTIONS fresh connections, connect -> first byte of GET /version"
    timeout $((SETUP_MAX_SECONDS + 30)) python3 "$W/setup.py" "$url" "$SETUP_CONNECTIONS" "$SETUP_MAX_SECONDS" \
        "$W/setup-$name.txt" "$@" 2>"$W/setup-$name.err" || echo "- - - - -"
    cp "$W/setup-$name.txt" "$RESULTS_DIR/setup-$name.txt" 2>/dev/null || true
}

# closed NAME URL [wrk args...]: a new connection per request ("Connection:
# close"), THREADS x CONNECTIONS: the rate at which the path sets up
# connections under load.
closed() {
    local name=$1 url=$2
    shift 2
    [[ $CLOSE_DURATION =~ ^0+[smh]?$ ]] && { echo "- - - - - - -"; return; }
    log "$name: wrk -t$THREADS -c$CONNECTIONS -d$CLOSE_DURATION -H 'Connection: close' /version"
    wrk_run "$name" "-close" "$THREADS" "$CONNECTIONS" "$CLOSE_DURATION" "$url" -H "Connection: close" "$@"
}

# The held-connections probe: opens HELD connections, sends one keep-alive
# GET /version on each, reads the answer, and keeps them all open until
# stdin closes. Prints "ready N" once they are all established.
cat >"$W/held.py" <<'PY'
import socket, ssl, sys, urllib.parse

url, count = sys.argv[1], int(sys.argv[2])
headers = "".join(h + "\r\n" for h in sys.argv[3:])
u = urllib.parse.urlsplit(url)
tls = u.scheme == "https"
host, port = u.hostname, u.port or (443 if tls else 80)
req = (f"GET {u.path.rstrip('/')}/version HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}\r\n").encode()
ctx = None
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
held, failed = [], 0
for _ in range(count):
    try:
        s = socket.create_connection((host, port), timeout=10)
        if ctx:
            s = ctx.wrap_socket(s)
        s.sendall(req)
        data = b""
        while b"gitVersion" not in data:
            more = s.recv(65536)
            if not more:
                raise OSError("closed")
            data += more
        held.append(s)
    except OSError:
        failed += 1
print("ready", len(held), failed, flush=True)
sys.stdin.read()
PY

# rss_kib PID...: "ROLE KIB" lines, the resident memory of each process
# (with its descendants for sshd) summed by role.
rss_kib() {
    local p
    for p in "$@"; do
        echo "$(role "$p") $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)"
    done | awk '{ t[$1] += $2 } END { for (r in t) print r, t[r] }'
}

# held NAME URL [header...]: the memory of HELD idle connections: prints
# "held failed" and writes "ROLE KIB_BEFORE KIB_HELD" lines to held-NAME.txt.
held() {
    local name=$1 url=$2 line n=- f=- i pid
    shift 2
    ((HELD > 0)) || { echo "- -"; return; }
    [[ $name == direct ]] && { echo "- -"; return; }
    log "$name: $HELD held connections, resident memory of the tunnel's processes"
    # shellcheck disable=SC2086 # a list of PIDs
    rss_kib $(tunnel_pids "$name") | sort >"$W/rss0-$name.txt"
    rm -f "$W/held-in" "$W/held-out"
    mkfifo "$W/held-in"
    # Exists before python opens it (after the FIFO), so the first reads
    # below find it empty instead of missing.
    : >"$W/held-out"
    timeout 150 python3 "$W/held.py" "$url" "$HELD" "$@" <"$W/held-in" >"$W/held-out" 2>/dev/null &
    pid=$!
    exec 7>"$W/held-in" # python holds its connections until this closes
    for ((i = 0; i < 900; i++)); do
        read -r line _ <"$W/held-out" 2>/dev/null && [[ $line == ready ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if read -r line n f <"$W/held-out" 2>/dev/null && [[ $line == ready ]]; then
        sleep 1
        # shellcheck disable=SC2086
        rss_kib $(tunnel_pids "$name") | sort >"$W/rss1-$name.txt"
    else
        n=- f=-
    fi
    exec 7>&-
    { wait "$pid"; } 2>/dev/null || true
    join "$W/rss0-$name.txt" "$W/rss1-$name.txt" >"$W/held-$name.txt" 2>/dev/null || true
    echo "$n $f"
}

# h2rate NAME URL [h2load args...]: the path as kubectl speaks to it: one TLS
# connection carrying H2_STREAMS requests at a time as HTTP/2 streams
# (h2load), for DURATION after WARMUP. Prints "rps mean_ms requests failed
# tunnel_cpu_ticks", or "-" fields.
H2_STREAMS=${H2_STREAMS:-16}
h2rate() {
    local name=$1 url=$2 ticks warm=$WARMUP
    shift 2
    [[ $warm =~ ^0+[smh]?$ ]] && warm=0
    log "$name: h2load -c1 -m$H2_STREAMS -D $DURATION /version (HTTP/2, as kubectl)"
    cpu_begin "$name" h2
    h2load -c1 -m"$H2_STREAMS" -D "$DURATION" --warm-up-time="$warm" "$@" \
        "$url/version" >"$W/h2load-$name.txt" 2>&1 || true
    ticks=$(cpu_end "$name" h2)
    cp "$W/h2load-$name.txt" "$RESULTS_DIR/h2load-$name.txt"
    awk -v ticks="$ticks" "$AWK_MS"'
        /^finished in/ { rps = $4 }
        /^requests:/ { reqs = $2; failed = $10 }
        /^time for request:/ { mean = ms($6) }
        END {
            if (rps == "") { print "- - - - -"; exit }
            printf "%s %s %d %d %d\n", rps, mean, reqs, failed, ticks
        }' "$W/h2load-$name.txt"
}

# measure NAME LABEL URL: one row of results.tsv. Extra arguments for curl,
# wrk and the setup probe (authentication, TLS) come from the arrays
# CURL_EXTRA, WRK_EXTRA and SETUP_EXTRA.
CURL_EXTRA=()
WRK_EXTRA=()
SETUP_EXTRA=()
H2="" H2_NOTE="" DTLS_RATE="" DTLS_LIGHT="" DTLS_H2=""
measure() {
    local name=$1 label=$2 url=$3 b r l c k h code busy attempt after
    if [[ -z $url ]]; then
        printf '%s\t%s\t-\t- - - -\t- - - - - - -\t- - - - - - -\t- - - - -\t%s\t- - - - - - -\t- -\n' "$name" "$label" "${4:-not started}" >>"$RESULTS_TSV"
        return
    fi
    code=$(curl -s -o "$W/version-$name.json" -w '%{http_code}' --max-time 5 "${CURL_EXTRA[@]+"${CURL_EXTRA[@]}"}" "$url/version") || true
    if [[ $code != 200 ]] || ! grep -q gitVersion "$W/version-$name.json"; then
        warn "$name: GET /version answered '$code' instead of 200; path skipped"
        printf '%s\t%s\t-\t- - - -\t- - - - - - -\t- - - - - - -\t- - - - -\tGET /version answered %s\t- - - - - - -\t- -\n' "$name" "$label" "$code" >>"$RESULTS_TSV"
        return
    fi
    for ((attempt = 0; attempt <= RETRIES; attempt++)); do
        busy=$(wait_quiet "$name")
        b=$(bulk "$name" "$url" "${CURL_EXTRA[@]+"${CURL_EXTRA[@]}"}")
        # Kubernetes API bodies are small: the gateway (and the agent behind
        # it) refuse a 1 GiB one, so its upload is not measured.
        u="- - - -"
        if [[ $name != gateway && $UPLOAD == 1 ]]; then u=$(upload "$name" "$url"); fi
        r=$(rate "$name" "$url" "${WRK_EXTRA[@]+"${WRK_EXTRA[@]}"}")
        l=$(light "$name" "$url" "${WRK_EXTRA[@]+"${WRK_EXTRA[@]}"}")
        c=$(setup "$name" "$url" "${SETUP_EXTRA[@]+"${SETUP_EXTRA[@]}"}")
        k=$(closed "$name" "$url" "${WRK_EXTRA[@]+"${WRK_EXTRA[@]}"}")
        h=$(held "$name" "$url" "${SETUP_EXTRA[@]+"${SETUP_EXTRA[@]}"}")
        # Other work running right after the measurement most likely ran
        # during it too: measure again (bounded).
        after=$(cpu_busy)
        ((after > QUIET_MAX_BUSY)) || break
        if ((attempt < RETRIES)); then
            warn "$name: other work took ${after}% of the CPUs right after the measurement; measuring again"
        else
            warn "$name: other work took ${after}% of the CPUs right after the measurement; keeping these figures"
        fi
    done
    printf '%s\t%s\t%s/%s\t%s\t%s\t%s\t%s\t\t%s\t%s\t%s\n' "$name" "$label" "$busy" "$after" "$b" "$r" "$l" "$c" "$k" "$h" "$u" >>"$RESULTS_TSV"
}

if [[ $UPLOAD == 1 ]]; then
    d=/dev/shm
    [[ -d $d && -w $d ]] || d=$W
    UPLOAD_FILE=$(mktemp "$d/towerctl-bench-upload.XXXXXX")
    head -c "$BYTES_N" /dev/zero >"$UPLOAD_FILE" || die "cannot write the $BYTES_N-byte upload file in $d"
fi
if wants direct; then measure direct "direct (no tunnel)" "$DIRECT"; fi
if wants gateway; then
    # curl checks nothing with -k, and wrk never verifies: both pay the same TLS cost.
    CURL_EXTRA=(-k -H "$AUTH")
    WRK_EXTRA=(-H "$AUTH")
    SETUP_EXTRA=("$AUTH")
    measure gateway "towerctl gateway (https)" "$GATEWAY"
    if ! command -v h2load >/dev/null; then
        H2_NOTE="skipped: h2load is not on PATH (Debian: apt-get install nghttp2-client)"
    elif awk -F'\t' '$1 == "gateway" && $3 ~ /^[0-9]/ { ok = 1 } END { exit !ok }' "$RESULTS_TSV"; then
        wait_quiet gateway-h2 >/dev/null
        H2=$(h2rate gateway "$GATEWAY" -H "$AUTH")
    else
        H2_NOTE="skipped: the gateway row was not measured"
    fi
    CURL_EXTRA=()
    WRK_EXTRA=()
    SETUP_EXTRA=()
    # Direct over TLS, as kubectl reaches a kube-apiserver (its only
    # transport): loaded and one-connection rates over HTTP/1.1 (wrk), and
    # HTTP/2 (h2load) when the gateway's HTTP/2 row was measured. Printed
    # beside the targets, which are held against plain direct.
    if [[ -n $DIRECT_TLS ]]; then
        wait_quiet direct_tls >/dev/null
        DTLS_RATE=$(rate direct_tls "$DIRECT_TLS")
        DTLS_LIGHT=$(light direct_tls "$DIRECT_TLS")
        [[ $H2 == [0-9]* ]] && DTLS_H2=$(h2rate direct_tls "$DIRECT_TLS")
    fi
fi
if wants portfwd; then measure portfwd "towerctl port-forward (hub machine)" "$PORTFWD" "$PORTFWD_NOTE"; fi
if wants portfwd_gw; then measure portfwd_gw "towerctl port-forward (via gateway)" "$PORTFWD_GW" "$PORTFWD_GW_NOTE"; fi
if wants ssh_L; then measure ssh_L "ssh -N -L" "${SSH_URL[ssh_L]}"; fi
if wants ssh_tt_L; then measure ssh_tt_L "ssh -tt -L (pty, TCP_NODELAY)" "${SSH_URL[ssh_tt_L]}"; fi
if wants ssh_N; then measure ssh_N "ssh -N -R" "${SSH_URL[ssh_N]}"; fi
if wants ssh_tt; then measure ssh_tt "ssh -tt -R (pty, TCP_NODELAY)" "${SSH_URL[ssh_tt]}"; fi
if wants ssh_dflt; then measure ssh_dflt "ssh -tt -L, default cipher" "${SSH_URL[ssh_dflt]}"; fi
if [[ -n $RATHOLE ]]; then
    measure rathole "rathole (noise)" "$RATHOLE"
fi
if [[ -n $BORE ]]; then
    measure bore "bore (no encryption)" "$BORE"
fi
LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Daemons must still be the same processes (no crash/restart during the run).
HEALTH=()
kill -0 "$HUB_PID" 2>/dev/null || HEALTH+=("the hub (pid $HUB_PID) died during the run")
kill -0 "$AGENT_PID" 2>/dev/null || HEALTH+=("the agent (pid $AGENT_PID) died during the run")
if [[ -n $PORTFWD ]]; then
    kill -0 "$PF_PID" 2>/dev/null || HEALTH+=("towerctl port-forward (pid $PF_PID) died during the run")
fi
if [[ -n $PORTFWD_GW ]]; then
    kill -0 "$PFG_PID" 2>/dev/null || HEALTH+=("towerctl port-forward via the gateway (pid $PFG_PID) died during the run")
fi
timeout 20 "$T" status -o json >"$W/status-end.json" 2>/dev/null || HEALTH+=("towerctl status failed after the run")
# WARN/ERROR lines of the daemons' logs, without timestamps, counted.
LOG_ISSUES=$(
    {
        for f in "$W"/state/towerctl/*.log; do
            [[ -f $f ]] || continue
            grep -E '^[^ ]+ +(WARN|ERROR) ' "$f" | sed -E "s/^[^ ]+ +/$(basename "$f" .log): /"
        done
        # towerctl port-forward writes its errors to stderr, without timestamps.
        if [[ -f $W/portfwd.err ]]; then sed -E 's/^/port-forward: /' "$W/portfwd.err"; fi
        if [[ -f $W/portfwd_gw.err ]]; then sed -E 's/^/port-forward via the gateway: /' "$W/portfwd_gw.err"; fi
    } | sort | uniq -c | sort -rn | head -n 20 | sed -E 's/^ *([0-9]+) (.*)$/\1x \2/' || true
)

# --- report -------------------------------------------------------------------------

mkdir -p "$RESULTS_DIR"
# A report that fails must not lose the run: cleanup keeps the work dir.
REPORTING=1
BENCH_RESULTS=$RESULTS_TSV BENCH_JSON=$RESULTS_DIR/latest.json BENCH_BYTES=$BYTES_N \
    BENCH_DURATION=$DURATION BENCH_CONNECTIONS=$CONNECTIONS BENCH_THREADS=$THREADS \
    BENCH_H2=$H2 BENCH_H2_NOTE=$H2_NOTE BENCH_H2_STREAMS=$H2_STREAMS \
    BENCH_DTLS_RATE=$DTLS_RATE BENCH_DTLS_LIGHT=$DTLS_LIGHT BENCH_DTLS_H2=$DTLS_H2 \
    BENCH_SSH_CIPHER=$SSH_CIPHER BENCH_RATHOLE_NOTE=$RATHOLE_NOTE BENCH_BORE_NOTE=$BORE_NOTE BENCH_QUIET_MAX_BUSY=$QUIET_MAX_BUSY \
    BENCH_HELD=$HELD BENCH_IDLE_HUB_KIB=$IDLE_HUB_KIB BENCH_IDLE_HUB_ANON_KIB=$IDLE_HUB_ANON_KIB \
    BENCH_CLK_TCK=$CLK_TCK BENCH_LIGHT_DURATION=$LIGHT_DURATION BENCH_SETUP_CONNECTIONS=$SETUP_CONNECTIONS \
    BENCH_LOADAVG_START=$LOADAVG_START BENCH_LOADAVG_END=$LOADAVG_END BENCH_WORKDIR=$W \
    BENCH_LOG_ISSUES=$LOG_ISSUES BENCH_HEALTH="$(printf '%s\n' "${HEALTH[@]+"${HEALTH[@]}"}")" \
    BENCH_GIT="${TOWERCTL_REV:-$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)}" \
    BENCH_SSH_VERSION=$(ssh -V 2>&1) BENCH_WRK_VERSION=$(wrk -v 2>&1 | head -n 1) \
    BENCH_CURL_VERSION=$(curl --version | head -n 1) \
    python3 - <<'PY'
import json, os, platform, datetime

env = os.environ
BYTES = int(env["BENCH_BYTES"])
TCK = float(env["BENCH_CLK_TCK"])


def num(v):
    try:
        return float(v)
    except ValueError:
        return None


def count(v):
    n = num(v)
    return int(n) if n is not None else None


def split(name, what, per):
    """Tunnel CPU by process role (hub, agent, port-forward, sshd, ssh, ...), in seconds per `per`."""
    try:
        lines = open(os.path.join(env["BENCH_WORKDIR"], f"cpu-{name}-{what}.txt")).read().split("\n")
    except OSError:
        return None
    out = {}
    for line in lines:
        role, _, ticks = line.partition(" ")
        if role and num(ticks) is not None:
            out[role] = round(num(ticks) / TCK / per, 2 if what == "bulk" else 1)
    return dict(sorted(out.items())) or None


def held_lines(name):
    try:
        return [l.split() for l in open(os.path.join(env["BENCH_WORKDIR"], f"held-{name}.txt")) if len(l.split()) == 3]
    except OSError:
        return []


def held_split(name, n):
    """Resident memory added per held connection, KiB, by process role."""
    if not n:
        return None
    return dict(sorted((role, round((num(b) - num(a)) / n, 1)) for role, a, b in held_lines(name))) or None


def held_before(name):
    """Resident memory of the tunnel's processes before the held connections (after the other runs), KiB."""
    return dict(sorted((role, count(a)) for role, a, _ in held_lines(name))) or None


rows, order = {}, []
for line in open(env["BENCH_RESULTS"]):
    f = line.rstrip("\n").split("\t")
    name, label, busy, note = f[0], f[1], f[2], f[7]
    code, size, secs, bticks = (f[3].split() + ["-"] * 4)[:4]
    rps, p50, p99, reqs, non2xx, sockerr, rticks = (f[4].split() + ["-"] * 7)[:7]
    lrps, lp50, lp99 = (f[5].split() + ["-"] * 3)[:3]
    sn, sp50, sp99, smax, sfail = (f[6].split() + ["-"] * 5)[:5]
    crps, cp50, cp99 = ((f[8].split() if len(f) > 8 else []) + ["-"] * 3)[:3]
    hn, hfail = ((f[9].split() if len(f) > 9 else []) + ["-"] * 2)[:2]
    ucode, usize, usecs, uticks = ((f[10].split() if len(f) > 10 else []) + ["-"] * 4)[:4]
    before, _, after = busy.partition("/")
    tunnel = name != "direct"
    r = {"label": label}
    size, secs = num(size), num(secs)
    if code == "200" and size == BYTES and secs:
        r["bulk_mb_per_s"] = round(size / secs / 1e6, 1)
        r["bulk_seconds"] = round(secs, 3)
        r["tunnel_cpu_s_per_gb"] = round(num(bticks) / TCK / (BYTES / 1e9), 2) if tunnel and num(bticks) is not None else None
    else:
        r["bulk_mb_per_s"] = None
        r["tunnel_cpu_s_per_gb"] = None
        note = note or f"bulk download failed (HTTP {code}, {size} of {BYTES} bytes)"
    usize, usecs = num(usize), num(usecs)
    if ucode == "200" and usize == BYTES and usecs:
        r["upload_mb_per_s"] = round(usize / usecs / 1e6, 1)
        r["upload_tunnel_cpu_s_per_gb"] = round(num(uticks) / TCK / (BYTES / 1e9), 2) if tunnel and num(uticks) is not None else None
    else:
        r["upload_mb_per_s"] = None
        if ucode not in ("-", "200") or (ucode == "200" and usize != BYTES):
            note = note or f"bulk upload failed (HTTP {ucode}, {usize} of {BYTES} bytes)"
    r["req_per_s"] = num(rps)
    r["p50_ms"] = num(p50)
    r["p99_ms"] = num(p99)
    r["requests"] = count(reqs)
    r["non_2xx"] = count(non2xx)
    r["socket_errors"] = count(sockerr)
    r["tunnel_cpu_us_per_req"] = round(num(rticks) / TCK * 1e6 / r["requests"], 1) if tunnel and r["requests"] and num(rticks) is not None else None
    r["one_conn_req_per_s"] = num(lrps)
    r["one_conn_p50_ms"] = num(lp50)
    r["one_conn_p99_ms"] = num(lp99)
    r["new_conn_samples"] = count(sn)
    r["new_conn_p50_ms"] = num(sp50)
    r["new_conn_p99_ms"] = num(sp99)
    r["new_conn_max_ms"] = num(smax)
    r["new_conn_failures"] = count(sfail)
    r["close_req_per_s"] = num(crps)
    r["close_p50_ms"] = num(cp50)
    r["close_p99_ms"] = num(cp99)
    r["held_connections"] = count(hn)
    r["held_failures"] = count(hfail)
    r["held_kib_per_conn_by_process"] = held_split(name, r["held_connections"])
    r["held_kib_per_conn"] = round(sum(r["held_kib_per_conn_by_process"].values()), 1) if r["held_kib_per_conn_by_process"] else None
    r["rss_kib_before_held_by_process"] = held_before(name)
    r["tunnel_cpu_s_per_gb_by_process"] = split(name, "bulk", BYTES / 1e9) if r["bulk_mb_per_s"] else None
    r["tunnel_cpu_us_per_req_by_process"] = split(name, "wrk", r["requests"] / 1e6) if r["requests"] else None
    r["cpu_busy_before_pct"] = count(before)
    r["cpu_busy_after_pct"] = count(after)
    if r["non_2xx"] or r["socket_errors"]:
        note = (note + "; " if note else "") + f"wrk: {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors"
    if r["new_conn_failures"]:
        note = (note + "; " if note else "") + f"{r['new_conn_failures']} fresh connections failed (see setup-{name}.txt)"
    if r["req_per_s"] is None and not note:
        note = "wrk gave no result"
    if (r["cpu_busy_after_pct"] or 0) > int(env["BENCH_QUIET_MAX_BUSY"]):
        note = (note + "; " if note else "") + "other work was running: figures polluted"
    r["note"] = note or None
    rows[name] = r
    order.append(name)

SSH = ["ssh_L", "ssh_tt_L", "ssh_N", "ssh_tt"]
HELD_N = env.get("BENCH_HELD", "-")
IDLE_HUB_KIB = count(env.get("BENCH_IDLE_HUB_KIB", "-"))
IDLE_HUB_ANON_KIB = count(env.get("BENCH_IDLE_HUB_ANON_KIB", "-"))


def best(metric, names):
    c = [(rows[n][metric], n) for n in names if n in rows and rows[n].get(metric)]
    return max(c) if c else (None, None)


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def added(path, metric):
    a, b = rows.get(path, {}).get(metric), rows.get("direct", {}).get(metric)
    return round(a - b, 3) if a is not None and b is not None else None


ssh_tp, ssh_tp_name = best("bulk_mb_per_s", SSH)
ssh_up, ssh_up_name = best("upload_mb_per_s", SSH)
ssh_rps, ssh_rps_name = best("req_per_s", SSH)
ssh_close, ssh_close_name = best("close_req_per_s", SSH)
rh = rows.get("rathole", {})
ratios = {"best_ssh_throughput_variant": ssh_tp_name, "best_ssh_req_per_s_variant": ssh_rps_name,
          "best_ssh_close_req_per_s_variant": ssh_close_name}
dflt = rows.get("ssh_dflt", {})
for p in ("portfwd", "portfwd_gw", "gateway"):
    row = rows.get(p, {})
    # OpenSSH out of the box (its default cipher): reported, not a target.
    ratios[f"{p}_vs_ssh_default_cipher_throughput"] = ratio(row.get("bulk_mb_per_s"), dflt.get("bulk_mb_per_s"))
    ratios[f"{p}_vs_ssh_default_cipher_upload"] = ratio(row.get("upload_mb_per_s"), dflt.get("upload_mb_per_s"))
    ratios[f"{p}_vs_ssh_default_cipher_req_per_s"] = ratio(row.get("req_per_s"), dflt.get("req_per_s"))
    ratios[f"{p}_vs_best_ssh_throughput"] = ratio(row.get("bulk_mb_per_s"), ssh_tp)
    ratios[f"{p}_vs_best_ssh_upload"] = ratio(row.get("upload_mb_per_s"), ssh_up)
    ratios[f"{p}_vs_best_ssh_req_per_s"] = ratio(row.get("req_per_s"), ssh_rps)
    ratios[f"{p}_vs_best_ssh_close_req_per_s"] = ratio(row.get("close_req_per_s"), ssh_close)
    ratios[f"{p}_vs_direct_req_per_s"] = ratio(row.get("req_per_s"), rows.get("direct", {}).get("req_per_s"))
    ratios[f"{p}_vs_rathole_throughput"] = ratio(row.get("bulk_mb_per_s"), rh.get("bulk_mb_per_s"))
    ratios[f"{p}_vs_rathole_req_per_s"] = ratio(row.get("req_per_s"), rh.get("req_per_s"))
    for other in ("rathole", "bore"):
        o = rows.get(other, {})
        ratios[f"{p}_vs_{other}_close_req_per_s"] = ratio(row.get("close_req_per_s"), o.get("close_req_per_s"))
        if other == "bore":
            ratios[f"{p}_vs_bore_throughput"] = ratio(row.get("bulk_mb_per_s"), o.get("bulk_mb_per_s"))
            ratios[f"{p}_vs_bore_req_per_s"] = ratio(row.get("req_per_s"), o.get("req_per_s"))
    for m in ("p50_ms", "p99_ms", "one_conn_p50_ms", "one_conn_p99_ms", "new_conn_p50_ms", "new_conn_p99_ms"):
        ratios[f"{p}_added_{m}"] = added(p, m)


# The gateway over HTTP/2, as kubectl speaks to it (h2load, one connection).
h2f = (env.get("BENCH_H2") or "").split()
h2 = None
if len(h2f) == 5 and num(h2f[0]) is not None:
    h2 = {"streams": count(env.get("BENCH_H2_STREAMS", "")), "req_per_s": num(h2f[0]), "mean_ms": num(h2f[1]),
          "requests": count(h2f[2]), "failed": count(h2f[3])}
    h2["tunnel_cpu_us_per_req"] = round(num(h2f[4]) / TCK * 1e6 / h2["requests"], 1) if h2["requests"] else None
    h2["tunnel_cpu_us_per_req_by_process"] = split("gateway", "h2", h2["requests"] / 1e6) if h2["requests"] else None
    h2["vs_direct_req_per_s"] = ratio(h2["req_per_s"], rows.get("direct", {}).get("req_per_s"))
    h2["vs_gateway_http1_req_per_s"] = ratio(h2["req_per_s"], rows.get("gateway", {}).get("req_per_s"))
ratios["gateway_h2_vs_direct_req_per_s"] = h2["vs_direct_req_per_s"] if h2 else None

# Direct over TLS, as a kube-apiserver is reached: wrk "rps p50 p99 ..."
# at 16 connections and at 1, h2load "rps mean ...".
dtls = None
dr, dl, dh = ((env.get(k) or "").split() for k in ("BENCH_DTLS_RATE", "BENCH_DTLS_LIGHT", "BENCH_DTLS_H2"))
if len(dr) == 7 and num(dr[0]) is not None:
    g = rows.get("gateway", {})
    dtls = {"req_per_s": num(dr[0]), "p50_ms": num(dr[1]), "p99_ms": num(dr[2]),
            "one_conn_p50_ms": num(dl[1]) if len(dl) == 7 else None,
            "one_conn_p99_ms": num(dl[2]) if len(dl) == 7 else None,
            "h2_req_per_s": num(dh[0]) if len(dh) == 5 else None}
    dtls["gateway_vs_req_per_s"] = ratio(g.get("req_per_s"), dtls["req_per_s"])
    one = g.get("one_conn_p50_ms")
    dtls["gateway_added_one_conn_p50_ms"] = (round(one - dtls["one_conn_p50_ms"], 3)
                                             if one is not None and dtls["one_conn_p50_ms"] is not None else None)
    dtls["gateway_h2_vs_h2_req_per_s"] = ratio(h2["req_per_s"], dtls["h2_req_per_s"]) if h2 else None

# The best encrypted peer for small requests (goal 2): the OpenSSH rows and
# rathole (noise); bore is not encrypted.
enc_rps, enc_rps_name = best("req_per_s", SSH + ["rathole"])
ratios["best_encrypted_req_per_s_variant"] = enc_rps_name
ratios["portfwd_vs_best_encrypted_req_per_s"] = ratio(rows.get("portfwd", {}).get("req_per_s"), enc_rps)
enc_p99 = rows.get(enc_rps_name, {}).get("p99_ms") if enc_rps_name else None
# Connection setup (goal 1): p50 against the best (lowest) OpenSSH p50.
ssh_setup = [rows[n]["new_conn_p50_ms"] for n in SSH if n in rows and rows[n].get("new_conn_p50_ms")]
ssh_setup_p50 = min(ssh_setup) if ssh_setup else None
ratios["portfwd_new_conn_p50_vs_best_ssh"] = ratio(rows.get("portfwd", {}).get("new_conn_p50_ms"), ssh_setup_p50)


def check(value, ok, fmt, why_na="n/a"):
    if value is None:
        return why_na
    return ("PASS " if ok(value) else "MISS ") + fmt.format(value)


pf, gw = rows.get("portfwd", {}), rows.get("gateway", {})
rh_na = "n/a (rathole " + (env.get("BENCH_RATHOLE_NOTE") or "gave no figure") + ")"
targets = {
    "raw channel (towerctl port-forward)": {
        "throughput >= 1.5x best OpenSSH": check(ratios["portfwd_vs_best_ssh_throughput"], lambda v: v >= 1.5, "{:.2f}x"),
        "upload >= 1.5x best OpenSSH": check(ratios["portfwd_vs_best_ssh_upload"], lambda v: v >= 1.5, "{:.2f}x"),
        "new conn req/s >= 1.0x best OpenSSH": check(ratios["portfwd_vs_best_ssh_close_req_per_s"], lambda v: v >= 1.0, "{:.2f}x"),
        "<= 32 KiB per held connection": check(pf.get("held_kib_per_conn"), lambda v: v <= 32, "{:.1f} KiB"),
        "hub idle RSS <= 12 MiB": check(IDLE_HUB_KIB, lambda v: v <= 12 * 1024, "{:.0f} KiB"),
        "hub idle private memory <= 12 MiB": check(IDLE_HUB_ANON_KIB, lambda v: v <= 12 * 1024, "{:.0f} KiB"),
        "req/s >= 1.2x rathole (noise)": check(ratios["portfwd_vs_rathole_req_per_s"], lambda v: v >= 1.2, "{:.2f}x", rh_na),
        "req/s >= 1.2x best encrypted peer": check(ratios["portfwd_vs_best_encrypted_req_per_s"], lambda v: v >= 1.2,
                                                   "{:.2f}x (" + str(enc_rps_name) + ")"),
        "p99 <= that peer's, 16 connections": check(pf.get("p99_ms"), lambda v: enc_p99 is not None and v <= enc_p99,
                                                    "{:.3f} ms (" + (f"{enc_p99:.3f}" if enc_p99 is not None else "-") + ")"),
        "new conn p50 <= 1.5x best OpenSSH": check(ratios["portfwd_new_conn_p50_vs_best_ssh"], lambda v: v <= 1.5, "{:.2f}x"),
        "p99 <= 1 ms, 16 connections": check(pf.get("p99_ms"), lambda v: v <= 1.0, "{:.3f} ms"),
        "p99 <= 1 ms, 1 connection": check(pf.get("one_conn_p99_ms"), lambda v: v <= 1.0, "{:.3f} ms"),
        "p99 <= 1 ms, new connection": check(pf.get("new_conn_p99_ms"), lambda v: v <= 1.0, "{:.3f} ms"),
    },
    "gateway": {
        "req/s >= 0.8x direct, 16 connections": check(ratios["gateway_vs_direct_req_per_s"], lambda v: v >= 0.8, "{:.2f}x"),
        "HTTP/2 req/s >= 0.8x direct": check(ratios["gateway_h2_vs_direct_req_per_s"], lambda v: v >= 0.8, "{:.2f}x",
                                             "n/a (" + (env.get("BENCH_H2_NOTE") or "no figure") + ")"),
        "added p50 <= 0.15 ms, 1 connection": check(ratios["gateway_added_one_conn_p50_ms"], lambda v: v <= 0.15, "{:+.3f} ms"),
        "added p99 <= 1 ms, 16 connections": check(ratios["gateway_added_p99_ms"], lambda v: v <= 1.0, "{:+.3f} ms"),
        "added p99 <= 1 ms, 1 connection": check(ratios["gateway_added_one_conn_p99_ms"], lambda v: v <= 1.0, "{:+.3f} ms"),
    },
}

now = datetime.datetime.now(datetime.timezone.utc)
health = [h for h in env.get("BENCH_HEALTH", "").splitlines() if h]
log_issues = [l for l in env.get("BENCH_LOG_ISSUES", "").splitlines() if l]
doc = {
    "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    "machine": {
        "cpus": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()),
        "kernel": platform.release(),
        "loadavg_start": env["BENCH_LOADAVG_START"],
        "loadavg_end": env["BENCH_LOADAVG_END"],
    },
    "towerctl": env["BENCH_GIT"],
    "settings": {
        "bytes": BYTES,
        "duration": env["BENCH_DURATION"],
        "connections": int(env["BENCH_CONNECTIONS"]),
        "threads": int(env["BENCH_THREADS"]),
        "one_conn_duration": env["BENCH_LIGHT_DURATION"],
        "new_connections": int(env["BENCH_SETUP_CONNECTIONS"]),
        "ssh_cipher": env["BENCH_SSH_CIPHER"],
        "tools": {"ssh": env["BENCH_SSH_VERSION"], "wrk": env["BENCH_WRK_VERSION"], "curl": env["BENCH_CURL_VERSION"],
                  "python": platform.python_version()},
    },
    "paths": {n: rows[n] for n in order},
    "rathole": env.get("BENCH_RATHOLE_NOTE") or "measured",
    "bore": env.get("BENCH_BORE_NOTE") or "measured",
    "hub_idle_rss_kib": IDLE_HUB_KIB,
    "hub_idle_anon_kib": IDLE_HUB_ANON_KIB,
    "gateway_http2": h2 or env.get("BENCH_H2_NOTE") or None,
    "direct_tls": dtls,
    "ratios": ratios,
    "targets": targets,
    "problems": health + log_issues,
}
with open(env["BENCH_JSON"], "w") as fh:
    json.dump(doc, fh, indent=2)
    fh.write("\n")


def fmt(v, spec):
    if v is None:
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return "-".rjust(int(width or 0))
    return format(v, spec)


def times(v):
    return f"{v:.2f}x" if v is not None else "-"


def pair(a, b, spec="+.3f"):
    return f"{fmt(a, spec)} / {fmt(b, spec)} ms"


print()
print(f"towerctl benchmark  {doc['date']}  {doc['machine']['cpus']} CPUs ({doc['machine']['cpu']})  towerctl {doc['towerctl']}")
print(f"bulk: curl, {BYTES} bytes down (GET /bulk) and up (POST /sink of a file in memory); load: wrk -t{env['BENCH_THREADS']} -c{env['BENCH_CONNECTIONS']} -d{env['BENCH_DURATION']} GET /version; "
      f"1 conn: wrk -t1 -c1 -d{env['BENCH_LIGHT_DURATION']}; new conn: {env['BENCH_SETUP_CONNECTIONS']} fresh connections, "
      f"connect -> first byte; ssh cipher {env['BENCH_SSH_CIPHER']}")
print()
print(f"{'':<31} {'down':>7} {'up':>7} {'---- 16 connections ----':>26} {'-- 1 connection --':>17} {'- new connection -':>17} {'tunnel CPU':>15}")
print(f"{'path':<31} {'MB/s':>7} {'MB/s':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms':>8} {'p99 ms':>8} "
      f"{'s/GB':>7} {'us/req':>7} {'busy%':>7}  note")
for n in order:
    r = rows[n]
    busy = f"{fmt(r.get('cpu_busy_before_pct'), 'd')}/{fmt(r.get('cpu_busy_after_pct'), 'd')}"
    print(f"{r['label']:<31} {fmt(r['bulk_mb_per_s'], '7.1f')} {fmt(r.get('upload_mb_per_s'), '7.1f')} {fmt(r['req_per_s'], '8.0f')} {fmt(r['p50_ms'], '8.3f')} {fmt(r['p99_ms'], '8.3f')} "
          f"{fmt(r['one_conn_p50_ms'], '8.3f')} {fmt(r['one_conn_p99_ms'], '8.3f')} {fmt(r['new_conn_p50_ms'], '8.3f')} {fmt(r['new_conn_p99_ms'], '8.3f')} "
          f"{fmt(r['tunnel_cpu_s_per_gb'], '7.2f')} {fmt(r['tunnel_cpu_us_per_req'], '7.1f')} {busy:>7}  {r['note'] or ''}")
for key, label in (("BENCH_RATHOLE_NOTE", "rathole (noise)"), ("BENCH_BORE_NOTE", "bore (no encryption)")):
    if env.get(key):
        print(f"{label:<31} {'-':>7} {'-':>7} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>7} {'-':>7} {'-':>7}  {env[key]}")
print("tunnel CPU: CPU time of the tunnel's processes (hub+agent; port-forward+hub+agent; sshd+ssh; rathole server+client)")
print("            per GB of bulk / per request under load; by process:")
for n in order:
    a, b = rows[n]["tunnel_cpu_s_per_gb_by_process"] or {}, rows[n]["tunnel_cpu_us_per_req_by_process"] or {}
    if a or b:
        parts = [f"{k} {fmt(a.get(k), '.2f').strip()}/{fmt(b.get(k), '.1f').strip()}" for k in sorted(set(a) | set(b))
                 if a.get(k) or b.get(k)]
        print(f"              {rows[n]['label']:<31} " + ", ".join(parts) + "  (s/GB / us/req)")
print("new connection: connect() -> first byte of GET /version on a fresh connection (https: TLS handshake included)")
if h2:
    by = h2.get("tunnel_cpu_us_per_req_by_process") or {}
    print(f"gateway over HTTP/2 (kubectl's protocol; h2load, one connection, {h2['streams']} streams at a time): "
          f"{h2['req_per_s']:.0f} req/s ({times(h2['vs_direct_req_per_s'])} direct, {times(h2['vs_gateway_http1_req_per_s'])} the HTTP/1.1 row), "
          f"mean {fmt(h2['mean_ms'], '.3f')} ms, {h2['failed']} failed; tunnel CPU {fmt(h2['tunnel_cpu_us_per_req'], '.1f')} us/req"
          + (" (" + ", ".join(f"{k} {v}" for k, v in by.items()) + ")" if by else ""))
elif env.get("BENCH_H2_NOTE"):
    print(f"gateway over HTTP/2: {env['BENCH_H2_NOTE']}")
if dtls:
    print(f"direct over TLS (as kube-apiserver is reached; not a target): {fmt(dtls['req_per_s'], '.0f')} req/s at "
          f"{env['BENCH_CONNECTIONS']} connections, p50 {fmt(dtls['p50_ms'], '.3f')} ms, 1 connection p50 {fmt(dtls['one_conn_p50_ms'], '.3f')} ms"
          + (f", HTTP/2 {fmt(dtls['h2_req_per_s'], '.0f')} req/s" if dtls["h2_req_per_s"] else ""))
    print(f"  gateway against it: {times(dtls['gateway_vs_req_per_s'])} req/s, added p50 at 1 connection "
          f"{fmt(dtls['gateway_added_one_conn_p50_ms'], '.3f')} ms"
          + (f", HTTP/2 {times(dtls['gateway_h2_vs_h2_req_per_s'])} (h2load both)" if dtls["gateway_h2_vs_h2_req_per_s"] else ""))
print()
print(f"{'':<31} {'-- Connection: close --':>26} {'--- ' + str(HELD_N) + ' held connections ---':>40}")
print(f"{'path':<31} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'KiB/conn':>9}  by process (KiB per held connection; RSS before, MiB)")
for n in order:
    r = rows[n]
    by = r.get("held_kib_per_conn_by_process") or {}
    before = r.get("rss_kib_before_held_by_process") or {}
    parts = ", ".join(f"{k} {v:.1f} ({before.get(k, 0) / 1024:.1f})" for k, v in by.items())
    print(f"{r['label']:<31} {fmt(r.get('close_req_per_s'), '8.0f')} {fmt(r.get('close_p50_ms'), '8.3f')} {fmt(r.get('close_p99_ms'), '8.3f')} "
          f"{fmt(r.get('held_kib_per_conn'), '9.1f')}  {parts}")
print(f"hub idle RSS (one agent, before any path was measured): {fmt(IDLE_HUB_KIB / 1024 if IDLE_HUB_KIB else None, '.1f')} MiB, "
      f"of which private (anonymous) {fmt(IDLE_HUB_ANON_KIB / 1024 if IDLE_HUB_ANON_KIB else None, '.1f')} MiB; the rest is mostly the binary's code pages")
print("busy%: share of all CPUs used by other work in the second before / after the path was measured")
print()
print("ratios")
for p, what in (("portfwd", "port-forward"), ("portfwd_gw", "port-forward via gateway"), ("gateway", "gateway")):
    if p not in rows:
        continue
    print(f"  {what} MB/s  / best ssh MB/s  ({ssh_tp_name or '-'}): {times(ratios[f'{p}_vs_best_ssh_throughput'])}")
    if ratios.get(f"{p}_vs_best_ssh_upload") is not None:
        print(f"  {what} upload MB/s / best ssh upload ({ssh_up_name or '-'}): {times(ratios[f'{p}_vs_best_ssh_upload'])}")
    print(f"  {what} req/s / best ssh req/s ({ssh_rps_name or '-'}): {times(ratios[f'{p}_vs_best_ssh_req_per_s'])}")
    print(f"  {what} new-conn req/s / best ssh ({ssh_close_name or '-'}): {times(ratios[f'{p}_vs_best_ssh_close_req_per_s'])}")
    if ratios[f"{p}_vs_rathole_req_per_s"] is not None:
        print(f"  {what} MB/s  / rathole MB/s:  {times(ratios[f'{p}_vs_rathole_throughput'])}")
        print(f"  {what} req/s / rathole req/s: {times(ratios[f'{p}_vs_rathole_req_per_s'])}")
    if ratios[f"{p}_vs_bore_req_per_s"] is not None:
        print(f"  {what} MB/s  / bore MB/s:  {times(ratios[f'{p}_vs_bore_throughput'])}")
        print(f"  {what} req/s / bore req/s: {times(ratios[f'{p}_vs_bore_req_per_s'])}")
        print(f"  {what} new-conn req/s / bore: {times(ratios[f'{p}_vs_bore_close_req_per_s'])}")
    print(f"  {what} added p50 / p99 over direct, new connection: "
          f"{pair(ratios[f'{p}_added_new_conn_p50_ms'], ratios[f'{p}_added_new_conn_p99_ms'])}")
    print(f"  {what} added p50 / p99 over direct, 16 connections: "
          f"{pair(ratios[f'{p}_added_p50_ms'], ratios[f'{p}_added_p99_ms'])}")
    print(f"  {what} added p50 / p99 over direct, 1 connection:   "
          f"{pair(ratios[f'{p}_added_one_conn_p50_ms'], ratios[f'{p}_added_one_conn_p99_ms'])}")
if "ssh_dflt" in rows:
    print("  against `ssh -tt -L` as OpenSSH runs out of the box (its default cipher; reported, not a target):")
    for p, what in (("portfwd", "port-forward"), ("portfwd_gw", "port-forward via gateway")):
        if p in rows:
            print(f"    {what}: download {times(ratios[f'{p}_vs_ssh_default_cipher_throughput'])}, "
                  f"upload {times(ratios[f'{p}_vs_ssh_default_cipher_upload'])}, "
                  f"req/s {times(ratios[f'{p}_vs_ssh_default_cipher_req_per_s'])}")
print()
print("targets")
for group, checks in targets.items():
    print(f"  {group}")
    for k, v in checks.items():
        print(f"    {k:<34} {v}")
# Most of the idle hub's RSS is code; its private part is small. Over the
# target with the private part under it, the code is spread out again: the
# layout list (link/hot-text.ld) misses functions added since it was made.
if IDLE_HUB_KIB and IDLE_HUB_KIB > 12 * 1024 and (IDLE_HUB_ANON_KIB or 0) <= 4 * 1024:
    print("  note: the hub's idle RSS is over 12 MiB but its private memory is not: link/hot-text.ld is likely stale"
          " (bench/hot-text.sh makes it again, then rebuild), or the binary was built together with an example"
          " (cargo build --bin towerctl --example ...: other symbol hashes, the list matches less; build it alone)")
if doc["problems"]:
    print()
    print("problems seen during the run (daemon health; WARN/ERROR lines of the towerctl logs and port-forward's errors, counted):")
    for p in doc["problems"]:
        print(f"  {p}")
print()
print(f"JSON: {env['BENCH_JSON']}")
PY
REPORTING=0
