"""The control socket: HTTP/1.1 on `{run_dir}/control.sock` (mode 0660), served from the
supervisor's own loop (non-blocking, one request per connection), and its CLI client.

Routes: GET /status, POST /jobs/{uuid}/run, GET /metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10  # the request line, the headers and the body together
MAX_CONNS = 64  # open control connections; at the cap a new one pushes out the oldest
CONN_DEADLINE = 10.0  # seconds from accept to the answer sent: a slow client is dropped
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error"}

# A handler gets (method, path) and returns (status, content type, body).
Handler = Callable[[str, str], tuple[int, str, bytes]]


class _Conn:
    __slots__ = ("sock", "buf", "deadline", "out")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.buf = bytearray()
        self.deadline = deadline
        self.out: memoryview | None = None  # the answer still to send


class ControlServer:
    """Every connection is bounded: at most MAX_REQUEST bytes in, CONN_DEADLINE seconds from
    accept until its answer is sent (read and write are both non-blocking, so a client that
    trickles its request or never reads the answer holds nothing but its own fd), and at most
    MAX_CONNS at once (the oldest is dropped for a new one). The loop calls `expire(now)` and
    takes `next_timer()` into its select timeout."""

    def __init__(self, path: str, selector: selectors.BaseSelector, handler: Handler):
        self.path = path
        self.selector = selector
        self.handler = handler
        self.sock: socket.socket | None = None
        self.conns: dict[int, _Conn] = {}  # by fd, in accept order
        self.dropped = 0  # connections dropped for the deadline or the cap

    def listen(self) -> None:
        if os.path.exists(self.path):
            if _answers(self.path):
                raise OSError(f"another service is already listening on {self.path}")
            os.unlink(self.path)  # left behind by a service that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)
        sock.listen(64)
        sock.setblocking(False)
        self.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, self.accept)

    def accept(self) -> None:
        for _ in range(MAX_CONNS):  # a bounded batch; the rest on the next turn of the loop
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: never the loop's end
                log.warning("control socket: cannot accept a connection: %s", e)
                if self.conns:
                    self._drop_oldest()
                return
            if len(self.conns) >= MAX_CONNS:
                self._drop_oldest()
            conn.setblocking(False)
            c = _Conn(conn, time.monotonic() + CONN_DEADLINE)
            self.conns[conn.fileno()] = c
            self.selector.register(conn, selectors.EVENT_READ, lambda c=c: self._ready(c))

    def next_timer(self) -> float:
        return next(iter(self.conns.values())).deadline if self.conns else math.inf

    def expire(self, now: float) -> None:
        """Drop every connection past its deadline (they are in accept order)."""
        while self.conns:
            c = next(iter(self.conns.values()))
            if c.deadline > now:
                return
            self.dropped += 1
            self._close(c.sock)

    def _drop_oldest(self) -> None:
        self.dropped += 1
        self._close(next(iter(self.conns.values())).sock)

    def _ready(self, c: _Conn) -> None:
        if c.out is not None:
            return self._send(c)
        self.read(c.sock)

    def read(self, conn: socket.socket) -> None:
        c = self.conns.get(conn.fileno())
        if c is None or c.out is not None:
            return
        buf = c.buf
        try:
            chunk = conn.recv(8192)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            return self._close(conn)
        buf += chunk
        if len(buf) > MAX_REQUEST:
            return self._respond(conn, 413, "text/plain", b"request too large\n")
        end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(chunk) - 3))
        if end < 0:
            return
        head, body = bytes(buf[:end]), buf[end + 4:]
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._respond(conn, 400, "text/plain", b"bad request line\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    return self._respond(conn, 400, "text/plain", b"bad content-length\n")
        if length < 0:
            return self._respond(conn, 400, "text/plain", b"bad content-length\n")
        if end + 4 + length > MAX_REQUEST:
            return self._respond(conn, 413, "text/plain", b"request too large\n")
        if len(body) < length:
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        try:
            status, ctype, payload = self.handler(method, target)
        except Exception:  # noqa: BLE001 - a bug in a handler must not take down the loop
            log.exception("control request %s %s failed", method, target)
            status, ctype, payload = 500, "text/plain", b"internal error\n"
        self._respond(conn, status, ctype, payload)

    def _respond(self, conn: socket.socket, status: int, ctype: str, body: bytes) -> None:
        """Send what the socket takes now; the rest as it becomes writable, until the deadline."""
        c = self.conns.get(conn.fileno())
        if c is None:
            return
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        c.buf = bytearray()  # the request is done with
        c.out = memoryview(head + body)
        self._send(c)
        if c.out is not None and c.sock.fileno() in self.conns:
            self.selector.modify(c.sock, selectors.EVENT_WRITE, lambda c=c: self._ready(c))

    def _send(self, c: _Conn) -> None:
        try:
            while c.out:
                n = c.sock.send(c.out)
                c.out = c.out[n:]
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(c.sock)

    def _close(self, conn: socket.socket) -> None:
        self.conns.pop(conn.fileno(), None)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def close(self) -> None:
        for c in list(self.conns.values()):
            self._close(c.sock)
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def json_response(status: int, doc: object) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(doc, indent=None).encode() + b"\n"


# -- client --------------------------------------------------------------------------------

def _unix_connection(path: str, timeout: float):
    """An HTTPConnection to the control socket. http.client is imported here, by the client
    (the CLI) only: it imports email and ssl, megabytes the running service does without."""
    import http.client

    class _UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    return _UnixConnection("localhost", timeout=timeout), http.client.HTTPException


class NoService(Exception):
    """Nothing answers on the control socket."""


def request(path: str, method: str, target: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn, http_error = _unix_connection(path, timeout)
    try:
        conn.request(method, target, headers={"Content-Length": "0"} if method == "POST" else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http_error) as e:
        raise NoService(f"no service answers on {path}: {e}") from None
    finally:
        conn.close()


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
