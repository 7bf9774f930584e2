"""The job manager: one runner per desired job, reconciled level-triggered.

`manage_runners` compares the desired runner configs with the runners we have and acts on
the difference: start what is missing, stop what is no longer wanted or wanted differently
(any change of the spec or of the effective settings is a new `key`), and restart crashed
runners after an exponential backoff with full jitter. Runners are forked by the zygote
(see runner/zygote.py), so their exits are reported by it, not by our own waitpid.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import select
import selectors
import signal
import socket
import subprocess
import sys
import time

import msgspec

from runner import linux
from runner.framing import MAX_FRAME, Channel, FrameError
from runner.wire import (Exited, JobDigest, PluginInfo, RunLimits, RunnerConfig, RunnerState, RunNow,
                         RunnerToSupervisor, Spawn, Spawned, ZygoteToSupervisor)
from supervisor.cgroups import CgroupTree
from supervisor.config import GRANTABLE_CAPABILITIES, Config
from supervisor.downloads import downloads_dir, error_file
from supervisor.spec import Spec
from supervisor.users import PluginUsers, for_plugin

log = logging.getLogger(__name__)

BACKOFF_MIN = 1.0
BACKOFF_MAX = 300.0
HEALTHY_RESET = 600.0  # a runner that lived this long starts its backoff from scratch
_encode = msgspec.msgpack.Encoder().encode


def backoff_delay(failures: int) -> float:
    """Exponential backoff with full jitter, between 1 s and 5 min."""
    cap = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, failures - 1))
    return random.uniform(BACKOFF_MIN, max(BACKOFF_MIN, cap))


def splay_of(uuid: str, interval: float) -> float:
    """Where in its interval a job runs: spread across jobs, stable across restarts."""
    h = int.from_bytes(hashlib.sha256(uuid.encode()).digest()[:8], "big")
    return (h / 2**64) * interval


def cron_splay(runtime_uuid: str, job_uuid: str, splay: float | None) -> float:
    """A cron job's delay after each fire time: stable, in [0, splay), drawn from the runtime
    and job uuids so that a fleet firing the same schedule spreads out (SPEC §4)."""
    if not splay:
        return 0.0
    h = int.from_bytes(hashlib.sha256(f"{runtime_uuid}/{job_uuid}".encode()).digest()[:8], "big")
    return (h / 2**64) * float(splay)


def runner_config(spec: Spec, config: Config, runtime_uuid: str, users: PluginUsers, cgroups: CgroupTree,
                  publisher_socket: str, job_uid: int | None = None) -> RunnerConfig:
    """Everything a runner needs, resolved here once: effective limits, timeout, splay."""
    job = spec.job
    limits = config.jobs.default_limits.lowered_by(job.limits)
    return RunnerConfig(
        job_uuid=job.uuid, revision=spec.revision, runtime_uuid=runtime_uuid,
        job_json=spec.canonical, config_json=msgspec.json.encode(job.config),
        plugin=PluginInfo(job.plugin.name, job.plugin.version, job.plugin.sha256.lower() if job.plugin.sha256 else None),
        plugin_url=job.plugin.url, plugin_note=_download_note(job, config),
        download_error_file=error_file(config.state_dir, job.plugin.name, job.plugin.version) if job.plugin.url else None,
        plugin_dirs=list(config.plugin_dirs) + _download_dirs(job, config), require_sha256=config.jobs.require_sha256,
        title=job.title, labels=dict(job.labels), assessment_plan_uuid=job.assessment_plan_uuid,
        component_uuid=job.component_uuid, control_id=job.control_id,
        interval=None if job.interval is None else float(job.interval), timeout=float(job.timeout or config.jobs.default_timeout),
        stop_grace=float(config.jobs.stop_grace), run_on_start=job.run_on_start,
        splay=splay_of(job.uuid, float(job.interval)) if job.interval is not None else
        cron_splay(runtime_uuid, job.uuid, job.splay),
        schedule=job.schedule, time_zone=job.time_zone,
        limits=RunLimits(memory=_plain(limits.memory, int), cpu_time=_plain(limits.cpu_time, float),
                         open_files=limits.open_files, processes=limits.processes,
                         output=int(limits.output or config.jobs.default_limits.output)),
        scratch_dir=os.path.join(config.state_dir, "scratch", job.uuid),
        run_as=users.for_plugin(job.plugin.name, job.plugin.version, job_uid),
        cgroup=cgroups.job_cgroup(job.uuid, _plain(limits.memory, int), limits.processes),
        cgroup_controllers=list(cgroups.controllers),
        confine=config.jobs.confine,
        write_paths=list(for_plugin(config.jobs.plugin_write_paths, job.plugin.name, job.plugin.version)),
        capabilities=sorted({GRANTABLE_CAPABILITIES[c] for c in for_plugin(
            config.jobs.plugin_capabilities, job.plugin.name, job.plugin.version)}),
        log_format=config.log_format, log_level=config.log_level, publisher_socket=publisher_socket)


def _download_note(job, config: Config) -> str | None:
    if job.plugin.url is None:
        return None
    if not config.plugin_store.allow_download:
        return f"plugin.url {job.plugin.url} is not downloaded: plugin_store.allow_download is false"
    if job.plugin.sha256 is None:
        return f"plugin.url {job.plugin.url} is downloaded only with a plugin.sha256"
    return f"not downloaded yet from {job.plugin.url}"


def _download_dirs(job, config: Config) -> list[str]:
    if job.plugin.url and job.plugin.sha256 and config.plugin_store.allow_download:
        return [downloads_dir(config.state_dir)]
    return []


def _plain(value, kind):
    return None if value is None else kind(value)


class ZygoteLink:
    """The supervisor's end of the zygote: ask for runners, hear of their exits."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.pending: list[bytes] = []  # answers read while a request waited for room
        self.gone = False

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-m", "runner.zygote", str(theirs.fileno()), str(os.getpid()),
                                      linux.TITLE_ROOM],
                                     pass_fds=[theirs.fileno()], process_group=0)
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.pending, self.gone = [], False
        log.info("zygote started, pid %d", self.proc.pid)

    def spawn(self, job_uuid: str, fds: list[int]) -> None:
        """Ask for a runner. Never blocks on a full socket while the zygote's answers wait
        unread on ours (both queues full would be a deadlock): it reads them aside instead."""
        request = [_encode(Spawn(job_uuid=job_uuid))]
        deadline = time.monotonic() + 30.0
        while True:
            try:
                socket.send_fds(self.sock, request, fds)
                return
            except BlockingIOError:
                pass
            if not self._receive() or time.monotonic() > deadline:
                raise OSError("the zygote does not take requests")
            select.select([self.sock], [self.sock], [], 0.5)

    def _receive(self) -> bool:
        """Move what the zygote sent into self.pending; False when it is gone."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return True
            except ConnectionResetError:
                data = b""
            if not data:
                self.gone = True
                return False
            self.pending.append(data)

    def messages(self) -> list[Spawned | Exited] | None:
        """What the zygote has said; None when it is gone."""
        self._receive()
        out = []
        decode = msgspec.msgpack.Decoder(ZygoteToSupervisor).decode
        for data in self.pending:
            try:
                out.append(decode(data))
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.error("bad message from the zygote: %s", e)
        self.pending.clear()
        if self.gone and not out:
            return None
        return out

    def stop(self, timeout: float = 5.0) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RunnerRecord:
    """What we know of one job's runner."""

    def __init__(self, uuid: str):
        self.uuid = uuid
        self.spec: Spec | None = None
        self.plan: RunnerConfig | None = None
        self.key = ""
        self.state = "starting"  # starting | running | backoff | stopping
        self.pid: int | None = None
        self.channel: Channel | None = None
        self.spawning = False  # asked the zygote, no pid yet
        self.started_at = 0.0
        self.kill_at: float | None = None
        self.failures = 0
        self.restarts = 0
        self.runs = 0
        self.backoff_until = 0.0
        self.running = False
        self.next_run_at: float | None = None
        self.last_result: dict | None = None
        self.dropped = 0  # results its runners dropped unacknowledged (publisher away too long)
        self.dropped_base = 0  # of runners before the current one
        self.skipped = 0  # fire times skipped because a run was still going
        self.skipped_base = 0  # of runners before the current one

    @property
    def alive(self) -> bool:
        return self.spawning or self.pid is not None


class JobManager:
    def __init__(self, selector: selectors.BaseSelector, zygote: ZygoteLink):
        self.selector = selector
        self.zygote = zygote
        self.runners: dict[str, RunnerRecord] = {}
        self.by_pid: dict[int, RunnerRecord] = {}
        self.stop_grace = 5.0
        self.exited = False  # a runner exited since the last reconcile: its job may need a new one
        # small sets, so the loop's every turn never walks all runners
        self.waiting: set[RunnerRecord] = set()  # in backoff
        self.dying: set[RunnerRecord] = set()  # stopping, with a SIGKILL deadline
        self.unflushed: set[RunnerRecord] = set()  # frames queued that the pipe has not taken yet

    def due(self, now: float) -> bool:
        """Whether a reconcile would start something now (an exit, or a backoff that is over)."""
        return self.exited or any(now >= r.backoff_until for r in self.waiting)

    def next_timer(self) -> float:
        return min([r.backoff_until for r in self.waiting] + [r.kill_at for r in self.dying], default=float("inf"))

    # -- reconcile -----------------------------------------------------------------------

    def manage_runners(self, desired: dict[str, tuple[Spec, RunnerConfig]], now: float) -> None:
        self.exited = False
        for uuid, rec in list(self.runners.items()):
            want = desired.get(uuid)
            if rec.alive and rec.state != "stopping" and (want is None or _key(want[1]) != rec.key):
                self.stop_runner(rec, now, "job removed" if want is None else "spec or settings changed")
            if not rec.alive and want is None:
                self.waiting.discard(rec)
                del self.runners[uuid]
        for uuid, (spec, plan) in desired.items():
            rec = self.runners.setdefault(uuid, RunnerRecord(uuid))
            key = _key(plan)
            if not rec.alive and rec.key != key:
                rec.backoff_until = 0.0  # a new spec deserves a prompt start, not the old backoff
            if not rec.alive and now >= rec.backoff_until:
                rec.spec, rec.plan, rec.key = spec, plan, key
                self.spawn_runner(rec, now)

    def spawn_runner(self, rec: RunnerRecord, now: float) -> None:
        to_runner_r, to_runner_w = os.pipe2(os.O_CLOEXEC)
        from_runner_r, from_runner_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.zygote.spawn(rec.uuid, [to_runner_r, from_runner_w])
        except OSError as e:
            log.error("cannot ask the zygote for a runner for job %s: %s", rec.uuid, e)
            for fd in (to_runner_r, to_runner_w, from_runner_r, from_runner_w):
                os.close(fd)
            return
        os.close(to_runner_r)
        os.close(from_runner_w)
        rec.channel = Channel(from_runner_r, to_runner_w, RunnerToSupervisor, max_frame=MAX_FRAME)
        self.send(rec, rec.plan)
        self.waiting.discard(rec)
        self.selector.register(from_runner_r, selectors.EVENT_READ, lambda: self.read_runner(rec))
        rec.spawning = True
        rec.state = "starting"
        rec.started_at = now
        rec.kill_at = None
        rec.running = False
        rec.next_run_at = None
        rec.dropped_base = rec.dropped
        rec.skipped_base = rec.skipped

    def stop_runner(self, rec: RunnerRecord, now: float, why: str) -> None:
        """SIGTERM to the runner's group now; SIGKILL after the grace (murder_runners)."""
        log.info("stopping runner of job %s (pid %s): %s", rec.uuid, rec.pid, why)
        rec.state = "stopping"
        rec.kill_at = now + self.stop_grace + 2.0  # the runner itself gives its plugin stop_grace
        self.dying.add(rec)
        if rec.pid is not None:
            _killpg(rec.pid, signal.SIGTERM)

    def stop_all(self, now: float) -> None:
        for rec in self.runners.values():
            if rec.alive and rec.state != "stopping":
                self.stop_runner(rec, now, "shutting down")

    def murder_runners(self, now: float) -> None:
        for rec in self.dying:
            if rec.pid is not None and now >= rec.kill_at:
                log.warning("runner of job %s (pid %d) did not stop in time: SIGKILL", rec.uuid, rec.pid)
                _killpg(rec.pid, signal.SIGKILL)
                rec.kill_at = now + 5.0

    @property
    def alive_count(self) -> int:
        return sum(1 for rec in self.runners.values() if rec.alive)

    # -- events --------------------------------------------------------------------------

    def zygote_said(self, messages: list[Spawned | Exited], now: float) -> None:
        for msg in messages:
            if isinstance(msg, Spawned):
                rec = self.runners.get(msg.job_uuid)
                if rec is None or not rec.spawning:
                    _killpg(msg.pid, signal.SIGKILL)  # nobody waits for it any more
                    continue
                rec.spawning = False
                rec.pid = msg.pid
                self.by_pid[msg.pid] = rec
                if rec.state == "stopping":
                    _killpg(msg.pid, signal.SIGTERM)
            else:
                self.runner_exited(msg.pid, msg.status, now)

    def runner_exited(self, pid: int, status: int | None, now: float) -> None:
        rec = self.by_pid.pop(pid, None)
        if rec is None:
            return
        if rec.channel is not None:
            self.read_runner(rec)  # a last result may still be in the pipe
            self._close_channel(rec)
        rec.pid = None
        rec.running = False
        rec.next_run_at = None
        rec.kill_at = None
        self.dying.discard(rec)
        self.exited = True
        if rec.state == "stopping":
            log.info("runner of job %s (pid %d) stopped", rec.uuid, pid)
            rec.state = "starting"
            return
        if now - rec.started_at >= HEALTHY_RESET:
            rec.failures = 0
        rec.failures += 1
        rec.restarts += 1
        delay = backoff_delay(rec.failures)
        rec.backoff_until = now + delay
        rec.state = "backoff"
        self.waiting.add(rec)
        log.warning("runner of job %s (pid %d) died (%s); restarting in %.1fs", rec.uuid, pid,
                    _describe_status(status), delay)

    def zygote_lost(self, now: float) -> None:
        """The zygote died: its runners died with it (PR_SET_PDEATHSIG)."""
        for rec in list(self.runners.values()):
            if rec.spawning:
                rec.spawning = False
                self._close_channel(rec)
                rec.state = "starting"
            if rec.pid is not None:
                _killpg(rec.pid, signal.SIGKILL)
                self.runner_exited(rec.pid, None, now)

    def read_runner(self, rec: RunnerRecord) -> None:
        channel = rec.channel
        if channel is None:
            return
        try:
            frames = channel.read()
        except FrameError as e:
            log.error("runner of job %s sent a bad frame (%s); killing it", rec.uuid, e)
            if rec.pid is not None:
                _killpg(rec.pid, signal.SIGKILL)
            self._close_channel(rec)
            return
        for frame in frames:
            if rec.state == "starting":
                rec.state = "running"
            rec.running = frame.running
            rec.next_run_at = frame.next_run_at
            rec.dropped = rec.dropped_base + frame.dropped
            rec.skipped = rec.skipped_base + frame.skipped
        if channel.eof:
            self._close_channel(rec)

    def take_digest(self, digest: JobDigest) -> None:
        """What the publisher committed of a job's results since its last stats."""
        rec = self.runners.get(digest.job_uuid)
        if rec is None:
            return
        rec.runs += sum(digest.runs.values())
        last = digest.last
        log_status_change(rec, digest)
        rec.last_result = {"uuid": last.uuid, "status": last.status, "reason": last.reason, "end": last.end}
        if rec.pid is not None and rec.state != "stopping":
            rec.next_run_at = digest.next_run_at

    @property
    def dropped(self) -> int:
        return sum(rec.dropped for rec in self.runners.values())

    def run_now(self, uuid: str) -> bool:
        rec = self.runners.get(uuid)
        if rec is None or rec.channel is None:
            return False
        try:
            self.send(rec, RunNow())
        except (BrokenPipeError, FrameError):
            return False
        return True

    def send(self, rec: RunnerRecord, message) -> None:
        rec.channel.send(message)
        if rec.channel.pending_output:
            self.unflushed.add(rec)

    def flush_channels(self) -> None:
        for rec in list(self.unflushed):
            try:
                if rec.channel is None or rec.channel.flush():
                    self.unflushed.discard(rec)
            except BrokenPipeError:
                self.unflushed.discard(rec)

    def _close_channel(self, rec: RunnerRecord) -> None:
        if rec.channel is not None:
            rec.channel.close(self.selector)
            rec.channel = None


def log_status_change(rec: RunnerRecord, digest: JobDigest) -> None:
    """The one place that logs results (SPEC §8): a change of a job's status at info, with
    its title; an error at warning, with its reason. Nothing for a run like the one before
    (same status; for an error, same reason too). A job's first result since the supervisor
    started is logged as a change (`(first result)`).

    A digest covers every run the publisher committed since its last stats (~0.1 s): runs
    in between are not seen one by one, except the last error among them, logged before
    the last result when it is not that result."""
    prev = rec.last_result
    before = (prev["status"], prev["reason"]) if prev is not None else None
    steps = [digest.last]
    if digest.last_error is not None and digest.last_error.uuid != digest.last.uuid:
        steps.insert(0, digest.last_error)
    title = rec.plan.title if rec.plan is not None else None
    name = f'job "{title}" ({rec.uuid})' if title else f"job {rec.uuid}"
    for result in steps:
        now = (result.status, result.reason if result.status == "error" else None)
        if before is not None and now == (before[0], before[1] if before[0] == "error" else None):
            continue
        if before is None:
            change = f"{result.status} (first result)"
        elif before[0] != result.status:
            change = f"{before[0]} -> {result.status}"
        else:
            change = "error again, another reason"
        if result.status == "error":
            log.warning("%s: %s: %s", name, change, result.reason)
        else:
            log.info("%s: %s", name, change)
        before = now


def _key(plan: RunnerConfig) -> str:
    return hashlib.sha256(_encode(plan)).hexdigest()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as e:
        log.error("cannot signal process group %d: %s", pid, e)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "with the zygote"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
