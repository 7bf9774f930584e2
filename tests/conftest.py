"""Shared test fixtures: a real service started through its CLI, real plugin executables.

Plugins must be reachable by the unprivileged run_as_user when the tests run as root, so
the test area lives in a world-traversable folder under /tmp rather than pytest's 0700 one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
RUN_AS_USER = "nobody"
MARK_FOLDERS = ("marks", "args", "dump")  # where tests' plugins leave marks (see grant_marks)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


# A plugin that maps and touches 200 MiB (tests of memory limits)
MEMORY_HOG = """\
#!/usr/bin/python3
import mmap, sys
sys.stdin.read()
chunks = []
for i in range(200):  # 200 MiB in 1 MiB maps, each page touched
    m = mmap.mmap(-1, 1 << 20)
    for off in range(0, 1 << 20, 4096):
        m[off] = 1
    chunks.append(m)
print('{"status": "satisfied"}')
"""


def make_plugin(plugin_dir: Path, name: str, script: str, version: str = "1.0.0",
                protocol: str = "assessment/1") -> Path:
    folder = plugin_dir / name / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nentrypoint = "{name}"\nprotocol = "{protocol}"\n')
    entry = folder / name
    entry.write_text(textwrap.dedent(script).lstrip())
    entry.chmod(0o755)
    for p in (folder, folder.parent, plugin_dir):
        p.chmod(0o755)
    return entry


OK_PLUGIN = """
#!/bin/sh
cat >/dev/null
echo '{"status": "satisfied", "title": "all good", "observations": [{"uuid": "o1", "description": "fine"}]}'
"""
NOT_OK_PLUGIN = """
#!/bin/sh
cat >/dev/null
echo '{"status": "not-satisfied", "findings": [{"uuid": "f1", "title": "bad"}]}'
"""
FAILING_PLUGIN = """
#!/bin/sh
echo "something broke" >&2
exit 3
"""
HANGING_PLUGIN = """
#!/bin/sh
sleep 60
"""
GARBAGE_PLUGIN = """
#!/bin/sh
echo 'this is not json'
"""
BAD_STATUS_PLUGIN = """
#!/bin/sh
echo '{"status": "maybe"}'
"""


def spec(uuid: str | None = None, plugin: str = "ok", interval: str = "1h", **extra) -> dict:
    doc = {"uuid": uuid or str(uuidlib.uuid4()), "plugin": {"name": plugin, "version": "1.0.0"},
           "interval": interval, "run_on_start": True}
    doc.update(extra)
    return doc


def remove_service_cgroups(state: Path) -> None:
    """The v1 cgroup folders a killed service leaves (one that stops cleanly removes its own):
    without this, every test that kills one would leave `assessment-runtime-<uuid>` folders
    behind, thousands of them over a few runs of the suite."""
    from supervisor.cgroups import WANTED_V1, _own_v1_cgroups, _v1_mounts
    try:
        instance = (state / "runtime_uuid").read_text().strip()
    except OSError:
        return
    mounts, own = _v1_mounts(), _own_v1_cgroups()
    for controller in WANTED_V1:
        if controller in mounts and controller in own:
            mount, root = mounts[controller]
            path = own[controller].removeprefix(root) if root != "/" else own[controller]
            parent = os.path.join(mount, path.lstrip("/"), f"assessment-runtime-{instance}")
            for folder, _, _ in sorted(os.walk(parent), key=lambda w: -len(w[0])):  # deepest first
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # still in use (not ours to force): left, as before


class RunningService:
    """The real service, started as `python -m supervisor run --config F`."""

    def __init__(self, root: Path, extra_config: str = "", sink_file: bool = True, folder: bool = True):
        self.root = root
        self.state = root / "state"
        self.jobs = root / "jobs.d"
        self.plugins = root / "plugins"
        self.results_file = self.state / "results.jsonl"
        self.config = root / "config.toml"
        self.log = root / "service.log"
        self.jobs.mkdir(exist_ok=True)
        self.plugins.mkdir(exist_ok=True)
        self.plugins.chmod(0o755)
        text = textwrap.dedent(f"""
            state_dir = "{self.state}"
            run_dir = "{root / 'run'}"
            plugin_dirs = ["{self.plugins}"]
            log_level = "debug"
            """)
        if folder:  # folder=False: no [specs] source (extra_config then sets [configuration])
            text += f'[specs]\ndir = "{self.jobs}"\n'
        text += textwrap.dedent(f"""
            [jobs]
            resync_interval = "2s"
            default_timeout = "10s"
            stop_grace = "1s"
            run_as_user = "{RUN_AS_USER}"
            """)
        if sink_file:
            text += f'[[publisher.sink]]\nname = "archive"\nkind = "file"\npath = "{self.results_file}"\n'
        self.config_text = text + textwrap.dedent(extra_config)
        self.config.write_text(self.config_text)
        self.proc: subprocess.Popen | None = None
        self._all_pids: set[int] = set()

    # -- processes -----------------------------------------------------------------------

    def start(self, env: dict[str, str | None] | None = None, prefix: list[str] = ()) -> "RunningService":
        """Start the service; `env` adds to (or, with None values, removes from) our environment;
        `prefix`: a command that execs the rest (setpriv, say)."""
        self.grant_marks()
        self._logf = open(self.log, "ab")
        child_env = None
        if env is not None:
            child_env = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
            for k in [k for k, v in env.items() if v is None]:
                child_env.pop(k, None)
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "supervisor", "run", "--config", str(self.config)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO, env=child_env)
        wait_for(lambda: self.proc.poll() is not None or self.try_status() is not None, 20,
                 what="the control socket")
        assert self.proc.poll() is None, f"service exited early:\n{self.log_text()}"
        return self

    def grant_marks(self) -> None:
        """Tests' plugins leave marks in the test area's `marks`, `args` or `dump` folder,
        outside their scratch folders: those that exist, every plugin in the plugins folder may
        write (as an operator grants paths with jobs.plugin_write_paths); nothing else is granted."""
        folders = [str(self.root.parent / f) for f in MARK_FOLDERS if (self.root.parent / f).is_dir()]
        names = sorted(p.name for p in self.plugins.iterdir() if p.is_dir()) if folders else []
        if not names or "plugin_write_paths" in self.config_text:
            return
        paths = ", ".join(f'"{f}"' for f in folders)
        table = "\n[jobs.plugin_write_paths]\n" + "".join(f'"{n}" = [{paths}]\n' for n in names)
        self.config.write_text(self.config_text + table)

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def try_status(self) -> dict | None:
        r = self.cli("status", "--json")
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self) -> dict:
        r = self.cli("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def job(self, uuid: str) -> dict | None:
        for j in self.status()["jobs"]:
            if j["uuid"] == uuid:
                return j
        return None

    def descendants(self) -> list[psutil.Process]:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self._all_pids.update(p.pid for p in procs)
        return procs

    def stop(self, timeout: float = 30) -> int:
        self.descendants()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill_all(self, keep_cgroups: bool = False) -> None:
        """Teardown: nothing of ours may outlive the test (`keep_cgroups`: but the cgroup
        folders the killed service leaves, for a test of what the next start does with them)."""
        procs = self.descendants() if self.proc else []
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self._all_pids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)
        if getattr(self, "_logf", None):
            self._logf.close()
        if not keep_cgroups:
            remove_service_cgroups(self.state)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- specs and results ---------------------------------------------------------------

    def write_spec(self, name: str, doc) -> Path:
        path = self.jobs / name
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.rename(path)
        return path

    def results(self) -> list[dict]:
        try:
            text = self.results_file.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def results_for(self, uuid: str) -> list[dict]:
        return [r for r in self.results() if r["job_uuid"] == uuid]

    def wait_result(self, uuid: str, count: int = 1, timeout: float = 20) -> list[dict]:
        return wait_for(lambda: (lambda rs: rs if len(rs) >= count else None)(self.results_for(uuid)),
                        timeout, what=f"{count} result(s) of job {uuid}")


def make_tls_files(d: Path) -> Path:
    """In `d`: a CA (ca.pem), a server certificate for 127.0.0.1 signed by it (server.pem,
    server.key), and another CA (other.pem), made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=assessment-runtime test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName = IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days", "2",
        "-subj", "/CN=some other CA")
    for p in d.iterdir():  # keys private, as an operator keeps them
        p.chmod(0o600 if p.suffix == ".key" else 0o644)
    return d


def control_status(svc: RunningService) -> dict:
    """GET /status on the control socket (quicker than the CLI, for polling)."""
    from supervisor.control import request
    code, body = request(str(svc.root / "run" / "control.sock"), "GET", "/status")
    assert code == 200
    return json.loads(body)


def sink_status(svc: RunningService, name: str) -> dict:
    [sink] = [s for s in control_status(svc)["publisher"]["sinks"] if s["name"] == name]
    return sink


@pytest.fixture
def area():
    """A world-traversable scratch folder (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="ar-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service_factory(area):
    made: list[RunningService] = []

    def make(extra_config: str = "", name: str = "svc", **kw) -> RunningService:
        root = area / name
        root.mkdir()
        root.chmod(0o755)
        svc = RunningService(root, extra_config, **kw)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.kill_all()
