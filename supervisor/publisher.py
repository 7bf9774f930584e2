"""The publisher process: takes results from the supervisor, stores them durably, delivers
them to the sinks.

    python -m supervisor.publisher RFD WFD PARENT_PID

The main thread's loop, top to bottom: wait for the supervisor's pipe, a signal or the next
stats tick; read every frame the pipe holds; append all their results to the outbox with one
fsync (group commit); only then acknowledge them with one `Acked` (SPEC §7: a result is
acknowledged once it is on disk); about once a second, send `PublisherStats`.

Each sink has its own thread and its own cursor in the outbox, so a slow or broken sink
never holds back another. A sink thread delivers as soon as anything is pending (up to
batch_max at a time: what arrives during one delivery is the next batch) and advances its
cursor; it looks again at least every flush_interval. A sink may take part of a batch
before it fails (DeliveryError.done: an http sink that bisected a refused batch): the
cursor moves past that part. After a failure the rest is retried with exponential backoff
and full jitter (cap: the sink's retry_max, 5 min by default), or after the Retry-After the
receiver asked for, for as long as the outbox holds it.

Stopping (EOF on the pipe, SIGTERM, SIGINT): commit and acknowledge what was read, give the
sinks up to DRAIN_TIMEOUT to deliver what is pending, exit 0. What is not delivered stays in
the outbox; the next start resumes from the cursors. A frame that does not decode ends the
process with EXIT_BAD_FRAME after committing the good frames before it; the supervisor
restarts us.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import selectors
import signal
import sys
import threading
import time

import msgspec

from runner import linux
from runner.selfpipe import SelfPipe
from runner.framing import MAX_FRAME, Channel, FrameError
from runner.log import setup_logging
from supervisor.config import Publisher as PublisherConfig
from supervisor.outbox import Outbox
from supervisor.sink import DeliveryError, ResultSink, make_sink
from supervisor.units import dec_hook

STATS_INTERVAL = 1.0
DRAIN_TIMEOUT = 5.0
SETTINGS_TIMEOUT = 30.0
BACKOFF_MAX = 300.0
IDLE_WAIT_MIN = 1.0  # an idle sink thread rechecks no more often than this (a commit wakes it at once)
MAX_STATS_BACKLOG = 1 << 20  # the supervisor is not reading: skip stats rather than queue them
EXIT_BAD_FRAME = 65  # sysexits EX_DATAERR
EXIT_OUTBOX_ERROR = 74  # sysexits EX_IOERR

log = logging.getLogger("publisher")


# -- wire types ---------------------------------------------------------------------------

class PublisherSettings(msgspec.Struct, tag=True):
    """Always the first frame from the supervisor."""

    state_dir: str
    publisher: PublisherConfig
    log_format: str = "text"
    log_level: str = "info"


class Publish(msgspec.Struct, tag=True):
    uuid: str
    result: msgspec.Raw  # an AttestationResult, msgpack; stored and delivered as it came


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


class Acked(msgspec.Struct, tag=True):
    """These results are on disk in the outbox: the supervisor may forget them."""

    uuids: list[str]


class PublisherStats(msgspec.Struct, tag=True):
    outbox_results: int
    outbox_bytes: int
    dropped: int
    sinks: list[SinkStats]


SupervisorToPublisher = PublisherSettings | Publish
PublisherToSupervisor = Acked | PublisherStats


class _ResultEnd(msgspec.Struct):
    end: str


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def backoff_delay(attempt: int, cap: float = BACKOFF_MAX) -> float:
    """Full jitter over an exponential cap (2 s, 4 s, ... `cap`, 5 min by default), never under 1 s."""
    return max(1.0, random.uniform(0.0, min(cap, 2.0 ** attempt)))


def retry_delay(attempt: int, retry_after: float | None, cap: float = BACKOFF_MAX) -> float:
    """After a failure: what the receiver asked (Retry-After, plus up to 10% so that agents
    told the same do not come back at the same instant; at least 1 s), else the backoff."""
    if retry_after is not None:
        return max(1.0, retry_after * random.uniform(1.0, 1.1))
    return backoff_delay(attempt, cap)


# -- one thread per sink ------------------------------------------------------------------

class SinkWorker:
    def __init__(self, sink: ResultSink, outbox: Outbox, wakeup: threading.Condition,
                 batch_max: int, flush_interval: float, retry_max: float = BACKOFF_MAX):
        self.sink = sink
        self.retry_max = retry_max
        self.name = sink.name
        self.outbox = outbox
        self.wakeup = wakeup  # notified after each commit and when stopping
        self.batch_max = batch_max
        self.flush_interval = flush_interval
        self.stop_at: float | None = None  # set (under wakeup) when the publisher stops
        self.delivered = 0  # results the sink took (a 2xx from a hub; written for a file)
        self.dead_lettered = 0  # results the receiver refused, kept in state_dir/dead-letter/
        self.failures = 0
        self.last_error: str | None = None
        self.last_success: str | None = None
        self._attempt = 0
        self._retry_at = 0.0
        self.thread = threading.Thread(target=self.run, name=f"sink {self.name}", daemon=True)

    def run(self) -> None:
        while True:
            if not self.wait_for_batch():
                return
            self.deliver_batch()

    def wait_for_batch(self) -> bool:
        """Block until a batch is due; False when it is time to leave."""
        with self.wakeup:
            while True:
                now = time.monotonic()
                stopping = self.stop_at is not None
                if stopping and now >= self.stop_at:
                    return False
                if now < self._retry_at:
                    if stopping and self._retry_at >= self.stop_at:
                        return False  # no retry fits before the deadline: waiting would only delay the exit
                    self.wakeup.wait(self._retry_at - now)
                    continue
                pending = self.outbox.pending(self.name)
                if pending == 0:
                    if stopping:
                        return False  # drained
                    self.wakeup.wait(max(self.flush_interval, IDLE_WAIT_MIN))  # a commit notifies us sooner
                    continue
                # Deliver as soon as there is work: results that arrive while a delivery is in
                # flight form the next batch, so batches grow with load and latency stays low.
                return True

    def deliver_batch(self) -> None:
        """Hand the next batch to the sink; advance the cursor past what it took (all of the
        batch, or the part before a failure) and back off after a failure."""
        failure: Exception | None = None
        retry_after = None
        done = dead = 0
        records: list[tuple[int, bytes]] = []
        try:
            records = self.outbox.read(self.name, self.batch_max)
            if not records:
                return
            try:
                dead = self.sink.deliver([payload for _, payload in records], deadline=self.stop_at) or 0
                done = len(records)
            except DeliveryError as e:
                failure, done, dead, retry_after = e, e.done, e.dead_lettered, e.retry_after
            if done:
                self.outbox.advance(self.name, records[done - 1][0])
        except Exception as e:  # a sink thread must survive anything its sink raises
            failure = e
        if done:
            self.delivered += done - dead
            self.dead_lettered += dead
            self.last_success = utc_now_iso()
        if failure is None:
            if self._attempt:
                log.info("sink %s: delivering again after %d failed attempts", self.name, self._attempt)
            self._attempt = 0
            self.last_error = None
            return
        self.failures += 1
        self._attempt += 1
        self.last_error = str(failure) or type(failure).__name__
        delay = retry_delay(self._attempt, retry_after, self.retry_max)
        self._retry_at = time.monotonic() + delay
        log.warning("sink %s: delivery failed (%s)%s; retry %d in %.1fs", self.name, self.last_error,
                    f" after {done} of {len(records)} results were taken" if done else "", self._attempt, delay)

    def stats(self, outbox_sink: dict) -> SinkStats:
        return SinkStats(
            name=self.name, kind=self.sink.kind, delivered=self.delivered,
            pending=outbox_sink["pending"], failures=self.failures,
            dead_lettered=self.dead_lettered,
            last_error=self.last_error, last_success=self.last_success,
            oldest_pending_age=self._oldest_pending_age() if outbox_sink["pending"] else None)

    def _oldest_pending_age(self) -> float | None:
        try:
            oldest = self.outbox.peek(self.name)
            if oldest is None:
                return None
            end = msgspec.msgpack.decode(oldest[1], type=_ResultEnd).end
            ended = datetime.datetime.fromisoformat(end)
        except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        return max(0.0, (datetime.datetime.now(datetime.timezone.utc) - ended).total_seconds())


# -- the main loop ------------------------------------------------------------------------

class PublisherProcess:
    def __init__(self, channel: Channel, settings: PublisherSettings):
        self.channel = channel
        self.settings = settings
        config = settings.publisher
        self.decoder = msgspec.msgpack.Decoder(SupervisorToPublisher, dec_hook=dec_hook)
        self.outbox = Outbox(os.path.join(settings.state_dir, "outbox"), config.outbox_max,
                             sinks=[s.name for s in config.sink])
        self.wakeup = threading.Condition()
        self.workers = [SinkWorker(make_sink(s, settings.state_dir, f"publisher.sink[{i}]"), self.outbox,
                                   self.wakeup, config.batch_max, config.flush_interval, float(s.retry_max))
                        for i, s in enumerate(config.sink)]
        self.sel = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.stopping: str | None = None  # why we stop
        self.exit_code = 0
        self.next_stats_at = 0.0
        self._watching_output = False

    def serve(self, early_frames: list[bytes]) -> int:
        self._install_signals()
        self.sel.register(self.channel.rfd, selectors.EVENT_READ, self.on_supervisor)
        for worker in self.workers:
            worker.thread.start()
        log.info("publisher started: outbox %s with %d results pending, sinks %s",
                 self.outbox.folder, self.outbox.stats()["outbox_results"],
                 ", ".join(f"{w.name} ({w.sink.kind})" for w in self.workers))
        self.handle_frames(early_frames)
        while not self.stopping:
            self.send_stats_when_due()
            self._watch_output()
            timeout = max(0.0, self.next_stats_at - time.monotonic())
            for key, _ in self.sel.select(timeout):
                key.data()
            self.handle_signals()
        return self.shutdown()

    # -- events --------------------------------------------------------------------------

    def on_supervisor(self) -> None:
        try:
            frames = self.channel.read()
        except FrameError as e:
            self.fail(f"bad frame from the supervisor: {e}")
            return
        self.handle_frames(frames)
        if self.channel.eof:
            self.sel.unregister(self.channel.rfd)
            self.stop("the supervisor closed the pipe")

    def handle_frames(self, frames: list[bytes]) -> None:
        """Commit every Publish up to the first bad frame, ack them, then fail on that frame."""
        batch: list[Publish] = []
        bad = None
        for raw in frames:
            try:
                message = self.decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                bad = f"undecodable frame from the supervisor ({len(raw)} bytes): {e}"
                break
            if isinstance(message, Publish):
                batch.append(message)
            else:
                log.warning("ignored %s from the supervisor: settings are read once, at start",
                            type(message).__name__)
        self.commit(batch)
        if bad:
            self.fail(bad)

    def commit(self, batch: list[Publish]) -> None:
        if not batch:
            return
        try:
            self.outbox.append_many([message.result for message in batch])
        except OSError as e:
            # Nothing of this batch is acknowledged; the supervisor sends it again to the next publisher.
            log.error("cannot write the outbox: %s; exiting", e)
            self.exit_code = EXIT_OUTBOX_ERROR
            self.stop("outbox write error")
            return
        with self.wakeup:
            self.wakeup.notify_all()
        self.send(Acked([message.uuid for message in batch]))

    def send_stats_when_due(self) -> None:
        now = time.monotonic()
        if now < self.next_stats_at:
            return
        self.next_stats_at = now + STATS_INTERVAL
        try:
            self.outbox.save_cursors()  # the sinks' progress reaches the disk within about a second
        except OSError as e:  # only means duplicates after a crash; tried again next second
            log.error("cannot save the sink cursors: %s", e)
        if self.channel.pending_output > MAX_STATS_BACKLOG:
            return
        self.send(self.stats())

    def stats(self) -> PublisherStats:
        outbox = self.outbox.stats()
        return PublisherStats(
            outbox_results=outbox["outbox_results"], outbox_bytes=outbox["outbox_bytes"],
            dropped=outbox["dropped"],
            sinks=[w.stats(outbox["sinks"][w.name]) for w in self.workers])

    def send(self, message: Acked | PublisherStats) -> None:
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
        """Give the sinks DRAIN_TIMEOUT to deliver what is pending (none on an error), then leave."""
        log.info("stopping: %s", self.stopping)
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


# -- entry point --------------------------------------------------------------------------

class ProtocolError(Exception):
    """The supervisor sent something we cannot use."""


def read_settings(channel: Channel) -> tuple[PublisherSettings, list[bytes]] | None:
    """Wait for the first frame: the settings and any frames that came with them, or None
    when the supervisor closed the pipe first."""
    decoder = msgspec.msgpack.Decoder(SupervisorToPublisher, dec_hook=dec_hook)
    deadline = time.monotonic() + SETTINGS_TIMEOUT
    frames: list[bytes] = []
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
    try:
        settings = decoder.decode(frames[0])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(f"undecodable settings frame from the supervisor: {e}") from None
    if not isinstance(settings, PublisherSettings):
        raise ProtocolError(f"the first frame from the supervisor is {type(settings).__name__}, "
                            f"expected PublisherSettings")
    return settings, frames[1:]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m supervisor.publisher RFD WFD PARENT_PID", file=sys.stderr)
        return 2
    rfd, wfd, parent = (int(a) for a in argv)
    linux.die_with_parent(parent)
    linux.set_process_name("ar-publisher")
    # Until the loop installs its handlers, nothing is acknowledged: a signal may simply end us.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    setup_logging("publisher")  # until the settings name the format and level
    channel = Channel(rfd, wfd, decode_type=None, max_frame=MAX_FRAME)
    try:
        first = read_settings(channel)
    except ProtocolError as e:
        log.error("%s; exiting", e)
        return EXIT_BAD_FRAME
    if first is None:
        log.info("the supervisor closed the pipe before sending settings; exiting")
        return 0
    settings, early_frames = first
    setup_logging("publisher", settings.log_format, settings.log_level)
    try:
        publisher = PublisherProcess(channel, settings)
    except OSError as e:
        log.error("cannot open the outbox: %s; exiting", e)
        return EXIT_OUTBOX_ERROR
    return publisher.serve(early_frames)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
