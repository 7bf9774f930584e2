"""Length-prefixed msgpack frames on pipes: a 4-byte big-endian length, then the payload.

A `Channel` wraps one read fd and one write fd (either may be None), both non-blocking.
Reads collect whole frames; writes are buffered and flushed as the pipe takes them, so a
slow peer never blocks the process that talks to it. A frame over `max_frame` or one that
does not decode raises FrameError: the caller ends that peer, never itself.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any

import msgspec

MAX_FRAME = 64 << 20
_HEADER = 4
_READ_CHUNK = 64 << 10  # under malloc's mmap threshold: no mmap/munmap per read


# Decoders and the encoder are shared by the channels of a process: a runner's channels are
# then made without allocating one (each costs the runner copied pages of the zygote's).
# Sharing is safe: msgspec keeps each call's state on that call's stack, not in the object.
_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict = {}


class FrameError(Exception):
    """The peer sent something that is not a valid frame; the channel is unusable."""


class Channel:
    def __init__(self, rfd: int | None, wfd: int | None, decode_type: Any = None,
                 max_frame: int = MAX_FRAME, enc_hook=None, dec_hook=None):
        self.rfd = rfd
        self.wfd = wfd
        for fd in (rfd, wfd):
            if fd is not None:
                os.set_blocking(fd, False)
        if decode_type is None:
            self._decoder = None
        elif dec_hook is None:  # one per type per process (made in the zygote, for runners)
            self._decoder = _DECODERS.get(decode_type) or _DECODERS.setdefault(
                decode_type, msgspec.msgpack.Decoder(decode_type))
        else:
            self._decoder = msgspec.msgpack.Decoder(decode_type, dec_hook=dec_hook)
        self._encoder = _ENCODER if enc_hook is None else msgspec.msgpack.Encoder(enc_hook=enc_hook)
        self._max = max_frame
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self.eof = False
        self.torn_bytes = 0
        self._error: FrameError | None = None

    # -- reading -------------------------------------------------------------------------

    def read(self) -> list[Any]:
        """Read what the pipe holds now and return the whole frames in it (decoded)."""
        while True:
            try:
                chunk = os.read(self.rfd, _READ_CHUNK)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                break
            self._inbuf += chunk
            if len(chunk) < _READ_CHUNK:
                break
        return self._frames()

    def _frames(self) -> list[Any]:
        if self._error is not None:
            raise self._error
        out = []
        buf = self._inbuf
        pos = 0
        while len(buf) - pos >= _HEADER:
            size = int.from_bytes(buf[pos:pos + _HEADER], "big")
            if size > self._max:
                self._error = FrameError(f"frame of {size} bytes is over the {self._max} byte limit")
                if not out:
                    raise self._error
                return out
            if len(buf) - pos - _HEADER < size:
                break
            payload = bytes(buf[pos + _HEADER:pos + _HEADER + size])
            pos += _HEADER + size
            try:
                out.append(self._decoder.decode(payload) if self._decoder else payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self._inbuf.clear()
                self._error = FrameError(f"undecodable frame: {e}")
                if not out:
                    raise self._error from None
                return out  # the good frames before it stand; the next read raises
        if pos:
            del buf[:pos]
        if self.eof and buf:
            self.torn_bytes = len(buf)  # the peer died mid-write; the frames before it stand
            buf.clear()
        return out

    # -- writing -------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Queue one message and write as much as the pipe takes now."""
        self.send_payload(self._encoder.encode(message))

    def send_payload(self, payload: bytes) -> None:
        if len(payload) > self._max:
            raise FrameError(f"frame of {len(payload)} bytes is over the {self._max} byte limit")
        self._outbuf += len(payload).to_bytes(_HEADER, "big")
        self._outbuf += payload
        self.flush()

    @property
    def pending_output(self) -> int:
        return len(self._outbuf)

    def flush(self) -> bool:
        """Write what the pipe takes; True when nothing is left. Raises BrokenPipeError."""
        while self._outbuf:
            try:
                n = os.write(self.wfd, self._outbuf)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            del self._outbuf[:n]
        return True

    def flush_blocking(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the peer to take everything queued."""
        deadline = time.monotonic() + timeout
        while not self.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([], [self.wfd], [], left)
        return True

    def close(self, selector=None) -> None:
        """Close both ends (first taking the read end out of `selector`, if given)."""
        if selector is not None and self.rfd is not None:
            try:
                selector.unregister(self.rfd)
            except (KeyError, ValueError):
                pass
        for fd in {self.rfd, self.wfd} - {None}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.rfd = self.wfd = None
