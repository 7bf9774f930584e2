"""The http sink (SPEC §7): an Event Hub written here with http.server on 127.0.0.1.

Three levels: the HttpSink object against a hub (status handling, bisection, dead-letter
names, TLS); the real publisher process over its pipes (batches, Retry-After timing, dead
letters, token files, SIGTERM with a hanging hub); and the real service through its CLI
(outages, a poison job, SIGKILL of the publisher or of the whole service, the outbox bound).
"""

from __future__ import annotations

import email.utils
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import psutil
import pytest

from conftest import control_status as status, make_plugin, make_tls_files, spec, wait_for
from conftest import sink_status as conftest_sink_status
from supervisor.config import ConfigError, Sink, check_sink_files, load_config
from supervisor.control import request as control_request
from supervisor.publisher.process import DRAIN_TIMEOUT
from supervisor.publisher.sink import (DEAD_LETTER_BODY, DeliveryError, dead_letter_name, make_sink,
                             parse_retry_after)
from runner.units import Duration
from test_publisher import delivered_uuids, make_result, publishers  # noqa: F401 (a fixture)

TOKEN = "s3cret-Token_1.2~x/y+z="
SPEC_SINK_KEYS = {"name", "kind", "delivered", "pending", "failures", "dead_lettered", "last_error"}


# -- the hub --------------------------------------------------------------------------------

@dataclass
class Request:
    at: float  # monotonic time the whole body was read
    items: list[dict]
    headers: dict[str, str]
    conn: int  # which connection (the client's port)
    status: int | None = None  # None: no answer (the hub hung, then dropped the connection)
    answered_at: float | None = None

    @property
    def uuids(self) -> list[str]:
        return [item.get("uuid") for item in self.items]


class Hang:
    """An answer: read the request, say nothing for `seconds`, then drop the connection."""

    def __init__(self, seconds: float):
        self.seconds = seconds


class Drop:
    """An answer: close the connection at once, without a word."""


def ok(items):
    return 200, {}, b'{"accepted": true}'


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):  # HTTPServer's would look up our fully qualified name: slow and useless here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        pass  # a client that went away mid-answer (killed, or timed out on a hang) is part of the tests


class Hub:
    """An Event Hub on 127.0.0.1. `answer(items) -> (status, headers, body) | Hang | Drop`
    decides each answer. Created bound but not listening (connections are refused) when
    listen=False: `listen()` opens it later on the same port."""

    def __init__(self, listen: bool = True, answer=ok, tls: ssl.SSLContext | None = None):
        self.answer = answer
        self.requests: list[Request] = []
        self.in_flight = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._sockets: set = set()
        self._thread: threading.Thread | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with hub.lock:
                    hub._sockets.add(self.connection)

            def finish(self):
                with hub.lock:
                    hub._sockets.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def do_POST(self):
                with hub.lock:
                    hub.in_flight += 1
                try:
                    self._post()
                finally:
                    with hub.lock:
                        hub.in_flight -= 1

            def _post(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = Request(time.monotonic(), json.loads(body), dict(self.headers), self.client_address[1])
                answer = hub.answer(req.items)
                if isinstance(answer, (Hang, Drop)):
                    with hub.lock:
                        hub.requests.append(req)
                    if isinstance(answer, Hang):
                        hub.closing.wait(answer.seconds)
                    self.close_connection = True
                    return
                status, headers, payload = answer
                req.status = status
                with hub.lock:
                    hub.requests.append(req)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()
                req.answered_at = time.monotonic()

        self.server = _Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/v1/results"
        if listen:
            self.listen()

    def listen(self) -> "Hub":
        self.server.server_activate()
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        if self._thread is not None:
            self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for s in list(self._sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- what arrived ----------------------------------------------------------------------

    def snapshot(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def accepted(self) -> list[str]:
        """uuids of every result in a request answered 2xx, duplicates included."""
        return [u for r in self.snapshot() if r.status is not None and 200 <= r.status < 300 for u in r.uuids]


@pytest.fixture
def hubs():
    made: list[Hub] = []

    def make(**kw) -> Hub:
        hub = Hub(**kw)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.close()


def token_file(folder: Path, mode: int = 0o600, text: str = TOKEN + "\n") -> Path:
    path = folder / "hub-token"
    path.write_text(text)
    path.chmod(mode)
    return path


def http_sink(hub: Hub, **kw) -> Sink:
    kw.setdefault("timeout", Duration(2))
    kw.setdefault("retry_max", Duration(1))
    return Sink(name=kw.pop("name", "hub"), kind="http", url=kw.pop("url", hub.url), allow_http=True, **kw)


def payloads(results) -> list[bytes]:
    return [msgspec.msgpack.encode(r) for r in results]


def letters(state_dir: Path) -> dict[str, dict]:
    folder = state_dir / "dead-letter"
    if not folder.exists():
        return {}
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.iterdir()) if p.suffix == ".json"}


# -- the sink object against a hub ------------------------------------------------------------

def test_answers_that_are_retried_raise_and_take_nothing(hubs, tmp_path):
    hub = hubs()
    sink = make_sink(http_sink(hub), str(tmp_path))
    batch = payloads([make_result(i) for i in range(3)])
    for status, headers in ((408, {}), (429, {"Retry-After": "7"}), (500, {}), (503, {}), (502, {}),
                            (302, {"Location": "http://example.org/"}), (401, {}), (403, {}), (404, {}), (405, {})):
        hub.answer = lambda items, s=status, h=headers: (s, h, b"busy, come back later")
        with pytest.raises(DeliveryError) as err:
            sink.deliver(batch)
        assert err.value.done == 0 and err.value.dead_lettered == 0
        assert f"HTTP {status}" in str(err.value) and "busy, come back later" in str(err.value)
        assert err.value.retry_after == (7.0 if status == 429 else None)
        if status == 302:
            assert "redirects are not followed" in str(err.value)
        if status in (401, 403, 404, 405):  # a wrong token or url, never the result's fault
            assert "wrong token or url" in str(err.value)
    assert not (tmp_path / "dead-letter").exists()
    hub.answer = ok
    assert sink.deliver(batch) == 0
    assert hub.accepted() == [json.loads(msgspec.json.encode(msgspec.msgpack.decode(p)))["uuid"] for p in batch]
    assert len({r.conn for r in hub.snapshot()}) == 1  # one kept-alive connection for all seven requests
    sink.close()


def test_a_connection_the_hub_drops_is_tried_again_at_once(hubs, tmp_path):
    answers = iter([Drop()])
    hub = hubs(answer=lambda items: next(answers, None) or ok(items))
    sink = make_sink(http_sink(hub), str(tmp_path))
    results = [make_result(i) for i in range(2)]
    assert sink.deliver(payloads(results)) == 0
    assert hub.accepted() == [r.uuid for r in results]


def test_timeouts_and_refused_connections_are_retryable(hubs, tmp_path):
    hub = hubs(answer=lambda items: Hang(10))
    sink = make_sink(http_sink(hub, timeout=Duration(0.5)), str(tmp_path))
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=r"no answer within 0.5s") as err:
        sink.deliver(payloads([make_result(1)]))
    assert err.value.done == 0 and time.monotonic() - started < 3
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1/results"
        refused = make_sink(http_sink(hub, url=url), str(tmp_path))
        with pytest.raises(DeliveryError, match="cannot connect: .*Connection refused"):
            refused.deliver(payloads([make_result(1)]))


def test_bisection_isolates_refused_results_in_order_and_stops_at_a_retryable_answer(hubs, tmp_path):
    results = [make_result(i) for i in range(4)]
    a, poison, b, c = (r.uuid for r in results)

    def answer(items):
        uuids = {i["uuid"] for i in items}
        if poison in uuids:
            return 400, {}, b"bad result"
        if c in uuids:
            return 503, {"Retry-After": "3"}, b""
        return ok(items)

    hub = hubs(answer=answer)
    sink = make_sink(http_sink(hub), str(tmp_path))
    with pytest.raises(DeliveryError) as err:
        sink.deliver(payloads(results))
    # [a p b c] 400 -> [a p] 400 -> [a] 200, [p] 400: dead letter -> [b c] 503: stop there
    assert (err.value.done, err.value.dead_lettered, err.value.retry_after) == (2, 1, 3.0)
    assert [r.uuids for r in hub.snapshot()] == [[a, poison, b, c], [a, poison], [a], [poison], [b, c]]
    assert list(letters(tmp_path)) == [f"{poison}.json"]
    # The retry starts after what was taken; once c is welcome, b and c go through.
    hub.answer = lambda items: ok(items)
    assert sink.deliver(payloads(results[2:])) == 0
    assert hub.accepted() == [a, b, c]


def test_any_other_4xx_is_refusal_and_whole_batch_refusal_costs_few_requests(hubs, tmp_path):
    results = [make_result(i) for i in range(8)]
    hub = hubs(answer=lambda items: (422, {}, b"no such thing"))
    sink = make_sink(http_sink(hub), str(tmp_path))
    assert sink.deliver(payloads(results)) == 8
    assert set(letters(tmp_path)) == {f"{r.uuid}.json" for r in results}
    assert all(letter["status"] == 422 and letter["body"] == "no such thing" for letter in letters(tmp_path).values())
    assert len(hub.snapshot()) == 15  # every node of the bisection tree: 1 + 2 + 4 + 8


def test_a_second_half_is_split_unsent_when_the_first_half_went_through(hubs, tmp_path):
    results = [make_result(i) for i in range(8)]
    poison = results[6].uuid
    hub = hubs(answer=lambda items: (422, {}, b"no") if poison in {i["uuid"] for i in items} else ok(items))
    sink = make_sink(http_sink(hub), str(tmp_path))
    assert sink.deliver(payloads(results)) == 1
    sizes = [len(r.items) for r in hub.snapshot()]
    # [0..8) refused; [0..4) taken, so [4..8) holds the refusal: split unsent; [4,6) taken, so
    # [6,8) is split unsent; singletons are always sent on their own: [6] refused, [7] taken.
    assert sizes == [8, 4, 2, 1, 1]
    assert set(hub.accepted()) == {r.uuid for r in results} - {poison}


def test_dead_letter_files_never_name_a_path_outside_their_folder(hubs, tmp_path):
    state = tmp_path / "state"
    uuids = ["../../escaped", "/etc/passwd-ar-test", "..", ".", "", "a/b", "x" * 300, "ok-uuid.1", "sp ace\n"]
    results = [msgspec.structs.replace(make_result(i), uuid=u) for i, u in enumerate(uuids)]
    hub = hubs(answer=lambda items: (400, {}, b"refused"))
    sink = make_sink(http_sink(hub), str(state))
    assert sink.deliver(payloads(results)) == len(uuids)
    found = letters(state)
    assert len(found) == len(uuids)
    assert sorted(letter["result"]["uuid"] for letter in found.values()) == sorted(uuids)
    assert "ok-uuid.1.json" in found
    for name in found:
        assert "/" not in name and not name.startswith(".") and len(name) <= 140
    assert set(os.listdir(state)) == {"dead-letter"}  # nothing anywhere else
    assert not (tmp_path / "escaped").exists() and not Path("/etc/passwd-ar-test").exists()
    assert oct((state / "dead-letter").stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in (state / "dead-letter").iterdir())
    assert dead_letter_name("../x") != dead_letter_name("..-x") and dead_letter_name(123, b"raw").startswith("result-")


def test_a_second_sink_refusing_the_same_result_keeps_its_own_letter(hubs, tmp_path):
    hub = hubs(answer=lambda items: (400, {}, b"refused"))
    result = make_result(1)
    make_sink(http_sink(hub, name="one"), str(tmp_path)).deliver(payloads([result]))
    make_sink(http_sink(hub, name="one"), str(tmp_path)).deliver(payloads([result]))  # replaces its own
    make_sink(http_sink(hub, name="two"), str(tmp_path)).deliver(payloads([result]))
    found = letters(tmp_path)
    assert set(found) == {f"{result.uuid}.json", f"{result.uuid}.two.json"}
    assert found[f"{result.uuid}.json"]["sink"] == "one" and found[f"{result.uuid}.two.json"]["sink"] == "two"


def test_retry_after_parsing():
    now = time.time()
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert 9.0 <= parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now) <= 10.0
    assert parse_retry_after(email.utils.formatdate(now - 100, usegmt=True), now) == 0.0
    assert parse_retry_after("999999") == 3600.0
    for garbage in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(garbage) is None


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_tls_is_verified_against_ca_file(hubs, tmp_path, tls_files):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files / "server.pem", tls_files / "server.key")
    hub = hubs(tls=context)
    good = make_sink(http_sink(hub, ca_file=str(tls_files / "ca.pem")), str(tmp_path))
    result = make_result(1)
    assert good.deliver(payloads([result])) == 0
    assert hub.accepted() == [result.uuid]
    for ca in (str(tls_files / "other.pem"), None):  # the wrong CA; the system's CAs
        wrong = make_sink(http_sink(hub, ca_file=ca), str(tmp_path))
        with pytest.raises(DeliveryError, match="TLS: .*CERTIFICATE_VERIFY_FAILED") as err:
            wrong.deliver(payloads([result]))
        assert err.value.done == 0
    missing = make_sink(http_sink(hub, ca_file=str(tmp_path / "nope.pem")), str(tmp_path))
    with pytest.raises(DeliveryError, match=r"key publisher.sink.ca_file: cannot load .*nope.pem"):
        missing.deliver(payloads([result]))
    assert hub.accepted() == [result.uuid]


def test_check_sink_files_names_the_key(tmp_path, tls_files):
    def config(**kw) -> Path:
        path = tmp_path / "config.toml"
        lines = [f'state_dir = "{tmp_path}/state"', "[specs]", f'dir = "{tmp_path}/jobs"',
                 "[[publisher.sink]]", 'name = "archive"', 'kind = "file"', 'path = "r.jsonl"',
                 "[[publisher.sink]]", 'name = "hub"', 'kind = "http"', 'url = "https://127.0.0.1:1/v1"']
        lines += [f'{k} = "{v}"' for k, v in kw.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    path = config(token_file=token_file(tmp_path), ca_file=tls_files / "ca.pem")
    check_sink_files(load_config(str(path)), str(path))
    for mode, text, what in ((0o644, TOKEN, "readable or writable by group or others"),
                             (0o600, "  \n", "is empty"), (0o600, "two words", "holds characters")):
        path = config(token_file=token_file(tmp_path, mode, text))
        with pytest.raises(ConfigError, match=rf"{path}: key publisher.sink\[1\].token_file: .*{what}"):
            check_sink_files(load_config(str(path)), str(path))
    path = config(token_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"key publisher.sink\[1\].token_file: cannot read"):
        check_sink_files(load_config(str(path)), str(path))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    path = config(ca_file=tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match=r"key publisher.sink\[1\].ca_file: cannot load"):
        check_sink_files(load_config(str(path)), str(path))


# -- the publisher process ----------------------------------------------------------------------

def test_batches_are_json_arrays_of_at_most_batch_max_with_the_bearer_token(publishers, hubs, tmp_path):
    hub = hubs()
    tok = token_file(tmp_path)
    pub = publishers(sinks=[http_sink(hub, token_file=str(tok))], batch_max=7)
    results = [make_result(i) for i in range(60)]
    for start in range(0, 60, 12):
        pub.publish(results[start:start + 12])
    pub.wait_for(lambda: len(set(hub.accepted())) == 60, "every result at the hub")
    requests = hub.snapshot()
    assert all(1 <= len(r.items) <= 7 for r in requests)
    assert all(r.headers["Content-Type"] == "application/json" for r in requests)
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in requests)
    assert hub.accepted() == [r.uuid for r in results]  # in order, each once
    assert requests[0].items[0] == json.loads(msgspec.json.encode(results[0]))
    assert len({r.conn for r in requests}) == 1  # keep-alive: one connection
    pub.wait_for(lambda: pub.stats and pub.stats[-1].sinks[0].delivered == 60, "stats")
    sink = pub.stats[-1].sinks[0]
    assert (sink.kind, sink.pending, sink.failures, sink.dead_lettered, sink.last_error) == ("http", 0, 0, 0, None)
    assert sink.last_success.endswith("Z")


def test_retry_after_in_seconds_and_as_a_date_is_honoured(publishers, hubs):
    answers = iter([lambda: (429, {"Retry-After": "2"}, b"slow down"),
                    lambda: (503, {"Retry-After": email.utils.formatdate(time.time() + 3, usegmt=True)}, b"")])
    hub = hubs(answer=lambda items: next(answers, lambda: ok(items))())
    pub = publishers(sinks=[http_sink(hub)])
    [uuid] = pub.publish([make_result(1)])
    pub.wait_for(lambda: hub.accepted() == [uuid], "delivery after two refusals")
    first, second, third = hub.snapshot()
    assert (first.status, second.status, third.status) == (429, 503, 200)
    gap1 = second.at - first.answered_at
    gap2 = third.at - second.answered_at
    assert 1.98 <= gap1 <= 5, gap1  # Retry-After: 2 (plus at most 10% spread)
    assert 1.9 <= gap2 <= 6, gap2  # a date 3 s ahead, in whole seconds: at least 2 s
    pub.wait_for(lambda: pub.stats and pub.stats[-1].sinks[0].delivered == 1, "stats")
    assert pub.stats[-1].sinks[0].failures == 2 and pub.stats[-1].sinks[0].last_error is None


def test_poison_results_become_dead_letters_and_their_neighbours_are_delivered(publishers, hubs, tmp_path):
    results = [make_result(i) for i in range(40)]
    poison = {results[i].uuid for i in (3, 4, 27)}  # two neighbours, one alone

    def answer(items):
        bad = [i["uuid"] for i in items if i["uuid"] in poison]
        if bad:
            return 400, {"Content-Type": "text/plain"}, f"refused: {bad[0]} ".encode() + b"x" * 6000
        return ok(items)

    hub = hubs(answer=answer)
    pub = publishers(sinks=[http_sink(hub)], batch_max=16)
    pub.publish(results)
    pub.wait_for(lambda: pub.stats and pub.stats[-1].sinks[0].pending == 0
                 and pub.stats[-1].sinks[0].dead_lettered == 3, "delivery")
    assert sorted(hub.accepted()) == sorted(r.uuid for r in results if r.uuid not in poison)
    assert len(hub.snapshot()) <= 40  # the bisection costs fewer requests than one per result
    found = letters(tmp_path / "state")
    assert set(found) == {f"{u}.json" for u in poison}
    for name, letter in found.items():
        uuid = name[:-len(".json")]
        assert list(letter) == ["sink", "status", "body", "time", "result"]
        assert letter["sink"] == "hub" and letter["status"] == 400
        assert letter["body"].startswith(f"refused: {uuid} ") and len(letter["body"]) == DEAD_LETTER_BODY
        assert letter["time"].endswith("Z")
        [original] = [r for r in results if r.uuid == uuid]
        assert letter["result"] == json.loads(msgspec.json.encode(original))
    sink = pub.stats[-1].sinks[0]
    assert (sink.delivered, sink.dead_lettered, sink.failures, sink.last_error) == (37, 3, 0, None)
    assert pub.stats[-1].outbox_results == 0
    assert "3 result(s) refused" in pub.stderr() or "result(s) refused" in pub.stderr()


def test_a_bad_token_file_is_reported_and_fixing_it_resumes_delivery(publishers, hubs, tmp_path):
    hub = hubs()
    tok = token_file(tmp_path, mode=0o644)
    archive = Sink(name="archive", kind="file", path=str(tmp_path / "out" / "results.jsonl"))
    pub = publishers(sinks=[archive, http_sink(hub, token_file=str(tok))])
    uuids = pub.publish([make_result(i) for i in range(5)])
    pub.wait_for(lambda: pub.stats and pub.stats[-1].sinks[1].failures >= 1 and delivered_uuids(pub) == set(uuids),
                 "the hub sink to fail while the file sink delivers")
    hub_stats = pub.stats[-1].sinks[1]
    assert "key publisher.sink[1].token_file" in hub_stats.last_error and "chmod 600" in hub_stats.last_error
    assert hub_stats.pending == 5 and hub.snapshot() == []  # no request without its token
    assert "publisher.sink[1].token_file" in pub.stderr()
    tok.chmod(0o600)
    pub.wait_for(lambda: sorted(hub.accepted()) == sorted(uuids), "delivery once the file is fixed")
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in hub.snapshot())
    tok.write_text("rotated-token\n")  # a new token is used without a restart
    more = pub.publish([make_result(99)])
    pub.wait_for(lambda: more[0] in hub.accepted(), "delivery with the new token")
    assert hub.snapshot()[-1].headers["Authorization"] == "Bearer rotated-token"


@pytest.mark.timeout(60)
def test_sigterm_with_a_hanging_hub_exits_within_the_drain_deadline_plus_the_request_timeout(publishers, hubs,
                                                                                               tmp_path):
    hub = hubs(answer=lambda items: Hang(60))
    timeout = 3.0
    archive = Sink(name="archive", kind="file", path=str(tmp_path / "out" / "results.jsonl"))
    pub = publishers(sinks=[archive, http_sink(hub, timeout=Duration(timeout))])
    uuids = pub.publish([make_result(i) for i in range(10)])
    pub.wait_for(lambda: hub.in_flight > 0 and delivered_uuids(pub) == set(uuids), "a request in flight")
    started = time.monotonic()
    pub.proc.send_signal(signal.SIGTERM)
    assert pub.wait_exit(DRAIN_TIMEOUT + timeout + 10) == 0
    took = time.monotonic() - started
    assert took <= DRAIN_TIMEOUT + timeout + 1.5, took
    assert "10 results stay in the outbox for the next start" in pub.stderr()

    hub.answer = ok  # the next start delivers them
    again = publishers(sinks=[archive, http_sink(hub)])
    again.wait_for(lambda: set(hub.accepted()) == set(uuids), "delivery after the restart")


# -- the real service ---------------------------------------------------------------------------

MARKER_PLUGIN = """
#!/bin/sh
echo "$ASSESSMENT_RUN_UUID" >> {marks}/runs
cat >/dev/null
echo '{{"status": "satisfied", "title": "marked"}}'
"""

BIG_PLUGIN = """
#!/bin/sh
cat >/dev/null
pad=$(head -c 8000 /dev/zero | tr '\\0' x)
echo "{\\"status\\": \\"satisfied\\", \\"observations\\": [{\\"description\\": \\"$pad\\"}]}"
"""


def hub_config(hub: Hub, area: Path, batch_max: int = 4, timeout: str = "1s", retry_max: str = "1s",
               outbox_max: str | None = None) -> str:
    tok = token_file(area)
    text = f'\n[publisher]\nbatch_max = {batch_max}\nflush_interval = "200ms"\n'
    if outbox_max:
        text += f'outbox_max = "{outbox_max}"\n'
    return text + (f'[[publisher.sink]]\nname = "hub"\nkind = "http"\nurl = "{hub.url}"\nallow_http = true\n'
                   f'timeout = "{timeout}"\nretry_max = "{retry_max}"\ntoken_file = "{tok}"\n')


def sink_status(svc, name: str = "hub") -> dict:
    return conftest_sink_status(svc, name)


def marked(marks: Path) -> list[str]:
    try:
        return (marks / "runs").read_text().split()
    except FileNotFoundError:
        return []


def marker_service(service_factory, area: Path, hub: Hub, jobs: int = 3, **kw):
    marks = area / "marks"
    marks.mkdir(exist_ok=True)
    marks.chmod(0o777)
    svc = service_factory(hub_config(hub, area, **kw))
    make_plugin(svc.plugins, "marker", MARKER_PLUGIN.format(marks=marks))
    docs = [spec(plugin="marker", interval="1s") for _ in range(jobs)]
    for i, doc in enumerate(docs):
        svc.write_spec(f"m{i}.json", doc)
    return svc, marks, docs


def file_uuids(svc) -> set[str]:
    return {r["uuid"] for r in svc.results()}


@pytest.mark.timeout(120)
def test_hub_down_then_up_every_result_arrives_and_the_file_sink_keeps_up(service_factory, area, hubs):
    hub = hubs(listen=False)  # connections refused: the hub is not started yet
    svc, marks, docs = marker_service(service_factory, area, hub)
    svc.start()
    wait_for(lambda: len(svc.results()) >= 3, 20, what="results in the file")
    down = wait_for(lambda: (lambda s: s if s["failures"] >= 2 else None)(sink_status(svc)), 20,
                    what="failed attempts")
    assert "cannot connect" in down["last_error"] and down["pending"] >= 1
    assert down["oldest_pending_age"] > 0 and down["delivered"] == 0

    hub.answer = lambda items: (503, {}, b"maintenance")  # up, but answering 503
    hub.listen()
    wait_for(lambda: sum(r.status == 503 for r in hub.snapshot()) >= 2, 20, what="503 answers")
    wait_for(lambda: "HTTP 503" in (sink_status(svc)["last_error"] or ""), 10, what="503 in status")

    hub.answer = lambda items: Hang(2.5)  # then hanging beyond the sink's timeout of 1 s
    n = len(hub.snapshot())
    wait_for(lambda: sum(r.status is None for r in hub.snapshot()[n:]) >= 2, 20, what="hung requests")
    wait_for(lambda: "no answer within 1s" in (sink_status(svc)["last_error"] or ""), 10, what="timeouts in status")
    # Meanwhile the file sink has kept up.
    in_file = len(svc.results())
    wait_for(lambda: len(svc.results()) >= in_file + 3, 20, what="more results in the file during the outage")
    # (its results wait for its flush timer, 1 s: with three jobs a second, "nothing pending" can
    # last only milliseconds, at the same point of every second; what is pending is recent)
    assert wait_for(lambda: (lambda s: s["pending"] == 0 or (s["oldest_pending_age"] or 0) < 2.5)(sink_status(svc, "archive")),
                    10, what="the file sink keeping up: nothing pending older than its flush timer allows")

    hub.answer = ok
    produced = file_uuids(svc)
    runs = set(marked(marks))
    assert len(produced) >= 12
    wait_for(lambda: produced <= set(hub.accepted()), 30, what="every result at the hub")
    wait_for(lambda: runs <= set(hub.accepted()), 30, what="every marked run at the hub")
    accepted = hub.accepted()
    duplicates = len(accepted) - len(set(accepted))
    print(f"{len(set(accepted))} results at the hub, {duplicates} duplicates")
    assert duplicates <= len(accepted)  # duplicates are allowed; the count is printed above
    requests = hub.snapshot()
    assert all(1 <= len(r.items) <= 4 for r in requests)
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in requests)
    up = wait_for(lambda: (lambda s: s if s["last_error"] is None and s["pending"] == 0 else None)(sink_status(svc)),
                  20, what="a healthy hub sink in status")
    assert SPEC_SINK_KEYS | {"last_success", "oldest_pending_age"} <= set(up)
    assert up["kind"] == "http" and up["delivered"] >= len(produced) and up["last_success"].endswith("Z")
    assert svc.stop() == 0


@pytest.mark.timeout(90)
def test_a_poison_job_is_dead_lettered_and_the_others_are_delivered(service_factory, area, hubs):
    poison = spec(plugin="marker", interval="1s")
    hub = hubs(answer=lambda items: (400, {}, b'{"error": "schema"}')
               if any(i["job_uuid"] == poison["uuid"] for i in items) else ok(items))
    svc, marks, docs = marker_service(service_factory, area, hub, jobs=2, batch_max=8)
    svc.write_spec("poison.json", poison)
    svc.start()
    wait_for(lambda: len(letters(svc.state)) >= 3, 30, what="dead letters")
    produced = svc.results()
    wait_for(lambda: {r["uuid"] for r in produced if r["job_uuid"] != poison["uuid"]} <= set(hub.accepted()),
             30, what="the good results at the hub")
    poisoned = {r["uuid"] for r in produced if r["job_uuid"] == poison["uuid"]}
    wait_for(lambda: {f"{u}.json" for u in poisoned} <= set(letters(svc.state)), 30, what="a letter per poison")
    for name, letter in letters(svc.state).items():
        assert name == f"{letter['result']['uuid']}.json"
        assert letter["result"]["job_uuid"] == poison["uuid"]
        assert (letter["sink"], letter["status"], letter["body"]) == ("hub", 400, '{"error": "schema"}')
    assert not set(hub.accepted()) & poisoned
    hub_status = wait_for(lambda: (lambda s: s if s["dead_lettered"] >= len(poisoned) else None)(sink_status(svc)),
                          10, what="dead letters counted in status")  # stats come about once a second
    assert hub_status["failures"] == 0
    code, body = control_request(str(svc.root / "run" / "control.sock"), "GET", "/metrics")
    assert f'assessment_runtime_sink_dead_lettered_total{{sink="hub"}} ' in body.decode()
    assert "assessment_runtime_sink_oldest_pending_age_seconds" in body.decode()


@pytest.mark.timeout(120)
def test_sigkill_of_the_publisher_during_delivery_loses_no_result(service_factory, area, hubs):
    def slow(items):
        time.sleep(0.3)  # so that a delivery is in flight most of the time
        return ok(items)

    hub = hubs(answer=slow)
    svc, marks, docs = marker_service(service_factory, area, hub, batch_max=2)
    svc.start()
    wait_for(lambda: len(hub.accepted()) >= 3, 20, what="deliveries under way")
    for _ in range(3):
        pid = status(svc)["publisher"]["pid"]
        wait_for(lambda: hub.in_flight > 0, 10, interval=0.01, what="a request in flight")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (lambda p: p if p and p != pid else None)(status(svc)["publisher"]["pid"]), 20,
                 what="a new publisher")
        time.sleep(1.5)
    for i in range(len(docs)):  # stop the jobs; a run cut short still yields its result
        (svc.jobs / f"m{i}.json").unlink()
    wait_for(lambda: all(svc.job(d["uuid"]) is None for d in docs), 20, what="the jobs to stop")
    runs = set(marked(marks))
    assert len(runs) >= 9
    # Only the publisher died: the supervisor kept every unacknowledged result, so every run arrives.
    wait_for(lambda: runs <= set(hub.accepted()), 40, what="every marked run at the hub")
    assert runs <= file_uuids(svc)


@pytest.mark.timeout(150)
def test_sigkill_of_the_whole_service_loses_no_acknowledged_result(service_factory, area, hubs):
    hub = hubs(answer=lambda items: (503, {}, b"down"))  # the hub's backlog builds up in the outbox
    svc, marks, docs = marker_service(service_factory, area, hub)
    svc.start()
    wait_for(lambda: len(svc.results()) >= 9, 30, what="results in the file")
    wait_for(lambda: sink_status(svc)["pending"] >= 5, 10, what="a backlog for the hub")
    procs = svc.descendants()
    assert len(procs) >= 5  # zygote, publisher, three runners
    acked = file_uuids(svc)  # in the file, so in the outbox: acknowledged
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(10)
    for p in procs + svc.descendants():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive
    runs = set(marked(marks))
    acked |= file_uuids(svc)  # what reached the file before the end was acknowledged too

    hub.answer = ok
    svc.start()
    wait_for(lambda: acked <= set(hub.accepted()), 40, what="every acknowledged result at the hub")
    time.sleep(2)  # stragglers of the old outbox
    missing = runs - set(hub.accepted())
    print(f"{len(runs)} runs marked, {len(acked)} acknowledged before the kill, {len(missing)} never arrived")
    # Runs cut short by the kill, before their result was acknowledged, may be missing:
    # at most one running and one in flight to the publisher per job.
    assert len(missing) <= 2 * len(docs), missing
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    assert svc.stop() == 0


@pytest.mark.timeout(120)
def test_the_outbox_bound_drops_the_oldest_and_counts_them_while_the_file_sink_keeps_up(service_factory,
                                                                                          area, hubs):
    hub = hubs(listen=False)  # down for the whole test
    svc = service_factory(hub_config(hub, area, outbox_max="64KiB"))
    make_plugin(svc.plugins, "big", BIG_PLUGIN)
    for i in range(4):
        svc.write_spec(f"big{i}.json", spec(plugin="big", interval="1s"))
    svc.start()
    first = wait_for(lambda: (lambda p: p if p["dropped"] > 0 else None)(status(svc)["publisher"]), 40,
                     what="drops")
    wait_for(lambda: status(svc)["publisher"]["dropped"] >= first["dropped"] + 8, 40, what="more drops")
    pub = status(svc)["publisher"]
    assert pub["outbox_bytes"] <= 64 * 1024 + 32 * 1024, pub  # the bound, give or take a segment and a batch
    [hub_sink] = [s for s in pub["sinks"] if s["name"] == "hub"]
    assert hub_sink["delivered"] == 0 and hub_sink["pending"] <= 16
    # The file sink has every result, dropped for the hub or not.
    in_file = len(svc.results())
    assert in_file >= pub["dropped"] + hub_sink["pending"]
    wait_for(lambda: len(svc.results()) >= in_file + 4, 20, what="the file sink keeps up")
    # One warning for the burst, however many drops it had.
    assert svc.log_text().count("outbox over its bound") == 1
    code, body = control_request(str(svc.root / "run" / "control.sock"), "GET", "/metrics")
    assert "assessment_runtime_outbox_dropped_total " in body.decode()


@pytest.mark.timeout(60)
def test_run_refuses_a_bad_token_file_with_exit_78_naming_the_key(service_factory, area, hubs):
    hub = hubs()
    svc = service_factory(hub_config(hub, area))
    (area / "hub-token").chmod(0o644)
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(svc.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    sock = svc.root / "run" / "control.sock"
    wait_for(lambda: proc.poll() is not None or sock.exists(), 20, what="the service to exit or start")
    if proc.poll() is None:  # it started: the check failed to stop it
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            p.kill()
        proc.communicate(timeout=10)
        pytest.fail("run started with a group-readable hub token file")
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 78 and "publisher.sink[1].token_file" in err, err
