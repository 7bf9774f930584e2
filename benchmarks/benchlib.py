"""Shared pieces of the benchmarks: a real service started through its CLI, plugins, the
results file, CPU/memory sampling of the service's process tree, bounded waits.

Mirrors tests/conftest.py: plugins and state live in a world-traversable folder under /tmp
(mode 0755) so that `run_as_user = "nobody"` can reach them when we run as root.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from pathlib import Path

import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
RUN_AS_USER = "nobody"
PYTHON = sys.executable

SH_PLUGIN = """\
#!/bin/sh
cat >/dev/null
echo '{"status":"satisfied"}'
"""

C_PLUGIN_SOURCE = r"""
#include <unistd.h>
int main(void) {
    static const char out[] = "{\"status\":\"satisfied\"}\n";
    char buf[4096];
    while (read(0, buf, sizeof buf) > 0) {}
    return write(1, out, sizeof out - 1) == (ssize_t)(sizeof out - 1) ? 0 : 1;
}
"""


class BenchError(Exception):
    """A benchmark could not be carried out (the service did not start, a wait timed out)."""


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy and return it; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what} (last value: {last!r:.200})")
        time.sleep(interval)


def median(values):
    return statistics.median(values) if values else None


# -- scratch area and plugins ---------------------------------------------------------------

class Area:
    """A world-traversable scratch folder under /tmp, removed on close."""

    def __init__(self, prefix: str = "ar-bench-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.path.chmod(0o755)

    def sub(self, name: str) -> Path:
        p = self.path / name
        p.mkdir()
        p.chmod(0o755)
        return p

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "Area":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def install_plugin(plugin_dir: Path, name: str, *, script: str | None = None, binary: Path | None = None,
                   version: str = "1.0.0") -> Path:
    """{plugin_dir}/{name}/{version}/{name} plus plugin.toml, every level 0755 and ours."""
    folder = plugin_dir / name / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nentrypoint = "{name}"\nprotocol = "assessment/1"\n')
    (folder / "plugin.toml").chmod(0o644)
    entry = folder / name
    if script is not None:
        entry.write_text(script)
    else:
        shutil.copyfile(binary, entry)
    entry.chmod(0o755)
    for p in (folder, folder.parent, plugin_dir):
        p.chmod(0o755)
    return entry


def compile_c_plugin(out_dir: Path) -> tuple[Path | None, str]:
    """Compile the trivial C plugin (static if the toolchain can, else dynamic).
    Returns (path or None, a note saying how it was built or why not)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) on PATH"
    src = out_dir / "trivial.c"
    src.write_text(C_PLUGIN_SOURCE)
    exe = out_dir / "trivial"
    for flags, how in ((["-O2", "-static"], "static"), (["-O2"], "dynamic")):
        r = subprocess.run([cc, *flags, "-o", str(exe), str(src)], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return exe, f"{os.path.basename(cc)} {' '.join(flags)} ({how})"
    return None, f"cc failed: {r.stderr.strip()[:300]}"


def job_spec(uuid: str | None = None, plugin: str = "trivial", interval: str = "1s", **extra) -> dict:
    doc = {"uuid": uuid or str(uuidlib.uuid4()), "plugin": {"name": plugin, "version": "1.0.0"},
           "interval": interval, "run_on_start": False}
    doc.update(extra)
    return doc


def stdin_document(job: dict) -> bytes:
    """What the runtime hands a plugin on stdin (SPEC §6), for the spawn baseline."""
    return json.dumps({"protocol": "assessment/1", "run_uuid": str(uuidlib.uuid4()), "job": job,
                       "config": job.get("config", {})}, separators=(",", ":")).encode()


# -- the service ----------------------------------------------------------------------------

class Service:
    """The real service: `python -m supervisor run --config F` in its own folder."""

    def __init__(self, root: Path, extra_config: str = "", log_level: str = "info", jobs_config: str = ""):
        self.root = root
        self.state = root / "state"
        self.jobs = root / "jobs.d"
        self.plugins = root / "plugins"
        self.results_file = self.state / "results.jsonl"
        self.config = root / "config.toml"
        self.log = root / "service.log"
        for p in (self.jobs, self.plugins):
            p.mkdir(exist_ok=True)
            p.chmod(0o755)
        run_as = f'run_as_user = "{RUN_AS_USER}"\n' if IS_ROOT else ""
        text = textwrap.dedent(f"""\
            state_dir = "{self.state}"
            run_dir = "{root / 'run'}"
            plugin_dirs = ["{self.plugins}"]
            log_level = "{log_level}"
            [specs]
            dir = "{self.jobs}"
            [jobs]
            """) + run_as + jobs_config + textwrap.dedent(f"""\
            [[publisher.sink]]
            name = "archive"
            kind = "file"
            path = "{self.results_file}"
            """)
        self.config.write_text(text + textwrap.dedent(extra_config))
        self.proc: subprocess.Popen | None = None
        self._logf = None
        self._seen: dict[int, psutil.Process] = {}

    # processes

    def start(self, timeout: float = 30.0, acct: "CpuAcct | None" = None) -> "Service":
        self._logf = open(self.log, "ab")
        argv = [PYTHON, "-m", "supervisor", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(acct.wrap(argv) if acct else argv,
                                     stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO)
        self._seen[self.proc.pid] = psutil.Process(self.proc.pid)
        try:
            wait_for(lambda: self.proc.poll() is not None or self.try_status() is not None, timeout, 0.2,
                     what="the control socket")
        except BenchError:
            raise BenchError(f"service did not answer within {timeout:g}s; log tail:\n{self.log_tail()}") from None
        if self.proc.poll() is not None:
            raise BenchError(f"service exited early with {self.proc.returncode}; log tail:\n{self.log_tail()}")
        return self

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "supervisor", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def try_status(self) -> dict | None:
        try:
            r = self.cli("status", "--json")
        except subprocess.TimeoutExpired:
            return None
        return json.loads(r.stdout) if r.returncode == 0 else None

    def status(self) -> dict:
        doc = self.try_status()
        if doc is None:
            raise BenchError(f"status --json failed; log tail:\n{self.log_tail()}")
        return doc

    def wait_runners(self, n: int, timeout: float = 60.0) -> dict:
        """Until status shows n jobs, each with a runner pid in state running."""
        def ready():
            doc = self.try_status()
            if doc is None:
                return None
            ok = [j for j in doc["jobs"] if j["pid"] and j["state"] == "running"]
            return doc if len(ok) >= n else None
        return wait_for(ready, timeout, 0.5, what=f"{n} running runners")

    def tree(self, plugins: bool = False) -> dict[str, list[psutil.Process]]:
        """The service's processes by role: supervisor, zygote, publisher, runner (and, when
        asked, the plugins running right now). One pass over /proc, so it stays cheap with
        hundreds of runners."""
        out: dict[str, list[psutil.Process]] = {"supervisor": [], "zygote": [], "publisher": [], "runner": [],
                                                "plugin": [], "other": []}
        if self.proc is None or self.proc.poll() is not None:
            return out
        kids: dict[int, list[psutil.Process]] = {}
        for p in psutil.process_iter(["ppid"]):
            ppid = p.info["ppid"]
            if ppid:
                kids.setdefault(ppid, []).append(p)
        try:
            sup = self._seen.get(self.proc.pid) or psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return out
        out["supervisor"].append(sup)

        def keep(p: psutil.Process) -> psutil.Process:
            known = self._seen.get(p.pid)
            if known is not None and known.create_time() == p.create_time():
                return known
            self._seen[p.pid] = p
            return p

        for p in kids.get(sup.pid, []):
            try:
                cmd = " ".join(p.cmdline())
                p = keep(p)
            except psutil.Error:
                continue
            if "runner.zygote" in cmd or cmd == "assessment-runtime: zygote":
                out["zygote"].append(p)
                for r in kids.get(p.pid, []):
                    try:
                        out["runner"].append(keep(r))
                    except psutil.Error:
                        continue
                    if plugins:
                        stack = list(kids.get(r.pid, []))
                        while stack:
                            c = stack.pop()
                            out["plugin"].append(c)
                            stack.extend(kids.get(c.pid, []))
            elif "supervisor.publisher" in cmd or cmd == "assessment-runtime: publisher":
                out["publisher"].append(p)
            else:
                out["other"].append(p)
        return out

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (bounded); then make sure nothing of ours is left."""
        code = None
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.tree(plugins=True)
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    code = None
            elif self.proc is not None:
                code = self.proc.returncode
        finally:
            self.kill_all()
        return code

    def kill_all(self) -> None:
        """Kill the supervisor and every process of its tree we ever saw (pid reuse safe)."""
        procs: list[psutil.Process] = []
        if self.proc is not None:
            try:
                procs = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                procs = []
            if self.proc.poll() is None:
                self.proc.kill()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for p in procs:
            self._seen.setdefault(p.pid, p)
        alive = []
        for p in self._seen.values():
            if self.proc is not None and p.pid == self.proc.pid:
                continue
            try:
                if p.is_running():
                    p.kill()
                    alive.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # specs and results

    def write_spec(self, name: str, doc) -> Path:
        path = self.jobs / name
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.rename(path)
        return path


class _Line(msgspec.Struct):
    uuid: str
    job_uuid: str
    job_revision: str
    start: str
    end: str
    status: str


_line_decoder = msgspec.json.Decoder(_Line)


class ResultsTail:
    """Reads the JSON Lines results file incrementally (only complete lines)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._partial = b""

    def new(self) -> list[_Line]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                out.append(_line_decoder.decode(line))
        return out


def read_results(path: Path) -> list[_Line]:
    return ResultsTail(path).new()


def iso_to_epoch(s: str) -> float:
    """2026-11-27T12:00:00.123456Z -> seconds since the epoch."""
    import calendar
    whole, _, frac = s.rstrip("Z").partition(".")
    t = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return t + (float("0." + frac) if frac else 0.0)


# -- CPU accounting -------------------------------------------------------------------------

CPUACCT = "/sys/fs/cgroup/cpuacct"


class CpuAcct:
    """A cgroup v1 `cpuacct` group around a process tree: its exact CPU time (ns, user+sys,
    every descendant included, live or reaped). psutil's per-process times come in clock
    ticks (10 ms): with 200 runners each using a few ms per window, their sum is off by
    tenths of a millisecond per run, more than the figure measured. None when not root or
    no v1 cpuacct hierarchy is mounted (the benchmark then falls back to psutil's times)."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def create(cls, name: str) -> "CpuAcct | None":
        if not IS_ROOT or not os.path.isfile(os.path.join(CPUACCT, "cpuacct.usage")):
            return None
        path = os.path.join(CPUACCT, f"ar-bench-{name}-{os.getpid()}")
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError:
            return None
        return cls(path)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv, started inside the group (a shell joins it, then execs)."""
        return ["/bin/sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def usage(self) -> float:
        with open(os.path.join(self.path, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9

    def close(self) -> None:
        for _ in range(50):  # empty once every process in it has been reaped
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _on_cpu(pid: int) -> float | None:
    """Seconds on CPU (user+sys) of every thread of `pid`, from /proc/PID/task/*/schedstat:
    nanoseconds, not ticks (/proc/PID/schedstat alone is the main thread's)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return None


def cpu_snapshot(procs: dict[str, list[psutil.Process]]) -> dict[int, dict]:
    """pid -> role, own cpu (user+sys) and reaped children's cpu, in seconds. "own" is from
    schedstat (exact) when the kernel has it; the user/system split and "children" are
    psutil's (clock ticks)."""
    snap = {}
    for role, plist in procs.items():
        if role == "plugin":
            continue  # transient; their CPU reaches us through the runners' children_* times
        for p in plist:
            try:
                t = p.cpu_times()
                ct = p.create_time()
            except psutil.Error:
                continue
            own = _on_cpu(p.pid)
            snap[p.pid] = {"role": role, "own": t.user + t.system if own is None else own,
                           "children": t.children_user + t.children_system,
                           "user": t.user, "system": t.system, "create": ct}
    return snap


def cpu_delta(before: dict[int, dict], after: dict[int, dict]) -> dict:
    """CPU used between two snapshots, by role; processes born in between count whole,
    processes that died in between are counted as lost (their last interval is unknown)."""
    by_role: dict[str, dict] = {}
    vanished = [pid for pid in before if pid not in after]
    born = 0
    for pid, a in after.items():
        b = before.get(pid)
        if b is not None and b["create"] != a["create"]:
            b = None
        if b is None:
            born += 1
            b = {"own": 0.0, "children": 0.0, "user": 0.0, "system": 0.0}
        r = by_role.setdefault(a["role"], {"own": 0.0, "children": 0.0, "user": 0.0, "system": 0.0, "count": 0})
        r["own"] += a["own"] - b["own"]
        r["children"] += a["children"] - b["children"]
        r["user"] += a["user"] - b["user"]
        r["system"] += a["system"] - b["system"]
        r["count"] += 1
    return {"by_role": by_role, "vanished": len(vanished), "born": born}


def uss_mb(p: psutil.Process) -> float:
    return p.memory_full_info().uss / 2**20


def rss_mb(p: psutil.Process) -> float:
    return p.memory_info().rss / 2**20


def system_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), for spotting foreign load."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + \
        getattr(t, "steal", 0.0)


class Ksm:
    """The host's KSM (kernel same-page merging), set for one measurement and put back after.

    Runners offer their pages to KSM (the zygote's PR_SET_MEMORY_MERGE); whether any are
    merged is the host's setting, /sys/kernel/mm/ksm/run. A measurement sets it, so that its
    figures do not depend on what the host had, and counts what ksmd costs: it works for us."""

    ROOT = "/sys/kernel/mm/ksm"

    def __init__(self, on: bool):
        self.on = on
        self.before: str | None = None

    @classmethod
    def available(cls) -> bool:
        return IS_ROOT and os.access(os.path.join(cls.ROOT, "run"), os.W_OK)

    def _read(self, name: str) -> int:
        with open(os.path.join(self.ROOT, name)) as f:
            return int(f.read())

    def _write_run(self, value: str) -> None:
        with open(os.path.join(self.ROOT, "run"), "w") as f:
            f.write(value)

    def __enter__(self) -> "Ksm":
        if self.available():
            self.before = str(self._read("run"))
            self._write_run("1" if self.on else "0")
        return self

    def __exit__(self, *exc) -> None:
        if self.before is not None:
            self._write_run(self.before)

    def pages_sharing(self) -> int:
        return self._read("pages_sharing") if self.available() else 0

    def settle(self, timeout: float = 600.0, step: float = 30.0) -> float:
        """Wait until merging stops growing (under 1% in `step` s), at most `timeout` s; the
        seconds it took. ksmd scans at the host's rate (by default 100 pages every 20 ms), so
        200 runners take minutes."""
        start = time.monotonic()
        last = -1
        while self.on and time.monotonic() - start < timeout:
            now = self.pages_sharing()
            if last > 0 and now - last < 0.01 * last:
                break
            last = now
            time.sleep(step)
        return time.monotonic() - start

    @staticmethod
    def cpu_seconds() -> float:
        """CPU time of the ksmd kernel thread so far."""
        for p in psutil.process_iter(["name"]):
            if p.info["name"] == "ksmd":
                try:
                    t = p.cpu_times()
                    return t.user + t.system
                except psutil.Error:
                    return 0.0
        return 0.0


def load_module(path: Path, name: str):
    """A plugin file (no .py suffix) as a module, without writing __pycache__ beside it."""
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    keep, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = keep
    return module
