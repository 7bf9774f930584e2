"""The runner: one process per job, forked from the zygote, talking to the supervisor only
through frames on two pipes.

Its loop, top to bottom: wait for the next event or deadline; read the supervisor's frames
(RunNow), the plugin's stdout and stderr, its exit (a pidfd), and signals; then act on the
clock: time out the run, kill it after the grace, start the next one when it is due. One run
at a time, always; every run yields exactly one result.
"""

from __future__ import annotations

import _signal
import math
import os
import select
import signal
import stat
import sys
import time

import msgspec

from runner import cron, linux
from runner.framing import MAX_FRAME, Channel, FrameError
from runner.log import Log
from runner.poller import READ, Poller
from runner.selfpipe import SelfPipe
from runner.plugin import PluginError, PluginResolver
from runner.protocol import (OutputError, StdinFile, failure_reason, iso_time, new_uuid,
                             parse_assessment_output, parse_nagios_output)
from runner.jobcgroup import JobCgroup, RunCounters
from runner.landlock import Confine
from runner.sandbox import HELPER_FAILURE, PLUGIN_PATH, Sandbox, SpawnError, kill_group, sweep_orphans
from runner.results import ResultLink
from runner.units import format_duration
try:  # the usual run's mechanics in C (runner/fastpath.c); without it every run is done here
    from runner import _fastpath
except ImportError:
    _fastpath = None
from runner.wire import (AttestationResult, LastResult, PluginInfo, Publish, RunnerConfig, RunnerState, RunNow,
                         SupervisorToRunner)

STDERR_TAIL = 4096
READ_CHUNK = 65536
PIPE_WATCH_DELAY = 0.05  # a plugin still running after this has its pipes watched
SCRATCH_TICK_NS = 20_000_000  # more than a coarse clock tick (HZ 100: 10 ms)
HASH_AHEAD_MAX = 1 << 20  # the zygote hashes a plugin this small for its runner's first run (~1 ms)
_CHECKED_AHEAD: dict[tuple, PluginResolver] = {}  # in the zygote: by plugin, the last resolver that checked ahead
ACK_WAIT = 1.5  # when stopping: how long the last results may wait for the publisher's ack
_encoder = msgspec.msgpack.Encoder()
# Plugin output is read into this one buffer, not into a new 64 KiB bytes object per read
# (a malloc on the heap each time, whose pages become the runner's own). Made in the zygote:
# a runner copies only the pages its reads reach (one, for the usual short output).
_READ_BUFFER = bytearray(READ_CHUNK)
_READ_INTO = [_READ_BUFFER]
_READ_VIEW = memoryview(_READ_BUFFER)


_NO_PLUGIN = PluginInfo("", "")
FASTPATH = _fastpath is not None and not os.environ.get("ASSESSMENT_RUNTIME_NO_FASTPATH")


class _Usage:
    __slots__ = ("ru_utime", "ru_stime")

    def __init__(self, utime: float, stime: float):
        self.ru_utime, self.ru_stime = utime, stime


class Run:
    """One plugin execution in flight."""

    __slots__ = ("uuid", "start_wall", "start_mono", "deadline", "kill_at", "pid", "pidfd", "out_fd", "err_fd",
                 "stdout", "stderr_tail", "failure", "plugin", "protocol", "path", "open_pipes",
                 "watch_pipes_at")

    def __init__(self, run_uuid: str, start_wall: float, start_mono: float, deadline: float):
        self.uuid = run_uuid
        self.start_wall = start_wall
        self.start_mono = start_mono
        self.deadline = deadline
        self.kill_at: float | None = None
        self.pid = 0
        self.pidfd = -1
        self.out_fd = -1
        self.err_fd = -1
        self.stdout = bytearray()
        self.stderr_tail = bytearray()
        self.failure: str | None = None  # set when we end the run ourselves (timeout, output limit)
        self.plugin = _NO_PLUGIN
        self.open_pipes: set[int] = set()  # stdout/stderr read ends not yet at EOF
        self.watch_pipes_at = math.inf  # when the pipes join the poller (if the plugin still runs)
        self.protocol = "assessment/1"
        self.path = ""


class Runner:
    # A Runner has 28 attributes (27 here, self_pipe in _install_signals). CPython 3.11 keeps an
    # instance dict of up to 29 keys split (shared keys, about 300 bytes); a 30th makes every
    # runner's dict a 1.6 KB one of its own: count before adding one (idle runner USS +0.03 MB).
    def __init__(self, channel: Channel, cfg: RunnerConfig):
        self.channel = channel
        self.cfg = cfg
        self.log = Log(f"runner {cfg.job_uuid}", cfg.log_format, cfg.log_level)
        allowed = frozenset({0, os.getuid()})
        self.resolver = PluginResolver(cfg.plugin_dirs, cfg.plugin.name, cfg.plugin.version, allowed,
                                       cfg.plugin.sha256, cfg.require_sha256)
        self.sandbox = Sandbox(cfg.limits, cfg.run_as, {
            "PATH": PLUGIN_PATH, "LANG": "C.UTF-8",
            "ASSESSMENT_JOB_UUID": cfg.job_uuid, "ASSESSMENT_RUNTIME_UUID": cfg.runtime_uuid,
        }, cgroup=cfg.cgroup, cgroup_controllers=tuple(cfg.cgroup_controllers),
            confine=Confine(tuple(cfg.write_paths)) if cfg.confine else None, capabilities=tuple(cfg.capabilities))
        self.cgroup = JobCgroup(cfg.cgroup)
        self.stdin = StdinFile(cfg.job_json, cfg.config_json)
        self.nagios_args = self._nagios_args()
        # a cron job: its expression, zone, and the wall time (UTC epoch) of its pending fire
        self.cron = cron.parse(cfg.schedule) if cfg.schedule else None
        self.zone = cron.zone(cfg.time_zone) if self.cron else None
        self.dropped_reported = 0
        self.skipped = 0  # fire times that came while a run was still going
        self.skipped_reported = 0
        self.fire_wall: float | None = None
        self.run: Run | None = None
        self.run_now = False
        self.stopping = False
        self.leave_by: float | None = None
        self._plugin_info = PluginInfo(cfg.plugin.name, cfg.plugin.version, None)  # reused while the digest holds
        self._clean_scratch: tuple[int, int] | None = None  # (inode, ctime) of the scratch folder, emptied
        self.signals: list[int] = []
        self._fast: tuple | None = None  # (the resolution it was made for, _fast_args' answer)
        self.next_run_at = self._first_slot(time.monotonic())
        # files last, once nothing else can fail: the zygote builds runners (prepare) and must
        # not be left holding the files of one it could not build
        self.counters = RunCounters(cfg.cgroup)
        self.children_fd = linux.open_children()
        try:
            self.poller = Poller()
        except OSError:
            self.counters.close()
            if self.children_fd >= 0:
                os.close(self.children_fd)
            raise
        self.results = ResultLink(cfg.publisher_socket, MAX_FRAME + 2 * cfg.limits.output, self.poller)

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> int:
        self._install_signals()
        self.poller.register(self.channel.rfd, READ, self.on_supervisor)
        self.report_state()
        while not self.done():
            if self.results.channel is None:
                self.results.connect(time.monotonic())  # when due: at start, and after the publisher went away
            if self.results.dropped != self.dropped_reported or self.skipped != self.skipped_reported:
                self.report_state()
            if FASTPATH and self._clean_scratch is not None and self.run_fast():  # (not yet: no cost to idle runners)
                continue
            self.poller.poll(min(60.0, max(0.0, self._next_deadline() - time.monotonic())))
            if self.signals:
                self.handle_signals()
            self.tick(time.monotonic())
        self.channel.flush_blocking(5.0)
        if self.results.unacked:
            self.log.warning("leaving with %d results the publisher did not acknowledge", len(self.results.unacked))
        return 0

    def adopt(self) -> None:
        """In the runner, when the zygote built this Runner before forking it: what belongs to
        the runner's own process (its pid and parent, its /proc children list), and its first
        slot from now (building a batch takes a while: a slot picked then may have passed)."""
        self.fire_wall = None  # nothing has fired yet: the first fire time is picked again
        self.next_run_at = self._first_slot(time.monotonic())
        if self._clean_scratch is not None and self.cron is None and self.cfg.run_on_start:
            # the zygote may have emptied the scratch folder just now: a run on start waits
            # out the clock tick the fast path asks of it (check_ahead) rather than take the
            # slow one
            self.next_run_at += max(0, self._clean_scratch[1] + SCRATCH_TICK_NS - time.time_ns()) / 1e9
        self.sandbox.adopt()
        if self._fast is not None:  # made by check_ahead, in the zygote
            last, args = self._fast
            self._fast = (last, (*args[:5], self.sandbox.adopt_argv(args[5]), args[6]))
        if self.children_fd >= 0:
            os.close(self.children_fd)  # the zygote's thread's, inherited
        self.children_fd = linux.open_children()

    def fds(self) -> list[int]:
        """What this Runner holds open before its first run (besides its pipes)."""
        return [fd for fd in (self.poller.fileno(), self.counters.oom_fd, self.counters.pids_fd, self.children_fd,
                              self.stdin._rw, self.stdin._ro) if fd >= 0]

    def close(self) -> None:
        """Every file the runner holds open between runs (for the zygote's warm-up, which
        makes runners in its own process; a real runner simply exits)."""
        self.results.close()
        self.poller.close()
        self.stdin.close()
        self.counters.close()
        if self.children_fd >= 0:
            os.close(self.children_fd)
            self.children_fd = -1

    def done(self) -> bool:
        """Stopping, no run, and every result acknowledged (or no more time to wait for it)."""
        if not self.stopping or self.run is not None:
            return False
        now = time.monotonic()
        if self.leave_by is None:
            self.leave_by = now + ACK_WAIT
            self.results.await_acks()
        return not self.results.unacked or now >= self.leave_by

    def tick(self, now: float) -> None:
        run = self.run
        if run is not None:
            if run.kill_at is None and now >= run.deadline:
                self.end_run(f"timeout after {format_duration(self.cfg.timeout)}")
            elif run.kill_at is not None and now >= run.kill_at:
                kill_group(run.pid, signal.SIGKILL)
                self.cgroup.kill()
                run.kill_at = math.inf
            if now >= run.watch_pipes_at:
                run.watch_pipes_at = math.inf
                self.sandbox.release(self.cgroup.threads() or [run.pid])  # no quick check: every CPU
                for fd, reader in ((run.out_fd, self.on_stdout), (run.err_fd, self.on_stderr)):
                    if fd in run.open_pipes:
                        self.poller.register(fd, READ, reader)
        elif not self.stopping and (self.run_now or self._due(now)):
            self.start_run(now)

    def _due(self, now: float) -> bool:
        """An interval job is due on the monotonic clock. A cron job is due when the wall
        clock reaches its fire time (plus splay): the monotonic deadline is only when to look,
        moved along if the wall clock was set back; a wall clock set forward past the fire time
        makes it due at the next look (within a minute), once."""
        if self.cron is None:
            return now >= self.next_run_at
        late = time.time() - (self.fire_wall + self.cfg.splay)
        if late >= 0:
            return True
        if now >= self.next_run_at:
            self.next_run_at = now - late
        return False

    def _next_deadline(self) -> float:
        link = self.results
        reconnect = link.reconnect_at if link.channel is None else math.inf
        run = self.run
        if run is not None:
            return min(reconnect, run.watch_pipes_at, run.kill_at if run.kill_at is not None else run.deadline)
        if self.stopping:
            return min(reconnect, self.leave_by or 0.0)
        if self.run_now:
            return 0.0
        return min(reconnect, self.next_run_at)

    def _first_slot(self, now: float) -> float:
        if self.cron is None:
            return now if self.cfg.run_on_start else self._next_slot(now)
        self.run_now = self.cfg.run_on_start  # a run on start is one on demand: the fire times stay
        return self._next_slot(now)

    def _next_slot(self, after: float) -> float:
        """Runs fall on a grid of the monotonic clock offset by the job's splay, so a
        restarted runner keeps its job's rhythm instead of shifting or bursting.

        A cron job's next fire time is the first one after both the wall time at `after`
        and the fire time before (so a wall clock set back never repeats a run), delayed by
        its splay and mapped to the monotonic clock."""
        if self.cron is not None:
            wall_now, mono_now = time.time(), time.monotonic()
            base = wall_now + (after - mono_now) - self.cfg.splay
            if self.fire_wall is not None:
                base = max(base, self.fire_wall)
            self.fire_wall = self.cron.next_after(base, self.zone)
            return mono_now + (self.fire_wall + self.cfg.splay - wall_now)
        interval = self.cfg.interval
        k = math.floor((after - self.cfg.splay) / interval) + 1
        return self.cfg.splay + k * interval

    # -- events --------------------------------------------------------------------------

    def on_supervisor(self) -> None:
        try:
            frames = self.channel.read()
        except FrameError as e:
            self.log.error("bad frame from the supervisor: %s; stopping", e)
            frames = []
            self.channel.eof = True
        for frame in frames:
            if isinstance(frame, RunNow):
                self.run_now = True
        if self.channel.eof:  # the supervisor is gone: finish up and leave
            self.poller.unregister(self.channel.rfd)
            self.stop("supervisor closed the pipe")

    def on_stdout(self) -> int:
        """Read the plugin's stdout once; how many bytes came."""
        run = self.run
        if run is None:
            return 0
        chunk = self._chunk(run.out_fd)
        if chunk:
            run.stdout += chunk
            limit = self.cfg.limits.output
            if len(run.stdout) > limit:
                del run.stdout[limit:]
                self.poller.unregister(run.out_fd)
                run.open_pipes.discard(run.out_fd)
                self.end_run(f"output limit exceeded: more than {limit} bytes", signal.SIGKILL)
        return len(chunk)

    def on_stderr(self) -> int:
        """Read the plugin's stderr once; how many bytes came."""
        run = self.run
        if run is None:
            return 0
        chunk = self._chunk(run.err_fd)
        if chunk:
            run.stderr_tail += chunk
            if len(run.stderr_tail) > STDERR_TAIL:
                del run.stderr_tail[:-STDERR_TAIL]
        return len(chunk)

    def _chunk(self, fd: int) -> memoryview:
        """One read of a plugin pipe that epoll found readable (our read ends block: one
        read never does then, and this saves switching them to non-blocking each run). At
        EOF the pipe leaves the poller (an open pipe at EOF would wake it forever); it is
        closed when the run ends."""
        n = os.readv(fd, _READ_INTO)
        if not n:
            self.poller.unregister(fd)
            self.run.open_pipes.discard(fd)
        return _READ_VIEW[:n]

    def on_plugin_exit(self) -> None:
        self.finish_run()

    def _install_signals(self) -> None:
        self.self_pipe = SelfPipe((signal.SIGTERM, signal.SIGINT), self.signals)
        _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)  # not signal.signal: see runner/selfpipe.py
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        self.poller.register(self.self_pipe.reader, READ, self.self_pipe.drain)

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            self.stop(f"signal {signal.Signals(sig).name}")

    def stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.log.debug("stopping: %s", why)
        if self.run is not None:
            self.end_run("interrupted: the runner was stopped")

    # -- runs ----------------------------------------------------------------------------

    def start_run(self, now: float) -> None:
        self.run_now = False
        if self._due(now):
            self.next_run_at = self._next_slot(now)
        run = Run(new_uuid(), time.time(), now, now + self.cfg.timeout)
        self.run = run
        try:
            plugin, digest = self.resolver.resolve()
        except PluginError as e:
            return self.finish_without_spawn(run, self._explain(e.reason))
        self._set_plugin(run, plugin, digest)
        argv = [plugin.path] + (self.nagios_args if run.protocol == "nagios" else [])
        got = None
        try:
            scratch, empty = self.prepare_scratch()
            stdin_fd = self.stdin.prepare(run.uuid)
            before = time.time_ns()
            fast = self._fast_args() if FASTPATH else None
            if fast is not None:  # checks done: C starts it, collects it if quick
                got = self._fast_run(fast, 0.0, (), empty, 0, run.uuid.encode())
                got = None if got[0] == "slow" else got  # (it could not start: the spawn below says why)
            if got is None:
                run.pid, run.pidfd, run.out_fd, run.err_fd = self.sandbox.spawn(
                    argv, scratch, stdin_fd, {"ASSESSMENT_RUN_UUID": run.uuid}, network=plugin.manifest.network)
            # anything this plugin changes in scratch gets a later ctime than `empty` has
            self._clean_scratch = empty if before - empty[1] >= SCRATCH_TICK_NS else None
        except (SpawnError, OSError) as e:
            return self.finish_without_spawn(run, f"cannot start plugin {plugin.path}: {e}")
        if got is not None:
            return self._take(run, got)
        self._watch_run(run, now)

    def _watch_run(self, run: Run, started: float) -> None:
        # Most plugins are done within milliseconds and write less than a pipe holds (64 KiB):
        # their pipes are read when they exit, one wake-up per run. One still running after
        # PIPE_WATCH_DELAY gets its pipes watched, so that a large output never blocks it.
        run.open_pipes = {run.out_fd, run.err_fd}
        run.watch_pipes_at = started + PIPE_WATCH_DELAY
        self.poller.register(run.pidfd, READ, self.on_plugin_exit)

    def _set_plugin(self, run: Run, plugin, digest: str) -> None:
        """What this run runs (its PluginInfo reused while the digest holds)."""
        if self._plugin_info.sha256 != digest:
            self._plugin_info = PluginInfo(self.cfg.plugin.name, self.cfg.plugin.version, digest)
        run.plugin, run.protocol, run.path = self._plugin_info, plugin.manifest.protocol, plugin.path

    def end_run(self, reason: str, sig: int = signal.SIGTERM) -> None:
        """End the run ourselves: signal its process group, SIGKILL after the grace."""
        run = self.run
        if run.failure is None:
            run.failure = reason
        if run.pid:
            kill_group(run.pid, sig)
        if run.kill_at is None:
            run.kill_at = time.monotonic() + (0 if sig == signal.SIGKILL else self.cfg.stop_grace)

    def finish_run(self) -> None:
        run = self.run
        _, status, rusage = os.wait4(run.pid, 0)
        # Nothing the run started may outlive it: its group, then anything else in its cgroup
        # and re-parented to us. All of that descends from the plugin, and we are its
        # subreaper, so with no child left the cgroup is empty (the usual case: one read).
        kill_group(run.pid, signal.SIGKILL)
        if linux.has_children(self.children_fd):
            self.cgroup.kill()
            sweep_orphans()
        # Every writer of the pipes is gone now, so what they hold is all there will be, and
        # a read that does not fill our buffer has emptied its pipe. Only after a full one is
        # the pipe asked first (a writer passed to some other process must not block us).
        for fd, reader in ((run.out_fd, self.on_stdout), (run.err_fd, self.on_stderr)):
            while fd in run.open_pipes and reader() == READ_CHUNK and select.select([fd], [], [], 0)[0]:
                pass
        for fd in (run.out_fd, run.err_fd, run.pidfd):
            self.poller.forget(fd)
            os.close(fd)
        oom_killed, pids_exhausted = self.counters.hits()
        self.conclude(run, status, rusage, oom_killed, pids_exhausted, time.time())

    def conclude(self, run: Run, status: int, rusage, oom_killed: bool, pids_exhausted: bool, end: float) -> None:
        if run.failure is None and status == 127 << 8 and run.stderr_tail.startswith(HELPER_FAILURE):
            detail = run.stderr_tail.decode(errors="replace").strip().removeprefix("ar-exec: ")
            run.failure = f"cannot start plugin {run.path}: {detail}"
        if run.failure is not None:
            self.send_result(run, end, "error", run.failure, errors=True)
        elif run.protocol == "nagios" and os.WIFEXITED(status):
            state, reason, observations = parse_nagios_output(
                bytes(run.stdout), os.WEXITSTATUS(status), self.cfg.plugin.name, iso_time(end), run.uuid)
            self.send_result(run, end, state, reason, observations=observations, errors=state == "error")
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            try:
                out = parse_assessment_output(bytes(run.stdout))
            except OutputError as e:
                self.send_result(run, end, "error", str(e), errors=True)
            else:
                self.send_result(run, end, out.status, None, title=out.title, observations=out.observations,
                                 findings=out.findings, risks=out.risks, subjects=out.subjects, logs=out.logs)
        else:
            reason = failure_reason(status, rusage, self.cfg.limits, bytes(run.stderr_tail),
                                    oom_killed=oom_killed, pids_exhausted=pids_exhausted)
            self.send_result(run, end, "error", reason, errors=True)

    def run_fast(self) -> bool:
        """The next run, the usual way, through runner/fastpath.c: C waits until it is due,
        checks that nothing the last run's trust and scratch checks looked at has changed,
        starts the plugin and collects it if it is quick; Python only builds the result. For
        an interval job, a plugin checked before, a scratch folder known empty, with ar-exec.
        False: this turn of the loop is the usual one (nothing was done)."""
        if (self.run is not None or self.stopping or self.run_now or self.cron is not None or self.signals
                or self.results.channel is None or self._clean_scratch is None):
            return False
        fast = self._fast_args()
        if fast is None:
            return False
        got = self._fast_run(fast, self.next_run_at, fast[2], self._clean_scratch, SCRATCH_TICK_NS, b"")
        if got[0] == "wake":  # the loop has something first; the run is still due
            return False
        if got[0] == "slow":  # something changed: the checks say what, as for any run
            self.start_run(time.monotonic())
            return True
        run_uuid, start_wall, start_mono = got[1:4]
        self.run_now = False
        if self._due(start_mono):
            self.next_run_at = self._next_slot(start_mono)
        plugin, digest = fast[:2]
        run = self.run = Run(run_uuid, start_wall, start_mono, start_mono + self.cfg.timeout)
        self._set_plugin(run, plugin, digest)
        self._take(run, got)
        return True

    def _fast_run(self, fast: tuple, due: float, levels: tuple, scratch_key: tuple[int, int], scratch_age: int,
                  run_uuid: bytes) -> tuple:
        _, _, _, scratch, helper, argv, env = fast
        return _fastpath.run(self.poller.fileno(), due, levels, scratch, scratch_key, scratch_age, run_uuid,
                             self.stdin._rw, self.stdin._ro, self.stdin._head, self.stdin._tail, helper, argv, env,
                             PIPE_WATCH_DELAY, self.cfg.limits.output, self.children_fd, self.counters.oom_fd,
                             self.counters.pids_fd)

    def _take(self, run: Run, got: tuple) -> None:
        """Take over what runner/fastpath.c started: a run still going, as if start_run had
        started it; or one it collected, concluded as finish_run does."""
        run.pid = got[4]
        if got[0] == "inflight":
            run.pidfd, run.out_fd, run.err_fd = got[5:8]
            return self._watch_run(run, got[3])
        status, utime, stime, stdout, stderr, children, oom_kills, pids_max, end = got[5:]
        if children:  # nothing the run started may outlive it (finish_run)
            self.cgroup.kill()
            sweep_orphans()
        run.stdout = bytearray(stdout)
        limit = self.cfg.limits.output
        if len(run.stdout) > limit:
            del run.stdout[limit:]
            run.failure = f"output limit exceeded: more than {limit} bytes"
        run.stderr_tail = bytearray(stderr)
        before, self.counters.counters = self.counters.counters, (oom_kills, pids_max)
        self.conclude(run, status, _Usage(utime, stime), oom_kills > before[0], pids_max > before[1], end)

    def _fast_args(self) -> tuple | None:
        """What runner/fastpath.c is given for the plugin as last resolved: (plugin, digest,
        the levels its trust check stat-ed with their keys, the scratch folder, ar-exec, its
        argv, the environment), made once per resolution; None without ar-exec or before a
        plugin was resolved."""
        last = self.resolver._last
        if last is None or self.sandbox.helper is None or self.stdin._rw < 0:
            return None
        if self._fast is not None and self._fast[0] is last:
            return self._fast[1]
        keys, plugin, digest = last
        levels = []
        for plugin_dir, folder, name_dir, manifest in self.resolver._places:
            if folder != plugin.folder:  # an earlier plugin_dir without it: it must stay so
                levels.append((os.fsencode(manifest), -1))
                continue
            # what resolve() looks at again each run, in its order, each with its key
            looked = ((manifest, 0), (folder, 0), (name_dir, 0), (plugin_dir, 1), (plugin.path, 0))
            levels += [(os.fsencode(path), follow, *key) for (path, follow), key in zip(looked, keys)]
            break
        helper_argv = self.sandbox.helper_argv(self.cfg.scratch_dir, plugin.manifest.network)
        argv = helper_argv + [plugin.path] + (self.nagios_args if plugin.manifest.protocol == "nagios" else [])
        env = self.sandbox.env_for(self.cfg.scratch_dir)
        args = (plugin, digest, tuple(levels), os.fsencode(self.cfg.scratch_dir), os.fsencode(self.sandbox.helper),
                tuple(os.fsencode(a) for a in argv), tuple(os.fsencode(f"{k}={v}") for k, v in env.items()))
        self._fast = (last, args)
        self.log.debug("runs go through runner/fastpath.c (%s)", plugin.path)
        return args

    def finish_without_spawn(self, run: Run, reason: str) -> None:
        if run.plugin is _NO_PLUGIN:
            run.plugin = PluginInfo(self.cfg.plugin.name, self.cfg.plugin.version, None)
        self.send_result(run, time.time(), "error", reason, errors=True)

    def send_result(self, run: Run, end: float, status: str, reason: str | None, *, errors: bool = False,
                    title: str | None = None, observations=(), findings=(), risks=(), subjects=(), logs=()) -> None:
        cfg = self.cfg
        logs = list(logs)
        if errors:
            logs = self._error_logs(run) + logs
        result = AttestationResult(
            uuid=run.uuid, runtime_uuid=cfg.runtime_uuid, job_uuid=cfg.job_uuid, job_revision=cfg.revision,
            plugin=run.plugin, title=title or cfg.title, labels=cfg.labels,
            assessment_plan_uuid=cfg.assessment_plan_uuid, component_uuid=cfg.component_uuid,
            control_id=cfg.control_id, start=iso_time(run.start_wall), end=iso_time(end),
            status=status, reason=reason, observations=list(observations), findings=list(findings),
            risks=list(risks), subjects=list(subjects), logs=logs)
        if reason:  # the supervisor logs status changes and errors (with the job's title)
            self.log.debug("run %s: %s: %s", run.uuid, status, reason)
        self.run = None
        if not self.stopping:
            self._skip_missed(time.monotonic())
        self.results.publish(run.uuid, Publish(
            job_uuid=cfg.job_uuid, last=LastResult(run.uuid, status, reason, result.end),
            duration=time.monotonic() - run.start_mono, next_run_at=None if self.stopping else self.next_run_at,
            result=msgspec.Raw(_encoder.encode(result)), job_revision=cfg.revision, job_title=cfg.title))

    def _skip_missed(self, now: float) -> None:
        """Fire times that came while the run was going are skipped, and counted: never two
        runs of a job at once, and no late run right after a long one."""
        if self.cron is None:
            if now >= self.next_run_at:
                self.skipped += math.floor((now - self.next_run_at) / self.cfg.interval) + 1
                self.next_run_at = self._next_slot(now)
            return
        wall_now = time.time()
        wall = wall_now - self.cfg.splay
        missed = 0
        while self.fire_wall <= wall and missed < 10_000:
            missed += 1
            self.fire_wall = self.cron.next_after(self.fire_wall, self.zone)
        if self.fire_wall <= wall:  # the wall clock jumped far ahead: count no more, go on from now
            self.fire_wall = self.cron.next_after(wall, self.zone)
        if missed:
            self.skipped += missed
            self.next_run_at = now + (self.fire_wall + self.cfg.splay - wall_now)

    @staticmethod
    def _error_logs(run: Run) -> list[dict]:
        logs = []
        if run.stderr_tail:
            logs.append({"stream": "stderr", "text": run.stderr_tail.decode("utf-8", errors="replace")})
        if run.stdout and run.failure is None:
            logs.append({"stream": "stdout", "text": bytes(run.stdout[:1024]).decode("utf-8", errors="replace")})
        return logs

    def report_state(self) -> None:
        try:
            self.dropped_reported = self.results.dropped
            self.skipped_reported = self.skipped
            self.channel.send(RunnerState(running=self.run is not None,
                                          next_run_at=None if self.stopping else self.next_run_at,
                                          dropped=self.results.dropped, skipped=self.skipped))
        except BrokenPipeError:
            self.stopping = True

    def check_ahead(self) -> None:
        """In the zygote, before the fork (see prepare): what a first run checks and makes, so
        that the runner's first run, like every later one, goes through runner/fastpath.c.

        The plugin's resolution (trust, plugin.toml, sha256), the emptied scratch folder, the
        stdin memfd and the fast path's arguments: made in the runner, they copy about 0.4 MB of
        pages it shares with the zygote (tomllib, hashlib, os.path, the checks), and on 3.11
        nothing gives them back. The fast path stats again everything these checks looked at
        before it starts the plugin, and hands the run to Python if anything changed, as it
        does for every later run. Not done when it would hold up the zygote (an entrypoint
        larger than HASH_AHEAD_MAX, leftovers in the scratch folder) or cannot help (no fast
        path); what fails is left for the first run, which says why."""
        if not FASTPATH or self.sandbox.helper is None:
            return
        try:
            with os.scandir(self.cfg.scratch_dir) as entries:
                if next(entries, None) is not None:
                    return
        except FileNotFoundError:
            pass
        except OSError:
            return
        try:
            alike = _CHECKED_AHEAD.get(self.resolver.identity)
            if alike is not None:
                self.resolver.learn_from(alike)
            self.resolver.resolve(hash_max=HASH_AHEAD_MAX)
            if len(_CHECKED_AHEAD) >= 256:
                _CHECKED_AHEAD.clear()
            _CHECKED_AHEAD[self.resolver.identity] = self.resolver
            _, empty = self.prepare_scratch()
            self.stdin.prepare(new_uuid())  # the memfd; each run writes its own document
            if self._fast_args() is None:
                return
        except Exception:  # noqa: BLE001 - ahead of time only: the first run checks again and says why
            return
        self._clean_scratch = empty  # nothing has run since: empty, even within the clock tick

    def prepare_scratch(self) -> tuple[str, tuple[int, int]]:
        """The job's private folder, mode 0700, owned by the run user, empty at each run;
        and its (inode, ctime) as it is now, empty.

        A folder whose inode and ctime are those it had when we last left it empty is still
        empty and ours: creating or removing an entry, chmod and chown all change the ctime,
        and the plugin cannot set it back. start_run trusts that only once the plugin that
        ran after we looked started well after that ctime (timestamps are coarse: a change
        in the same clock tick would not show)."""
        path = self.cfg.scratch_dir
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        if (st.st_ino, st.st_ctime_ns) == self._clean_scratch:
            return path, self._clean_scratch
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            os.mkdir(path, 0o700)
            st = os.lstat(path)
        with os.scandir(path) as entries:
            leftovers = [e.name for e in entries]
        for name in leftovers:
            _remove_tree(os.path.join(path, name))
        changed = False
        if self.cfg.run_as is not None and (st.st_uid, st.st_gid) != tuple(self.cfg.run_as):
            os.chown(path, *self.cfg.run_as)
            changed = True
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700)
            changed = True
        if leftovers or changed:
            st = os.lstat(path)
        return path, (st.st_ino, st.st_ctime_ns)

    def _explain(self, reason: str) -> str:
        """A url plugin that is not there yet: say why, with the last download error."""
        if not reason.startswith("plugin not found") or self.cfg.plugin_note is None:
            return reason
        detail = self.cfg.plugin_note
        try:
            with open(self.cfg.download_error_file, encoding="utf-8", errors="replace") as f:
                detail = f.read(2000).strip() or detail
        except (OSError, TypeError):
            pass
        return f"{reason} ({detail})"

    def _nagios_args(self) -> list[str]:
        args = msgspec.json.decode(self.cfg.config_json).get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            self.log.warning("config.args is not a list of strings; ignored")
            return []
        return args


def _remove_tree(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o700)
        with os.scandir(path) as entries:
            names = [e.name for e in entries]
        for name in names:
            _remove_tree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


class Prepared:
    """A runner made ready in the zygote before the fork (see prepare)."""

    __slots__ = ("channel", "frames", "runner", "fds")

    def __init__(self, channel: Channel, frames: list, runner: Runner | None):
        self.channel, self.frames, self.runner = channel, frames, runner
        self.fds = runner.fds() if runner is not None else []


def prepare(rfd: int, wfd: int, wait: float) -> Prepared:
    """In the zygote, before forking a runner: read its RunnerConfig (the supervisor writes it
    as it asks for the runner; waiting up to `wait` seconds) and build its Runner.

    Reading and decoding the config, building a Runner and checking ahead for its first run
    touch about 1.1 MB of pages that runners share with the zygote (reference counts,
    caches): done in each runner, each would copy them. Done here, for a whole batch before
    its forks, every runner of the batch shares them. Whatever goes wrong is left for the
    runner to find again and report (a frame not yet complete, a config it cannot build
    from): this never raises."""
    channel = Channel(rfd, wfd, SupervisorToRunner, max_frame=MAX_FRAME)
    frames: list = []
    try:
        if select.select([rfd], [], [], wait)[0]:
            frames = channel.read()
        if frames and isinstance(frames[0], RunnerConfig):
            runner = Runner(channel, frames[0])
            runner.check_ahead()
            return Prepared(channel, frames, runner)
    except Exception:  # noqa: BLE001 - the runner meets it again and reports it
        pass
    return Prepared(channel, frames, None)


def serve(prepared: Prepared) -> int:
    """Entry point in the forked child: read the RunnerConfig frame (unless the zygote did),
    then run the loop."""
    linux.set_child_subreaper()
    channel, frames, runner = prepared.channel, prepared.frames, prepared.runner
    deadline = time.monotonic() + 30
    while not frames and not channel.eof and time.monotonic() < deadline:
        select.select([channel.rfd], [], [], 1.0)
        frames = channel.read()
    if not frames or not isinstance(frames[0], RunnerConfig):
        print("runner: no RunnerConfig from the supervisor", file=sys.stderr)
        return 2
    cfg = frames[0]
    linux.set_process_name("ar-runner")
    linux.set_title(f"assessment-runtime: runner {cfg.job_uuid} {cfg.plugin.name}@{cfg.plugin.version}")
    if runner is None:
        runner = Runner(channel, cfg)
    else:
        runner.adopt()
    for frame in frames[1:]:
        if isinstance(frame, RunNow):
            runner.run_now = True
    return runner.serve()
