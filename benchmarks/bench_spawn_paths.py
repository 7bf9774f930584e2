"""Diagnostic: what one plugin start costs through the runner's own spawn path
(runner.sandbox.Sandbox.spawn: os.fork of a Python process, then setsid/dup2/rlimits/
setuid/prctl/chdir in Python, then execve) against os.posix_spawn (vfork-style clone, no
page tables copied), in a process that has imported what a runner imports.

    python benchmarks/bench_spawn_paths.py PLUGIN COUNT SCRATCH   -> one JSON line

Sequential, as fast as it goes; CPU from getrusage (self and reaped children).
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import runner.main  # noqa: E402,F401 - the runner's imports, so the process is runner-sized
from runner.sandbox import PLUGIN_PATH, Sandbox  # noqa: E402
from runner.wire import RunLimits  # noqa: E402

STDIN = b'{"protocol":"assessment/1","run_uuid":"x","job":{},"config":{}}'


def _cpu() -> tuple[float, float]:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _drain(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            import select
            select.select([fd], [], [], 5)
            continue
        if not chunk:
            return bytes(out)
        out += chunk


def _stdin_fd() -> int:
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    os.write(fd, STDIN)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def via_sandbox(plugin: str, count: int, scratch: str, run_as) -> dict:
    limits = RunLimits(memory=512 << 20, cpu_time=60.0, open_files=256, processes=64, output=16 << 20)
    sandbox = Sandbox(limits, run_as, {"PATH": PLUGIN_PATH, "LANG": "C.UTF-8"})
    bad = 0
    s0, c0 = _cpu()
    t0 = time.perf_counter()
    for i in range(count):
        fd = _stdin_fd()
        try:
            pid, pidfd, out_r, err_r = sandbox.spawn([plugin], scratch, fd, {"ASSESSMENT_RUN_UUID": str(i)})
        finally:
            os.close(fd)
        out = _drain(out_r)
        _drain(err_r)
        _, status, _ = os.wait4(pid, 0)
        for x in (out_r, err_r, pidfd):
            os.close(x)
        bad += status != 0 or b"satisfied" not in out
    wall = time.perf_counter() - t0
    s1, c1 = _cpu()
    return {"own_ms": 1000 * (s1 - s0) / count, "children_ms": 1000 * (c1 - c0) / count,
            "wall_ms": 1000 * wall / count, "failures": bad}


def via_posix_spawn(plugin: str, count: int) -> dict:
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    env = {"PATH": PLUGIN_PATH, "LANG": "C.UTF-8"}
    bad = 0
    s0, c0 = _cpu()
    t0 = time.perf_counter()
    for i in range(count):
        fd = _stdin_fd()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        pid = os.posix_spawn(plugin, [plugin], dict(env, ASSESSMENT_RUN_UUID=str(i)), setsid=True, file_actions=[
            (os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
        os.close(fd)
        os.close(out_w)
        out = _drain(out_r)
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        bad += status != 0 or b"satisfied" not in out
    wall = time.perf_counter() - t0
    s1, c1 = _cpu()
    os.close(devnull)
    return {"own_ms": 1000 * (s1 - s0) / count, "children_ms": 1000 * (c1 - c0) / count,
            "wall_ms": 1000 * wall / count, "failures": bad}


def main(argv: list[str]) -> int:
    plugin, count, scratch = argv[0], int(argv[1]), argv[2]
    run_as = None
    if os.geteuid() == 0:
        pw = pwd.getpwnam("nobody")
        run_as = (pw.pw_uid, pw.pw_gid)
    with open("/proc/self/status") as f:
        mem = {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmSize")}
    via_posix_spawn(plugin, 20)  # warm both paths up
    via_sandbox(plugin, 20, scratch, run_as)
    out = {"count": count, "process": mem,
           "sandbox_fork": via_sandbox(plugin, count, scratch, run_as),
           "posix_spawn": via_posix_spawn(plugin, count)}
    for k in ("sandbox_fork", "posix_spawn"):
        out[k] = {n: (round(v, 4) if isinstance(v, float) else v) for n, v in out[k].items()}
        out[k]["total_ms"] = round(out[k]["own_ms"] + out[k]["children_ms"], 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
