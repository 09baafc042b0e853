#!/usr/bin/env bash
# Interleaved rounds: towerctl's hub-served port-forward against OpenSSH's
# local forwards (`ssh -tt -L`, `ssh -N -L`), each round measuring every
# path one after the other (order rotated per round), so that a slow phase
# of a shared machine hits all paths alike. Prints each round, then the
# median of the per-round ratios to the best OpenSSH row of that round
# (after one warm-up round that is not counted).
# The two OpenSSH rows use SSH_CIPHER, towerctl's own first choice by
# default, so that both sides pay for the same cipher: the targets are
# judged against them. A third row, `ssh -tt -L` as OpenSSH runs out of
# the box (its default cipher negotiation, chacha20-poly1305), is the
# baseline as an operator meets it; its ratios are printed and judged
# apart (SSH_DEFAULT_ROW=0 leaves it out).
# bench/run.sh measures everything once; this is for the figures that move
# most between runs (bulk, keep-alive rate).
#
#   ROUNDS=5 BYTES=1GiB DURATION=3s bench/pairs.sh
#
# Environment: ROUNDS (default 5), BYTES (N, NMiB, NGiB; default 1GiB),
# DURATION (wrk -t2 -c16 keep-alive run per path; default 3s), BUILD
# (1 builds the release binaries first, the default; 0 uses what is built),
# SSH_CIPHER (default aes256-gcm@openssh.com), SSH_DEFAULT_ROW (default 1),
# KEEP_WORKDIR=1.
# Needs curl, wrk, sshd and ssh; loopback only; every loop is bounded.
set -euo pipefail
# shellcheck source=bench/sshd-config.sh
source "$(dirname "$0")/sshd-config.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-3s}
BUILD=${BUILD:-1}
SSH_CIPHER=${SSH_CIPHER:-aes256-gcm@openssh.com}
SSH_DEFAULT_ROW=${SSH_DEFAULT_ROW:-1}
[[ $SSH_DEFAULT_ROW =~ ^[01]$ ]] || { echo "pairs.sh: SSH_DEFAULT_ROW=$SSH_DEFAULT_ROW: use 0 or 1" >&2 && exit 2; }
[[ $SSH_CIPHER == default ]] && SSH_DEFAULT_ROW=0
BYTES=${BYTES:-1GiB}
case $BYTES in
*GiB) BYTES_N=$((${BYTES%GiB} << 30)) ;;
*MiB) BYTES_N=$((${BYTES%MiB} << 20)) ;;
*[0-9]) BYTES_N=$BYTES ;;
*) echo "pairs.sh: BYTES=$BYTES: use N, NMiB or NGiB" >&2 && exit 2 ;;
esac
[[ $ROUNDS =~ ^[1-9][0-9]?$ ]] || { echo "pairs.sh: ROUNDS=$ROUNDS: use 1-99" >&2 && exit 2; }
for t in curl wrk ssh ssh-keygen /usr/sbin/sshd python3; do
    command -v "$t" >/dev/null || { echo "pairs.sh: $t is missing (apt-get install curl wrk openssh-server openssh-client python3)" >&2 && exit 2; }
done

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ $BUILD == 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked --bin towerctl && cargo build --release --locked --example bench_upstream)
fi
BIN=$TARGET_DIR/release/towerctl
UP=$TARGET_DIR/release/examples/bench_upstream
[[ -x $BIN && -x $UP ]] || { echo "pairs.sh: build first (BUILD=1)" >&2 && exit 2; }

W=$(mktemp -d /tmp/towerctl-pairs.XXXXXX)
mkdir -p "$W"/{home,config,data,state,run,ssh}
chmod 700 "$W/run"
export HOME=$W/home XDG_CONFIG_HOME=$W/config XDG_DATA_HOME=$W/data XDG_STATE_HOME=$W/state XDG_RUNTIME_DIR=$W/run
unset KUBECONFIG TOWERCTL_TOKEN RUST_LOG
PIDS=()
MADE_PRIVSEP=0
cleanup() {
    "$BIN" down >/dev/null 2>&1 || true
    for f in "$W"/run/towerctl/agent-*.pid "$W"/run/towerctl/hub.pid; do
        [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    ((${#PIDS[@]})) && kill "${PIDS[@]}" 2>/dev/null || true
    ((MADE_PRIVSEP)) && rmdir /run/sshd 2>/dev/null || true
    rm -f "$W/upload"
    if [[ ${KEEP_WORKDIR:-0} == 1 ]]; then echo "work dir kept: $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
port_from() { # FILE PATTERN: the port a daemon prints on a line of PATTERN, within 10 s
    local i port
    for ((i = 0; i < 100; i++)); do
        port=$(sed -n "s/^$2\$/\\1/p" "$1")
        [[ -n $port ]] && echo "$port" && return 0
        sleep 0.1
    done
    return 1
}
wait_http() { # URL SECONDS
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        curl -s -o /dev/null --max-time 2 "$1" && return 0
        sleep 0.1
    done
    echo "pairs.sh: $1 does not answer" >&2
    return 1
}

"$UP" >"$W/up.out" 2>"$W/up.err" &
PIDS+=($!)
UPPORT=$(port_from "$W/up.out" 'listening on 127\.0\.0\.1:\([0-9]*\)') ||
    { echo "pairs.sh: bench_upstream did not start" >&2 && exit 1; }
cat >"$W/member.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: u
  cluster: {server: "http://127.0.0.1:$UPPORT"}
users:
- name: b
  user: {token: bench}
contexts:
- name: u
  context: {cluster: u, user: b}
current-context: u
EOF

# towerctl: hub, one agent, the hub-served port-forward.
"$BIN" up --listen "127.0.0.1:$(free_port)" --gateway "127.0.0.1:$(free_port)" --metrics off >"$W/hub-up.out" 2>&1
JOIN=$("$BIN" cluster add bench 2>/dev/null)
read -r -a J <<<"$JOIN"
[[ ${J[1]:-} == towerctl && ${J[2]:-} == join ]] || { echo "pairs.sh: unexpected 'cluster add' output" >&2 && exit 1; }
J[1]=$BIN
env "${J[@]}" --kubeconfig "$W/member.kubeconfig" --allow 127.0.0.0/8 >"$W/join.out" 2>&1
TOWERCTL_FORWARD_VIA=hub "$BIN" port-forward bench svc/web :80 --address 127.0.0.1 >"$W/pf.out" 2>"$W/pf.err" &
PIDS+=($!)
PFPORT=$(port_from "$W/pf.out" 'Forwarding from 127\.0\.0\.1:\([0-9]*\) -> 80') ||
    { echo "pairs.sh: port-forward did not start: $(cat "$W/pf.err")" >&2 && exit 1; }

# OpenSSH: a private sshd and its local forwards (two with SSH_CIPHER, and
# the default-cipher one unless SSH_DEFAULT_ROW=0).
if [[ $(id -u) == 0 && ! -d /run/sshd ]]; then mkdir -m 0755 /run/sshd && MADE_PRIVSEP=1; fi
ssh-keygen -q -t ed25519 -N '' -C pairs-host -f "$W/ssh/host"
ssh-keygen -q -t ed25519 -N '' -C pairs-client -f "$W/ssh/client"
cp "$W/ssh/client.pub" "$W/ssh/authorized_keys"
SSHD_PORT=$(free_port)
sshd_config "$SSHD_PORT" "$W/ssh/host" "$W/ssh/authorized_keys" >"$W/ssh/sshd_config"
/usr/sbin/sshd -f "$W/ssh/sshd_config" -D -e >"$W/sshd.out" 2>"$W/sshd.log" &
PIDS+=($!)
sleep 0.5
declare -A URL=([portfwd]=http://127.0.0.1:$PFPORT)
PATHS_ORDER=(portfwd ssh_tt_L ssh_N_L)
# ssh_forward MODE NAME CIPHER: a local forward through the private sshd.
ssh_forward() {
    local port args
    port=$(free_port)
    args=(ssh "-$1" -F /dev/null -p "$SSHD_PORT" -i "$W/ssh/client" -o IdentitiesOnly=yes -o BatchMode=yes
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes
        -o Compression=no -o LogLevel=ERROR -L "127.0.0.1:$port:127.0.0.1:$UPPORT" "$(id -un)@127.0.0.1")
    [[ $3 != default ]] && args+=(-c "$3")
    [[ $1 == tt ]] && args+=("exec sleep 86400")
    "${args[@]}" >"$W/$2.out" 2>&1 </dev/null &
    PIDS+=($!)
    URL[$2]=http://127.0.0.1:$port
}
ssh_forward tt ssh_tt_L "$SSH_CIPHER"
ssh_forward N ssh_N_L "$SSH_CIPHER"
if [[ $SSH_DEFAULT_ROW == 1 ]]; then
    ssh_forward tt ssh_dflt default
    PATHS_ORDER+=(ssh_dflt)
fi
for p in "${!URL[@]}"; do wait_http "${URL[$p]}/version" 20; done
head -c "$BYTES_N" /dev/zero >"$W/upload"

busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat; }
# measure PATH: "down_MBps up_MBps keepalive_req_per_s busy%_of_the_download"
measure() {
    local url=${URL[$1]} b0 i0 b1 i1 down up rps
    read -r b0 i0 < <(busy_ticks)
    down=$(curl -sS -o /dev/null --max-time 300 -w '%{speed_download}' "$url/bulk?bytes=$BYTES_N")
    read -r b1 i1 < <(busy_ticks)
    up=$(curl -sS -o /dev/null --max-time 300 -H 'Expect:' -H 'Content-Type: application/octet-stream' \
        -T "$W/upload" -X POST -w '%{speed_upload}' "$url/sink")
    rps=$(wrk -t2 -c16 -d"$DURATION" "$url/version" | awk '/^Requests\/sec/{print $2}')
    awk -v d="$down" -v u="$up" -v r="$rps" -v b=$((b1 - b0)) -v i=$((i1 - i0)) \
        'BEGIN{printf "%.0f %.0f %.0f %.0f\n", d/1e6, u/1e6, r, (b+i) ? 100*b/(b+i) : 0}'
}

echo "towerctl $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown), $(nproc) CPUs, $ROUNDS rounds, $BYTES_N bytes each way, wrk -t2 -c16 -d$DURATION, ssh cipher $SSH_CIPHER$([[ $SSH_DEFAULT_ROW == 1 ]] && echo ', ssh_dflt: OpenSSH default negotiation')"
printf '%-6s %-10s %8s %8s %9s %6s\n' round path "down MB/s" "up MB/s" "req/s" "busy%"
: >"$W/rows"
# Round 0 warms every path up (first transfers, OpenSSH's first
# re-key) and is printed but not counted.
for ((r = 0; r <= ROUNDS; r++)); do
    for ((k = 0; k < ${#PATHS_ORDER[@]}; k++)); do
        p=${PATHS_ORDER[$(((k + r - 1 + ${#PATHS_ORDER[@]}) % ${#PATHS_ORDER[@]}))]}
        row=$(measure "$p")
        ((r > 0)) && echo "$r $p $row" >>"$W/rows"
        # shellcheck disable=SC2086 # four numbers
        printf '%-6s %-10s %8s %8s %9s %6s\n' "$r" "$p" $row
    done
done

python3 - "$W/rows" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r, p, d, u, q, b = line.split()
    rows.setdefault(int(r), {})[p] = (float(d), float(u), float(q), float(b))
targets = {"down": 1.5, "up": 1.5, "req/s": 1.2}


def judge(title, baseline, target=True):
    """Prints the median over the rounds of the port-forward's ratio to
    baseline(paths, i), with a verdict when that baseline is a target's."""
    print()
    print(title)
    for i, name in enumerate(("down", "up", "req/s")):
        rs = []
        for paths in rows.values():
            best = baseline(paths, i)
            rs.append(paths["portfwd"][i] / best if best else float("nan"))
        med = statistics.median(rs)
        if target:
            verdict = f"target >= {targets[name]}x: " + ("PASS" if med >= targets[name] else "MISS")
        else:
            verdict = f"(reference, not a target: {'at or over' if med >= targets[name] else 'under'} {targets[name]}x)"
        print(f"  {name:6} median {med:.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in rs)})  {verdict}")


judge("per-round ratio of the port-forward to the best OpenSSH row of that round (same cipher):",
      lambda paths, i: max(paths[k][i] for k in ("ssh_tt_L", "ssh_N_L")))
if all("ssh_dflt" in paths for paths in rows.values()):
    judge("per-round ratio to `ssh -tt -L` as it runs out of the box (OpenSSH's default cipher):",
          lambda paths, i: paths["ssh_dflt"][i], target=False)
print()
for p in ("portfwd", "ssh_tt_L", "ssh_N_L", "ssh_dflt"):
    vals = [rows[r][p] for r in rows if p in rows[r]]
    if not vals:
        continue
    med = [statistics.median(v[i] for v in vals) for i in range(4)]
    print(f"  {p:9} medians: down {med[0]:.0f} MB/s, up {med[1]:.0f} MB/s, {med[2]:.0f} req/s, busy {med[3]:.0f}% during the download")
EOF
