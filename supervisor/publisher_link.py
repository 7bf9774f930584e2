"""The supervisor's end of the publisher process.

The supervisor is not on the result path: runners connect to the publisher's listening Unix
socket and hand their results over directly (runner/results.py). The supervisor binds that
socket once and keeps it across publisher restarts, so a runner that connects while no
publisher runs waits in its backlog instead of failing. It starts the publisher, restarts it
(backoff with jitter) when it dies, and reads its PublisherStats: outbox and sinks, and a
digest of each job's results, which status and metrics show.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable

from runner import linux
from runner.framing import Channel, FrameError
from runner.wire import PublisherSettings, PublisherStats, PublisherToSupervisor
from supervisor.manager import backoff_delay

log = logging.getLogger(__name__)

RESULTS_SOCKET = "results.sock"


def listen_for_results(run_dir: str) -> socket.socket:
    """The results socket in run_dir, mode 0600: only our own uid (and root) may connect."""
    path = os.path.join(run_dir, RESULTS_SOCKET)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            if _answers(path):  # never take another live service's socket away from it
                raise OSError(f"another service is already listening on {path}")
            os.unlink(path)  # left by an instance that was killed
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(4096)
    return sock


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class PublisherLink:
    def __init__(self, selector: selectors.BaseSelector, on_stats: Callable[[PublisherStats], None]):
        self.selector = selector
        self.on_stats = on_stats
        self.listener: socket.socket | None = None
        self.settings: PublisherSettings | None = None
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.stats: PublisherStats | None = None
        self.restarts = 0
        self.failures = 0
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def socket_path(self) -> str:
        return self.listener.getsockname()

    def listen(self, run_dir: str) -> None:
        self.listener = listen_for_results(run_dir)

    def start(self, settings: PublisherSettings, now: float) -> None:
        self.settings = settings
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        listen_fd = self.listener.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.publisher", str(to_r), str(from_w), str(os.getpid()), str(listen_fd),
             linux.TITLE_ROOM],
            pass_fds=[to_r, from_w, listen_fd], process_group=0)
        os.close(to_r)
        os.close(from_w)
        self.channel = Channel(from_r, to_w, PublisherToSupervisor)
        self.selector.register(from_r, selectors.EVENT_READ, self.read)
        self.started_at = now
        self.restart_at = None
        self.channel.send(settings)
        log.info("publisher started, pid %d", self.proc.pid)

    def read(self) -> None:
        try:
            frames = self.channel.read()
        except FrameError as e:
            log.error("publisher sent a bad frame (%s); restarting it", e)
            self.proc.kill()
            frames = []
        for frame in frames:
            self.stats = frame
            self.on_stats(frame)
        if self.channel.eof:
            self._close_channel()

    def flush(self) -> None:
        if self.channel is not None and self.channel.pending_output:
            try:
                self.channel.flush()
            except BrokenPipeError:
                log.error("publisher unreachable: its pipe is closed")
                self._close_channel()

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
            log.error("publisher exited (%s); restarting in %.1fs (runners keep their results until then)",
                      _describe(code), delay)
        if self.proc is None and not self.stopping and self.restart_at is not None and now >= self.restart_at:
            self.start(self.settings, now)

    def stop(self, timeout: float) -> None:
        """Close the pipe: the publisher commits what it read, drains its sinks and exits."""
        self.stopping = True
        self._close_channel()
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("publisher did not exit in time: SIGKILL")
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        """At exit: the results socket goes too."""
        if self.listener is not None:
            path = self.socket_path
            self.listener.close()
            self.listener = None
            try:
                os.unlink(path)
            except OSError:
                pass

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close(self.selector)
            self.channel = None


def _describe(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
