#!/usr/bin/env bash
# Build anomaly-appliance_<version>_amd64.deb: a self-contained venv at /opt/anomaly-appliance
# (the project wheel, every runtime dependency and systemd-python, nothing fetched at install
# time), a default PaDiM bundle fitted on the bundled sample, the hardened systemd unit, a
# commented config (conffile) and the maintainer scripts.
#
#   packaging/build-deb.sh [--out DIR] [--version VERSION] [--compression xz|zstd]
#                          [--constraints FILE] [--keep-work]
#
# --version builds the package (and appliance.__version__) at another version than pyproject's;
# --compression zstd builds in seconds instead of minutes (a 25 % larger file, same contents;
# Debian 12's dpkg reads both); --constraints pins the dependencies (a pip constraints file).
#
# How the venv gets its final path without touching the build host's /opt: it is created with
# the system python (/usr/bin/python3, the same 3.11 a Debian 12 target has) directly in the
# staging tree at <stage>/opt/anomaly-appliance, the packages are installed without byte-code,
# and then the only files that name the staging path are rewritten: the console scripts'
# shebangs, bin/activate* and pyvenv.cfg. The build fails if any other file still names it.
# Byte-code is compiled afterwards with the final path recorded in it (compileall -s/-p),
# hash-checked so it stays valid whatever mtimes dpkg gives the sources. bin/python3 stays a
# symlink to /usr/bin/python3: the package Depends on python3 (>= 3.11), python3 (<< 3.12).
#
# Needs on the build host: python3 3.11 with python3-venv, dpkg-deb, libsystemd-dev, pkg-config
# and gcc (systemd-python is built from source), binutils (readelf, for the dependency scan),
# and the package index that pip is configured with. No root needed.
set -euo pipefail

PACKAGE=anomaly-appliance
MAINTAINER="${DEBFULLNAME:-Anomaly Appliance Maintainers} <${DEBEMAIL:-maintainers@example.com}>"
PREFIX=/opt/anomaly-appliance
PYTHON=/usr/bin/python3
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$REPO/packaging"
OUT="$REPO/dist"
VERSION=""
CONSTRAINTS=""
COMPRESSION=xz
KEEP=0

# Progress and tool output go to stderr; stdout carries only the path of the built package.
exec 3>&1 1>&2
die() { echo "build-deb: error: $*" >&2; exit 1; }
step() { echo "build-deb: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --version) VERSION=$2; shift 2 ;;
        --compression) COMPRESSION=$2; shift 2 ;;
        --constraints) CONSTRAINTS=$(realpath "$2"); shift 2 ;;
        --keep-work) KEEP=1; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&3; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- preflight
[ -x "$PYTHON" ] || die "$PYTHON not found: the venv is built with the target's system python"
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$PYVER" = "3.11" ] || die "$PYTHON is $PYVER; the package targets Debian 12's python3.11"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || die "python3-venv is missing (apt-get install python3-venv)"
for tool in dpkg-deb readelf gzip; do
    command -v "$tool" >/dev/null || die "$tool not found (dpkg-dev / binutils / gzip)"
done
pkg-config --exists libsystemd 2>/dev/null || die "libsystemd-dev and pkg-config are needed to build systemd-python"
[ "$(dpkg --print-architecture)" = amd64 ] || die "the wheels and the package are amd64; this host is not"
[ -z "$CONSTRAINTS" ] || [ -f "$CONSTRAINTS" ] || die "constraints file $CONSTRAINTS not found"
case "$COMPRESSION" in xz) ZOPTS=(-Zxz) ;; zstd) ZOPTS=(-Zzstd -z6) ;; *) die "--compression is xz or zstd" ;; esac

PROJECT_VERSION=$(sed -n '0,/^version = "\(.*\)"$/s//\1/p' "$REPO/pyproject.toml")
[ -n "$PROJECT_VERSION" ] || die "no version = \"...\" in pyproject.toml"
VERSION=${VERSION:-$PROJECT_VERSION}
# PEP 440 -> Debian: pre-releases sort before the release (0.2.0rc1 -> 0.2.0~rc1).
DEB_VERSION=$(echo "$VERSION" | sed -E 's/([0-9])(a|b|rc|\.dev)([0-9]+)/\1~\2\3/g')
echo "$DEB_VERSION" | grep -Eq '^[0-9][A-Za-z0-9.+~]*$' || die "version '$VERSION' is not usable as a Debian version"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-deb.XXXXXX")
cleanup() { if [ "$KEEP" = 1 ]; then step "work folder kept: $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
STAGE="$WORK/root"
VENV="$STAGE$PREFIX"
START=$(date +%s)

# ---------------------------------------------------------------- 1. the source, at the requested version
step "copying the source tree ($VERSION)"
mkdir -p "$WORK/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files as they are in the work tree (deleted ones skipped).
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
else
    tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
        --exclude=build --exclude=dist -cf - . | tar -C "$WORK/src" -xf -
fi
if [ "$VERSION" != "$PROJECT_VERSION" ]; then
    sed -i "s/^version = \".*\"$/version = \"$VERSION\"/" "$WORK/src/pyproject.toml"
    sed -i "s/^__version__ = \".*\"$/__version__ = \"$VERSION\"/" "$WORK/src/appliance/__init__.py"
fi

# ---------------------------------------------------------------- 2. the venv at its final path (in the stage)
step "creating the venv with $PYTHON"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
step "building the project wheel"
"${PIP[@]}" wheel -q --no-deps -w "$WORK/wheels" "$WORK/src"
WHEEL=$(ls "$WORK"/wheels/anomaly_appliance-*.whl)
# systemd-python has no binary wheel: build it here, against this python and libsystemd, never
# from pip's cache (a wheel cached by another python carries that python's RUNPATH).
step "building systemd-python from source"
"${PIP[@]}" wheel -q --no-cache-dir --no-deps --no-binary systemd-python --use-pep517 -w "$WORK/wheels" \
    ${CONSTRAINTS:+--constraint "$CONSTRAINTS"} systemd-python
SYSTEMD_WHEEL=$(ls "$WORK"/wheels/systemd_python-*.whl)
step "installing $(basename "$WHEEL") with its runtime dependencies and systemd-python"
"${PIP[@]}" install -q --no-compile ${CONSTRAINTS:+--constraint "$CONSTRAINTS"} "$WHEEL[systemd]" "$SYSTEMD_WHEEL"
"${PIP[@]}" check
"$VENV/bin/python" -I - <<'EOF' || die "the venv is incomplete (a dependency missing from pyproject.toml?)"
import importlib.resources as r, appliance, appliance_models, appliance_kernels, systemd.daemon, systemd.journal
from appliance.daemon import config  # the daemon's whole plug-in registry imports
models = r.files("appliance_models")
assert any(p.name.endswith(".xml") for d in models.iterdir() if d.is_dir() for p in d.iterdir()), "no backbone IR"
EOF
# pip is not needed on the device (dpkg manages the venv), nor are the dependencies' own
# console scripts (OpenVINO's converter, OPC UA clients, ...): bin/ keeps python and appliance.
"${PIP[@]}" uninstall -q -y pip
find "$VENV/bin" -mindepth 1 -maxdepth 1 ! -name 'python*' ! -name appliance -exec rm -f {} +
rmdir "$VENV/include/python3.11" "$VENV/include" 2>/dev/null || true

# ---------------------------------------------------------------- 3. the default bundle and demo images
SITE="$VENV/lib/python3.11/site-packages"
SAMPLE="$SITE/appliance/samples/ball_screw"
SHARE="$STAGE/usr/share/$PACKAGE"
step "fitting the default PaDiM bundle on the bundled sample"
mkdir -p "$SHARE/bundles" "$SHARE/replay/ball_screw"
# Small on purpose (128 px high, 64 channels: a 5 MB scorer state, image AUROC 0.97 on the sample's
# test split). Fitted from the relative path so that the manifest records "ball_screw", not the stage.
(cd "$SAMPLE/.." && PYTHONDONTWRITEBYTECODE=1 NUMBA_CACHE_DIR="$WORK/cache/numba" "$VENV/bin/appliance" fit \
    ball_screw --out "$SHARE/bundles/ball_screw" --scorer padim --size 128 --set n_features=64 \
    --cache-dir "$WORK/cache/openvino" -q) > "$WORK/fit.log" 2>&1 || { cat "$WORK/fit.log" >&2; die "fitting the default bundle failed"; }
grep -h '^bundle\|^fit ' "$WORK/fit.log" | sed 's/^/build-deb:   /' >&2
# Demo frames for the default replay camera: the sample's test images, good and pitted interleaved.
i=0
for f in $(ls "$SAMPLE"/test/good/*.jpg "$SAMPLE"/test/pitting/*.jpg | awk -F/ '{print $NF "\t" $0}' | sort | cut -f2); do
    i=$((i + 1)); cp "$f" "$SHARE/replay/ball_screw/$(printf '%04d' "$i")_$(basename "$(dirname "$f")")_$(basename "$f")"
done
[ "$i" -gt 0 ] || die "no sample test images in $SAMPLE"

# ---------------------------------------------------------------- 4. relocate the venv to its final path
step "relocating the venv to $PREFIX"
for f in "$VENV"/bin/* "$VENV/pyvenv.cfg"; do
    [ -f "$f" ] && [ ! -L "$f" ] && grep -Iq "$STAGE" "$f" && sed -i "s|$STAGE$PREFIX|$PREFIX|g; s|$STAGE||g" "$f"
done
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
LEFT=$(grep -rlI --exclude='*.pyc' -e "$STAGE" "$STAGE" || true)
[ -z "$LEFT" ] || die "files still name the staging path:
$LEFT"
step "compiling byte-code"
"$VENV/bin/python" -m compileall -q -j 0 -f --invalidation-mode checked-hash -s "$STAGE" -p / "$VENV/lib" >/dev/null \
    || die "compileall failed"
if grep -rq --include='*.pyc' -e "$STAGE" "$VENV"; then die "byte-code names the staging path"; fi

# ---------------------------------------------------------------- 5. the rest of the tree
step "laying out the package tree"
install -d "$STAGE/usr/bin" "$STAGE/lib/systemd/system" "$STAGE/etc/$PACKAGE" "$STAGE/usr/share/doc/$PACKAGE" \
    "$STAGE/usr/share/lintian/overrides" "$STAGE/usr/share/man/man1" "$STAGE/DEBIAN"
ln -s "$PREFIX/bin/appliance" "$STAGE/usr/bin/appliance"
install -m 0644 "$REPO/systemd/$PACKAGE.service" "$STAGE/lib/systemd/system/$PACKAGE.service"
install -m 0644 "$HERE/config.toml" "$STAGE/etc/$PACKAGE/config.toml"
install -m 0644 "$HERE/copyright" "$STAGE/usr/share/doc/$PACKAGE/copyright"
for doc in install daemon learning mqtt modbus-register-map opcua; do
    install -m 0644 "$REPO/docs/$doc.md" "$STAGE/usr/share/doc/$PACKAGE/$doc.md"
done
install -m 0644 "$HERE/lintian-overrides" "$STAGE/usr/share/lintian/overrides/$PACKAGE"
gzip -9n < "$HERE/appliance.1" > "$STAGE/usr/share/man/man1/appliance.1.gz"
DATE=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}")
printf '%s (%s) stable; urgency=medium\n\n  * Release %s, built from %s.\n\n -- %s  %s\n' \
    "$PACKAGE" "$DEB_VERSION" "$VERSION" "$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo source)" \
    "$MAINTAINER" "$DATE" | gzip -9n > "$STAGE/usr/share/doc/$PACKAGE/changelog.gz"
for script in postinst prerm postrm; do
    install -m 0755 "$HERE/$script" "$STAGE/DEBIAN/$script"
done
echo "/etc/$PACKAGE/config.toml" > "$STAGE/DEBIAN/conffiles"
chmod -R u+rwX,go+rX,go-w "$STAGE"

# ---------------------------------------------------------------- 6. shared-library dependencies
# Every ELF object's NEEDED libraries that the venv does not carry itself come from the system:
# map each to its Debian package on this (Debian 12) host, and require the newest glibc symbol used.
step "scanning shared-library dependencies"
"$PYTHON" - "$STAGE" > "$WORK/elves" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(root, name)
        if not os.path.islink(path):
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    print(path)
PY
: > "$WORK/needed"; : > "$WORK/glibc"
while IFS= read -r elf; do
    readelf -d "$elf" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' >> "$WORK/needed" || true
    readelf -V "$elf" 2>/dev/null | sed -n 's/.*Name: GLIBC_\([0-9.]*\).*/\1/p' >> "$WORK/glibc" || true
done < "$WORK/elves"
find "$STAGE" \( -name '*.so' -o -name '*.so.*' \) -printf '%f\n' | sort -u > "$WORK/carried"
# Loaded only for OpenVINO's GPU plugin, never on the CPU path: a suggestion, not a dependency.
OPTIONAL_LIBS="libOpenCL.so.1"
SYSLIBS=$(sort -u "$WORK/needed" | grep -vxF -f "$WORK/carried" | grep -vxF "$OPTIONAL_LIBS" || true)
DEPS=""
ldconfig -p > "$WORK/ldconfig"
for lib in $SYSLIBS; do
    # By soname (ldconfig), or by file name where an object names one (numba's omppool: libgomp.so.1.0.0).
    path=$(awk -v l="$lib" '$1 == l && /x86-64/ && !found {print $NF; found = 1}' "$WORK/ldconfig")
    for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
        [ -n "$path" ] || [ ! -e "$dir/$lib" ] || path="$dir/$lib"
    done
    [ -n "$path" ] || die "$lib (needed by the venv) is not on this host; cannot tell which package provides it"
    # Debian 12 packages name /lib or /usr/lib (merged /usr): ask dpkg for both spellings.
    pkg=$( { dpkg -S "$path" || dpkg -S "$(realpath "$path")"; } 2>/dev/null | awk -F: 'NR == 1 {print $1}') || true
    [ -n "$pkg" ] || die "no Debian package owns $path ($lib)"
    DEPS="$DEPS $pkg"
done
GLIBC=$(sort -V -u "$WORK/glibc" | tail -1)
SHLIB_DEPENDS=$(for p in $DEPS; do echo "$p"; done | sort -u | grep -vxE "libc6|libsystemd0" | sed 's/$/,/' | tr '\n' ' ')
step "system libraries: ${SYSLIBS//$'\n'/ } -> ${SHLIB_DEPENDS}libc6 (>= $GLIBC)"

# ---------------------------------------------------------------- 7. control, md5sums, build
INSTALLED_KB=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<EOF
Package: $PACKAGE
Version: $DEB_VERSION
Architecture: amd64
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_KB
Depends: python3 (>= 3.11), python3 (<< 3.12), libsystemd0, adduser, ${SHLIB_DEPENDS}libc6 (>= $GLIBC)
Suggests: ocl-icd-libopencl1
Section: misc
Priority: optional
Homepage: https://example.invalid/anomaly-appliance
Description: visual anomaly detection appliance for production lines
 Inspects camera frames with an OpenVINO backbone and PatchCore or PaDiM
 scorers, reports every result (audit database, overlays, live page and
 network outputs) and runs as a hardened systemd service.
 .
 Everything it needs is in a private Python environment under
 $PREFIX; a demo model fitted on the bundled ball-screw
 sample lets the service start at once.
EOF
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$STAGE/DEBIAN/md5sums" "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/conffiles"

DEB="$OUT/${PACKAGE}_${DEB_VERSION}_amd64.deb"
step "building $DEB ($COMPRESSION)"
dpkg-deb --root-owner-group "${ZOPTS[@]}" --build "$STAGE" "$DEB" >/dev/null
step "done in $(( $(date +%s) - START )) s: $DEB ($(du -h "$DEB" | cut -f1), installed $((INSTALLED_KB / 1024)) MiB)"
echo "$DEB" >&3
