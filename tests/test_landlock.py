"""Confinement and capabilities of plugin runs (SPEC §6), with real processes, as root.

Each test runs a /bin/sh "plugin" three ways: ar-exec started directly, ar-exec through
runner.sandbox.Sandbox, and Sandbox's fork path (no helper, Landlock through ctypes). The
plugin runs as a throwaway uid that no database knows, in a scratch folder it owns (0700),
as the supervisor sets them up. Where a denial is asserted, file modes (or the uid) would
allow the same thing, so it is the confinement that denies it.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from runner import landlock
from runner.landlock import Confine
from runner.sandbox import HELPER, Sandbox, SpawnError
from runner.wire import RunLimits

UID = GID = 61999  # no passwd or group entry (checked below)
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
MODES = ["ar-exec", "sandbox", "fork"]
ABI = landlock.abi()

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids and grant capabilities"),
]


def need_abi(version: int, what: str) -> None:
    if ABI < version:
        pytest.skip(f"{what} needs Landlock ABI {version}; this kernel has {ABI}")


def need_helper(mode: str) -> None:
    if mode != "fork" and not os.access(HELPER, os.X_OK):
        pytest.skip("runner/ar-exec is not built (make venv builds it)")


@pytest.fixture(scope="module", autouse=True)
def unknown_ids():
    import grp
    import pwd

    for lookup, ident in ((pwd.getpwuid, UID), (grp.getgrgid, GID)):
        try:
            lookup(ident)
        except KeyError:
            continue
        pytest.skip(f"id {ident} is known to this host's databases; the tests need a throwaway one")


@pytest.fixture
def job(area: Path) -> dict[str, Path]:
    """A scratch folder owned by the run's uid, mode 0700, and a sibling just as writable by
    that uid (as another job's scratch would be to its own uid)."""
    folders = {}
    for name in ("scratch", "sibling", "extra"):
        path = area / "state" / name
        path.mkdir(parents=True)
        os.chown(path, UID, GID)
        path.chmod(0o700)
        folders[name] = path
    (area / "state").chmod(0o755)
    extra_file = area / "state" / "extra.log"
    extra_file.write_text("")
    os.chown(extra_file, UID, GID)
    folders["extra_file"] = extra_file
    return folders


def run(mode: str, script: str, cwd: Path, *, confine: Confine | None = Confine(), caps: tuple[int, ...] = (),
        network: bool | None = None, uid: int | None = UID) -> tuple[int, str, str]:
    """Run `sh -c script`; returns (exit code or -signal, stdout, stderr)."""
    need_helper(mode)
    argv = ["/bin/sh", "-c", script]
    if mode == "ar-exec":
        wants_network = confine.network if network is None and confine else bool(network)
        arg = "-" if confine is None else landlock.helper_arg(confine.write_paths, wants_network)
        ids = [str(uid), str(GID)] if uid is not None else ["-1", "-1"]
        proc = subprocess.run(
            [HELPER, *ids, "-1", "-1", "-1", "-1", str(os.getpid()), "-", str(cwd), arg,
             ",".join(map(str, caps)) or "-", "--", *argv],
            env=ENV, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    sandbox = Sandbox(RunLimits(None, None, None, None, 1 << 20), (uid, GID) if uid is not None else None, ENV,
                      helper=HELPER if mode == "sandbox" else None, confine=confine, capabilities=caps)
    assert (sandbox.helper is None) == (mode == "fork")
    stdin = os.open(os.devnull, os.O_RDONLY)
    try:
        pid, pidfd, out, err = sandbox.spawn(argv, str(cwd), stdin, {}, network=network)
    finally:
        os.close(stdin)
    chunks = {out: b"", err: b""}
    open_fds = [out, err]
    deadline = time.monotonic() + 20
    while open_fds and time.monotonic() < deadline:
        for fd in select.select(open_fds, [], [], 0.5)[0]:
            data = os.read(fd, 65536)
            chunks[fd] += data
            if not data:
                open_fds.remove(fd)
    _, status = os.waitpid(pid, 0)
    for fd in (out, err, pidfd):
        os.close(fd)
    code = os.waitstatus_to_exitcode(status)
    return code, chunks[out].decode(), chunks[err].decode()


def lines(out: str) -> list[str]:
    return out.splitlines()


@pytest.mark.parametrize("mode", MODES)
def test_reads_anywhere_writes_only_in_scratch_and_devices(mode, job):
    need_abi(1, "confinement")
    name = f"ar-landlock-{uuid.uuid4().hex}"
    others = ["/tmp", "/var/tmp", str(job["sibling"])]
    script = f"""
        head -c 5 /etc/passwd; echo
        for d in {' '.join(others)}; do
            if touch $d/{name} 2>/dev/null; then echo "wrote $d"; else echo "refused $d"; fi
        done
        echo data > file && cat file && mkdir -p sub/deep && mv file sub/deep/moved && rm -r sub && echo scratch-ok
        echo x >/dev/null && echo devnull-ok
        head -c 3 /dev/zero | wc -c
        echo x 2>/dev/null >/dev/full || echo full-refused-by-device
        ls -a
    """
    code, out, err = run(mode, script, job["scratch"])
    assert code == 0, err
    assert lines(out) == ["root:", "refused /tmp", "refused /var/tmp", f"refused {job['sibling']}", "data",
                          "scratch-ok", "devnull-ok", "3", "full-refused-by-device", ".", ".."]
    assert err == ""
    # reopening its own pipes (as root here: a pipe of the runner's has mode 0600 for any other uid)
    code, out, err = run(mode, "echo to-stderr >/dev/stderr", job["scratch"], uid=None)
    assert (code, err) == (0, "to-stderr\n")
    for d in others:
        assert not os.path.exists(os.path.join(d, name))
    # the same plugin unconfined: file modes alone let it write in /tmp and in the sibling
    code, out, err = run(mode, script, job["scratch"], confine=None)
    assert f"wrote {job['sibling']}" in lines(out) and "wrote /tmp" in lines(out), err
    for d in others:
        if os.path.exists(os.path.join(d, name)):
            os.unlink(os.path.join(d, name))


@pytest.mark.parametrize("mode", MODES)
def test_write_paths_folder_and_file(mode, job):
    need_abi(1, "confinement")
    confine = Confine(write_paths=(str(job["extra"]), str(job["extra_file"])))
    script = f"""
        echo a > {job['extra']}/made && echo folder-ok
        echo b >> {job['extra_file']} && echo file-ok
        touch {job['extra_file']}.new 2>/dev/null || echo beside-file-refused
        touch {job['sibling']}/x 2>/dev/null || echo sibling-refused
    """
    code, out, err = run(mode, script, job["scratch"], confine=confine)
    assert code == 0, err
    assert lines(out) == ["folder-ok", "file-ok", "beside-file-refused", "sibling-refused"]
    assert job["extra_file"].read_text() == "b\n"


@pytest.mark.parametrize("mode", MODES)
def test_missing_write_path_is_an_error_naming_it(mode, job):
    need_abi(1, "confinement")
    missing = str(job["extra"] / "not-there")
    confine = Confine(write_paths=(missing,))
    expected = f"landlock write path {missing}: No such file or directory"
    if mode == "fork":
        with pytest.raises(SpawnError) as e:
            run(mode, "echo ran", job["scratch"], confine=confine)
        assert str(e.value) == expected
    else:
        code, out, err = run(mode, "echo ran", job["scratch"], confine=confine)
        assert (code, out, err) == (127, "", f"ar-exec: {expected}\n")


@pytest.mark.parametrize("mode", MODES)
def test_tcp_only_with_network(mode, job):
    need_abi(4, "TCP restriction")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        script = f"""
            /usr/bin/python3 -c '
import socket
for what, do in (("connect", lambda s: s.connect(("127.0.0.1", {port}))), ("bind", lambda s: s.bind(("127.0.0.1", 0)))):
    with socket.socket() as s:
        try:
            do(s)
            print(what, "ok")
        except OSError as e:
            print(what, e.strerror)
'
        """
        code, out, err = run(mode, script, job["scratch"])
        assert (code, lines(out)) == (0, ["connect Permission denied", "bind Permission denied"]), err
        code, out, err = run(mode, script, job["scratch"], network=True)  # plugin.toml network = true
        assert (code, lines(out)) == (0, ["connect ok", "bind ok"]), err
        code, out, err = run(mode, script, job["scratch"], confine=Confine(network=True))
        assert (code, lines(out)) == (0, ["connect ok", "bind ok"]), err


@pytest.mark.parametrize("mode", MODES)
def test_signals_stay_inside_the_run(mode, job):
    need_abi(6, "signal scoping")
    # a process of the plugin's own uid outside the run: file modes and uids would allow it
    neighbour = subprocess.Popen(["sleep", "30"], user=UID, group=GID, extra_groups=[], stdin=subprocess.DEVNULL)
    try:
        script = f"""
            kill -0 {neighbour.pid} 2>/dev/null && echo neighbour-signalled || echo neighbour-refused
            sleep 5 & child=$!
            kill $child && echo child-signalled
        """
        code, out, err = run(mode, script, job["scratch"])
        assert (code, lines(out)) == (0, ["neighbour-refused", "child-signalled"]), err
        code, out, err = run(mode, script, job["scratch"], confine=None)
        assert (code, lines(out)) == (0, ["neighbour-signalled", "child-signalled"]), err
        assert neighbour.poll() is None
        # as root (no uid change): its parent, the runner here, is out of reach too
        code, out, err = run(mode, "kill -0 $PPID 2>/dev/null && echo parent-signalled || echo parent-refused",
                             job["scratch"], uid=None)
        assert (code, lines(out)) == (0, ["parent-refused"]), err
    finally:
        neighbour.kill()
        neighbour.wait()


@pytest.mark.parametrize("mode", MODES)
def test_abstract_unix_sockets_stay_inside_the_run(mode, job):
    need_abi(6, "abstract socket scoping")
    name = f"ar-landlock-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("\0" + name)
        server.listen()
        script = f"""
            /usr/bin/python3 -c '
import socket
with socket.socket(socket.AF_UNIX) as s:
    try:
        s.connect("\\0{name}")
        print("outside ok")
    except OSError as e:
        print("outside", e.strerror)
with socket.socket(socket.AF_UNIX) as mine, socket.socket(socket.AF_UNIX) as s:
    mine.bind("\\0{name}-own")
    mine.listen()
    s.connect("\\0{name}-own")
    print("own ok")
'
        """
        code, out, err = run(mode, script, job["scratch"])
        assert (code, lines(out)) == (0, ["outside Operation not permitted", "own ok"]), err


def cap_sets(out: str) -> dict[str, int]:
    return {m[1]: int(m[2], 16) for m in re.finditer(r"^(Cap\w+):\s+([0-9a-f]+)$", out, re.M)}


CAP_SCRIPT = """
    grep ^Cap /proc/self/status
    cat /etc/shadow >/dev/null 2>&1 && echo shadow-read || echo shadow-refused
    touch /etc/ar-landlock-x 2>/dev/null && echo etc-written || echo etc-refused
    id -G
"""


@pytest.mark.parametrize("mode", MODES)
def test_read_only_privilege_with_dac_read_search(mode, job):
    need_abi(1, "confinement")
    code, out, err = run(mode, CAP_SCRIPT, job["scratch"], caps=(2,))  # CAP_DAC_READ_SEARCH
    assert code == 0, err
    assert cap_sets(out) == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 1 << 2)
    assert lines(out)[-3:] == ["shadow-read", "etc-refused", str(GID)]
    assert not os.path.exists("/etc/ar-landlock-x")


@pytest.mark.parametrize("mode", MODES)
def test_no_capabilities_without_a_grant(mode, job):
    code, out, err = run(mode, CAP_SCRIPT, job["scratch"])
    assert code == 0, err
    sets = cap_sets(out)
    del sets["CapBnd"]  # left as it is: nothing can reach it (no uid 0, no_new_privs)
    assert sets == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapAmb"), 0)
    assert lines(out)[-3:] == ["shadow-refused", "etc-refused", str(GID)]


@pytest.mark.parametrize("mode", MODES)
def test_several_capabilities_above_31(mode, job):
    code, out, err = run(mode, "grep ^Cap /proc/self/status", job["scratch"], caps=(13, 37))  # NET_RAW, AUDIT_READ
    assert code == 0, err
    assert cap_sets(out) == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 1 << 13 | 1 << 37)


def test_helper_argument_errors(job):
    need_helper("ar-exec")
    base = [HELPER, str(UID), str(GID), "-1", "-1", "-1", "-1", str(os.getpid()), "-", str(job["scratch"])]
    for confine, caps, message in (("x", "-", "confine: Invalid argument"),
                                   ("n", "-", "confine: Invalid argument"),
                                   ("l", "2,99", "capabilities: Invalid argument"),
                                   ("l", "2,", "capabilities: Invalid argument"),
                                   ("l", "CAP_NET_RAW", "capabilities: Invalid argument")):
        proc = subprocess.run([*base, confine, caps, "--", "/bin/true"], capture_output=True, timeout=10)
        assert (proc.returncode, proc.stderr.decode()) == (127, f"ar-exec: {message}\n")
    proc = subprocess.run([*base, "--", "/bin/true"], capture_output=True, timeout=10)  # the old form
    assert proc.returncode == 127 and proc.stderr.startswith(b"ar-exec: usage: ")


def test_sandbox_precomputes_its_arguments():
    sandbox = Sandbox(RunLimits(None, None, None, None, 1 << 20), None, ENV, confine=Confine(("/var/log/x",)),
                      capabilities=(19, 2))
    assert sandbox.confine_args == ("l:/var/log/x", "ln:/var/log/x")
    assert sandbox.caps_arg == "2,19"
    plain = Sandbox(RunLimits(None, None, None, None, 1 << 20), None, ENV)
    assert (plain.confine_args, plain.caps_arg) == (("-", "-"), "-")
    with pytest.raises(ValueError):
        Sandbox(RunLimits(None, None, None, None, 1 << 20), None, ENV, confine=Confine(("relative",)))
    with pytest.raises(ValueError):
        Sandbox(RunLimits(None, None, None, None, 1 << 20), None, ENV, capabilities=(64,))


def test_abi_matches_the_kernel():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(444, None, 0, 1)
    assert landlock.abi() == max(version, 0)
    assert landlock.abi() is landlock.abi()  # asked once


@pytest.mark.skipif(shutil.which("check_load") is None and not os.path.exists("/usr/lib/nagios/plugins/check_load"),
                    reason="monitoring-plugins are not installed")
@pytest.mark.parametrize("mode", MODES)
def test_monitoring_plugins_run_confined(mode, job):
    need_abi(1, "confinement")
    folder = "/usr/lib/nagios/plugins"
    code, out, err = run(mode, f"{folder}/check_load -w 1000,1000,1000 -c 2000,2000,2000; "
                               f"{folder}/check_disk -w 1% -c 1% -p /; {folder}/check_procs", job["scratch"])
    assert code == 0, out + err
    assert [line.split()[0] for line in lines(out)] == ["LOAD", "DISK", "PROCS"], out
