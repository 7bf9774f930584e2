"""The Configuration service source (`[configuration]`, SPEC §5): a client of the diff protocol.

    GET {url}/config/jobSpecs/diff/{runtime_uuid}[?since={revision}]

The supervisor's loop never waits on the network. `ConfigSync` owns one worker thread that
performs one request at a time (the loop asks for the next one only after it has taken the
answer of the last), parses and validates the answer off the loop, and hands a `SyncResult`
back through a queue, waking the loop through its self-pipe. Only the loop's thread touches
the spec store and the status (`apply_to_store`, `ConfigSync.settle`): the worker never does.

What counts as a failure (nothing is changed, the next try backs off): any status but 200,
304 and 410; a timeout; a refused connection; a TLS error; a body that is not JSON, not the
right shape or larger than MAX_BODY; 304 or 410 to a request without `since`; a delta
(`complete: false`) to a request without `since`.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import re
import ssl
import threading
import time
from typing import Annotated, Any, Literal
from urllib.parse import quote

import msgspec
import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError,
                                SSLError)
from urllib3.util.ssl_ import create_urllib3_context

from supervisor import __version__
from supervisor.config import ConfigError, ConfigurationSource, check_token_file
from supervisor.spec import NAME_PATTERN, Spec, SpecError, parse_spec, validation_reason
from supervisor.store import Rejection, SpecStore

log = logging.getLogger("supervisor.sync")

SOURCE = "http"  # the store's folder for this source
MAX_BODY = 64 << 20  # a larger answer is refused without being read whole
CHUNK = 1 << 20
MAX_ENTRIES = 10_000  # entries of `upserted`, and of `deleted`, in one answer; more fail it whole
# JSON values in one answer. Decoding makes a Python object of each (~70 bytes for the smallest),
# and msgspec checks an array's length only once it has made all of them: 64 MiB of `{},` would
# be 22 million dicts. So the values are counted first (an upper bound, strings left out), and
# an answer with more is refused before it is decoded: its decoding costs at most ~70 MB.
MAX_VALUES = 1_000_000
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
TOTAL_TIMEOUT_FACTOR = 10  # one whole exchange must end within 10 x timeout (a trickling server)
BACKOFF_CAP_FACTOR = 10  # failures back off up to 10 x sync_interval (SPEC §5)
_NAME_RE = re.compile(NAME_PATTERN)
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_STOP = object()

Outcome = Literal["snapshot", "delta", "not_modified", "gone", "failed"]


class SyncResult(msgspec.Struct, kw_only=True):
    """What one request came to; made by the worker, taken by the loop."""

    outcome: Outcome
    since: str | None
    revision: str | None = None
    upserted: list[Spec] = []
    deleted: list[str] = []
    rejected: list[Rejection] = []
    error: str | None = None
    seconds: float = 0.0


class _Diff(msgspec.Struct):
    """The 200 body. Unknown top-level keys are ignored (a newer service may add some)."""

    revision: str
    complete: bool
    # the length is checked as the array is read: a million-entry answer fails at entry 10,001
    upserted: Annotated[list[Any], msgspec.Meta(max_length=MAX_ENTRIES)] = []
    deleted: Annotated[list[Any], msgspec.Meta(max_length=MAX_ENTRIES)] = []


_decode_diff = msgspec.json.Decoder(_Diff).decode


def _failed(since: str | None, error: str) -> SyncResult:
    return SyncResult(outcome="failed", since=since, error=error)


# -- parsing (pure) --------------------------------------------------------------------------

def parse_diff(body: bytes, source: str, since: str | None) -> SyncResult:
    """A 200 body -> a snapshot or a delta, each spec validated alone; or a failure when the
    body as a whole is unusable (then nothing of it is applied)."""
    if len(body) > MAX_VALUES:  # a shorter body cannot hold that many values
        bare = _JSON_STRING_RE.sub(b"", body)
        values = sum(bare.count(c) for c in (b",", b":", b"[", b"{")) + 1
        del bare
        if values > MAX_VALUES:
            return _failed(since, f"answer too large: more than {MAX_VALUES} JSON values")
    try:
        diff = _decode_diff(body)
    except msgspec.ValidationError as e:
        return _failed(since, f"answer is not the right shape: {validation_reason(e)}")
    except msgspec.DecodeError as e:
        return _failed(since, f"answer is not JSON: {e}")
    except RecursionError:  # msgspec stops at the interpreter's recursion limit
        return _failed(since, "answer is not usable JSON: nested too deep")
    rev = diff.revision
    if not rev or len(rev) > 1024 or rev != rev.strip() or not rev.isprintable():
        return _failed(since, f"answer is not the right shape: $.revision: not a usable revision: {rev[:80]!r}")
    if not diff.complete and since is None:
        return _failed(since, "answer is a delta (complete: false) to a request without since")
    rejected: list[Rejection] = []
    # every entry with a readable uuid, valid or not, counts for "listed twice"
    entries: dict[str, list[tuple[int, Spec | None]]] = {}
    for i, obj in enumerate(diff.upserted):
        try:
            spec: Spec | None = parse_spec(obj, source, f"$.upserted[{i}]")
            uuid: str | None = spec.job.uuid
        except SpecError as e:
            rejected.append(Rejection(uuid=e.uuid, source=source, reason=e.reason))
            spec, uuid = None, e.uuid
        if uuid is not None:
            entries.setdefault(uuid, []).append((i, spec))
    upserted: list[Spec] = []
    for uuid, found in entries.items():
        if len(found) == 1:
            if found[0][1] is not None:
                upserted.append(found[0][1])
            continue
        places = ", ".join(f"$.upserted[{i}]" for i, _ in found)
        rejected.append(Rejection(uuid=uuid, source=source, reason=f"uuid {uuid} is listed more than once: {places}"))
    deleted: list[str] = []
    for i, value in enumerate(diff.deleted):
        if isinstance(value, str) and _NAME_RE.match(value):
            deleted.append(value)
        else:
            text = repr(value)
            text = text if len(text) <= 80 else text[:77] + "..."
            rejected.append(Rejection(uuid=None, source=source,
                                      reason=f"$.deleted[{i}]: not a job uuid, ignored: {text}"))
    return SyncResult(outcome="snapshot" if diff.complete else "delta", since=since, revision=rev,
                      upserted=upserted, deleted=deleted if not diff.complete else [], rejected=rejected)


def sync_backoff(failures: int, interval: float) -> float:
    """The wait after the n-th failure in a row: full jitter between sync_interval and
    min(2^n, 10) x sync_interval."""
    ceiling = min(BACKOFF_CAP_FACTOR * interval, interval * 2 ** min(failures, 32))
    return random.uniform(interval, ceiling)


# -- the client (runs in the worker thread) ---------------------------------------------------

def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verification on (CERT_REQUIRED, host name checked by urllib3), TLS 1.2 or later; the
    CA bundle from ca_file, else the system's. ConfigError naming the key when it does not load."""
    ctx = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    try:
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"key configuration.ca_file: cannot load {ca_file}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return ctx


def read_token(path: str) -> str:
    """The bearer token: only its owner may read the file; visible ASCII, no spaces."""
    token = check_token_file(path, "configuration.token_file")
    if not _TOKEN_RE.fullmatch(token):
        raise ConfigError(f"key configuration.token_file: {path} holds characters a bearer token cannot have "
                          f"(only visible ASCII, no spaces)")
    return token


def check_source(settings: ConfigurationSource) -> None:
    """What `run` (and a SIGHUP reload) refuses up front: ConfigError, exit 78."""
    if settings.token_file:
        read_token(settings.token_file)
    if settings.url.startswith("https://"):
        tls_context(settings.ca_file)


class ConfigClient:
    """One PoolManager (one pool, one kept-alive connection); no retries, no redirects."""

    def __init__(self, settings: ConfigurationSource):
        self.settings = settings
        self.base = settings.url.rstrip("/")
        self.source = f"http:{settings.url}"
        t = float(settings.timeout)
        self.timeout = urllib3.Timeout(connect=t, read=t)
        self.total_timeout = TOTAL_TIMEOUT_FACTOR * t
        ctx = tls_context(settings.ca_file) if self.base.startswith("https://") else None
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=1, ssl_context=ctx, retries=False,
                                        timeout=self.timeout)

    def close(self) -> None:
        self.pool.clear()

    def endpoint(self, runtime_uuid: str) -> str:
        return f"{self.base}/config/jobSpecs/diff/{quote(runtime_uuid, safe='')}"

    def fetch(self, runtime_uuid: str, since: str | None) -> SyncResult:
        """One request; never raises."""
        started = time.monotonic()
        try:
            result = self._fetch(runtime_uuid, since, started + self.total_timeout)
        except Exception as e:  # noqa: BLE001 - the worker must survive anything; the loop shows it
            log.exception("configuration service: unexpected error")
            result = _failed(since, f"unexpected error: {type(e).__name__}: {e}")
        result.seconds = time.monotonic() - started
        return result

    def _fetch(self, runtime_uuid: str, since: str | None, deadline: float) -> SyncResult:
        url = self.endpoint(runtime_uuid)
        if since is not None:
            url += "?since=" + quote(since, safe="")
        headers = {"Accept": "application/json", "Accept-Encoding": "identity",
                   "User-Agent": f"assessment-runtime/{__version__}"}
        if self.settings.token_file:
            try:  # read every time: a rotated token is used at the next sync
                headers["Authorization"] = "Bearer " + read_token(self.settings.token_file)
            except ConfigError as e:
                return _failed(since, str(e))
        try:
            resp = self.pool.request("GET", url, headers=headers, preload_content=False, decode_content=False,
                                     redirect=False, retries=False, timeout=self.timeout)
        except HTTPError as e:
            return _failed(since, self._describe(e))
        reusable = False
        try:
            status = resp.status
            if status == 200:
                body = self._read_body(resp, deadline)
                if isinstance(body, str):
                    return _failed(since, body)
                reusable = True
                return parse_diff(body, self.source, since)
            if status == 304 and since is not None:
                reusable = True  # a 304 has no body
                return SyncResult(outcome="not_modified", since=since, revision=since)
            if status == 410 and since is not None:
                return SyncResult(outcome="gone", since=since)
            what = f"HTTP {status} {resp.reason or ''}".rstrip()
            if status in (304, 410):
                what += " to a request without since"
            snippet = _snippet(resp)
            return _failed(since, f"{what}: {snippet}" if snippet else what)
        except HTTPError as e:
            return _failed(since, self._describe(e))
        finally:
            if not reusable:
                resp.close()  # unread data: the connection cannot be used again
            resp.release_conn()

    def _read_body(self, resp, deadline: float) -> bytes | str:
        """The whole body, or a reason (str) it was refused: over MAX_BODY (by Content-Length
        before reading anything, else as soon as the count passes it) or over the deadline."""
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > MAX_BODY:
            return f"answer too large: Content-Length {int(length)} is over the limit of {MAX_BODY} bytes"
        # One growing buffer: once large it is a mapping of its own, given back whole when it
        # is dropped. A list of CHUNK-sized pieces filled malloc's heap instead, and after a
        # refused answer the supervisor could keep those 64 MiB for good.
        body = bytearray()
        read = getattr(resp, "read1", resp.read)  # read1: what has arrived, so the deadline is checked
        while True:
            chunk = read(CHUNK)
            if not chunk:
                return bytes(body)
            if len(body) + len(chunk) > MAX_BODY:
                return f"answer too large: more than {MAX_BODY} bytes"
            if time.monotonic() > deadline:
                return f"timeout: the answer took longer than {self.total_timeout:g}s"
            body += chunk

    def _describe(self, e: Exception) -> str:
        t = float(self.settings.timeout)
        if isinstance(e, NewConnectionError):  # a subclass of ConnectTimeoutError
            message = getattr(e, "_message", str(e))
            return f"cannot connect to {self.base}: {message.removeprefix('Failed to establish a new connection: ')}"
        if isinstance(e, ConnectTimeoutError):
            return f"timeout: no connection to {self.base} within {t:g}s"
        if isinstance(e, ReadTimeoutError):
            return f"timeout: no answer within {t:g}s"
        if isinstance(e, SSLError):
            return f"TLS error: {e.args[0] if e.args else e}"
        if isinstance(e, ProtocolError):
            return f"connection broken: {e.args[1] if len(e.args) > 1 else e}"
        return f"{type(e).__name__}: {e}"


def _snippet(resp, limit: int = 200) -> str:
    try:
        data = resp.read(limit)
    except (HTTPError, OSError):
        return ""
    text = data.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


# -- the worker and its schedule ---------------------------------------------------------------

class ConfigSync:
    """The worker thread and when to ask next.

    Loop side (main thread only): `start_if_due`, `finished`, `settle`, `next_timer`, `stop`.
    Worker side: `_work` takes one request at a time from `_requests` and puts the result on
    `_results`, then calls `notify()` (which wakes the loop). At most one request is in flight.
    """

    def __init__(self, settings: ConfigurationSource, runtime_uuid: str, notify,
                 previous: threading.Thread | None = None):
        self.settings = settings
        self.runtime_uuid = runtime_uuid
        self.client = ConfigClient(settings)
        self.location = self.client.endpoint(runtime_uuid)  # what a stored revision belongs to
        self.interval = float(settings.sync_interval)
        self.notify = notify
        self.in_flight = False
        self.next_at = 0.0  # the first sync goes out at once
        self.failures = 0
        self._previous = previous  # a stopped worker whose request may still be running
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="config-sync", daemon=True)

    # loop side

    def start(self) -> None:
        self.thread.start()

    def stop(self, wait: float = 1.0) -> None:
        """Ask the worker to end. A request in flight is abandoned: every wait in it is bounded
        by `timeout`, so the thread ends on its own soon after, and its answer is dropped."""
        self._stop.set()
        self._requests.put(_STOP)
        self.thread.join(wait)
        if self.thread.is_alive():
            log.info("configuration service: a request is still in flight; abandoning it")

    def next_timer(self) -> float:
        return math.inf if self.in_flight else self.next_at

    def start_if_due(self, now: float, since: str | None) -> bool:
        if self.in_flight or now < self.next_at:
            return False
        self.in_flight = True
        self._requests.put((since,))
        return True

    def finished(self) -> list[SyncResult]:
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                break
        if out:
            self.in_flight = False
        return out

    def settle(self, now: float, ok: bool, at_once: bool = False) -> float:
        """Schedule the next request after an answer was taken; returns the delay."""
        if at_once:
            delay = 0.0
        elif ok:
            self.failures = 0
            delay = self.interval
        else:
            self.failures += 1
            delay = sync_backoff(self.failures, self.interval)
        self.next_at = now + delay
        return delay

    # worker side

    def _work(self) -> None:
        try:
            if self._previous is not None:
                self._previous.join()  # keep "one request at a time" across a reload
            while True:
                item = self._requests.get()
                if item is _STOP or self._stop.is_set():
                    return
                result = self.client.fetch(self.runtime_uuid, item[0])
                if self._stop.is_set():
                    return
                self._results.put(result)
                self.notify()
        finally:
            self.client.close()


# -- applying an answer (main thread only) -----------------------------------------------------

def apply_to_store(store: SpecStore, result: SyncResult) -> bool:
    """Store what a snapshot or delta says; True when this source's specs changed.

    A spec whose new version does not validate keeps its last good stored version running
    (a snapshot does not delete it) and is listed in `rejected` until the service sends a good
    version or deletes it, or a later snapshot no longer lists it as rejected. Rejections are
    stored with the specs and the revision: the service will not send that version again.
    """
    current = store.specs[SOURCE]
    if result.outcome == "snapshot":
        specs = {s.job.uuid: s for s in result.upserted}
        for r in result.rejected:
            if r.uuid is not None and r.uuid not in specs and r.uuid in current:
                specs[r.uuid] = current[r.uuid]
        return store.replace(SOURCE, specs, result.revision, rejected=list(result.rejected))
    touched = {s.job.uuid for s in result.upserted} | set(result.deleted)
    touched |= {r.uuid for r in result.rejected if r.uuid is not None}
    kept = [r for r in store.rejections[SOURCE] if r.uuid is not None and r.uuid not in touched]
    return store.apply(SOURCE, result.upserted, result.deleted, result.revision, rejected=kept + result.rejected)
