"""The control socket: HTTP/1.1 on `{run_dir}/control.sock` (mode 0660), served from the
supervisor's own loop (non-blocking, one request per connection), and its CLI client.

Routes: GET /status, POST /jobs/{uuid}/run, GET /metrics.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error"}

# A handler gets (method, path) and returns (status, content type, body).
Handler = Callable[[str, str], tuple[int, str, bytes]]


class ControlServer:
    def __init__(self, path: str, selector: selectors.BaseSelector, handler: Handler):
        self.path = path
        self.selector = selector
        self.handler = handler
        self.sock: socket.socket | None = None
        self.conns: dict[int, tuple[socket.socket, bytearray]] = {}

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
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.conns[conn.fileno()] = (conn, bytearray())
            self.selector.register(conn, selectors.EVENT_READ, lambda c=conn: self.read(c))

    def read(self, conn: socket.socket) -> None:
        _, buf = self.conns[conn.fileno()]
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
        head, sep, body = bytes(buf).partition(b"\r\n\r\n")
        if not sep:
            return
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
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)  # a client that does not read its answer gets dropped
            conn.sendall(head + body)
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self.conns.pop(conn.fileno(), None)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def close(self) -> None:
        for conn, _ in list(self.conns.values()):
            self._close(conn)
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
