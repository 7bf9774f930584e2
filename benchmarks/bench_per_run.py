"""Benchmark 1: CPU cost per plugin run, against a bare posix_spawn+waitpid loop.

N jobs of the same trivial plugin at interval 1s (so ~N runs/s, spread by each job's splay)
run for a fixed window after a warm-up. CPU of the runtime's own processes (supervisor,
zygote, publisher, runners: psutil cpu_times user+system, excluding children) is sampled at
the window's start and end; the plugins' CPU is what the runners reaped (children_user +
children_system of each runner). Runs in the window are counted from the results file by
their `start`. The baseline (spawn_baseline.py) runs the same plugin the same number of
times at the same rate, in the same benchmark run: once before the service and once after, and
the two are averaged (the host's own speed drifts by a few per cent within a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil

from benchlib import (PYTHON, SH_PLUGIN, Area, BenchError, CpuAcct, Ksm, ResultsTail, Service, cpu_delta,
                      cpu_snapshot, install_plugin, iso_to_epoch, job_spec, read_results, stdin_document, system_busy,
                      uss_mb, wait_for)

HERE = Path(__file__).resolve().parent
YARDSTICKS_MS = {"Nagios Core 4": 0.51, "Icinga 2": 1.4}
TARGET_RATIO = 1.3
DURING_RATE = 20.0  # runs/s of the baseline loop run alongside the service, in its window
OWN_ROLES = ("supervisor", "zygote", "publisher", "runner", "other")
BASELINE_SPREAD_MAX = 0.15  # bare loops before and after further apart than this: the pair is measured again
QUIET_CORES = 0.1  # a baseline starts once the host uses less than this ...
QUIET_WAIT = 30.0  # ... or after this many seconds of waiting for it


def run_variant(area: Area, kind: str, jobs: int, window: float, warmup: float,
                c_binary: Path | None = None, log=print, confine: bool = True, ksm: bool = False,
                label: str | None = None) -> dict:
    """One measurement: `jobs` jobs of the `kind` ("sh" or "c") plugin at 1 run/s each;
    `confine=False`: without Landlock (to show what confinement costs); `ksm`: with the
    host's KSM on (off otherwise), merging settled before the window, ksmd's CPU counted as ours;
    `label`: the result's (and its folder's) name, when the same shape runs more than once."""
    with Ksm(ksm) as k:
        return _run_variant(area, kind, jobs, window, warmup, c_binary, log, confine, k, label)


def _run_variant(area: Area, kind: str, jobs: int, window: float, warmup: float,
                 c_binary: Path | None, log, confine: bool, ksm: Ksm, label: str | None) -> dict:
    name = label or f"per-run-{kind}-{jobs}" + ("" if confine else "-unconfined") + ("-ksm" if ksm.on else "")
    root = area.sub(name)
    svc = Service(root, jobs_config="" if confine else "confine = false\n")
    plugin = "trivial"
    if kind == "sh":
        entry = install_plugin(svc.plugins, plugin, script=SH_PLUGIN)
    else:
        entry = install_plugin(svc.plugins, plugin, binary=c_binary)
    specs = [job_spec(plugin=plugin, interval="1s", title=f"bench job {i}") for i in range(jobs)]
    for i, doc in enumerate(specs):
        svc.write_spec(f"job-{i:04d}.json", doc)
    out: dict = {"name": name, "plugin": kind, "jobs": jobs, "interval_s": 1.0, "window_s": window,
                 "warmup_s": warmup, "nominal_rate": jobs / 1.0, "loadavg_before": os.getloadavg()[0],
                 "ksm": ksm.on and ksm.before is not None}
    stdin_file = root / "stdin.json"
    stdin_file.write_bytes(stdin_document(specs[0]))
    before = _baseline(name, "before", entry, jobs / 1.0, round(jobs * window), stdin_file, log)
    acct = CpuAcct.create(f"service-{name}")
    try:
        t_start = time.monotonic()
        svc.start(acct=acct)
        svc.wait_runners(jobs, timeout=60)
        out["startup_s"] = round(time.monotonic() - t_start, 2)
        tail = ResultsTail(svc.results_file)
        wait_for(lambda: tail.new(), 10, 0.2, what="first results in the file")
        time.sleep(warmup)
        if out["ksm"]:
            out["ksm_settle_s"] = round(ksm.settle(), 1)
            log(f"  [{name}] KSM merging settled after {out['ksm_settle_s']:.0f} s")

        # each snapshot reads every process once; its clock is the middle of that read
        procs0 = svc.tree()
        m_a, w_a = time.monotonic(), time.time()
        snap0 = cpu_snapshot(procs0)
        acct0 = acct.usage() if acct else None
        ksmd0 = Ksm.cpu_seconds()
        busy0 = system_busy()
        m_b, w_b = time.monotonic(), time.time()
        mono0, wall0 = (m_a + m_b) / 2, (w_a + w_b) / 2
        during = BaselineLoop(name, "during", entry, DURING_RATE, round(DURING_RATE * window), stdin_file)
        time.sleep(max(0.0, window - (m_b - m_a)))
        base_during = during.wait()
        procs1 = svc.tree()
        m_a, w_a = time.monotonic(), time.time()
        snap1 = cpu_snapshot(procs1)
        acct1 = acct.usage() if acct else None
        ksmd1 = Ksm.cpu_seconds()
        busy1 = system_busy()
        m_b, w_b = time.monotonic(), time.time()
        mono1, wall1 = (m_a + m_b) / 2, (w_a + w_b) / 2
        elapsed = mono1 - mono0
        out["snapshot_s"] = round(m_b - m_a, 3)
        delta = cpu_delta(snap0, snap1)
        out["memory_active"] = service_memory(procs1)

        # every result the supervisor has counted must reach the file (bounded wait)
        status = svc.status()
        received = sum(j["runs"] for j in status["jobs"])
        restarts = sum(j["restarts"] for j in status["jobs"])
        try:
            wait_for(lambda: len(read_results(svc.results_file)) >= received, 15, 0.25,
                     what="the results file to catch up with the supervisor's run counters")
        except BenchError:
            pass
        results = read_results(svc.results_file)
        out["lateness_ms"] = lateness_ms(results, 1.0)
        uuids = [r.uuid for r in results]
        in_window = [r for r in results if wall0 <= iso_to_epoch(r.start) < wall1]
        runs = len(in_window)
        out.update({
            "elapsed_s": round(elapsed, 3),
            "runs_in_window": runs,
            "runs_expected_in_window": round(jobs * elapsed),
            "achieved_rate": round(runs / elapsed, 2),
            "keeps_up": runs >= 0.95 * jobs * elapsed,
            "not_satisfied_in_window": sum(1 for r in in_window if r.status != "satisfied"),
            "results_received_by_supervisor": received,
            "results_in_file": len(results),
            "results_lost": max(0, received - len(results)),
            "duplicate_results": len(uuids) - len(set(uuids)),
            "runner_restarts": restarts,
            "processes": {role: len(p) for role, p in procs1.items() if role != "plugin"},
            "processes_vanished_in_window": delta["vanished"],
            "processes_born_in_window": delta["born"],
        })
        if runs == 0:
            raise BenchError(f"{name}: no runs in the measurement window; log tail:\n{svc.log_tail()}")
        by_role = delta["by_role"]
        cpu = {role: round(by_role.get(role, {}).get("own", 0.0), 4) for role in OWN_ROLES}
        if out["ksm"]:  # the kernel's merging thread works for us: its time is ours
            cpu["ksmd"] = round(ksmd1 - ksmd0, 4)
            out["ksm_pages_sharing"] = ksm.pages_sharing()
        plugin_cpu = by_role.get("runner", {}).get("children", 0.0)
        own_total = sum(cpu.values())
        out["cpu_s"] = dict(cpu, plugins=round(plugin_cpu, 4), runtime_total=round(own_total, 4))
        # CPU the rest of the machine used meanwhile (other work on the host skews everything)
        out["foreign_load_cores"] = round(max(0.0, (busy1 - busy0) - own_total - plugin_cpu) / elapsed, 2)
        out["cpu_user_system_s"] = {role: {"user": round(v["user"], 4), "system": round(v["system"], 4)}
                                    for role, v in by_role.items()}
        out["per_run_ms"] = {role: round(1000 * v / runs, 4) for role, v in cpu.items()}
        out["per_run_ms"]["plugin"] = round(1000 * plugin_cpu / runs, 4)
        out["per_run_ms"]["runtime_excl_plugin"] = round(1000 * own_total / runs, 4)
        out["per_run_ms"]["runtime_total"] = round(1000 * (own_total + plugin_cpu) / runs, 4)
        if acct is not None:  # exact: every process of the service and every plugin, in ns
            out["per_run_ms"]["runtime_total"] = round(1000 * (acct1 - acct0 + cpu.get("ksmd", 0.0)) / runs, 4)
            out["per_run_ms"]["plugin"] = round(out["per_run_ms"]["runtime_total"] - 1000 * own_total / runs, 4)
            out["cpu_accounting"] = "cgroup v1 cpuacct (exact); roles from /proc/PID/schedstat"
        else:
            out["cpu_accounting"] = "psutil cpu_times (10 ms clock ticks per process: noisy)"
    finally:
        code = svc.stop()
        out["stop_exit_code"] = code
        if acct is not None:
            acct.close()

    # the baseline: the same plugin, the same number of runs, at the same rate, after the
    # service; with the one before it (at the nominal rate), so that the host drifting
    # between our window and the baseline's cancels out instead of landing in the figure
    rate = runs / elapsed
    after = _baseline(name, "after", entry, rate, runs, stdin_file, log)
    spread = _spread(before, after)
    if spread > BASELINE_SPREAD_MAX:
        # The two bare loops disagree: the host's cost of a plugin moved while we measured,
        # and a difference against their mean would be noise. Measure the pair again, once.
        log(f"  [{name}] the baselines before and after differ by {100 * spread:.0f}%: measuring both again")
        again = (_baseline(name, "before (again)", entry, rate, runs, stdin_file, log),
                 _baseline(name, "after (again)", entry, rate, runs, stdin_file, log))
        if _spread(*again) < spread:
            (before, after), spread = again, _spread(*again)
    out["baseline_spread"] = round(spread, 3)
    out["baseline_stable"] = spread <= BASELINE_SPREAD_MAX
    base = dict(after, before=before)
    out["baseline"] = base
    out["baseline_during_per_run_ms"] = _per_run_ms(base_during)
    (own_1, kids_1), (own_2, kids_2) = _per_run(before), _per_run(after)
    b_own, b_kids = (own_1 + own_2) / 2, (kids_1 + kids_2) / 2
    out["baseline_per_run_ms"] = {"loop_excl_plugin": round(b_own, 4), "plugin": round(b_kids, 4),
                                  "total": round(b_own + b_kids, 4), "before": round(own_1 + kids_1, 4),
                                  "after": round(own_2 + kids_2, 4)}
    ours = out["per_run_ms"]["runtime_total"]
    out["ratio_total_vs_baseline"] = round(ours / (b_own + b_kids), 3)
    out["overhead_beyond_spawn_wait_ms"] = round(ours - (b_own + b_kids), 4)
    out["plugin_cpu_ratio_vs_baseline"] = round(out["per_run_ms"]["plugin"] / b_kids, 3) if b_kids else None
    out["meets_target"] = out["ratio_total_vs_baseline"] <= TARGET_RATIO
    if kind == "sh" and jobs >= 200:
        # Our runners keep to one CPU each, and a quick run with its runner (README: Sandbox).
        # The same placement makes a bare loop's plugins cheaper too: shown, not subtracted.
        out["baseline_one_cpu_per_run_ms"] = _per_run_ms(
            _baseline(name, "on one CPU", entry, rate, runs, stdin_file, log, one_cpu=True))
    return out


def _baseline(name: str, when: str, entry: Path, rate: float, runs: int, stdin_file: Path, log,
              one_cpu: bool = False) -> dict:
    """spawn_baseline.py's loop: `runs` runs of the plugin at `rate` per second, in a cpuacct
    group of its own where there is one; `one_cpu`: kept on one CPU. It starts once the host
    is quiet (what a service just stopped leaves to the kernel, its cgroups above all, made
    the next loop's plugins cost up to twice as much)."""
    busy = wait_quiet()
    log(f"  [{name}] baseline {when}: posix_spawn loop, {runs} runs at {rate:.1f}/s"
        f"{'' if busy is None else f' (the host did not go quiet: {busy:.2f} cores busy)'} ...")
    safe = when.replace(" ", "-").replace("(", "").replace(")", "")
    return BaselineLoop(name, safe, entry, rate, runs, stdin_file, one_cpu).wait()


def wait_quiet(cores: float = QUIET_CORES, limit: float = QUIET_WAIT) -> float | None:
    """Wait until the host has used less than `cores` over half a second, at most `limit`
    seconds; None once it has, else what it was still using."""
    deadline = time.monotonic() + limit
    while True:
        t0, b0 = time.monotonic(), system_busy()
        time.sleep(0.5)
        busy = (system_busy() - b0) / (time.monotonic() - t0)
        if busy < cores:
            return None
        if time.monotonic() >= deadline:
            return busy


def _spread(first: dict, second: dict) -> float:
    """How far apart two bare loops' totals per run are, against their mean."""
    a, b = sum(_per_run(first)), sum(_per_run(second))
    return abs(a - b) / ((a + b) / 2)


class BaselineLoop:
    """spawn_baseline.py started now, in a cpuacct group of its own where there is one."""

    def __init__(self, name: str, when: str, entry: Path, rate: float, runs: int, stdin_file: Path,
                 one_cpu: bool = False):
        self.name, self.rate, self.runs = name, rate, runs
        self.acct = CpuAcct.create(f"baseline-{name}-{when}")
        self.busy0 = system_busy()
        argv = [PYTHON, str(HERE / "spawn_baseline.py"), str(entry), repr(rate), str(runs), str(stdin_file)]
        if self.acct is not None:
            argv = self.acct.wrap(argv + [self.acct.path])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, BASELINE_ONE_CPU="1" if one_cpu else "0"))

    def wait(self) -> dict:
        try:
            stdout, stderr = self.proc.communicate(timeout=self.runs / self.rate * 3 + 30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.acct is not None:
                self.acct.close()
        busy1 = system_busy()
        if self.proc.returncode != 0:
            raise BenchError(f"{self.name}: baseline failed: {stderr.strip()[-500:]}")
        base = json.loads(stdout)
        base["foreign_load_cores"] = round(
            max(0.0, (busy1 - self.busy0) - base["own_cpu"] - base["children_cpu"]) / base["elapsed"], 2)
        if base["failures"]:
            raise BenchError(f"{self.name}: {base['failures']} baseline runs failed")
        return base


def _per_run_ms(base: dict) -> dict:
    """One baseline's ms per run: the loop's own, the plugin's, and both."""
    own, kids = _per_run(base)
    return {"loop_excl_plugin": round(own, 4), "plugin": round(kids, 4), "total": round(own + kids, 4)}


def _per_run(base: dict) -> tuple[float, float]:
    """(the loop's own ms, the plugin's ms) per run of one baseline."""
    own = 1000 * base["own_cpu"] / base["runs"]
    kids = 1000 * base["children_cpu"] / base["runs"]
    if base.get("acct_cpu") is not None:  # exact total; the loop's own part from rusage (microseconds)
        kids = 1000 * base["acct_cpu"] / base["runs"] - own
    return own, kids


def lateness_ms(results, interval: float) -> dict:
    """How late runs start against their job's grid. Each job's grid is taken from its own
    least late run (start - k * interval, smallest over its runs k), so this is a lower bound
    only when every run of a job is late by the same amount; it shows jitter and backlog."""
    starts: dict[str, list[float]] = {}
    for r in results:
        starts.setdefault(r.job_uuid, []).append(iso_to_epoch(r.start))
    late = []
    for times in starts.values():
        times.sort()
        t0 = times[0]
        offsets = [t - t0 - round((t - t0) / interval) * interval for t in times]
        base = min(offsets)
        late += [1000 * (o - base) for o in offsets]
    late.sort()
    if not late:
        return {}
    return {"p50": round(late[len(late) // 2], 2), "p99": round(late[min(len(late) - 1, int(0.99 * len(late)))], 2),
            "max": round(late[-1], 2), "runs": len(late)}


def service_memory(procs: dict) -> dict:
    """USS of every process of the service (MB), and the runners' mean."""
    by_role = {}
    for role in ("supervisor", "zygote", "publisher", "runner"):
        values = []
        for p in procs.get(role, []):
            try:
                values.append(uss_mb(p))
            except psutil.Error:
                pass
        by_role[role] = values
    runners = by_role["runner"]
    return {"total_uss_mb": round(sum(sum(v) for v in by_role.values()), 1),
            "runner_mean_uss_mb": round(sum(runners) / len(runners), 3) if runners else None,
            "by_role_uss_mb": {k: round(sum(v), 1) for k, v in by_role.items()}}


def format_variant(r: dict) -> list[str]:
    pr, b = r["per_run_ms"], r["baseline_per_run_ms"]
    lines = [
        f"  {r['name']}: {r['jobs']} jobs x 1 run/s, window {r['elapsed_s']:.1f}s "
        f"(service up in {r['startup_s']}s; other load on the host: {r['foreign_load_cores']:.2f} cores "
        f"during the window, {r['baseline']['foreign_load_cores']:.2f} during the baseline)",
        f"    runs in window      {r['runs_in_window']} of ~{r['runs_expected_in_window']} nominal "
        f"({r['achieved_rate']:.1f}/s; {'keeps up' if r['keeps_up'] else 'DOES NOT KEEP UP'}); "
        f"not satisfied: {r['not_satisfied_in_window']}",
        f"    delivery            {r['results_in_file']} in file / {r['results_received_by_supervisor']} received by "
        f"the supervisor: lost {r['results_lost']}, duplicates {r['duplicate_results']}, "
        f"runner restarts {r['runner_restarts']}",
        f"    runtime CPU/run     {pr['runtime_excl_plugin']:.3f} ms excl. plugin   "
        f"(baseline loop excl. plugin {b['loop_excl_plugin']:.3f} ms)",
        f"    plugin CPU/run      {pr['plugin']:.3f} ms   (baseline {b['plugin']:.3f} ms; "
        f"x{r['plugin_cpu_ratio_vs_baseline']} - includes the runner's fork child up to exec)",
        f"    total CPU/run       {pr['runtime_total']:.3f} ms vs baseline {b['total']:.3f} ms "
        f"(mean of {b['before']:.3f} before and {b['after']:.3f} after"
        f"{'' if r.get('baseline_stable', True) else ', which disagree: left out of the headline'})  ->  "
        f"ratio {r['ratio_total_vs_baseline']:.2f}x (target <= {TARGET_RATIO}x: "
        f"{'met' if r['meets_target'] else 'NOT met'})",
        f"    plugin drift check  a bare loop at {DURING_RATE:g} runs/s alongside the service, in its window: "
        f"plugin {r['baseline_during_per_run_ms']['plugin']:.3f} ms/run (ours {pr['plugin']:.3f}; the "
        f"baselines' {b['plugin']:.3f})",
        *([f"    bare loop on one CPU (as our runners keep to one): {r['baseline_one_cpu_per_run_ms']['total']:.3f} "
            f"ms/run, plugin {r['baseline_one_cpu_per_run_ms']['plugin']:.3f} ms: ours is "
            f"{pr['runtime_total'] - r['baseline_one_cpu_per_run_ms']['total']:.3f} ms/run over it"]
          if "baseline_one_cpu_per_run_ms" in r else []),
        f"    overhead beyond spawn+wait: {r['overhead_beyond_spawn_wait_ms']:.3f} ms/run   "
        f"(yardsticks: " + ", ".join(f"{k} {v} ms" for k, v in YARDSTICKS_MS.items()) + ")",
        "    where the CPU goes (ms/run, share of the total): " + ", ".join(
            f"{role} {pr[key]:.3f} ({100 * pr[key] / pr['runtime_total']:.0f}%)"
            for role, key in (("supervisor", "supervisor"), ("publisher", "publisher"), ("zygote", "zygote"),
                              ("runners", "runner"), ("plugins incl. fork child", "plugin"))
        ) + (f", other {pr['other']:.3f}" if pr.get("other") else "")
        + (f", ksmd {pr['ksmd']:.3f}" if "ksmd" in pr else ""),
    ]
    if r.get("ksm"):
        lines.append(f"    KSM                 on: merging settled {r['ksm_settle_s']:.0f} s after the warm-up; "
                     f"{r['ksm_pages_sharing']:,} pages shared ({r['ksm_pages_sharing'] * 4 / 1024:.0f} MB saved)")
    lines.append(f"    CPU accounting      {r['cpu_accounting']}")
    m, late = r["memory_active"], r["lateness_ms"]
    lines.append(f"    memory (active)     whole service USS {m['total_uss_mb']:.1f} MB; runner mean USS "
                 f"{m['runner_mean_uss_mb']:.2f} MB; by role {m['by_role_uss_mb']}")
    if late:
        lines.append(f"    schedule lateness   p50 {late['p50']:.1f} ms, p99 {late['p99']:.1f} ms, max {late['max']:.1f} ms "
                     f"over {late['runs']} runs (aim p99 < 20 ms)")
    us = r["cpu_user_system_s"]
    lines.append("    user/sys split (s in window): " + ", ".join(
        f"{role} {v['user']:.2f}/{v['system']:.2f}" for role, v in sorted(us.items())))
    return lines
