#!/usr/bin/env bash
# Install the .deb in a clean Debian 12 (bookworm) root and check it as a technician would:
# install, version, config check, doctor, a short replay inspection by the daemon running as
# its system user (audit rows written), an upgrade to a second version (config and audit kept,
# the new version's start event recorded), remove (state kept), purge (state, user gone).
#
#   sudo packaging/test-in-chroot.sh [--deb FILE --deb2 FILE] [--cache DIR] [--mirror URL] [--keep]
#
# Without --deb/--deb2 both packages are built first with build-deb.sh (the second with the
# version <project version>+test2). The minimal bookworm root is made once with debootstrap and
# cached as a tarball in --cache (default /var/cache/anomaly-appliance-test), with the .debs
# apt downloads for the dependencies, so reruns only unpack it. No service is started in the
# chroot (policy-rc.d denies it; systemd does not run there): the daemon is started by hand,
# as systemd would, under its own user. Needs root, debootstrap and the mirror (network).
# Exits non-zero at the first failed step, naming it.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=/var/cache/anomaly-appliance-test
MIRROR=${APT_MIRROR:-http://deb.debian.org/debian}
DEB="" DEB2="" KEEP=0
NAME=anomaly-appliance

fail() { echo "test-in-chroot: FAIL: $*" >&2; exit 1; }
step() { echo "test-in-chroot: $*" >&2; }
trap 'fail "command failed at line $LINENO: $BASH_COMMAND"' ERR

while [ $# -gt 0 ]; do
    case "$1" in
        --deb) DEB=$(realpath "$2"); shift 2 ;;
        --deb2) DEB2=$(realpath "$2"); shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) fail "unknown argument '$1' (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, chroot, mounts)"
command -v debootstrap >/dev/null || fail "debootstrap is not installed (apt-get install debootstrap)"
{ [ -z "$DEB" ] && [ -z "$DEB2" ]; } || { [ -f "$DEB" ] && [ -f "$DEB2" ]; } || fail "give both --deb and --deb2, or neither"

WORK=$(mktemp -d /var/tmp/aa-chroot.XXXXXX)
ROOT="$WORK/root"
MOUNTS=()
cleanup() {
    local rc=$?
    if [ -n "${DAEMON_PID:-}" ]; then kill "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true; fi
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" || true; done
    if [ "$KEEP" = 1 ]; then step "kept $WORK"; else rm -rf --one-file-system "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$@"; }
audit_sql() { in_root /opt/$NAME/bin/python -c "import sqlite3, sys
c = sqlite3.connect('file:/var/lib/$NAME/audit.db?mode=ro', uri=True)
print(c.execute(sys.argv[1]).fetchone()[0])" "$1"; }

# ---------------------------------------------------------------- the packages
if [ -z "$DEB" ]; then
    VERSION=$(sed -n '0,/^version = "\(.*\)"$/s//\1/p' "$REPO/pyproject.toml")
    step "building the package ($VERSION) and an upgrade ($VERSION+test2)"
    DEB=$("$REPO/packaging/build-deb.sh" --out "$WORK/debs" --compression zstd)
    DEB2=$("$REPO/packaging/build-deb.sh" --out "$WORK/debs" --compression zstd --version "$VERSION+test2")
fi
V1=$(dpkg-deb -f "$DEB" Version); V2=$(dpkg-deb -f "$DEB2" Version)
dpkg --compare-versions "$V2" gt "$V1" || fail "the second package ($V2) must be newer than the first ($V1)"
step "packages: $(basename "$DEB") ($(du -h "$DEB" | cut -f1)), $(basename "$DEB2")"

# ---------------------------------------------------------------- a clean bookworm root (cached)
mkdir -p "$CACHE/apt-archives/partial"
BASE="$CACHE/bookworm-minbase.tar.gz"
if [ ! -f "$BASE" ]; then
    step "debootstrap bookworm (minbase) from $MIRROR, cached as $BASE"
    debootstrap --variant=minbase bookworm "$WORK/base" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || fail "debootstrap failed; see $WORK/debootstrap.log (use --keep to look)"
    tar -C "$WORK/base" --numeric-owner -czf "$BASE.tmp" . && mv "$BASE.tmp" "$BASE"
    rm -rf --one-file-system "$WORK/base"
fi
mkdir -p "$ROOT"
tar -C "$ROOT" --numeric-owner -xzf "$BASE"
mount -t proc proc "$ROOT/proc" && MOUNTS+=("$ROOT/proc")
mount -t sysfs sys "$ROOT/sys" && MOUNTS+=("$ROOT/sys")
mount --bind /dev "$ROOT/dev" && MOUNTS+=("$ROOT/dev")
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$ROOT/dev/shm" && MOUNTS+=("$ROOT/dev/shm")
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts" && MOUNTS+=("$ROOT/dev/pts")
mount --bind "$CACHE/apt-archives" "$ROOT/var/cache/apt/archives" && MOUNTS+=("$ROOT/var/cache/apt/archives")
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
echo "deb $MIRROR bookworm main" > "$ROOT/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d" && chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
in_root apt-get -qq update || fail "apt-get update in the chroot failed (mirror $MIRROR)"
cp "$DEB" "$DEB2" "$ROOT/tmp/"

# ---------------------------------------------------------------- install
step "installing $(basename "$DEB") with apt"
T0=$(date +%s%N)
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "/tmp/$(basename "$DEB")" > "$WORK/install.log" 2>&1 \
    || { tail -30 "$WORK/install.log" >&2; fail "apt-get install of $(basename "$DEB") failed"; }
INSTALL_MS=$((($(date +%s%N) - T0) / 1000000))
OUT=$(in_root appliance --version) || fail "appliance --version does not run"
[ "$OUT" = "anomaly-appliance ${V1//\~/}" ] || fail "appliance --version says '$OUT', expected $V1"
in_root getent passwd "$NAME" >/dev/null || fail "no system user $NAME"
[ "$(in_root stat -c %U:%G:%a /var/lib/$NAME)" = "$NAME:$NAME:750" ] || fail "/var/lib/$NAME owner/mode wrong"
[ "$(in_root stat -c %U:%G:%a /var/cache/$NAME)" = "$NAME:$NAME:750" ] || fail "/var/cache/$NAME owner/mode wrong"
[ "$(in_root stat -c %U:%G:%a /etc/$NAME/config.toml)" = "root:$NAME:640" ] || fail "config.toml is not root:$NAME 0640"
in_root test -x /opt/$NAME/bin/python3 || fail "the venv's python does not resolve to the system python3"
in_root /opt/$NAME/bin/python -c 'import appliance_models, systemd.daemon' || fail "backbone package or systemd-python missing"
in_root /opt/$NAME/bin/python -c 'import sys; sys.exit("torch" in sys.modules)' || fail "torch imported"
in_root dpkg -L "$NAME" > "$WORK/files"
grep -q '__pycache__/.*\.pyc$' "$WORK/files" || fail "no byte-code shipped"

# ---------------------------------------------------------------- the unit, with the host's systemd-analyze
if command -v systemd-analyze >/dev/null; then
    sed "s|^ExecStart=/usr/bin/appliance|ExecStart=$ROOT/opt/$NAME/bin/appliance|" \
        "$ROOT/lib/systemd/system/$NAME.service" > "$WORK/$NAME.service"
    systemd-analyze verify "$WORK/$NAME.service" || fail "systemd-analyze verify: the installed unit has errors"
    EXPOSURE=$(systemd-analyze security --offline=true "$ROOT/lib/systemd/system/$NAME.service" 2>/dev/null \
        | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
fi

# ---------------------------------------------------------------- the technician's checks
step "appliance config check, doctor (as root, as a technician would)"
in_root appliance config check /etc/$NAME/config.toml || fail "the shipped config does not pass config check"
in_root appliance doctor > "$WORK/doctor.txt" 2>&1 || { cat "$WORK/doctor.txt" >&2; fail "appliance doctor failed"; }
grep -q "^OK    camera demo bundle" "$WORK/doctor.txt" || { cat "$WORK/doctor.txt" >&2; fail "doctor did not verify the bundle"; }

# The daemon as systemd runs it: the unit's ExecStartPre=+ and Environment=, /run/anomaly-appliance
# made for it (RuntimeDirectory=), its own user, the shipped config. SIGTERM after N results.
UNIT_FILE="$ROOT/lib/systemd/system/$NAME.service"
run_daemon() {  # $1: inspections the audit must hold before the stop
    in_root install -d -o "$NAME" -g "$NAME" -m 0750 /run/$NAME   # RuntimeDirectory=
    sed -n 's/^ExecStartPre=+//p' "$UNIT_FILE" | while IFS= read -r cmd; do
        in_root sh -c "$cmd" || fail "ExecStartPre=+$cmd failed"
    done
    local env; env=$(sed -n 's/^Environment=//p' "$UNIT_FILE")
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin LANG=C.UTF-8 HOME=/var/lib/$NAME $env \
        setpriv --reuid="$NAME" --regid="$NAME" --init-groups -- \
        appliance run --config /etc/$NAME/config.toml > "$WORK/daemon.log" 2>&1 &
    DAEMON_PID=$!
    local deadline=$((SECONDS + 300)) n=0
    while [ "$n" -lt "$1" ]; do
        kill -0 "$DAEMON_PID" 2>/dev/null || { tail -30 "$WORK/daemon.log" >&2; fail "the daemon exited early"; }
        [ $SECONDS -lt $deadline ] || { tail -30 "$WORK/daemon.log" >&2; fail "fewer than $1 inspections in 300 s"; }
        sleep 1
        n=$(audit_sql "SELECT count(*) FROM inspections" 2>/dev/null || echo 0)
    done
    kill -TERM "$DAEMON_PID"
    local rc=0; wait "$DAEMON_PID" || rc=$?
    DAEMON_PID=""
    [ "$rc" = 0 ] || { tail -30 "$WORK/daemon.log" >&2; fail "the daemon exited with $rc on SIGTERM"; }
}
step "running the daemon as $NAME on the shipped config (demo replay camera)"
T0=$SECONDS
run_daemon 3
FIRST_RUN_S=$((SECONDS - T0))
ROWS1=$(audit_sql "SELECT count(*) FROM inspections")
ERRORS=$(audit_sql "SELECT count(*) FROM inspections WHERE verdict = 'error'")
[ "$ERRORS" = 0 ] || fail "$ERRORS inspections ended in error: $(audit_sql "SELECT error FROM inspections WHERE verdict='error'")"
[ "$(audit_sql "SELECT count(*) FROM events WHERE kind = 'start' AND detail = 'appliance ${V1//\~/}'")" = 1 ] \
    || fail "no start event for ${V1} in the audit"
in_root appliance audit --limit 3 > "$WORK/audit.txt" || fail "appliance audit failed"
[ "$(in_root stat -c %U /var/lib/$NAME/audit.db)" = "$NAME" ] || fail "audit.db is not owned by $NAME"

# ---------------------------------------------------------------- upgrade
echo "# changed by the technician" >> "$ROOT/etc/$NAME/config.toml"
CONF_SUM=$(md5sum < "$ROOT/etc/$NAME/config.toml")
step "upgrading to $(basename "$DEB2")"
T0=$(date +%s%N)
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "/tmp/$(basename "$DEB2")" > "$WORK/upgrade.log" 2>&1 \
    || { tail -30 "$WORK/upgrade.log" >&2; fail "upgrade to $(basename "$DEB2") failed"; }
UPGRADE_MS=$((($(date +%s%N) - T0) / 1000000))
OUT=$(in_root appliance --version)
[ "$OUT" = "anomaly-appliance ${V2//\~/}" ] || fail "after the upgrade appliance --version says '$OUT', expected $V2"
[ "$(md5sum < "$ROOT/etc/$NAME/config.toml")" = "$CONF_SUM" ] || fail "the upgrade changed the technician's config"
[ "$(in_root stat -c %U:%G:%a /etc/$NAME/config.toml)" = "root:$NAME:640" ] || fail "the upgrade reset the config's mode"
[ "$(audit_sql "SELECT count(*) FROM inspections")" = "$ROWS1" ] || fail "the upgrade changed the audit database"
run_daemon $((ROWS1 + 2))
[ "$(audit_sql "SELECT detail FROM events WHERE kind = 'start' ORDER BY rowid DESC LIMIT 1")" = "appliance ${V2//\~/}" ] \
    || fail "the audit has no start event for ${V2} after the upgrade"

# ---------------------------------------------------------------- remove, then purge
step "remove (state kept), then purge (state and user gone)"
in_root env DEBIAN_FRONTEND=noninteractive apt-get remove -y -q "$NAME" > "$WORK/remove.log" 2>&1 || fail "apt-get remove failed"
in_root test -f /var/lib/$NAME/audit.db || fail "remove deleted the audit database"
in_root test ! -e /opt/$NAME || fail "remove left /opt/$NAME"
in_root test ! -e /usr/bin/appliance || fail "remove left /usr/bin/appliance"
in_root getent passwd "$NAME" >/dev/null || fail "remove deleted the user (only purge should)"
in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "$NAME" > "$WORK/purge.log" 2>&1 || fail "apt-get purge failed"
for path in /var/lib/$NAME /var/cache/$NAME /etc/$NAME /opt/$NAME /usr/share/$NAME; do
    in_root test ! -e "$path" || fail "purge left $path"
done
! in_root getent passwd "$NAME" >/dev/null || fail "purge left the user $NAME"
! in_root getent group "$NAME" >/dev/null || fail "purge left the group $NAME"
! in_root dpkg-statoverride --list "/etc/$NAME/config.toml" >/dev/null || fail "purge left the stat override"

SIZE=$(stat -c %s "$DEB")
echo "test-in-chroot: PASS"
echo "  package:   $(basename "$DEB"): $((SIZE / 1048576)) MiB, installed $(dpkg-deb -f "$DEB" Installed-Size | awk '{printf "%d", $1/1024}') MiB"
echo "  install:   $((INSTALL_MS / 1000)).$((INSTALL_MS % 1000 / 100)) s (apt-get install with its dependencies; .debs from $CACHE/apt-archives after the first run)"
echo "  upgrade:   $((UPGRADE_MS / 1000)).$((UPGRADE_MS % 1000 / 100)) s (apt-get install of the second package over the first)"
echo "  daemon:    $ROWS1 inspections in the first run ($FIRST_RUN_S s from start to stop, cold caches)"
echo "  exposure:  ${EXPOSURE:-n/a} (systemd-analyze security --offline)"
