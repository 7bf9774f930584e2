"""What confinement costs per run: ar-exec starting a plugin plain, confined (Landlock), and
confined with a capability grant, interleaved in rounds in one process.

    python benchmarks/bench_confine.py [--runs N] [--target PATH]

Each variant is runner.sandbox.Sandbox.spawn + wait4, as a runner does it, as uid 61999 with
a scratch folder of its own; the figure is the CPU the child used (ar-exec and the plugin:
wait4's rusage) and the wall time per run, medians of 30 rounds. The target is a static
`exit 0` binary when a C compiler is there (so ar-exec's own work shows), else /bin/true.
Needs root (the uid change); skipped otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchlib import REPO  # noqa: E402,F401 - puts the repo on sys.path

from runner import landlock  # noqa: E402
from runner.landlock import Confine  # noqa: E402
from runner.sandbox import HELPER, Sandbox  # noqa: E402
from runner.wire import RunLimits  # noqa: E402

UID = 61999
ROUNDS = 30


def static_true(folder: str) -> str:
    """A static binary that exits 0 at once, or /bin/true."""
    source = os.path.join(folder, "true.c")
    binary = os.path.join(folder, "true")
    with open(source, "w") as f:
        f.write("void _start(void){__asm__ volatile(\"mov $60,%eax\\nxor %edi,%edi\\nsyscall\");}\n")
    if os.uname().machine == "x86_64" and shutil.which("gcc") and \
            os.system(f"gcc -static -nostdlib -O2 -o {binary} {source} 2>/dev/null") == 0:
        os.chmod(binary, 0o755)
        return binary
    return "/bin/true"


def run(runs: int = 3000, target: str | None = None, log=print) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (the plugin's uid change)")
    if not os.access(HELPER, os.X_OK):
        raise RuntimeError("runner/ar-exec is not built (make venv)")
    folder = tempfile.mkdtemp(prefix="confine-bench-")
    try:
        os.chmod(folder, 0o755)
        target = target or static_true(folder)
        scratch = os.path.join(folder, "scratch")
        os.mkdir(scratch, 0o700)
        os.chown(scratch, UID, UID)
        limits = RunLimits(256 << 20, 10, 64, 64, 1 << 20)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        variants = {
            "plain": Sandbox(limits, (UID, UID), env),
            "confined": Sandbox(limits, (UID, UID), env, confine=Confine()),
            "confined+capability": Sandbox(limits, (UID, UID), env, confine=Confine(), capabilities=(2,)),
        }
        stdin = os.open("/dev/null", os.O_RDONLY)
        per_round = max(1, runs // ROUNDS)
        samples: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in variants}
        for _ in range(ROUNDS):
            order = list(variants.items())
            random.shuffle(order)
            for name, sandbox in order:
                cpu = 0.0
                started = time.perf_counter()
                for _ in range(per_round):
                    pid, pidfd, out, err = sandbox.spawn([target], scratch, stdin, {})
                    _, status, usage = os.wait4(pid, 0)
                    for fd in (out, err, pidfd):
                        os.close(fd)
                    if status != 0:
                        raise RuntimeError(f"{name}: the plugin exited with status {status}")
                    cpu += usage.ru_utime + usage.ru_stime
                samples[name][0].append((time.perf_counter() - started) / per_round)
                samples[name][1].append(cpu / per_round)
        os.close(stdin)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {"target": target, "runs_per_variant": per_round * ROUNDS, "landlock_abi": landlock.abi()}
    for name, (wall, cpu) in samples.items():
        out[name] = {"wall_us": round(statistics.median(wall) * 1e6, 1), "cpu_us": round(statistics.median(cpu) * 1e6, 1)}
    base = out["plain"]["cpu_us"]
    for name in ("confined", "confined+capability"):
        out[name]["extra_cpu_us"] = round(out[name]["cpu_us"] - base, 1)
        out[name]["ratio_cpu"] = round(out[name]["cpu_us"] / base, 2)
    log(f"    target {target}, Landlock ABI {out['landlock_abi']}, {out['runs_per_variant']:,} runs each:")
    for name in variants:
        r = out[name]
        extra = f"  ({r['extra_cpu_us']:+.1f} us, {r['ratio_cpu']}x plain)" if "extra_cpu_us" in r else ""
        log(f"      {name:<20} CPU {r['cpu_us']:7.1f} us/run, wall {r['wall_us']:7.1f} us/run{extra}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--target")
    args = parser.parse_args()
    run(args.runs, args.target)


if __name__ == "__main__":
    main()
