"""The Configuration service source (SPEC §5), end to end: the real service through its CLI
against a Configuration service written here (stdlib http.server on 127.0.0.1, in a thread),
with a revision history, fault injection and a log of every request it got.

The unit tests at the top exercise the pure parts (parsing an answer, the backoff, what the
store keeps) without a service.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest

from conftest import OK_PLUGIN, REPO, make_plugin, spec, wait_for
from supervisor.control import request as control_request
from supervisor.spec import parse_spec
from supervisor.store import Rejection, SpecStore
from supervisor.sync import MAX_BODY, SyncResult, apply_to_store, parse_diff, sync_backoff

SRC = "http:https://config.example.org"


# -- the Configuration service of the tests ---------------------------------------------------

class ConfigService:
    """GET /config/jobSpecs/diff/{runtime}[?since=R] over a revision history.

    `publish(docs)` makes a new revision holding exactly `docs`; an answer to `since` is a
    delta against that revision, 304 when it is the latest, 410 when it is unknown, and a
    snapshot without `since`. `fault` (kept until cleared) overrides every answer:
    ("status", code), ("hang", seconds), ("garbage",), ("shape",), ("big_header",),
    ("big_stream",). Every request is logged with its path, `since`, headers and answer.
    """

    def __init__(self, tls: ssl.SSLContext | None = None, port: int = 0, token: str | None = None,
                 prefix: str = "r", initial: list[dict] | None = None):
        self.lock = threading.Lock()
        self.history: list[tuple[str, dict[str, dict], list]] = []  # (revision, docs by uuid, extra deleted)
        self.requests: list[dict] = []
        self.fault: tuple | None = None
        self.token = token
        self.prefix = prefix
        self.counter = 0
        self.release = threading.Event()  # ends every hang at close
        if initial is not None:
            self.publish(initial)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    owner._serve(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            allow_reuse_address = True

            def finish_request(self, request, client_address):
                if tls is None:
                    return super().finish_request(request, client_address)
                try:  # the handshake in the request's own thread, never in the accept loop
                    conn = tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                try:
                    super().finish_request(conn, client_address)
                finally:
                    conn.close()

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # the history

    def publish(self, docs: list[dict], extra_deleted: list | None = None) -> str:
        with self.lock:
            self.counter += 1
            rev = f"{self.prefix}{self.counter}"
            self.history.append((rev, {d["uuid"]: d for d in docs}, list(extra_deleted or [])))
            return rev

    def forget_history(self) -> str:
        """Keep only the latest set, under a new revision: older ones become unknown (410)."""
        with self.lock:
            _, docs, _ = self.history[-1]
            self.counter += 1
            rev = f"{self.prefix}{self.counter}"
            self.history = [(rev, docs, [])]
            return rev

    def log(self) -> list[dict]:
        with self.lock:
            return list(self.requests)

    def _answer(self, since: str | None) -> tuple[int, dict | None, str]:
        with self.lock:
            rev, docs, extra = self.history[-1]
            if since is None:
                return 200, {"revision": rev, "complete": True, "upserted": list(docs.values()),
                             "deleted": []}, "snapshot"
            base = next((d for r, d, _ in self.history if r == since), None)
            if base is None:
                return 410, None, "gone"
            if since == rev:
                return 304, None, "not_modified"
            upserted = [doc for uuid, doc in docs.items() if base.get(uuid) != doc]
            deleted = [uuid for uuid in base if uuid not in docs] + extra
            return 200, {"revision": rev, "complete": False, "upserted": upserted, "deleted": deleted}, "delta"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        since = parse_qs(parts.query, keep_blank_values=True).get("since", [None])[0]
        record = {"path": parts.path, "query": parts.query, "since": since, "headers": dict(h.headers),
                  "time": time.monotonic(), "answer": None}
        with self.lock:
            self.requests.append(record)
            fault = self.fault
        if fault is not None:
            record["answer"] = f"fault {fault[0]}"
            return self._fault(h, fault)
        if not re.fullmatch(r"/config/jobSpecs/diff/[^/]+", parts.path):
            return self._send(h, 404, b"no such path")
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            record["answer"] = "unauthorized"
            return self._send(h, 401, b"bad token")
        status, doc, kind = self._answer(since)
        record["answer"] = kind
        self._send(h, status, json.dumps(doc).encode() if doc is not None else b"")

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "application/json") -> None:
        h.send_response(status)
        if status != 304:
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if status != 304:
            h.wfile.write(body)

    def _fault(self, h: BaseHTTPRequestHandler, fault: tuple) -> None:
        kind = fault[0]
        if kind == "status":
            return self._send(h, fault[1], b"injected failure", "text/plain")
        if kind == "hang":
            self.release.wait(fault[1])
            h.close_connection = True
            return
        if kind == "trickle":  # a byte at a time, each within the read timeout
            h.close_connection = True
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "100000")
            h.end_headers()
            while not self.release.wait(fault[1]):
                h.wfile.write(b" ")
                h.wfile.flush()
            return
        if kind == "chunked":  # a good answer in chunked transfer encoding
            _, doc, _ = self._answer(None)
            data = json.dumps(doc).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(data), 7):
                piece = data[i:i + 7]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            h.wfile.write(b"0\r\n\r\n")
            return
        if kind == "garbage":
            return self._send(h, 200, b"this is not json {", "text/plain")
        if kind == "shape":
            return self._send(h, 200, json.dumps({"revision": 5, "complete": "yes"}).encode())
        h.close_connection = True
        if kind == "big_header":  # says so up front; a client that reads it all would wait for 64 MiB
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(MAX_BODY + 1))
            h.end_headers()
            h.wfile.write(b'{"revision": "huge", "complete": true, "upserted": [' + b" " * 65536)
            return
        if kind == "big_stream":  # no Content-Length: the body ends when the connection does
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(b'{"revision": "huge", "complete": true, "upserted": [')
            chunk = b" " * (1 << 20)
            for _ in range(MAX_BODY // len(chunk) + 2):
                h.wfile.write(chunk)
            return
        raise AssertionError(f"unknown fault {fault}")


@pytest.fixture
def servers():
    made: list[ConfigService] = []

    def make(**kw) -> ConfigService:
        s = ConfigService(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- helpers ------------------------------------------------------------------------------------

def conf(server: ConfigService, interval: str = "1s", timeout: str = "1s", token_file: Path | None = None,
         ca_file: Path | None = None) -> str:
    lines = ["", "[configuration]", f'url = "{server.url}"', f'sync_interval = "{interval}"', f'timeout = "{timeout}"']
    if server.url.startswith("http://"):
        lines.append("allow_http = true")
    if token_file is not None:
        lines.append(f'token_file = "{token_file}"')
    if ca_file is not None:
        lines.append(f'ca_file = "{ca_file}"')
    return "\n".join(lines) + "\n"


def fast_status(svc) -> dict:
    """GET /status on the control socket from this process (for polling; cheaper than the CLI)."""
    code, body = control_request(str(svc.root / "run" / "control.sock"), "GET", "/status")
    assert code == 200
    return json.loads(body)


def metrics(svc) -> str:
    code, body = control_request(str(svc.root / "run" / "control.sock"), "GET", "/metrics")
    assert code == 200
    return body.decode()


def http_source(doc: dict) -> dict:
    [source] = [s for s in doc["sources"] if s["kind"] == "http"]
    return source


def pids(doc: dict) -> dict[str, int | None]:
    return {j["uuid"]: j["pid"] for j in doc["jobs"]}


def wait_jobs(svc, uuids: set[str], timeout: float = 30) -> dict:
    """Until exactly these jobs are in status, each running with a pid; returns the status."""
    def ready():
        doc = fast_status(svc)
        jobs = {j["uuid"]: j for j in doc["jobs"]}
        ok = set(jobs) == uuids and all(j["pid"] and j["state"] == "running" for j in jobs.values())
        return doc if ok else None
    return wait_for(ready, timeout, 0.1, what=f"jobs {sorted(uuids)} running")


def wait_source(svc, predicate, what: str, timeout: float = 30) -> dict:
    return wait_for(lambda: (lambda s: s if predicate(s) else None)(http_source(fast_status(svc))), timeout, 0.1,
                    what=what)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def new_service(service_factory, server, name: str = "svc", folder: bool = False, **conf_kw):
    svc = service_factory(conf(server, **conf_kw), name=name, folder=folder)
    make_plugin(svc.plugins, "ok", OK_PLUGIN)
    return svc


# -- unit: parsing an answer, the backoff, what the store keeps ----------------------------------

def doc_of(uuid: str, **extra) -> dict:
    d = {"uuid": uuid, "plugin": {"name": "demo", "version": "1.0.0"}, "interval": "1m"}
    d.update(extra)
    return d


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


def test_parse_snapshot_and_delta_validate_each_spec_alone():
    r = parse_diff(body(revision="r1", complete=True, upserted=[doc_of("a"), doc_of("b", interval="0s"),
                                                                 {"plugin": {}}, doc_of("c")], deleted=[]), SRC, None)
    assert r.outcome == "snapshot" and r.revision == "r1"
    assert [s.job.uuid for s in r.upserted] == ["a", "c"]
    assert all(s.source == SRC for s in r.upserted)
    reasons = {x.uuid: x.reason for x in r.rejected}
    assert reasons["b"].startswith("$.upserted[1].interval:")
    assert reasons[None].startswith("$.upserted[2].")
    assert all(x.source == SRC for x in r.rejected)

    r = parse_diff(body(revision="r2", complete=False, upserted=[doc_of("d")],
                        deleted=["a", "../../etc/passwd", 7, "ok-uuid"]), SRC, "r1")
    assert r.outcome == "delta" and r.deleted == ["a", "ok-uuid"]
    assert [x.reason for x in r.rejected] == ["$.deleted[1]: not a job uuid, ignored: '../../etc/passwd'",
                                              "$.deleted[2]: not a job uuid, ignored: 7"]
    # upserted and deleted may be left out
    r = parse_diff(body(revision="r3", complete=False), SRC, "r2")
    assert r.outcome == "delta" and r.upserted == [] and r.deleted == []


def test_parse_a_uuid_listed_twice_is_rejected_in_both_places():
    r = parse_diff(body(revision="r1", complete=True, upserted=[doc_of("a"), doc_of("b"), doc_of("a", title="x")]),
                   SRC, None)
    assert [s.job.uuid for s in r.upserted] == ["b"]
    assert [x.reason for x in r.rejected] == ["uuid a is listed more than once: $.upserted[0], $.upserted[2]"]
    # an invalid copy counts too: the valid one is not applied on its own
    r = parse_diff(body(revision="r1", complete=True, upserted=[doc_of("a"), doc_of("a", interval="0s")]), SRC, None)
    assert r.upserted == [] and len(r.rejected) == 2


@pytest.mark.parametrize("raw, since, error", [
    (b"not json", None, "answer is not JSON"),
    (b"[1, 2]", None, "answer is not the right shape: $: Expected `object`, got `array`"),
    (b'{"complete": true}', None, "answer is not the right shape: $.revision: required field is missing"),
    (b'{"revision": "r", "complete": "yes"}', None, "answer is not the right shape: $.complete: Expected `bool`"),
    (b'{"revision": "r", "complete": true, "upserted": {}}', None, "answer is not the right shape: $.upserted"),
    (b'{"revision": "", "complete": true}', None, "not a usable revision"),
    (b'{"revision": "r\\n", "complete": true}', None, "not a usable revision"),
    (b'{"revision": "r2", "complete": false, "upserted": []}', None, "a delta (complete: false) to a request without since"),
])
def test_parse_unusable_answers_fail_whole(raw, since, error):
    r = parse_diff(raw, SRC, since)
    assert r.outcome == "failed" and error in r.error and r.upserted == [] and r.revision is None


def test_backoff_is_jittered_exponential_capped_at_ten_intervals():
    for n in range(1, 12):
        ceiling = min(10 * 3.0, 3.0 * 2 ** n)
        samples = [sync_backoff(n, 3.0) for _ in range(300)]
        assert all(3.0 <= d <= ceiling for d in samples)
        assert max(samples) - min(samples) > 0.3 * (ceiling - 3.0)  # spread: jitter, not a fixed step
    assert max(sync_backoff(40, 3.0) for _ in range(100)) <= 30.0


def _spec(uuid: str, **extra):
    return parse_spec(doc_of(uuid, **extra), SRC)


def _result(outcome: str, revision: str, upserted=(), deleted=(), rejected=()) -> SyncResult:
    return SyncResult(outcome=outcome, since=None, revision=revision, upserted=list(upserted), deleted=list(deleted),
                      rejected=list(rejected))


def test_store_keeps_the_last_good_version_and_the_rejections_across_a_restart(tmp_path):
    store = SpecStore(str(tmp_path))
    store.load()
    assert store.claim("http", "https://config.example.org/config/jobSpecs/diff/u1") is False
    good_a = _spec("a", title="good")
    assert apply_to_store(store, _result("snapshot", "r1", [good_a, _spec("b")])) is True
    bad_a = Rejection(uuid="a", source=SRC, reason="$.upserted[0].interval: must be at least 1s, got 0s")
    # a snapshot with a bad new version of a: a keeps its good version, b is gone (not listed)
    apply_to_store(store, _result("snapshot", "r2", [], rejected=[bad_a]))
    assert list(store.specs["http"]) == ["a"] and store.specs["http"]["a"].revision == good_a.revision
    assert store.rejections["http"] == [bad_a]
    # a delta that does not touch a keeps listing it; a uuid-less rejection lasts one answer
    noise = Rejection(uuid=None, source=SRC, reason="$.deleted[0]: not a job uuid, ignored: 7")
    apply_to_store(store, _result("delta", "r3", [_spec("c")], rejected=[noise]))
    assert store.rejections["http"] == [bad_a, noise]
    again = SpecStore(str(tmp_path))
    again.load()
    assert again.rejections["http"] == [bad_a, noise] and again.revisions["http"] == "r3"
    assert set(again.specs["http"]) == {"a", "c"}
    apply_to_store(again, _result("delta", "r4", [_spec("d")]))
    assert again.rejections["http"] == [bad_a]
    # a good version of a clears its rejection
    apply_to_store(again, _result("delta", "r5", [_spec("a", title="fixed")]))
    assert again.rejections["http"] == [] and again.specs["http"]["a"].job.title == "fixed"
    assert not (tmp_path / "specs" / "http" / "rejected").exists()
    # another endpoint: the revision is forgotten, the specs stay
    assert again.claim("http", "https://other.example.org/config/jobSpecs/diff/u1") is True
    third = SpecStore(str(tmp_path))
    third.load()
    assert third.revisions["http"] is None and set(third.specs["http"]) == {"a", "c", "d"}
    assert third.locations["http"] == "https://other.example.org/config/jobSpecs/diff/u1"
    # a uuid both upserted and deleted in one delta ends up deleted
    apply_to_store(third, _result("delta", "r6", [_spec("c", title="new"), _spec("e")], deleted=["c", "c"]))
    assert set(third.specs["http"]) == {"a", "d", "e"}
    assert sorted(p.name for p in (tmp_path / "specs" / "http").glob("*.json")) == ["a.json", "d.json", "e.json"]


def test_client_reads_chunked_answers_and_cuts_off_a_trickling_one(servers):
    from supervisor.config import ConfigurationSource
    from supervisor.sync import ConfigClient
    from runner.units import Duration
    server = servers()
    server.publish([doc_of("a"), doc_of("b")])
    client = ConfigClient(ConfigurationSource(url=server.url, allow_http=True, timeout=Duration(0.5)))
    try:
        server.fault = ("chunked",)
        r = client.fetch("rt-1", None)
        assert r.outcome == "snapshot" and [s.job.uuid for s in r.upserted] == ["a", "b"], r.error
        assert r.upserted[0].source == f"http:{server.url}"
        server.fault = ("trickle", 0.2)  # every byte well within the 0.5 s read timeout
        t = time.monotonic()
        r = client.fetch("rt-1", None)
        assert r.outcome == "failed" and r.error == "timeout: the answer took longer than 5s", r.error
        assert 4.5 < time.monotonic() - t < 10
        server.fault = None
        r = client.fetch("rt-1", "r1")
        assert r.outcome == "not_modified" and r.revision == "r1"
        assert [x["path"] for x in server.log()] == ["/config/jobSpecs/diff/rt-1"] * 3
    finally:
        client.close()


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_first_sync_is_a_snapshot_then_since_with_the_token_and_304(service_factory, servers, area):
    server = servers(token="s3cret-token")
    a, b = spec(plugin="ok"), spec(plugin="ok")
    server.publish([a, b])
    token = area / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    svc = new_service(service_factory, server, token_file=token)
    svc.start()
    svc.wait_result(a["uuid"])
    svc.wait_result(b["uuid"])
    wait_for(lambda: [r for r in server.log() if r["answer"] == "not_modified"][1:], 20, 0.1, what="two 304s")
    log = server.log()
    assert log[0]["since"] is None and log[0]["query"] == "" and log[0]["answer"] == "snapshot"
    assert all(r["since"] == "r1" and r["query"] == "since=r1" for r in log[1:])
    assert all(r["headers"].get("Authorization") == "Bearer s3cret-token" for r in log)
    status = svc.status()  # the CLI's `status --json`
    assert {r["path"] for r in log} == {f"/config/jobSpecs/diff/{status['runtime_uuid']}"}
    [source] = status["sources"]
    assert source["kind"] == "http" and source["location"] == server.url and source["revision"] == "r1"
    assert source["last_error"] is None and source["consecutive_failures"] == 0 and source["last_success"]
    assert set(pids(status)) == {a["uuid"], b["uuid"]}
    stored = svc.state / "specs" / "http"
    assert json.loads((stored / "revision").read_text()) == "r1"  # kept as a JSON string (a torn one shows)
    assert {p.name for p in stored.glob("*.json")} == {f"{a['uuid']}.json", f"{b['uuid']}.json"}
    text = metrics(svc)
    assert 'assessment_runtime_source_syncs_total{kind="http",outcome="snapshot"} 1' in text
    assert re.search(r'source_syncs_total\{kind="http",outcome="not_modified"\} [1-9]', text)
    assert 'assessment_runtime_source_specs{kind="http"} 2' in text


@pytest.mark.timeout(60)
def test_delta_starts_replaces_and_stops_only_the_runners_it_names(service_factory, servers):
    server = servers()
    same, changed, deleted = spec(plugin="ok"), spec(plugin="ok", title="v1"), spec(plugin="ok")
    server.publish([same, changed, deleted])
    svc = new_service(service_factory, server)
    svc.start()
    before = wait_jobs(svc, {same["uuid"], changed["uuid"], deleted["uuid"]})
    revision_before = {j["uuid"]: j["revision"] for j in before["jobs"]}
    added = spec(plugin="ok")
    server.publish([same, dict(changed, title="v2"), added])
    after = wait_jobs(svc, {same["uuid"], changed["uuid"], added["uuid"]})
    wait_for(lambda: (lambda j: j and j["revision"] != revision_before[changed["uuid"]] and j["pid"])(
        {j["uuid"]: j for j in fast_status(svc)["jobs"]}.get(changed["uuid"])), 20, 0.1, what="the new revision")
    after = svc.status()
    p0, p1 = pids(before), pids(after)
    assert p1[same["uuid"]] == p0[same["uuid"]]  # untouched
    assert p1[changed["uuid"]] != p0[changed["uuid"]]  # replaced
    assert p1[added["uuid"]]  # started
    wait_for(lambda: gone(p0[deleted["uuid"]]) and gone(p0[changed["uuid"]]), 10, what="old runners gone")
    assert {j["uuid"]: j["title"] for j in after["jobs"]}[changed["uuid"]] == "v2"
    deltas = [r for r in server.log() if r["answer"] == "delta"]
    assert deltas and deltas[0]["since"] == "r1"
    stored = svc.state / "specs" / "http"
    assert not (stored / f"{deleted['uuid']}.json").exists() and json.loads((stored / "revision").read_text()) == "r2"
    svc.wait_result(added["uuid"])
    assert http_source(after)["revision"] == "r2"


@pytest.mark.timeout(60)
def test_410_forgets_the_revision_and_resyncs_at_once_without_since(service_factory, servers):
    server = servers()
    a = spec(plugin="ok")
    server.publish([a])
    svc = new_service(service_factory, server, interval="4s")
    svc.start()
    pid_a = wait_jobs(svc, {a["uuid"]})["jobs"][0]["pid"]
    b = spec(plugin="ok")
    server.publish([a, b])
    server.forget_history()  # r1 is unknown now: the next `since=r1` gets 410
    wait_jobs(svc, {a["uuid"], b["uuid"]})
    log = server.log()
    i = next(i for i, r in enumerate(log) if r["answer"] == "gone")
    assert log[i]["since"] == "r1"
    assert log[i + 1]["since"] is None and log[i + 1]["answer"] == "snapshot"
    assert log[i + 1]["time"] - log[i]["time"] < 2.0  # at once, not after sync_interval (4s)
    status = svc.status()
    assert pids(status)[a["uuid"]] == pid_a  # the same spec in the snapshot: its runner is untouched
    assert http_source(status)["revision"] == "r3"
    assert 'source_syncs_total{kind="http",outcome="gone"} 1' in metrics(svc)


FAULTS = {
    "http-500": (("status", 500), "HTTP 500"),
    "http-403": (("status", 403), "HTTP 403"),
    "hang": (("hang", 5), "timeout: no answer within 1s"),
    "garbage": (("garbage",), "answer is not JSON"),
    "wrong-shape": (("shape",), "answer is not the right shape"),
    "oversized-content-length": (("big_header",), f"answer too large: Content-Length {MAX_BODY + 1}"),
    "oversized-stream": (("big_stream",), f"answer too large: more than {MAX_BODY} bytes"),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_failures_keep_the_jobs_running_and_show_in_status(service_factory, servers, fault):
    injected, error = FAULTS[fault]
    server = servers()
    a = spec(plugin="ok", interval="1s")
    server.publish([a])
    svc = new_service(service_factory, server)
    svc.start()
    pid_a = wait_jobs(svc, {a["uuid"]})["jobs"][0]["pid"]
    svc.wait_result(a["uuid"])
    server.fault = injected
    b = spec(plugin="ok")
    server.publish([a, b])  # must not arrive while the fault lasts
    results_before = len(svc.results_for(a["uuid"]))
    source = wait_source(svc, lambda s: s["consecutive_failures"] >= 2, f"two failed syncs ({fault})", timeout=45)
    assert error in source["last_error"], source
    assert source["revision"] == "r1" and source["last_success"]
    # the loop was never blocked: status answers at once, results keep arriving, nothing restarted
    t = time.monotonic()
    status = fast_status(svc)
    assert time.monotonic() - t < 2.0
    assert pids(status) == {a["uuid"]: pid_a}
    svc.wait_result(a["uuid"], results_before + 2, timeout=20)
    assert re.search(r'source_syncs_total\{kind="http",outcome="failed"\} [2-9]', metrics(svc))
    assert svc.status()["rejected"] == []
    server.fault = None
    wait_jobs(svc, {a["uuid"], b["uuid"]}, timeout=45)
    source = wait_source(svc, lambda s: s["consecutive_failures"] == 0, "the next good sync")
    assert source["last_error"] is None and source["revision"] == "r2"
    assert pids(fast_status(svc))[a["uuid"]] == pid_a


@pytest.mark.timeout(90)
def test_restart_while_the_service_is_down_runs_the_stored_specs_and_resumes_with_since(service_factory, servers):
    server = servers()
    a = spec(plugin="ok")  # run_on_start: every runner start runs it once
    server.publish([a])
    svc = new_service(service_factory, server)
    svc.start()
    svc.wait_result(a["uuid"])
    wait_for(lambda: any(r["since"] == "r1" for r in server.log()), 20, 0.1, what="a sync with since=r1")
    runtime = svc.status()["runtime_uuid"]
    assert svc.stop() == 0
    port = server.port
    server.close()  # the Configuration service is down: connections are refused
    svc.start()
    svc.wait_result(a["uuid"], 2)  # the stored spec runs without the service
    source = wait_source(svc, lambda s: s["consecutive_failures"] >= 1, "a failed sync")
    assert "cannot connect" in source["last_error"] and "refused" in source["last_error"].lower()
    assert source["revision"] == "r1" and source["last_success"] is None
    pid_a = pids(fast_status(svc))[a["uuid"]]
    back = servers(port=port, initial=[a])  # the service is back, with the same history
    wait_source(svc, lambda s: s["consecutive_failures"] == 0 and s["last_success"], "a good sync", timeout=30)
    first = back.log()[0]
    assert first["since"] == "r1" and first["answer"] == "not_modified"
    # the runtime uuid was generated once, kept in state_dir, and is the same after the restart
    assert first["path"] == f"/config/jobSpecs/diff/{runtime}"
    assert (svc.state / "runtime_uuid").read_text().strip() == runtime == svc.status()["runtime_uuid"]
    assert pids(fast_status(svc))[a["uuid"]] == pid_a


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_server_cert(folder: Path, ca: str) -> tuple[Path, Path]:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=folder)
    return folder / "server.pem", folder / "server.key"


@pytest.mark.timeout(90)
def test_tls_with_the_right_ca_syncs_and_a_wrong_ca_fails_visibly(service_factory, servers, area):
    pki = area / "pki"
    pki.mkdir()
    ca, _ = make_ca(pki, "test-ca")
    other_ca, _ = make_ca(pki, "other-ca")
    cert, key = make_server_cert(pki, "test-ca")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = servers(tls=ctx)
    assert server.url.startswith("https://127.0.0.1:")
    a = spec(plugin="ok")
    server.publish([a])
    good = new_service(service_factory, server, name="good", ca_file=ca)
    wrong = new_service(service_factory, server, name="wrong", ca_file=other_ca)
    good.start()
    wrong.start()
    good.wait_result(a["uuid"])
    assert http_source(good.status())["revision"] == "r1"
    source = wait_source(wrong, lambda s: s["consecutive_failures"] >= 1, "a TLS failure")
    assert source["last_error"].startswith("TLS error") and "certificate verify failed" in source["last_error"]
    assert source["revision"] is None and wrong.status()["jobs"] == []
    assert good.results_for(a["uuid"]) and not wrong.results_for(a["uuid"])


@pytest.mark.timeout(60)
def test_a_uuid_from_both_the_folder_and_the_service_is_rejected_for_both(service_factory, servers):
    server = servers()
    shared = spec(plugin="ok", title="from http")
    only_http = spec(plugin="ok")
    server.publish([shared, only_http])
    svc = new_service(service_factory, server, folder=True)
    folder_file = svc.write_spec("shared.json", dict(shared, title="from the folder"))
    svc.start()
    wait_jobs(svc, {only_http["uuid"]})
    status = wait_for(lambda: (lambda d: d if len(d["rejected"]) == 2 else None)(svc.status()), 20, 0.2,
                      what="two rejections")
    sources = {r["source"] for r in status["rejected"]}
    assert sources == {f"dir:{folder_file}", f"http:{server.url}"}
    for r in status["rejected"]:
        assert r["uuid"] == shared["uuid"]
        assert f"dir:{folder_file}" in r["reason"] and f"http:{server.url}" in r["reason"]
    assert {s["kind"] for s in status["sources"]} == {"http", "dir"}
    # the service drops it: the folder's version runs
    server.publish([only_http])
    status = wait_jobs(svc, {only_http["uuid"], shared["uuid"]})
    assert {j["uuid"]: j["title"] for j in status["jobs"]}[shared["uuid"]] == "from the folder"
    assert fast_status(svc)["rejected"] == []


@pytest.mark.timeout(60)
def test_an_invalid_new_version_keeps_the_last_good_one_running_even_after_a_restart(service_factory, servers, area):
    server = servers()
    a, b = spec(plugin="ok", title="v1"), spec(plugin="ok")
    server.publish([a, b])
    svc = new_service(service_factory, server)
    svc.start()
    before = pids(wait_jobs(svc, {a["uuid"], b["uuid"]}))
    broken_a = {"uuid": a["uuid"], "plugin": {"name": "ok"}, "interval": "1h", "title": "v2"}
    broken_c = spec(plugin="ok", interval="0s")
    d = spec(plugin="ok")
    outside = area / "victim"
    outside.write_text("keep me")
    # the delta lists the changed and new ones: broken_a, broken_c, d (b is unchanged)
    server.publish([broken_a, b, broken_c, d], extra_deleted=[f"../../../../{outside}", 42])
    status = wait_jobs(svc, {a["uuid"], b["uuid"], d["uuid"]})
    status = wait_for(lambda: (lambda s: s if len(s["rejected"]) == 4 else None)(svc.status()), 20, 0.2,
                      what="four rejections")
    reasons = {(r["uuid"], r["reason"].split(":")[0]) for r in status["rejected"]}
    assert reasons == {(a["uuid"], "$.upserted[0].plugin.version"), (broken_c["uuid"], "$.upserted[1].interval"),
                       (None, "$.deleted[0]"), (None, "$.deleted[1]")}
    assert all(r["source"] == f"http:{server.url}" for r in status["rejected"])
    jobs = {j["uuid"]: j for j in status["jobs"]}
    assert jobs[a["uuid"]]["title"] == "v1" and jobs[a["uuid"]]["pid"] == before[a["uuid"]]
    assert jobs[b["uuid"]]["pid"] == before[b["uuid"]]
    assert outside.read_text() == "keep me"
    assert http_source(status)["revision"] == "r2" and http_source(status)["last_error"] is None
    # after a restart (the service now answers 304) the good version still runs, still listed as rejected
    assert svc.stop() == 0
    svc.start()
    status = wait_jobs(svc, {a["uuid"], b["uuid"], d["uuid"]})
    assert {j["uuid"]: j["title"] for j in status["jobs"]}[a["uuid"]] == "v1"
    assert {r["uuid"] for r in status["rejected"]} == {a["uuid"], broken_c["uuid"], None}
    wait_for(lambda: any(r["answer"] == "not_modified" for r in server.log()[-3:]), 20, 0.1, what="a 304")
    # a good version replaces it and clears its rejection; the uuid-less ones last one answer
    server.publish([dict(a, title="v3"), b, broken_c, d])
    wait_for(lambda: (lambda s: s if {j["uuid"]: j["title"] for j in s["jobs"]}.get(a["uuid"]) == "v3" else None)(
        fast_status(svc)), 20, 0.1, what="the fixed version of a")
    status = svc.status()
    assert [r["uuid"] for r in status["rejected"]] == [broken_c["uuid"]]


@pytest.mark.timeout(90)
def test_sighup_moves_to_another_service_and_stops_the_old_worker(service_factory, servers):
    first, second = servers(), servers(prefix="r")  # both name their first revision r1
    a, b = spec(plugin="ok"), spec(plugin="ok")
    first.publish([a])
    second.publish([b])
    svc = new_service(service_factory, first, folder=True)
    svc.start()
    wait_jobs(svc, {a["uuid"]})
    wait_for(lambda: any(r["since"] == "r1" for r in first.log()), 20, 0.1, what="a sync with since")
    svc.config.write_text(svc.config.read_text().replace(first.url, second.url))
    svc.proc.send_signal(signal.SIGHUP)
    wait_jobs(svc, {b["uuid"]})
    assert second.log()[0]["since"] is None  # r1 belonged to the first service: not sent to the second
    assert http_source(fast_status(svc))["location"] == second.url
    time.sleep(0.5)
    count = len(first.log())
    time.sleep(2.5)
    assert len(first.log()) == count, "the old worker still asks the first service"
    assert len(second.log()) >= 2
    # no [configuration] any more: its specs stop, its source leaves status
    text = svc.config.read_text()
    svc.config.write_text(text[:text.index("[configuration]")])
    svc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (lambda s: s if not s["jobs"] and [x["kind"] for x in s["sources"]] == ["dir"] else None)(
        fast_status(svc)), 20, 0.1, what="the http source and its job gone")
    assert not list((svc.state / "specs" / "http").glob("*.json"))
    assert not (svc.state / "specs" / "http" / "revision").exists()


@pytest.mark.timeout(60)
def test_config_errors_of_the_source_exit_78_naming_the_key(service_factory, servers, area):
    server = servers()
    token = area / "token"
    token.write_text("t0ken\n")
    token.chmod(0o644)
    svc = new_service(service_factory, server, token_file=token)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(svc.config)],
                              capture_output=True, text=True, timeout=30, cwd=REPO)
    r = run()
    assert r.returncode == 78, r.stderr
    assert "configuration.token_file" in r.stderr and str(token) in r.stderr and str(svc.config) in r.stderr
    assert "chmod 600" in r.stderr
    assert server.log() == [] and not (svc.root / "run" / "control.sock").exists()
    token.chmod(0o600)
    svc.config.write_text(svc.config.read_text().replace("allow_http = true\n", "")
                          .replace(f'token_file = "{token}"', f'ca_file = "{area / "missing.pem"}"'))
    r = run()
    assert r.returncode == 78 and "configuration.url" in r.stderr and "allow_http" in r.stderr, r.stderr
    svc.config.write_text(svc.config.read_text().replace(server.url, server.url.replace("http:", "https:")))
    r = run()
    assert r.returncode == 78 and "configuration.ca_file" in r.stderr and "missing.pem" in r.stderr, r.stderr
