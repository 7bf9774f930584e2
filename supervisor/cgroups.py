"""Per-job cgroups: v2 when the service was given a cgroup tree of its own, else the v1
memory and pids hierarchies when they are mounted and writable (SPEC §6 "Limits").

Under systemd with `Delegate=yes` the service owns its cgroup. At start we move ourselves
into a leaf (`supervisor/`, inherited by the zygote, publisher and runners), enable the
memory, pids and cpu controllers for `jobs/`, and give each job `jobs/<uuid>/` with
memory.max, pids.max and cpu.max. A plugin joins its job's cgroup before it execs, so
everything it starts is counted and limited there; `cgroup.kill` ends a run for good.

Without a delegated v2 tree (our cgroup is the root, or not writable, or no controllers)
we use cgroup v1 where its `memory` and `pids` controllers are mounted (hybrid hosts: RHEL 8,
Ubuntu 20.04): each job gets `<parent>/jobs/<uuid>/` in both hierarchies, with
memory.limit_in_bytes (and memsw, so swap does not stretch it) and pids.max. The parent is
our own cgroup there when systemd started us (`Delegate=yes` hands it over for v1 too), else
`assessment-runtime-<runtime uuid>` under our cgroup, which is ours alone. v1 has no
cgroup.kill: a kill is every pid in cgroup.procs, again until none is left. Job cgroups left
by a SIGKILLed supervisor are removed at the next start; all of them are removed at stop.
Without either we fall back to rlimits and the runner as child subreaper. Status says which.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from runner.jobcgroup import JobCgroup, cgroup_pids

log = logging.getLogger(__name__)

WANTED = ("memory", "pids", "cpu")
WANTED_V1 = ("memory", "pids")
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


def _v1_mounts() -> dict[str, tuple[str, str]]:
    """controller -> (mount point, the mount's root in the hierarchy) of each v1 hierarchy."""
    found: dict[str, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = right.split()
                if len(fields) >= 3 and fields[0] == "cgroup":
                    for option in fields[2].split(","):
                        if option in WANTED_V1 and option not in found:
                            parts = left.split()
                            found[option] = (parts[4], parts[3])
    except OSError:
        pass
    return found


def _own_v1_cgroups() -> dict[str, str]:
    """controller -> our cgroup in that v1 hierarchy."""
    own: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(","):
                    own[c] = path
    except (OSError, ValueError):
        pass
    return own


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
        self.version = "none"  # "v2" | "v1" | "none"
        self.base: str | None = None  # v2: our delegated cgroup, as a path under the cgroup2 mount
        self.v2_controllers: list[str] = []
        self.v1_bases: dict[str, str] = {}  # v1: controller -> the folder that holds jobs/
        self.v1_created: list[str] = []  # v1 parents we made (removed at stop)
        self.controllers: list[str] = []
        self.reason = "not set up"
        self.jobs: dict[str, tuple[int | None, int | None]] = {}  # what each job's cgroup was given

    @property
    def active(self) -> bool:
        return self.version != "none"

    def setup(self, instance: str = "") -> bool:
        """Take over our cgroup if it is ours to manage (v2); where it has no memory or pids
        controller, add v1 job cgroups for the limits (a hybrid host: the v2 cgroup still tracks
        and kills). Call before starting any child. `instance` names our v1 parent outside systemd."""
        v2 = self._setup_v2()
        if v2 and {"memory", "pids"} & set(self.v2_controllers):
            self.version = "v2"
        elif self._setup_v1(instance):
            self.version = "v1"
        elif v2:
            self.version = "v2"  # tracking and cgroup.kill only: limits stay rlimits
        else:
            log.info("cgroups not in use: %s; using rlimits", self.reason)
            return False
        self.controllers = sorted(set(self.v2_controllers) | set(self.v1_bases))
        self.remove_stale()
        return True

    def _setup_v2(self) -> bool:
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
            return False
        self.base, self.v2_controllers = base, wanted
        self.reason = "delegated" if wanted else "delegated, without controllers"
        log.info("per-job cgroups (v2) under %s (controllers: %s)", os.path.join(base, "jobs"),
                 ", ".join(wanted) or "none")
        return True

    def _setup_v1(self, instance: str) -> bool:
        mounts, own = _v1_mounts(), _own_v1_cgroups()
        why = self.reason
        under_systemd = bool(os.environ.get("INVOCATION_ID"))
        for controller in WANTED_V1:
            if controller not in mounts or controller not in own:
                continue
            mount, root = mounts[controller]
            path = own[controller]
            if root != "/" and path.startswith(root):
                path = path[len(root):]
            parent = os.path.join(mount, path.lstrip("/"))
            if not (under_systemd and path not in ("", "/")):
                parent = os.path.join(parent, f"assessment-runtime-{instance or os.getpid()}")
            try:
                if not os.path.isdir(parent):
                    os.makedirs(parent)
                    self.v1_created.append(parent)
                os.makedirs(os.path.join(parent, "jobs"), exist_ok=True)
            except OSError as e:
                why = f"{why}; cgroup v1 {controller}: cannot use {parent}: {e.strerror or e}"
                continue
            self.v1_bases[controller] = os.path.join(parent, "jobs")
        if not self.v1_bases:
            self.reason = why if mounts else f"{why}; no cgroup v1 memory or pids hierarchy"
            return False
        self.reason = f"cgroup v1 for the limits ({why})"
        log.info("per-job cgroups (v1) under %s", ", ".join(self.v1_bases.values()))
        return True

    def _job_folders(self, uuid: str) -> list[str]:
        """The v2 folder first (when there is one), then the v1 ones in v1_bases' order."""
        v2 = [os.path.join(self.base, "jobs", uuid)] if self.base else []
        return v2 + [os.path.join(base, uuid) for base in self.v1_bases.values()]

    def job_cgroup(self, uuid: str, memory: int | None, processes: int | None) -> str | None:
        """Create or update the job's cgroup; its path (v1: its folders joined by ':'), or None
        when cgroups are not in use."""
        if not self.active:
            return None
        folders = self._job_folders(uuid)
        if self.jobs.get(uuid) == (memory, processes) and all(os.path.isdir(f) for f in folders):
            return ":".join(folders)  # reconciles come every resync_interval: write only what changed
        try:
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
            if self.base:
                self._limit_v2(folders[0], memory, processes)
            for controller, folder in zip(self.v1_bases, folders[1:] if self.base else folders):
                self._limit_v1(controller, folder, memory, processes)
        except OSError as e:
            log.error("cannot set up the cgroup of job %s: %s; its runs use rlimits only", uuid, e)
            return None
        self.jobs[uuid] = (memory, processes)
        return ":".join(folders)

    def _limit_v2(self, path: str, memory: int | None, processes: int | None) -> None:
        settings = {"memory": [("memory.max", str(memory) if memory else "max"), ("memory.swap.max", "0")],
                    "pids": [("pids.max", str(processes) if processes else "max")],
                    "cpu": [("cpu.max", f"{CPU_PERIOD} {CPU_PERIOD}")]}
        for controller in self.v2_controllers:
            for name, value in settings[controller]:
                if os.path.exists(os.path.join(path, name)):
                    _write(os.path.join(path, name), value)

    @staticmethod
    def _limit_v1(controller: str, folder: str, memory: int | None, processes: int | None) -> None:
        if controller == "pids":
            _write(os.path.join(folder, "pids.max"), str(processes) if processes else "max")
            return
        value = str(memory) if memory else "-1"
        names = ["memory.limit_in_bytes"]
        if os.path.exists(os.path.join(folder, "memory.memsw.limit_in_bytes")):
            names.append("memory.memsw.limit_in_bytes")  # memory + swap: swap does not stretch the limit
        try:
            for name in names:
                _write(os.path.join(folder, name), value)
        except OSError:
            for name in reversed(names):  # memsw must stay >= the limit: raising goes in this order
                _write(os.path.join(folder, name), value)

    def prune(self, keep: set[str]) -> None:
        """Remove the cgroups of jobs that are gone (their runners have exited)."""
        for uuid in [u for u in self.jobs if u not in keep]:
            self.remove_job(uuid)

    def remove_job(self, uuid: str) -> None:
        if not self.active:
            return
        self.jobs.pop(uuid, None)
        for folder in self._job_folders(uuid):
            _remove(folder)

    def remove_stale(self) -> None:
        """Job cgroups no runner of ours is in: left by a supervisor that was SIGKILLed."""
        bases = ([os.path.join(self.base, "jobs")] if self.base else []) + list(self.v1_bases.values())
        for base in bases:
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                folder = os.path.join(base, name)
                if os.path.isdir(folder) and name not in self.jobs:
                    left = len(cgroup_pids(folder))
                    _remove(folder)
                    if left:  # an earlier instance was killed and nobody else cleaned up
                        log.warning("killed %d processes left in %s by an earlier instance", left, folder)

    def close(self) -> None:
        """At stop, after every runner is gone: remove every job cgroup, and v1 parents we made."""
        for uuid in list(self.jobs):
            self.remove_job(uuid)
        self.remove_stale()
        for parent in self.v1_created:
            for folder in (os.path.join(parent, "jobs"), parent):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass

    def info(self) -> dict:
        """`sandbox` in status: `cgroup` is v2, v1 or none (SPEC §8); the rest says where and why."""
        where = ([os.path.join(self.base, "jobs")] if self.base else []) + list(self.v1_bases.values())
        return {"cgroup": self.version, "cgroup_path": where or None, "controllers": list(self.controllers),
                "limits": "cgroup" if self.active else "rlimit", "detail": self.reason}


def _remove(folder: str) -> None:
    """Kill what is in a job's cgroup, then remove it."""
    if not os.path.isdir(folder):
        return
    JobCgroup(folder).kill()
    for _ in range(100):
        try:
            os.rmdir(folder)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:  # busy: the killed are not reaped yet
                log.warning("cannot remove cgroup %s: %s", folder, e)
                return
        time.sleep(0.01)
    log.warning("cannot remove cgroup %s: still busy", folder)
