"""End to end through the CLI: the real service, real runners, real plugins, the file sink."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import (IS_ROOT, wait_for, BAD_STATUS_PLUGIN, FAILING_PLUGIN, GARBAGE_PLUGIN, HANGING_PLUGIN, NOT_OK_PLUGIN,
                      OK_PLUGIN, make_plugin, spec)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
RESULT_KEYS = ["uuid", "runtime_uuid", "job_uuid", "job_revision", "plugin", "title", "labels",
               "assessment_plan_uuid", "component_uuid", "control_id", "start", "end", "status", "reason",
               "observations", "findings", "risks", "subjects", "logs"]


@pytest.fixture
def svc(service_factory):
    s = service_factory()
    for name, script in (("ok", OK_PLUGIN), ("notok", NOT_OK_PLUGIN), ("failing", FAILING_PLUGIN),
                         ("hanging", HANGING_PLUGIN), ("garbage", GARBAGE_PLUGIN), ("badstatus", BAD_STATUS_PLUGIN)):
        make_plugin(s.plugins, name, script)
    return s


@pytest.mark.timeout(90)
def test_each_kind_of_plugin_yields_one_result_with_the_right_status(svc):
    jobs = {
        "ok": spec(plugin="ok", labels={"env": "test"}, control_id="ac-2"),
        "notok": spec(plugin="notok"),
        "failing": spec(plugin="failing"),
        "hanging": spec(plugin="hanging", timeout="1s"),
        "garbage": spec(plugin="garbage"),
        "badstatus": spec(plugin="badstatus"),
    }
    for name, doc in jobs.items():
        svc.write_spec(f"{name}.json", doc)
    svc.start()
    got = {name: svc.wait_result(doc["uuid"])[0] for name, doc in jobs.items()}

    ok = got["ok"]
    assert list(ok) == RESULT_KEYS
    assert ok["status"] == "satisfied" and ok["reason"] is None
    assert ok["title"] == "all good"
    assert ok["labels"] == {"env": "test"} and ok["control_id"] == "ac-2"
    assert ok["observations"] == [{"uuid": "o1", "description": "fine"}]
    assert ISO.match(ok["start"]) and ISO.match(ok["end"]) and ok["start"] <= ok["end"]
    entry = svc.plugins / "ok" / "1.0.0" / "ok"
    assert ok["plugin"] == {"name": "ok", "version": "1.0.0", "sha256": hashlib.sha256(entry.read_bytes()).hexdigest()}
    status = svc.status()
    assert ok["runtime_uuid"] == status["runtime_uuid"]
    assert ok["job_revision"] == svc.job(jobs["ok"]["uuid"])["revision"]
    assert got["notok"]["status"] == "not-satisfied" and got["notok"]["findings"] == [{"uuid": "f1", "title": "bad"}]
    assert got["notok"]["labels"] == {}

    failing = got["failing"]
    assert failing["status"] == "error" and failing["reason"] == "exit code 3"
    assert any("something broke" in log.get("text", "") for log in failing["logs"])
    assert got["hanging"]["status"] == "error" and got["hanging"]["reason"] == "timeout after 1s"
    assert got["garbage"]["status"] == "error" and got["garbage"]["reason"].startswith("invalid output:")
    assert got["badstatus"]["status"] == "error"
    assert got["badstatus"]["reason"].startswith("invalid output: $.status: expected one of")
    # each run's uuid is unique and the run produced exactly one result
    uuids = [r["uuid"] for r in svc.results()]
    assert len(uuids) == len(set(uuids))


def _dump_folder(area) -> Path:
    """A folder every plugin user may write to, for plugins that dump what they were given."""
    dump = area / "dump"
    dump.mkdir(mode=0o777)
    dump.chmod(0o777)
    return dump


@pytest.mark.timeout(60)
def test_plugin_gets_the_documented_stdin_and_environment(svc, area):
    dump = _dump_folder(area)
    make_plugin(svc.plugins, "envdump", f"""
        #!/bin/sh
        cat > {dump}/stdin.json
        env | sort > {dump}/env.txt
        pwd > {dump}/cwd.txt
        id -u > {dump}/uid.txt
        echo '{{"status": "satisfied"}}'
        """)
    doc = spec(plugin="envdump", config={"answer": 42})
    svc.write_spec("envdump.json", doc)
    svc.start()
    result = svc.wait_result(doc["uuid"])[0]
    assert result["status"] == "satisfied", result
    import json
    stdin = json.loads((dump / "stdin.json").read_text())
    assert stdin["protocol"] == "assessment/1"
    assert stdin["run_uuid"] == result["uuid"]
    assert stdin["job"]["uuid"] == doc["uuid"] and stdin["config"] == {"answer": 42}
    env = dict(line.split("=", 1) for line in (dump / "env.txt").read_text().splitlines())
    cwd = (dump / "cwd.txt").read_text().strip()
    assert set(env) - {"PWD", "SHLVL", "_", "OLDPWD"} == {
        "PATH", "LANG", "HOME", "ASSESSMENT_JOB_UUID", "ASSESSMENT_RUN_UUID", "ASSESSMENT_RUNTIME_UUID"}
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["LANG"] == "C.UTF-8" and env["HOME"] == cwd
    assert env["ASSESSMENT_RUN_UUID"] == result["uuid"] and env["ASSESSMENT_JOB_UUID"] == doc["uuid"]
    assert cwd.startswith(str(svc.state))
    if os.geteuid() == 0:
        # its job's own uid (user_per_job, on by default), as status says
        assert int((dump / "uid.txt").read_text()) == svc.job(doc["uuid"])["uid"]
        assert 61184 <= svc.job(doc["uuid"])["uid"] <= 65519


@pytest.mark.timeout(60)
def test_edited_spec_gets_a_new_revision_and_a_new_runner(svc):
    doc = spec(plugin="ok", title="first")
    svc.write_spec("job.json", doc)
    svc.start()
    first = svc.wait_result(doc["uuid"])[0]
    job = wait_for(lambda: (lambda j: j if j and j["pid"] else None)(svc.job(doc["uuid"])), what="runner pid")
    doc["title"] = "second"
    svc.write_spec("job.json", doc)
    results = svc.wait_result(doc["uuid"], 2)
    job2 = wait_for(lambda: (lambda j: j if j and j["pid"] and j["revision"] != job["revision"] else None)(
        svc.job(doc["uuid"])), what="new revision")
    assert job2["pid"] != job["pid"]
    assert not psutil.pid_exists(job["pid"]) or psutil.Process(job["pid"]).status() == psutil.STATUS_ZOMBIE
    assert results[1]["job_revision"] == job2["revision"] != first["job_revision"]


@pytest.mark.timeout(60)
def test_deleted_spec_stops_its_runner_and_leaves_others_alone(svc):
    a, b = spec(plugin="ok"), spec(plugin="ok")
    path_a = svc.write_spec("a.json", a)
    svc.write_spec("b.json", b)
    svc.start()
    svc.wait_result(a["uuid"])
    svc.wait_result(b["uuid"])
    pid_a = wait_for(lambda: svc.job(a["uuid"])["pid"], what="runner a")
    pid_b = wait_for(lambda: svc.job(b["uuid"])["pid"], what="runner b")
    path_a.unlink()
    wait_for(lambda: svc.job(a["uuid"]) is None, what="job a gone from status")
    wait_for(lambda: not psutil.pid_exists(pid_a), what="runner a gone")
    assert svc.job(b["uuid"])["pid"] == pid_b


@pytest.mark.timeout(60)
def test_killed_runner_is_restarted(svc):
    doc = spec(plugin="ok")
    svc.write_spec("job.json", doc)
    svc.start()
    svc.wait_result(doc["uuid"])
    pid = wait_for(lambda: svc.job(doc["uuid"])["pid"], what="runner pid")
    os.kill(pid, signal.SIGKILL)
    job = wait_for(lambda: (lambda j: j if j["pid"] and j["pid"] != pid else None)(svc.job(doc["uuid"])),
                   timeout=20, what="a new runner")
    assert job["restarts"] == 1
    # run_on_start: the new runner runs again
    svc.wait_result(doc["uuid"], 2)


@pytest.mark.timeout(90)
def test_killed_publisher_is_restarted_and_no_result_is_lost(svc, area):
    marks = area / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    make_plugin(svc.plugins, "marker", f"""
        #!/bin/sh
        echo "$ASSESSMENT_RUN_UUID" >> {marks}/runs
        echo '{{"status": "satisfied"}}'
        """)
    docs = [spec(plugin="marker", interval="1s") for _ in range(3)]
    for i, doc in enumerate(docs):
        svc.write_spec(f"m{i}.json", doc)
    svc.start()
    for doc in docs:
        svc.wait_result(doc["uuid"])
    for _ in range(3):
        pid = svc.status()["publisher"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (lambda p: p if p and p != pid else None)(svc.status()["publisher"]["pid"]),
                 timeout=20, what="a new publisher")
        time.sleep(1.5)
    assert svc.stop() == 0
    ran = set((marks / "runs").read_text().split())
    delivered = {r["uuid"] for r in svc.results()}
    assert len(ran) >= 9
    assert ran <= delivered, f"lost: {ran - delivered}"


@pytest.mark.timeout(60)
def test_sigterm_stops_cleanly_and_leaves_no_process(svc):
    docs = [spec(plugin="ok"), spec(plugin="hanging", timeout="30s")]
    for i, doc in enumerate(docs):
        svc.write_spec(f"j{i}.json", doc)
    svc.start()
    svc.wait_result(docs[0]["uuid"])
    wait_for(lambda: svc.job(docs[1]["uuid"])["pid"], what="hanging runner")
    time.sleep(0.5)  # let the hanging plugin start
    procs = svc.descendants()
    assert len(procs) >= 4  # zygote, publisher, two runners (and the hanging plugin)
    assert svc.stop() == 0
    gone, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive, f"left behind: {alive}"
    # the interrupted run still produced its one result
    hanging = svc.results_for(docs[1]["uuid"])
    assert len(hanging) == 1 and hanging[0]["reason"].startswith("interrupted")
    assert not (svc.root / "run" / "control.sock").exists()


@pytest.mark.timeout(60)
def test_status_json_has_the_documented_shape(svc):
    doc = spec(plugin="ok", title="t")
    svc.write_spec("job.json", doc)
    svc.write_spec("bad.json", {"uuid": "bad-job", "plugin": {"name": "ok"}, "interval": "1m"})
    svc.start()
    svc.wait_result(doc["uuid"])
    st = wait_for(lambda: (lambda s: s if s["publisher"]["sinks"][0]["delivered"] >= 1 else None)(svc.status()),
                  what="publisher stats")
    assert set(st) == {"runtime_uuid", "version", "pid", "started_at", "sources", "jobs", "rejected", "publisher",
                       "sandbox"}  # SPEC §8's keys, plus which limits are in force (cgroup or rlimit)
    assert st["sandbox"]["limits"] in ("cgroup", "rlimit") and st["sandbox"]["detail"]
    assert st["sandbox"]["cgroup"] in ("v2", "v1", "none") and isinstance(st["sandbox"]["landlock_abi"], int)
    assert st["sandbox"]["user_per_job"] is IS_ROOT
    assert st["pid"] == svc.proc.pid
    [source] = st["sources"]
    assert source["kind"] == "dir" and source["location"] == str(svc.jobs)
    assert set(source) == {"kind", "location", "revision", "last_success", "last_error", "consecutive_failures"}
    [job] = st["jobs"]
    assert set(job) == {"uuid", "title", "plugin", "revision", "state", "pid", "uid", "runs", "skipped", "restarts",
                        "schedule", "next_run_in", "next_run_at", "last_result"}
    assert job["schedule"] == "1h" and job["skipped"] == 0
    assert (job["uid"] is not None) is IS_ROOT
    assert job["plugin"] == "ok@1.0.0" and job["state"] == "running" and job["runs"] >= 1
    assert psutil.Process(job["pid"]) in psutil.Process(svc.proc.pid).children(recursive=True)
    assert set(job["last_result"]) == {"uuid", "status", "reason", "end"}
    assert isinstance(job["next_run_in"], float) and 0 < job["next_run_in"] <= 3600
    at = datetime.datetime.fromisoformat(job["next_run_at"].replace("Z", "+00:00"))
    assert at.utcoffset() == datetime.timedelta(0) and abs(at.timestamp() - time.time() - job["next_run_in"]) < 5
    [rejected] = st["rejected"]
    assert rejected["uuid"] == "bad-job" and "plugin.version" in rejected["reason"] and "bad.json" in rejected["reason"]
    pub = st["publisher"]
    assert set(pub) == {"pid", "outbox_results", "outbox_bytes", "dropped", "sinks",  # SPEC §8, plus while the
                        "outbox_error", "outbox_write_errors", "waiting", "waiting_bytes"}  # outbox fails (§7)
    assert pub["outbox_error"] is None and pub["waiting"] == 0
    [sink] = pub["sinks"]
    assert {"name", "kind", "delivered", "pending", "failures", "dead_lettered", "last_error"} <= set(sink)
    assert sink["name"] == "archive" and sink["kind"] == "file"
    human = svc.cli("status")
    assert human.returncode == 0 and doc["uuid"] in human.stdout and "ok@1.0.0" in human.stdout
    metrics = svc.cli("status", "--json")  # the socket answers repeatedly
    assert metrics.returncode == 0


@pytest.mark.timeout(60)
def test_run_now_runs_a_job_outside_its_schedule(svc):
    doc = spec(plugin="ok", run_on_start=False)
    svc.write_spec("job.json", doc)
    svc.start()
    wait_for(lambda: svc.job(doc["uuid"]) and svc.job(doc["uuid"])["state"] == "running", what="runner up")
    assert svc.results_for(doc["uuid"]) == []
    r = svc.cli("run-now", doc["uuid"])
    assert r.returncode == 0, r.stderr
    svc.wait_result(doc["uuid"])
    r = svc.cli("run-now", "no-such-job")
    assert r.returncode == 1 and "no-such-job" in r.stderr


@pytest.mark.timeout(60)
def test_plugin_problems_are_error_results_not_crashes(svc):
    missing = spec(plugin="not-installed")
    big = spec(plugin="big", limits={"output": "1KiB"})
    make_plugin(svc.plugins, "big", """
        #!/bin/sh
        head -c 100000 /dev/zero | tr '\\0' x
        """)
    daemon = spec(plugin="daemon")
    make_plugin(svc.plugins, "daemon", """
        #!/bin/sh
        setsid sleep 300 </dev/null >/dev/null 2>&1 &
        echo '{"status": "satisfied"}'
        """)
    for name, doc in (("missing", missing), ("big", big), ("daemon", daemon)):
        svc.write_spec(f"{name}.json", doc)
    svc.start()
    r = svc.wait_result(missing["uuid"])[0]
    assert r["status"] == "error" and r["reason"].startswith("plugin not found: not-installed@1.0.0")
    r = svc.wait_result(big["uuid"])[0]
    assert r["status"] == "error" and r["reason"] == "output limit exceeded: more than 1024 bytes"
    r = svc.wait_result(daemon["uuid"])[0]
    assert r["status"] == "satisfied"
    # the daemonised grandchild did not outlive its run (ours: it runs as the job's uid, or as
    # run_as_user; a `sleep 300` of someone else on the machine is not ours to count)
    time.sleep(0.5)
    uid = svc.job(daemon["uuid"])["uid"]
    sleepers = [p for p in psutil.process_iter(["name", "cmdline", "uids"]) if p.info["cmdline"] == ["sleep", "300"]
                and (uid is None or p.info["uids"].real == uid)]
    assert sleepers == []


@pytest.mark.timeout(60)
def test_metrics_endpoint_speaks_prometheus(svc):
    doc = spec(plugin="ok")
    svc.write_spec("job.json", doc)
    svc.start()
    svc.wait_result(doc["uuid"])
    from supervisor.control import request
    counted = f'assessment_runtime_runs_total{{job="{doc["uuid"]}",status="satisfied"}} 1'

    def scrape() -> str | None:  # the publisher tells the supervisor of committed runs within ~0.1 s
        code, body = request(str(svc.root / "run" / "control.sock"), "GET", "/metrics")
        assert code == 200
        return body.decode() if counted in body.decode() else None
    text = wait_for(scrape, 5, what="the run to be counted in the metrics")
    for name in ("run_duration_seconds_bucket", "run_duration_seconds_sum", "run_duration_seconds_count",
                 "job_last_result_age_seconds", "runner_restarts_total", "outbox_results", "sink_delivered_total"):
        assert f"assessment_runtime_{name}" in text
    assert all(line.startswith(("#", "assessment_runtime_")) for line in text.splitlines() if line)


@pytest.mark.timeout(60)
def test_stored_specs_run_after_restart_without_the_folder(svc):
    doc = spec(plugin="ok")
    svc.write_spec("job.json", doc)
    svc.start()
    svc.wait_result(doc["uuid"])
    assert svc.stop() == 0
    assert (svc.state / "specs" / "dir" / f"{doc['uuid']}.json").exists()
    svc.start()
    svc.wait_result(doc["uuid"], 2)


def test_cli_without_a_service_and_with_bad_config(area, service_factory):
    svc = service_factory()
    r = svc.cli("status")
    assert r.returncode == 69 and "control.sock" in r.stderr
    r = svc.cli("run-now", "x")
    assert r.returncode == 69
    bad = area / "bad.toml"
    bad.write_text(svc.config.read_text() + "\nsurprise = 1\n")
    import subprocess
    import sys
    from conftest import REPO
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(bad)], capture_output=True,
                       text=True, timeout=20, cwd=REPO)
    assert r.returncode == 78 and "surprise" in r.stderr and str(bad) in r.stderr
    r = subprocess.run([sys.executable, "-m", "supervisor", "--version"], capture_output=True, text=True,
                       timeout=20, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("assessment-runtime ")


@pytest.mark.timeout(60)
def test_results_reach_the_sink_while_the_supervisor_is_stopped(svc):
    """The supervisor is the control plane only: runners hand results to the publisher."""
    doc = spec(plugin="ok", interval="1s")
    svc.write_spec("job.json", doc)
    svc.start()
    svc.wait_result(doc["uuid"])
    os.kill(svc.proc.pid, signal.SIGSTOP)
    try:
        before = len(svc.results_for(doc["uuid"]))
        svc.wait_result(doc["uuid"], before + 3, timeout=15)  # three more runs, delivered, with no supervisor
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)
    job = wait_for(lambda: (lambda j: j if j["runs"] >= before + 3 else None)(svc.job(doc["uuid"])), 10,
                   what="status to count the runs made meanwhile")
    assert job["last_result"]["status"] == "satisfied"


@pytest.mark.timeout(60)
def test_the_results_socket_is_ours_alone_and_the_zygote_leaves_nothing_behind(svc):
    doc = spec(plugin="ok")
    svc.write_spec("job.json", doc)
    svc.start()
    svc.wait_result(doc["uuid"])
    sock_path = svc.root / "run" / "results.sock"
    assert stat.S_ISSOCK(sock_path.stat().st_mode) and stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    if os.geteuid() == 0:  # another user cannot connect (the mode; the publisher checks the peer's uid too)
        probe = subprocess.run(
            [sys.executable, "-c", "import os, socket, sys; os.setgid(65534); os.setuid(65534); "
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])", str(sock_path)],
            capture_output=True, text=True, timeout=20)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
    zygote = [p for p in svc.descendants() if p.name() == "ar-zygote" and
              p.ppid() == svc.proc.pid]
    assert len(zygote) == 1
    # the warm-up ran a real plugin in a folder of its own and removed it
    assert not list(Path("/tmp").glob(f"ar-warm-{zygote[0].pid}-*"))
    assert "warm-up failed" not in svc.log_text()
    assert svc.stop() == 0
    assert not sock_path.exists()


@pytest.mark.timeout(60)
def test_a_config_larger_than_a_pipe_reaches_the_runner_and_its_plugin(svc, area):
    """A runner's config bigger than its pipe holds (64 KiB) reaches it in pieces, and whole."""
    dump = _dump_folder(area)
    make_plugin(svc.plugins, "stdindump", f"""
        #!/bin/sh
        cat > {dump}/stdin.json
        echo '{{"status": "satisfied"}}'
        """)
    big = "x" * (300 << 10)
    docs = [spec(plugin="stdindump", config={"big": big, "i": i}) for i in range(3)]
    for i, doc in enumerate(docs):
        svc.write_spec(f"big{i}.json", doc)
    svc.start()
    for doc in docs:
        assert svc.wait_result(doc["uuid"])[0]["status"] == "satisfied"
    import json
    stdin = json.loads((dump / "stdin.json").read_text())
    assert stdin["config"]["big"] == big
    assert all(j["restarts"] == 0 for j in svc.status()["jobs"])


@pytest.mark.timeout(60)
def test_a_second_service_on_the_same_run_dir_refuses_and_takes_nothing_away(svc):
    doc = spec(plugin="ok", interval="1s")
    svc.write_spec("job.json", doc)
    svc.start()
    svc.wait_result(doc["uuid"])
    second = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(svc.config)],
                            capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[1])
    assert second.returncode != 0 and "another service is already listening" in second.stderr, second.stderr
    assert (svc.root / "run" / "results.sock").exists() and (svc.root / "run" / "control.sock").exists()
    before = len(svc.results_for(doc["uuid"]))
    svc.wait_result(doc["uuid"], before + 2, timeout=15)  # the first one still delivers
    assert svc.status()["pid"] == svc.proc.pid
