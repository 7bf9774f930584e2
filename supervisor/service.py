"""The supervisor: `assessment-runtime run`.

One loop, in the manner of gunicorn's Arbiter. Each turn: wait for an event (a runner's or
the publisher's pipe, the zygote, the control socket, a signal or a thread's wake-up through
the self-pipe) or the next timer; then handle queued signals, re-read sources that asked for
it, reconcile runners with the store (level-triggered, every resync_interval and right after
the store changes), SIGKILL runners that outlived their grace, and restart the publisher or
zygote if either died.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import resource
import selectors
import shutil
import signal
import time
from typing import TYPE_CHECKING

import msgspec

from supervisor.log import setup_logging
from runner.protocol import iso_time
from runner import cron, landlock
from runner.selfpipe import SelfPipe
from runner.units import enc_hook, format_duration
from runner.wire import PublisherSettings, PublisherStats
from supervisor import __version__
from supervisor.cgroups import CgroupTree
from supervisor.config import Config, ConfigError, check_sink_files, load_config, load_runtime_uuid, save_runtime_uuid
from supervisor.control import ControlServer, json_response
from supervisor.publisher_link import PublisherLink
from supervisor.downloads import Downloader
from supervisor.folder import FolderWatcher, read_specs_folder
from supervisor.manager import JobManager, ZygoteLink, backoff_delay, runner_config
from supervisor.metrics import Metrics
from supervisor.notify import Notifier
from supervisor.identities import Identities
from supervisor.users import resolve_plugin_users
from supervisor.store import Rejection, SpecStore

if TYPE_CHECKING:
    from supervisor.sync import ConfigSync, SyncResult

log = logging.getLogger("supervisor")

_RUN_PATH = re.compile(r"^/jobs/([^/]+)/run$")


class SourceState:
    """What status shows of one spec source."""

    def __init__(self, kind: str, location: str):
        self.kind = kind
        self.location = location
        self.revision: str | None = None
        self.last_success: str | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.rejected: list[Rejection] = []

    def succeeded(self, revision: str | None) -> None:
        self.revision = revision
        self.last_success = iso_now()
        self.last_error = None
        self.consecutive_failures = 0

    def failed(self, error: str) -> None:
        self.last_error = error
        self.consecutive_failures += 1

    def as_dict(self) -> dict:
        return {"kind": self.kind, "location": self.location, "revision": self.revision,
                "last_success": self.last_success, "last_error": self.last_error,
                "consecutive_failures": self.consecutive_failures}


class Service:
    def __init__(self, config_file: str):
        self.config_file = config_file
        self.config: Config = load_config(config_file)
        check_sink_files(self.config, config_file)  # hub token_file mode, ca_file: exit 78
        self.users = resolve_plugin_users(self.config)
        if self.config.configuration is not None:  # token_file mode, ca_file: exit 78 before anything starts
            from supervisor.sync import check_source  # (sync imports urllib3 and ssl: only when configured)
            try:
                check_source(self.config.configuration)
            except ConfigError as e:
                raise ConfigError(f"{config_file}: {e}") from None
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.started_at = iso_now()
        self.stopping = False
        self.store_dirty = True
        self.folder_dirty = True
        self.next_resync = 0.0
        self.runtime_uuid_unsaved = False  # generated, not yet written to state_dir (tried every resync)
        self.next_child_check = 0.0
        self.metrics = Metrics()
        self.notifier = Notifier.from_environ()  # systemd: READY/STATUS/WATCHDOG/STOPPING
        self.cgroups = CgroupTree()
        self.identities: Identities | None = None  # root with user_per_job: each job's own uid
        self.downloader: Downloader | None = None
        self.zygote = ZygoteLink()
        self.manager = JobManager(self.selector, self.zygote)
        self.publisher = PublisherLink(self.selector, self.on_publisher_stats)
        self.folder_source: SourceState | None = None
        self.watcher: FolderWatcher | None = None
        self.http_source: SourceState | None = None
        self.config_sync: ConfigSync | None = None
        self.zygote_restart_at: float | None = None
        self.zygote_failures = 0
        self.rejected: list[Rejection] = []

    # -- start ---------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        setup_logging("supervisor", cfg.log_format, cfg.log_level)
        # state_dir is traversable but not listable, so a plugin running as run_as_user can
        # reach its own scratch folder (0700, its own) and nothing else
        scratch = os.path.join(cfg.state_dir, "scratch")
        for folder, mode in ((cfg.state_dir, 0o711), (scratch, 0o711), (cfg.run_dir, 0o755)):
            try:
                os.makedirs(folder, mode=mode, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{self.config_file}: cannot create {folder}: {e.strerror}") from None
        os.chmod(scratch, 0o711)
        self.runtime_uuid = load_runtime_uuid(cfg)
        self.runtime_uuid_unsaved = not cfg.runtime_uuid and not self._runtime_uuid_stored()
        self.identities = self.make_identities(cfg)
        self.landlock_abi = landlock.abi()
        if cfg.jobs.confine and self.landlock_abi == 0:
            log.warning("this kernel has no Landlock: plugins run unconfined (jobs.confine is on)")
        _raise_fd_limit()
        self.store = SpecStore(cfg.state_dir)
        self.store.load()
        self.manager.stop_grace = cfg.jobs.stop_grace
        # signals arrive through a self-pipe and are handled in the loop, never in the handler
        self.self_pipe = SelfPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD), self.signals)
        self.selector.register(self.self_pipe.reader, selectors.EVENT_READ, self.self_pipe.drain)
        self.cgroups.setup(self.runtime_uuid)  # before any child: they inherit our (leaf) cgroup
        self.zygote.start()
        self.selector.register(self.zygote.sock, selectors.EVENT_READ, self.read_zygote)
        self.publisher.listen(cfg.run_dir)  # before any runner: they connect to it
        self.publisher.start(self.publisher_settings(), time.monotonic())
        self.control = ControlServer(os.path.join(cfg.run_dir, "control.sock"), self.selector, self.handle_request)
        self.control.listen()
        self.start_sources()
        self.start_downloader()
        log.info("assessment-runtime %s started (runtime %s, %d stored specs)", __version__, self.runtime_uuid,
                 sum(len(s) for s in self.store.specs.values()))

    def start_sources(self) -> None:
        self.start_folder_source()
        self.start_config_sync()

    def start_folder_source(self) -> None:
        cfg = self.config
        if cfg.specs is not None:
            self.folder_source = SourceState("dir", cfg.specs.dir)
            self.watcher = FolderWatcher(cfg.specs.dir, self.notify_folder, cfg.jobs.resync_interval)
            self.watcher.start()
        else:
            self._store_write(self.store.replace, "dir", {})  # a source taken out of the config no longer runs its specs
        self.folder_dirty = True

    def _store_write(self, write, *args, **kwargs) -> bool:
        """A store write whose failure (full or read-only state_dir) is logged, not fatal: the
        store keeps what it had (the next start or change tries again)."""
        try:
            write(*args, **kwargs)
            return True
        except OSError as e:
            log.error("cannot write the spec store: %s; keeping the last good specs", e)
            return False

    def start_config_sync(self, previous=None) -> None:
        """The [configuration] source: its worker thread asks the service at once; until it
        answers, the stored specs (and revision, when it is for this endpoint) are used."""
        settings = self.config.configuration
        if settings is None:
            if self._store_write(self.store.replace, "http", {}, rejected=[]):
                self._store_write(self.store.forget_revision, "http")
            return
        self.http_source = SourceState("http", settings.url)
        from supervisor.sync import ConfigSync  # urllib3 and ssl: ~7 MB, only with a [configuration] source
        try:
            self.config_sync = ConfigSync(settings, self.runtime_uuid, self.wake, previous)
        except ConfigError as e:  # checked before; only a file changed since then gets here
            self.http_source.failed(str(e))
            log.error("configuration service: %s", e)
            return
        try:
            if self.store.claim("http", self.config_sync.location):
                log.info("configuration service: the stored revision is for another endpoint; asking for the full set")
        except OSError as e:  # the revision is forgotten in memory first: the next answer is a full set
            log.error("configuration service: cannot store its location: %s", e)
            self.http_source.failed(f"cannot store the location: {e}")
        self.http_source.revision = self.store.revisions["http"]
        self.config_sync.start()

    def start_downloader(self) -> None:
        if self.config.plugin_store.allow_download:
            self.downloader = Downloader(self.config.state_dir, self.config.plugin_store)
            self.downloader.start()

    def stop_downloader(self) -> None:
        if self.downloader is not None:
            self.downloader.stop()
            self.downloader = None

    def stop_sources(self) -> None:
        self.stop_folder_source()
        self.stop_config_sync()

    def stop_folder_source(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self.folder_source = None

    def stop_config_sync(self):
        """Stop the worker; returns its thread (a request in flight may still be ending)."""
        sync, self.config_sync, self.http_source = self.config_sync, None, None
        if sync is None:
            return None
        sync.stop()
        return sync.thread

    def publisher_settings(self) -> PublisherSettings:
        cfg = self.config
        return PublisherSettings(state_dir=cfg.state_dir,
                                 publisher=msgspec.Raw(msgspec.msgpack.encode(cfg.publisher, enc_hook=enc_hook)),
                                 log_format=cfg.log_format, log_level=cfg.log_level)

    def notify_folder(self) -> None:
        """Called from the watcher thread: flag it and wake the loop."""
        self.folder_dirty = True
        self.wake()

    def wake(self) -> None:
        """Called from any thread: the loop wakes up and looks at everything."""
        self.self_pipe.wake()

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        while True:
            now = time.monotonic()
            timeout = max(0.0, self._next_timer(now) - now)
            for key, mask in self.selector.select(timeout):
                key.data()
            now = time.monotonic()
            self.control.expire(now)
            self.handle_signals(now)
            if self.stopping:
                break
            self.sync_sources(now)
            if self.store_dirty or now >= self.next_resync or self.manager.due(now):
                self.manage_runners(now)
            if self.manager.dying:
                self.manager.murder_runners(now)
            if self.manager.unflushed:
                self.manager.flush_channels()
            self.publisher.flush()
            restart_due = any(t is not None and now >= t for t in (self.publisher.restart_at, self.zygote_restart_at))
            if now >= self.next_child_check or restart_due:  # SIGCHLD is the fast path; this is the safety net
                self.next_child_check = now + 1.0
                self.publisher.check(now)
                self.check_zygote(now)
            self.notifier.tick(self, now)  # READY once the publisher is up; watchdog from the loop itself
        return self.shutdown()

    def _next_timer(self, now: float) -> float:
        timers = [self.next_resync, self.next_child_check, self.manager.next_timer(), self.notifier.next_timer(),
                  self.control.next_timer()]
        timers += [t for t in (self.publisher.restart_at, self.zygote_restart_at) if t is not None]
        if self.folder_dirty:
            timers.append(now)
        if self.manager.unflushed:  # frames a runner's pipe could not take yet (a large config): soon again
            timers.append(now + 0.01)
        if self.config_sync is not None:
            timers.append(self.config_sync.next_timer())
        return min(timers)

    def handle_signals(self, now: float) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: stopping", signal.Signals(sig).name)
                self.stopping = True
            elif sig == signal.SIGHUP:
                self.reload(now)
            elif sig == signal.SIGCHLD:
                self.publisher.check(now)
                self.check_zygote(now)

    def sync_sources(self, now: float) -> None:
        """Both spec sources. The folder is re-read when its watcher or the resync timer asks.
        The Configuration service's answers are applied as they arrive, and it is asked again
        when due; the request itself runs in ConfigSync's thread, never here."""
        if self.folder_source is not None and (self.folder_dirty or now >= self.next_resync):
            self.read_folder()
        if self.config_sync is not None:
            for result in self.config_sync.finished():
                self.take_answer(result, now)
            self.config_sync.start_if_due(now, self.store.revisions["http"])

    def read_folder(self) -> None:
        self.folder_dirty = False
        source = self.folder_source
        try:
            specs, rejected = read_specs_folder(source.location)
        except OSError as e:
            source.failed(f"cannot read {source.location}: {e.strerror}")
            self.metrics.source_synced("dir", "failed")
            log.error("spec folder: %s; keeping the stored specs", source.last_error)
            return
        source.rejected = rejected
        for r in rejected:
            log.warning("rejected spec (%s): %s", r.uuid or "no uuid", r.reason)
        try:
            changed = self.store.replace("dir", specs)
        except OSError as e:  # a full or read-only state_dir: not applied; the last good specs keep running
            self.store_dirty = True  # (a batch cut short may have changed some: reconcile what the store holds)
            source.failed(f"cannot store the specs: {e}; the last good specs keep running")
            self.metrics.source_synced("dir", "failed")
            log.error("spec folder: %s; trying again in %.0fs", source.last_error, self.config.jobs.resync_interval)
            return
        if changed:
            self.store_dirty = True
        source.succeeded(_folder_revision(specs))
        self.metrics.source_synced("dir", "ok")

    def take_answer(self, result: SyncResult, now: float) -> None:
        """One answer of the Configuration service (main thread: store and status are ours)."""
        source, sync = self.http_source, self.config_sync
        self.metrics.source_synced("http", result.outcome)
        if result.outcome == "gone":
            log.info("configuration service: revision %s is gone (410); asking for the full set", result.since)
            try:
                self.store.forget_revision("http")
            except OSError as e:  # forgotten in memory: the next request asks for the full set
                log.error("configuration service: cannot remove the stored revision: %s", e)
            source.revision = None
            sync.settle(now, ok=True, at_once=True)
            return
        from supervisor.sync import SyncResult, apply_to_store  # (imported already: an answer came)
        if result.outcome in ("snapshot", "delta"):
            try:
                apply_to_store(self.store, result)
            except OSError as e:
                result = SyncResult(outcome="failed", since=result.since, error=f"cannot store the answer: {e}")
            self.store_dirty = True  # reconcile, and show the new rejections
        if result.outcome == "failed":
            source.failed(result.error)
            delay = sync.settle(now, ok=False)
            log.warning("configuration service: %s; keeping the last good specs; next try in %.1fs",
                        result.error, delay)
            return
        for r in result.rejected:
            log.warning("rejected spec (%s): %s", r.uuid or "no uuid", r.reason)
        source.succeeded(self.store.revisions["http"])
        sync.settle(now, ok=True)
        if result.outcome == "not_modified":
            log.debug("configuration service: revision %s not modified (%.3fs)", result.since, result.seconds)
        else:
            log.info("configuration service: %s %s: %d upserted, %d deleted, %d rejected (%.3fs)", result.outcome,
                     result.revision, len(result.upserted), len(result.deleted), len(result.rejected), result.seconds)

    def _runtime_uuid_stored(self) -> bool:
        try:
            with open(os.path.join(self.config.state_dir, "runtime_uuid"), encoding="ascii") as f:
                return f.read().strip() == self.runtime_uuid
        except (OSError, ValueError):
            return False

    def manage_runners(self, now: float) -> None:
        if self.runtime_uuid_unsaved and now >= self.next_resync and save_runtime_uuid(self.config, self.runtime_uuid):
            log.info("runtime_uuid %s is now stored in %s", self.runtime_uuid, self.config.state_dir)
            self.runtime_uuid_unsaved = False
        self.store_dirty = False
        self.next_resync = now + self.config.jobs.resync_interval
        specs, clashes = self.store.desired()
        self.rejected = clashes + list(self.store.problems)
        if self.folder_source is not None:
            self.rejected += self.folder_source.rejected
        self.rejected += self.store.rejections["http"]
        if self.zygote.sock is None:
            return
        socket_path = self.publisher.socket_path
        uids: dict[str, int] = {}
        if self.identities is not None:
            uids = self.identities.assign(specs)
            for uuid in [u for u in specs if u not in uids]:
                del specs[uuid]
                self.rejected.append(Rejection(uuid, "runtime", f"no free uid left in jobs.uid_range "
                                                                f"{self.config.jobs.uid_range}"))
        desired = {uuid: (spec, runner_config(spec, self.config, self.runtime_uuid, self.users, self.cgroups,
                                              socket_path, uids.get(uuid)))
                   for uuid, spec in specs.items()}
        self.manager.manage_runners(desired, now)
        if self.zygote.pending or self.zygote.gone:
            self.read_zygote()  # answers read aside while spawning
        if self.downloader is not None:
            self.downloader.want(specs)
        self.release_jobs({uuid for uuid, rec in self.manager.runners.items() if rec.alive} | set(desired))

    def release_jobs(self, keep: set[str]) -> None:
        """What a deleted job held, once its runner is gone: its cgroup, its uid, its scratch folder."""
        self.cgroups.prune(keep)
        if self.identities is not None:
            self.identities.release(keep)
        scratch = os.path.join(self.config.state_dir, "scratch")
        try:
            names = os.listdir(scratch)
        except OSError:
            return
        for name in names:
            if name not in keep:
                shutil.rmtree(os.path.join(scratch, name),
                              onerror=lambda _f, path, exc: log.warning("cannot remove %s: %s", path, exc[1]))

    def make_identities(self, cfg: Config) -> Identities | None:
        if os.geteuid() != 0 or not cfg.jobs.user_per_job:
            return None
        first, last = cfg.jobs.id_range()
        if self.identities is not None and (self.identities.first, self.identities.last) == (first, last):
            return self.identities
        return Identities(cfg.state_dir, first, last)

    def read_zygote(self) -> None:
        messages = self.zygote.messages()
        now = time.monotonic()
        if messages:
            self.manager.zygote_said(messages, now)
            for msg in messages:
                if hasattr(msg, "status"):
                    self.metrics.runner_exited()
        if messages is None:
            self.zygote_gone(now)

    def zygote_gone(self, now: float) -> None:
        if self.zygote.sock is not None:
            self.selector.unregister(self.zygote.sock)
        self.zygote.stop(timeout=2.0)
        self.manager.zygote_lost(now)
        if self.stopping:
            return
        self.zygote_failures += 1
        self.zygote_restart_at = now + backoff_delay(self.zygote_failures)
        log.error("zygote died; starting a new one in %.1fs", self.zygote_restart_at - now)

    def check_zygote(self, now: float) -> None:
        proc = self.zygote.proc
        if proc is not None and proc.poll() is not None:
            self.zygote_gone(now)
        if self.zygote.sock is None and self.zygote_restart_at is not None and now >= self.zygote_restart_at:
            self.zygote_restart_at = None
            self.zygote.start()
            self.selector.register(self.zygote.sock, selectors.EVENT_READ, self.read_zygote)
            self.store_dirty = True

    def on_publisher_stats(self, stats: PublisherStats) -> None:
        for digest in stats.jobs:
            self.manager.take_digest(digest)
            self.metrics.runs_committed(digest)

    # -- reload and stop -----------------------------------------------------------------

    def reload(self, now: float) -> None:
        old_settings = self.config.configuration
        try:
            config = load_config(self.config_file)
            check_sink_files(config, self.config_file)
            users = resolve_plugin_users(config)
            if config.configuration is not None and config.configuration != old_settings:
                from supervisor.sync import check_source
                check_source(config.configuration)
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", e)
            return
        old = self.config
        self.config, self.users = config, users
        self.identities = self.make_identities(config)
        setup_logging("supervisor", config.log_format, config.log_level)
        self.manager.stop_grace = config.jobs.stop_grace
        if config.specs != old.specs or config.jobs.resync_interval != old.jobs.resync_interval:
            self.stop_folder_source()
            self.start_folder_source()
        if config.configuration != old.configuration:
            self.start_config_sync(previous=self.stop_config_sync())
        if self.publisher_settings() != self.publisher.settings:
            log.info("publisher settings changed: restarting the publisher")
            self.publisher.stop(timeout=20.0)
            self.publisher.stopping = False
            self.publisher.start(self.publisher_settings(), now)
        if config.plugin_store != old.plugin_store or config.state_dir != old.state_dir:
            self.stop_downloader()
            self.start_downloader()
        self.store_dirty = True
        log.info("config reloaded from %s", self.config_file)

    def shutdown(self) -> int:
        """Stop runners (grace, then SIGKILL), hand their last results over, flush, exit 0."""
        self.notifier.stopping(f"stopping: {self.manager.alive_count} runners")
        now = time.monotonic()
        self.stop_sources()
        self.stop_downloader()
        self.control.close()
        self.manager.stop_all(now)
        deadline = now + self.config.jobs.stop_grace + 10.0
        while self.manager.alive_count and time.monotonic() < deadline:
            for key, _ in self.selector.select(0.2):
                key.data()
            self.signals.clear()
            now = time.monotonic()
            self.manager.murder_runners(now)
            self.publisher.flush()
            self.publisher.check(now)
        self.publisher.stop(timeout=20.0)
        self.publisher.close()
        self.zygote.stop(timeout=5.0)
        self.cgroups.close()
        log.info("stopped")
        return 0

    def sandbox_info(self) -> dict:
        """`sandbox` in status (SPEC §8): cgroup version, Landlock ABI, per-job users, and what
        confinement the kernel gives (each Landlock feature by the ABI it needs)."""
        abi = self.landlock_abi
        confine = self.config.jobs.confine and abi > 0
        return {"cgroup": self.cgroups.version, "landlock_abi": abi, "user_per_job": self.identities is not None,
                "confine": {"filesystem": confine, "network": confine and abi >= 4,
                            "signals_and_abstract_sockets": confine and abi >= 6},
                **{k: v for k, v in self.cgroups.info().items() if k != "cgroup"}}

    # -- control socket ------------------------------------------------------------------

    def handle_request(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path == "/status":
            if method != "GET":
                return json_response(405, {"error": "use GET"})
            return json_response(200, self.status())
        if path == "/metrics":
            if method != "GET":
                return json_response(405, {"error": "use GET"})
            return 200, "text/plain; version=0.0.4", self.metrics.render(self).encode()
        m = _RUN_PATH.match(path)
        if m:
            if method != "POST":
                return json_response(405, {"error": "use POST"})
            uuid = m.group(1)
            if uuid not in self.manager.runners:
                return json_response(404, {"error": f"unknown job {uuid}"})
            if not self.manager.run_now(uuid):
                return json_response(409, {"error": f"job {uuid} has no runner right now"})
            return json_response(202, {"job": uuid, "run": "requested"})
        return json_response(404, {"error": f"no such path {path}"})

    def status(self) -> dict:
        now = time.monotonic()
        jobs = []
        for rec in sorted(self.manager.runners.values(), key=lambda r: r.uuid):
            job = rec.spec.job if rec.spec else None
            jobs.append({
                "uuid": rec.uuid,
                "title": job.title if job else None,
                "plugin": job.plugin.label if job else None,
                "revision": rec.spec.revision if rec.spec else None,
                "state": rec.state,
                "pid": rec.pid,
                "uid": rec.plan.run_as[0] if rec.plan and rec.plan.run_as else None,
                "runs": rec.runs,
                "skipped": rec.skipped,
                "restarts": rec.restarts,
                "schedule": _schedule_text(rec.plan),
                **_next_run(rec, now),
                "last_result": rec.last_result,
            })
        sources = [s.as_dict() for s in (self.http_source, self.folder_source) if s is not None]
        stats = self.publisher.stats
        sink_kinds = {s.name: s.kind for s in self.config.publisher.sink}
        return {
            "runtime_uuid": self.runtime_uuid,
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "sources": sources,
            "jobs": jobs,
            "rejected": [msgspec.to_builtins(r) for r in self.rejected],
            "sandbox": self.sandbox_info(),
            "publisher": {
                "pid": self.publisher.pid,
                "outbox_results": stats.outbox_results if stats else 0,
                "outbox_bytes": stats.outbox_bytes if stats else 0,
                "dropped": (stats.dropped if stats else 0) + self.manager.dropped,
                "outbox_error": stats.outbox_error if stats else None,
                "outbox_write_errors": stats.outbox_write_errors if stats else 0,
                "waiting": stats.waiting if stats else 0,
                "waiting_bytes": stats.waiting_bytes if stats else 0,
                "sinks": [msgspec.to_builtins(s) for s in stats.sinks] if stats else
                         [{"name": n, "kind": k, "delivered": 0, "pending": 0, "failures": 0, "dead_lettered": 0,
                           "last_error": None} for n, k in sink_kinds.items()],
            },
        }


def _schedule_text(plan) -> str | None:
    """"5m" for an interval job, the cron expression for a cron job."""
    if plan is None:
        return None
    return plan.schedule if plan.schedule is not None else format_duration(plan.interval)


def _next_run(rec, now: float) -> dict:
    """next_run_in (seconds) and next_run_at (ISO, UTC) of the job's next run. The
    publisher's digest that told us may be a second old: a time already past moves on along
    the job's grid, or to the cron job's next fire time."""
    at = rec.next_run_at
    if at is None:
        return {"next_run_in": None, "next_run_at": None}
    wall = time.time()
    if at < now and rec.plan is not None and not rec.running:
        if rec.plan.schedule is None:
            at += math.ceil((now - at) / rec.plan.interval) * rec.plan.interval
        else:
            try:
                fire = cron.next_after(rec.plan.schedule, wall - rec.plan.splay, rec.plan.time_zone)
                at = now + fire + rec.plan.splay - wall
            except ValueError:
                pass
    wait = max(0.0, at - now)
    return {"next_run_in": round(wait, 3), "next_run_at": iso_time(wall + wait)}


def iso_now() -> str:
    return iso_time(time.time())


def _folder_revision(specs: dict) -> str:
    h = hashlib.sha256()
    for uuid in sorted(specs):
        h.update(f"{uuid}:{specs[uuid].revision};".encode())
    return h.hexdigest()[:16]


def _raise_fd_limit() -> None:
    """Two pipe ends per runner: a thousand jobs need more than the usual 1024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            if getattr(e, "errno", None) != errno.EPERM:
                log.warning("cannot raise the open files limit: %s", e)
