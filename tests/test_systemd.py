"""The packaged service under a real systemd (issue 15).

The .deb (`make package`) is installed with `apt-get install ./x.deb` into a Debian bookworm
root made by debootstrap (cached under build/systemd-root; see tests/systemd_container.sh),
in which systemd 252 runs as PID 1 of its own pid/mount/cgroup namespaces with the host's
cgroup v1 controllers writable. The tests run in file order on one container (module scope):
install and start, the default config, limits, reload, restart, the watchdog, SIGKILL (with
systemd's KillMode and without it), stop, the exposure score, remove and purge.

Needs root and debootstrap (skipped otherwise). Warm (cached root): about a minute. Cold: the
debootstrap and one `apt-get update` in the root (about a minute on an idle machine, three
under heavy load) and a first `make package` that fetches its build tools.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from conftest import MEMORY_HOG, REPO, wait_for

SCRIPT = REPO / "tests" / "systemd_container.sh"
CACHE = REPO / "build" / "systemd-root"
UNIT = "assessment-runtime"
DROPIN = f"/etc/systemd/system/{UNIT}.service.d"
CONF = "/etc/assessment-runtime"
STATE = "/var/lib/assessment-runtime"
SINK = f"{STATE}/results.jsonl"
PLUGINS = f"{STATE}/plugins"  # in the packaged config's plugin_dirs
EXPOSURE_MAX = 3.2  # `systemd-analyze security` of the packaged unit (README "The systemd unit")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="boots systemd in a container: needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None,
                       reason="needs debootstrap for the Debian root (apt-get install debootstrap)"),
]

# processes of the unit, from inside: (pid, start time, cgroup of each, command line)
PROCS = r"""
import json, os, sys
base = "/sys/fs/cgroup/unified/system.slice/assessment-runtime.service"  # hybrid: systemd tracks here
out = []
for dirpath, dirs, files in os.walk(base):
    try:
        pids = open(os.path.join(dirpath, "cgroup.procs")).read().split()
    except OSError:
        continue
    for pid in pids:
        try:
            start = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append([int(pid), start, dirpath[len(base):] or "/", cmd])
json.dump(out, sys.stdout)
"""
ALIVE = r"""
import json, sys
alive = []
for pid, start, cg, cmd in json.load(sys.stdin):
    try:
        if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] == start:
            alive.append([pid, cmd])
    except OSError:
        pass
json.dump(alive, sys.stdout)
"""

OK_PLUGIN = """\
#!/bin/sh
cat >/dev/null
echo '{"status": "satisfied", "title": "tick"}'
"""
FORK_BOMB = """\
#!/bin/sh
cat >/dev/null
i=0
while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done
echo '{"status": "satisfied"}'
"""
# leaves a process of its own session behind (outside the runner's process group), then hangs
DAEMONIZER = """\
#!/bin/sh
cat >/dev/null
setsid sleep 1000 </dev/null >/dev/null 2>&1 &
exec sleep 1000
"""


class Container:
    def __init__(self, root: Path, name: str):
        self.root, self.name, self.leader = root, name, 0

    def sh(self, cmd: str, timeout: float = 60, check: bool = True, input: str | None = None,
           unit: bool = False) -> subprocess.CompletedProcess:
        """Run a shell command inside (in the host's cgroup; unit=True: in a transient unit)."""
        argv = ["nsenter", "-t", str(self.leader), "-a"]
        if unit:
            argv += ["systemd-run", "--wait", "-P", "-q"]
        argv += ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "TERM=dumb",
                 "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", "/bin/sh", "-c", cmd]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"`{cmd}` exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p

    def out(self, cmd: str, **kw) -> str:
        return self.sh(cmd, **kw).stdout

    def show(self, *props: str) -> dict[str, str]:
        text = self.out(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.sh(f"mkdir -p \"$(dirname {path})\" && cat > {path} && chmod {mode:o} {path}", input=text)

    def journal(self, since: float) -> str:
        return self.out(f"journalctl -u {UNIT} --no-pager -o short-iso --since @{int(since)}")

    def procs(self) -> list:
        return json.loads(self.out("python3 -c " + shq(PROCS)))

    def alive(self, procs: list) -> list:
        return json.loads(self.out("python3 -c " + shq(ALIVE), input=json.dumps(procs)))

    def results(self) -> list[dict]:
        text = self.sh(f"cat {SINK}", check=False).stdout
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def status(self) -> dict:
        return json.loads(self.out("assessment-runtime status --json", timeout=20))

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])


def shq(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def script(*args: str, timeout: float = 600) -> str:
    p = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"systemd_container.sh {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def remove_leftovers() -> None:
    """Roots of earlier sessions whose pytest is gone (a run killed before its finalizer)."""
    if not CACHE.is_dir():
        return
    for root in CACHE.glob("run-*"):
        if not root.is_dir():
            continue
        try:
            pid = int(root.name.split("-", 1)[1])
            os.kill(pid, 0)
            continue  # a session still running
        except (ValueError, ProcessLookupError):
            pass
        subprocess.run(["bash", str(SCRIPT), "stop", str(root), f"ar-systemd-{root.name[4:]}"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def ctr(request):
    t0 = time.monotonic()
    remove_leftovers()
    build = subprocess.run(["make", "--no-print-directory", "package"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    deb = sorted((REPO / "dist").glob("assessment-runtime_*.deb"))[-1]
    TIMINGS["package"] = time.monotonic() - t0
    root = CACHE / f"run-{os.getpid()}"
    name = f"ar-systemd-{os.getpid()}"
    c = Container(root, name)

    def teardown():
        subprocess.run(["bash", str(SCRIPT), "stop", str(root), name], capture_output=True, timeout=90)
        shutil.rmtree(root, ignore_errors=True)
        for p in root.parent.glob(root.name + ".*"):
            p.unlink()

    request.addfinalizer(teardown)
    t1 = time.monotonic()
    script("rootfs", str(CACHE), str(root), timeout=900)
    TIMINGS["rootfs"] = time.monotonic() - t1
    shutil.copy(deb, root / "root" / deb.name)  # not /tmp: systemd-tmpfiles empties it at boot
    c.deb = "/root/" + deb.name
    t2 = time.monotonic()
    c.leader = int(script("boot", str(root), name, timeout=120).split()[-1])
    TIMINGS["boot"] = time.monotonic() - t2
    state = c.out("systemctl is-system-running || true").strip()
    assert state in ("running", "degraded"), state
    yield c
    print("timings:", {k: round(v, 1) for k, v in TIMINGS.items()})


def wait_active(c: Container, timeout: float = 30) -> dict:
    return wait_for(lambda: (s := c.show("ActiveState", "SubState", "MainPID", "StatusText"))["SubState"] == "running"
                    and s, timeout, 0.2, "the unit active (running)")


def results_by_job(c: Container) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in c.results():
        by.setdefault(r["job_uuid"], []).append(r)
    return by


def acknowledged(c: Container) -> set[str]:
    """Result uuids the runners have reported to the supervisor (each job's last result)."""
    return {j["last_result"]["uuid"] for j in c.status()["jobs"] if j.get("last_result")}


# ------------------------------------------------------------------------------------------
# 1. install, start, READY


@pytest.mark.timeout(300)
def test_install_creates_the_user_and_starts_the_service(ctr):
    c = ctr
    since = time.time()
    p = c.sh(f"apt-get install -y -q {c.deb}", timeout=240)
    print(p.stdout[-400:])
    assert "Setting up assessment-runtime" in p.stdout
    passwd = c.out("getent passwd assessment-runtime")
    assert "/usr/sbin/nologin" in passwd, passwd
    # the postinst enables it and starts it (as dh_installsystemd does): the packaged config
    # is complete as shipped (local folder of specs, a file sink), nothing to fill in first
    assert c.out(f"systemctl is-enabled {UNIT}").strip() == "enabled"
    s = wait_active(c, 60)
    assert s["MainPID"] != "0"
    journal = c.journal(since - 1)
    assert "Starting assessment-runtime.service" in journal, journal
    assert "Started assessment-runtime.service" in journal, journal
    # Type=notify: `systemctl start` returns once READY=1 came, which is sent after the control
    # socket listens: so `status` answers at once after a start, no retry
    c.sh(f"systemctl stop {UNIT}", timeout=120)
    since = time.time()
    c.sh(f"systemctl start {UNIT}", timeout=150)
    st = c.sh("assessment-runtime status --json", timeout=20)
    assert st.returncode == 0 and json.loads(st.stdout)["pid"] == c.main_pid()
    journal = c.journal(since - 1)
    lines = journal.splitlines()
    started = [i for i, l in enumerate(lines) if "Started assessment-runtime.service" in l]
    service_start = [i for i, l in enumerate(lines) if re.search(r"assessment-runtime \S+ started \(runtime", l)]
    publisher = [i for i, l in enumerate(lines) if "publisher started" in l]
    assert started and service_start and publisher, journal
    assert service_start[-1] < started[-1] and publisher[-1] < started[-1], journal
    show = c.show("Type", "NotifyAccess", "StatusText")
    assert show["Type"] == "notify" and show["NotifyAccess"] == "main", show
    assert re.match(r"\d+ jobs, \d+ running, outbox \d+", show["StatusText"]), show


# ------------------------------------------------------------------------------------------
# 2. the packaged default config


@pytest.mark.timeout(120)
def test_default_config_gives_results_status_and_journal(ctr):
    c = ctr
    specs = {}
    for name in c.out(f"ls {CONF}/jobs.d").split():
        doc = json.loads(c.out(f"cat {CONF}/jobs.d/{name}"))
        specs[doc["uuid"]] = doc.get("title", name)
    assert len(specs) >= 5, specs
    # a result of every packaged spec in the file sink within a minute of the start
    by = wait_for(lambda: (b := results_by_job(c)) and set(specs) <= set(b) and b, 60, 0.5,
                  "a result of every packaged spec in the file sink")
    for u, title in specs.items():
        r = by[u][0]
        print(f"{title}: {r['status']} {r.get('reason') or ''}")
        assert r["status"] in ("satisfied", "not-satisfied", "error"), r
    # status as root, from a shell in the container (the packaged config is the default)
    st = c.sh("assessment-runtime status", timeout=20)
    assert st.returncode == 0, st
    for title in specs.values():
        assert title in st.stdout, (title, st.stdout)
    # systemctl status: the STATUS= line; supervisor, zygote, publisher and runners in the cgroup
    procs = [p for p in c.procs() if p[3].startswith("assessment-runtime: ")]
    text = c.out(f"systemctl status {UNIT} --no-pager -l -n 0")
    print(text)
    assert "active (running)" in text, text
    assert re.search(r"Status: \"\d+ jobs, \d+ running, outbox \d+\"", text), text
    cmds = [p[3] for p in procs]
    for role in ("supervisor", "zygote", "publisher"):
        assert f"assessment-runtime: {role}" in cmds, cmds
    runners = [cmd for cmd in cmds if cmd.startswith("assessment-runtime: runner ")]
    assert len(runners) == len(specs), cmds
    for p in procs:  # each of them listed by systemctl status, in the unit's cgroup
        assert f"{p[0]} \"{p[3]}\"" in text, (p, text)
    # journald: the start line, and each job's status change (its first result)
    journal = c.out(f"journalctl -u {UNIT} --no-pager -o cat")
    assert re.search(r"assessment-runtime \S+ started \(runtime \S+, \d+ stored specs\)", journal), journal
    for title in specs.values():
        assert re.search(re.escape(title) + r".*(first result)", journal), (title, journal[-3000:])


# ------------------------------------------------------------------------------------------
# 4. limits in the service's delegated cgroup (cgroup v1 memory + pids here)

HOG_UUID = str(uuidlib.uuid4())
BOMB_UUID = str(uuidlib.uuid4())
TICK_UUID = str(uuidlib.uuid4())
DAEMON_UUID = str(uuidlib.uuid4())


def add_plugin(c: Container, name: str, text: str) -> None:
    folder = f"{PLUGINS}/{name}/1.0.0"
    c.write(f"{folder}/plugin.toml",
            f'name = "{name}"\nversion = "1.0.0"\nentrypoint = "{name}"\nprotocol = "assessment/1"\n')
    c.write(f"{folder}/{name}", text, 0o755)
    c.sh(f"chmod 0755 {PLUGINS} {PLUGINS}/{name} {folder}")


def add_spec(c: Container, uuid: str, plugin: str, interval: str, **extra) -> None:
    doc = {"uuid": uuid, "title": f"test {plugin}", "plugin": {"name": plugin, "version": "1.0.0"},
           "interval": interval, "run_on_start": True, **extra}
    c.write(f"{CONF}/jobs.d/test-{plugin}.json", json.dumps(doc))


@pytest.mark.timeout(120)
def test_limits_are_enforced_in_the_delegated_cgroup(ctr):
    c = ctr
    add_plugin(c, "hog", MEMORY_HOG)
    add_plugin(c, "bomb", FORK_BOMB)
    add_plugin(c, "tick", OK_PLUGIN)
    add_spec(c, HOG_UUID, "hog", "1h", limits={"memory": "64MiB"})
    add_spec(c, BOMB_UUID, "bomb", "1h", limits={"processes": 20})
    add_spec(c, TICK_UUID, "tick", "1s")  # results all the time: something to lose in a crash
    by = wait_for(lambda: (b := results_by_job(c)) and {HOG_UUID, BOMB_UUID} <= set(b) and b, 60, 0.5,
                  "results of the hog and the fork bomb")
    hog, bomb = by[HOG_UUID][0], by[BOMB_UUID][0]
    print("hog:", hog["status"], hog.get("reason"), "| bomb:", bomb["status"], bomb.get("reason"))
    assert hog["status"] == "error" and "killed: memory limit 64MiB" in hog["reason"], hog
    assert bomb["status"] == "error" and "process" in bomb["reason"], bomb
    sandbox = c.status()["sandbox"]
    assert sandbox["cgroup"] == "v1", sandbox
    # the jobs' cgroups are under the unit's own (Delegate=yes), in both v1 hierarchies
    mem = f"/sys/fs/cgroup/memory/system.slice/{UNIT}.service/jobs"
    pids = f"/sys/fs/cgroup/pids/system.slice/{UNIT}.service/jobs"
    assert int(c.out(f"cat {mem}/{HOG_UUID}/memory.limit_in_bytes")) == 64 << 20
    assert int(c.out(f"cat {pids}/{BOMB_UUID}/pids.max")) == 20
    assert c.out(f"cat {mem}/{HOG_UUID}/cgroup.procs").strip() == ""  # the hog is gone
    assert TICK_UUID in c.out(f"ls {pids}")
    journal = c.out(f"journalctl -u {UNIT} --no-pager -o cat")
    assert re.search(r'job "test hog" \(\S+\): error \(first result\): killed: memory limit 64MiB', journal), journal[-3000:]


# ------------------------------------------------------------------------------------------
# 6. reload and restart


@pytest.mark.timeout(90)
def test_reload_and_restart(ctr):
    c = ctr
    since = time.time()
    pid = c.main_pid()
    c.sh(f"systemctl reload {UNIT}", timeout=30)
    wait_for(lambda: "config reloaded from /etc/assessment-runtime/config.toml" in c.journal(since - 1), 15,
             0.3, "the reload logged")
    assert c.main_pid() == pid and c.show("SubState")["SubState"] == "running"
    old = c.procs()
    since = time.time()
    c.sh(f"systemctl restart {UNIT}", timeout=150)
    s = wait_active(c)
    assert int(s["MainPID"]) != pid
    assert c.alive(old) == []
    journal = c.journal(since - 1)
    assert "Stopping assessment-runtime.service" in journal and "Started assessment-runtime.service" in journal
    assert "stay in the outbox" not in journal, journal
    assert c.sh("assessment-runtime status", timeout=20).returncode == 0


# ------------------------------------------------------------------------------------------
# 3. watchdog and crash: nothing acknowledged is lost, nothing of the old instance is left


def dropin(c: Container, text: str) -> None:
    c.write(f"{DROPIN}/test.conf", "[Service]\n" + textwrap.dedent(text))
    c.sh("systemctl daemon-reload")


def crash_and_recover(c: Container, sig: str, result: str) -> tuple[str, list, list]:
    wait_active(c)
    pid, n = c.main_pid(), int(c.show("NRestarts")["NRestarts"])
    wait_for(lambda: len(results_by_job(c).get(TICK_UUID, [])) >= 2, 20, 0.3, "tick results")
    since = time.time()
    old = c.procs()
    acked = acknowledged(c)
    c.sh(f"kill -{sig} {pid}")
    wait_for(lambda: int(c.show("NRestarts")["NRestarts"]) > n, 60, 0.3, f"a restart after SIG{sig}")
    s = wait_active(c, 60)
    assert int(s["MainPID"]) != pid
    wait_for(lambda: c.sh("assessment-runtime status --json", check=False).returncode == 0, 30, 0.3,
             "the new instance answering")
    left = wait_for(lambda: (a := c.alive(old)) == [] or None, 20, 0.3, "no process of the old instance")
    assert left is True or left == []
    # every result the old instance had acknowledged is in the sink (at least once)
    sink = wait_for(lambda: acked <= (u := {r["uuid"] for r in c.results()}) and u, 20, 0.3,
                    "the acknowledged results in the sink")
    assert acked <= sink
    # and results keep coming from the new instance
    count = len(results_by_job(c)[TICK_UUID])
    wait_for(lambda: len(results_by_job(c)[TICK_UUID]) > count, 20, 0.3, "new results after recovery")
    journal = c.journal(since - 1)
    assert f"Failed with result '{result}'" in journal, journal
    return journal, old, sorted(acked)


@pytest.mark.timeout(120)
def test_watchdog_kills_and_restarts_a_stopped_supervisor(ctr):
    c = ctr
    dropin(c, """\
        WatchdogSec=5s
        RestartSec=1s
        """)
    c.sh(f"systemctl restart {UNIT}", timeout=150)
    assert c.show("WatchdogUSec")["WatchdogUSec"] == "5s"
    journal, old, acked = crash_and_recover(c, "STOP", "watchdog")
    print("\n".join(l for l in journal.splitlines() if "systemd[" in l))
    assert "Watchdog timeout (limit 5s)!" in journal, journal


@pytest.mark.timeout(120)
def test_sigkill_of_the_supervisor_restarts_it(ctr):
    c = ctr
    journal, old, acked = crash_and_recover(c, "KILL", "signal")
    print("\n".join(l for l in journal.splitlines() if "systemd[" in l))
    assert "Main process exited, code=killed, status=9/KILL" in journal, journal


def kill_without_systemd(c: Container, who: str) -> tuple[list, list, str]:
    """SIGKILL `who` ("main": the supervisor; "all": every process of the service but the
    plugins) under KillMode=process; wait for the restart. (the plugin's two sleeps as they were
    before, what of the old instance was alive before the restart, the journal)"""

    def daemon_sleepers():
        return sorted(p for p in c.procs() if p[3] == "sleep 1000" and DAEMON_UUID in p[2])

    wait_active(c)
    sleepers = wait_for(lambda: len(s := daemon_sleepers()) == 2 and s, 30, 0.3,
                        "the plugin and its daemon in the job cgroup")
    pid, n = c.main_pid(), int(c.show("NRestarts")["NRestarts"])
    old = c.procs()
    acked = acknowledged(c)
    since = time.time()
    if who == "main":
        c.sh(f"kill -KILL {pid}")
    else:  # as the kernel's OOM killer or an admin's kill -9 might: no process of ours can clean up
        ours = " ".join(str(p[0]) for p in old if p[3].startswith("assessment-runtime: "))
        c.sh(f"kill -STOP {ours}; kill -KILL {ours}", check=False)  # stopped first: none reacts
    time.sleep(1.5)  # RestartSec=4s
    assert c.show("SubState")["SubState"] == "auto-restart", c.show("SubState")
    between = c.alive(old)
    print(f"SIGKILL to {who}: left by the old instance before the restart: {between}")
    wait_for(lambda: int(c.show("NRestarts")["NRestarts"]) > n, 30, 0.3, "the restart")
    wait_active(c, 60)
    wait_for(lambda: c.alive(old) == [], 30, 0.3, "no process of the old instance")
    assert acked <= wait_for(lambda: acked <= (u := {r["uuid"] for r in c.results()}) and u, 20, 0.3,
                             "the acknowledged results in the sink")
    journal = c.journal(since - 1)
    print("\n".join(l for l in journal.splitlines() if "systemd[" in l or "earlier instance" in l))
    return sleepers, between, journal


@pytest.mark.timeout(180)
def test_without_systemds_kill_the_new_instance_removes_the_old_processes(ctr):
    """KillMode=process: systemd kills only the (already dead) main process and leaves the rest.
    1. SIGKILL to the supervisor: the old zygote, publisher and runners leave by themselves (EOF
       on the supervisor's socket, PR_SET_PDEATHSIG) and take their plugins along (a runner that
       sees the EOF kills its job's cgroup; one killed first leaves that to the next instance).
    2. SIGKILL to all of them at once: nothing of the old instance can clean up, and what the
       plugin left in its job's cgroup is killed by the new instance at start (remove_stale)."""
    c = ctr
    add_plugin(c, "daemonizer", DAEMONIZER)
    add_spec(c, DAEMON_UUID, "daemonizer", "1h", timeout="30m")
    dropin(c, """\
        WatchdogSec=5s
        RestartSec=4s
        KillMode=process
        """)
    c.sh(f"systemctl restart {UNIT}", timeout=150)
    sleepers, between, journal = kill_without_systemd(c, "main")
    assert "Main process exited, code=killed, status=9/KILL" in journal, journal
    assert all(p[1].startswith("sleep") for p in between), between  # only ever a plugin's processes

    sleepers, between, journal = kill_without_systemd(c, "all")
    # the plugin's daemon (its own session) outlived the old instance; systemd saw it, left it
    assert sleepers[1][0] in [p[0] for p in between], (between, sleepers)
    found = journal.find(f"Found left-over process {sleepers[1][0]} (sleep)")
    assert found >= 0, journal
    # and the new instance's own cleanup at start killed it (supervisor/cgroups.py remove_stale)
    assert re.search(rf"killed [12] processes left in \S+/jobs/{DAEMON_UUID} by an earlier instance",
                     journal[found:]), journal
    c.sh(f"rm -f {CONF}/jobs.d/test-daemonizer.json")
    dropin(c, """\
        WatchdogSec=5s
        RestartSec=1s
        """)


# ------------------------------------------------------------------------------------------
# 5. stop


@pytest.mark.timeout(150)
def test_stop_is_clean_and_flushes_the_outbox(ctr):
    c = ctr
    wait_active(c)
    acked = acknowledged(c)
    since = time.time()
    t = time.monotonic()
    c.sh(f"systemctl stop {UNIT}", timeout=120)
    took = time.monotonic() - t
    show = c.show("ActiveState", "ExecMainStatus", "Result", "ExecMainCode")
    print(f"stop took {took:.1f}s: {show}")
    assert show["ActiveState"] == "inactive" and show["ExecMainStatus"] == "0" and show["Result"] == "success", show
    assert took < 30, took  # stop_grace 5 s + drain: well within TimeoutStopSec=90s
    journal = c.journal(since - 1)
    assert "stopped" in journal and "Deactivated successfully" in journal, journal
    assert "stay in the outbox" not in journal and "SIGKILL" not in journal, journal
    assert acked <= {r["uuid"] for r in c.results()}
    # the jobs' cgroups went with it
    for ctl in ("memory", "pids"):
        assert c.sh(f"test -e /sys/fs/cgroup/{ctl}/system.slice/{UNIT}.service/jobs", check=False).returncode != 0
    # what it left in the outbox: nothing (the next start says so)
    since = time.time()
    c.sh(f"systemctl start {UNIT}", timeout=150)
    assert re.search(r"publisher started: outbox \S+ with 0 results pending", c.journal(since - 1))


# ------------------------------------------------------------------------------------------
# 7. hardening


def test_exposure_score(ctr):
    c = ctr
    text = c.out(f"systemd-analyze security {UNIT} --no-pager", check=False)
    m = re.search(r"Overall exposure level for assessment-runtime.service: (\d+\.\d+)", text)
    assert m, text
    print(m.group(0))
    assert float(m.group(1)) <= EXPOSURE_MAX, text
    # the unit that all the above ran under is the packaged one, byte for byte, and the .rpm has it too
    unit = (REPO / "packaging/systemd/assessment-runtime.service").read_bytes()
    assert (c.root / "lib/systemd/system/assessment-runtime.service").read_bytes() == unit
    rpm = sorted((REPO / "dist").glob("assessment-runtime-*.rpm"))[-1]
    if shutil.which("rpm2cpio") and shutil.which("cpio"):
        p = subprocess.run(f"rpm2cpio {rpm} | cpio -i --quiet --to-stdout ./usr/lib/systemd/system/{UNIT}.service",
                           shell=True, capture_output=True, timeout=60)
        assert p.returncode == 0 and p.stdout == unit, p.stderr


# ------------------------------------------------------------------------------------------
# 8. remove and purge


@pytest.mark.timeout(180)
def test_remove_keeps_config_and_state_purge_removes_them(ctr):
    c = ctr
    wait_active(c)
    c.sh(f"rm -rf {DROPIN} && systemctl daemon-reload")
    c.sh(f"apt-get remove -y -q {UNIT}", timeout=120)
    assert c.sh(f"systemctl is-active {UNIT}", check=False).stdout.strip() == "inactive"
    assert c.show("Result")["Result"] == "success"
    assert c.sh(f"test -f {CONF}/config.toml && test -f {SINK} && test -d {STATE}").returncode == 0
    assert c.sh("test -e /opt/assessment-runtime/venv/bin/python3", check=False).returncode != 0
    assert not c.procs()
    c.sh(f"apt-get purge -y -q {UNIT}", timeout=120)
    for path in (CONF, STATE, "/opt/assessment-runtime", "/run/assessment-runtime"):
        assert c.sh(f"test -e {path}", check=False).returncode != 0, path
    # the system user stays (Debian practice: files it owned may remain elsewhere)
    assert c.sh("getent passwd assessment-runtime").returncode == 0
    assert c.out(f"dpkg-query -W -f='${{Status}}' {UNIT} || true").strip() in ("", "unknown ok not-installed")
