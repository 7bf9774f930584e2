"""The yardstick for per-run cost: a bare Python loop that runs a plugin with
os.posix_spawn + waitpid, feeding it its stdin document and reading its stdout, at a fixed
rate, and measures its own CPU and its children's (getrusage, microsecond resolution).

Run as its own process so nothing else is in its rusage:

    python benchmarks/spawn_baseline.py PLUGIN RATE COUNT STDIN_FILE [CPUACCT_DIR]   -> one JSON line

With CPUACCT_DIR (a cgroup v1 cpuacct folder this process runs in), "acct_cpu" is the exact
CPU time of the loop and its children (ns precision) over the same span. With BASELINE_ONE_CPU=1
in the environment the loop, and so its plugins, keep to one CPU (as the service's runners do).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

PLUGIN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _acct(folder: str | None) -> float | None:
    if folder is None:
        return None
    with open(os.path.join(folder, "cpuacct.usage")) as f:
        return int(f.read()) / 1e9


def spawn_loop(plugin: str, rate: float, count: int, stdin: bytes, acct: str | None = None) -> dict:
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    failures = 0
    late = 0.0
    self0, kids0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    acct0 = _acct(acct)
    t0 = time.monotonic()
    for i in range(count):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late = max(late, -delay)
        in_fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
        os.write(in_fd, stdin)
        os.lseek(in_fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        env = dict(PLUGIN_ENV, HOME="/", ASSESSMENT_RUN_UUID=f"run-{i}")
        pid = os.posix_spawn(plugin, [plugin], env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_DUP2, in_fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
        os.close(in_fd)
        os.close(out_w)
        out = bytearray()
        while chunk := os.read(out_r, 65536):
            out += chunk
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        if status != 0 or b'"satisfied"' not in out:
            failures += 1
    elapsed = time.monotonic() - t0
    acct1 = _acct(acct)
    own = _cpu(resource.RUSAGE_SELF) - self0
    children = _cpu(resource.RUSAGE_CHILDREN) - kids0
    os.close(devnull)
    return {"runs": count, "rate": rate, "elapsed": elapsed, "own_cpu": own, "children_cpu": children,
            "failures": failures, "max_late": late, "acct_cpu": None if acct is None else acct1 - acct0}


def main(argv: list[str]) -> int:
    plugin, rate, count, stdin_file, *acct = argv
    if os.environ.get("BASELINE_ONE_CPU") == "1":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with open(stdin_file, "rb") as f:
        stdin = f.read()
    print(json.dumps(spawn_loop(plugin, float(rate), int(count), stdin, acct[0] if acct else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
