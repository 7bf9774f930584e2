"""Delivery: one thread per sink, each with its own cursor in the outbox.

A slow or broken sink never holds back another. A sink thread delivers as soon as anything
is pending (up to batch_max at a time: what arrives during one delivery is the next batch),
except a file sink, which writes on its flush timer (flush_interval, or sooner once batch_max
results wait or the outbox is over half its bound): one write and fsync per interval instead
of one per result. It advances its
cursor past what the sink took. A sink may take part of a batch before it fails
(DeliveryError.done: an http sink that bisected a refused batch): the cursor moves past that
part. After a failure the rest is retried with exponential backoff and full jitter (cap: the
sink's retry_max, 5 min by default), or after the Retry-After the receiver asked for, for as
long as the outbox holds it.
"""

from __future__ import annotations

import datetime
import logging
import random
import threading
import time

import msgspec

from runner.wire import SinkStats
from supervisor.publisher.outbox import Outbox
from supervisor.publisher.sink import DeliveryError, ResultSink

BACKOFF_MAX = 300.0
IDLE_WAIT_MIN = 1.0  # an idle sink thread rechecks no more often than this (a commit wakes it at once)

log = logging.getLogger("publisher")


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
        self.paced = getattr(sink, "paced", False)
        self._last_delivery = 0.0
        self.thread = threading.Thread(target=self.run, name=f"sink {self.name}", daemon=True)

    def run(self) -> None:
        idle = getattr(self.sink, "idle", None)  # a sink with a connection to keep (nats: PINGs)
        while True:
            due = self.wait_for_batch(idle is not None)
            if due is None:
                try:
                    idle()
                except Exception as e:  # noqa: BLE001 - the next delivery finds it again, and says so
                    log.debug("sink %s: while idle: %s", self.name, e)
                continue
            if not due:
                return
            self.deliver_batch()

    def wait_for_batch(self, tick: bool = False) -> bool | None:
        """Block until a batch is due; False when it is time to leave; None (with `tick`) after an
        idle wait with nothing to deliver."""
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
                    if tick and self.outbox.pending(self.name) == 0:
                        return None
                    continue
                # A paced sink (the file) waits for its flush timer or a full batch; the others
                # deliver as soon as there is work: what arrives during one delivery is the
                # next batch, so batches grow with load and latency stays low.
                due = self._last_delivery + self.flush_interval if self.paced else now
                if stopping or now >= due or pending >= self.batch_max or self.outbox.near_bound():
                    return True  # (near its bound, the outbox would soon drop what this sink has not taken)
                self.wakeup.wait(due - now)

    def deliver_batch(self) -> None:
        """Hand the next batch to the sink; advance the cursor past what it took (all of the
        batch, or the part before a failure) and back off after a failure."""
        self._last_delivery = time.monotonic()
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
