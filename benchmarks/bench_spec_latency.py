"""Benchmark 3: how long a spec change takes to show, end to end.

A job (interval 1h, run_on_start true) already delivers results. Its spec file is rewritten
(atomic rename) with a new title; we time from the rename to the first result carrying a new
job_revision in the results file. The result's own `start` and `end` split that into:
  applied  - rename -> the new runner starts its first run (watcher, store, reconcile,
             old runner stopped, new runner forked)
  run      - the plugin run itself
  delivery - run end -> line in the results file (supervisor -> publisher -> outbox ->
             file sink, which batches for up to publisher.flush_interval, default 1s)
Baseline: the wall time of a fresh `python -c pass` (the least a design that starts a new
interpreter per change would pay).
"""

from __future__ import annotations

import subprocess
import time

from benchlib import (PYTHON, SH_PLUGIN, Area, BenchError, ResultsTail, Service, install_plugin, iso_to_epoch,
                      job_spec, median, wait_for)


def _python_start_s(n: int) -> list[float]:
    subprocess.run([PYTHON, "-c", "pass"], check=True, timeout=30)  # warm the page cache; not counted
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([PYTHON, "-c", "pass"], check=True, timeout=30)
        out.append(time.perf_counter() - t)
    return out


def run(area: Area, repeats: int = 10, timeout_each: float = 15.0, log=print) -> dict:
    root = area.sub("spec-latency")
    svc = Service(root)
    install_plugin(svc.plugins, "trivial", script=SH_PLUGIN)
    doc = job_spec(interval="1h", run_on_start=True, title="revision 0")
    svc.write_spec("job.json", doc)
    samples = []
    out: dict = {"repeats": repeats}
    try:
        svc.start()
        tail = ResultsTail(svc.results_file)
        known: set[str] = set()

        def first_result():
            got = tail.new()
            known.update(r.job_revision for r in got)
            return got
        wait_for(first_result, 30, 0.05, what="the job's first result")
        for i in range(1, repeats + 1):
            time.sleep(0.3)  # let the previous change settle (watcher debounce is 150 ms)
            known.update(r.job_revision for r in tail.new())
            doc["title"] = f"revision {i}"
            svc.write_spec("job.json", doc)
            t_write = time.time()
            deadline = time.monotonic() + timeout_each
            hit = None
            while hit is None:
                for r in tail.new():
                    if r.job_revision not in known:
                        hit = r
                        break
                    known.add(r.job_revision)
                if hit is None:
                    if time.monotonic() >= deadline:
                        raise BenchError(f"spec change {i}: no result with a new revision within {timeout_each:g}s; "
                                         f"log tail:\n{svc.log_tail()}")
                    time.sleep(0.005)
            t_seen = time.time()
            known.add(hit.job_revision)
            start, end = iso_to_epoch(hit.start), iso_to_epoch(hit.end)
            samples.append({"total": t_seen - t_write, "applied": start - t_write, "run": end - start,
                            "delivery": t_seen - end})
    finally:
        out["stop_exit_code"] = svc.stop()
    base = _python_start_s(max(5, repeats))
    totals = [s["total"] for s in samples]
    out["latency_s"] = {"median": round(median(totals), 4), "max": round(max(totals), 4),
                        "min": round(min(totals), 4)}
    for part in ("applied", "run", "delivery"):
        vals = [s[part] for s in samples]
        out[f"{part}_s"] = {"median": round(median(vals), 4), "max": round(max(vals), 4)}
    out["samples"] = [{k: round(v, 4) for k, v in s.items()} for s in samples]
    out["baseline_python_start_s"] = {"median": round(median(base), 4), "max": round(max(base), 4),
                                      "min": round(min(base), 4)}
    out["ratio_median_to_python_start"] = round(out["latency_s"]["median"] / median(base), 2)
    out["ratio_applied_median_to_python_start"] = round(out["applied_s"]["median"] / median(base), 2)
    return out


def format_result(r: dict) -> list[str]:
    lat, b = r["latency_s"], r["baseline_python_start_s"]
    return [
        f"  {r['repeats']} spec rewrites (new title), rename -> first result with the new revision in the file",
        f"    end to end          median {1000 * lat['median']:.0f} ms, max {1000 * lat['max']:.0f} ms "
        f"(min {1000 * lat['min']:.0f} ms)",
        f"      applied           median {1000 * r['applied_s']['median']:.0f} ms, max "
        f"{1000 * r['applied_s']['max']:.0f} ms   (rename -> new runner starts the run)",
        f"      plugin run        median {1000 * r['run_s']['median']:.0f} ms, max {1000 * r['run_s']['max']:.0f} ms",
        f"      delivery          median {1000 * r['delivery_s']['median']:.0f} ms, max "
        f"{1000 * r['delivery_s']['max']:.0f} ms   (run end -> results file; file sink batches up to flush_interval)",
        f"    baseline            fresh `python -c pass`: median {1000 * b['median']:.0f} ms "
        f"(min {1000 * b['min']:.0f}, max {1000 * b['max']:.0f})",
        f"    ratio               end to end / baseline = {r['ratio_median_to_python_start']:.1f}x; "
        f"applied / baseline = {r['ratio_applied_median_to_python_start']:.1f}x",
    ]
