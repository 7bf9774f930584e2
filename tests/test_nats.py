"""The nats sink (SPEC §7): the real service through its CLI against real nats-server processes
with JetStream (tests/natsserver.py), checked with a JetStream client of the tests' own.

One server, a three-node cluster losing the node the sink is connected to, a missing stream,
a server SIGKILLed and restarted on its store, a node gone silent (a proxy that swallows the
PubAcks), a server dropping the idle connection, token and user/password auth, TLS, maximum
payloads, config errors (exit 78), and fake servers that answer garbage. In each, every result
the file sink got must end up in the stream exactly once (JetStream drops the sink's retries
by their Nats-Msg-Id), or stay pending while the sink cannot deliver it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import FAILING_PLUGIN, NOT_OK_PLUGIN, OK_PLUGIN, control_status as status, make_plugin, spec, wait_for
from conftest import sink_status as conftest_sink_status
from natsserver import (NatsError, StoredMsg, admin, fake_nats, make_tls_files, nats_cluster,  # noqa: F401
                        nats_servers, silent_proxies, subject_token)

SPEC_SINK_KEYS = {"name", "kind", "delivered", "pending", "failures", "dead_lettered", "last_error"}
BIG_PLUGIN = """
#!/bin/sh
cat >/dev/null
pad=$(head -c 4000 /dev/zero | tr '\\0' x)
echo "{\\"status\\": \\"satisfied\\", \\"observations\\": [{\\"description\\": \\"$pad\\"}]}"
"""
PLUGINS = {"ok": OK_PLUGIN, "notok": NOT_OK_PLUGIN, "failing": FAILING_PLUGIN, "big": BIG_PLUGIN}
DEFAULT_SUBJECTS = ["assessment.results.>"]  # covers the sink's default subject


# -- helpers ---------------------------------------------------------------------------------

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def nats_sink(url, name: str = "js", **kw) -> str:
    """A [[publisher.sink]] table for a nats sink; short timeouts so that retries come quickly."""
    urls = url if isinstance(url, (list, tuple)) else [url]
    if any(u.startswith("nats://") for u in urls):
        kw.setdefault("allow_plain", True)
    kw.setdefault("timeout", "2s")
    kw.setdefault("retry_max", "1s")
    lines = ["[[publisher.sink]]", f"name = {toml_value(name)}", 'kind = "nats"', f"url = {toml_value(url)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in kw.items() if v is not None]
    return "\n".join(lines) + "\n"


def secret_file(folder: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def nats_service(service_factory, sinks: str, jobs: list[dict], batch_max: int = 20, name: str = "svc"):
    svc = service_factory(f'\n[publisher]\nbatch_max = {batch_max}\nflush_interval = "200ms"\n' + sinks, name=name)
    for plugin in {d["plugin"]["name"] for d in jobs}:
        make_plugin(svc.plugins, plugin, PLUGINS[plugin])
    for i, doc in enumerate(jobs):
        svc.write_spec(f"job{i}.json", doc)
    return svc


def jobs(*plugins: str, **kw) -> list[dict]:
    return [spec(plugin=p, interval="1s", **kw) for p in plugins]


def sink_status(svc, name: str = "js") -> dict:
    return conftest_sink_status(svc, name)


def sink_when(svc, predicate, timeout: float, what: str, name: str = "js") -> dict:
    """Wait until the sink's status satisfies `predicate`; return that status."""
    seen = [None]

    def check():
        seen[0] = sink_status(svc, name)
        return seen[0] if predicate(seen[0]) else None

    try:
        return wait_for(check, timeout, interval=0.2, what=f"{what} (sink {name})")
    except AssertionError as e:
        raise AssertionError(f"{e}; the sink's last status: {seen[0]}") from None


def file_uuids(svc) -> set[str]:
    return {r["uuid"] for r in svc.results()}


def stop_jobs(svc, docs: list[dict]) -> set[str]:
    """Remove every job and wait until they are gone and the file sink has taken everything;
    return the uuids of every result produced."""
    for path in svc.jobs.glob("job*.json"):
        path.unlink()
    wait_for(lambda: all(svc.job(d["uuid"]) is None for d in docs), 20, interval=0.2, what="the jobs to stop")
    last: list[set[str]] = [set()]

    def settled():  # the file sink took everything and nothing more came for a second
        now = file_uuids(svc)
        quiet, last[0] = now == last[0], now
        return quiet and sink_status(svc, "archive")["pending"] == 0

    wait_for(settled, 20, interval=1.0, what="the file sink to catch up")
    return last[0]


def try_messages(servers, stream: str, **kw) -> list[StoredMsg] | None:
    """The stream's messages, or None while no server answers (a node down, an election)."""
    try:
        with admin(servers, **kw) as a:
            return a.messages(stream)
    except (OSError, NatsError, ValueError):
        return None


def wait_in_stream(servers, stream: str, uuids: set[str], timeout: float, **kw) -> list[StoredMsg]:
    """Wait until every one of `uuids` is a Nats-Msg-Id in the stream; return all its messages."""
    def check():
        msgs = try_messages(servers, stream, **kw)
        return msgs if msgs is not None and uuids <= {m.msg_id for m in msgs} else None

    return wait_for(check, timeout, interval=0.3, what=f"{len(uuids)} results in stream {stream}")


def assert_once_each(msgs: list[StoredMsg], produced: dict[str, dict]) -> None:
    """Each message is one result of the file sink's, its body that result's JSON, its
    Nats-Msg-Id that result's uuid, and no result is stored twice."""
    ids = [m.msg_id for m in msgs]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"stored more than once: {duplicates}"
    for m in msgs:
        assert m.msg_id in produced, f"seq {m.seq}: Nats-Msg-Id {m.msg_id!r} is no result in the file sink"
        assert m.json == produced[m.msg_id], f"seq {m.seq}: the body is not the result's JSON"
        assert m.json["uuid"] == m.msg_id


def run_expect_exit(svc, timeout: float = 20) -> subprocess.CompletedProcess:
    """`run` that must refuse to start: its exit and stderr (a service that starts is killed and fails the test)."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(svc.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    sock = svc.root / "run" / "control.sock"
    wait_for(lambda: proc.poll() is not None or sock.exists(), timeout, what="the service to exit or start")
    if proc.poll() is None:
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            p.kill()
        proc.communicate(timeout=10)
        pytest.fail(f"run started with config:\n{svc.config.read_text()}")
    out, err = proc.communicate(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def client_connections(server, state: str = "open") -> list[dict]:
    """Client connections nats-server's monitoring port lists ("open" or "closed" ones), the
    tests' admin client excepted."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/connz?state={state}", timeout=5) as r:
        conns = json.loads(r.read()).get("connections") or []
    return [c for c in conns if c.get("name") != "test-admin"]


# -- one server ----------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_every_result_is_stored_once_as_its_json_with_its_msg_id_on_the_configured_subject(
        service_factory, nats_servers):
    server = nats_servers().start()
    with admin(server) as a:
        a.create_stream("RESULTS", ["ar.>"])
    docs = jobs("ok", "notok", "failing")
    docs[0]["uuid"] = "disk.check+v1"  # a spec uuid with characters a subject token cannot hold
    svc = nats_service(service_factory, nats_sink(server.url, subject="ar.{runtime_uuid}.{job_uuid}.{status}"),
                       docs)
    svc.start()
    runtime = status(svc)["runtime_uuid"]
    wait_for(lambda: len(svc.results()) >= 6, 30, what="results in the file")
    first = sink_when(svc, lambda s: s["delivered"] >= 3, 20, "deliveries")
    assert first["kind"] == "nats" and SPEC_SINK_KEYS <= set(first)
    wait_for(lambda: len(svc.results()) >= len(docs) * 4, 30, what="more results in the file")
    sink_when(svc, lambda s: s["delivered"] > first["delivered"], 20, "delivered rising")

    produced = stop_jobs(svc, docs)
    msgs = wait_in_stream(server, "RESULTS", produced, 30)
    results = {r["uuid"]: r for r in svc.results()}
    assert_once_each(msgs, results)
    assert len(msgs) == len(produced) == len(results)
    statuses = set()
    for m in msgs:
        r = results[m.msg_id]
        statuses.add(r["status"])
        assert m.subject == f"ar.{runtime}.{subject_token(r['job_uuid'])}.{r['status']}"
    assert statuses == {"satisfied", "not-satisfied", "error"}
    assert any(m.subject.split(".")[2] == "disk_check_v1" for m in msgs)
    done = sink_when(svc, lambda s: s["pending"] == 0 and s["delivered"] >= len(produced), 10, "all delivered")
    assert done["last_error"] is None and done["failures"] == 0 and done["dead_lettered"] == 0
    assert svc.stop() == 0


# -- a cluster -------------------------------------------------------------------------------------

def lead_stream_from(a, stream: str, node: str, tries: int = 12) -> str:
    """Ask the stream's leader to step down until `node` leads it (best effort); the leader's name."""
    leader = None
    for _ in range(tries):
        try:
            leader = a.stream_info(stream)["cluster"].get("leader")
        except NatsError:
            leader = None
        if leader == node:
            break
        if leader:
            a.js(f"STREAM.LEADER.STEPDOWN.{stream}", timeout=10)
        time.sleep(0.5)
    return leader


@pytest.mark.timeout(150)
def test_a_cluster_node_killed_mid_stream_delivery_goes_on_through_another_and_nothing_is_lost(
        service_factory, nats_servers):
    nodes = nats_cluster(nats_servers)
    with admin(nodes[0]) as a:
        wait_for(lambda: _create(a, "RESULTS", DEFAULT_SUBJECTS, replicas=3), 30, interval=0.5,
                 what="an R3 stream")
        leader = lead_stream_from(a, "RESULTS", "n1")
    print(f"stream leader before the kill: {leader}")
    docs = jobs("ok", "ok", "notok")
    svc = nats_service(service_factory, nats_sink([n.url for n in nodes], timeout="2s"), docs, batch_max=5)
    svc.start()
    sink_when(svc, lambda s: s["delivered"] >= 6, 30, "deliveries")
    connected = [n for n in nodes if client_connections(n)]
    print(f"the sink is connected to {[n.name for n in connected]}")
    assert len(connected) == 1, "the sink should hold one connection, to one node"
    [victim] = connected  # n1, the first URL, with the brief's implementation
    others = [n for n in nodes if n is not victim]

    before = sink_status(svc)
    in_file = len(svc.results())
    victim.kill()  # while the jobs keep producing
    killed_at = time.monotonic()
    wait_for(lambda: len(svc.results()) >= in_file + 9, 30, what="more results in the file after the kill")
    after = sink_when(svc, lambda s: s["delivered"] >= before["delivered"] + 6, 60, "deliveries after the kill")
    print(f"delivering again {time.monotonic() - killed_at:.1f}s after killing {victim.name}; status then: {after}")
    assert any(client_connections(n) for n in others), "the sink is connected to no live node"

    produced = stop_jobs(svc, docs)
    msgs = wait_in_stream(others, "RESULTS", produced, 60)
    assert_once_each(msgs, {r["uuid"]: r for r in svc.results()})
    assert len(msgs) == len({m.msg_id for m in msgs}) == len(produced)
    assert all(m.subject == f"assessment.results.{status(svc)['runtime_uuid']}" for m in msgs)
    done = sink_when(svc, lambda s: s["pending"] == 0, 30, "nothing pending")
    assert done["last_error"] is None and done["delivered"] >= len(produced)
    print(f"{len(produced)} results, {done['failures']} failed attempts")
    assert svc.stop() == 0


def _create(a, name: str, subjects: list[str], **kw) -> bool:
    """Create a stream; False while JetStream is not ready for it (a cluster electing its meta leader)."""
    try:
        a.create_stream(name, subjects, **kw)
        return True
    except NatsError as e:
        print(f"create {name}: {e}")
        return False


# -- outages ----------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_without_a_stream_results_wait_with_the_error_shown_and_arrive_once_it_exists(
        service_factory, nats_servers):
    server = nats_servers().start()  # no stream for the subject: JetStream has no responder
    docs = jobs("ok", "notok")
    svc = nats_service(service_factory, nats_sink(server.url), docs)
    svc.start()
    wait_for(lambda: len(svc.results()) >= 4, 30, what="results in the file")
    failing = sink_when(svc, lambda s: s["failures"] >= 2 and s["pending"] >= 1, 30, "failed attempts")
    print(f"last_error without a stream: {failing['last_error']!r}")
    assert isinstance(failing["last_error"], str) and "stream" in failing["last_error"].lower()
    assert failing["delivered"] == 0
    with admin(server) as a:
        assert a.js("STREAM.NAMES").get("streams") in (None, [])  # the sink made no stream of its own
    in_file = len(svc.results())
    wait_for(lambda: len(svc.results()) >= in_file + 2, 20, what="the file sink keeps up")

    with admin(server) as a:
        a.create_stream("RESULTS", DEFAULT_SUBJECTS)
    produced = file_uuids(svc)
    wait_in_stream(server, "RESULTS", produced, 30)
    produced = stop_jobs(svc, docs)
    msgs = wait_in_stream(server, "RESULTS", produced, 30)
    assert_once_each(msgs, {r["uuid"]: r for r in svc.results()})
    assert len(msgs) == len(produced)
    done = sink_when(svc, lambda s: s["pending"] == 0 and s["last_error"] is None, 20, "a healthy sink")
    assert done["delivered"] >= len(produced)


@pytest.mark.timeout(90)
def test_a_server_killed_and_restarted_on_its_store_gets_every_result_once(service_factory, nats_servers):
    server = nats_servers().start()
    with admin(server) as a:
        a.create_stream("RESULTS", DEFAULT_SUBJECTS)
    docs = jobs("ok", "ok", "notok")
    svc = nats_service(service_factory, nats_sink(server.url), docs, batch_max=5)
    svc.start()
    before = sink_when(svc, lambda s: s["delivered"] >= 3, 30, "deliveries")
    server.kill()
    down = sink_when(svc, lambda s: s["failures"] >= 2 and s["pending"] >= 2, 30, "failures while the server is down")
    print(f"last_error while the server is down: {down['last_error']!r}")
    assert isinstance(down["last_error"], str) and str(server.port) in down["last_error"]  # names the server
    assert down["delivered"] >= before["delivered"]
    time.sleep(1)
    server.start()  # same port, same store
    sink_when(svc, lambda s: s["delivered"] > down["delivered"], 30, "deliveries after the restart")
    produced = stop_jobs(svc, docs)
    msgs = wait_in_stream(server, "RESULTS", produced, 30)
    assert_once_each(msgs, {r["uuid"]: r for r in svc.results()})
    assert len(msgs) == len(produced)
    done = sink_when(svc, lambda s: s["pending"] == 0 and s["last_error"] is None, 20, "a healthy sink")
    print(f"{len(produced)} results, {done['failures']} failed attempts")


@pytest.mark.timeout(90)
def test_a_silent_node_is_left_for_the_next_url_and_jetstream_drops_what_is_published_again(
        service_factory, nats_servers, silent_proxies):
    """The first URL leads to a node that takes the publishes but never answers (a node gone
    silent, PubAcks lost): after the timeout the sink must move on to the next URL, where
    JetStream drops the messages it already stored (same Nats-Msg-Id) and acks them as duplicates."""
    server = nats_servers().start()
    with admin(server) as a:
        a.create_stream("RESULTS", DEFAULT_SUBJECTS)
    silent = silent_proxies(server.port)
    docs = jobs("ok", "notok")
    svc = nats_service(service_factory, nats_sink([silent.url, server.url], timeout="1s"), docs)
    svc.start()
    wait_for(lambda: silent.msg_ids(), 30, what="publishes through the silent node")
    through_silent = set(silent.msg_ids())
    stored = wait_for(lambda: (lambda m: m if m and through_silent <= {x.msg_id for x in m} else None)(
        try_messages(server, "RESULTS")), 10, what="the silent node's publishes stored")
    print(f"{len(through_silent)} results went through the silent node ({len(stored)} in the stream then)")
    failing = sink_when(svc, lambda s: s["failures"] >= 1, 20, "a failed attempt")
    print(f"last_error after the silence: {failing['last_error']!r}")
    sink_when(svc, lambda s: s["delivered"] >= 1, 20, "PubAcks through the next URL after the silence")
    wait_for(lambda: len(svc.results()) >= 6, 30, what="results in the file")
    produced = stop_jobs(svc, docs)
    msgs = wait_in_stream(server, "RESULTS", produced, 30)
    assert_once_each(msgs, {r["uuid"]: r for r in svc.results()})
    assert len(msgs) == len(produced)
    done = sink_when(svc, lambda s: s["pending"] == 0 and s["last_error"] is None, 20, "a healthy sink")
    assert done["delivered"] >= len(produced)
    print(f"{silent.connections} connections to the silent node, {done['failures']} failed attempts")


@pytest.mark.timeout(60)
def test_a_server_closing_the_idle_connection_costs_no_failure(service_factory, nats_servers):
    """nats-server drops a client that leaves its PINGs unanswered (here after about 1.5 s):
    the sink, idle between results, answers them or reconnects without a failed delivery."""
    server = nats_servers(extra='ping_interval: "500ms"\nping_max: 1').start()
    with admin(server) as a:
        a.create_stream("RESULTS", DEFAULT_SUBJECTS)
    docs = jobs("ok", "notok")
    for d in docs:
        d["interval"] = "3s"
    svc = nats_service(service_factory, nats_sink(server.url), docs)
    svc.start()
    wait_for(lambda: len(svc.results()) >= 6, 30, what="results in the file")
    produced = stop_jobs(svc, docs)
    msgs = wait_in_stream(server, "RESULTS", produced, 20)
    assert_once_each(msgs, {r["uuid"]: r for r in svc.results()})
    assert len(msgs) == len(produced)
    done = sink_when(svc, lambda s: s["pending"] == 0, 10, "nothing pending")
    closed = client_connections(server, "closed")
    print(f"connections the server closed: {[c.get('reason') for c in closed]}; sink status {done}")
    assert done["failures"] == 0 and done["last_error"] is None


# -- a server that answers garbage ------------------------------------------------------------

def _serve_until_closed(conn, answer_pub=None) -> None:
    """Valid INFO, then follow the client's commands; answer each publish with `answer_pub`."""
    conn.info()
    for verb, args, payload, headers in conn.commands():
        if verb in ("PUB", "HPUB") and answer_pub is not None and len(args) >= (3 if verb == "PUB" else 4):
            conn.reply(args[1], answer_pub)


def malformed_ack(conn):
    _serve_until_closed(conn, b"not json")


def ack_with_a_bad_seq(conn):
    _serve_until_closed(conn, b'{"stream": "RESULTS", "seq": "x"}')


def garbage_after_info(conn):
    conn.info()
    for verb, *_ in conn.commands():
        if verb in ("PING", "HPUB", "PUB"):
            conn.send(b"HELLO WORLD\r\n")
            break
    while conn.sock.recv(65536):  # until the client hangs up
        pass


def garbage_instead_of_info(conn):
    conn.send(b"HELLO WORLD\r\n")
    while conn.sock.recv(65536):
        pass


HUGE_INFO_BYTES = 32 << 20


def huge_info(conn):
    """An INFO line that never ends: 32 MiB of JSON string without a newline, then silence."""
    conn.send(b'INFO {"server_id": "FAKE", "version": "2.9.10", "proto": 1, "max_payload": 1048576, "x": "')
    chunk = b"x" * (1 << 20)
    sent = 0
    try:
        while sent < HUGE_INFO_BYTES:
            conn.send(chunk)
            sent += len(chunk)
    finally:
        conn.server.huge_sent.append(sent)
    while conn.sock.recv(65536):
        pass


BAD_SERVERS = {"malformed-ack": malformed_ack, "bad-seq-ack": ack_with_a_bad_seq,
               "garbage-after-info": garbage_after_info, "garbage-not-info": garbage_instead_of_info,
               "huge-info": huge_info}
# a word each error message should hold (any one of them), case aside
SAYS = {"malformed-ack": ("puback",), "bad-seq-ack": ("puback",), "garbage-after-info": ("protocol", "hello world"),
        "garbage-not-info": ("info", "hello world"), "huge-info": ("line", "long", "info")}


@pytest.mark.timeout(90)
def test_servers_answering_garbage_leave_results_pending_with_the_error_shown(service_factory, fake_nats):
    fakes = {name: fake_nats(behaviour) for name, behaviour in BAD_SERVERS.items()}
    fakes["huge-info"].huge_sent = []
    sinks = "".join(nats_sink(f.url, name=name, timeout="1s") for name, f in fakes.items())
    docs = jobs("ok", "notok")
    svc = nats_service(service_factory, sinks, docs)
    svc.start()
    publisher = status(svc)["publisher"]["pid"]
    wait_for(lambda: len(svc.results()) >= 4, 30, what="results in the file")
    seen = {}
    for name in fakes:
        s = sink_when(svc, lambda s: s["failures"] >= 2 and s["pending"] >= 1, 30, "failed attempts", name=name)
        seen[name] = s
        print(f"{name}: failures {s['failures']}, pending {s['pending']}, last_error {s['last_error']!r}")
    for name, s in seen.items():
        assert s["kind"] == "nats"
        assert isinstance(s["last_error"], str) and any(w in s["last_error"].lower() for w in SAYS[name]), \
            (name, s["last_error"])
        assert s["delivered"] == 0 and s["dead_lettered"] == 0, (name, s)
        assert fakes[name].connections >= 1, name
    # The publishes that reached the fakes were the results, each with its uuid as Nats-Msg-Id.
    results = {r["uuid"]: r for r in svc.results()}
    for name in ("malformed-ack", "bad-seq-ack"):
        pubs = fakes[name].published
        assert pubs, f"{name}: no publish arrived"
        for verb, args, payload, headers in pubs:
            assert verb == "HPUB" and headers.get("Nats-Msg-Id") in results, (name, verb, headers)
            assert json.loads(payload) == results[headers["Nats-Msg-Id"]]
    sent = fakes["huge-info"].huge_sent
    print(f"huge-info: sent {sent} bytes per connection")
    # The sink hung up on the endless line long before its end: it reads protocol lines up to a bound.
    assert sent and all(n < HUGE_INFO_BYTES for n in sent), sent
    # Nothing crashed, nothing was dropped, and the file sink kept up.
    assert svc.proc.poll() is None
    pub = status(svc)["publisher"]
    assert pub["pid"] == publisher, "the publisher was restarted (it crashed?)"
    assert pub["dropped"] == 0
    rss = psutil.Process(publisher).memory_info().rss
    print(f"publisher RSS {rss / 2**20:.1f} MiB")
    assert rss < 256 << 20
    in_file = len(svc.results())
    wait_for(lambda: len(svc.results()) >= in_file + 2, 20, what="the file sink keeps up")
    assert sink_status(svc, "archive")["last_error"] is None
    for name in fakes:
        later = sink_status(svc, name)
        assert later["pending"] >= seen[name]["pending"] and later["delivered"] == 0, (name, later)
    assert svc.stop() == 0


# -- auth, TLS, max payload -------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_token_and_user_password_auth_deliver_and_wrong_secrets_show_the_error(service_factory, area,
                                                                                 nats_servers):
    by_token = nats_servers("tok", token="t0ken-Sekret").start()
    by_user = nats_servers("usr", users={"agent": "pa55 w0rd"}).start()
    with admin(by_token, token="t0ken-Sekret") as a:
        a.create_stream("RESULTS", DEFAULT_SUBJECTS)
    with admin(by_user, user="agent", password="pa55 w0rd") as a:
        a.create_stream("RESULTS", DEFAULT_SUBJECTS)
    secrets = area / "secrets"
    secrets.mkdir()
    sinks = (nats_sink(by_token.url, name="tok-good", token_file=secret_file(secrets, "t1", "t0ken-Sekret"))
             + nats_sink(by_token.url, name="tok-bad", token_file=secret_file(secrets, "t2", "wrong-token"))
             + nats_sink(by_user.url, name="usr-good", user="agent",
                         password_file=secret_file(secrets, "p1", "pa55 w0rd"))
             + nats_sink(by_user.url, name="usr-bad", user="agent", password_file=secret_file(secrets, "p2", "nope")))
    docs = jobs("ok", "notok")
    svc = nats_service(service_factory, sinks, docs)
    svc.start()
    wait_for(lambda: len(svc.results()) >= 4, 30, what="results in the file")
    for name in ("tok-bad", "usr-bad"):
        s = sink_when(svc, lambda s: s["failures"] >= 2 and s["pending"] >= 1, 30, "failed attempts", name=name)
        print(f"{name}: last_error {s['last_error']!r}")
        assert isinstance(s["last_error"], str) and "authorization" in s["last_error"].lower()  # the server's word
        assert s["delivered"] == 0
    produced = stop_jobs(svc, docs)
    for server, kw in ((by_token, {"token": "t0ken-Sekret"}), (by_user, {"user": "agent", "password": "pa55 w0rd"})):
        msgs = wait_in_stream(server, "RESULTS", produced, 30, **kw)
        assert_once_each(msgs, {r["uuid"]: r for r in svc.results()})
        assert len(msgs) == len(produced)
    for name in ("tok-good", "usr-good"):
        s = sink_when(svc, lambda s: s["pending"] == 0, 20, "nothing pending", name=name)
        assert s["last_error"] is None and s["delivered"] >= len(produced)
    for name in ("tok-bad", "usr-bad"):  # nothing was lost: all of it still waits
        s = sink_when(svc, lambda s: s["pending"] == len(produced), 10, "every result pending", name=name)
        assert s["delivered"] == 0, (name, s)
    # The secret is read at each connect: fixing the file resumes delivery without a restart.
    secret_file(secrets, "t2", "t0ken-Sekret")
    fixed = sink_when(svc, lambda s: s["pending"] == 0, 20, "delivery with the fixed token", name="tok-bad")
    assert fixed["delivered"] == len(produced) and fixed["last_error"] is None


@pytest.fixture(scope="module")
def nats_tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("nats-tls"))


@pytest.mark.timeout(90)
def test_tls_is_verified_against_ca_file_and_host_name_and_used_when_the_server_requires_it(
        service_factory, nats_servers, nats_tls):
    server = nats_servers(tls=(nats_tls / "server.pem", nats_tls / "server.key")).start()
    ca = nats_tls / "ca.pem"
    with admin(server, ca_file=ca) as a:
        a.create_stream("GOOD", ["good.>"])
        a.create_stream("UPGRADED", ["upgraded.>"])
    plain = f"nats://127.0.0.1:{server.port}"  # the server's INFO says tls_required
    sinks = (nats_sink(server.url, name="good", ca_file=ca, subject="good.{runtime_uuid}")
             + nats_sink(plain, name="upgraded", ca_file=ca, subject="upgraded.{runtime_uuid}")
             + nats_sink(server.url, name="wrong-ca", ca_file=nats_tls / "other.pem", subject="good.{runtime_uuid}")
             # the certificate is for 127.0.0.1 only
             + nats_sink(f"tls://localhost:{server.port}", name="wrong-host", ca_file=ca, subject="good.{runtime_uuid}"))
    docs = jobs("ok")
    svc = nats_service(service_factory, sinks, docs)
    svc.start()
    for name in ("wrong-ca", "wrong-host"):
        wrong = sink_when(svc, lambda s: s["failures"] >= 2 and s["pending"] >= 1, 30, "failed attempts", name=name)
        print(f"{name}: last_error {wrong['last_error']!r}")
        assert any(w in wrong["last_error"].lower() for w in ("certificate", "tls", "ssl")), wrong["last_error"]
        assert wrong["delivered"] == 0
    wait_for(lambda: len(svc.results()) >= 3, 30, what="results in the file")
    produced = stop_jobs(svc, docs)
    results = {r["uuid"]: r for r in svc.results()}
    for stream in ("GOOD", "UPGRADED"):
        msgs = wait_in_stream(server, stream, produced, 30, ca_file=ca)
        assert_once_each(msgs, results)
        assert len(msgs) == len(produced)
    for name in ("good", "upgraded"):
        s = sink_when(svc, lambda s: s["pending"] == 0, 20, "nothing pending", name=name)
        assert s["last_error"] is None
    for name in ("wrong-ca", "wrong-host"):
        s = sink_when(svc, lambda s: s["pending"] == len(produced), 10, "every result pending", name=name)
        assert s["delivered"] == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("limit", ["server max_payload", "stream max_msg_size"])
def test_a_result_over_the_maximum_payload_is_dead_lettered_and_the_others_delivered(
        service_factory, nats_servers, limit):
    """SPEC §7: refusals of one message (maximum payload exceeded) are dead letters. The limit is
    the server's max_payload (announced in INFO: the sink need not even send it), or the stream's
    max_msg_size (JetStream's error PubAck, err_code 10054, says so for that message alone)."""
    server = nats_servers(max_payload=2048 if limit.startswith("server") else None).start()
    with admin(server) as a:
        if limit.startswith("server"):
            assert a.info["max_payload"] == 2048
            a.create_stream("RESULTS", DEFAULT_SUBJECTS)
        else:
            a.create_stream("RESULTS", DEFAULT_SUBJECTS, max_msg_size=2048)
    docs = jobs("big", "ok")
    svc = nats_service(service_factory, nats_sink(server.url), docs)
    svc.start()
    wait_for(lambda: len(svc.results()) >= 6, 30, what="results in the file")
    produced = stop_jobs(svc, docs)
    results = {r["uuid"]: r for r in svc.results()}
    big = {u for u, r in results.items() if r["job_uuid"] == docs[0]["uuid"]}
    small = produced - big
    assert big and small
    assert all(len(json.dumps(results[u])) > 2048 for u in big)
    msgs = wait_in_stream(server, "RESULTS", small, 30)
    assert_once_each(msgs, results)
    assert {m.msg_id for m in msgs} == small
    done = sink_when(svc, lambda s: s["pending"] == 0 and s["dead_lettered"] >= len(big), 20,
                     "dead letters counted, nothing pending")
    assert done["delivered"] >= len(small)
    folder = svc.state / "dead-letter"
    assert {f"{u}.json" for u in big} == {p.name for p in folder.glob("*.json")}
    for path in folder.glob("*.json"):
        letter = json.loads(path.read_text())
        assert letter["sink"] == "js" and letter["result"] == results[path.stem], path.name
        print(f"dead letter {path.name}: status {letter['status']!r}, body {letter['body']!r}")
    assert server.proc.poll() is None


# -- config -------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_run_refuses_plain_nats_without_allow_plain_and_loose_secret_files_with_exit_78(service_factory, area):
    url = "nats://127.0.0.1:4222"  # never reached: run must refuse before it starts
    svc = service_factory(nats_sink(url, allow_plain=False), name="plain")
    r = run_expect_exit(svc)
    assert r.returncode == 78 and "allow_plain" in r.stderr, r.stderr

    loose = secret_file(area, "nats-password", "pa55", mode=0o644)
    svc = service_factory(nats_sink(url, user="agent", password_file=loose), name="password")
    r = run_expect_exit(svc)
    assert r.returncode == 78 and "publisher.sink[1].password_file" in r.stderr, r.stderr

    loose = secret_file(area, "nats-token", "t0ken", mode=0o640)
    svc = service_factory(nats_sink("tls://127.0.0.1:4222", token_file=loose), name="token")
    r = run_expect_exit(svc)
    assert r.returncode == 78 and "publisher.sink[1].token_file" in r.stderr, r.stderr
