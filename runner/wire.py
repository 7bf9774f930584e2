"""Wire types: the frames between supervisor, zygote and runners, and the result they carry.

Each type is written once here and imported everywhere else. Frames are tagged Structs so
one Decoder per direction validates them at the boundary.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Status = Literal["satisfied", "not-satisfied", "error"]


class PluginInfo(msgspec.Struct):
    name: str
    version: str
    sha256: str | None = None


class AttestationResult(msgspec.Struct):
    """One run's result (SPEC §7). Field order is the order the SPEC shows."""

    uuid: str
    runtime_uuid: str
    job_uuid: str
    job_revision: str
    plugin: PluginInfo
    title: str | None
    labels: dict[str, str]
    assessment_plan_uuid: str | None
    component_uuid: str | None
    control_id: str | None
    start: str
    end: str
    status: Status
    reason: str | None = None
    observations: list[Any] = []
    findings: list[Any] = []
    risks: list[Any] = []
    subjects: list[Any] = []
    logs: list[Any] = []


class ResultSummary(msgspec.Struct):
    """What the supervisor reads of a result for status, without decoding the rest."""

    uuid: str
    job_uuid: str
    status: Status
    reason: str | None
    start: str
    end: str


# -- supervisor -> runner ---------------------------------------------------------------

class RunLimits(msgspec.Struct):
    memory: int | None
    cpu_time: float | None
    open_files: int | None
    processes: int | None
    output: int


class RunnerConfig(msgspec.Struct, tag=True):
    """The first frame a runner reads: everything it needs, resolved once by the supervisor."""

    job_uuid: str
    revision: str
    runtime_uuid: str
    job_json: bytes  # the spec's canonical JSON, handed to the plugin as "job"
    config_json: bytes  # the spec's "config" object as JSON
    plugin: PluginInfo  # sha256 here is the pin from the spec, if any
    plugin_url: str | None
    plugin_dirs: list[str]
    require_sha256: bool
    title: str | None
    labels: dict[str, str]
    assessment_plan_uuid: str | None
    component_uuid: str | None
    control_id: str | None
    interval: float
    timeout: float
    stop_grace: float
    run_on_start: bool
    splay: float  # seconds after start of the first scheduled run, stable per job
    limits: RunLimits
    scratch_dir: str
    run_as: tuple[int, int] | None  # (uid, gid) for plugins when we are root
    plugin_note: str | None = None  # why a url plugin may be missing; added to "plugin not found"
    download_error_file: str | None = None  # where the supervisor keeps the last download error
    cgroup: str | None = None  # the job's cgroup v2 folder, when cgroups are in use
    cgroup_controllers: list[str] = []  # controllers enabled there: their limits replace rlimits
    log_format: str = "text"
    log_level: str = "info"


class RunNow(msgspec.Struct, tag=True):
    pass


SupervisorToRunner = RunnerConfig | RunNow


# -- runner -> supervisor ---------------------------------------------------------------

class RunnerState(msgspec.Struct, tag=True):
    """Sent when the runner is ready and whenever its schedule changes."""

    running: bool
    next_run_at: float | None  # CLOCK_MONOTONIC, shared by every process on the host


class RunResult(msgspec.Struct, tag=True):
    result: msgspec.Raw  # an AttestationResult, msgpack, passed through to the publisher
    duration: float
    next_run_at: float | None = None  # the schedule after this run: one frame per run, not two


RunnerToSupervisor = RunnerState | RunResult


# -- supervisor <-> zygote (datagrams on a SOCK_SEQPACKET pair, fds by SCM_RIGHTS) -------

class Spawn(msgspec.Struct, tag=True):
    """Fork a runner; the message carries two fds: the runner's read end and write end."""

    job_uuid: str


class Spawned(msgspec.Struct, tag=True):
    job_uuid: str
    pid: int


class Exited(msgspec.Struct, tag=True):
    pid: int
    status: int  # as os.waitpid gives it


ZygoteToSupervisor = Spawned | Exited
