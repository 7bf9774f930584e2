"""A strict stand-in of the Continuous Compliance Framework API (SPEC §7, the `ccf` sink),
written with http.server on 127.0.0.1, as strict as the real (Go) handler:

- `POST /api/evidence`: 415 unless Content-Type is exactly `application/json`; 400 for a body
  that is not JSON or not one JSON object (an array is refused: the API takes no arrays); 400
  when a required field is missing or of the wrong type (uuid, title, start, end, status with
  its state); 400 when `start` or `end` is later than the API's clock; 201 `{"data": <evidence>}`
  otherwise. Other methods 405, other paths 404.
- With client credentials (`client_id`, `secret`): `POST /api/auth/agent/token` with HTTP Basic
  `client_id:secret` answers 200 `{"access_token", "token_type": "Bearer", "expires_in"}` (401 for
  anything else), and `/api/evidence` wants `Authorization: Bearer <a token it issued that has
  not expired nor been revoked>` (401 otherwise).
- `clock_offset` (seconds) shifts the API's clock: -3.0 is an API whose clock is 3 s behind ours
  (a host clock that runs ahead). The `Date` header of every answer comes from the same clock.
- Tests inject answers: `fail_next(n, status)` answers the next n evidence requests so;
  `outage = (status, body)` answers every evidence request so until it is cleared;
  `fail_every = (n, status)` answers every n-th evidence request so; `poison` (a word): an
  evidence whose title holds it is refused 422.

Every request is recorded (`requests`), every accepted evidence too (`evidences`), and
`connections` counts the TCP connections the API accepted (keep-alive: far fewer than requests).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import json
import re
import secrets
import socket
import socketserver
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EVIDENCE_PATH = "/api/evidence"
TOKEN_PATH = "/api/auth/agent/token"
STATES = ("satisfied", "not-satisfied")
# RFC 3339 as Go's time.Time reads it from JSON: a date, "T", a time, optional fraction, a zone
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z")


@dataclass
class Request:
    at: float  # monotonic time the whole body was read
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    conn: int  # serial number of the connection it came on
    wall: float = 0.0  # the API's clock (shifted) when it was read
    status: int | None = None
    answer: bytes = b""
    answered_at: float | None = None
    evidence: dict | None = None  # the parsed body of an evidence request, when it parsed

    @property
    def run_uuid(self) -> str | None:
        """The run_uuid prop of an evidence request (None when there is none)."""
        return run_uuid_of(self.evidence) if isinstance(self.evidence, dict) else None


@dataclass
class Token:
    value: str
    issued_at: float  # monotonic
    expires_at: float  # monotonic
    expires_in: int
    revoked: bool = False
    uses: list[float] = field(default_factory=list)  # monotonic times of the evidence requests it authorised


def run_uuid_of(evidence: dict) -> str | None:
    for prop in evidence.get("props") or []:
        if isinstance(prop, dict) and prop.get("name") == "run_uuid":
            return prop.get("value")
    return None


def parse_time(text) -> datetime.datetime | None:
    if not isinstance(text, str) or not _RFC3339.match(text):
        return None
    fixed = text.replace("z", "Z").replace("t", "T")
    head, sep, rest = fixed.partition(".")
    if sep:  # Python takes at most 6 digits of fraction
        digits = re.match(r"\d+", rest).group(0)
        fixed = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        return datetime.datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    except ValueError:
        return None


def _problem(evidence: dict) -> str | None:
    """What makes an evidence unacceptable as the Go handler binds and validates it, or None."""
    for key in ("uuid", "title", "start", "end", "status"):
        if key not in evidence or evidence[key] is None:
            return f"{key} is required"
    try:
        uuidlib.UUID(evidence["uuid"])
    except (ValueError, TypeError, AttributeError):
        return f"uuid: not a UUID: {evidence['uuid']!r}"
    if not isinstance(evidence["title"], str) or not evidence["title"]:
        return "title: must be a non-empty string"
    for key in ("start", "end"):
        if parse_time(evidence[key]) is None:
            return f"{key}: not an RFC 3339 time: {evidence[key]!r}"
    status = evidence["status"]
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        return "status.state is required"
    if status["state"] not in STATES:
        return f"status.state: must be one of {', '.join(STATES)}"
    for key in ("reason", "remarks"):
        if key in status and status[key] is not None and not isinstance(status[key], str):
            return f"status.{key}: must be a string"
    for key in ("description",):
        if key in evidence and evidence[key] is not None and not isinstance(evidence[key], str):
            return f"{key}: must be a string"
    labels = evidence.get("labels")
    if labels is not None and (not isinstance(labels, dict)
                               or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
        return "labels: must be an object of strings"
    for key in ("props", "origins", "subjects", "activities", "inventory-items", "inventoryItems", "links",
                "components"):
        if key in evidence and evidence[key] is not None and not isinstance(evidence[key], list):
            return f"{key}: must be an array"
    for prop in evidence.get("props") or []:
        if not isinstance(prop, dict) or not isinstance(prop.get("name"), str) or \
                not isinstance(prop.get("value"), str):
            return "props: each must have a string name and value"
    for link in evidence.get("links") or []:
        if not isinstance(link, dict) or not isinstance(link.get("href"), str):
            return "links: each must have an href"
    matter = evidence.get("back-matter")
    if matter is not None:
        if not isinstance(matter, dict) or not isinstance(matter.get("resources", []), list):
            return "back-matter.resources: must be an array"
        for resource in matter.get("resources") or []:
            b64 = resource.get("base64") if isinstance(resource, dict) else None
            if b64 is not None:
                try:
                    base64.b64decode(b64["value"], validate=True)
                except (binascii.Error, KeyError, TypeError, ValueError):
                    return "back-matter.resources[].base64.value: not base64"
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):  # no lookup of our fully qualified name: slow and useless here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        pass  # a client that went away mid-answer is part of the tests


class CcfApi:
    """The CCF API on 127.0.0.1 (see the module's docstring). `url` is the base a sink is given."""

    def __init__(self, client_id: str | None = None, secret: str | None = None, expires_in: int = 3600,
                 clock_offset: float = 0.0, poison: str | None = None, listen: bool = True):
        self.client_id = client_id
        self.secret = secret
        self.expires_in = expires_in
        self.clock_offset = clock_offset
        self.poison = poison
        self.outage: tuple[int, bytes] | None = None
        self.fail_every: tuple[int, int] | None = None  # (n, status): every n-th evidence request answers status
        self._evidence_requests = 0
        self._injected: list[tuple[int, bytes]] = []
        self.requests: list[Request] = []
        self.evidences: list[dict] = []
        self.tokens: dict[str, Token] = {}
        self.connections = 0
        self.lock = threading.Lock()
        self._sockets: set = set()
        self._thread: threading.Thread | None = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def log_message(self, *args):
                pass

            def date_time_string(self, timestamp=None):  # the Date header: the API's (shifted) clock
                return email.utils.formatdate(api.now() if timestamp is None else timestamp, usegmt=True)

            def setup(self):
                super().setup()
                with api.lock:
                    api.connections += 1
                    self.serial = api.connections
                    api._sockets.add(self.connection)

            def finish(self):
                with api.lock:
                    api._sockets.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_POST(self):
                self._handle()

            def do_GET(self):
                self._handle()

            def do_PUT(self):
                self._handle()

            def do_DELETE(self):
                self._handle()

            def _read_body(self) -> bytes | None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                if length is None:
                    return b""
                return self.rfile.read(int(length))

            def _handle(self):
                body = self._read_body()
                req = Request(time.monotonic(), self.command, self.path.split("?", 1)[0], dict(self.headers),
                              body, self.serial, wall=api.now())
                status, payload, headers = api._answer(req, self.headers)
                req.status, req.answer = status, payload
                with api.lock:
                    api.requests.append(req)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()
                req.answered_at = time.monotonic()

        self.server = _Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if listen:
            self.listen()

    # -- life --------------------------------------------------------------------------------

    def listen(self) -> "CcfApi":
        self.server.server_activate()
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for s in list(self._sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- what tests set ----------------------------------------------------------------------

    def now(self) -> float:
        """The API's clock (seconds since the epoch)."""
        return time.time() + self.clock_offset

    def fail_next(self, n: int, status: int, body: bytes = b'{"error": "injected"}') -> None:
        """Answer the next n evidence requests with `status` (before any other check)."""
        with self.lock:
            self._injected.extend([(status, body)] * n)

    def revoke_all(self) -> None:
        with self.lock:
            for token in self.tokens.values():
                token.revoked = True

    # -- what arrived ------------------------------------------------------------------------

    def snapshot(self, path: str | None = EVIDENCE_PATH) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def accepted(self) -> list[dict]:
        with self.lock:
            return list(self.evidences)

    def accepted_runs(self) -> list[str]:
        """run_uuid of each accepted evidence, duplicates included."""
        return [run_uuid_of(e) for e in self.accepted()]

    def issued(self) -> list[Token]:
        with self.lock:
            return sorted(self.tokens.values(), key=lambda t: t.issued_at)

    # -- answers -----------------------------------------------------------------------------

    def _answer(self, req: Request, headers) -> tuple[int, bytes, dict[str, str]]:
        if req.path == TOKEN_PATH:
            if req.method != "POST":
                return _error(405, "method not allowed")
            return self._token(headers)
        if req.path != EVIDENCE_PATH:
            return _error(404, "not found")
        if req.method != "POST":
            return _error(405, "method not allowed")
        try:
            req.evidence = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            pass
        with self.lock:
            self._evidence_requests += 1
            injected = self._injected.pop(0) if self._injected else self.outage
            if injected is None and self.fail_every and self._evidence_requests % self.fail_every[0] == 0:
                injected = (self.fail_every[1], b'{"errors": {"body": "injected"}}')
        if injected is not None:
            status, body = injected
            return status, body, {}
        if self.client_id is not None:
            refused = self._check_bearer(headers.get("Authorization"), req.at)
            if refused:
                return _error(401, refused)
        if headers.get("Content-Type") != "application/json":
            return _error(415, f"Content-Type must be application/json, not {headers.get('Content-Type')!r}")
        try:
            evidence = json.loads(req.body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"invalid JSON: {e}")
        if isinstance(evidence, list):
            return _error(400, "one evidence per request: arrays are not accepted")
        if not isinstance(evidence, dict):
            return _error(400, "the body must be a JSON object")
        problem = _problem(evidence)
        if problem:
            return _error(400, problem)
        now = datetime.datetime.fromtimestamp(req.wall, datetime.timezone.utc)
        for key in ("start", "end"):
            if parse_time(evidence[key]) > now:
                return _error(400, f"{key} is in the future: {evidence[key]} (server time "
                                   f"{now.strftime('%Y-%m-%dT%H:%M:%S.%fZ')})")
        if self.poison and self.poison in evidence["title"]:
            return _error(422, f"cannot store evidence titled {evidence['title']!r}")
        with self.lock:
            self.evidences.append(evidence)
        return 201, json.dumps({"data": evidence}).encode(), {}

    def _check_bearer(self, authorization: str | None, at: float) -> str | None:
        """Why a request is not authorised, or None (and the use is recorded on the token)."""
        if not authorization or not authorization.startswith("Bearer "):
            return "missing bearer token"
        with self.lock:
            token = self.tokens.get(authorization[len("Bearer "):])
            if token is None:
                return "unknown token"
            if token.revoked:
                return "token revoked"
            if at >= token.expires_at:
                return "token expired"
            token.uses.append(at)
        return None

    def _token(self, headers) -> tuple[int, bytes, dict[str, str]]:
        if self.client_id is None:
            return _error(404, "agent authentication is not enabled")
        authorization = headers.get("Authorization") or ""
        scheme, _, encoded = authorization.partition(" ")
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            user, sep, password = "", "", ""
        if scheme != "Basic" or not sep or (user, password) != (self.client_id, self.secret):
            return _error(401, "invalid client credentials")
        value = secrets.token_urlsafe(24)
        now = time.monotonic()
        expires_in = int(self.expires_in)
        with self.lock:
            self.tokens[value] = Token(value, now, now + expires_in, expires_in)
        return 200, json.dumps({"access_token": value, "token_type": "Bearer", "expires_in": expires_in}).encode(), {}


def _error(status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps({"errors": {"body": message}}).encode(), {}
