"""Sinks: where the publisher delivers results from its outbox (SPEC §7).

A sink takes a batch of msgpack-encoded results and either takes all of them or raises;
the publisher's sink thread then advances that sink's cursor, or retries the same batch
later. Each sink runs in its own thread, so `deliver` may block (disk, network).
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import msgspec

from supervisor.config import Sink as SinkConfig

log = logging.getLogger("publisher")

FILE_MODE = 0o640


class ResultSink(Protocol):
    name: str
    kind: str

    def deliver(self, payloads: list[bytes]) -> None:
        """Take every payload, or raise (nothing is then counted as taken)."""

    def close(self) -> None: ...


class FileSink:
    """Appends one JSON line per result; flushed and fsynced per batch.

    The file is reopened when it is moved or removed (log rotation), so the next batch goes
    to a new file at the configured path.
    """

    kind = "file"

    def __init__(self, config_sink: SinkConfig):
        self.name = config_sink.name
        self.path = config_sink.path
        self._fd = -1
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.msgpack.Decoder()  # generic objects: maps keep their key order
        self.rejected = 0  # payloads that cannot become JSON; skipped, never retried forever

    def deliver(self, payloads: list[bytes]) -> None:
        lines = bytearray()
        for payload in payloads:
            try:
                lines += self._encoder.encode(self._decoder.decode(payload))
            except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError) as e:
                # One bad record must not block every later one behind it.
                self.rejected += 1
                log.error("sink %s: skipped a result that cannot be written as JSON: %s", self.name, e)
                continue
            lines += b"\n"
        if not lines:
            return
        fd = self._open()
        before = os.fstat(fd).st_size
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # Cut a partial batch so the retry does not leave a torn line in the middle.
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass
            self.close()
            raise

    def _open(self) -> int:
        if self._fd >= 0 and not self._moved():
            return self._fd
        self.close()
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        self._cut_torn_line()
        return self._fd

    def _cut_torn_line(self) -> None:
        """A crash mid-batch (SIGKILL, power cut) can leave a partial last line. Its batch was
        never marked delivered and comes again in full, so cut the fragment rather than
        glue the next line onto it."""
        size = end = os.fstat(self._fd).st_size
        while end > 0:
            start = max(0, end - 65536)
            newline = os.pread(self._fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            log.warning("sink %s: cut a torn last line of %d bytes from %s (left by a crash; "
                        "its results are delivered again)", self.name, size - end, self.path)

    def _moved(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


class UnavailableSink:
    """Stands in for a kind not built yet: every delivery fails, so results stay pending."""

    def __init__(self, config_sink: SinkConfig, why: str):
        self.name = config_sink.name
        self.kind = config_sink.kind
        self.why = why

    def deliver(self, payloads: list[bytes]) -> None:
        raise RuntimeError(self.why)

    def close(self) -> None:
        pass


def make_sink(config_sink: SinkConfig) -> ResultSink:
    if config_sink.kind == "file":
        return FileSink(config_sink)
    if config_sink.kind == "http":
        return UnavailableSink(config_sink, "http sink not implemented yet")
    raise ValueError(f"unknown sink kind {config_sink.kind!r}")
