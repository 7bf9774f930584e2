"""The self-pipe every loop of ours waits on: signal handlers only queue the signal, and
`signal.set_wakeup_fd` (or another thread, via `wake`) makes the loop's select return."""

from __future__ import annotations

import signal
import socket


class SelfPipe:
    def __init__(self, signals: tuple[int, ...], queue: list[int]):
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda signum, frame: queue.append(signum))

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def wake(self) -> None:
        """Safe from any thread."""
        try:
            self.writer.send(b"\0")
        except OSError:
            pass
