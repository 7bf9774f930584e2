"""Benchmark: the floor under a runner's CPU per run, for comparison with ours (issue 9).

Two stand-ins make a runner's per-run system calls for a quick plugin, once a second for each
of N jobs, through our ar-exec with the full sandbox (a uid of its own per job, limits, a
cgroup of its own per job, Landlock), and write a result frame of our size to a socket:
`runner_floor.c` in C, and `runner_floor.py` in as little Python as makes the same calls.
Each stand-in's CPU per run (its processes' schedstat, plugins excluded) is the floor under
our runner's in the same conditions: the C one with no interpreter, the Python one with an
interpreter but none of our code. Needs root (uids, cgroups) and a built runner/ar-exec.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

from benchlib import IS_ROOT, PYTHON, REPO, SH_PLUGIN, Area, BenchError, install_plugin, uss_mb, wait_for

HERE = Path(__file__).resolve().parent
UID_BASE = 64000  # the stand-ins' plugins run as UID_BASE + job: uids nobody has
CGROUP_CONTROLLERS = ("memory", "pids")  # cgroup v1, as the runners' counters on this kind of host


class Sink:
    """The publisher's stand-in: a Unix socket that reads and counts frames, acks nothing."""

    def __init__(self, path: Path, frame_bytes: int):
        self.path, self.frame_bytes, self.bytes = str(path), frame_bytes, 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1024)
        self.conns: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def frames(self) -> float:
        return self.bytes / self.frame_bytes

    def _serve(self) -> None:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        while not self.stopping:
            for key, _ in sel.select(0.1):
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    self.conns.append(conn)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                data = key.fileobj.recv(1 << 16)
                if not data:
                    sel.unregister(key.fileobj)
                self.bytes += len(data)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for s in self.conns + [self.listener]:
            s.close()


def _cgroups(jobs: int) -> tuple[str, list[Path]]:
    """v1 memory and pids folders ar-bench-floor-PID/jN; ("-", []) where there are none."""
    roots = [Path("/sys/fs/cgroup") / c for c in CGROUP_CONTROLLERS]
    if not all((r / "tasks").exists() for r in roots):
        return "-", []
    prefixes = [r / f"ar-bench-floor-{os.getpid()}" for r in roots]
    for p in prefixes:
        for i in range(jobs):
            (p / f"j{i}").mkdir(parents=True, exist_ok=True)
    return ":".join(map(str, prefixes)), prefixes


def _remove_cgroups(prefixes: list[Path]) -> None:
    for p in prefixes:
        for child in sorted(p.glob("j*")):
            for _ in range(50):  # empty once the last plugin in it is reaped
                try:
                    child.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
        try:
            p.rmdir()
        except OSError:
            pass


def _measure(name: str, argv: list[str], jobs: int, window: float, warmup: float, sink: Sink, errors: Path,
             log) -> dict:
    log(f"  [floor-{name}] {jobs} jobs x 1 run/s: warm-up {warmup:g}s, window {window:g}s ...")
    with open(errors, "wb") as err:
        proc = subprocess.Popen(argv, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: len(psutil.Process(proc.pid).children()) >= jobs or proc.poll() is not None, 30, 0.1,
                 what=f"{jobs} {name} stand-ins")
        if proc.poll() is not None:
            raise BenchError(f"floor-{name} exited with {proc.returncode}: {errors.read_text()[-500:]}")
        time.sleep(warmup)
        kids = psutil.Process(proc.pid).children()

        def on_cpu() -> int:
            total = 0
            for k in kids:
                with open(f"/proc/{k.pid}/schedstat") as f:
                    total += int(f.read().split()[0])
            return total

        cpu0, frames0, t0 = on_cpu(), sink.frames(), time.monotonic()
        time.sleep(window)
        cpu1, frames1, t1 = on_cpu(), sink.frames(), time.monotonic()
        uss = sorted(uss_mb(k) for k in kids)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    runs = frames1 - frames0
    failed = sum(1 for line in errors.read_text(errors="replace").splitlines() if line.startswith("job "))
    if runs < 0.5 * jobs * window or failed:
        raise BenchError(f"floor-{name}: {runs:.0f} runs in {window:g}s, {failed} failed; "
                         f"stderr: {errors.read_text(errors='replace')[-500:]}")
    return {"runs": round(runs), "rate": round(runs / (t1 - t0), 1), "failed_runs": failed,
            "runner_ms_per_run": round((cpu1 - cpu0) / 1e6 / runs, 4),
            "uss_mb_mean": round(sum(uss) / len(uss), 3)}


def run(area: Area, jobs: int = 200, window: float = 12.0, warmup: float = 4.0, log=print) -> dict:
    helper = REPO / "runner" / "ar-exec"
    if not IS_ROOT:
        return {"skipped": "needs root: a uid and cgroups of its own per job"}
    if not os.access(helper, os.X_OK):
        return {"skipped": f"{helper} is not built"}
    root = area.sub("floor")
    plugin = install_plugin(root / "plugins", "floor", script=SH_PLUGIN)
    scratch = root / "scratch"
    scratch.mkdir()
    out: dict = {"jobs": jobs, "window_s": window}
    binary = root / "runner-floor"
    cc = shutil.which("cc") or shutil.which("gcc")
    standins = []
    if cc is None:
        out["c"] = {"skipped": "no C compiler"}
    else:
        r = subprocess.run([cc, "-O2", "-o", str(binary), str(HERE / "runner_floor.c")], capture_output=True, text=True)
        if r.returncode != 0:
            out["c"] = {"skipped": f"cannot compile runner_floor.c: {r.stderr.strip()[-300:]}"}
        else:
            standins.append(("c", [str(binary)]))
    standins.append(("python", [PYTHON, str(HERE / "runner_floor.py")]))
    prefixes, folders = _cgroups(jobs)
    out["cgroups"] = prefixes
    sink = Sink(root / "sink.sock", 700)
    try:
        for name, command in standins:
            argv = command + [str(jobs), str(helper), str(plugin), sink.path, prefixes, str(UID_BASE), str(scratch)]
            try:
                out[name] = _measure(name, argv, jobs, window, warmup, sink, root / f"{name}.stderr", log)
            except BenchError as e:
                out[name] = {"error": str(e)}
    finally:
        sink.close()
        _remove_cgroups(folders)
    return out


def format_result(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"  skipped: {r['skipped']}"]
    lines = []
    for name, what in (("c", "C stand-in (no interpreter)"), ("python", "Python stand-in (no code of ours)")):
        d = r.get(name, {})
        if "runner_ms_per_run" in d:
            lines.append(f"  {what:<34} {d['runner_ms_per_run']:.3f} ms CPU per run (plugins excluded), "
                         f"{d['runs']} runs at {d['rate']:.0f}/s, {d['failed_runs']} failed; "
                         f"USS {d['uss_mb_mean']:.3f} MB per process")
        else:
            lines.append(f"  {what:<34} {d.get('skipped') or d.get('error')}")
    return lines
