"""Real nats-server processes with JetStream for the nats sink's tests, a small JetStream admin
client of our own (raw sockets: nothing of the product's NATS client is used to check it), and a
fake NATS server that misbehaves on purpose.

- `NatsServer`: one nats-server (v2.9 as Debian ships it) on free 127.0.0.1 ports, with a config
  file: JetStream with its own store folder, optionally a cluster block, auth, TLS, max_payload.
  `start()` waits for the monitoring port's /healthz (in a cluster: until a meta leader is
  known); `kill()` is SIGKILL; a restart reuses the same store and ports.
- `nats_servers` (fixture): makes servers and kills every one of them at teardown;
  `nats_cluster()` starts three routed nodes.
- `JsAdmin`: connect (INFO, CONNECT, PING/PONG, TLS when asked or required), requests to the
  JetStream API (`$JS.API.STREAM.CREATE/INFO/MSG.GET/DELETE`), publishes with a PubAck, and
  `messages()` reads back every stored message (subject, headers, body).
- `FakeNats` (fixture `fake_nats`): a TCP server on 127.0.0.1 whose `behaviour(conn)` writes
  whatever it likes.
- `SilentProxy` (fixture `silent_proxies`): in front of a real server, passes the handshake
  and the client's publishes, then swallows everything the server says on that connection.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import make_tls_files  # noqa: F401 - tests import it from here

NATS_SERVER = shutil.which("nats-server") or "/usr/bin/nats-server"
MAX_LINE = 1 << 20  # our admin client refuses a protocol line longer than this
NS = 1_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsError(Exception):
    pass


# -- nats-server ---------------------------------------------------------------------------

def _conf_string(value: str) -> str:
    return json.dumps(str(value))  # nats-server's config accepts JSON-style quoted strings


class NatsServer:
    """One nats-server with JetStream. `token` or `users` ({user: password}) turn on auth;
    `tls` = (cert_file, key_file) makes every client connection TLS; `cluster` is set by
    `nats_cluster`: (cluster name, own route port, [route ports of the others]); `extra`:
    more lines for the config file."""

    def __init__(self, root: Path, name: str = "n1", *, token: str | None = None,
                 users: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None,
                 max_payload: int | None = None, cluster: tuple[str, int, list[int]] | None = None,
                 extra: str = ""):
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = self.dir / "store"
        self.log = self.dir / "server.log"
        self.conf = self.dir / "server.conf"
        self.port = free_port()
        self.http_port = free_port()
        self.token, self.users, self.tls = token, users or {}, tls
        self.max_payload, self.cluster, self.extra = max_payload, cluster, extra
        self.proc: subprocess.Popen | None = None
        self._logf = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        lines = [f"server_name: {_conf_string(self.name)}",
                 f"listen: \"127.0.0.1:{self.port}\"",
                 f"http: \"127.0.0.1:{self.http_port}\"",
                 f"jetstream {{ store_dir: {_conf_string(self.store)} }}"]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.token is not None:
            lines.append(f"authorization {{ token: {_conf_string(self.token)} }}")
        elif self.users:
            users = ", ".join(f"{{user: {_conf_string(u)}, password: {_conf_string(p)}}}"
                              for u, p in self.users.items())
            lines.append(f"authorization {{ users: [{users}] }}")
        if self.tls is not None:
            cert, key = self.tls
            lines.append(f"tls {{ cert_file: {_conf_string(cert)}, key_file: {_conf_string(key)}, timeout: 2 }}")
        if self.cluster is not None:
            cname, cport, routes = self.cluster
            route_list = ", ".join(f"\"nats-route://127.0.0.1:{p}\"" for p in routes)
            lines.append(f"cluster {{ name: {_conf_string(cname)}, listen: \"127.0.0.1:{cport}\", "
                         f"routes: [{route_list}] }}")
        if self.extra:
            lines.append(self.extra)
        self.conf.write_text("\n".join(lines) + "\n")

    def spawn(self) -> "NatsServer":
        """Start the process without waiting for it (see `wait_ready`)."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self.write_config()
        if self._logf is None:
            self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf)], stdout=self._logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def health(self) -> dict | None:
        """/healthz's answer (ok once JetStream is up; in a cluster, once a meta leader is known
        and the streams are current), None while the port does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 503 with {"status": "unavailable", "error": ...}
            try:
                return json.loads(e.read())
            except ValueError:
                return {"status": f"HTTP {e.code}"}
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 60) -> "NatsServer":
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()[-3000:]}")
            last = self.health()
            if last and last.get("status") == "ok":
                return self
            time.sleep(0.1)
        raise AssertionError(f"nats-server {self.name} not healthy within {timeout}s (last: {last!r}):\n"
                             f"{self.log_text()[-3000:]}")

    def start(self, timeout: float = 60) -> "NatsServer":
        return self.spawn().wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL (teardown too): the store stays for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def nats_servers(area):
    """`nats_servers(name, **kw)` makes (does not start) a NatsServer under the test's area;
    every one is killed at teardown, whatever happened."""
    made: list[NatsServer] = []

    def make(name: str = "n1", **kw) -> NatsServer:
        server = NatsServer(area / "nats", name, **kw)
        made.append(server)
        return server

    make.made = made
    yield make
    for server in made:
        server.close()


def nats_cluster(make, size: int = 3, name: str = "c1", **kw) -> list[NatsServer]:
    """`size` routed nodes (names n1..nN), started together; returns once every node is healthy
    (a meta leader is elected)."""
    route_ports = [free_port() for _ in range(size)]
    nodes = [make(f"n{i + 1}", cluster=(name, route_ports[i], [p for j, p in enumerate(route_ports) if j != i]),
                  **kw) for i in range(size)]
    for node in nodes:
        node.spawn()
    for node in nodes:
        node.wait_ready(60)
    return nodes


# -- our own JetStream client ----------------------------------------------------------------

@dataclass
class Msg:
    subject: str
    sid: str
    reply: str | None
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: str | None = None  # "503" (no responders), "404", ... from an HMSG status line


@dataclass
class StoredMsg:
    """One message read back from a stream."""
    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes

    @property
    def msg_id(self) -> str | None:
        return self.headers.get("Nats-Msg-Id")

    @property
    def json(self) -> dict:
        return json.loads(self.data)


def parse_headers(block: bytes) -> tuple[str | None, dict[str, str]]:
    """`NATS/1.0[ status[ text]]\\r\\nKey: value\\r\\n...\\r\\n\\r\\n` -> (status, headers)."""
    lines = block.decode().split("\r\n")
    if not lines[0].startswith("NATS/1.0"):
        raise NatsError(f"not a header block: {block[:100]!r}")
    first = lines[0][len("NATS/1.0"):].strip()
    status = first.split(" ", 1)[0] if first else None
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
    return status, headers


def encode_headers(headers: dict[str, str]) -> bytes:
    return ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


class JsAdmin:
    """A synchronous NATS connection for the tests: requests over one wildcard inbox."""

    def __init__(self, url: str, token: str | None = None, user: str | None = None,
                 password: str | None = None, ca_file: str | Path | None = None, timeout: float = 5.0):
        scheme, _, hostport = url.partition("://")
        host, _, port = hostport.rpartition(":")
        self.timeout = timeout
        self.sock = socket.create_connection((host, int(port)), timeout)
        self.buf = bytearray()
        try:
            line = self._readline()
            if not line.startswith(b"INFO "):
                raise NatsError(f"expected INFO from {url}, got {line[:100]!r}")
            self.info = json.loads(line[5:])
            if scheme == "tls" or self.info.get("tls_required"):
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                self.sock = context.wrap_socket(self.sock, server_hostname=host)
            connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                       "protocol": 1, "lang": "python-test", "version": "0", "name": "test-admin"}
            if token is not None:
                connect["auth_token"] = token
            if user is not None:
                connect.update(user=user, pass_=password)
                connect["pass"] = connect.pop("pass_")
            self._send(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            while True:
                line = self._readline()
                if line == b"PONG":
                    break
                if line.startswith(b"-ERR"):
                    raise NatsError(line.decode(errors="replace"))
                if line == b"PING":
                    self._send(b"PONG\r\n")
                # +OK, INFO updates: ignored
            self.inbox = f"_INBOX.test{secrets.token_hex(8)}"
            self._next = 0
            self._send(f"SUB {self.inbox}.* 1\r\n".encode())
        except BaseException:
            self.sock.close()
            raise

    # -- wire --------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise NatsError("connection closed by the server")
        self.buf += chunk

    def _readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > MAX_LINE:
                raise NatsError("protocol line too long")
            self._fill()

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_msg(self) -> Msg:
        """The next MSG/HMSG; PINGs are answered, PONG/+OK skipped, -ERR raised."""
        while True:
            line = self._readline()
            if line == b"PING":
                self._send(b"PONG\r\n")
                continue
            if line in (b"PONG", b"+OK") or line.startswith(b"INFO "):
                continue
            if line.startswith(b"-ERR"):
                raise NatsError(line.decode(errors="replace"))
            parts = line.decode().split()
            if parts and parts[0] == "MSG" and len(parts) in (4, 5):
                size = int(parts[-1])
                data = self._read_exact(size + 2)[:-2]
                return Msg(parts[1], parts[2], parts[3] if len(parts) == 5 else None, data)
            if parts and parts[0] == "HMSG" and len(parts) in (5, 6):
                hsize, total = int(parts[-2]), int(parts[-1])
                block = self._read_exact(total + 2)[:-2]
                status, headers = parse_headers(block[:hsize])
                return Msg(parts[1], parts[2], parts[3] if len(parts) == 6 else None, block[hsize:], headers, status)
            raise NatsError(f"unexpected protocol line: {line[:200]!r}")

    def request(self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None,
                timeout: float | None = None) -> Msg:
        self._next += 1
        reply = f"{self.inbox}.{self._next}"
        if headers:
            hdr = encode_headers(headers)
            self._send(f"HPUB {subject} {reply} {len(hdr)} {len(hdr) + len(payload)}\r\n".encode()
                       + hdr + payload + b"\r\n")
        else:
            self._send(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NatsError(f"no answer to {subject} within {timeout or self.timeout}s")
            self.sock.settimeout(left)
            try:
                msg = self.read_msg()
            except socket.timeout:
                raise NatsError(f"no answer to {subject} within {timeout or self.timeout}s") from None
            finally:
                self.sock.settimeout(self.timeout)
            if msg.subject == reply:
                return msg  # answers to earlier, timed-out requests are dropped

    def js(self, api: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """One JetStream API request; JetStream's {"error": ...} answers are returned as they are."""
        msg = self.request(f"$JS.API.{api}", json.dumps(body).encode() if body is not None else b"",
                           timeout=timeout)
        if msg.status == "503":
            raise NatsError(f"no responders for $JS.API.{api} (JetStream not enabled or not ready)")
        return json.loads(msg.data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "JsAdmin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- JetStream ------------------------------------------------------------------------------

    def create_stream(self, name: str, subjects: list[str], replicas: int = 1,
                      duplicate_window: float = 120.0, **extra) -> dict:
        doc = self.js(f"STREAM.CREATE.{name}", {"name": name, "subjects": subjects, "storage": "file",
                                                 "num_replicas": replicas,
                                                 "duplicate_window": int(duplicate_window * NS), **extra},
                      timeout=max(self.timeout, 10))
        if "error" in doc:
            raise NatsError(f"cannot create stream {name}: {doc['error']}")
        return doc

    def stream_info(self, name: str) -> dict:
        doc = self.js(f"STREAM.INFO.{name}")
        if "error" in doc:
            raise NatsError(f"stream {name}: {doc['error']}")
        return doc

    def delete_stream(self, name: str) -> dict:
        return self.js(f"STREAM.DELETE.{name}")

    def get(self, name: str, seq: int) -> StoredMsg | None:
        doc = self.js(f"STREAM.MSG.GET.{name}", {"seq": seq})
        if "error" in doc:
            if doc["error"].get("code") == 404:  # deleted or never stored
                return None
            raise NatsError(f"stream {name} seq {seq}: {doc['error']}")
        m = doc["message"]
        headers = parse_headers(base64.b64decode(m["hdrs"]))[1] if m.get("hdrs") else {}
        return StoredMsg(m["seq"], m["subject"], headers, base64.b64decode(m.get("data") or ""))

    def messages(self, name: str) -> list[StoredMsg]:
        state = self.stream_info(name)["state"]
        if not state["messages"]:
            return []
        got = [self.get(name, seq) for seq in range(state["first_seq"], state["last_seq"] + 1)]
        return [m for m in got if m is not None]

    def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> dict:
        """A JetStream publish; the PubAck (or an error answer) as a dict."""
        msg = self.request(subject, data, {"Nats-Msg-Id": msg_id} if msg_id else None)
        if msg.status == "503":
            raise NatsError(f"no responders for {subject} (no stream)")
        return json.loads(msg.data)


def admin(servers, **kw) -> JsAdmin:
    """A JsAdmin connected to the first server (a NatsServer, or a URL) that answers."""
    errors = []
    for s in servers if isinstance(servers, (list, tuple)) else [servers]:
        url = s if isinstance(s, str) else s.url
        if not isinstance(s, str) and (s.proc is None or s.proc.poll() is not None):
            continue
        try:
            return JsAdmin(url, **kw)
        except (OSError, NatsError) as e:
            errors.append(f"{url}: {e}")
    raise NatsError(f"no server answers: {errors}")


def stream_messages(servers, stream: str, **kw) -> list[StoredMsg]:
    """Every message stored in `stream`, read through the first server that answers."""
    with admin(servers, **kw) as a:
        return a.messages(stream)


# -- a fake NATS server ------------------------------------------------------------------------

class FakeConn:
    """The server's end of one client connection, for a FakeNats behaviour."""

    def __init__(self, sock: socket.socket, server: "FakeNats"):
        self.sock = sock
        self.server = server
        self.buf = bytearray()
        self.subs: dict[str, str] = {}  # sid -> subject (possibly with wildcards)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def info(self, **extra) -> None:
        doc = {"server_id": "FAKE", "server_name": "fake", "version": "2.9.10", "proto": 1, "go": "go1.19",
               "host": "127.0.0.1", "port": self.server.port, "headers": True, "max_payload": 1048576,
               "jetstream": True, "client_id": 1, "client_ip": "127.0.0.1", **extra}
        self.send(b"INFO " + json.dumps(doc).encode() + b"\r\n")

    def readline(self, limit: int = 1 << 20) -> bytes | None:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if len(self.buf) > limit:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def commands(self):
        """Yield (verb, args, payload, headers) for each client command: CONNECT, PING, SUB,
        PUB/HPUB (payload and headers filled in). PINGs are answered here, and yielded too."""
        while True:
            line = self.readline()
            if line is None:
                return
            verb, _, rest = line.partition(b" ")
            verb = verb.upper().decode(errors="replace")
            args = rest.decode(errors="replace").split()
            payload, headers = b"", {}
            if verb == "PING":
                self.send(b"PONG\r\n")
            elif verb == "SUB" and len(args) >= 2:
                self.subs[args[-1]] = args[0]
            elif verb == "PUB" and len(args) >= 2:
                payload = self.read_exact(int(args[-1]) + 2)
                if payload is None:
                    return
                payload = payload[:-2]
            elif verb == "HPUB" and len(args) >= 3:
                block = self.read_exact(int(args[-1]) + 2)
                if block is None:
                    return
                hsize = int(args[-2])
                try:
                    headers = parse_headers(block[:hsize])[1]
                except (NatsError, UnicodeDecodeError):
                    headers = {}
                payload = block[hsize:-2]
            self.server.record(verb, args, payload, headers)
            yield verb, args, payload, headers

    def sid_for(self, subject: str) -> str | None:
        for sid, pattern in self.subs.items():
            if subject_matches(pattern, subject):
                return sid
        return None

    def reply(self, subject: str, payload: bytes) -> None:
        """A MSG to the client's subscription that covers `subject` (its reply inbox)."""
        sid = self.sid_for(subject) or "1"
        self.send(f"MSG {subject} {sid} {len(payload)}\r\n".encode() + payload + b"\r\n")


def subject_matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class FakeNats:
    """A TCP server on 127.0.0.1: each connection runs `behaviour(conn: FakeConn)` in a thread.
    `published` lists (verb, args, payload, headers) of every PUB/HPUB any client sent."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.connections = 0
        self.published: list[tuple[str, list[str], bytes, dict]] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._socks: set[socket.socket] = set()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def record(self, verb, args, payload, headers) -> None:
        if verb in ("PUB", "HPUB"):
            with self.lock:
                self.published.append((verb, args, payload, headers))

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._socks.add(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        try:
            self.behaviour(FakeConn(sock, self))
        except OSError:
            pass  # the client went away: part of the tests
        finally:
            with self.lock:
                self._socks.discard(sock)
            sock.close()

    def close(self) -> None:
        self.closing.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in list(self._socks):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def fake_nats():
    made: list[FakeNats] = []

    def make(behaviour) -> FakeNats:
        f = FakeNats(behaviour)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def msg_ids(msgs: list[StoredMsg]) -> list[str | None]:
    return [m.msg_id for m in msgs]


_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def subject_token(value: str) -> str:
    """How the sink fills a value into its subject: anything outside [A-Za-z0-9_-] becomes '_'."""
    return _SUBJECT_UNSAFE.sub("_", value)


# -- a proxy that goes silent ------------------------------------------------------------------

class SilentProxy:
    """A TCP proxy on 127.0.0.1 in front of a nats-server: the handshake (INFO, CONNECT, PONG)
    passes, and so does everything the client sends; but once a connection's client has sent
    its first publish, nothing more from the server reaches it (no PubAck, no PING) while the
    connection stays open: a node that has gone silent, or acknowledgements lost on the way.
    `msg_ids()` lists the Nats-Msg-Id of every publish that went through to the server."""

    _MSG_ID = re.compile(rb"Nats-Msg-Id:[ \t]*([^\r\n]+)")

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.connections = 0
        self.swallowed = 0  # bytes from the server the client never got
        self.lock = threading.Lock()
        self._sent: list[bytearray] = []  # what each client sent
        self._socks: set[socket.socket] = set()
        self.closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def msg_ids(self) -> list[str]:
        with self.lock:
            return [m.decode().strip() for sent in self._sent for m in self._MSG_ID.findall(bytes(sent))]

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), 5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            sent = bytearray()
            published = threading.Event()
            with self.lock:
                self.connections += 1
                self._sent.append(sent)
                self._socks.update((client, server))
            threading.Thread(target=self._up, args=(client, server, sent, published), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, published), daemon=True).start()

    def _up(self, client, server, sent: bytearray, published: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                with self.lock:
                    sent += data
                    if re.search(rb"(^|\n)H?PUB ", bytes(sent[-len(data) - 6:])):
                        published.set()  # before it reaches the server: its answer is never passed on
                server.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, server)

    def _down(self, server, client, published: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if published.is_set():
                    with self.lock:
                        self.swallowed += len(data)
                    continue
                client.sendall(data)
        except OSError:
            pass
        # the server hung up: the client is left with a silent open connection until it hangs up

    def _close(self, *socks) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closing.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def silent_proxies():
    made: list[SilentProxy] = []

    def make(upstream_port: int) -> SilentProxy:
        p = SilentProxy(upstream_port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
