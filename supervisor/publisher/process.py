"""The publisher process: takes results from the runners, stores them durably, delivers them
to the sinks.

    python -m supervisor.publisher RFD WFD PARENT_PID LISTEN_FD

RFD/WFD are pipes to the supervisor: it sends PublisherSettings once; we send PublisherStats
about once a second (outbox, sinks, and a digest of each job's results for status and
metrics). LISTEN_FD is a listening Unix stream socket the supervisor holds across our
restarts: each runner connects to it and sends its results (Publish) directly, so the
supervisor is not on the result path.

The main thread's loop, top to bottom: wait for a runner's socket, a new connection, the
supervisor's pipe, a signal, or the next timer; read every frame the sockets hold; once a
result has been read, sleep until its coalescing window (COALESCE) has passed, read what
came meanwhile, append it all to the outbox with one fsync (group commit across runners:
one wake-up and one fsync per window, not per result), and only then
acknowledge each result to the runner that sent it (SPEC §7: a result is acknowledged once
it is on disk); about once a second, save the sink cursors and send PublisherStats. Delivery
runs in one thread per sink (delivery.py).

When the outbox cannot be written (a full or read-only state_dir, an I/O error), nothing
is acknowledged and we do not exit: the results wait here in memory, in order, up to
memory_max bytes of result payload (past it the oldest are forgotten and counted in
`dropped`: never acknowledged, so their runners still hold them, up to their own bound; once
the outbox takes writes again we close those runners' connections, so that they reconnect and
send everything unacknowledged again). The append is tried again about once a second
(OUTBOX_RETRY); the first that succeeds writes, acknowledges and delivers everything waiting.
Status and metrics show the error meanwhile (PublisherStats.outbox_error).

A runner that sends a frame that does not decode loses its connection (its results that were
not acknowledged are sent again when it reconnects); nothing else is affected.

Stopping (EOF on the supervisor's pipe, SIGTERM, SIGINT): commit and acknowledge what was
read, give the sinks up to DRAIN_TIMEOUT to deliver what is pending, exit 0. What is not
delivered stays in the outbox; the next start resumes from the cursors.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import defaultdict

import msgspec

from runner import linux
from runner.framing import MAX_FRAME, Channel, FrameError
from supervisor.log import setup_logging
from runner.selfpipe import SelfPipe
from runner.units import dec_hook
from runner.wire import (Acked, JobDigest, Publish, PublisherSettings, PublisherStats, RunnerToPublisher,
                         SupervisorToPublisher)
from supervisor.config import Publisher as PublisherConfig
from supervisor.publisher.delivery import SinkWorker
from supervisor.publisher.outbox import Outbox
from supervisor.publisher.sink import make_sink

STATS_INTERVAL = 1.0
DRAIN_TIMEOUT = 5.0
SETTINGS_TIMEOUT = 30.0
COALESCE = 0.05  # results wait this long for others to share their fsync (a runner holds them meanwhile)
DIGEST_DELAY = 0.1  # status learns of committed results this soon (more stats frames, not more work per result)
MAX_STATS_BACKLOG = 1 << 20  # the supervisor is not reading: skip stats rather than queue them
EXIT_BAD_FRAME = 65  # sysexits EX_DATAERR
EXIT_OUTBOX_ERROR = 74  # sysexits EX_IOERR
OUTBOX_RETRY = 1.0  # while the outbox cannot be written: try again this often

log = logging.getLogger("publisher")


class RunnerConnection:
    """One runner's socket, and the results read from it that are not committed yet."""

    def __init__(self, sock: socket.socket, max_frame: int):
        self.sock = sock
        self.pid = _peer(sock)[0]
        self.channel = Channel(sock.fileno(), sock.fileno(), RunnerToPublisher, max_frame=max_frame)
        self.events = selectors.EVENT_READ

    def close(self, selector: selectors.BaseSelector) -> None:
        try:
            selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class JobTally:
    """A job's results committed since the last stats frame."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = defaultdict(int)
        self.durations: list[float] = []
        self.last: Publish | None = None
        self.last_error: Publish | None = None

    def add(self, message: Publish) -> None:
        self.runs[message.last.status] += 1
        self.durations.append(message.duration)
        self.last = message
        if message.last.status == "error":
            self.last_error = message

    def digest(self, job_uuid: str) -> JobDigest:
        last = self.last
        return JobDigest(job_uuid=job_uuid, runs=dict(self.runs), duration_sum=sum(self.durations),
                         durations=self.durations, last=last.last, next_run_at=last.next_run_at,
                         last_error=self.last_error.last if self.last_error is not None else None)


class PublisherProcess:
    def __init__(self, channel: Channel, settings: PublisherSettings, config: PublisherConfig,
                 listener: socket.socket):
        self.channel = channel
        self.settings = settings
        self.listener = listener
        self.outbox = Outbox(os.path.join(settings.state_dir, "outbox"), config.outbox_max,
                             sinks=[s.name for s in config.sink])
        self.batch_max = config.batch_max
        self.wakeup = threading.Condition()
        self.job_titles = None  # a ccf sink needs each job's own title
        if any(s.kind == "ccf" for s in config.sink):
            from supervisor.publisher.ccf import JobTitles
            self.job_titles = JobTitles(settings.state_dir)
        self.workers = [SinkWorker(make_sink(s, settings.state_dir, f"publisher.sink[{i}]", self.job_titles),
                                   self.outbox, self.wakeup, config.batch_max, config.flush_interval,
                                   float(s.retry_max))
                        for i, s in enumerate(config.sink)]
        self.sel = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.stopping: str | None = None  # why we stop
        self.exit_code = 0
        self.next_stats_at = 0.0
        self._watching_output = False
        self.runners: set[RunnerConnection] = set()
        self.received: list[tuple[RunnerConnection, Publish]] = []  # read, not yet committed
        self.commit_at = float("inf")
        self.tallies: defaultdict[str, JobTally] = defaultdict(JobTally)
        self.digest_due = float("inf")
        self.max_frame = 4 * MAX_FRAME  # a result holds at most a plugin's output limit, JSON-escaped
        self.memory_max = config.memory_max
        self.outbox_error: str | None = None  # why the last append failed; None once one succeeds
        self.outbox_write_errors = 0
        self.waiting_bytes = 0  # result payload bytes in self.received
        self.memory_dropped = 0  # results forgotten past memory_max (never acknowledged)
        self.forgot_from: set[RunnerConnection] = set()  # runners whose results we forgot: to reconnect

    def serve(self) -> int:
        self._install_signals()
        self.sel.register(self.channel.rfd, selectors.EVENT_READ, self.on_supervisor)
        self.sel.register(self.listener, selectors.EVENT_READ, self.accept_runners)
        for worker in self.workers:
            worker.thread.start()
        log.info("publisher started: outbox %s with %d results pending, sinks %s",
                 self.outbox.folder, self.outbox.stats()["outbox_results"],
                 ", ".join(f"{w.name} ({w.sink.kind})" for w in self.workers))
        while not self.stopping:
            self.send_stats_when_due()
            self._watch_output()
            now = time.monotonic()
            if self.received:
                # Results wait for their window: sleep through it rather than wake for every
                # runner's frame, then take all that came meanwhile in one pass.
                if self.outbox_error is not None:  # waiting to retry: keep reading meanwhile
                    timeout = max(0.0, min(self.commit_at, self.next_stats_at, self.digest_due) - now)
                else:
                    if now < self.commit_at and len(self.received) < self.batch_max:
                        time.sleep(self.commit_at - now)
                    timeout = 0.0
            else:
                timeout = max(0.0, min(self.next_stats_at, self.digest_due) - now)
            for key, _ in self.sel.select(timeout):
                key.data()
            self.handle_signals()
            if self.received and (time.monotonic() >= self.commit_at
                                  or (len(self.received) >= self.batch_max and self.outbox_error is None)):
                self.commit()
        return self.shutdown()

    # -- events --------------------------------------------------------------------------

    def accept_runners(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of fds, for one: the runner tries again later
                log.error("cannot accept a runner's connection: %s", e)
                return
            sock.setblocking(False)
            _, uid = _peer(sock)
            if uid not in (0, os.geteuid()):  # the socket's mode keeps others out; this is the second lock
                log.warning("refused a connection from uid %d on the results socket", uid)
                sock.close()
                continue
            conn = RunnerConnection(sock, self.max_frame)
            self.runners.add(conn)
            self.sel.register(sock, conn.events, lambda c=conn: self.on_runner(c))

    def on_runner(self, conn: RunnerConnection) -> None:
        """A runner's socket is readable (results, or EOF), or has room for acks queued for it."""
        if conn.channel.pending_output:
            try:
                conn.channel.flush()
            except OSError:
                self.drop_runner(conn)
                return
            self._watch_runner(conn)
        try:
            frames = conn.channel.read()
        except FrameError as e:
            log.error("runner pid %s sent a bad frame (%s); closing its connection", conn.pid, e)
            frames = []
            conn.channel.eof = True
        if frames and not self.received:
            self.commit_at = time.monotonic() + COALESCE
        self.received.extend((conn, frame) for frame in frames)
        self.waiting_bytes += sum(len(frame.result) for frame in frames)
        if self.waiting_bytes > self.memory_max:
            self._forget_oldest()
        if conn.channel.eof:
            self.drop_runner(conn)

    def drop_runner(self, conn: RunnerConnection) -> None:
        """Its results read so far are still committed; the acks just have nobody to go to."""
        conn.close(self.sel)
        self.runners.discard(conn)

    def on_supervisor(self) -> None:
        try:
            frames = self.channel.read()
        except FrameError as e:
            self.fail(f"bad frame from the supervisor: {e}")
            return
        if frames:
            log.warning("ignored %d frames from the supervisor: settings are read once, at start", len(frames))
        if self.channel.eof:
            self.sel.unregister(self.channel.rfd)
            self.stop("the supervisor closed the pipe")

    def _forget_oldest(self) -> None:
        """Over memory_max while the outbox cannot be written: forget the oldest results (never
        acknowledged: their runners still hold them and send them again on reconnecting)."""
        n = 0
        while self.waiting_bytes > self.memory_max and len(self.received) > 1:
            conn, message = self.received.pop(0)
            self.forgot_from.add(conn)
            self.waiting_bytes -= len(message.result)
            n += 1
        if n:
            if not self.memory_dropped:
                log.warning("results waiting for the outbox are over memory_max (%d bytes): forgetting the oldest "
                            "(counted in dropped; their runners still hold them)", self.memory_max)
            self.memory_dropped += n

    def commit(self) -> None:
        """One append and fsync for everything read; then each runner hears which are safe."""
        batch = self.received
        try:
            if self.job_titles is not None:
                self.job_titles.note(message for _, message in batch)
            self.outbox.append_many([message.result for _, message in batch])
        except OSError as e:
            # Nothing of this batch is acknowledged: it waits here (its runners hold it too)
            # and the append is tried again in OUTBOX_RETRY.
            self.outbox_write_errors += 1
            self.commit_at = time.monotonic() + OUTBOX_RETRY
            if self.outbox_error is None:
                log.error("cannot write the outbox: %s; %d results wait in memory (up to memory_max) and are "
                          "not acknowledged; trying again every %.0fs", e, len(batch), OUTBOX_RETRY)
                self.digest_due = time.monotonic()  # status shows it at once
            self.outbox_error = f"cannot write the outbox: {e}"
            return
        self.received, self.commit_at, self.waiting_bytes = [], float("inf"), 0
        if self.outbox_error is not None:
            log.info("the outbox takes writes again: %d waiting results written", len(batch))
            self.outbox_error = None
            self.digest_due = time.monotonic()
        with self.wakeup:
            self.wakeup.notify_all()
        self.digest_due = min(self.digest_due, time.monotonic() + DIGEST_DELAY)
        acks: dict[RunnerConnection, list[str]] = defaultdict(list)
        for conn, message in batch:
            acks[conn].append(message.last.uuid)
            self.tallies[message.job_uuid].add(message)
        for conn, uuids in acks.items():
            if conn in self.runners:
                self.ack(conn, uuids)
        if self.forgot_from:
            # A runner resends what is unacknowledged only on a new connection: close the
            # connections whose results we forgot (after their acks), so that they come again.
            for conn in self.forgot_from & self.runners:
                self._flush_briefly(conn)
                self.drop_runner(conn)
            self.forgot_from.clear()

    def ack(self, conn: RunnerConnection, uuids: list[str]) -> None:
        try:
            conn.channel.send(Acked(uuids))
        except OSError:  # the runner is gone; what it sent is on disk
            self.drop_runner(conn)
            return
        self._watch_runner(conn)

    def _watch_runner(self, conn: RunnerConnection) -> None:
        """Wait for room in a runner's socket only while acks are queued for it (a runner
        reads them lazily: we never block on one)."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.channel.pending_output else 0)
        if events != conn.events:
            conn.events = events
            self.sel.modify(conn.sock, events, self.sel.get_key(conn.sock).data)

    def send_stats_when_due(self) -> None:
        """Every second (with the sink cursors saved), and soon after a commit."""
        now = time.monotonic()
        if now >= self.next_stats_at:
            self.next_stats_at = now + STATS_INTERVAL
            try:
                self.outbox.save_cursors()  # the sinks' progress reaches the disk within about a second
            except OSError:  # only means duplicates after a crash; tried again next second (logged once)
                pass
        elif now < self.digest_due:
            return
        self.digest_due = float("inf")
        if self.channel.pending_output > MAX_STATS_BACKLOG:
            return
        self.send(self.stats())

    def stats(self) -> PublisherStats:
        outbox = self.outbox.stats()
        jobs = [tally.digest(job) for job, tally in self.tallies.items()]
        self.tallies.clear()
        return PublisherStats(
            outbox_results=outbox["outbox_results"], outbox_bytes=outbox["outbox_bytes"],
            dropped=outbox["dropped"] + self.memory_dropped,
            sinks=[w.stats(outbox["sinks"][w.name]) for w in self.workers], jobs=jobs,
            outbox_error=self.outbox_error or self.outbox.cursor_error,
            outbox_write_errors=self.outbox_write_errors, waiting=len(self.received), waiting_bytes=self.waiting_bytes)

    def send(self, message: PublisherStats) -> None:
        try:
            self.channel.send(message)
        except OSError as e:  # the supervisor is gone; our results are safe on disk
            self.stop(f"cannot write to the supervisor: {e}")

    def flush_output(self) -> None:
        try:
            self.channel.flush()
        except OSError as e:
            self.stop(f"cannot write to the supervisor: {e}")

    def _watch_output(self) -> None:
        """Wait for the pipe to take our queued frames only while some are queued."""
        want = self.channel.pending_output > 0 and not self.stopping
        if want and not self._watching_output:
            self.sel.register(self.channel.wfd, selectors.EVENT_WRITE, self.flush_output)
        elif not want and self._watching_output:
            self.sel.unregister(self.channel.wfd)
        self._watching_output = want

    def _install_signals(self) -> None:
        # The handler only records the signal; the wakeup fd makes select return at once.
        self.self_pipe = SelfPipe((signal.SIGTERM, signal.SIGINT), self.signals)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # config reloads reach us as a restart
        self.sel.register(self.self_pipe.reader, selectors.EVENT_READ, self.self_pipe.drain)

    def handle_signals(self) -> None:
        while self.signals:
            self.stop(f"signal {signal.Signals(self.signals.pop(0)).name}")

    def fail(self, why: str) -> None:
        log.error("%s; exiting so the supervisor restarts the publisher", why)
        self.exit_code = EXIT_BAD_FRAME
        self.stop(why)

    def stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = why

    # -- stopping ------------------------------------------------------------------------

    def shutdown(self) -> int:
        """Commit and acknowledge what was read; give the sinks DRAIN_TIMEOUT to deliver what
        is pending (none after an error), then leave."""
        log.info("stopping: %s", self.stopping)
        if self.received and self.exit_code != EXIT_OUTBOX_ERROR:
            self.commit()  # (if the outbox still fails, they stay unacknowledged: their runners resend them)
            for conn in list(self.runners):
                self._flush_briefly(conn)
        drain = DRAIN_TIMEOUT if self.exit_code == 0 else 0.0
        deadline = time.monotonic() + drain
        with self.wakeup:
            for worker in self.workers:
                worker.stop_at = deadline
            self.wakeup.notify_all()
        for worker in self.workers:
            # A delivery in flight at the deadline may still finish: allow it a moment. (While
            # stopping, a sink caps each request at the deadline; one that began before the
            # stop keeps its own timeout, and its thread is a daemon: it does not hold us.)
            worker.thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        try:
            self.outbox.save_cursors()  # what the sinks took, even if one of them is still stuck
        except OSError as e:
            log.error("cannot save the sink cursors: %s (their results are delivered again)", e)
        self.send(self.stats())
        try:
            self.channel.flush_blocking(1.0)
        except OSError:
            pass
        stats = self.outbox.stats()
        for name, sink in stats["sinks"].items():
            if sink["pending"]:
                log.warning("sink %s: %d results stay in the outbox for the next start", name, sink["pending"])
        if not any(worker.thread.is_alive() for worker in self.workers):
            self.outbox.close()
            for worker in self.workers:
                worker.sink.close()
        return self.exit_code

    @staticmethod
    def _flush_briefly(conn: RunnerConnection) -> None:
        try:
            conn.channel.flush_blocking(0.2)
        except OSError:
            pass


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end (SO_PEERCRED)."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


# -- entry point --------------------------------------------------------------------------

class ProtocolError(Exception):
    """The supervisor sent something we cannot use."""


def read_settings(channel: Channel) -> tuple[PublisherSettings, PublisherConfig] | None:
    """Wait for the first frame, the settings; None when the supervisor closed the pipe first."""
    deadline = time.monotonic() + SETTINGS_TIMEOUT
    frames: list = []
    with selectors.DefaultSelector() as sel:
        sel.register(channel.rfd, selectors.EVENT_READ)
        while not frames and not channel.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError(f"no settings from the supervisor within {SETTINGS_TIMEOUT:.0f}s")
            sel.select(left)
            try:
                frames = channel.read()
            except FrameError as e:
                raise ProtocolError(f"bad frame from the supervisor: {e}") from None
    if not frames:
        return None
    settings = frames[0]
    try:
        config = msgspec.msgpack.decode(settings.publisher, type=PublisherConfig, dec_hook=dec_hook)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"undecodable publisher settings from the supervisor: {e}") from None
    if len(frames) > 1:
        log.warning("ignored %d frames after the settings: settings are read once", len(frames) - 1)
    return settings, config


def main(argv: list[str]) -> int:
    argv = linux.strip_title_room(argv)
    if len(argv) != 4:
        print("usage: python -m supervisor.publisher RFD WFD PARENT_PID LISTEN_FD", file=sys.stderr)
        return 2
    rfd, wfd, parent, listen_fd = (int(a) for a in argv)
    linux.die_with_parent(parent)
    linux.set_process_name("ar-publisher")
    linux.set_title("assessment-runtime: publisher")
    # Until the loop installs its handlers, nothing is acknowledged: a signal may simply end us.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    setup_logging("publisher")  # until the settings name the format and level
    channel = Channel(rfd, wfd, decode_type=SupervisorToPublisher, max_frame=MAX_FRAME)
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    try:
        first = read_settings(channel)
    except ProtocolError as e:
        log.error("%s; exiting", e)
        return EXIT_BAD_FRAME
    if first is None:
        log.info("the supervisor closed the pipe before sending settings; exiting")
        return 0
    settings, config = first
    setup_logging("publisher", settings.log_format, settings.log_level)
    try:
        publisher = PublisherProcess(channel, settings, config, listener)
    except OSError as e:
        log.error("cannot open the outbox: %s; exiting", e)
        return EXIT_OUTBOX_ERROR
    return publisher.serve()
