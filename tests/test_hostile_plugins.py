"""Issue 5, sandbox and plugin trust: hostile plugins, end to end through the real service.

Every test runs its hostile job(s) in the same service as a well-behaved canary job (interval
1s, a trivial ok plugin) and checks, besides the hostile run's result, that

- the canary kept its schedule during the hostile run (about one result a second, no long gap,
  all satisfied),
- the supervisor, zygote and publisher are the same processes as before, and neither the
  canary's runner nor the hostile job's runner was restarted,
- nothing the hostile run started is still alive once its result is in (every process whose
  environment carries the hostile job's ASSESSMENT_JOB_UUID is gone).

Each hostile plugin is bounded, so it cannot hurt the machine even if the sandbox failed: the
fork bombs start at most 300 processes that each sleep 20 s, the memory hog stops at 2 GiB,
the CPU spins stop after 30 s of wall time, the daemons sleep 300 s at most, the pid hopper
stops after 30 s.

The tests run as root on CI, where plugins run as "nobody" (conftest's run_as_user). Tests
whose meaning depends on that (access checks, the per-user process limit, ownership) skip
loudly when not root.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

from conftest import OK_PLUGIN, RUN_AS_USER, make_plugin, spec, wait_for

IS_ROOT = os.geteuid() == 0
NEEDS_ROOT = "needs root: the service must run as root so that plugins run as the unprivileged " \
             f"run_as_user {RUN_AS_USER!r}; as any other user this check means nothing"

# the small limits every hostile job gets (SPEC §4 limits)
SMALL = {"memory": "64MiB", "cpu_time": "1s", "processes": 16, "output": "64KiB"}


def hostile_spec(plugin: str, timeout: str = "3s", interval: str = "1h", sha256: str | None = None,
                 **extra) -> dict:
    doc = spec(plugin=plugin, interval=interval, timeout=timeout, limits=dict(SMALL), **extra)
    if sha256 is not None:
        doc["plugin"]["sha256"] = sha256
    return doc


def ts(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def duration(result: dict) -> float:
    return ts(result["end"]) - ts(result["start"])


def processes_of_job(job_uuid: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment says they belong to a run of this job."""
    found = []
    needle = f"ASSESSMENT_JOB_UUID={job_uuid}".encode()
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            if needle not in env.split(b"\0"):
                continue
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def world_writable_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o777)
    return path


class Scene:
    """One real service with a canary job next to the hostile ones."""

    CANARY_WINDOW = 5.0  # the canary is judged over at least this many seconds of hostile activity

    def __init__(self, svc):
        self.svc = svc
        make_plugin(svc.plugins, "canary", OK_PLUGIN)
        self.canary = spec(plugin="canary", interval="1s")
        svc.write_spec("canary.json", self.canary)
        self.hostile: list[dict] = []
        self.t0 = 0.0

    def start(self) -> "Scene":
        self.svc.start()
        self.svc.wait_result(self.canary["uuid"], 2, timeout=30)
        st = self.svc.status()
        self.core = self.core_pids(st)
        assert self.core["zygote"], f"no ar-zygote among the service's children: {self.core}"
        canary_job = self.job(self.canary["uuid"], st)
        assert canary_job["pid"], canary_job
        self.canary_runner = canary_job["pid"]
        return self

    def core_pids(self, st: dict) -> dict:
        try:
            children = psutil.Process(self.svc.proc.pid).children()
        except psutil.NoSuchProcess:
            children = []
        zygotes = []
        for child in children:
            try:
                if child.name() == "ar-zygote":
                    zygotes.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return {"service": st["pid"], "publisher": st["publisher"]["pid"], "zygote": zygotes}

    def log_tail(self, lines: int = 60) -> str:
        return "service log (tail):\n" + "\n".join(self.svc.log_text().splitlines()[-lines:])

    @staticmethod
    def job(uuid: str, st: dict) -> dict | None:
        return next((j for j in st["jobs"] if j["uuid"] == uuid), None)

    def launch(self, *docs: dict) -> float:
        """Write the hostile specs; the hostile window starts now."""
        self.t0 = time.time()
        for doc in docs:
            self.hostile.append(doc)
            self.svc.write_spec(f"hostile-{doc['uuid']}.json", doc)
        return self.t0

    def result(self, doc: dict, count: int = 1, timeout: float = 30) -> dict:
        return self.svc.wait_result(doc["uuid"], count, timeout=timeout)[count - 1]

    def runner_pid(self, doc: dict) -> int:
        return wait_for(lambda: (self.svc.job(doc["uuid"]) or {}).get("pid"), 20,
                        what=f"the runner of job {doc['uuid']}")

    def assert_no_leftovers(self, doc: dict, timeout: float = 3.0) -> None:
        """Nothing started by a run of this job is alive (the run's result is already in)."""
        deadline = time.monotonic() + timeout
        left = processes_of_job(doc["uuid"])
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = processes_of_job(doc["uuid"])
        described = []
        for p in left:
            try:
                described.append((p.pid, p.username(), p.cmdline()))
            except psutil.Error:
                pass
        assert not left, f"processes of job {doc['uuid']} outlived its run: {described}"

    def check(self, *, hostile_runners: dict[str, int] | None = None) -> None:
        """The canary kept its schedule over the hostile window; the core processes are the same."""
        svc = self.svc
        t1 = max(time.time(), self.t0 + self.CANARY_WINDOW)
        canary = self.canary["uuid"]
        # wait for a canary run that started after the window, so the window is complete in the sink
        wait_for(lambda: any(ts(r["start"]) > t1 for r in svc.results_for(canary)),
                 timeout=max(0.0, t1 - time.time()) + 15, what="a canary result after the hostile window")
        runs = sorted(svc.results_for(canary), key=lambda r: r["start"])
        starts = [ts(r["start"]) for r in runs]
        # the runs around the window: the last one before it, those in it, the first one after it
        before = [s for s in starts if s < self.t0]
        after = [s for s in starts if s > t1]
        inside = [r for r in runs if self.t0 <= ts(r["start"]) <= t1]
        around = before[-1:] + [ts(r["start"]) for r in inside] + after[:1]
        window = t1 - self.t0
        gaps = [b - a for a, b in zip(around, around[1:])]
        summary = f"canary starts relative to the window start: {[round(s - self.t0, 2) for s in around]}"
        assert len(inside) >= int(window * 0.7) - 1, f"the canary missed runs in a {window:.1f}s window; {summary}"
        assert max(gaps) <= 3.0, f"the canary paused for {max(gaps):.1f}s; {summary}"
        bad = [(r["status"], r["reason"]) for r in inside if r["status"] != "satisfied"]
        assert not bad, f"canary runs failed during the hostile window: {bad}"

        st = svc.status()
        assert svc.proc.poll() is None, "the service died"
        assert self.core_pids(st) == self.core, "the supervisor, zygote or publisher was replaced"
        canary_job = self.job(canary, st)
        assert canary_job["pid"] == self.canary_runner and canary_job["restarts"] == 0, canary_job
        for uuid, pid in (hostile_runners or {}).items():
            job = self.job(uuid, st)
            assert job is not None and job["restarts"] == 0 and job["pid"] == pid, \
                f"the hostile job's runner did not survive its plugin: {job}\n{self.log_tail()}"


@pytest.fixture
def scene(service_factory):
    return Scene(service_factory())


@pytest.fixture
def marks(area):
    return world_writable_dir(area / "marks")


def wait_for_few_processes_of_run_user(limit: int = 8, timeout: float = 30) -> None:
    """RLIMIT_NPROC counts every process of the user: other suites' plugins running as the same
    user at the same time would make the process limit test meaningless."""
    uid = pwd.getpwnam(RUN_AS_USER).pw_uid

    def count():
        n = 0
        for p in psutil.process_iter(["uids"]):
            try:
                if p.info["uids"] and p.info["uids"].real == uid:
                    n += 1
            except psutil.Error:
                pass
        return n

    deadline = time.monotonic() + timeout
    while count() >= limit:
        if time.monotonic() > deadline:
            pytest.skip(f"{count()} processes of {RUN_AS_USER!r} are running on this machine (other test "
                        f"suites?): the per-user process limit of 16 cannot be tested reliably now")
        time.sleep(0.5)


# -- resource limits ----------------------------------------------------------------------

MEMORY_HOG = """
#!/usr/bin/python3
import sys
sys.stdin.read()
hog = []
for _ in range(2048):  # 1 MiB at a time, touched; stops at 2 GiB
    hog.append(b"x" * (1 << 20))
print('{"status": "satisfied", "title": "allocated 2 GiB"}')
"""


@pytest.mark.timeout(90)
def test_memory_hog_is_stopped_at_the_memory_limit(scene):
    make_plugin(scene.svc.plugins, "hog", MEMORY_HOG)
    scene.start()
    doc = hostile_spec("hog")
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    result = scene.result(doc)
    assert result["status"] == "error", result
    # "killed: memory limit 64MiB" (cgroup) or "memory limit 64MiB reached: allocation failed, exit code 1"
    assert "memory limit 64MiB" in result["reason"], result["reason"]
    scene.assert_no_leftovers(doc)
    scene.check(hostile_runners={doc["uuid"]: runner})


FORK_BOMBS = {
    # each child sleeps 20 s and exits; the parent stops at 300 children or at the first failed fork
    "python": """
        #!/usr/bin/python3
        import os, sys, time
        sys.stdin.read()
        for _ in range(300):
            if os.fork() == 0:
                time.sleep(20)
                os._exit(0)
        print('{"status": "satisfied", "title": "forked 300 processes"}')
        """,
    "sh": """
        #!/bin/sh
        cat >/dev/null
        i=0
        while [ $i -lt 300 ]; do
            sleep 20 &
            i=$((i+1))
        done
        echo '{"status": "satisfied", "title": "forked 300 processes"}'
        """,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(FORK_BOMBS))
def test_fork_bomb_is_stopped_at_the_process_limit(scene, kind):
    if not IS_ROOT:
        pytest.skip(NEEDS_ROOT + " (RLIMIT_NPROC would count this test user's own processes)")
    make_plugin(scene.svc.plugins, "bomb", FORK_BOMBS[kind])
    scene.start()
    wait_for_few_processes_of_run_user()
    doc = hostile_spec("bomb")
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    result = scene.result(doc)
    assert result["status"] == "error", result
    assert "process limit 16" in result["reason"], (result["reason"], result["logs"])
    scene.assert_no_leftovers(doc)
    scene.check(hostile_runners={doc["uuid"]: runner})


CPU_SPINS = {
    # `date` runs in a child, so the shell's own CPU time is all spent in the inner loop
    "plain": """
        #!/bin/sh
        cat >/dev/null
        end=$(( $(date +%s) + 30 ))
        while [ "$(date +%s)" -lt "$end" ]; do
            i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done
        done
        echo '{"status": "satisfied", "title": "spun for 30 s"}'
        """,
    "ignores-sigxcpu": """
        #!/bin/sh
        trap '' XCPU
        cat >/dev/null
        end=$(( $(date +%s) + 30 ))
        while [ "$(date +%s)" -lt "$end" ]; do
            i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done
        done
        echo '{"status": "satisfied", "title": "spun for 30 s"}'
        """,
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", sorted(CPU_SPINS))
def test_cpu_spin_is_killed_at_the_cpu_limit(scene, kind):
    make_plugin(scene.svc.plugins, "spin", CPU_SPINS[kind])
    scene.start()
    # a generous timeout: on a busy 2-core machine 1-2 s of CPU may take more than 3 s of wall time
    doc = hostile_spec("spin", timeout="10s")
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    result = scene.result(doc)
    assert result["status"] == "error", result
    assert result["reason"] == "killed: cpu limit 1s", (result["reason"], result["logs"])
    scene.assert_no_leftovers(doc)
    scene.check(hostile_runners={doc["uuid"]: runner})


@pytest.mark.timeout(90)
def test_stdout_flood_ends_the_run_promptly_and_stderr_flood_is_only_tailed(scene):
    make_plugin(scene.svc.plugins, "flood", """
        #!/bin/sh
        head -c 209715200 /dev/zero
        """)
    make_plugin(scene.svc.plugins, "errflood", """
        #!/bin/sh
        cat >/dev/null
        head -c 209715200 /dev/zero | tr '\\0' e >&2
        echo "the last words" >&2
        exit 1
        """)
    scene.start()
    flood, errflood = hostile_spec("flood"), hostile_spec("errflood", timeout="10s")
    t0 = scene.launch(flood, errflood)
    runners = {doc["uuid"]: scene.runner_pid(doc) for doc in (flood, errflood)}
    result = scene.result(flood, timeout=20)
    arrived = time.time()
    assert result["status"] == "error", result
    assert result["reason"] == "output limit exceeded: more than 65536 bytes"
    assert duration(result) <= 5, f"the run took {duration(result):.1f}s to end after its output limit"
    assert arrived - t0 <= 12, f"the result arrived {arrived - t0:.1f}s after the spec was written"
    scene.assert_no_leftovers(flood)
    # 200 MiB on stderr: the run is not ended for it, only the tail (4 KiB) is kept in logs
    result = scene.result(errflood, timeout=30)
    assert result["status"] == "error" and result["reason"] == "exit code 1", result["reason"]
    stderr = [log["text"] for log in result["logs"] if log.get("stream") == "stderr"]
    assert stderr and stderr[0].endswith("the last words\n") and len(stderr[0]) <= 4096
    scene.assert_no_leftovers(errflood)
    scene.check(hostile_runners=runners)


@pytest.mark.timeout(90)
def test_plugin_ignoring_sigterm_is_killed_after_the_grace(scene, marks):
    make_plugin(scene.svc.plugins, "stubborn", f"""
        #!/bin/sh
        trap '' TERM
        cat >/dev/null
        echo $$ > {marks}/main
        sleep 60 &
        echo $! > {marks}/child
        wait
        echo '{{"status": "satisfied", "title": "slept through"}}'
        """)
    scene.start()
    doc = hostile_spec("stubborn", timeout="1s")
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    # (the leftover check sees a run's processes while they live)
    wait_for(lambda: len(processes_of_job(doc["uuid"])) >= 2, 10, 0.02, what="the stubborn plugin's processes")
    result = scene.result(doc)
    assert result["status"] == "error" and result["reason"] == "timeout after 1s", result["reason"]
    # timeout 1s, then SIGTERM (ignored), then SIGKILL after stop_grace (1s in conftest)
    took = duration(result)
    assert 1.8 <= took <= 1 + 1 + 3, f"the run took {took:.2f}s (timeout 1s + stop_grace 1s)"
    for name in ("main", "child"):
        pid = int((marks / name).read_text())
        wait_for(lambda: gone(pid), 3, what=f"the stubborn plugin's {name} process {pid} to be gone")
    scene.assert_no_leftovers(doc)
    scene.check(hostile_runners={doc["uuid"]: runner})


# -- escaping the run -----------------------------------------------------------------------

DAEMONS = {
    # setsid, then a double fork: the daemon is in its own session and its parent is gone
    "double-fork": """
        #!/bin/sh
        M=@MARKS@/daemon.pid
        case "$1" in
            daemon) echo $$ > "$M.tmp"; mv "$M.tmp" "$M"; exec sleep 300;;
            middle) "$0" daemon </dev/null >/dev/null 2>&1 & exit 0;;
        esac
        cat >/dev/null
        setsid "$0" middle </dev/null >/dev/null 2>&1 &
        n=0; while [ ! -s "$M" ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
        echo '{"status": "satisfied", "title": "left a daemon behind"}'
        """,
    # the same, but the daemon keeps the plugin's stdout and stderr pipes open
    "double-fork-holding-the-pipes": """
        #!/bin/sh
        M=@MARKS@/daemon.pid
        case "$1" in
            daemon) echo $$ > "$M.tmp"; mv "$M.tmp" "$M"; exec sleep 300;;
            middle) "$0" daemon </dev/null & exit 0;;
        esac
        cat >/dev/null
        setsid "$0" middle </dev/null &
        n=0; while [ ! -s "$M" ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
        echo '{"status": "satisfied", "title": "left a daemon behind"}'
        """,
    # a new session whose process keeps forking a successor and exiting: its pid keeps changing
    # (at most two processes at a time; it stops by itself after 30 s)
    "pid-hopper": """
        #!/bin/sh
        M=@MARKS@/daemon.pid
        if [ "$1" = hop ]; then
            echo $$ >> "$M.all"
            echo $$ > "$M.tmp"; mv "$M.tmp" "$M"
            if [ "$(date +%s)" -lt "$2" ]; then "$0" hop "$2" </dev/null >/dev/null 2>&1 & fi
            exit 0
        fi
        cat >/dev/null
        setsid "$0" hop $(( $(date +%s) + 30 )) </dev/null >/dev/null 2>&1 &
        n=0; while [ ! -s "$M" ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
        sleep 0.5
        echo '{"status": "satisfied", "title": "left a pid hopper behind"}'
        """,
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", sorted(DAEMONS))
def test_daemonised_grandchild_does_not_outlive_its_run(scene, marks, kind):
    make_plugin(scene.svc.plugins, "daemon", DAEMONS[kind].replace("@MARKS@", str(marks)))
    scene.start()
    doc = hostile_spec("daemon")
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    result = scene.result(doc)
    assert result["status"] == "satisfied", (result["reason"], result["logs"])
    marker = marks / "daemon.pid"
    assert marker.exists(), "the plugin did not get to start its daemon"
    # the daemon (for the hopper: its latest incarnation) is gone within a couple of seconds
    wait_for(lambda: gone(int(marker.read_text())), 3,
             what=f"the daemon {marker.read_text().strip()} to be gone")
    if kind == "pid-hopper":
        hops = (marks / "daemon.pid.all").read_text().split()
        time.sleep(1.0)
        again = (marks / "daemon.pid.all").read_text().split()
        assert again == hops, f"the pid hopper is still hopping ({len(again) - len(hops)} new pids in 1s)"
        assert all(gone(int(pid)) for pid in again)
    scene.assert_no_leftovers(doc)
    scene.check(hostile_runners={doc["uuid"]: runner})


ACCESS_PROBE = """
#!/bin/sh
cat >/dev/null
obs=""
note() { obs="$obs${obs:+, }{\\"uuid\\": \\"$1\\", \\"description\\": \\"$2\\"}"; }
try() { name=$1; shift; if "$@" >/dev/null 2>&1; then note "$name" allowed; else note "$name" denied; fi; }
write() { echo hostile > "$1"; }
append() { echo hostile >> "$1"; }
try read-token cat "@TOKEN@"
try read-config-token cat "@AREA@/svc/config-token"
try write-state-dir write "@STATE@/evil-@TAG@"
try write-etc write "/etc/evil-@TAG@"
try write-test-area write "@AREA@/evil-@TAG@"
try write-plugin-dir write "@PLUGINS@/evil-@TAG@"
try write-own-plugin-folder write "$(dirname "$0")/evil-@TAG@"
try append-own-entrypoint append "$0"
try list-state-dir ls "@STATE@"
try read-results-file cat "@STATE@/results.jsonl"
try signal-runner kill -0 "$PPID"
try write-scratch write ./mine
echo "{\\"status\\": \\"satisfied\\", \\"observations\\": [$obs]}"
"""


@pytest.mark.timeout(90)
def test_plugin_cannot_read_secrets_or_write_outside_its_scratch_folder(scene, area):
    if not IS_ROOT:
        pytest.skip(NEEDS_ROOT)
    svc = scene.svc
    tag = os.urandom(4).hex()
    token = area / "hub-token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    config_token = svc.root / "config-token"
    config_token.write_text("another-s3cret\n")
    config_token.chmod(0o600)
    assert area.stat().st_mode & 0o777 == 0o755 and area.stat().st_uid == 0
    probe = (ACCESS_PROBE.replace("@TOKEN@", str(token)).replace("@AREA@", str(area))
             .replace("@STATE@", str(svc.state)).replace("@PLUGINS@", str(svc.plugins)).replace("@TAG@", tag))
    entry = make_plugin(svc.plugins, "probe", probe)
    original = entry.read_bytes()
    evil = [svc.state / f"evil-{tag}", Path(f"/etc/evil-{tag}"), area / f"evil-{tag}",
            svc.plugins / f"evil-{tag}", entry.parent / f"evil-{tag}"]
    try:
        scene.start()
        doc = hostile_spec("probe")
        scene.launch(doc)
        runner = scene.runner_pid(doc)
        result = scene.result(doc)
        assert result["status"] == "satisfied", (result["reason"], result["logs"])
        seen = {o["uuid"]: o["description"] for o in result["observations"]}
        # the probe itself works: it may write its own scratch folder
        assert seen.pop("write-scratch") == "allowed", seen
        allowed = sorted(name for name, what in seen.items() if what != "denied")
        assert not allowed, f"a plugin running as {RUN_AS_USER!r} could: {allowed}"
        assert len(seen) == 11, seen
        assert [p for p in evil if p.exists()] == []
        assert entry.read_bytes() == original
        assert token.read_text() == "s3cret-token\n"
        scene.assert_no_leftovers(doc)
        scene.check(hostile_runners={doc["uuid"]: runner})
    finally:
        for p in evil:
            if p.exists():
                p.unlink()


# -- plugin trust ---------------------------------------------------------------------------

def marker_plugin(marks: Path, name: str) -> str:
    """A plugin that leaves a trace if it ever runs."""
    return f"""
        #!/bin/sh
        cat >/dev/null
        touch {marks}/{name}.ran
        echo '{{"status": "satisfied", "title": "ran"}}'
        """


@pytest.mark.timeout(90)
def test_tampered_plugin_is_refused_by_its_sha256(scene, marks):
    svc = scene.svc
    entry = make_plugin(svc.plugins, "tamper", """
        #!/bin/sh
        # room for the tampered text, which must fit in the same number of bytes ...................
        # ..............................................................................................
        cat >/dev/null
        echo '{"status": "satisfied", "title": "original"}'
        """)
    original = entry.read_bytes()
    digest = hashlib.sha256(original).hexdigest()
    scene.start()
    doc = hostile_spec("tamper", interval="1s", sha256=digest)
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    first = scene.result(doc)
    assert first["status"] == "satisfied" and first["plugin"]["sha256"] == digest, first
    # rewrite it in place: same size, same owner and mode, and the old mtime put back
    tampered = f"""#!/bin/sh
cat >/dev/null; touch {marks}/tampered.ran
echo '{{"status": "satisfied", "title": "tampered"}}'
""".encode()
    tampered = tampered.ljust(len(original), b"#")
    assert len(tampered) == len(original), "the tampered text must fit in the original's size"
    st = entry.stat()
    with open(entry, "r+b") as f:
        f.write(tampered)
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert entry.stat().st_size == st.st_size and entry.stat().st_mode == st.st_mode
    seen = len(svc.results_for(doc["uuid"]))
    refused = wait_for(lambda: next((r for r in svc.results_for(doc["uuid"])[seen:] if r["status"] == "error"), None),
                       15, what="a refused run after the tampering")
    assert refused["reason"].startswith("sha256 mismatch"), refused["reason"]
    # every run after the tampering is refused, and the tampered text never ran
    later = svc.results_for(doc["uuid"])
    after = later[later.index(refused):]
    assert all(r["status"] == "error" and r["reason"].startswith("sha256 mismatch") for r in after), \
        [(r["status"], r["reason"]) for r in after]
    assert all(r["title"] != "tampered" for r in later)
    assert not (marks / "tampered.ran").exists()
    scene.check(hostile_runners={doc["uuid"]: runner})


def _chmod(path: Path, add: int) -> None:
    path.chmod(path.stat().st_mode & 0o7777 | add)


@pytest.mark.timeout(90)
def test_untrusted_plugin_files_and_folders_are_refused(scene, marks):
    svc = scene.svc
    cases = {}  # name -> (the path that is wrong, what the reason must say)
    entry = make_plugin(svc.plugins, "filewritable", marker_plugin(marks, "filewritable"))
    entry.chmod(0o777)
    cases["filewritable"] = (entry, "writable by others")
    entry = make_plugin(svc.plugins, "filegroupw", marker_plugin(marks, "filegroupw"))
    _chmod(entry, 0o020)
    cases["filegroupw"] = (entry, "writable by group")
    entry = make_plugin(svc.plugins, "versiongroupw", marker_plugin(marks, "versiongroupw"))
    _chmod(entry.parent, 0o020)
    cases["versiongroupw"] = (entry.parent, "writable by group")
    entry = make_plugin(svc.plugins, "namewritable", marker_plugin(marks, "namewritable"))
    _chmod(entry.parent.parent, 0o002)
    cases["namewritable"] = (entry.parent.parent, "writable by others")
    entry = make_plugin(svc.plugins, "manifestw", marker_plugin(marks, "manifestw"))
    _chmod(entry.parent / "plugin.toml", 0o002)
    cases["manifestw"] = (entry.parent / "plugin.toml", "writable by others")
    if IS_ROOT:
        entry = make_plugin(svc.plugins, "nobodys", marker_plugin(marks, "nobodys"))
        nobody = pwd.getpwnam(RUN_AS_USER)
        os.chown(entry, nobody.pw_uid, nobody.pw_gid)  # the run user could rewrite it
        cases["nobodys"] = (entry, "owned by")
    # a symlink to a plugin outside the plugin dir
    outside = marks.parent / "outside"
    outside.mkdir()
    target = make_plugin(outside, "linked", marker_plugin(marks, "linked"))
    entry = make_plugin(svc.plugins, "linked", "#!/bin/sh\nexit 0\n")
    entry.unlink()
    entry.symlink_to(target)
    cases["linked"] = (entry, "symlink")
    scene.start()
    docs = {name: hostile_spec(name) for name in cases}
    scene.launch(*docs.values())
    runners = {doc["uuid"]: scene.runner_pid(doc) for doc in docs.values()}
    for name, doc in docs.items():
        path, why = cases[name]
        result = scene.result(doc)
        assert result["status"] == "error", (name, result)
        assert result["reason"].startswith("untrusted plugin:"), (name, result["reason"])
        assert why in result["reason"] and str(path) in result["reason"], (name, str(path), result["reason"])
    assert sorted(p.name for p in marks.iterdir()) == [], "a refused plugin ran"
    scene.check(hostile_runners=runners)


# -- how a run ends -------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_signal_and_exit_code_reasons(scene):
    make_plugin(scene.svc.plugins, "segv", """
        #!/bin/sh
        cat >/dev/null
        echo '{"status": "satisfied"}'
        kill -SEGV $$
        """)
    make_plugin(scene.svc.plugins, "three", """
        #!/bin/sh
        cat >/dev/null
        echo '{"status": "satisfied"}'
        echo "giving up" >&2
        exit 3
        """)
    scene.start()
    segv, three = hostile_spec("segv"), hostile_spec("three")
    scene.launch(segv, three)
    runners = {doc["uuid"]: scene.runner_pid(doc) for doc in (segv, three)}
    result = scene.result(segv)
    assert result["status"] == "error" and result["reason"] == "killed by signal 11 (SIGSEGV)", result["reason"]
    result = scene.result(three)
    assert result["status"] == "error" and result["reason"] == "exit code 3", result["reason"]
    assert any("giving up" in log.get("text", "") for log in result["logs"]), result["logs"]
    scene.check(hostile_runners=runners)


@pytest.mark.timeout(90)
def test_plugin_sees_no_service_environment_no_inherited_fds_and_its_own_session(scene, monkeypatch):
    monkeypatch.setenv("AR_TEST_SECRET", "do-not-leak")  # in the service's environment, not the plugin's
    make_plugin(scene.svc.plugins, "inspect", """
        #!/bin/sh
        cat >/dev/null
        AR_PLUGIN_OWN=1; export AR_PLUGIN_OWN
        keys=$(env | cut -d= -f1 | sort | tr '\\n' ' ')
        fds=$(ls /proc/self/fd | sort -n | tr '\\n' ' ')
        sid=$(awk '{print $6}' /proc/$$/stat)
        nnp=$(awk '/^NoNewPrivs:/ {print $2}' /proc/$$/status)
        echo "{\\"status\\": \\"satisfied\\", \\"observations\\": [
          {\\"uuid\\": \\"env\\", \\"description\\": \\"$keys\\"},
          {\\"uuid\\": \\"fds\\", \\"description\\": \\"$fds\\"},
          {\\"uuid\\": \\"session\\", \\"description\\": \\"$sid $$\\"},
          {\\"uuid\\": \\"nnp\\", \\"description\\": \\"$nnp\\"}]}"
        """)
    scene.start()
    doc = hostile_spec("inspect")
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    result = scene.result(doc)
    assert result["status"] == "satisfied", (result["reason"], result["logs"])
    seen = {o["uuid"]: o["description"] for o in result["observations"]}
    keys = set(seen["env"].split())
    assert "AR_TEST_SECRET" not in keys
    assert keys - {"PWD", "SHLVL", "_", "OLDPWD", "AR_PLUGIN_OWN"} == {
        "PATH", "LANG", "HOME", "ASSESSMENT_JOB_UUID", "ASSESSMENT_RUN_UUID", "ASSESSMENT_RUNTIME_UUID"}
    # fds 0, 1, 2 of the plugin, inherited by ls, plus ls's own handle on /proc/self/fd
    assert seen["fds"].split() == ["0", "1", "2", "3"], seen["fds"]
    sid, pid = seen["session"].split()
    assert sid == pid, "the plugin is not the leader of its own session"
    assert seen["nnp"] == "1", "the plugin can gain privileges (no_new_privs is not set)"
    scene.check(hostile_runners={doc["uuid"]: runner})


STDIN_TAMPER = """
    #!/usr/bin/python3
    import json, os, sys
    raw = sys.stdin.buffer.read()
    try:
        doc = json.loads(raw)
        intact = doc["run_uuid"] == os.environ["ASSESSMENT_RUN_UUID"] and doc["job"]["uuid"] == os.environ["ASSESSMENT_JOB_UUID"]
    except Exception as e:
        intact = False
    seen = {"intact": "yes" if intact else "no: %r" % raw[:200]}
    def attempt(name, how):
        try:
            how()
            seen[name] = "allowed"
        except OSError as e:
            seen[name] = "denied"
    attempt("write-fd0", lambda: os.pwrite(0, b"garbage", 0))
    attempt("truncate-fd0", lambda: os.ftruncate(0, 1))
    attempt("chmod-fd0", lambda: os.fchmod(0, 0o666))
    attempt("reopen-for-writing", lambda: os.close(os.open("/proc/self/fd/0", os.O_WRONLY)))
    attempt("reopen-and-grow", lambda: os.close(os.open("/proc/self/fd/0", os.O_WRONLY | os.O_APPEND)))
    print(json.dumps({"status": "satisfied" if intact else "not-satisfied",
                      "observations": [{"uuid": k, "description": v} for k, v in seen.items()]}))
    """


@pytest.mark.timeout(90)
def test_a_plugin_cannot_change_what_the_next_run_reads_on_stdin(scene):
    """Runners keep one stdin file per job, rewritten before each run: each run reads its own
    document, whatever the run before tried to do to that file."""
    make_plugin(scene.svc.plugins, "tamper", STDIN_TAMPER)
    scene.start()
    doc = hostile_spec("tamper", interval="1s")
    scene.launch(doc)
    runner = scene.runner_pid(doc)
    results = [scene.result(doc, count=n) for n in (1, 2, 3)]
    for result in results:
        seen = {o["uuid"]: o["description"] for o in result["observations"]}
        assert result["status"] == "satisfied" and seen["intact"] == "yes", seen
        if IS_ROOT:  # a plugin of its own uid: nothing it tries is allowed
            assert {k: v for k, v in seen.items() if k != "intact"} == {
                "write-fd0": "denied", "truncate-fd0": "denied", "chmod-fd0": "denied",
                "reopen-for-writing": "denied", "reopen-and-grow": "denied"}, seen
    assert len({r["uuid"] for r in results}) == 3
    scene.check(hostile_runners={doc["uuid"]: runner})
