"""Isolation through the real service (SPEC §6): a uid of its own per job, Landlock
confinement, capabilities granted by the local config, and the v1 memory and pids cgroups
this machine has. Plugins are real executables (a Python probe, sh scripts)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import IS_ROOT, MEMORY_HOG, REPO, make_plugin, spec, wait_for
from runner import landlock

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="isolation needs root")

UID_RANGE = (61184, 65519)

# Reports what its sandbox lets it do, as observations {"title": check, "description": outcome}.
PROBE = f"""
#!/usr/bin/python3
import json, os, socket, sys
job = json.load(sys.stdin)
cfg = job["config"]
out = {{}}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = "ok" if r is None else "ok: " + str(r)
    except OSError as e:
        out[name] = "denied: " + (e.strerror or str(e))
out["uid"] = str(os.getuid()); out["gid"] = str(os.getgid()); out["groups"] = " ".join(map(str, os.getgroups()))
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith(("CapEff", "CapAmb", "CapBnd")):
            k, v = line.split(":"); out[k] = v.strip()
out["cwd"] = os.getcwd()
if os.path.exists("/proc/self/ksm_stat"):
    with open("/proc/self/ksm_stat") as f:
        out["ksm_merge_any"] = dict(line.split(": ") for line in f.read().splitlines() if ": " in line)["ksm_merge_any"]
attempt("read_passwd", lambda: open("/etc/passwd").read(10) and None)
def create(folder):
    p = os.path.join(folder, "probe-" + str(os.getpid()))
    with open(p, "w") as f: f.write("x")
    os.unlink(p)
attempt("write_scratch", lambda: create(os.getcwd()))
for folder in cfg.get("write", []):
    attempt("write " + folder, lambda folder=folder: create(folder))
for folder in cfg.get("list", []):
    attempt("list " + folder, lambda folder=folder: os.listdir(folder) and None)
for path in cfg.get("read", []):
    attempt("read " + path, lambda path=path: open(path).read(1) and None)
attempt("write_devnull", lambda: open("/dev/null", "w").write("x") and None)
if "connect" in cfg:
    attempt("connect", lambda: socket.create_connection(("127.0.0.1", cfg["connect"]), timeout=2).close())
for pid in cfg.get("signal", []):
    attempt("signal " + str(pid), lambda pid=pid: os.kill(pid, 0))
print(json.dumps({{"status": "satisfied", "observations": [{{"title": k, "description": v}} for k, v in out.items()]}}))
"""


def observations(result: dict) -> dict[str, str]:
    return {o["title"]: o["description"] for o in result.get("observations", [])}


def probe_service(service_factory, extra: str = "", **jobs_config) -> "RunningService":  # noqa: F821
    svc = service_factory(extra)
    make_plugin(svc.plugins, "probe", PROBE)
    return svc


def last_probe(svc, uuid: str, after: int = 0) -> dict[str, str]:
    results = svc.wait_result(uuid, after + 1, timeout=30)
    result = results[-1]
    assert result["status"] == "satisfied", result
    return observations(result)


@pytest.mark.timeout(90)
def test_each_job_runs_as_its_own_uid_and_cannot_reach_another_jobs_scratch(service_factory):
    svc = probe_service(service_factory)
    a, b = spec(plugin="probe", interval="1s"), spec(plugin="probe", interval="1s")
    scratch = svc.state / "scratch"
    a["config"] = {"list": [str(scratch / b["uuid"])], "write": [str(scratch / b["uuid"])],
                   "read": [str(scratch / b["uuid"] / "secret")]}
    svc.write_spec("a.json", a)
    svc.write_spec("b.json", b)
    svc.start()
    seen_b = last_probe(svc, b["uuid"])
    # b leaves a file in its scratch; a then tries to list, read and write there
    (scratch / b["uuid"] / "secret").write_text("b's")
    os.chown(scratch / b["uuid"] / "secret", int(seen_b["uid"]), int(seen_b["gid"]))
    n = len(svc.results_for(a["uuid"]))
    seen_a = last_probe(svc, a["uuid"], after=n)
    uids = {int(seen_a["uid"]), int(seen_b["uid"])}
    assert len(uids) == 2, (seen_a, seen_b)
    for uid, seen in ((int(seen_a["uid"]), seen_a), (int(seen_b["uid"]), seen_b)):
        assert UID_RANGE[0] <= uid <= UID_RANGE[1]
        assert seen["gid"] == str(uid) and seen["groups"] == "", seen  # no supplementary groups
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)
        with pytest.raises(KeyError):
            grp.getgrgid(uid)
    for key in ("list", "write", "read"):
        [outcome] = [v for k, v in seen_a.items() if k.startswith(key + " ")]
        assert outcome.startswith("denied"), (key, outcome)
    for job, seen in ((a, seen_a), (b, seen_b)):
        folder = scratch / job["uuid"]
        st = folder.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (int(seen["uid"]), 0o700)
        assert seen["cwd"] == str(folder)
    status = {j["uuid"]: j for j in svc.status()["jobs"]}
    assert status[a["uuid"]]["uid"] == int(seen_a["uid"]) and status[b["uuid"]]["uid"] == int(seen_b["uid"])
    # runners offer their pages to KSM when the host runs it (the zygote's prctl, inherited);
    # plugins never do
    if "ksm_merge_any" in seen_a:
        runner = status[a["uuid"]]["pid"]
        offered = "ksm_merge_any: yes" in open(f"/proc/{runner}/ksm_stat").read()
        assert offered == (open("/sys/kernel/mm/ksm/run").read().strip() == "1")
        assert seen_a["ksm_merge_any"] == seen_b["ksm_merge_any"] == "no", (seen_a, seen_b)
    assert svc.status()["sandbox"]["user_per_job"] is True

    # stable across a restart; released, with the scratch folder, when the job is deleted
    svc.stop()
    svc.start()
    n = len(svc.results_for(a["uuid"]))
    assert last_probe(svc, a["uuid"], after=n)["uid"] == seen_a["uid"]
    (svc.jobs / "b.json").unlink()
    wait_for(lambda: not (scratch / b["uuid"]).exists(), 20, what="b's scratch folder removed")
    stored = json.loads((svc.state / "identities.json").read_text())
    assert b["uuid"] not in stored and stored[a["uuid"]] == int(seen_a["uid"])


class Listener:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


@pytest.mark.timeout(90)
def test_a_confined_plugin_reads_but_writes_only_its_scratch_and_reaches_nothing(service_factory):
    abi = landlock.abi()
    if abi == 0:
        pytest.skip("this kernel has no Landlock")
    listener = Listener()
    svc = probe_service(service_factory)
    make_plugin(svc.plugins, "netprobe", PROBE)
    (svc.plugins / "netprobe" / "1.0.0" / "plugin.toml").write_text(
        'name = "netprobe"\nversion = "1.0.0"\nentrypoint = "netprobe"\nprotocol = "assessment/1"\nnetwork = true\n')
    svc.start()
    targets = {"write": ["/tmp", "/var/tmp", str(svc.state), str(svc.state / "scratch")],
               "connect": listener.port, "signal": [svc.proc.pid]}
    job = spec(plugin="probe", config=targets)
    net = spec(plugin="netprobe", config=targets)
    svc.write_spec("probe.json", job)
    svc.write_spec("net.json", net)
    seen = last_probe(svc, job["uuid"])
    runner = svc.job(job["uuid"])["pid"]
    assert seen["read_passwd"] == "ok" and seen["write_scratch"] == "ok" and seen["write_devnull"].startswith("ok")
    for folder in targets["write"]:
        assert seen[f"write {folder}"].startswith("denied"), (folder, seen)
    if abi >= 4:
        assert seen["connect"].startswith("denied"), seen
        seen_net = last_probe(svc, net["uuid"])
        assert seen_net["connect"] == "ok", seen_net
        assert listener.accepted >= 1
    if abi >= 6:
        assert seen[f"signal {svc.proc.pid}"].startswith("denied"), seen
        # and its own runner: a job whose config names it
        job2 = spec(plugin="probe", config={"signal": [runner]})
        svc.write_spec("probe2.json", job2)
        assert last_probe(svc, job2["uuid"])[f"signal {runner}"].startswith("denied")
    sandbox = svc.status()["sandbox"]
    assert sandbox["landlock_abi"] == abi and sandbox["confine"]["filesystem"] is True
    out = svc.cli("plugins")
    assert out.returncode == 0
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("netprobe")][0]
    assert " yes " in line


@pytest.mark.timeout(60)
def test_a_granted_capability_reads_the_shadow_file_and_still_writes_nothing(service_factory):
    if landlock.abi() == 0:
        pytest.skip("this kernel has no Landlock")
    svc = service_factory('[jobs.plugin_capabilities]\nreader = ["CAP_DAC_READ_SEARCH"]\n')
    make_plugin(svc.plugins, "reader", PROBE)
    make_plugin(svc.plugins, "probe", PROBE)
    svc.start()
    targets = {"read": ["/etc/shadow"], "write": ["/etc"]}
    granted, plain = spec(plugin="reader", config=targets), spec(plugin="probe", config=targets)
    svc.write_spec("granted.json", granted)
    svc.write_spec("plain.json", plain)
    seen, seen_plain = last_probe(svc, granted["uuid"]), last_probe(svc, plain["uuid"])
    assert seen["read /etc/shadow"] == "ok", seen
    assert seen["write /etc"].startswith("denied"), seen
    assert int(seen["CapEff"], 16) == int(seen["CapAmb"], 16) == 1 << 2, seen
    assert int(seen["CapBnd"], 16) == 1 << 2, seen
    assert seen_plain["read /etc/shadow"].startswith("denied"), seen_plain
    assert int(seen_plain["CapEff"], 16) == 0 and int(seen_plain["CapAmb"], 16) == 0


def v1_available() -> bool:
    from supervisor.cgroups import _v1_mounts
    return {"memory", "pids"} <= set(_v1_mounts())


def our_v1_cgroups(svc) -> list[str]:
    sandbox = svc.status()["sandbox"]
    return sandbox["cgroup_path"] or []


def subfolders(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))


FORK_BOMB = """
#!/bin/sh
cat >/dev/null
i=0
while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done
echo '{"status": "satisfied"}'
"""

CANARY = """
#!/bin/sh
cat >/dev/null
as=$(grep 'Max address space' /proc/self/limits | tr -s ' ')
echo "{\\"status\\": \\"satisfied\\", \\"observations\\": [{\\"description\\": \\"$as\\"}]}"
"""


@pytest.mark.timeout(120)
def test_cgroup_v1_enforces_memory_and_processes_and_leaves_nothing_behind(service_factory):
    if not v1_available():
        pytest.skip("no cgroup v1 memory and pids hierarchies")
    svc = service_factory()
    make_plugin(svc.plugins, "hog", MEMORY_HOG)
    make_plugin(svc.plugins, "bomb", FORK_BOMB)
    make_plugin(svc.plugins, "canary", CANARY)
    hog = spec(plugin="hog", interval="5s", limits={"memory": "64MiB"})
    bomb = spec(plugin="bomb", interval="5s", limits={"processes": 20})
    canary = spec(plugin="canary", interval="1s", limits={"memory": "64MiB"})
    for name, doc in (("hog.json", hog), ("bomb.json", bomb), ("canary.json", canary)):
        svc.write_spec(name, doc)
    started = time.monotonic()
    svc.start()
    assert svc.status()["sandbox"]["cgroup"] == "v1"
    hog_result = svc.wait_result(hog["uuid"], timeout=40)[0]
    assert hog_result["status"] == "error" and "memory limit 64MiB" in hog_result["reason"], hog_result
    bomb_result = svc.wait_result(bomb["uuid"], timeout=40)[0]
    assert bomb_result["status"] == "error" and "process" in bomb_result["reason"], bomb_result
    # the cgroup holds memory: no address-space rlimit (Go and Java reserve far more than they use)
    assert "unlimited unlimited" in svc.results_for(canary["uuid"])[0]["observations"][0]["description"]
    # the canary kept its schedule throughout: about one run a second
    elapsed = time.monotonic() - started
    runs = len(svc.results_for(canary["uuid"]))
    assert runs >= elapsed * 0.6, (runs, elapsed)
    folders = our_v1_cgroups(svc)
    assert folders and all(os.path.isdir(f) for f in folders)
    for f in folders:
        assert os.path.isdir(os.path.join(f, hog["uuid"]))
    with open(os.path.join([f for f in folders if "/memory/" in f][0], hog["uuid"], "memory.limit_in_bytes")) as f:
        assert int(f.read()) == 64 << 20
    # SIGKILL of the whole service leaves cgroups; the next start removes them
    svc.kill_all(keep_cgroups=True)
    svc.proc = None
    leftovers = [os.path.join(f, name) for f in folders for name in subfolders(f)]
    assert len(leftovers) == 6, leftovers  # 3 jobs x (memory, pids)
    svc.start()
    (svc.jobs / "hog.json").unlink()
    (svc.jobs / "bomb.json").unlink()
    wait_for(lambda: not any(os.path.exists(os.path.join(f, hog["uuid"])) for f in folders), 20,
             what="the deleted job's cgroups removed")
    svc.stop()
    assert not any(os.path.exists(p) for p in leftovers if not p.endswith(canary["uuid"])), leftovers
    for f in folders:
        assert not os.path.exists(f) or subfolders(f) == [], f  # nothing after stop


@pytest.mark.timeout(30)
def test_run_refuses_a_capability_grant_outside_its_bounding_set(service_factory):
    svc = service_factory('[jobs.plugin_capabilities]\npinger = ["CAP_NET_RAW"]\n')
    run = subprocess.run(["setpriv", "--bounding-set", "-net_raw", sys.executable, "-m", "supervisor", "run",
                          "--config", str(svc.config)], capture_output=True, text=True, timeout=20,
                         cwd=REPO)
    assert run.returncode == 78, (run.returncode, run.stderr)
    assert "jobs.plugin_capabilities.pinger[0]" in run.stderr and "CAP_NET_RAW" in run.stderr, run.stderr
