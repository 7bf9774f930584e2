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
    interval: float | None  # None for a cron job (schedule)
    timeout: float
    stop_grace: float
    run_on_start: bool
    splay: float  # interval job: its offset on the monotonic grid; cron job: its delay after each fire time
    limits: RunLimits
    scratch_dir: str
    run_as: tuple[int, int] | None  # (uid, gid) for plugins when we are root
    plugin_note: str | None = None  # why a url plugin may be missing; added to "plugin not found"
    download_error_file: str | None = None  # where the supervisor keeps the last download error
    cgroup: str | None = None  # the job's cgroup folder (v2), or its ':'-joined folders (v1 memory, pids)
    cgroup_controllers: list[str] = []  # controllers enabled there: their limits replace rlimits
    confine: bool = True  # Landlock, where the kernel has it
    write_paths: list[str] = []  # beyond the scratch folder, under confinement (jobs.plugin_write_paths)
    capabilities: list[int] = []  # ambient capabilities for the plugin (jobs.plugin_capabilities)
    publisher_socket: str = ""  # where results go (the publisher's listening Unix socket)
    log_format: str = "text"
    log_level: str = "info"
    schedule: str | None = None  # a cron expression (runner/cron.py), instead of interval
    time_zone: str = "UTC"  # what schedule is read in


class RunNow(msgspec.Struct, tag=True):
    pass


SupervisorToRunner = RunnerConfig | RunNow


# -- runner -> supervisor ---------------------------------------------------------------

class RunnerState(msgspec.Struct, tag=True):
    """Sent when the runner is ready, when results it could not hand over were dropped, and
    when it skipped a fire time.
    Results themselves go straight to the publisher (below), never through the supervisor."""

    running: bool
    next_run_at: float | None  # CLOCK_MONOTONIC, shared by every process on the host
    dropped: int = 0  # results this runner dropped, unacknowledged, while the publisher was away
    skipped: int = 0  # fire times this runner skipped because a run was still going


RunnerToSupervisor = RunnerState


# -- runner <-> publisher (one Unix stream socket per runner; see runner/results.py) ------

class LastResult(msgspec.Struct):
    """What status shows of a job's last result."""

    uuid: str
    status: Status
    reason: str | None
    end: str


class Publish(msgspec.Struct, tag=True):
    """One run's result, plus what status and metrics show of it, so that nobody on the way
    decodes the result itself. The result is stored and delivered exactly as it came."""

    job_uuid: str
    last: LastResult
    duration: float
    next_run_at: float | None
    result: msgspec.Raw  # an AttestationResult, msgpack
    job_revision: str = ""
    job_title: str | None = None  # the spec's, which a plugin may have replaced in the result (ccf needs it)


class Acked(msgspec.Struct, tag=True):
    """These results are in the outbox, fsynced: the sender may forget them."""

    uuids: list[str]


RunnerToPublisher = Publish
PublisherToRunner = Acked


# -- supervisor <-> publisher (pipes) ----------------------------------------------------

class PublisherSettings(msgspec.Struct, tag=True):
    """Always the first frame from the supervisor, and the only one."""

    state_dir: str
    publisher: msgspec.Raw  # the [publisher] table (supervisor.config.Publisher), msgpack
    log_format: str = "text"
    log_level: str = "info"


class SinkStats(msgspec.Struct):
    name: str
    kind: str
    delivered: int
    pending: int
    failures: int
    dead_lettered: int
    last_error: str | None
    last_success: str | None  # ISO-8601 UTC with Z
    oldest_pending_age: float | None  # seconds since the oldest pending result ended


class JobDigest(msgspec.Struct):
    """One job's results committed since the last PublisherStats."""

    job_uuid: str
    runs: dict[str, int]  # by status
    duration_sum: float
    durations: list[float]  # each run's, for the histogram
    last: LastResult
    next_run_at: float | None
    last_error: LastResult | None = None  # the last error among these runs (for its reason in the log)


class PublisherStats(msgspec.Struct, tag=True):
    outbox_results: int
    outbox_bytes: int
    dropped: int
    sinks: list[SinkStats]
    jobs: list[JobDigest] = []
    outbox_error: str | None = None  # why the outbox cannot be written now (results wait in memory)
    outbox_write_errors: int = 0  # failed outbox writes since the publisher started
    waiting: int = 0  # results read but not yet written to the outbox (not acknowledged)
    waiting_bytes: int = 0


SupervisorToPublisher = PublisherSettings
PublisherToSupervisor = PublisherStats


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
