"""The runner's end of the result path: a Unix stream socket to the publisher.

Results go straight to the publisher, not through the supervisor. Each one is kept here
until the publisher acknowledges it (Acked: it is in the outbox, fsynced). When the
connection breaks (the publisher was restarted), we connect again after a short backoff and
send everything still unacknowledged, in order; the publisher's listening socket is held by
the supervisor across publisher restarts, so a connection made while none runs simply
waits in its backlog. A runner that dies loses only results nobody acknowledged.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import OrderedDict

import msgspec

from runner.framing import Channel, FrameError
from runner.wire import Acked, PublisherToRunner, Publish

MAX_UNACKED = 1000  # results held while the publisher is away; past this the oldest go
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0

_encode = msgspec.msgpack.Encoder().encode


class ResultLink:
    """Owns its socket's place in the runner's selector: read while connected, write too
    while frames are queued that the socket has not taken yet."""

    def __init__(self, path: str, max_frame: int, selector: selectors.BaseSelector):
        self.path = path
        self.max_frame = max_frame
        self.selector = selector
        self.channel: Channel | None = None
        self._events = 0
        self.unacked: OrderedDict[str, bytes] = OrderedDict()  # result uuid -> encoded Publish
        self.reconnect_at = 0.0
        self._delay = RECONNECT_MIN
        self.dropped = 0
        self.error: str | None = None  # why the last connection attempt or connection failed

    def connect(self, now: float) -> bool:
        """Try to connect (when due); on success everything unacknowledged is sent again."""
        if self.channel is not None or now < self.reconnect_at:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(self.path)
        except OSError as e:  # no listener yet, or its backlog is full: try again soon
            sock.close()
            self._failed(now, f"cannot connect to the publisher at {self.path}: {e.strerror or e}")
            return False
        fd = sock.detach()
        self.channel = Channel(fd, fd, PublisherToRunner, max_frame=self.max_frame)
        self._events = selectors.EVENT_READ
        self.selector.register(fd, self._events, self.on_event)
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
        if len(self.unacked) >= MAX_UNACKED:
            self.unacked.popitem(last=False)
            self.dropped += 1
        payload = _encode(message)
        self.unacked[uuid] = payload
        if self.channel is not None:
            try:
                self.channel.send_payload(payload)
            except (OSError, FrameError) as e:
                self.disconnect(time.monotonic(), f"cannot send to the publisher: {e}")
                return
            self._watch()

    def on_event(self) -> None:
        """The socket is readable (acks, or EOF) or writable (room for what is queued)."""
        now = time.monotonic()
        try:
            self.channel.flush()
            frames = self.channel.read()
        except OSError as e:
            self.disconnect(now, f"the connection to the publisher broke: {e.strerror or e}")
            return
        except FrameError as e:
            self.disconnect(now, f"bad frame from the publisher: {e}")
            return
        for frame in frames:
            if isinstance(frame, Acked):
                for uuid in frame.uuids:
                    self.unacked.pop(uuid, None)
        if self.channel.eof:
            self.disconnect(now, "the publisher closed the connection")
        else:
            self._watch()

    def _watch(self) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.channel.pending_output else 0)
        if events != self._events:
            self.selector.modify(self.channel.rfd, events, self.on_event)
            self._events = events

    def disconnect(self, now: float, why: str) -> None:
        if self.channel is not None:
            self.channel.close(self.selector)
            self.channel = None
        self._failed(now, why)

    def _failed(self, now: float, why: str) -> None:
        self.error = why
        self.reconnect_at = now + self._delay
        self._delay = min(RECONNECT_MAX, self._delay * 2)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close(self.selector)
            self.channel = None
