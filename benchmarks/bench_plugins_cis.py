"""The CIS-style plugins (plugins/sshd, accounts, mounts, services, auditd) on this host.

    .venv/bin/python benchmarks/bench_plugins_cis.py [repeats]

Each plugin is run `repeats` times as a fresh process, the way the runtime starts it (no
arguments, the scrubbed environment, the assessment/1 document on stdin, cwd = a scratch
folder), with root "/". Per plugin: wall time (fork to reaped), CPU time (user + system) and
peak RSS, from wait4() of that one process, so they include what it starts itself (sshd -T,
ssh-keygen). Baseline, measured the same way in the same run: the interpreter the plugins use
(/usr/bin/python3) doing nothing (`-I -c pass`), the floor of any Python plugin; and `sshd -T`
alone when it works here. A plugin that cannot run is skipped with the reason. Nothing is
asserted.

Why a small C launcher forks the plugin: Linux's ru_maxrss of a child counts the memory of the
process it was forked from (exec records the old address space's high-water mark), so a
plugin forked from this Python process would never show less than this process's RSS. The
launcher (compiled here with cc; a few hundred KiB) forks, execs and reports wait4's numbers.
Without a C compiler the plugin is forked from here and the RSS column says "floor".
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
NAMES = ("sshd", "accounts", "mounts", "services", "auditd")
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INTERPRETER = "/usr/bin/python3"


LAUNCHER_SOURCE = r"""
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
/* launcher RESULT_FILE PROGRAM [ARG...]: fork, exec PROGRAM (stdio inherited), wait4, and write
   "status maxrss_kib user_s system_s wall_s" to RESULT_FILE. */
int main(int argc, char **argv) {
    struct timespec a, b;
    struct rusage ru;
    int status;
    if (argc < 3) return 125;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pid_t pid = fork();
    if (pid < 0) return 126;
    if (pid == 0) { execv(argv[2], argv + 2); _exit(127); }
    if (wait4(pid, &status, 0, &ru) < 0) return 126;
    clock_gettime(CLOCK_MONOTONIC, &b);
    FILE *f = fopen(argv[1], "w");
    if (!f) return 126;
    fprintf(f, "%d %ld %ld.%06ld %ld.%06ld %.9f\n", status, ru.ru_maxrss, (long)ru.ru_utime.tv_sec,
            (long)ru.ru_utime.tv_usec, (long)ru.ru_stime.tv_sec, (long)ru.ru_stime.tv_usec,
            (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return fclose(f) == 0 ? 0 : 126;
}
"""


def _launcher(folder: str) -> tuple[str | None, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler: RSS is a floor (it includes this Python process's)"
    src = os.path.join(folder, "launcher.c")
    exe = os.path.join(folder, "launcher")
    with open(src, "w") as f:
        f.write(LAUNCHER_SOURCE)
    r = subprocess.run([cc, "-O2", "-o", exe, src], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None, f"cc failed ({r.stderr.strip()[:200]}): RSS is a floor"
    return exe, "forked by a C launcher"


def _measure(argv: list[str], stdin: bytes, cwd: str, env: dict, launcher: str | None = None) -> dict:
    """One fresh process: wall ms, CPU ms, peak RSS MB (wait4), exit code, stdout, stderr."""
    if launcher is not None:
        result_file = os.path.join(cwd, ".launcher-result")
        p = subprocess.run([launcher, result_file] + argv, input=stdin, capture_output=True, cwd=cwd, env=env,
                           start_new_session=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"launcher exit {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
        with open(result_file) as f:
            status, maxrss, user, system, wall = f.read().split()
        os.unlink(result_file)
        return {"wall_ms": 1000 * float(wall), "cpu_ms": 1000 * (float(user) + float(system)),
                "peak_rss_mb": int(maxrss) / 1024, "code": os.waitstatus_to_exitcode(int(status)),
                "stdout": p.stdout, "stderr": p.stderr}
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env=env, start_new_session=True)
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    proc.stdout.close()
    proc.stderr.close()
    return {"wall_ms": 1000 * wall, "cpu_ms": 1000 * (usage.ru_utime + usage.ru_stime),
            "peak_rss_mb": usage.ru_maxrss / 1024, "code": proc.returncode, "stdout": out, "stderr": err}


def _summary(samples: list[dict]) -> dict:
    walls = [s["wall_ms"] for s in samples]
    return {"wall_ms": {"median": round(statistics.median(walls), 1), "min": round(min(walls), 1),
                        "max": round(max(walls), 1)},
            "cpu_ms": round(statistics.median(s["cpu_ms"] for s in samples), 1),
            "peak_rss_mb": round(max(s["peak_rss_mb"] for s in samples), 1)}


def _document(name: str) -> bytes:
    job = {"uuid": str(uuid.uuid4()), "plugin": {"name": name, "version": "1.0.0"}, "interval": "1h", "config": {}}
    return json.dumps({"protocol": "assessment/1", "run_uuid": str(uuid.uuid4()), "job": job,
                       "config": {}}).encode()


def run(repeats: int = 5, log=print) -> dict:
    scratch = tempfile.mkdtemp(prefix="bench-cis-")
    tools = tempfile.mkdtemp(prefix="bench-cis-tools-")
    env = {"PATH": PLUGIN_PATH, "LANG": "C.UTF-8", "HOME": scratch, "ASSESSMENT_JOB_UUID": str(uuid.uuid4()),
           "ASSESSMENT_RUN_UUID": str(uuid.uuid4()), "ASSESSMENT_RUNTIME_UUID": str(uuid.uuid4())}
    report: dict = {"repeats": repeats, "uid": os.getuid(), "root": "/", "plugins": {}, "baseline": {}}
    try:
        launcher, how = _launcher(tools)
        report["measured"] = how

        def measure(argv: list[str], stdin: bytes = b"") -> dict:
            return _measure(argv, stdin, scratch, env, launcher)

        log(f"  {repeats} fresh runs each, root \"/\", as uid {os.getuid()}; wall / CPU / peak RSS from wait4, {how}")
        if os.path.exists(INTERPRETER):
            measure([INTERPRETER, "-I", "-c", "pass"])  # warm the page cache
            report["baseline"]["python"] = _summary([measure([INTERPRETER, "-I", "-c", "pass"])
                                                     for _ in range(repeats)])
        sshd = shutil.which("sshd", path=PLUGIN_PATH)
        if sshd:
            probe = measure([sshd, "-T"])
            if probe["code"] == 0:
                report["baseline"]["sshd_T"] = _summary([measure([sshd, "-T"]) for _ in range(repeats)])
            else:
                report["baseline"]["sshd_T"] = {"skipped": probe["stderr"].decode(errors="replace").strip()[-200:]}
        for name in NAMES:
            exe = PLUGINS / name / "1.0.0" / name
            if not os.access(exe, os.X_OK):
                report["plugins"][name] = {"skipped": f"{exe} is not there or not executable"}
                continue
            measure([str(exe)], _document(name))  # warm-up, not counted
            samples = [measure([str(exe)], _document(name)) for _ in range(repeats)]
            bad = [s for s in samples if s["code"] != 0]
            if bad:
                report["plugins"][name] = {"skipped": f"exit code {bad[0]['code']}: "
                                                      f"{bad[0]['stderr'].decode(errors='replace').strip()[-300:]}"}
                continue
            result = json.loads(samples[-1]["stdout"])
            outcomes = [next(p["value"] for p in o["props"] if p["name"] == "outcome") for o in result["observations"]]
            entry = _summary(samples)
            entry["rules"] = len(outcomes)
            entry["counts"] = {k: outcomes.count(k) for k in ("pass", "fail", "not-applicable", "not-checked")}
            entry["status"] = result["status"]
            entry["output_kb"] = round(len(samples[-1]["stdout"]) / 1024, 1)
            report["plugins"][name] = entry
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tools, ignore_errors=True)
    for line in format_result(report):
        log(line)
    return report


def format_result(r: dict) -> list[str]:
    lines = []
    py = r["baseline"].get("python")
    head = (f"  {'plugin':<10} {'wall ms median (min-max)':<24} {'CPU ms':>7} {'':>6} {'peak RSS':>9} {'rules':>5}  "
            f"result  (x = CPU against the bare interpreter)")
    lines.append(head)
    for name, e in r["plugins"].items():
        if "skipped" in e:
            lines.append(f"  {name:<10} skipped: {e['skipped']}")
            continue
        w = e["wall_ms"]
        c = e["counts"]
        ratio = f" {e['cpu_ms'] / py['cpu_ms']:.1f}x" if py and py["cpu_ms"] else ""
        lines.append(f"  {name:<10} {w['median']:>8.1f} ({w['min']:.1f}-{w['max']:.1f}) {e['cpu_ms']:>7.1f}{ratio:>6} "
                     f"{e['peak_rss_mb']:>6.1f} MB {e['rules']:>5}  {c['pass']} pass, {c['fail']} fail, "
                     f"{c['not-applicable']} n/a, {c['not-checked']} not checked ({e['status']}, {e['output_kb']} KiB)")
    if py:
        w = py["wall_ms"]
        lines.append(f"  {'baseline':<10} {w['median']:>8.1f} ({w['min']:.1f}-{w['max']:.1f}) {py['cpu_ms']:>7.1f} {'':>5} "
                     f"{py['peak_rss_mb']:>6.1f} MB        {INTERPRETER} -I -c pass")
    t = r["baseline"].get("sshd_T")
    if t and "skipped" in t:
        lines.append(f"  {'sshd -T':<10} not measured: {t['skipped']}")
    elif t:
        w = t["wall_ms"]
        lines.append(f"  {'sshd -T':<10} {w['median']:>8.1f} ({w['min']:.1f}-{w['max']:.1f}) {t['cpu_ms']:>7.1f} {'':>5} "
                     f"{t['peak_rss_mb']:>6.1f} MB        sshd -T alone (part of the sshd plugin's time)")
    return lines


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
