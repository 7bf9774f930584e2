"""Per-job cgroups (v2), when the service was given a cgroup tree of its own.

Under systemd with `Delegate=yes` the service owns its cgroup. At start we move ourselves
into a leaf (`supervisor/`, inherited by the zygote, publisher and runners), enable the
memory, pids and cpu controllers for `jobs/`, and give each job `jobs/<uuid>/` with
memory.max, pids.max and cpu.max. A plugin joins its job's cgroup before it execs, so
everything it starts is counted and limited there; `cgroup.kill` ends a run for good.

Without a delegated tree (our cgroup is the root, or not writable, or no cgroup2 mount) we
fall back to rlimits and the runner as child subreaper; status says which is in use.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

WANTED = ("memory", "pids", "cpu")
CPU_PERIOD = 100_000  # µs; cpu.max gives each job at most one CPU's worth of this period


def _cgroup2_mount() -> str | None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


def _own_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


class CgroupTree:
    def __init__(self) -> None:
        self.base: str | None = None  # our delegated cgroup, as a path under the cgroup2 mount
        self.controllers: list[str] = []
        self.reason = "not set up"
        self.jobs: dict[str, tuple[int | None, int | None]] = {}  # what each job's cgroup was given

    @property
    def active(self) -> bool:
        return self.base is not None

    def setup(self) -> bool:
        """Take over our cgroup if it is ours to manage. Call before starting any child."""
        mount, own = _cgroup2_mount(), _own_cgroup()
        if mount is None or own is None:
            self.reason = "no cgroup2 hierarchy"
            return False
        if own == "/":
            self.reason = "the service runs in the root cgroup (not delegated: run it under systemd with Delegate=yes)"
            return False
        base = os.path.join(mount, own.lstrip("/"))
        if os.path.basename(base) == "supervisor" and os.path.isdir(os.path.join(os.path.dirname(base), "jobs")):
            base = os.path.dirname(base)  # a restart of ours in the same tree (e.g. after exec)
        try:
            os.makedirs(os.path.join(base, "supervisor"), exist_ok=True)
            _write(os.path.join(base, "supervisor", "cgroup.procs"), "0")
            available = _read(os.path.join(base, "cgroup.controllers")).split()
            wanted = [c for c in WANTED if c in available]
            if wanted:
                _write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
            os.makedirs(os.path.join(base, "jobs"), exist_ok=True)
            if wanted:
                _write(os.path.join(base, "jobs", "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
        except OSError as e:
            self.reason = f"cannot manage {base}: {e.strerror or e}"
            log.info("cgroups not in use: %s; using rlimits", self.reason)
            return False
        self.base, self.controllers = base, wanted
        self.reason = "delegated"
        log.info("per-job cgroups under %s (controllers: %s)", os.path.join(base, "jobs"), ", ".join(wanted) or "none")
        return True

    def job_cgroup(self, uuid: str, memory: int | None, processes: int | None) -> str | None:
        """Create or update the job's cgroup; its path, or None when cgroups are not in use."""
        if self.base is None:
            return None
        path = os.path.join(self.base, "jobs", uuid)
        if self.jobs.get(uuid) == (memory, processes) and os.path.isdir(path):
            return path  # reconciles come every resync_interval: write only what changed
        try:
            os.makedirs(path, exist_ok=True)
            settings = {"memory": [("memory.max", str(memory) if memory else "max"), ("memory.swap.max", "0")],
                        "pids": [("pids.max", str(processes) if processes else "max")],
                        "cpu": [("cpu.max", f"{CPU_PERIOD} {CPU_PERIOD}")]}
            for controller in self.controllers:
                for name, value in settings[controller]:
                    if os.path.exists(os.path.join(path, name)):
                        _write(os.path.join(path, name), value)
        except OSError as e:
            log.error("cannot set up the cgroup of job %s: %s; its runs use rlimits only", uuid, e)
            return None
        self.jobs[uuid] = (memory, processes)
        return path

    def prune(self, keep: set[str]) -> None:
        """Remove the cgroups of jobs that are gone (their runners have exited)."""
        for uuid in [u for u in self.jobs if u not in keep]:
            self.remove_job(uuid)

    def remove_job(self, uuid: str) -> None:
        if self.base is None:
            return
        self.jobs.pop(uuid, None)
        path = os.path.join(self.base, "jobs", uuid)
        try:
            if os.path.exists(os.path.join(path, "cgroup.kill")):
                _write(os.path.join(path, "cgroup.kill"), "1")
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove cgroup %s: %s", path, e)

    def info(self) -> dict:
        return {"limits": "cgroup" if self.active else "rlimit",
                "cgroup": os.path.join(self.base, "jobs") if self.base else None,
                "controllers": list(self.controllers), "detail": self.reason}
