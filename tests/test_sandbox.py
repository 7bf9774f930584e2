"""The sandbox starts plugins the same way with the ar-exec helper and with the fork fallback."""

from __future__ import annotations

import os
import pwd
import select
import subprocess
import sys
import time

import pytest

from conftest import REPO
from runner.sandbox import HELPER, Sandbox
from runner.wire import RunLimits

PATHS = [pytest.param(HELPER, id="ar-exec"), pytest.param(None, id="fork")]


def run(sandbox: Sandbox, script: str, cwd: str, timeout: float = 10) -> tuple[int, str, str]:
    stdin = os.memfd_create("stdin")
    os.write(stdin, b"hello")
    os.lseek(stdin, 0, os.SEEK_SET)
    pid, pidfd, out, err = sandbox.spawn(["/bin/sh", "-c", script], cwd, stdin, {"EXTRA": "1"})
    os.close(stdin)
    chunks = {out: b"", err: b""}
    deadline = time.monotonic() + timeout
    open_fds = [out, err]
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(open_fds, [], [], 0.5)
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                chunks[fd] += data
            else:
                open_fds.remove(fd)
    _, status = os.waitpid(pid, 0)
    for fd in (out, err, pidfd):
        os.close(fd)
    return status, chunks[out].decode(), chunks[err].decode()


@pytest.fixture
def scratch(area):
    path = area / "scratch"
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    return str(path)


@pytest.mark.parametrize("helper", PATHS)
def test_environment_session_limits_and_fds(helper, scratch):
    if helper is not None and not os.access(helper, os.X_OK):
        pytest.skip("runner/ar-exec is not built (make venv builds it)")
    limits = RunLimits(memory=256 << 20, cpu_time=7, open_files=40, processes=None, output=1 << 20)
    sandbox = Sandbox(limits, None, {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, helper=helper)
    assert (sandbox.helper is not None) == (helper is not None)
    leak_r, leak_w = os.pipe()  # a non-CLOEXEC fd of ours must not reach the plugin
    try:
        status, out, err = run(sandbox, "cat; echo; env | sort; pwd; ulimit -v; ulimit -t; ulimit -n; ulimit -c; "
                                        "umask; ps -o sid= -o pgid= -p $$; ls /proc/self/fd", scratch)
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, err
    lines = out.splitlines()
    assert lines[0] == "hello"
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert {k for k in env if k not in ("PWD", "SHLVL", "_")} == {"PATH", "LANG", "HOME", "EXTRA"}
    assert env["HOME"] == scratch
    rest = [line for line in lines[1:] if "=" not in line]
    assert rest[0] == scratch
    assert rest[1:6] == [str(256 << 10), "7", "40", "0", "0077"]
    sid, pgid = rest[6].split()
    assert sid == pgid  # a new session, leader of its own group
    fds = set(rest[7].split())
    assert fds <= {"0", "1", "2", "3"}  # 3 is ls's own directory handle


@pytest.mark.parametrize("helper", PATHS)
def test_runs_as_the_unprivileged_user_without_groups(helper, scratch):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    if helper is not None and not os.access(helper, os.X_OK):
        pytest.skip("runner/ar-exec is not built")
    nobody = pwd.getpwnam("nobody")
    sandbox = Sandbox(RunLimits(None, None, None, None, 1 << 20), (nobody.pw_uid, nobody.pw_gid),
                      {"PATH": "/usr/bin:/bin"}, helper=helper)
    status, out, err = run(sandbox, "id -u; id -g; id -G; grep NoNewPrivs /proc/self/status", scratch)
    assert os.WEXITSTATUS(status) == 0, err
    uid, gid, groups, nnp = out.splitlines()
    assert (int(uid), int(gid), groups.split()) == (nobody.pw_uid, nobody.pw_gid, [str(nobody.pw_gid)])
    assert nnp.split() == ["NoNewPrivs:", "1"]


def test_helper_failure_is_reported(scratch):
    if not os.access(HELPER, os.X_OK):
        pytest.skip("runner/ar-exec is not built")
    sandbox = Sandbox(RunLimits(None, None, None, None, 1 << 20), None, {}, helper=HELPER)
    status, out, err = run(sandbox, "true", scratch + "/missing")
    assert os.WEXITSTATUS(status) == 127
    assert err.startswith("ar-exec: chdir: No such file or directory")


@pytest.mark.parametrize("helper", PATHS)
def test_a_plugin_is_never_offered_to_ksm(helper, scratch):
    """Runners offer their pages to KSM, and that is inherited across exec: both ways of
    starting a plugin take it back. Run in a child python that opts in first, as the zygote does."""
    if not os.path.exists("/proc/self/ksm_stat"):
        pytest.skip("this kernel has no /proc/PID/ksm_stat (KSM or Linux < 6.4)")
    if helper is not None and not os.access(helper, os.X_OK):
        pytest.skip("runner/ar-exec is not built")
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
sys.path.insert(0, {str(REPO / "tests")!r})
from runner import linux
from runner.sandbox import Sandbox
from runner.wire import RunLimits
from test_sandbox import run
assert linux.set_memory_merge(True)
sandbox = Sandbox(RunLimits(None, None, None, None, 1 << 20), None, {{"PATH": "/usr/bin:/bin"}}, helper={helper!r})
status, out, err = run(sandbox, "grep merge_any /proc/self/ksm_stat", {scratch!r})
print(open("/proc/self/ksm_stat").read().count("ksm_merge_any: yes"), out.strip(), err.strip())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "1 ksm_merge_any: no ", r.stdout
