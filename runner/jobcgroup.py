"""A job's cgroup as its runner sees it: what a run hit, and ending everything in it.

`cgroup` is the job's cgroup v2 folder, or its folders joined by ':' (v1: the memory and
pids hierarchies; a hybrid host: the v2 folder first). Both versions count an OOM kill as
`oom_kill` (v2 memory.events, v1 memory.oom_control) and a refused fork as `max`
(pids.events). Which files a job has is found once, when the runner starts: after each run
only those are read (two small reads and, for v1, one cgroup.procs), since the counters are
cumulative and nothing else runs in the job's cgroup between our runs.
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
        self.oom_file = _first_with(folders, ("memory.events", "memory.oom_control"))
        self.pids_file = _first_with(folders, ("pids.events",))
        self.counters = self._read()

    def _read(self) -> tuple[int, int]:
        return _event(self.oom_file, b"oom_kill"), _event(self.pids_file, b"max")

    def hits(self) -> tuple[bool, bool]:
        """After a run: whether it was OOM-killed, and whether a fork of it was refused."""
        before, self.counters = self.counters, self._read()
        return self.counters[0] > before[0], self.counters[1] > before[1]

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


def _first_with(folders: list[str], names: tuple[str, ...]) -> str | None:
    for folder in folders:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    return None


def _event(path: str | None, key: bytes) -> int:
    if path is None:
        return 0
    try:
        with open(path, "rb") as f:
            for line in f:
                k, _, v = line.partition(b" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0
