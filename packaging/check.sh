#!/usr/bin/env bash
# Checks the packages in dist/ (`make package-check`; .ci/run after `make package`):
#   1. the unit: systemd-analyze verify, and its exposure score (security --offline);
#   2. lintian and rpmlint, clean (overrides/filters only with a reason, in packaging/);
#   3. the .deb installed into a scratch root with dpkg, maintainer scripts included; the
#      .rpm into another with rpm, its scriptlets run by hand against that root;
#   4. in each root: the layout, the system user, the enabled unit, then the INSTALLED venv
#      runs `--version`, `validate` and `plugins` on the installed default config, and the
#      installed service runs every packaged spec with the packaged plugins, each to a result;
#   5. removal (dpkg --purge; rpm -e) leaves nothing of the package behind.
#
# Why scratch roots work this way (see README "Packages"):
# - A scratch root has no /bin/sh, no python3.11 and no users. dpkg runs maintainer scripts
#   chrooted into --root unless told --force-script-chrootless: then they run on this host
#   with DPKG_ROOT set, and ours prefix every path with it (systemd-sysusers --root, and
#   deb-systemd-helper honours DPKG_ROOT). --force-depends: python3.11 etc. are installed on
#   this host, not in the empty root's dpkg database.
# - rpm always runs scriptlets chrooted into --root (there is no chrootless mode), which fails
#   without a shell there; so the .rpm goes in with --noscripts and --nodeps (same reason as
#   above), and its scriptlets, read back from the package with `rpm -qp --qf`, are run here
#   with AR_ROOT set to the scratch root, with the arguments rpm would give them.
# - The installed venv's interpreter is a symlink to /usr/bin/python3.11, which this host has,
#   so ROOT/opt/assessment-runtime/venv/bin/python3 runs the installed code as it is; paths
#   in the default config are rewritten to point into the scratch root.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEB=$(ls dist/assessment-runtime_*.deb)
RPM=$(ls dist/assessment-runtime-*.rpm)
WORK=$(mktemp -d /tmp/ar-package-check.XXXXXX)
chmod 0755 "$WORK"   # the unprivileged plugin user must reach the plugins inside it
trap 'rm -rf "$WORK"' EXIT
VENV_REL=opt/assessment-runtime/venv

quietly() {  # run a command, show its output without known noise, fail when it fails
    local rc=0
    "$@" > "$WORK/cmd.log" 2>&1 || rc=$?
    grep -v -e "^(Reading database" -e "^Selecting previously" -e "does not exist - using root" \
        -e "use Alien" -e "assuming you know what you are doing" "$WORK/cmd.log" || true
    return "$rc"
}

echo "== unit: exposure (systemd-analyze security --offline)"
# fails when the exposure rises above 3.2 (what it is): a regression in the hardening
systemd-analyze security --offline=yes --threshold=32 packaging/systemd/assessment-runtime.service > "$WORK/security.txt" \
    || { cat "$WORK/security.txt" >&2; echo "exposure above 3.2" >&2; exit 1; }
tail -1 "$WORK/security.txt"

echo "== lintian"
out=$(lintian --fail-on error,warning,info --info --display-info "$DEB" 2>&1) \
    || { echo "$out" >&2; echo "lintian is not clean" >&2; exit 1; }
echo "$out" | grep -v "running with root privileges" || true
echo "lintian: clean"

echo "== rpmlint"
out=$(rpmlint -c packaging/rpmlint.toml "$RPM" 2>&1) || { echo "$out" >&2; exit 1; }
echo "$out" | tail -1
case "$out" in *" 0 errors, 0 warnings"*) ;; *) echo "$out" >&2; exit 1 ;; esac

# -- what both roots must look like once installed ----------------------------------------
check_root() {  # ROOT KIND
    local root=$1 kind=$2 py="$1/$VENV_REL/bin/python3"
    test "$(readlink "$root/$VENV_REL/bin/python3.11")" = /usr/bin/python3.11
    test -x "$root/$VENV_REL/lib/python3.11/site-packages/runner/ar-exec"
    test "$(stat -c %a "$root/$VENV_REL/lib/python3.11/site-packages/runner/ar-exec")" = 755
    # no file or folder of the reference plugins is writable by group/others; all root's
    local bad
    bad=$(find "$root/usr/lib/assessment-runtime" \( -perm /022 -o ! -user root \) -print)
    [ -z "$bad" ] || { echo "plugins not 0755/0644 root: $bad" >&2; return 1; }
    grep -q '^assessment-runtime:' "$root/etc/passwd" || { echo "$kind: no system user" >&2; return 1; }
    test -L "$root/etc/systemd/system/multi-user.target.wants/assessment-runtime.service" \
        || { echo "$kind: unit not enabled" >&2; return 1; }
    test -n "$(find "$root/$VENV_REL/lib" -name '*.pyc' -print -quit)" \
        || { echo "$kind: postinst made no bytecode" >&2; return 1; }
    # the installed unit, its ExecStart pointed into the scratch root (verify checks that it
    # is an executable file)
    local unit=$root/lib/systemd/system/assessment-runtime.service
    [ -f "$unit" ] || unit=$root/usr/lib/systemd/system/assessment-runtime.service
    # byte-identical to the unit that tests/test_systemd.py runs under a real systemd (the .rpm
    # cannot be run under systemd here: no RHEL root can be made; README "Packages")
    cmp -s "$unit" "$REPO/packaging/systemd/assessment-runtime.service" \
        || { echo "$kind: the installed unit differs from packaging/systemd/assessment-runtime.service" >&2; return 1; }
    sed "s#/opt/assessment-runtime#$root/opt/assessment-runtime#g" "$unit" > "$WORK/assessment-runtime.service"
    systemd-analyze verify "$WORK/assessment-runtime.service" || { echo "$kind: systemd-analyze verify failed" >&2; return 1; }
    echo "-- $kind: systemd-analyze verify: ok"
    local link=$root/usr/bin/assessment-runtime
    case "$(readlink "$link")" in
        /opt/assessment-runtime/venv/bin/assessment-runtime | ../../opt/assessment-runtime/venv/bin/assessment-runtime) ;;
        *) echo "$kind: bad /usr/bin/assessment-runtime -> $(readlink "$link")" >&2; return 1 ;;
    esac

    # the installed CLI, with the installed interpreter, on the installed default config
    local cfg=$WORK/$kind-config.toml state=$WORK/$kind-state
    sed -e "s#\"/etc/assessment-runtime#\"$root/etc/assessment-runtime#g" \
        -e "s#\"/usr/lib/assessment-runtime#\"$root/usr/lib/assessment-runtime#g" \
        -e "s#\"/var/lib/assessment-runtime#\"$state#g" \
        -e "s#\"/run/assessment-runtime#\"$state/run#g" \
        -e "s#^run_as_user = .*#run_as_user = \"nobody\"   \# the package's user exists in the scratch root only#" \
        "$root/etc/assessment-runtime/config.toml" > "$cfg"
    local cli=("$py" "$root/$VENV_REL/bin/assessment-runtime")
    # as under systemd: no source tree in the working folder or on sys.path (PYTHONSAFEPATH)
    cd "$WORK"
    export PYTHONSAFEPATH=1
    echo "-- $kind: $("${cli[@]}" --version)"
    "${cli[@]}" validate --config "$cfg"
    "${cli[@]}" plugins --config "$cfg" | tee "$WORK/$kind-plugins.txt"
    if grep -q "error:" "$WORK/$kind-plugins.txt"; then echo "$kind: a packaged plugin is refused" >&2; return 1; fi
    "$py" -c 'import os, sys, runner.sandbox as s; assert s.HELPER.startswith(sys.argv[1]) and os.access(s.HELPER, os.X_OK), s.HELPER; print("ar-exec:", s.HELPER)' "$root/"
    # a fresh install reports real findings within a minute: the installed service runs every
    # packaged spec with the packaged plugins, and each gives a result (satisfied or not)
    local specs
    specs=$(find "$root/etc/assessment-runtime/jobs.d" -name '*.json' | wc -l)
    "${cli[@]}" run --config "$cfg" > "$WORK/$kind-service.log" 2>&1 &
    local pid=$! n=0
    while [ "$n" -lt 600 ]; do
        if [ -f "$state/results.jsonl" ] && [ "$(wc -l < "$state/results.jsonl")" -ge "$specs" ]; then break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1; n=$((n + 1))
    done
    kill -TERM "$pid" 2>/dev/null || true
    local rc=0
    wait "$pid" || rc=$?
    "$py" - "$state/results.jsonl" "$rc" "$WORK/$kind-service.log" "$specs" <<'PY'
import json, sys
path, rc, log, specs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
try:
    results = [json.loads(line) for line in open(path)]
except FileNotFoundError:
    results = []
jobs = {r["job_uuid"] for r in results}
ok = rc == 0 and len(jobs) >= specs and all(r["status"] in ("satisfied", "not-satisfied") for r in results)
for r in results:
    print(f"   result: {r['title']}: {r['status']} {r.get('reason') or ''}")
if not ok:
    print(f"service exit code {rc}, {len(results)} results; log:\n" + open(log).read(), file=sys.stderr)
    sys.exit(1)
PY
    cd "$REPO"
}

# -- .deb -------------------------------------------------------------------------------
echo "== deb: install into a scratch root (dpkg --root, chrootless maintainer scripts)"
D=$WORK/deb-root
mkdir -p "$D/var/lib/dpkg/info" "$D/var/lib/dpkg/updates" "$D/var/lib/dpkg/triggers"
chmod 0755 "$D"
: > "$D/var/lib/dpkg/status"
DPKG=(dpkg --root="$D" --force-script-chrootless --force-depends --no-triggers)
quietly "${DPKG[@]}" --install "$DEB"
# (captured first: `cmd | grep -q` fails under pipefail when grep stops reading early)
st=$(dpkg-query --admindir="$D/var/lib/dpkg" -W -f='${Status}' assessment-runtime)
[ "$st" = "install ok installed" ] || { echo "deb: not installed: $st" >&2; exit 1; }
conf=$(dpkg-query --admindir="$D/var/lib/dpkg" -W -f='${Conffiles}' assessment-runtime)
case "$conf" in *" /etc/assessment-runtime/config.toml "*) ;; *) echo "deb: config.toml is not a conffile" >&2; exit 1 ;; esac
check_root "$D" deb
echo "-- deb: purge"
quietly "${DPKG[@]}" --purge assessment-runtime
left=$(cd "$D" && find opt/assessment-runtime usr/lib/assessment-runtime etc/assessment-runtime var/lib/assessment-runtime \
    etc/systemd/system/multi-user.target.wants/assessment-runtime.service 2>/dev/null || true)
[ -z "$left" ] || { echo "deb: left behind after purge:" >&2; echo "$left" >&2; exit 1; }

# -- .rpm -------------------------------------------------------------------------------
echo "== rpm: install into a scratch root (rpm --root --noscripts --nodeps; scriptlets run here)"
R=$WORK/rpm-root
mkdir -p "$R"
chmod 0755 "$R"
rpm --root "$R" --initdb
scriptlet() {  # TAG ARG: run the package's own scriptlet against the scratch root
    rpm -qp --qf "%{$1}" "$RPM" > "$WORK/$1.sh"
    AR_ROOT="$R" sh "$WORK/$1.sh" "$2"
}
scriptlet PREIN 1
quietly rpm --root "$R" --install --noscripts --nodeps "$RPM"
scriptlet POSTIN 1
rpm --root "$R" -q assessment-runtime
conf=$(rpm --root "$R" -qc assessment-runtime)
case "$conf" in *"/etc/assessment-runtime/config.toml"*) ;; *) echo "rpm: config.toml is not a %config file" >&2; exit 1 ;; esac
check_root "$R" rpm
echo "-- rpm: erase"
scriptlet PREUN 0
quietly rpm --root "$R" --erase --noscripts --nodeps assessment-runtime
scriptlet POSTUN 0
left=$(cd "$R" && find opt/assessment-runtime usr/lib/assessment-runtime etc/systemd/system/multi-user.target.wants/assessment-runtime.service 2>/dev/null || true)
[ -z "$left" ] || { echo "rpm: left behind after erase:" >&2; echo "$left" >&2; exit 1; }
echo "== packages: all checks passed"
