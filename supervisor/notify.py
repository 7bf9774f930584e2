"""systemd service notifications (sd_notify), with the standard library only.

Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a filesystem path, or `@name` for an
abstract socket) and, with `WatchdogSec=`, `WATCHDOG_USEC` (and `WATCHDOG_PID`). We send
datagrams of `KEY=VALUE` lines to that socket:

- `READY=1` once the stored specs are loaded, the first reconcile has run, the control socket
  listens and the publisher has reported from its opened outbox (the first turn of the loop
  after which `publisher.stats` is set);
- `STATUS=N jobs, M running, outbox K` whenever that line changes, at most once a second;
- `WATCHDOG=1` every half of `WATCHDOG_USEC`, sent from the supervisor loop itself, so a loop
  that hangs stops the pings and systemd restarts the service;
- `STOPPING=1` when shutdown begins.

Without `NOTIFY_SOCKET` every call is a no-op. The variables are removed from our environment
once read, so the publisher, zygote, runners and plugins never see them (as sd_notify's
`unset_environment` does). A failed send is logged once and otherwise ignored: systemd being
away must never stop the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0  # seconds between two STATUS= updates at most
ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | bytes | None:
    """The address to sendto() for a NOTIFY_SOCKET value; None when we cannot use it."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # abstract namespace
    return None  # e.g. vsock: addresses, which only VMs use


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when the watchdog
    is off or meant for another process (WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != pid:
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2_000_000


class Notifier:
    """One per service. `tick()` is called once per turn of the supervisor loop."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None):
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        value = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(value) if value else None
        if value and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket path we can use; not notifying systemd", value)
        self.watchdog = watchdog_interval(env, pid) if self.address is not None else None
        self.sock: socket.socket | None = None
        self.ready_sent = False
        self.stopping_sent = False
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.last_status: str | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> "Notifier":
        """Read the variables, then remove them so that no child inherits them."""
        environ = os.environ if environ is None else environ
        notifier = cls(dict(environ))
        for key in ENV_KEYS:
            environ.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False when it could not be sent."""
        if self.address is None:
            return False
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self.sock.setblocking(False)
            self.sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd: %s", e)
            return False

    # -- from the supervisor loop ----------------------------------------------------------

    def next_timer(self) -> float:
        """When the loop must wake up next for us (a watchdog ping), else +inf."""
        return self.next_watchdog if self.watchdog else float("inf")

    def tick(self, service, now: float | None = None) -> None:
        """READY once the service is, STATUS when it changed, WATCHDOG=1 when due."""
        if self.address is None or self.stopping_sent:
            return
        now = time.monotonic() if now is None else now
        if self.watchdog and now >= self.next_watchdog:
            self.send("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog
        if not self.ready_sent:
            if not is_ready(service):
                return
            self.ready_sent = True
            self.last_status = status_line(service)
            self.next_status = now + STATUS_INTERVAL
            self.send("READY=1", f"STATUS={self.last_status}")
            return
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL
            line = status_line(service)
            if line != self.last_status:
                self.last_status = line
                self.send(f"STATUS={line}")

    def stopping(self, why: str = "stopping") -> None:
        if self.address is None or self.stopping_sent:
            return
        self.stopping_sent = True
        self.send("STOPPING=1", f"STATUS={why}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def is_ready(service) -> bool:
    """The publisher has reported from its opened outbox (its first stats frame)."""
    publisher = getattr(service, "publisher", None)
    return publisher is not None and getattr(publisher, "stats", None) is not None


def status_line(service) -> str:
    """`N jobs, M running, outbox K`, plus what is wrong when something is."""
    runners = getattr(getattr(service, "manager", None), "runners", {}) or {}
    running = sum(1 for rec in runners.values() if getattr(rec, "state", None) == "running")
    publisher = getattr(service, "publisher", None)
    stats = getattr(publisher, "stats", None)
    outbox = getattr(stats, "outbox_results", 0) if stats is not None else 0
    parts = [f"{len(runners)} job{'' if len(runners) == 1 else 's'}", f"{running} running", f"outbox {outbox}"]
    if publisher is not None and not getattr(publisher, "ready", True):
        parts.append("publisher down")
    rejected = getattr(service, "rejected", None) or []
    if rejected:
        parts.append(f"{len(rejected)} rejected")
    return ", ".join(parts)
