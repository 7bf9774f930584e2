"""The Python stand-in for our runners, for `make bench` (bench_floor.py): runner_floor.c's
loop, line for line, in as little Python as does the same system calls.

    python runner_floor.py JOBS HELPER PLUGIN SINK_SOCKET CGROUP_PREFIXES UID_BASE SCRATCH_BASE

Forked from this small process (no zygote, no warm-up, no gc.freeze): its CPU per run is what
an interpreter costs a runner before any of our own code runs.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

FRAME_BYTES = 700  # as runner_floor.c


def open_counter(prefixes: str, job: int, controller: str, name: str) -> int:
    for prefix in prefixes.split(":") if prefixes != "-" else []:
        if controller in prefix:
            return os.open(f"{prefix}/j{job}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    return -1


def job(i: int, jobs: int, helper: str, plugin: str, sink: str, prefixes: str, uid_base: int, scratch_base: str,
        cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    scratch = f"{scratch_base}/{i}"
    os.makedirs(scratch, 0o700, exist_ok=True)
    os.chown(scratch, uid_base + i, uid_base + i)
    cgroups = ":".join(f"{p}/j{i}" for p in prefixes.split(":")) if prefixes != "-" else "-"
    uid = str(uid_base + i)
    argv = [helper, uid, uid, "268435456", "30", "128", "64", str(os.getpid()), cgroups, scratch, "l", "-", "--", plugin]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "ASSESSMENT_JOB_UUID": "00000000-0000-4000-8000-000000000000",
           "ASSESSMENT_RUNTIME_UUID": "00000000-0000-4000-8000-000000000001",
           "ASSESSMENT_RUN_UUID": "00000000-0000-4000-8000-000000000002"}
    stdin_fd = os.memfd_create("stdin")
    doc = b"{" + b" " * 398 + b"}"
    oom = open_counter(prefixes, i, "memory", "memory.failcnt")
    pids = open_counter(prefixes, i, "pids", "pids.events")
    children = os.open("/proc/thread-self/children", os.O_RDONLY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.connect(sink)
    epoll = select.epoll()
    levels = ("/", plugin, plugin, plugin, plugin)
    frame = b"r" * FRAME_BYTES
    every_signal = set(signal.Signals)
    actions = None
    nxt = i / jobs
    nxt += int(time.monotonic() - nxt) + 1
    while True:
        wait = nxt - time.monotonic()
        if wait > 0:
            epoll.poll(wait, 1)
            if time.monotonic() < nxt:
                continue
        nxt += 1.0
        for path in levels:
            os.lstat(path)
        os.lstat(scratch)
        os.pwrite(stdin_fd, doc, 0)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        actions = [(os.POSIX_SPAWN_DUP2, stdin_fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        pid = os.posix_spawn(helper, argv, env, file_actions=actions, setsid=True, setsigdef=every_signal)
        os.close(out_w)
        os.close(err_w)
        pidfd = os.pidfd_open(pid)
        epoll.register(pidfd, select.EPOLLIN)
        epoll.poll(10.0, 1)
        _, status, _ = os.wait4(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.pread(children, 4096, 0)
        out = os.read(out_r, 65536)
        err = os.read(err_r, 65536)
        os.close(out_r)
        os.close(err_r)
        os.close(pidfd)
        if oom >= 0:
            os.pread(oom, 64, 0)
        if pids >= 0:
            os.pread(pids, 64, 0)
        if not out or status:
            print(f"job {i}: exit status {status}, {len(out)} bytes out: {err[:200]!r}", file=sys.stderr, flush=True)
        sock.send(frame[:4] + repr(time.time()).encode() + frame[4 + 18:])
        try:
            sock.recv(65536)
        except BlockingIOError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) != 7:
        print(__doc__, file=sys.stderr)
        return 2
    jobs, helper, plugin, sink, prefixes, uid_base, scratch_base = argv
    cpus = sorted(os.sched_getaffinity(0))
    for i in range(int(jobs)):
        if os.fork() == 0:
            try:
                job(i, int(jobs), helper, plugin, sink, prefixes, int(uid_base), scratch_base, cpus[i % len(cpus)])
            finally:
                os._exit(1)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
