"""The self-pipe every loop of ours waits on: signal handlers only queue the signal, and
`signal.set_wakeup_fd` (or another thread, via `wake`) makes the loop's select return.

A plain pipe and the C `_signal` module, not a socket pair and `signal`'s wrappers: those go
through `socket.socket` and `enum` on the way, and in a runner (forked from the zygote) every
object they touch costs a copied page: 0.14 MB of each idle runner's 1.2."""

from __future__ import annotations

import _signal
import os


class SelfPipe:
    def __init__(self, signals: tuple[int, ...], queue: list[int]):
        self.reader, self.writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(self.writer, warn_on_full_buffer=False)
        for sig in signals:
            _signal.signal(sig, lambda signum, frame: queue.append(signum))

    def drain(self) -> None:
        try:
            while os.read(self.reader, 4096):
                pass
        except BlockingIOError:
            pass

    def wake(self) -> None:
        """Safe from any thread."""
        try:
            os.write(self.writer, b"\0")
        except OSError:
            pass
