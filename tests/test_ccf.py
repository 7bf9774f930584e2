"""The ccf sink (SPEC §7): the real service delivers to a strict stand-in of the CCF API
(tests/ccfapi.py) on 127.0.0.1: the Evidence each result becomes, one request per result over a
kept-alive connection, the agent token (Basic auth, reuse, renewal, a 401 that fetches a new
one), answers that are retried and never dead-lettered, a refused result as a dead letter, a
host clock that runs ahead of the API's, exit 78 for a secret file others can read.

Each service also has the file sink "archive" (state/results.jsonl): what the API got is
checked against what the file got.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import psutil
import pytest

from ccfapi import EVIDENCE_PATH, TOKEN_PATH, CcfApi, parse_time, run_uuid_of
from conftest import FAILING_PLUGIN, make_plugin, spec, wait_for
from supervisor import __version__
from test_hub import hub_config, hubs, letters, ok, sink_status, status  # noqa: F401 (hubs: a fixture)

HOST = os.uname().nodename
CLIENT_ID = "2b1c6f0e-7d4a-4c1b-9a55-0f3e8d2c1a77"
SECRET = "agent-S3cret_with.symbols~+/="
DEAD_LETTER_KEYS = ["sink", "status", "body", "time", "result"]

PLAIN_PLUGIN = """
#!/bin/sh
cat >/dev/null
echo '{"status": "satisfied"}'
"""

# sets its own title; findings with an id, with a uuid only, with a title only; a subject of
# each kind of identifier (the first of identifier, subject-uuid, uuid, title counts)
RICH_PLUGIN = """
#!/bin/sh
cat >/dev/null
cat <<'EOF'
{"status": "not-satisfied", "title": "rich title",
 "observations": [{"uuid": "o-1", "description": "PermitRootLogin yes"}],
 "findings": [{"id": "F-1", "uuid": "fu-1", "title": "ft-1"}, {"uuid": "fu-2", "title": "ft-2"}, {"title": "ft-3"}],
 "subjects": [{"identifier": "id-a", "subject-uuid": "sx", "uuid": "ux", "title": "tx", "type": "component"},
              {"subject-uuid": "su-b", "uuid": "uy", "title": "ty", "type": "inventory-item"},
              {"uuid": "u-c", "title": "tz", "type": "party"},
              {"title": "t-d", "type": "resource"}],
 "risks": [{"title": "root over ssh"}], "logs": ["checked /etc/ssh/sshd_config"]}
EOF
"""


@pytest.fixture
def apis():
    made: list[CcfApi] = []

    def make(**kw) -> CcfApi:
        api = CcfApi(**kw)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


def secret_file(folder: Path, text: str = SECRET + "\n", mode: int = 0o600) -> Path:
    path = folder / "ccf-secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def ccf_sink_config(api: CcfApi, secret: Path | None = None, name: str = "ccf") -> str:
    text = (f'\n[[publisher.sink]]\nname = "{name}"\nkind = "ccf"\nurl = "{api.url}"\nallow_http = true\n'
            f'timeout = "1s"\nretry_max = "1s"\n')
    if secret is not None:
        text += f'client_id = "{CLIENT_ID}"\nclient_secret_file = "{secret}"\n'
    return text


def ccf_config(api: CcfApi, secret: Path | None = None, batch_max: int = 8) -> str:
    return f'\n[publisher]\nbatch_max = {batch_max}\nflush_interval = "200ms"\n' + ccf_sink_config(api, secret)


def ccf_service(service_factory, api: CcfApi, jobs: dict[str, dict], secret: Path | None = None,
                config: str | None = None):
    """A service with the ccf sink (and the file sink "archive") and `jobs` ({file name: spec}),
    each plugin of theirs made: plain, rich or failing."""
    svc = service_factory(config if config is not None else ccf_config(api, secret))
    for name, script in (("plain", PLAIN_PLUGIN), ("rich", RICH_PLUGIN), ("failing", FAILING_PLUGIN)):
        make_plugin(svc.plugins, name, script)
    for name, doc in jobs.items():
        svc.write_spec(name, doc)
    return svc


def ccf_status(svc) -> dict:
    return sink_status(svc, "ccf")


def stop_jobs(svc, jobs: dict[str, dict]) -> None:
    """Delete the jobs' spec files and wait for their runners to go: the file then holds every result."""
    for name in jobs:
        (svc.jobs / name).unlink()
    uuids = {doc["uuid"] for doc in jobs.values()}
    wait_for(lambda: not uuids & {j["uuid"] for j in status(svc)["jobs"]}, 20, interval=0.2,
             what="the jobs to stop")
    # the last results on their way to the file sink (flush_interval 200ms): until the file stays put
    seen = [-1]

    def still():
        n, seen[0] = seen[0], len(svc.results())
        return n == seen[0]

    wait_for(still, 10, interval=0.7, what="the file to stay put")


def file_runs(svc) -> set[str]:
    return {r["uuid"] for r in svc.results()}


def sink_where(svc, predicate, timeout: float = 15, what: str = "the ccf sink's status", name: str = "ccf"):
    return wait_for(lambda: (lambda s: s if predicate(s) else None)(sink_status(svc, name)), timeout,
                    interval=0.2, what=what)


def stream_uuid(runtime_uuid: str, job_uuid: str) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"assessment-runtime:{runtime_uuid}:{job_uuid}"))


def back_matter_result(evidence: dict) -> dict:
    [resource] = evidence["back-matter"]["resources"]
    return json.loads(base64.b64decode(resource["base64"]["value"], validate=True))


def check_evidence(evidence: dict, result: dict, job: dict) -> None:
    """Every field of the Evidence a result becomes (SPEC §7), against the result the file sink wrote."""
    rt, plugin = result["runtime_uuid"], result["plugin"]
    assert evidence["uuid"] == stream_uuid(rt, job["uuid"])
    assert evidence["title"] == (result["title"] or job["title"])
    assert evidence["description"] == job["title"]
    assert (evidence["start"], evidence["end"]) == (result["start"], result["end"])
    assert evidence["labels"] == {**job.get("labels", {}), "_agent": rt, "_plugin": plugin["name"],
                                  "_policy": job.get("control_id") or plugin["name"], "_job": job["uuid"],
                                  "hostname": HOST}
    assert evidence["status"] == {
        "satisfied": {"state": "satisfied", "reason": "pass"},
        "not-satisfied": {"state": "not-satisfied", "reason": "fail"},
        "error": {"state": "not-satisfied", "reason": "other", "remarks": result["reason"]},
    }[result["status"]]
    violations = [f.get("id") or f.get("uuid") or f.get("title") for f in result["findings"]]
    assert [p["value"] for p in evidence["props"] if p["name"] == "_violation_id"] == violations
    expected_props = [{"name": "_violation_id", "value": v} for v in violations] + [
        {"name": "run_uuid", "value": result["uuid"]}, {"name": "job_revision", "value": result["job_revision"]},
        {"name": "plugin_sha256", "value": plugin["sha256"]}]
    assert sorted(evidence["props"], key=json.dumps) == sorted(expected_props, key=json.dumps)
    assert evidence["origins"] == [{"actors": [{"type": "tool", "actor-uuid": rt, "uuid": rt,
                                                "title": f"assessment-runtime {__version__}"}]}]
    host = {"identifier": f"machine-instance/{HOST}", "type": "InventoryItem"}
    assert evidence["subjects"][0] == host
    assert [{"identifier": s["identifier"], "type": s["type"]} for s in evidence["subjects"][1:]] == [
        {"identifier": s.get("identifier") or s.get("subject-uuid") or s.get("uuid") or s.get("title"),
         "type": s["type"]} for s in result["subjects"]]
    inventory = [{"identifier": f"machine-instance/{HOST}", "type": "operating-system", "title": HOST}]
    assert evidence["inventory-items"] == inventory and evidence["inventoryItems"] == inventory
    [activity] = evidence["activities"]
    assert set(activity) == {"uuid", "title", "description"}
    uuidlib.UUID(activity["uuid"])
    assert activity["title"] == job["title"] and activity["description"] == f"{plugin['name']}@{plugin['version']}"
    [resource] = evidence["back-matter"]["resources"]
    uuidlib.UUID(resource["uuid"])
    assert isinstance(resource["title"], str) and resource["title"]
    assert resource["base64"]["media-type"] == "application/json"
    assert isinstance(resource["base64"]["filename"], str) and resource["base64"]["filename"]
    assert back_matter_result(evidence) == result  # nothing of the result is lost
    assert evidence["links"] == [{"href": f"#{resource['uuid']}", "rel": "evidence"}]


# -- the Evidence, the requests ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_each_result_becomes_the_evidence_of_the_spec(service_factory, apis):
    api = apis()
    rich = spec(plugin="rich", interval="1s", title="sshd hardening", labels={"env": "prod", "team": "sec"},
                control_id="AC-2")
    plain = spec(plugin="plain", title="plain job")  # no title of its own; no labels; no control_id
    broken = spec(plugin="failing", title="broken job")  # exit 3: an error result
    jobs = {"rich.json": rich, "plain.json": plain, "broken.json": broken}
    svc = ccf_service(service_factory, api, jobs)
    svc.start()

    def runs_of(doc):
        return [e for e in api.accepted() if e["labels"].get("_job") == doc["uuid"]]

    wait_for(lambda: len(runs_of(rich)) >= 2 and runs_of(plain) and runs_of(broken), 20, interval=0.2,
             what="two runs of the rich job and one of the others at the API")
    evidences = api.accepted()
    wait_for(lambda: {run_uuid_of(e) for e in evidences} <= file_runs(svc), 5, what="the results in the file")
    in_file = {r["uuid"]: r for r in svc.results()}
    by_uuid = {doc["uuid"]: doc for doc in jobs.values()}
    for evidence in evidences:
        result = in_file[run_uuid_of(evidence)]
        check_evidence(evidence, result, by_uuid[result["job_uuid"]])

    # the stream: the same uuid for every run of a job, one per job
    streams = {doc["uuid"]: {e["uuid"] for e in runs_of(doc)} for doc in jobs.values()}
    assert all(len(s) == 1 for s in streams.values()) and len(set.union(*streams.values())) == 3
    assert len({run_uuid_of(e) for e in runs_of(rich)}) == len(runs_of(rich))
    [e] = runs_of(broken)[:1]
    assert e["status"] == {"state": "not-satisfied", "reason": "other", "remarks": "exit code 3"}
    assert e["title"] == "broken job"
    [e] = runs_of(plain)[:1]
    assert e["title"] == "plain job" and e["labels"]["_policy"] == "plain"
    assert not any(p["name"] == "_violation_id" for p in e["props"])
    assert [s["identifier"] for s in e["subjects"]] == [f"machine-instance/{HOST}"]
    [e] = runs_of(rich)[:1]
    assert e["title"] == "rich title" and e["description"] == "sshd hardening" and e["labels"]["_policy"] == "AC-2"
    # nothing was refused: every request was a well-formed evidence
    assert {r.status for r in api.snapshot()} == {201}



@pytest.mark.timeout(60)
def test_a_result_delivered_after_its_spec_changed_or_went_keeps_its_jobs_title(service_factory, apis):
    # Delivery may come long after the run (the API down, an offline host): the Evidence still
    # describes the job that ran, though its spec was edited (a new revision) or deleted since.
    api = apis()
    api.outage = (503, b'{"errors": {"body": "maintenance"}}')
    edited = spec(plugin="rich", title="sshd hardening", labels={"env": "prod"})
    deleted = spec(plugin="rich", title="auditd rules")
    jobs = {"edited.json": edited, "deleted.json": deleted}
    svc = ccf_service(service_factory, api, jobs)
    svc.start()
    first = {doc["uuid"]: svc.wait_result(doc["uuid"])[0] for doc in jobs.values()}
    sink_where(svc, lambda s: s["failures"] >= 1 and s["pending"] >= 2, 15, what="the results waiting")
    svc.write_spec("edited.json", {**edited, "labels": {"env": "staging"}})  # same title, a new revision
    (svc.jobs / "deleted.json").unlink()
    wait_for(lambda: len(svc.results_for(edited["uuid"])) >= 2 and
             not {j["uuid"] for j in status(svc)["jobs"]} & {deleted["uuid"]}, 20, interval=0.2,
             what="the edited job's new run and the deleted job gone")
    api.outage = None
    wait_for(lambda: {r["uuid"] for r in first.values()} <= set(api.accepted_runs()), 15, interval=0.2,
             what="the waiting results at the API")
    wrong = {}
    for evidence in api.accepted():
        result = back_matter_result(evidence)
        if result["uuid"] in {r["uuid"] for r in first.values()}:
            job = {edited["uuid"]: edited, deleted["uuid"]: deleted}[result["job_uuid"]]
            assert result["title"] == "rich title"  # the plugin's own title, not the job's
            got = (evidence["description"], evidence["activities"][0]["title"])
            if got != (job["title"], job["title"]):
                wrong[job["title"]] = got
    # (the job whose result was tried first, during the 503s, may pass: what the sink looked up then)
    assert not wrong, f"(description, activity title) of results delivered after their spec changed: {wrong}"


@pytest.mark.timeout(60)
def test_one_request_per_result_with_the_exact_content_type_over_a_kept_alive_connection(service_factory, apis):
    api = apis()
    jobs = {f"p{i}.json": spec(plugin="plain", interval="1s", title=f"plain {i}") for i in range(3)}
    svc = ccf_service(service_factory, api, jobs, config=ccf_config(api, batch_max=16))
    svc.start()
    wait_for(lambda: len(api.accepted()) >= 12, 30, interval=0.2, what="a dozen evidences")
    stop_jobs(svc, jobs)
    produced = file_runs(svc)
    wait_for(lambda: set(api.accepted_runs()) >= produced, 15, interval=0.2, what="every result at the API")
    requests = api.snapshot()
    assert all(r.method == "POST" and r.status == 201 for r in requests), {(r.method, r.status) for r in requests}
    assert all(r.headers.get("Content-Type") == "application/json" for r in requests)
    assert all(isinstance(json.loads(r.body), dict) for r in requests)  # one object per request, never an array
    assert sorted(api.accepted_runs()) == sorted(produced)  # each result once, each in a request of its own
    assert len(requests) == len(produced)
    print(f"{len(requests)} requests on {api.connections} connection(s)")
    assert api.connections <= 2, api.connections  # kept alive (a second one at most, if the first was cut)
    assert "Authorization" not in requests[0].headers  # no client_id: no token
    st = sink_where(svc, lambda s: s["delivered"] >= len(produced), 10, what="the deliveries counted in status")
    assert (st["kind"], st["dead_lettered"], st["failures"], st["last_error"]) == ("ccf", 0, 0, None)
    assert st["delivered"] == len(produced)


# -- the agent token ------------------------------------------------------------------------------

def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


@pytest.mark.timeout(90)
def test_the_agent_token_is_fetched_reused_renewed_and_fetched_again_after_a_401(service_factory, apis, area):
    api = apis(client_id=CLIENT_ID, secret=SECRET, expires_in=4)  # under two minutes: reused for half of it
    secret = secret_file(area, text=f"  {SECRET}\n\n")  # surrounding whitespace is not part of the secret
    jobs = {f"p{i}.json": spec(plugin="plain", interval="1s", title=f"plain {i}") for i in range(2)}
    svc = ccf_service(service_factory, api, jobs, secret=secret)
    svc.start()
    wait_for(lambda: len(api.issued()) >= 4 and len(api.accepted()) >= 12, 30, interval=0.2,
             what="several tokens and a dozen evidences")

    token_requests = api.snapshot(TOKEN_PATH)
    assert all(r.method == "POST" and r.status == 200 for r in token_requests), [r.status for r in token_requests]
    assert all(r.headers.get("Authorization") == basic(CLIENT_ID, SECRET) for r in token_requests)
    evidence_requests = api.snapshot()
    # every request had a live token (the API answers 401 to an expired or unknown one)
    assert all(r.status == 201 for r in evidence_requests), [r.status for r in evidence_requests]
    tokens = api.issued()
    uses = [len(t.uses) for t in tokens[:-1]]
    print(f"{len(evidence_requests)} evidence requests, {len(tokens)} tokens, uses per token {uses}")
    # reused: not one token per request ...
    assert sum(uses) >= 2 * len(uses), uses
    # ... until half its lifetime (2 s), then renewed before it expires
    for t, after in zip(tokens, tokens[1:]):
        assert 1.8 <= after.issued_at - t.issued_at, [round(x.issued_at - tokens[0].issued_at, 2) for x in tokens]
        assert max(t.uses, default=t.issued_at) - t.issued_at <= 2.0 + 0.6, (t.issued_at, t.uses)

    # A token that lives long, then revoked: the next request gets 401, fetches one, and is sent again
    api.expires_in = 600
    wait_for(lambda: (lambda ts: ts[-1].expires_in == 600 and ts[-1].uses)(api.issued()), 15, interval=0.2,
             what="a long-lived token in use")
    before_revoke = len(api.snapshot(None))
    failures_before = ccf_status(svc)["failures"]
    api.revoke_all()
    def delivered_after_a_401():
        statuses = [r.status for r in api.snapshot(None)[before_revoke:]]
        return 401 in statuses and 201 in statuses[statuses.index(401):]

    wait_for(delivered_after_a_401, 15, interval=0.2, what="a 401 and a delivery after it")
    after = api.snapshot(None)[before_revoke:]
    first = next(i for i, r in enumerate(after) if r.status == 401)
    refused, fetch, again = after[first:first + 3]
    assert refused.path == EVIDENCE_PATH and all(r.status == 201 for r in after[:first])
    assert (fetch.path, fetch.status) == (TOKEN_PATH, 200)
    assert fetch.headers.get("Authorization") == basic(CLIENT_ID, SECRET)
    assert (again.path, again.status) == (EVIDENCE_PATH, 201)
    assert again.run_uuid == refused.run_uuid  # the same result, sent once more ...
    assert again.at - refused.answered_at < 0.9  # ... at once, not after a backoff
    new = api.issued()[-1]
    assert again.headers["Authorization"] == f"Bearer {new.value}" and new.expires_in == 600
    assert refused.headers["Authorization"] != again.headers["Authorization"]
    time.sleep(1.5)  # the stats of after the revocation
    st = ccf_status(svc)
    assert st["failures"] == failures_before == 0 and st["dead_lettered"] == 0

    # An API that answers 401 whatever the token: the new token is tried once, then it is an
    # ordinary failure, retried after a backoff, never dead-lettered
    mark = len(api.snapshot(None))
    api.outage = (401, b'{"errors": {"body": "token not accepted"}}')
    st = sink_where(svc, lambda s: s["failures"] >= 3 and "401" in (s["last_error"] or ""), 15,
                    what="failures for the 401s")
    api.outage = None
    window = api.snapshot(None)[mark:]
    while window and window[0].status == 201:  # answered as the 401s began
        window.pop(0)
    bursts = [[window[0]]]
    for prev, r in zip(window, window[1:]):
        if r.at - prev.answered_at >= 0.5:
            bursts.append([])
        bursts[-1].append(r)
    full = bursts[:-1]  # the last may have been cut short when the 401s stopped
    assert len(full) >= 2, [[(r.path, r.status) for r in b] for b in bursts]
    for burst in full:  # a 401, a new token, the same result once more, a 401: then a backoff
        assert [(r.path, r.status) for r in burst] == [(EVIDENCE_PATH, 401), (TOKEN_PATH, 200), (EVIDENCE_PATH, 401)]
        refused, fetch, again = burst
        assert again.headers["Authorization"] == f"Bearer {json.loads(fetch.answer)['access_token']}"
        assert again.run_uuid == refused.run_uuid
    n = len(api.accepted())
    st = sink_where(svc, lambda s: len(api.accepted()) > n and s["last_error"] is None, 15,
                    what="delivery once the 401s stop")
    assert st["dead_lettered"] == 0 and not letters(svc.state)


@pytest.mark.timeout(60)
def test_a_wrong_secret_is_retried_and_reported_until_the_secret_file_is_fixed(service_factory, apis, area):
    api = apis(client_id=CLIENT_ID, secret=SECRET)
    secret = secret_file(area, text="not-the-secret\n")
    jobs = {"p.json": spec(plugin="plain", interval="1s", title="plain")}
    svc = ccf_service(service_factory, api, jobs, secret=secret)
    svc.start()
    st = sink_where(svc, lambda s: s["failures"] >= 2 and s["last_error"], 20, what="failed token requests")
    print("last_error:", st["last_error"])
    assert "401" in st["last_error"] and "token" in st["last_error"].lower()
    token_requests = api.snapshot(TOKEN_PATH)
    assert len(token_requests) >= 2 and {r.status for r in token_requests} == {401}  # retried
    assert all(r.headers.get("Authorization") == basic(CLIENT_ID, "not-the-secret") for r in token_requests)
    assert api.accepted() == [] and st["delivered"] == 0 and st["pending"] >= 1 and st["dead_lettered"] == 0
    assert not letters(svc.state)

    secret.write_text(f"\n {SECRET} \n")
    secret.chmod(0o600)
    wait_for(lambda: len(api.accepted()) >= 2, 20, interval=0.2, what="delivery with the right secret")
    produced = file_runs(svc)
    wait_for(lambda: set(api.accepted_runs()) >= produced, 15, interval=0.2, what="the backlog at the API")
    assert api.snapshot(TOKEN_PATH)[-1].headers["Authorization"] == basic(CLIENT_ID, SECRET)
    assert len(api.accepted_runs()) == len(set(api.accepted_runs()))
    st = sink_where(svc, lambda s: s["last_error"] is None and s["delivered"] >= len(produced), 10,
                    what="a healthy ccf sink")
    assert st["dead_lettered"] == 0 and not letters(svc.state)


@pytest.mark.timeout(60)
def test_run_refuses_a_client_secret_file_others_can_read_with_exit_78_naming_the_key(service_factory, apis,
                                                                                        area):
    api = apis(client_id=CLIENT_ID, secret=SECRET)
    secret = secret_file(area, mode=0o644)
    svc = ccf_service(service_factory, api, {"p.json": spec(plugin="plain")}, secret=secret)
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(svc.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    sock = svc.root / "run" / "control.sock"
    wait_for(lambda: proc.poll() is not None or sock.exists(), 20, what="the service to exit or start")
    if proc.poll() is None:  # it started: the check failed to stop it
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            p.kill()
        proc.communicate(timeout=10)
        pytest.fail("run started with a client_secret_file that others can read")
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 78, err
    assert "publisher.sink[1].client_secret_file" in err and str(secret) in err, err
    assert api.snapshot(None) == []


# -- answers that are retried, and refusals ------------------------------------------------------

@pytest.mark.timeout(90)
def test_401_403_404_405_are_retried_shown_and_never_dead_lettered_by_the_ccf_and_http_sinks(service_factory,
                                                                                            apis, hubs, area):
    # (test_hub checks how the http sink object classifies these answers; here both sinks of a
    # real service go through them in turn, then recover)
    api = apis()
    hub = hubs()
    jobs = {f"p{i}.json": spec(plugin="plain", interval="1s", title=f"plain {i}") for i in range(2)}
    svc = ccf_service(service_factory, api, jobs, config=hub_config(hub, area) + ccf_sink_config(api))
    for code in (401, 403, 404, 405):
        body = f"no way ({code})".encode()
        api.outage = (code, body)
        hub.answer = lambda items, s=code, b=body: (s, {}, b)
        if svc.proc is None:
            svc.start()
        sink_where(svc, lambda s: re.search(rf"\b{code}\b", s["last_error"] or ""), 15,
                   what=f"{code} in the ccf sink's last_error")
        sink_where(svc, lambda s: f"HTTP {code}" in (s["last_error"] or ""), 15, name="hub",
                   what=f"{code} in the hub sink's last_error")
        assert any(r.status == code for r in api.snapshot())
        assert any(r.status == code for r in hub.snapshot())
        for name in ("ccf", "hub"):
            st = sink_status(svc, name)
            assert st["dead_lettered"] == 0 and st["delivered"] == 0 and st["pending"] >= 1, st
    assert not letters(svc.state)

    api.outage = None
    hub.answer = ok
    wait_for(lambda: len(api.accepted()) >= 2 and len(hub.accepted()) >= 2, 15, interval=0.2, what="recovery")
    stop_jobs(svc, jobs)
    produced = file_runs(svc)
    wait_for(lambda: set(api.accepted_runs()) >= produced and set(hub.accepted()) >= produced, 20, interval=0.2,
             what="every result at the API and at the hub")
    for name in ("ccf", "hub"):
        st = sink_where(svc, lambda s: s["last_error"] is None and s["pending"] == 0, 10, name=name,
                        what=f"a healthy {name} sink")
        assert st["dead_lettered"] == 0 and st["failures"] >= 4 and st["delivered"] == len(produced), st
    assert not letters(svc.state)
    assert sorted(api.accepted_runs()) == sorted(produced)  # each once


@pytest.mark.timeout(60)
def test_a_result_the_api_refuses_with_422_is_dead_lettered_and_the_others_are_delivered(service_factory, apis):
    api = apis(poison="poison")
    poison = spec(plugin="plain", interval="1s", title="poison job")  # its evidence's title holds the word
    jobs = {"good0.json": spec(plugin="plain", interval="1s", title="good 0"),
            "good1.json": spec(plugin="plain", interval="1s", title="good 1"), "poison.json": poison}
    svc = ccf_service(service_factory, api, jobs)
    svc.start()
    wait_for(lambda: len(letters(svc.state)) >= 3, 20, interval=0.2, what="dead letters")
    stop_jobs(svc, jobs)
    results = {r["uuid"]: r for r in svc.results()}
    poisoned = {u for u, r in results.items() if r["job_uuid"] == poison["uuid"]}
    good = set(results) - poisoned
    wait_for(lambda: set(api.accepted_runs()) >= good and set(letters(svc.state)) >= {f"{u}.json" for u in poisoned},
             15, interval=0.2, what="the good results at the API and a letter per poisoned one")
    assert sorted(api.accepted_runs()) == sorted(good)
    found = letters(svc.state)
    assert set(found) == {f"{u}.json" for u in poisoned}
    for name, letter in found.items():
        assert list(letter) == DEAD_LETTER_KEYS
        assert (letter["sink"], letter["status"]) == ("ccf", 422)
        assert letter["body"] == json.dumps({"errors": {"body": "cannot store evidence titled 'poison job'"}})
        assert letter["time"].endswith("Z")
        assert letter["result"] == results[name[:-len(".json")]]  # the result, not the evidence
    # one request per result: the refused ones were not sent again
    sent = collections.Counter(r.run_uuid for r in api.snapshot())
    assert all(sent[u] == 1 for u in results), {u: n for u, n in sent.items() if n != 1}
    st = sink_where(svc, lambda s: s["dead_lettered"] >= len(poisoned) and s["pending"] == 0, 10,
                    what="dead letters counted in status")
    assert (st["dead_lettered"], st["delivered"], st["failures"]) == (len(poisoned), len(good), 0)


@pytest.mark.timeout(60)
def test_a_host_clock_ahead_of_the_apis_delays_results_but_loses_none(service_factory, apis):
    skew = 3.0
    api = apis(clock_offset=-skew)  # the API's clock is 3 s behind ours
    jobs = {f"p{i}.json": spec(plugin="plain", interval="1s", title=f"plain {i}") for i in range(2)}
    svc = ccf_service(service_factory, api, jobs)
    svc.start()
    st = sink_where(svc, lambda s: "clock" in (s["last_error"] or "").lower(), 15,
                    what="the clock named in last_error")
    print("last_error:", st["last_error"])
    assert st["dead_lettered"] == 0
    wait_for(lambda: len(api.accepted()) >= 6, 20, interval=0.2, what="evidences despite the skew")
    stop_jobs(svc, jobs)
    produced = file_runs(svc)
    wait_for(lambda: set(api.accepted_runs()) >= produced, 20, interval=0.2, what="every result at the API")
    requests = api.snapshot()
    refused = [r for r in requests if r.status != 201]
    assert refused and all(r.status == 400 and b"in the future" in r.answer for r in refused)
    assert sorted(api.accepted_runs()) == sorted(produced)  # all of them, each once
    per_run = collections.Counter(r.run_uuid for r in refused)
    print(f"{len(produced)} results, {len(refused)} refused for the clock, at most {max(per_run.values())} per result")
    # retried after about the skew: once the API's clock has passed its end (give or take 0.5 s), not before
    for r in refused:
        retry = next(x for x in requests if x.at > r.at and x.run_uuid == r.run_uuid)
        early = datetime_seconds(r.evidence["end"]) - retry.wall
        assert early <= 0.5, f"sent again {early:.2f}s before the API's clock passed its end"
    # each arrived soon after the API's clock passed its end
    lateness = [(r.wall + skew) - datetime_seconds(r.evidence["end"]) for r in requests if r.status == 201]
    print(f"lateness {min(lateness):.2f}s to {max(lateness):.2f}s")
    assert skew <= min(lateness) and max(lateness) <= skew + 5, lateness
    st = sink_where(svc, lambda s: s["pending"] == 0 and s["last_error"] is None, 10, what="a caught-up ccf sink")
    assert st["dead_lettered"] == 0 and st["delivered"] == len(produced) and not letters(svc.state)


def datetime_seconds(text: str) -> float:
    return parse_time(text).timestamp()


@pytest.mark.timeout(60)
def test_503_then_recovery_delivers_every_result_exactly_once(service_factory, apis):
    api = apis()
    api.outage = (503, b'{"errors": {"body": "maintenance"}}')
    jobs = {f"p{i}.json": spec(plugin="plain", interval="1s", title=f"plain {i}") for i in range(3)}
    svc = ccf_service(service_factory, api, jobs)
    svc.start()
    st = sink_where(svc, lambda s: s["failures"] >= 2 and "503" in (s["last_error"] or "") and s["pending"] >= 6,
                    20, what="503s and a backlog")
    assert st["delivered"] == 0 and st["dead_lettered"] == 0
    # back, but every third request still fails: a batch is taken in part, then retried from where it failed
    outage_ended = len(api.snapshot())
    api.fail_every = (3, 503)
    api.outage = None
    wait_for(lambda: len(api.accepted()) >= st["pending"], 15, interval=0.2, what="the backlog at the API")
    api.fail_every = None
    stop_jobs(svc, jobs)
    produced = file_runs(svc)
    wait_for(lambda: set(api.accepted_runs()) >= produced, 15, interval=0.2, what="every result at the API")
    time.sleep(1)  # anything sent twice would show now
    accepted = api.accepted()
    twice = [u for u, n in collections.Counter(run_uuid_of(e) for e in accepted).items() if n > 1]
    assert not twice, twice  # no answer was lost, so nothing is sent again once taken
    assert sorted(run_uuid_of(e) for e in accepted) == sorted(produced)
    assert all(back_matter_result(e)["uuid"] == run_uuid_of(e) for e in accepted)
    requests = api.snapshot()
    assert {r.status for r in requests} == {503, 201}
    assert any(r.status == 503 for r in requests[outage_ended:])  # the flaky phase had failures too
    st = sink_where(svc, lambda s: s["pending"] == 0 and s["last_error"] is None, 10, what="a healthy ccf sink")
    assert st["delivered"] == len(produced) and st["dead_lettered"] == 0 and not letters(svc.state)
