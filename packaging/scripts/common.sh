# The part shared by the maintainer scripts of the .deb and the .rpm: packaging/build.sh puts
# it in place of the @COMMON@ line of each script (they source nothing at run time).
#
# ROOT is the root of the system being changed: empty on a normal install. dpkg sets DPKG_ROOT
# when it runs the scripts outside a chroot (`dpkg --root DIR --force-script-chrootless`, as CI
# does into a scratch root that has no shell of its own); AR_ROOT does the same by hand (CI runs
# the .rpm's scripts that way). Every path below is prefixed with it, and nothing that needs a
# running systemd happens unless ROOT is empty and systemd is PID 1 (not in chroots, containers
# without systemd, or image builds).
ROOT="${DPKG_ROOT:-${AR_ROOT:-}}"
UNIT=assessment-runtime.service
VENV="$ROOT/opt/assessment-runtime/venv"

systemd_running() {
    [ -z "$ROOT" ] && [ -d /run/systemd/system ]
}

create_user() {
    if [ -z "$ROOT" ] && getent passwd assessment-runtime >/dev/null 2>&1; then
        return 0
    fi
    # systemd-sysusers creates only what is missing, also in a root that is not ours (--root)
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers --root="${ROOT:-/}" "$ROOT/usr/lib/sysusers.d/assessment-runtime.conf" && return 0
    fi
    if command -v useradd >/dev/null 2>&1; then
        set -- --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin \
            --comment "assessment-runtime plugins"
        if [ -n "$ROOT" ]; then set -- --root "$ROOT" "$@"; fi
        rc=0
        useradd "$@" assessment-runtime || rc=$?
        # 9: the user exists already
        if [ "$rc" -eq 0 ] || [ "$rc" -eq 9 ]; then return 0; fi
    fi
    echo "assessment-runtime: could not create the system user assessment-runtime" >&2
    return 1
}

compile_bytecode() {
    # .pyc files are made here, not shipped: they match the interpreter that is installed
    if [ -x "$VENV/bin/python3" ]; then
        "$VENV/bin/python3" -m compileall -q -j 0 --invalidation-mode checked-hash -s "${ROOT:-/}" -p / \
            "$VENV/lib" >/dev/null 2>&1 || true
    fi
}

remove_bytecode() {
    if [ -d "$VENV" ]; then
        find "$VENV" -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
    fi
}
