"""A small synchronous NATS client: the part of the client protocol a publisher needs.

https://docs.nats.io/reference/reference-protocols/nats-protocol: INFO, CONNECT, PUB/HPUB,
SUB, MSG/HMSG, PING/PONG, +OK/-ERR, and the TLS upgrade after INFO. One connection, used
from one thread (the sink's); no background reader: the caller reads when it waits for
answers, and `service_idle` answers the server's PINGs between deliveries. Everything the
server sends is bounded (control lines, payloads) and checked; anything unexpected raises
NatsError and the connection is dropped. The official Python client is asyncio-only.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable

import msgspec

from supervisor import __version__

CRLF = b"\r\n"
MAX_CONTROL_LINE = 1 << 20  # an INFO lists a cluster's URLs: generous, but bounded
MAX_INBOUND_PAYLOAD = 16 << 20  # we receive only small answers (PubAcks); more is garbage
RECV_SIZE = 65536


class NatsError(Exception):
    """The connection cannot go on (lost, refused, or the server said something we cannot
    read); the message names the server."""


class ServerInfo(msgspec.Struct):
    server_id: str = ""
    version: str = ""
    max_payload: int = 1 << 20
    headers: bool = False
    tls_required: bool = False
    tls_available: bool = False
    auth_required: bool = False
    connect_urls: list[str] = []


class Msg(msgspec.Struct):
    subject: str
    reply: str | None
    status: int | None  # from an HMSG's NATS/1.0 status line: 503 = no responders
    description: str
    headers: bytes
    payload: bytes


class Credentials(msgspec.Struct):
    token: str | None = None
    user: str | None = None
    password: str | None = None


class NatsClient:
    """Connects to the first URL that answers, starting after the one used last.

    `credentials` is called at each connect, so a rotated secret is used at once.
    """

    def __init__(self, urls: list[str], timeout: float, ca_file: str | None = None,
                 credentials: Callable[[], Credentials] | None = None, name: str = "assessment-runtime"):
        self.urls = urls
        self.timeout = timeout
        self.ca_file = ca_file
        self.credentials = credentials or Credentials
        self.name = name
        self.url: str | None = None  # the one we are connected to
        self.info = ServerInfo()
        self._next = 0  # index of the URL to try first
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._sid = 0
        self._ssl_context: ssl.SSLContext | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- connecting ------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect to the next URL that works; NatsError naming every one that did not."""
        self.close()
        errors = []
        for _ in range(len(self.urls)):
            url = self.urls[self._next % len(self.urls)]
            self._next = (self._next + 1) % len(self.urls)
            try:
                self._connect(url)
                return
            except (NatsError, OSError, ssl.SSLError) as e:
                self.close()
                errors.append(_describe(url, e))
        raise NatsError("; ".join(errors))

    def _connect(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or 4222
        self.url = url
        self._buf.clear()
        sock = socket.create_connection((host, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        deadline = time.monotonic() + self.timeout
        line = self._read_line(deadline)
        op, _, rest = line.partition(b" ")
        if op.upper() != b"INFO":
            raise NatsError(f"expected INFO, got {_show(line)}")
        self.info = self._parse_info(rest)
        use_tls = parts.scheme == "tls" or self.info.tls_required
        if use_tls:
            if not (self.info.tls_required or self.info.tls_available):
                raise NatsError("the URL asks for TLS (tls://) but the server does not offer it")
            self._sock = self._tls_context().wrap_socket(sock, server_hostname=host)
            self._sock.settimeout(self.timeout)
        if not self.info.headers:
            raise NatsError(f"the server ({self.info.version or 'unknown version'}) does not support "
                            f"headers; nats-server 2.2 or later is needed")
        creds = self.credentials()
        connect = {"verbose": False, "pedantic": False, "tls_required": use_tls, "name": self.name,
                   "lang": "python", "version": __version__, "protocol": 1, "headers": True,
                   "no_responders": True, "echo": False}
        if creds.token:
            connect["auth_token"] = creds.token
        if creds.user is not None:
            connect["user"], connect["pass"] = creds.user, creds.password
        self._send(b"CONNECT " + msgspec.json.encode(connect) + CRLF + b"PING" + CRLF)
        while True:  # the PONG to our PING says the CONNECT was taken; -ERR says why not
            op, rest = self._read_op(deadline)
            if op == b"PONG":
                return
            if op == b"INFO":
                self.info = self._parse_info(rest)
            elif op not in (b"+OK", b"PING"):
                raise NatsError(f"expected PONG after CONNECT, got {_show(op + b' ' + rest)}")

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context(cafile=self.ca_file)
        return self._ssl_context

    @staticmethod
    def _parse_info(rest: bytes) -> ServerInfo:
        try:
            return msgspec.json.decode(rest, type=ServerInfo)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise NatsError(f"unreadable INFO ({e}): {_show(rest)}") from None

    # -- sending ---------------------------------------------------------------------------

    def subscribe(self, subject: str) -> int:
        self._sid += 1
        self._send(f"SUB {subject} {self._sid}\r\n".encode())
        return self._sid

    @staticmethod
    def hpub(subject: str, reply: str, headers: bytes, payload: bytes) -> bytes:
        """One HPUB frame; `headers` is the block after the NATS/1.0 line, each ending in CRLF."""
        head = b"NATS/1.0\r\n" + headers + CRLF
        return (f"HPUB {subject} {reply} {len(head)} {len(head) + len(payload)}\r\n".encode()
                + head + payload + CRLF)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self._send(data)

    def _send(self, data) -> None:
        if self._sock is None:
            raise NatsError("not connected")
        try:
            self._sock.settimeout(self.timeout)  # reads leave a shorter one behind
            self._sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise NatsError(f"connection lost while sending: {_oserror(e)}") from None

    # -- receiving -------------------------------------------------------------------------

    def next_msg(self, deadline: float) -> Msg | None:
        """The next MSG/HMSG, answering PINGs on the way; None when `deadline` passes first."""
        while True:
            try:
                op, rest = self._read_op(deadline)
            except TimeoutError:
                return None
            if op == b"MSG" or op == b"HMSG":
                return self._read_msg(op, rest, deadline)
            if op == b"INFO":
                self.info = self._parse_info(rest)
            elif op not in (b"PONG", b"+OK"):
                raise NatsError(f"unexpected {_show(op + b' ' + rest)}")

    def service_idle(self) -> None:
        """Between uses: answer the PINGs that came, and notice a connection the server closed."""
        if self._sock is None:
            return
        while CRLF in self._buf or self._readable():
            if CRLF not in self._buf:
                self._fill(time.monotonic() + self.timeout)
                continue
            op, rest = self._read_op(time.monotonic() + self.timeout, answer_ping=False)
            if op == b"PING":
                self._send(b"PONG\r\n")
            elif op == b"MSG" or op == b"HMSG":
                self._read_msg(op, rest, time.monotonic() + self.timeout)  # a late answer: dropped
            elif op == b"INFO":
                self.info = self._parse_info(rest)

    def _readable(self) -> bool:
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        r, _, _ = select.select([self._sock], [], [], 0)
        return bool(r)

    def _read_op(self, deadline: float, answer_ping: bool = True) -> tuple[bytes, bytes]:
        """The next operation the caller must see (a PING is answered here unless asked not to;
        -ERR is raised)."""
        while True:
            line = self._read_line(deadline)
            op, _, rest = line.partition(b" ")
            op = op.upper()
            if op == b"PING" and answer_ping:
                self._send(b"PONG\r\n")
                continue
            if op == b"-ERR":
                raise NatsError(f"server error: {rest.decode('utf-8', 'replace').strip()[:300]}")
            if op not in (b"MSG", b"HMSG", b"INFO", b"PING", b"PONG", b"+OK"):
                raise NatsError(f"not the NATS protocol: {_show(line)}")
            return op, rest

    def _read_msg(self, op: bytes, rest: bytes, deadline: float) -> Msg:
        fields = rest.split()
        try:
            if op == b"MSG":
                if len(fields) not in (3, 4):
                    raise ValueError
                header_len, total = 0, int(fields[-1])
            else:
                if len(fields) not in (4, 5):
                    raise ValueError
                header_len, total = int(fields[-2]), int(fields[-1])
            if not 0 <= header_len <= total:
                raise ValueError
        except ValueError:
            raise NatsError(f"unreadable {op.decode()}: {_show(op + b' ' + rest)}") from None
        if total > MAX_INBOUND_PAYLOAD:
            raise NatsError(f"a {op.decode()} of {total} bytes: more than the {MAX_INBOUND_PAYLOAD} we take")
        reply = fields[2].decode("utf-8", "replace") if len(fields) == (5 if op == b"HMSG" else 4) else None
        data = self._read_exact(total + 2, deadline)
        if data[-2:] != CRLF:
            raise NatsError(f"{op.decode()} payload not followed by CRLF")
        headers, payload = bytes(data[:header_len]), bytes(data[header_len:total])
        status, description = None, ""
        if header_len:
            first = headers.split(CRLF, 1)[0].split(None, 2)  # NATS/1.0 [status [description]]
            if len(first) >= 2 and first[1].isdigit():
                status = int(first[1])
                description = first[2].decode("utf-8", "replace") if len(first) > 2 else ""
        return Msg(fields[0].decode("utf-8", "replace"), reply, status, description, headers, payload)

    def _read_line(self, deadline: float) -> bytes:
        start = 0
        while True:
            end = self._buf.find(CRLF, start)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 2]
                return line
            if len(self._buf) > MAX_CONTROL_LINE:
                raise NatsError(f"a protocol line longer than {MAX_CONTROL_LINE} bytes: "
                                f"{_show(bytes(self._buf[:80]))}")
            start = max(0, len(self._buf) - 1)
            self._fill(deadline)

    def _read_exact(self, n: int, deadline: float) -> bytearray:
        while len(self._buf) < n:
            self._fill(deadline)
        data = self._buf[:n]
        del self._buf[:n]
        return data

    def _fill(self, deadline: float) -> None:
        if self._sock is None:
            raise NatsError("not connected")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        try:
            self._sock.settimeout(left)
            chunk = self._sock.recv(RECV_SIZE)
        except (TimeoutError, socket.timeout):
            raise TimeoutError from None
        except (OSError, ssl.SSLError) as e:
            raise NatsError(f"connection lost: {_oserror(e)}") from None
        if not chunk:
            raise NatsError("the server closed the connection")
        self._buf += chunk

    # -- requests (tools and tests) ----------------------------------------------------------

    def request(self, subject: str, payload: bytes, timeout: float | None = None) -> Msg:
        inbox = f"_INBOX.{os.urandom(8).hex()}"
        sid = self.subscribe(inbox)
        self._send(f"PUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + CRLF)
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            while True:
                msg = self.next_msg(deadline)
                if msg is None:
                    raise NatsError(f"no answer to {subject} within {timeout or self.timeout:g}s")
                if msg.subject == inbox:
                    return msg
        finally:
            if self._sock is not None:
                self._send(f"UNSUB {sid}\r\n".encode())

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        self._buf.clear()


def _show(data: bytes, limit: int = 120) -> str:
    text = repr(data[:limit])[2:-1]
    return text + ("..." if len(data) > limit else "")


def _oserror(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or e}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _describe(url: str, e: BaseException) -> str:
    if isinstance(e, NatsError):
        return f"{url}: {e}"
    if isinstance(e, TimeoutError):
        return f"{url}: no answer in time"
    return f"{url}: {_oserror(e)}"
