"""A job's cgroup as a runner sees it: what its runs hit, and ending everything in it.

`cgroup` is the job's cgroup v2 folder, or (v1) its folders in the memory and pids
hierarchies joined by ':'. Both versions count an OOM kill as `oom_kill` (v2 memory.events,
v1 memory.oom_control) and a refused fork as `max` (pids.events).
"""

from __future__ import annotations

import os
import signal
import time

KILL_ROUNDS = 50  # a v1 cgroup has no cgroup.kill: kill what is listed until nothing is (forks race us)


def cgroup_counters(cgroup: str | None) -> tuple[int, int]:
    """(oom kills, fork refusals) so far in a job's cgroup: compared before and after a run."""
    if cgroup is None:
        return 0, 0
    ooms = refusals = 0
    for folder in cgroup.split(":"):
        ooms += _event(folder, "memory.events", b"oom_kill") or _event(folder, "memory.oom_control", b"oom_kill")
        refusals += _event(folder, "pids.events", b"max")
    return ooms, refusals


def _event(folder: str, name: str, key: bytes) -> int:
    try:
        with open(os.path.join(folder, name), "rb") as f:
            for line in f:
                k, _, v = line.partition(b" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def kill_cgroup(cgroup: str | None) -> None:
    """SIGKILL everything in the job's cgroup: cgroup.kill (v2, kernel 5.14+), else every pid
    in cgroup.procs, again until none is left."""
    if cgroup is None:
        return
    for folder in cgroup.split(":"):
        try:
            with open(os.path.join(folder, "cgroup.kill"), "w") as f:
                f.write("1")
            continue
        except FileNotFoundError:
            pass
        except OSError:
            continue
        for _ in range(KILL_ROUNDS):
            pids = cgroup_pids(folder)
            if not pids:
                break
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
