"""A small epoll loop helper for the runner: fd -> handler, nothing more.

`selectors` costs a runner about a dozen Python calls per event and two epoll_ctl calls per
fd; a runner registers three fds per plugin run. Here an fd that is about to be closed is
simply forgotten (`forget`): closing it takes it out of the epoll set.
"""

from __future__ import annotations

import select
from collections.abc import Callable

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
MAX_EVENTS = 16  # more ready fds than this simply come in the next poll (level-triggered)


class Poller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}

    def register(self, fd: int, events: int, handler: Callable[[], None]) -> None:
        self._epoll.register(fd, events)
        self.handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """For an fd that stays open."""
        if self.handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def forget(self, fd: int) -> None:
        """For an fd the caller closes right after: the close removes it from the epoll set."""
        self.handlers.pop(fd, None)

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds and call the handler of each ready fd. A handler that
        closes another fd (a run ends) may come before that fd's event: an event whose fd has
        no handler now, or another one than when the batch came, is dropped."""
        # maxevents: by default epoll.poll allocates room for 1023 events (12 KB of malloc)
        # on every call; a runner watches six fds at most
        ready = self._epoll.poll(timeout, MAX_EVENTS)
        if not ready:
            return
        handlers = self.handlers
        batch = [(fd, handlers.get(fd)) for fd, _ in ready]
        for fd, handler in batch:
            if handler is not None and handlers.get(fd) is handler:
                handler()

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()
