"""Benchmark 2: memory of idle runners (USS), against a fresh interpreter per job.

The service runs N jobs at interval 1h with run_on_start false, so every runner is forked,
configured and then idle. USS (memory only that process holds) of each runner, the
zygote's and supervisor's RSS; the baseline is the USS of a freshly started
`python -c "import time; time.sleep(60)"` (what a fresh interpreter per job would cost).
"""

from __future__ import annotations

import subprocess
import time

import psutil

from benchlib import PYTHON, SH_PLUGIN, Area, BenchError, Service, install_plugin, job_spec, rss_mb, uss_mb

TARGET_MB = 1.5
AIM_MB = 1.0
SERVICE_TARGET_MB = 350.0
SERVICE_AIM_MB = 250.0


def _fresh_interpreter_uss(settle: float = 1.0) -> dict:
    proc = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(settle)
        p = psutil.Process(proc.pid)
        info = p.memory_full_info()
        return {"uss_mb": round(info.uss / 2**20, 2), "rss_mb": round(info.rss / 2**20, 2),
                "pss_mb": round(getattr(info, "pss", 0) / 2**20, 2)}
    finally:
        proc.kill()
        proc.wait(10)


def run(area: Area, jobs: int = 20, settle: float = 3.0, log=print) -> dict:
    root = area.sub(f"memory-{jobs}")
    svc = Service(root)
    install_plugin(svc.plugins, "trivial", script=SH_PLUGIN)
    for i in range(jobs):
        svc.write_spec(f"job-{i:04d}.json", job_spec(interval="1h", run_on_start=False, title=f"idle job {i}"))
    out: dict = {"jobs": jobs, "target_mb": TARGET_MB, "aim_mb": AIM_MB}
    try:
        svc.start()
        svc.wait_runners(jobs, timeout=60)
        time.sleep(settle)
        procs = svc.tree()
        runners = procs["runner"]
        if len(runners) < jobs:
            raise BenchError(f"memory: expected {jobs} runners, found {len(runners)}; log tail:\n{svc.log_tail()}")
        uss = sorted(uss_mb(p) for p in runners)
        rss = sorted(rss_mb(p) for p in runners)
        pss = sorted(p.memory_full_info().pss / 2**20 for p in runners)
        out["runner_uss_mb"] = {"min": round(uss[0], 2), "median": round(uss[len(uss) // 2], 2),
                                "mean": round(sum(uss) / len(uss), 3), "max": round(uss[-1], 2), "count": len(uss)}
        out["runner_rss_mb_median"] = round(rss[len(rss) // 2], 2)
        out["runner_pss_mb_median"] = round(pss[len(pss) // 2], 2)
        out["zygote"] = {"rss_mb": round(rss_mb(procs["zygote"][0]), 2), "uss_mb": round(uss_mb(procs["zygote"][0]), 2)}
        out["supervisor"] = {"rss_mb": round(rss_mb(procs["supervisor"][0]), 2),
                             "uss_mb": round(uss_mb(procs["supervisor"][0]), 2),
                             "threads": procs["supervisor"][0].num_threads()}
        if procs["publisher"]:
            out["publisher"] = {"rss_mb": round(rss_mb(procs["publisher"][0]), 2),
                                "uss_mb": round(uss_mb(procs["publisher"][0]), 2)}
        total_uss = sum(uss) + out["zygote"]["uss_mb"] + out["supervisor"]["uss_mb"] + \
            out.get("publisher", {}).get("uss_mb", 0.0)
        out["service_total_uss_mb"] = round(total_uss, 1)
        out["ratio_median_to_target"] = round(out["runner_uss_mb"]["median"] / TARGET_MB, 3)
        out["ratio_median_to_aim"] = round(out["runner_uss_mb"]["median"] / AIM_MB, 3)
        out["meets_target"] = out["runner_uss_mb"]["mean"] <= TARGET_MB
    finally:
        out["stop_exit_code"] = svc.stop()
    base = _fresh_interpreter_uss()
    out["baseline_fresh_python"] = base
    out["ratio_median_to_fresh_python"] = round(out["runner_uss_mb"]["median"] / base["uss_mb"], 3)
    return out


def format_result(r: dict) -> list[str]:
    u = r["runner_uss_mb"]
    b = r["baseline_fresh_python"]
    lines = [
        f"  {r['jobs']} idle runners (interval 1h, run_on_start false)",
        f"    runner USS          min {u['min']:.2f} / median {u['median']:.2f} / mean {u['mean']:.2f} / "
        f"max {u['max']:.2f} MB   "
        f"(RSS median {r['runner_rss_mb_median']:.2f} MB, PSS median {r['runner_pss_mb_median']:.2f} MB)",
        f"    vs target           median/{r['target_mb']:g} MB = {r['ratio_median_to_target']:.2f}x "
        f"({'met' if r['meets_target'] else 'NOT met'} for the mean); vs aim {r['aim_mb']:g} MB = "
        f"{r['ratio_median_to_aim']:.2f}x",
        f"    baseline            fresh `python -c 'import time; time.sleep(60)'`: USS {b['uss_mb']:.2f} MB "
        f"(RSS {b['rss_mb']:.2f} MB) -> runner/fresh = {r['ratio_median_to_fresh_python']:.2f}x",
        f"    zygote              RSS {r['zygote']['rss_mb']:.2f} MB (USS {r['zygote']['uss_mb']:.2f} MB)",
        f"    supervisor          RSS {r['supervisor']['rss_mb']:.2f} MB (USS {r['supervisor']['uss_mb']:.2f} MB, "
        f"{r['supervisor']['threads']} threads)",
    ]
    if "publisher" in r:
        lines.append(f"    publisher           RSS {r['publisher']['rss_mb']:.2f} MB (USS {r['publisher']['uss_mb']:.2f} MB)")
    lines.append(f"    whole service       USS sum {r['service_total_uss_mb']:.1f} MB for {r['jobs']} jobs")
    return lines
