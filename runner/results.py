"""The runner's end of the result path: a Unix stream socket to the publisher.

Results go straight to the publisher, not through the supervisor. Each one is kept here
until the publisher acknowledges it (Acked: it is in the outbox, fsynced). When the
connection breaks (the publisher was restarted), we connect again after a short backoff and
send everything still unacknowledged, in order; the publisher's listening socket is held by
the supervisor across publisher restarts, so a connection made while none runs simply
waits in its backlog. A runner that dies loses only results nobody acknowledged.

Acks are read lazily: before each new result is sent (one non-blocking read, no wake-up of
their own). The socket wakes the loop for them only while the runner is stopping, or while
it holds a large result (which would otherwise stay in memory for a whole interval).
A publisher that went away is therefore noticed at the next result, which is when it
matters: everything unacknowledged is sent again then.
"""

from __future__ import annotations

import _socket
import socket
import time
from collections import OrderedDict

import msgspec

from runner.framing import Channel, FrameError
from runner.poller import READ, WRITE, Poller
from runner.wire import Acked, PublisherToRunner, Publish

MAX_UNACKED = 1000  # results held while the publisher is away; past this the oldest go
LARGE = 64 << 10  # a result this big is not kept until the next run: its ack wakes us
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0

_encode = msgspec.msgpack.Encoder().encode


class ResultLink:
    """Owns its socket's place in the runner's poller: registered only while frames wait for
    room in the socket, or while the runner waits for its last acks."""

    def __init__(self, path: str, max_frame: int, poller: Poller):
        self.path = path
        self.max_frame = max_frame
        self.poller = poller
        self.channel: Channel | None = None
        self.unacked: OrderedDict[str, bytes] = OrderedDict()  # result uuid -> encoded Publish
        self.reconnect_at = 0.0
        self._delay = RECONNECT_MIN
        self._events = 0  # what the poller watches for us (0: not registered)
        self._awaiting = False  # stopping: wake up for acks
        self._large = 0  # unacknowledged results over LARGE: wake up for their acks
        self.dropped = 0
        self.error: str | None = None  # why the last connection attempt or connection failed

    def connect(self, now: float) -> bool:
        """Try to connect (when due); on success everything unacknowledged is sent again."""
        if self.channel is not None or now < self.reconnect_at:
            return False
        # _socket's type, not socket.socket (a Python class over it: more of the zygote's pages)
        sock = _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(self.path)
        except OSError as e:  # no listener yet, or its backlog is full: try again soon
            sock.close()
            self._failed(now, f"cannot connect to the publisher at {self.path}: {e.strerror or e}")
            return False
        fd = sock.detach()
        self.channel = Channel(fd, fd, PublisherToRunner, max_frame=self.max_frame)
        self._delay = RECONNECT_MIN
        self.error = None
        try:
            for payload in self.unacked.values():
                self.channel.send_payload(payload)
        except OSError as e:
            self.disconnect(now, f"the publisher closed the connection: {e.strerror or e}")
            return False
        self._watch()
        return True

    def publish(self, uuid: str, message: Publish) -> None:
        """Queue a result; it stays until acknowledged."""
        if self.channel is not None:
            self.read_acks()  # what came since the last result; notices a publisher that went away
        if len(self.unacked) >= MAX_UNACKED:
            self._forget(next(iter(self.unacked)))
            self.dropped += 1
        payload = _encode(message)
        self.unacked[uuid] = payload
        if len(payload) > LARGE:
            self._large += 1
        if self.channel is None:
            self.connect(time.monotonic())  # sends it, with everything else unacknowledged
            return
        try:
            self.channel.send_payload(payload)
        except (OSError, FrameError) as e:
            self.disconnect(time.monotonic(), f"cannot send to the publisher: {e}")
            return
        self._watch()

    def await_acks(self) -> None:
        """From now on (we are stopping) acks wake the loop."""
        self._awaiting = True
        if self.channel is not None:
            self._watch()

    def read_acks(self) -> None:
        now = time.monotonic()
        try:
            frames = self.channel.read()
        except FrameError as e:
            self.disconnect(now, f"bad frame from the publisher: {e}")
            return
        for frame in frames:
            if isinstance(frame, Acked):
                for uuid in frame.uuids:
                    self._forget(uuid)
        if self.channel.eof:
            self.disconnect(now, "the publisher closed the connection")

    def on_event(self) -> None:
        """Room in the socket for what is queued, or (stopping) acks or EOF."""
        try:
            self.channel.flush()
        except OSError as e:
            self.disconnect(time.monotonic(), f"the connection to the publisher broke: {e.strerror or e}")
            return
        self.read_acks()
        if self.channel is not None:
            self._watch()

    def _forget(self, uuid: str) -> None:
        payload = self.unacked.pop(uuid, None)
        if payload is not None and len(payload) > LARGE:
            self._large -= 1

    def _watch(self) -> None:
        events = (WRITE if self.channel.pending_output else 0) | (READ if self._awaiting or self._large else 0)
        if events == self._events:
            return
        fd = self.channel.rfd
        if not events:
            self.poller.unregister(fd)
        elif not self._events:
            self.poller.register(fd, events, self.on_event)
        else:
            self.poller.modify(fd, events)
        self._events = events

    def disconnect(self, now: float, why: str) -> None:
        self.close()
        self._failed(now, why)

    def _failed(self, now: float, why: str) -> None:
        self.error = why
        self.reconnect_at = now + self._delay
        self._delay = min(RECONNECT_MAX, self._delay * 2)

    def close(self) -> None:
        if self.channel is not None:
            self.poller.forget(self.channel.rfd)
            self._events = 0
            self.channel.close()
            self.channel = None
