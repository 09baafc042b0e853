#!/bin/sh
# Builds the towerctl OCI image offline, with buildah (or podman): FROM
# scratch plus the release binary, exactly the shared libraries `ldd` says
# it needs (with the dynamic loader), passwd/group entries for the non-root
# user 65532, and the host's CA bundle (Debian's ca-certificates). Nothing is
# pulled from any registry.
#
#   scripts/image.sh [--binary PATH] [--tag NAME]
#
#   --binary PATH  use this towerctl binary (default: cargo build --release
#                  --locked, then target/release/towerctl)
#   --tag NAME     image name (default: localhost/towerctl:VERSION, the
#                  image `towerctl join --print-manifest` names)
#
# BUILDER=buildah|podman picks the tool (default: buildah when installed).
# The image lands in that tool's local storage; README says how to load it
# into a cluster's nodes or push it.
set -eu

die() {
    echo "error: $*" >&2
    exit 1
}

root=$(cd "$(dirname "$0")/.." && pwd)
bin=
tag=
while [ $# -gt 0 ]; do
    case $1 in
    --binary) [ $# -ge 2 ] || die "--binary needs a path"; bin=$2; shift 2 ;;
    --tag) [ $# -ge 2 ] || die "--tag needs a name"; tag=$2; shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

builder=${BUILDER:-}
if [ -z "$builder" ]; then
    if command -v buildah >/dev/null 2>&1; then
        builder=buildah
    elif command -v podman >/dev/null 2>&1; then
        builder=podman
    else
        die "neither buildah nor podman is installed: install one (apt-get install buildah) and run this again"
    fi
fi
command -v "$builder" >/dev/null 2>&1 || die "BUILDER=$builder is not installed"
command -v ldd >/dev/null 2>&1 || die "ldd is missing: install libc-bin"

if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release --locked) || die "cargo build --release failed"
    bin=$root/target/release/towerctl
fi
[ -x "$bin" ] || die "'$bin' is not an executable towerctl binary: pass --binary PATH or build it first"
version=$("$bin" --version | awk '{print $2}')
[ -n "$version" ] || die "'$bin --version' printed no version"
tag=${tag:-localhost/towerctl:$version}

certs=/etc/ssl/certs/ca-certificates.crt
[ -f "$certs" ] || die "no CA bundle at $certs: install ca-certificates (apt-get install ca-certificates)"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
trap 'exit 130' INT TERM
rootfs=$ctx/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$ctx/home/nonroot"
cp "$bin" "$rootfs/usr/local/bin/towerctl"
chmod 0755 "$rootfs/usr/local/bin/towerctl"

# Every library the binary loads, at the path the loader looks for it, plus
# the loader itself. `ldd` prints "name => /path (addr)" for libraries and
# "/path (addr)" for the loader; the vDSO has no file.
if ldd "$bin" >/dev/null 2>&1; then
    libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
    [ -n "$libs" ] || die "ldd listed no library paths for '$bin'"
    if ldd "$bin" | grep -q "not found"; then
        die "'$bin' needs libraries this machine lacks: $(ldd "$bin" | grep "not found" | tr -s ' \n' ' ')"
    fi
else
    libs= # a static binary needs none
fi
for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done

cp -L "$certs" "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
chmod 1777 "$rootfs/tmp"

cat >"$ctx/Containerfile" <<CF
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 home/ /home/
ENV HOME=/home/nonroot
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/towerctl"]
CMD ["--help"]
LABEL org.opencontainers.image.title="towerctl" org.opencontainers.image.version="$version"
CF

case $builder in
buildah) buildah bud --layers=false -f "$ctx/Containerfile" -t "$tag" "$ctx" >&2 ;;
*) "$builder" build -f "$ctx/Containerfile" -t "$tag" "$ctx" >&2 ;;
esac || die "$builder could not build the image"
echo "$tag"
