"""Sinks: where the publisher delivers results from its outbox (SPEC §7).

A sink takes a batch of msgpack-encoded results. It returns when every one of them is
taken (delivered, or for the http sink: refused by the hub and kept as a dead letter), and
says how many went to dead letters; otherwise it raises. `DeliveryError.done` tells how many
of the batch, counted from its start, were taken before the failure: the publisher's sink
thread advances that sink's cursor past those and retries the rest later. Each sink runs in
its own thread, so `deliver` may block (disk, network); `deadline` (monotonic) is set while
the publisher stops, and a sink should not block much past it.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import logging
import os
import re
import threading
import time
from typing import Protocol

import msgspec
from supervisor import __version__
from supervisor.config import ConfigError, Sink as SinkConfig, check_token_file
from supervisor.files import write_atomic

log = logging.getLogger("publisher")

FILE_MODE = 0o640
DEAD_LETTER_DIR = "dead-letter"
DEAD_LETTER_BODY = 4096  # bytes of the hub's answer kept in a dead letter
RETRY_AFTER_MAX = 3600.0  # a Retry-After further out than this is taken as this
DRAIN_MAX = 1 << 20  # the rest of an answer is read (to reuse the connection) up to this, else the connection is closed
MIN_REQUEST_TIMEOUT = 0.1  # while stopping, a request gets at least this long
# urllib3 and ssl (with email.utils, 7 MB of the publisher's memory) are imported by the first
# HttpSink: a publisher with file sinks only does without them.
urllib3 = ssl = None


def _import_http_modules() -> None:
    global urllib3, ssl
    if urllib3 is None:
        import ssl as ssl_module
        import urllib3 as urllib3_module
        ssl, urllib3 = ssl_module, urllib3_module


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")  # as spec names: a plain file name, never a path
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+-]")
_BEARER = re.compile(r"^[\x21-\x7e]+\Z")  # visible ASCII: nothing that could split or break a header


class DeliveryError(Exception):
    """Delivery failed after the first `done` payloads of the batch were taken (`dead_lettered`
    of those as dead letters). `retry_after`: seconds the receiver asked us to wait."""

    def __init__(self, message: str, done: int = 0, dead_lettered: int = 0, retry_after: float | None = None):
        super().__init__(message)
        self.done = done
        self.dead_lettered = dead_lettered
        self.retry_after = retry_after


class ResultSink(Protocol):
    name: str
    kind: str

    def deliver(self, payloads: list[bytes], deadline: float | None = None) -> int:
        """Take every payload and return how many of them became dead letters, or raise
        (DeliveryError says how many were taken first; any other exception: none)."""

    def close(self) -> None: ...


def make_sink(config_sink: SinkConfig, state_dir: str, key: str = "publisher.sink", titles=None) -> ResultSink:
    """`key` names the sink's table in the config file (publisher.sink[i]) for error messages;
    `titles`: the publisher's ccf.JobTitles (a ccf sink reads job titles from it)."""
    if config_sink.kind == "file":
        return FileSink(config_sink)
    if config_sink.kind == "http":
        return HttpSink(config_sink, state_dir, key)
    if config_sink.kind == "ccf":
        from supervisor.publisher.ccf import CcfSink
        return CcfSink(config_sink, state_dir, key, titles)
    if config_sink.kind == "nats":
        from supervisor.publisher.jetstream import JetStreamSink
        return JetStreamSink(config_sink, state_dir, key)
    raise ValueError(f"unknown sink kind {config_sink.kind!r}")


# -- file ---------------------------------------------------------------------------------

class FileSink:
    """Appends one JSON line per result; flushed and fsynced per batch.

    The file is reopened when it is moved or removed (log rotation), so the next batch goes
    to a new file at the configured path.
    """

    kind = "file"
    paced = True  # written on the publisher's flush timer: one write+fsync per flush_interval

    def __init__(self, config_sink: SinkConfig):
        self.name = config_sink.name
        self.path = config_sink.path
        self._fd = -1
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.msgpack.Decoder()  # generic objects: maps keep their key order
        self.rejected = 0  # payloads that cannot become JSON; skipped, never retried forever

    def deliver(self, payloads: list[bytes], deadline: float | None = None) -> int:
        lines = bytearray()
        for payload in payloads:
            try:
                lines += self._encoder.encode(self._decoder.decode(payload))
            except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError) as e:
                # One bad record must not block every later one behind it.
                self.rejected += 1
                log.error("sink %s: skipped a result that cannot be written as JSON: %s", self.name, e)
                continue
            lines += b"\n"
        if not lines:
            return 0
        fd = self._open()
        before = os.fstat(fd).st_size
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # Cut a partial batch so the retry does not leave a torn line in the middle.
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass
            self.close()
            raise
        return 0

    def _open(self) -> int:
        if self._fd >= 0 and not self._moved():
            return self._fd
        self.close()
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        self._cut_torn_line()
        return self._fd

    def _cut_torn_line(self) -> None:
        """A crash mid-batch (SIGKILL, power cut) can leave a partial last line. Its batch was
        never marked delivered and comes again in full, so cut the fragment rather than
        glue the next line onto it."""
        size = end = os.fstat(self._fd).st_size
        while end > 0:
            start = max(0, end - 65536)
            newline = os.pread(self._fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            log.warning("sink %s: cut a torn last line of %d bytes from %s (left by a crash; "
                        "its results are delivered again)", self.name, size - end, self.path)

    def _moved(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


# -- dead letters -------------------------------------------------------------------------

class DeadLetters:
    """state_dir/dead-letter/: one JSON file per result a receiver refused, written atomically.

    The file is `<result uuid>.json`. A uuid that is not a plain file name (SPEC names:
    `^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$`) is sanitised and given a hash suffix, so no result
    can name a path outside the folder. When another sink already left a letter for the same
    result, this one is `<uuid>.<sink>.json`; the same sink refusing it again replaces its own.
    """

    _lock = threading.Lock()  # sink threads share the folder (and write_atomic's temp names)

    def __init__(self, folder: str):
        self.folder = folder

    def put(self, sink: str, status: int | None, body: bytes, result_json: bytes | None, uuid: object,
            raw: bytes) -> str:
        doc = {"sink": sink, "status": status, "body": body[:DEAD_LETTER_BODY].decode("utf-8", "replace"),
               "time": utc_now_iso(),
               "result": msgspec.Raw(result_json) if result_json is not None else None}
        if result_json is None:  # not even JSON: keep the stored bytes, so nothing is lost
            doc["result_msgpack_hex"] = raw.hex()
        data = msgspec.json.encode(doc) + b"\n"
        base = dead_letter_name(uuid, raw)
        with self._lock:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            path = os.path.join(self.folder, base + ".json")
            if _letter_sink(path) not in (None, sink):
                path = os.path.join(self.folder, f"{base}.{sink}.json")
            write_atomic(path, data, 0o600)
        return path


def dead_letter_name(uuid: object, raw: bytes = b"") -> str:
    """A file name (without .json) for the result with this uuid; never a path."""
    if isinstance(uuid, str) and _SAFE_NAME.match(uuid):
        return uuid
    text = uuid if isinstance(uuid, str) else ""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass") if text else raw).hexdigest()[:16]
    cleaned = _UNSAFE_CHARS.sub("_", text)[:96].lstrip("._+-")
    return f"{cleaned}-{digest}" if cleaned else f"result-{digest}"


def _letter_sink(path: str) -> str | None:
    """The sink named in an existing dead letter; None when there is none (or it is unreadable)."""
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=_LetterHead).sink
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


class _LetterHead(msgspec.Struct):
    sink: str


class _Uuid(msgspec.Struct):
    uuid: object = None


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- http ---------------------------------------------------------------------------------

# SPEC §7: 401, 403, 404 and 405 say the token or the url is wrong, not the result: retried
# like 408, 429 and 5xx, with the answer in last_error, never dead-lettered
WRONG_TOKEN_OR_URL = frozenset({401, 403, 404, 405})
RETRIED_4XX = WRONG_TOKEN_OR_URL | {408, 429}


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class HttpSink:
    """POSTs JSON arrays of results to an Event Hub (SPEC §7).

    One urllib3 PoolManager with a single kept-alive connection; one request at a time.
    2xx: all taken. 408, 429, 5xx (and anything else that is not 2xx or 4xx: a redirect is
    not followed), timeouts and connection errors: DeliveryError, retried by the publisher,
    honouring Retry-After. Any other 4xx: the batch is bisected, in order, to find the results
    the hub refuses on their own; those become dead letters and the rest are delivered.
    """

    kind = "http"

    def __init__(self, config_sink: SinkConfig, state_dir: str, key: str = "publisher.sink"):
        _import_http_modules()
        self.name = config_sink.name
        self.url = config_sink.url
        self.timeout = float(config_sink.timeout)
        self.token_file = config_sink.token_file
        self.ca_file = config_sink.ca_file if self.url.startswith("https://") else None
        self.key = key
        self.dead_letters = DeadLetters(os.path.join(state_dir, DEAD_LETTER_DIR))
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.msgpack.Decoder()  # generic objects: maps keep their key order
        self._authorization: str | None = None
        self._token_id: tuple | None = None
        self._ca_ok = self.ca_file is None
        self._pool: urllib3.PoolManager | None = None
        try:  # a problem is logged at once; each delivery checks again (the operator may fix it)
            self._headers()
            self._check_ca()
        except DeliveryError as e:
            log.error("sink %s: %s; its results stay in the outbox until this is fixed", self.name, e)

    # -- configuration that lives in files -----------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": f"assessment-runtime/{__version__}"}
        if self.token_file:
            headers["Authorization"] = self._bearer()
        return headers

    def _bearer(self) -> str:
        """`Bearer <token>`, read again whenever the file changes (a rotated token is used at once)."""
        try:
            st = os.stat(self.token_file)
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        except OSError:
            ident = None
        if ident is not None and ident == self._token_id:
            return self._authorization
        self._token_id = None
        try:
            token = check_token_file(self.token_file, f"{self.key}.token_file")
        except ConfigError as e:
            raise DeliveryError(f"config error: {e}") from None
        if not _BEARER.match(token):
            raise DeliveryError(f"config error: key {self.key}.token_file: {self.token_file} holds characters "
                                f"a bearer token cannot have (only visible ASCII, no spaces)")
        self._authorization, self._token_id = f"Bearer {token}", ident
        return self._authorization

    def _check_ca(self) -> None:
        if self._ca_ok:
            return
        try:
            ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise DeliveryError(f"config error: key {self.key}.ca_file: cannot load {self.ca_file}: "
                                f"{getattr(e, 'strerror', None) or e}") from None
        self._ca_ok = True

    def _manager(self) -> urllib3.PoolManager:
        if self._pool is None:
            tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": self.ca_file} if self.url.startswith("https://") else {}
            self._pool = urllib3.PoolManager(num_pools=1, maxsize=1, block=False, retries=False, **tls)
        return self._pool

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, payloads: list[bytes], deadline: float | None = None) -> int:
        headers = self._headers()
        self._check_ca()
        encoded = [self._json(p) for p in payloads]
        # Ranges (start, end, mark) of the batch, sent in order. mark: UNKNOWN; or, for the
        # second half of a refused range, the number of dead letters when it was split: if
        # the first half adds none, the refusal was in this half, which is split unsent;
        # UNREADABLE: a payload that is not a result, a dead letter at once.
        queue: collections.deque[tuple[int, int, int]] = collections.deque()
        start = 0
        for i, item in enumerate(encoded):
            if item is None:
                if start < i:
                    queue.append((start, i, _UNKNOWN))
                queue.append((i, i + 1, _UNREADABLE))
                start = i + 1
        if start < len(encoded):
            queue.append((start, len(encoded), _UNKNOWN))
        letters: list[tuple[str, int | None, bytes]] = []  # (file, status, body) of each dead letter
        try:
            while queue:
                a, b, mark = queue.popleft()
                if mark == _UNREADABLE:
                    self._dead_letter(payloads[a], None, b"not a readable result", None, letters, a)
                    continue
                if b - a > 1 and mark == len(letters):
                    refused = True  # the first half went through: the refused results are here
                else:
                    try:
                        refused, status, body = self._post(encoded, a, b, headers, deadline)
                    except _Retryable as e:
                        raise DeliveryError(str(e), done=a, dead_lettered=len(letters),
                                            retry_after=e.retry_after) from None
                if not refused:
                    continue
                if b - a == 1:
                    self._dead_letter(payloads[a], status, body, encoded[a], letters, a)
                    continue
                mid = (a + b) // 2
                queue.appendleft((mid, b, len(letters)))
                queue.appendleft((a, mid, _UNKNOWN))
        finally:
            self._report_letters(letters)
        return len(letters)

    def _dead_letter(self, payload: bytes, status: int | None, body: bytes, result_json: bytes | None,
                     letters: list, done: int) -> None:
        uuid = None
        if result_json is not None:
            try:
                uuid = msgspec.json.decode(result_json, type=_Uuid).uuid
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        try:
            path = self.dead_letters.put(self.name, status, body, result_json, uuid, payload)
        except OSError as e:
            raise DeliveryError(f"cannot write a dead letter in {self.dead_letters.folder}: {e}",
                                done=done, dead_lettered=len(letters)) from None
        letters.append((os.path.basename(path), status, body))

    def _report_letters(self, letters: list[tuple[str, int | None, bytes]]) -> None:
        if not letters:
            return
        _, status, body = letters[0]
        names = ", ".join(name for name, _, _ in letters[:5]) + (", ..." if len(letters) > 5 else "")
        answer = f"HTTP {status}: {_snippet(body)}" if status is not None else body.decode("utf-8", "replace")
        log.error("sink %s: %d result(s) refused (%s); kept in %s: %s", self.name, len(letters), answer,
                  self.dead_letters.folder, names)

    def _json(self, payload: bytes) -> bytes | None:
        try:
            return self._encoder.encode(self._decoder.decode(payload))
        except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError) as e:
            log.error("sink %s: a stored result is not readable (%s); it goes to the dead letters", self.name, e)
            return None

    def _post(self, encoded: list[bytes], a: int, b: int, headers: dict[str, str],
              deadline: float | None) -> tuple[bool, int | None, bytes]:
        """POST encoded[a:b] as one JSON array. Returns (refused, status, first bytes of the
        answer): refused is False for 2xx, True for a 4xx other than those retried (408, 429, and
        401/403/404/405: a wrong token or url). Raises
        _Retryable for everything else."""
        body = b"[" + b",".join(encoded[a:b]) + b"]"
        resp = self._send(self.url, body, headers, deadline)
        status = resp.status
        try:
            if 200 <= status < 300:
                return False, status, b""
            head = _read_some(resp, DEAD_LETTER_BODY)
            if 400 <= status < 500 and status not in RETRIED_4XX:
                return True, status, head
            raise self._retryable(resp, head, self.url)
        finally:
            _finish(resp)

    def _send(self, url: str, body: bytes, headers: dict[str, str], deadline: float | None):
        """POST once (twice when a kept-alive connection turns out closed); the answer, its body
        unread (the caller ends with _finish). Raises _Retryable when there is no answer."""
        for attempt in (1, 2):
            timeout = self.timeout
            if deadline is not None:
                timeout = max(MIN_REQUEST_TIMEOUT, min(timeout, deadline - time.monotonic()))
            try:
                return self._manager().request(
                    "POST", url, body=body, headers=headers, redirect=False, retries=False,
                    timeout=urllib3.Timeout(connect=timeout, read=timeout), preload_content=False)
            except urllib3.exceptions.ProtocolError as e:
                # A kept-alive connection the hub had closed: try once more at once, on a new one.
                if attempt == 1:
                    continue
                raise _Retryable(f"POST {url}: {_describe(e, timeout)}") from None
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise _Retryable(f"POST {url}: {_describe(e, timeout)}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _retryable(resp, head: bytes, url: str, hint: str | None = None) -> _Retryable:
        """The failure for an answer that is retried: names the status, the first of its body and,
        for a redirect or a wrong token or url, what to do (`hint`, when the caller knows better)."""
        status = resp.status
        why = f"HTTP {status} from {url}" + (f": {_snippet(head)}" if head else "")
        if hint:
            why += f" ({hint})"
        elif 300 <= status < 400:
            why += " (redirects are not followed: set the sink's url to the final address)"
        elif status in WRONG_TOKEN_OR_URL:
            why += " (a wrong token or url: retried, never dead-lettered)"
        return _Retryable(why, parse_retry_after(resp.headers.get("Retry-After")))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
            self._pool = None


_UNKNOWN = -1
_UNREADABLE = -2


def _read_some(resp, limit: int) -> bytes:
    try:
        return resp.read(limit)
    except (urllib3.exceptions.HTTPError, OSError):
        return b""


def _finish(resp) -> None:
    """Read the rest of an answer so its connection can be kept; close it when that is too much."""
    try:
        left = DRAIN_MAX
        while left > 0:
            chunk = resp.read(min(65536, left))
            if not chunk:
                break
            left -= len(chunk)
        else:
            resp.close()
    except (urllib3.exceptions.HTTPError, OSError):
        resp.close()
    finally:
        resp.release_conn()


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", "replace").strip().replace("\n", " ")
    return text + ("..." if len(body) > limit else "")


def _describe(e: Exception, timeout: float) -> str:
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return "cannot connect: " + str(e).split(": ", 1)[-1].removeprefix("Failed to establish a new connection: ")
    if isinstance(e, urllib3.exceptions.ConnectTimeoutError):
        return f"cannot connect within {timeout:g}s"
    if isinstance(e, urllib3.exceptions.ReadTimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(e, urllib3.exceptions.SSLError):
        return f"TLS: {e}"
    if isinstance(e, urllib3.exceptions.ProtocolError):
        return f"connection lost: {e.args[1] if len(e.args) > 1 else e}"
    return f"{type(e).__name__}: {e}"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date; None when
    absent or unreadable. At most RETRY_AFTER_MAX."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    import email.utils  # only the http sink gets here
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), RETRY_AFTER_MAX)
