"""The supervisor's end of the publisher process.

Results go to the publisher as Publish frames and stay in `unacked` until it says they are
in its on-disk outbox (Acked). If the publisher dies, it is restarted (backoff with jitter)
and everything still unacknowledged is sent again, in order: a result is lost only if the
supervisor itself dies before the publisher acknowledged it, and such a result was never
acknowledged.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import time
from collections import OrderedDict

import msgspec

from runner.framing import Channel, FrameError
from supervisor.manager import backoff_delay
from supervisor.units import enc_hook
from supervisor.publisher import Acked, Publish, PublisherSettings, PublisherStats, PublisherToSupervisor

log = logging.getLogger(__name__)

MAX_UNACKED = 100_000  # results held in memory while the publisher is down


class PublisherLink:
    def __init__(self, selector: selectors.BaseSelector):
        self.selector = selector
        self.settings: PublisherSettings | None = None
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.unacked: OrderedDict[str, msgspec.Raw] = OrderedDict()
        self.stats: PublisherStats | None = None
        self.restarts = 0
        self.failures = 0
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.dropped_unacked = 0
        self.stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def ready(self) -> bool:
        return self.channel is not None

    def start(self, settings: PublisherSettings, now: float) -> None:
        self.settings = settings
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.publisher", str(to_r), str(from_w), str(os.getpid())],
            pass_fds=[to_r, from_w], process_group=0)
        os.close(to_r)
        os.close(from_w)
        self.channel = Channel(from_r, to_w, PublisherToSupervisor, enc_hook=enc_hook)
        self.selector.register(from_r, selectors.EVENT_READ, self.read)
        self.started_at = now
        self.restart_at = None
        self.channel.send(settings)
        for uuid, result in self.unacked.items():
            self.channel.send(Publish(uuid=uuid, result=result))
        log.info("publisher started, pid %d (%d results to hand over)", self.proc.pid, len(self.unacked))

    def publish(self, uuid: str, result: msgspec.Raw) -> None:
        if len(self.unacked) >= MAX_UNACKED:
            self.unacked.popitem(last=False)
            self.dropped_unacked += 1
            if self.dropped_unacked % 1000 == 1:
                log.error("publisher down too long: %d unacknowledged results dropped", self.dropped_unacked)
        self.unacked[uuid] = result
        if self.channel is not None:
            try:
                self.channel.send(Publish(uuid=uuid, result=result))
            except BrokenPipeError:
                self._lost("its pipe is closed")

    def read(self) -> None:
        try:
            frames = self.channel.read()
        except FrameError as e:
            log.error("publisher sent a bad frame (%s); restarting it", e)
            self.proc.kill()
            frames = []
        for frame in frames:
            if isinstance(frame, Acked):
                for uuid in frame.uuids:
                    self.unacked.pop(uuid, None)
            elif isinstance(frame, PublisherStats):
                self.stats = frame
        if self.channel.eof:
            self._close_channel()

    def flush(self) -> None:
        if self.channel is not None and self.channel.pending_output:
            try:
                self.channel.flush()
            except BrokenPipeError:
                self._lost("its pipe is closed")

    def wants_write(self) -> bool:
        return self.channel is not None and self.channel.pending_output > 0

    def check(self, now: float) -> None:
        """Reap a dead publisher; start it again once its backoff is over."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            if self.channel is not None:
                self.read()
            self._close_channel()
            if self.stopping:
                return
            if now - self.started_at >= 600:
                self.failures = 0
            self.failures += 1
            self.restarts += 1
            delay = backoff_delay(self.failures)
            self.restart_at = now + delay
            log.error("publisher exited (%s); restarting in %.1fs with %d unacknowledged results",
                      _describe(code), delay, len(self.unacked))
        if self.proc is None and not self.stopping and self.restart_at is not None and now >= self.restart_at:
            self.start(self.settings, now)

    def stop(self, timeout: float) -> None:
        """Wait (bounded) for the last acks, then close the pipe: the publisher flushes and exits."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while self.unacked and self.channel is not None and time.monotonic() < deadline:
            self.flush()
            for key, _ in self.selector.select(0.1):
                if key.data == self.read:
                    self.read()
        if self.unacked:
            log.error("stopping with %d results the publisher did not acknowledge", len(self.unacked))
        self._close_channel()
        if self.proc is not None:
            try:
                self.proc.wait(max(1.0, deadline - time.monotonic() + 10.0))
            except subprocess.TimeoutExpired:
                log.error("publisher did not exit in time: SIGKILL")
                self.proc.kill()
                self.proc.wait()

    def _lost(self, why: str) -> None:
        log.error("publisher unreachable: %s", why)
        self._close_channel()

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close(self.selector)
            self.channel = None


def _describe(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
