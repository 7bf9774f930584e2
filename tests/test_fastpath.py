"""The runner's C fast path (runner/fastpath.c): its answers on their own, with real plugins
started through the real ar-exec; and the service giving the same results with it as
without it (ASSESSMENT_RUNTIME_NO_FASTPATH=1), for every kind of outcome a run can have."""

from __future__ import annotations

import datetime
import os
import select
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import RunningService, make_plugin, spec, wait_for
from runner.protocol import StdinFile
from runner.sandbox import HELPER, Sandbox
from runner.wire import RunLimits

_fastpath = pytest.importorskip("runner._fastpath", reason="runner/_fastpath is not built (make venv builds it)")
if not os.access(HELPER, os.X_OK):
    pytest.skip("runner/ar-exec is not built (make venv builds it)", allow_module_level=True)

pytestmark = pytest.mark.timeout(120)


class Stage:
    """What a runner hands the C side, for a plugin script in a folder of its own."""

    def __init__(self, area, script: str, limit: int = 1 << 20):
        self.folder = Path(tempfile.mkdtemp(prefix="stage-", dir=area))
        self.plugin = self.folder / "plugin"
        self.plugin.write_text(script)
        self.plugin.chmod(0o755)
        self.scratch = self.folder / "scratch"
        self.scratch.mkdir(mode=0o700)
        self.stdin = StdinFile(b'{"job":1}', b'{"config":2}')
        self.stdin.prepare("0" * 36)  # the memfd, as a first run makes it
        self.sandbox = Sandbox(RunLimits(None, None, None, None, limit), None, {"PATH": "/usr/bin:/bin"})
        self.epoll = select.epoll()
        self.limit = limit

    def key(self, path) -> tuple:
        st = os.stat(path) if path == self.folder else os.lstat(path)
        return (os.fsencode(path), 1 if path == self.folder else 0, st.st_dev, st.st_ino, st.st_mode, st.st_uid,
                st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def scratch_key(self) -> tuple[int, int]:
        st = os.lstat(self.scratch)
        return st.st_ino, st.st_ctime_ns

    def run(self, due: float = 0.0, levels: tuple | None = None, run_uuid: bytes = b"", quick: float = 2.0,
            scratch_key: tuple[int, int] | None = None, scratch_age: int = 0):
        levels = (self.key(self.folder), self.key(self.plugin)) if levels is None else levels
        argv = self.sandbox.helper_argv(str(self.scratch), False) + [str(self.plugin)]
        env = self.sandbox.env_for(str(self.scratch))
        return _fastpath.run(self.epoll.fileno(), due, levels, os.fsencode(self.scratch),
                             scratch_key or self.scratch_key(), scratch_age,
                             run_uuid, self.stdin._rw, self.stdin._ro, self.stdin._head, self.stdin._tail,
                             os.fsencode(HELPER), tuple(os.fsencode(a) for a in argv),
                             tuple(os.fsencode(f"{k}={v}") for k, v in env.items()), quick, self.limit, -1, -1, -1)

    def close(self):
        self.stdin.close()
        self.epoll.close()


@pytest.fixture
def stage(area):
    made = []

    def make(script: str, **kw) -> Stage:
        made.append(Stage(area, script, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_a_quick_run_is_started_and_collected(stage):
    s = stage("#!/bin/sh\ncat\necho \" $ASSESSMENT_RUN_UUID $HOME $(pwd)\"\necho oops >&2\nexit 3\n")
    got = s.run()
    assert got[0] == "done", got
    kind, run_uuid, start_wall, start_mono, pid, status, utime, stime, out, err, children, oom, pids, end = got
    assert len(run_uuid) == 36 and run_uuid[14] == "4" and run_uuid[19] in "89ab"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3 and pid > 0
    # stdin: the whole document around this run's uuid; the environment and cwd its own
    assert out.decode() == (f'{{"protocol":"assessment/1","run_uuid":"{run_uuid}","job":{{"job":1}},'
                            f'"config":{{"config":2}}}} {run_uuid} {s.scratch} {s.scratch}\n')
    assert err == b"oops\n" and (oom, pids) == (0, 0)
    assert children == 1  # no /proc children list given: "cannot tell", so the runner looks the long way
    assert abs(start_wall - time.time()) < 5 and start_wall <= end and abs(start_mono - time.monotonic()) < 5
    assert utime >= 0 and stime >= 0
    # a uuid given is the one used; two runs never share one made here
    assert s.run(run_uuid=b"1" * 36)[1] == "1" * 36
    assert s.run()[1] != s.run()[1]


def test_nothing_starts_when_a_check_would_not_hold(stage):
    s = stage("#!/bin/sh\necho x >> ../ran\n")
    ran = s.folder / "ran"
    levels = (s.key(s.folder), s.key(s.plugin))
    s.plugin.chmod(0o775)  # the plugin's mode (and ctime) changed: the trust check must look again
    assert s.run(levels=levels) == ("slow",)
    missing = (os.fsencode(s.folder / "absent"), -1)  # an earlier plugin_dir must still not hold it
    (s.folder / "absent").mkdir()
    assert s.run(levels=(missing, s.key(s.folder), s.key(s.plugin))) == ("slow",)
    key = s.scratch_key()
    (s.scratch / "left").write_text("x")  # the scratch folder is no longer as it was left, empty
    assert s.run(scratch_key=key) == ("slow",)
    assert not ran.exists()
    (s.folder / "absent").rmdir()
    assert s.run(levels=(missing, s.key(s.folder), s.key(s.plugin)))[0] == "done"
    assert ran.read_text() == "x\n"


def test_a_scratch_folder_emptied_within_the_tick_is_not_trusted(stage):
    """A folder left empty less than scratch_age ago could hide what a plugin writes in the
    same clock tick (the zygote empties it just before forking): Python takes that run."""
    s = stage("#!/bin/sh\necho x >> ../ran\n")
    os.chmod(s.scratch, 0o700)  # its ctime: now
    assert s.run(scratch_age=60 * 10**9) == ("slow",)
    assert not (s.folder / "ran").exists()
    assert s.run(scratch_age=0)[0] == "done"
    time.sleep(0.05)
    assert s.run(scratch_age=20_000_000)[0] == "done"
    assert (s.folder / "ran").read_text() == "x\nx\n"


def test_an_event_before_the_run_is_due_starts_nothing(stage):
    s = stage("#!/bin/sh\ntouch ../ran\n")
    r, w = os.pipe()
    try:
        s.epoll.register(r, select.EPOLLIN)
        os.write(w, b"x")
        assert s.run(due=time.monotonic() + 5) == ("wake",)
        assert not (s.folder / "ran").exists()
        os.read(r, 1)
        # a run 40 days away (past what poll's int of milliseconds holds) still wakes for an event
        threading.Timer(0.3, os.write, (w, b"x")).start()
        t0 = time.monotonic()
        assert s.run(due=t0 + 40 * 86400) == ("wake",) and time.monotonic() - t0 < 5
        os.read(r, 1)
        t0 = time.monotonic()
        got = s.run(due=t0 + 0.2)  # nothing for the loop: it waits until due, then runs
        assert got[0] == "done" and got[3] >= t0 + 0.2 and (s.folder / "ran").exists()
    finally:
        os.close(r)
        os.close(w)


def test_a_plugin_still_running_is_handed_over(stage):
    s = stage("#!/bin/sh\necho started\nsleep 5\n")
    got = s.run(quick=0.1)
    assert got[0] == "inflight", got
    pid, pidfd, out_fd, err_fd = got[4:8]
    try:
        assert os.read(out_fd, 100) == b"started\n"
        assert not select.select([pidfd], [], [], 0)[0]  # still running
    finally:
        os.killpg(pid, 9)
        os.waitpid(pid, 0)
        for fd in (pidfd, out_fd, err_fd):
            os.close(fd)


def test_output_past_a_pipe_and_past_the_limit(stage):
    """A plugin may grow its stdout pipe (F_SETPIPE_SZ) and exit before we read a byte: all of
    it is read (past the module's buffer), and no more than the limit + 1 byte is kept."""
    script = ("#!/usr/bin/env python3\nimport fcntl, os, sys\nfcntl.fcntl(1, 1031, 1 << 20)\n"
              "os.write(1, b'o' * 600_000)\nos.write(2, b'e' * 10_000 + b'END')\n")
    got = stage(script, limit=1 << 20).run()
    assert got[0] == "done" and got[8] == b"o" * 600_000 and got[9] == (b"e" * 10_000 + b"END")[-4096:]


def test_output_over_the_limit_keeps_one_byte_more(stage):
    s = stage("#!/bin/sh\nhead -c 5000 /dev/zero\n", limit=1000)
    got = s.run()
    assert got[0] == "done" and got[8] == bytes(1001)


def test_bad_arguments_are_errors_not_crashes(stage):
    s = stage("#!/bin/sh\n")
    with pytest.raises(TypeError):
        _fastpath.run(s.epoll.fileno(), 0.0, ("not a level",), b"/", (0, 0), 0, b"", -1, -1, b"", b"", b"/", (), (),
                      0.05, 10, -1, -1, -1)
    with pytest.raises(ValueError):
        s.run(run_uuid=b"short")
    with pytest.raises(TypeError):
        _fastpath.run(s.epoll.fileno(), 0.0, (), b"/", (0, 0), 0, b"", -1, -1, b"", b"", b"/", ["list"], (), 0.05, 10,
                      -1, -1, -1)


# -- the service, with and without the fast path ---------------------------------------------

PLUGINS = {
    "ok": """
        #!/bin/sh
        cat >/dev/null
        cat <<'EOF'
        {"status": "satisfied", "title": "fine", "observations": [{"uuid": "o1", "description": "d\u00e9"}],
         "findings": [{"id": "f1"}], "risks": [], "subjects": [{"identifier": "s"}], "logs": [{"x": 1}],
         "extra": [1, 2.5, null, true]}
        EOF
        """,
    "notok": """
        #!/bin/sh
        cat >/dev/null
        echo '{"status": "not-satisfied", "findings": [{"id": "f1", "title": "bad"}]}'
        """,
    "exit3": """
        #!/bin/sh
        cat >/dev/null
        echo 'partial output'
        i=0; while [ $i -lt 300 ]; do echo "stderr line $i of a long complaint" >&2; i=$((i+1)); done
        exit 3
        """,
    "garbage": """
        #!/bin/sh
        cat >/dev/null
        echo '{"status": "maybe"}'
        """,
    "empty": """
        #!/bin/sh
        cat >/dev/null
        """,
    "big": """
        #!/bin/sh
        cat >/dev/null
        head -c 3000 /dev/zero | tr '\\0' 'x'
        """,
    "leaves": """
        #!/bin/sh
        cat >/dev/null
        if [ -n "$(ls -A)" ]; then state=not-satisfied; else state=satisfied; fi
        echo left > left-behind
        echo "{\\"status\\": \\"$state\\"}"
        """,
}
NAGIOS = """
    #!/bin/sh
    echo "DISK WARNING - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968 'a b'=1"
    exit 1
    """


def _results(area, name: str, env: dict) -> tuple[dict[str, list[dict]], str]:
    root = area / name
    root.mkdir()
    root.chmod(0o755)
    svc = RunningService(root)
    try:
        for plugin, script in PLUGINS.items():
            make_plugin(svc.plugins, plugin, script)
        make_plugin(svc.plugins, "nagios", NAGIOS, protocol="nagios")
        docs = {p: spec(uuid=f"00000000-0000-4000-8000-{i:012d}", plugin=p, interval="1s")
                for i, p in enumerate([*PLUGINS, "nagios"])}
        docs["big"]["limits"] = {"output": 2000}
        docs["nagios"]["config"] = {"args": ["-w", "10%"]}
        for p, doc in docs.items():
            svc.write_spec(f"{p}.json", doc)
        svc.start(env=env)
        for doc in docs.values():
            svc.wait_result(doc["uuid"], 4, timeout=40)
        return {p: svc.results_for(doc["uuid"]) for p, doc in docs.items()}, svc.log_text()
    finally:
        svc.kill_all()


def _same_parts(result: dict) -> dict:
    """What two runs of one job share: not their uuid, times, or the run uuid in an observation."""
    out = {k: v for k, v in result.items() if k not in ("uuid", "start", "end", "runtime_uuid")}
    out["observations"] = [{k: v for k, v in o.items() if k not in ("uuid", "collected")} for o in out["observations"]]
    return out


def test_the_service_gives_the_same_results_with_and_without_the_fast_path(area):
    fast, fast_log = _results(area, "fast", {"ASSESSMENT_RUNTIME_NO_FASTPATH": None})
    slow, slow_log = _results(area, "slow", {"ASSESSMENT_RUNTIME_NO_FASTPATH": "1"})
    assert "runs go through runner/fastpath.c" in fast_log
    assert "runs go through runner/fastpath.c" not in slow_log
    for plugin in fast:
        # the first runs (the zygote checked ahead) and later ones (the runner checked before)
        for f, s in zip(fast[plugin][:4], slow[plugin][:4]):
            assert _same_parts(f) == _same_parts(s), plugin
    assert fast["ok"][3]["status"] == "satisfied" and fast["notok"][3]["status"] == "not-satisfied"
    assert fast["exit3"][3]["reason"] == "exit code 3"
    assert fast["exit3"][3]["logs"][0]["text"].endswith("stderr line 299 of a long complaint\n")
    assert len(fast["exit3"][3]["logs"][0]["text"]) == 4096
    assert fast["garbage"][3]["reason"].startswith("invalid output: $.status: expected one of")
    assert fast["empty"][3]["reason"] == "invalid output: empty, expected one JSON object"
    assert fast["big"][3]["reason"] == "output limit exceeded: more than 2000 bytes"
    assert all(r["status"] == "satisfied" for r in fast["leaves"]), "a run found what the one before left"
    assert fast["nagios"][3]["status"] == "not-satisfied"
    assert fast["nagios"][3]["observations"][0]["props"] == [
        {"name": "/", "value": "/=2643MB;5948;5958;0;5968"}, {"name": "a b", "value": "'a b'=1"}]


def test_a_change_to_the_plugin_between_runs_is_seen_by_the_next_run(service_factory):
    """The C side compares what the trust check looked at; a plugin made writable by others
    after a few runs is refused at the next run, and trusted again once fixed."""
    svc = service_factory()
    entry = make_plugin(svc.plugins, "ok", PLUGINS["ok"])
    doc = spec(plugin="ok", interval="1s")
    svc.write_spec("job.json", doc)
    svc.start()
    svc.wait_result(doc["uuid"], 3)
    entry.chmod(entry.stat().st_mode | stat.S_IWOTH)
    seen = len(svc.results_for(doc["uuid"]))
    refused = wait_for(lambda: next((r for r in svc.results_for(doc["uuid"])[seen:] if r["status"] == "error"), None),
                       15, what="a refused run")
    assert "is writable by others" in refused["reason"], refused["reason"]
    entry.chmod(0o755)
    seen = len(svc.results_for(doc["uuid"]))
    wait_for(lambda: any(r["status"] == "satisfied" for r in svc.results_for(doc["uuid"])[seen:]), 15,
             what="a trusted run again")


def test_what_the_zygote_checked_ahead_is_checked_again_at_the_first_run(service_factory):
    """The zygote checks each job's plugin before it forks the job's runner (check_ahead), and
    the first run then goes through the C side like any other: a plugin made writable by
    others after the zygote's check is refused at the first run all the same."""
    svc = service_factory()
    entry = make_plugin(svc.plugins, "ok", PLUGINS["ok"])
    docs = [spec(uuid=f"00000000-0000-4000-8000-{i:012d}", plugin="ok", interval="5s", run_on_start=False)
            for i in range(6)]
    for i, doc in enumerate(docs):
        svc.write_spec(f"job{i}.json", doc)
    svc.start()
    wait_for(lambda: [j["state"] for j in svc.status()["jobs"]] == ["running"] * len(docs), 20, what="every runner up")
    entry.chmod(entry.stat().st_mode | stat.S_IWOTH)
    changed = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    firsts = [svc.wait_result(d["uuid"], 1, timeout=20)[0] for d in docs]
    after = [r for r in firsts if r["start"] > changed]
    # each job's first run falls anywhere in its first 5 s: all six before the chmod is rare
    assert after, "no first run started after the change"
    for r in after:
        assert r["status"] == "error" and "is writable by others" in r["reason"], r
