"""A job's cgroup as its runner sees it: what a run hit, its threads, and ending everything in it.

`cgroup` is the job's cgroup v2 folder, or its folders joined by ':' (v1: the memory and
pids hierarchies; a hybrid host: the v2 folder first). Both versions count an OOM kill as
`oom_kill` (v2 memory.events, v1 memory.oom_control) and a refused fork as `max`
(pids.events). Which files a job has is found and opened once, when the runner starts: after
each run only those are read again (two small reads), since the counters are cumulative and
nothing else runs in the job's cgroup between our runs. Everything in the job's cgroup was
started by a run, so the runner (their subreaper) sees any of it still alive as a child of its
own, and lists the cgroup to kill it only then.
"""

from __future__ import annotations

import os
import signal
import time

KILL_ROUNDS = 50  # a v1 cgroup has no cgroup.kill: kill what is listed until nothing is (forks race us)


class JobCgroup:
    def __init__(self, cgroup: str | None):
        folders = cgroup.split(":") if cgroup else []
        kill_files = [os.path.join(f, "cgroup.kill") for f in folders]
        # v2: cgroup.kill ends everything at once; v1: every process is in each hierarchy, so
        # listing one folder's cgroup.procs is enough
        self.kill_file = next((k for k in kill_files if os.path.exists(k)), None)
        self.procs_folder = folders[0] if folders and self.kill_file is None else None

    def kill(self) -> None:
        """SIGKILL everything in the job's cgroup."""
        if self.kill_file is not None:
            try:
                with open(self.kill_file, "w") as f:
                    f.write("1")
            except OSError:
                pass
        elif self.procs_folder is not None:
            kill_cgroup_procs(self.procs_folder)

    def threads(self) -> list[int]:
        """The thread ids in the job's cgroup ([] without one): v2 cgroup.threads, v1 tasks.
        (Paths made here, not kept: only a run of over 50 ms asks, and a runner keeps little.)"""
        folder = self.procs_folder or (os.path.dirname(self.kill_file) if self.kill_file else None)
        for name in ("cgroup.threads", "tasks") if folder else ():
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    return [int(x) for x in f.read().split()]
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                return []
        return []


class RunCounters:
    """What a job's runs hit, from the cgroup's cumulative event counters. The two files are
    opened once and read again from the start after each run (a path lookup through the
    cgroup tree, an open and a close per file per run cost more than the read)."""

    def __init__(self, cgroup: str | None):
        folders = cgroup.split(":") if cgroup else []
        self.oom_fd = _open_first(folders, ("memory.events", "memory.oom_control"))
        self.pids_fd = _open_first(folders, ("pids.events",))
        self.counters = self._read()

    def _read(self) -> tuple[int, int]:
        return _event(self.oom_fd, b"oom_kill"), _event(self.pids_fd, b"max")

    def hits(self) -> tuple[bool, bool]:
        """After a run: whether it was OOM-killed, and whether a fork of it was refused."""
        before, self.counters = self.counters, self._read()
        return self.counters[0] > before[0], self.counters[1] > before[1]

    def close(self) -> None:
        for fd in (self.oom_fd, self.pids_fd):
            if fd >= 0:
                os.close(fd)
        self.oom_fd = self.pids_fd = -1


def kill_cgroup_procs(folder: str) -> None:
    """Every pid in cgroup.procs, again until none is left (v1; or v2 before kernel 5.14)."""
    for _ in range(KILL_ROUNDS):
        pids = cgroup_pids(folder)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)


def cgroup_pids(folder: str) -> list[int]:
    try:
        with open(os.path.join(folder, "cgroup.procs"), "rb") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _open_first(folders: list[str], names: tuple[str, ...]) -> int:
    """A read-only fd on the first of `names` in the first folder holding one, or -1."""
    for folder in folders:
        for name in names:
            try:
                return os.open(os.path.join(folder, name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
    return -1


def _event(fd: int, key: bytes) -> int:
    if fd < 0:
        return 0
    try:
        for line in os.pread(fd, 4096, 0).splitlines():
            k, _, v = line.partition(b" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0
