"""`make bench`: every benchmark in turn, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/run.py [--window S] [--quick] [--only NAME ...] [--json FILE]

Prints a readable report and writes the numbers to benchmarks/last-run.json. Nothing is
asserted: targets are shown next to the measurements. The service is started for real
through its CLI (`python -m supervisor run --config F`) in a scratch folder under /tmp that
is removed at the end; every process started is killed at the end, even on error.

Benchmarks:
  per-run    CPU per plugin run (runtime's own processes, and the plugins) vs a bare
             posix_spawn+waitpid loop, for a /bin/sh plugin and a compiled C plugin, at
             100 and (if the machine keeps up) 200 runs/s
  floor      the floor under a runner's CPU per run: stand-ins making a runner's per-run system
             calls through ar-exec with the full sandbox, in C and in minimal Python (bench_floor.py)
  spawn      diagnostic: the runner's spawn path (fork of a Python process) vs posix_spawn
  memory     USS of idle runners vs a fresh Python interpreter
  latency    spec file change -> first result of the new revision, vs a fresh `python -c pass`
  outbox     benchmarks/outbox_bench.run(), when that module is present
  confsync   a 1,000-spec snapshot from the Configuration service: stored, every runner running
             (vs the same atomic writes, and 1,000 forks); then a 1-spec delta touches 1 runner
  hub        the http sink: results/s from the outbox to a loopback hub (batched vs one POST per
             result), and the publisher's memory with 1 million results pending (bench_hub.py)
  start      1,000 stored specs, Configuration service down: start to READY=1, to every runner up
  confine    what Landlock (and a capability grant) adds to starting one plugin: ar-exec plain,
             confined, confined + CAP_DAC_READ_SEARCH, interleaved (bench_confine.py)
  plugins    the CIS-style plugins (wall, CPU, peak RSS each) and the openscap plugin on the SSG
             standard profile against `oscap xccdf eval` by hand (bench_plugins_*.py)
  sinks      the ccf sink (evidence/s to a loopback CCF stand-in, vs a bare urllib3 POST loop) and
             the nats sink (a 50,000-result backlog drained into JetStream, vs a bare socket
             loop publishing the same messages) (bench_sinks.py)

The summary ends with the per-job cost table (issue 9): each figure, ours, the baseline
measured in the same run, the ratio, and the target.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402
from benchlib import IS_ROOT, PYTHON, RUN_AS_USER, SH_PLUGIN, Area, Ksm, compile_c_plugin  # noqa: E402

HEADLINE_REPEATS = 2  # per-run-sh-200 runs 1 + this many times (not with --quick)
ALL = ("per-run", "floor", "spawn", "memory", "latency", "outbox", "confsync", "hub", "start", "sinks", "confine", "plugins")


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def section(title: str) -> None:
    say("", f"== {title} " + "=" * max(0, 74 - len(title)))


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every finally: services are stopped


def environment() -> dict:
    return {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "root": IS_ROOT,
            "run_as_user": RUN_AS_USER if IS_ROOT else None, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# -- the benchmarks ------------------------------------------------------------------------

def bench_per_run(area: Area, args, report: dict) -> None:
    import bench_per_run as b
    section("1. per-run cost: CPU per plugin run vs a bare posix_spawn+waitpid loop")
    c_binary, how = compile_c_plugin(area.path)
    report["c_plugin"] = how if c_binary else None
    say(f"  plugins: /bin/sh script (`cat >/dev/null; echo ...`, {os.path.realpath('/bin/sh')}); "
        f"C: {how if c_binary else 'skipped: ' + how}")
    kinds = ["sh"] + (["c"] if c_binary else [])
    rates = [100] if args.quick else [100, 200]
    results = report.setdefault("per_run", [])
    kept_up = {}
    for jobs in rates:
        for kind in kinds:
            if jobs > rates[0] and not kept_up.get(kind, False):
                say(f"  per-run-{kind}-{jobs}: skipped, the machine did not keep up at {rates[0]} runs/s")
                results.append({"name": f"per-run-{kind}-{jobs}", "skipped": "did not keep up at the lower rate"})
                continue
            say(f"  [per-run-{kind}-{jobs}] {jobs} jobs x 1 run/s: warm-up {args.warmup:g}s, "
                f"window {args.window:g}s ...")
            try:
                r = b.run_variant(area, kind, jobs, args.window, args.warmup, c_binary=c_binary, log=say)
            except Exception as e:  # noqa: BLE001 - one failed variant must not end the run
                say(f"  per-run-{kind}-{jobs}: FAILED: {e}")
                results.append({"name": f"per-run-{kind}-{jobs}", "error": str(e),
                                "traceback": traceback.format_exc()})
                continue
            results.append(r)
            kept_up[kind] = kept_up.get(kind, True) and r["keeps_up"]
            say(*b.format_variant(r))
    # what Landlock costs per run: the top rate's sh variant again with confine = false
    top = f"per-run-sh-{rates[-1]}"
    confined = next((r for r in results if r.get("name") == top and "per_run_ms" in r), None)
    if confined is None:
        return
    # the headline again: the sh plugin's own CPU (about 3 ms a run here) drifts by a few per
    # cent between our window and the baseline's, which moves the extra by +-0.15 ms; the
    # issue-9 table gives the median of these runs and their spread
    for i in range(0 if args.quick else HEADLINE_REPEATS):
        _variant(b, area, args, results, rates[-1], f"{top}-again{i + 1}", "the headline again",
                 label=f"{top}-again{i + 1}")
    r = _variant(b, area, args, results, rates[-1], f"{top}-unconfined", "the same with confine = false", confine=False)
    if r is not None:
        extra = confined["overhead_beyond_spawn_wait_ms"] - r["overhead_beyond_spawn_wait_ms"]
        report["confine_cost_ms"] = round(extra, 3)
        say(f"  confinement costs {extra:+.3f} ms per run (confined {confined['overhead_beyond_spawn_wait_ms']:.3f} "
            f"vs unconfined {r['overhead_beyond_spawn_wait_ms']:.3f} ms beyond the bare loop; the spread between "
            f"runs of the same variant is about 0.1 ms)")
    # the same with the host's KSM on: runners offer their pages, ksmd merges the identical ones
    if Ksm.available():
        _variant(b, area, args, results, rates[-1], f"{top}-ksm",
                 "the same with KSM on (/sys/kernel/mm/ksm/run = 1; put back after)", ksm=True)


def _variant(b, area: Area, args, results: list, jobs: int, name: str, what: str, **kwargs) -> dict | None:
    """One more shape of the sh measurement at `jobs` jobs; its result, or None when it failed."""
    say(f"  [{name}] {what} ...")
    try:
        r = b.run_variant(area, "sh", jobs, args.window, args.warmup, log=say, **kwargs)
    except Exception as e:  # noqa: BLE001 - one failed variant must not end the run
        say(f"  {name}: FAILED: {e}")
        results.append({"name": name, "error": str(e), "traceback": traceback.format_exc()})
        return None
    results.append(r)
    say(*b.format_variant(r))
    return r


def bench_floor(area: Area, args, report: dict) -> None:
    import bench_floor as b
    measure(report, "floor", "1b. the floor under a runner: its per-run system calls in C and in minimal Python",
            lambda: b.run(area, jobs=100 if args.quick else 200, window=args.window, warmup=args.warmup + 1, log=say),
            b.format_result)


def bench_spawn(area: Area, args, report: dict) -> None:
    section("1c. diagnostic: the runner's spawn path vs posix_spawn (same process size)")
    c_binary, how = compile_c_plugin(area.path)
    scratch = area.sub("spawn-scratch")
    scratch.chmod(0o700)
    if IS_ROOT:
        import pwd
        pw = pwd.getpwnam(RUN_AS_USER)
        os.chown(scratch, pw.pw_uid, pw.pw_gid)
    plugins = area.sub("spawn-plugins")
    entries = {"sh": benchlib.install_plugin(plugins, "trivial-sh", script=SH_PLUGIN)}
    if c_binary:
        entries["c"] = benchlib.install_plugin(plugins, "trivial-c", binary=c_binary)
    out = report.setdefault("spawn_paths", {})
    count = 150 if args.quick else 300
    for kind, entry in entries.items():
        r = subprocess.run([PYTHON, str(HERE / "bench_spawn_paths.py"), str(entry), str(count), str(scratch)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            say(f"  {kind}: FAILED: {r.stderr.strip()[-400:]}")
            out[kind] = {"error": r.stderr.strip()[-2000:]}
            continue
        d = json.loads(r.stdout)
        out[kind] = d
        s, p = d["sandbox_fork"], d["posix_spawn"]
        say(f"  {kind} plugin, {count} sequential starts in a runner-sized process ({d['process'].get('VmRSS')} RSS):",
            f"    runner.sandbox.Sandbox.spawn (fork)   {s['own_ms']:.3f} ms parent + {s['children_ms']:.3f} ms child "
            f"= {s['total_ms']:.3f} ms CPU/start",
            f"    os.posix_spawn (vfork-style)          {p['own_ms']:.3f} ms parent + {p['children_ms']:.3f} ms child "
            f"= {p['total_ms']:.3f} ms CPU/start",
            f"    -> the fork path costs {s['total_ms'] - p['total_ms']:.3f} ms more per run "
            f"({s['total_ms'] / p['total_ms']:.1f}x)")
        extra = s["total_ms"] - p["total_ms"]
        for r in report.get("per_run", []):
            if r.get("plugin") == kind and "per_run_ms" in r:
                total, base = r["per_run_ms"]["runtime_total"], r["baseline_per_run_ms"]["total"]
                d["estimate_without_fork_" + r["name"]] = {"total_ms": round(total - extra, 3),
                                                           "ratio": round((total - extra) / base, 2)}
                say(f"       estimate for {r['name']} without that cost: {total - extra:.2f} ms/run -> "
                    f"{(total - extra) / base:.2f}x the baseline (measured {total / base:.2f}x)")


def measure(report: dict, key: str, title: str, run, fmt=None) -> None:
    """One benchmark: its section, its numbers in report[key] (or the error), its lines."""
    section(title)
    try:
        r = run()
    except Exception as e:  # noqa: BLE001 - one failed benchmark must not end the run
        say(f"  FAILED: {e}")
        report[key] = {"error": str(e), "traceback": traceback.format_exc()}
        return
    report[key] = r
    if fmt is not None:
        say(*fmt(r))


def bench_memory(area: Area, args, report: dict) -> None:
    import bench_memory as b
    measure(report, "memory", "2. idle runner memory (USS) vs a fresh interpreter per job",
            lambda: b.run(area, jobs=20 if args.quick else 200, log=say), b.format_result)

def bench_latency(area: Area, args, report: dict) -> None:
    import bench_spec_latency as b
    measure(report, "spec_latency", "3. spec change latency vs a fresh `python -c pass`",
            lambda: b.run(area, repeats=5 if args.quick else 10, log=say), b.format_result)

def bench_outbox(area: Area, args, report: dict) -> None:
    section("4. outbox (benchmarks/outbox_bench.py)")
    try:
        mod = importlib.import_module("outbox_bench")
    except ModuleNotFoundError as e:
        if e.name != "outbox_bench":
            raise
        say("  skipped: benchmarks/outbox_bench.py is not there (yet); nothing to run")
        report["outbox"] = {"skipped": "benchmarks/outbox_bench.py not present"}
        return
    except Exception as e:  # noqa: BLE001 - a broken module must not end the run
        say(f"  skipped: benchmarks/outbox_bench.py does not import: {type(e).__name__}: {e}")
        report["outbox"] = {"error": f"import failed: {e}", "traceback": traceback.format_exc()}
        return
    if not callable(getattr(mod, "run", None)):
        say("  skipped: benchmarks/outbox_bench.py has no run() function")
        report["outbox"] = {"skipped": "outbox_bench has no run()"}
        return
    try:
        r = mod.run()
    except Exception as e:  # noqa: BLE001
        say(f"  FAILED: outbox_bench.run() raised {type(e).__name__}: {e}")
        report["outbox"] = {"error": str(e), "traceback": traceback.format_exc()}
        return
    report["outbox"] = r
    say(*format_outbox(r))


def bench_confsync(area: Area, args, report: dict) -> None:
    import bench_confsync as b
    measure(report, "confsync", "5. Configuration service: 1,000-spec snapshot, then a 1-spec delta",
            lambda: b.run(area, jobs=1000, log=say), b.format_result)

def bench_hub(area: Area, args, report: dict) -> None:
    import bench_hub as b
    measure(report, "hub", "6. http sink: outbox -> loopback hub, batched vs one POST per result; memory with 1M pending",
            lambda: b.run(results=100_000 if args.quick else 200_000, single_window=3.0 if args.quick else 5.0,
                          pending=1_000_000, log=say))

def bench_start(area: Area, args, report: dict) -> None:
    import bench_start as b
    measure(report, "start", "7. start with 1,000 stored specs: to READY, to every runner up",
            lambda: b.run(area, jobs=200 if args.quick else 1000, log=say), b.format_result)

def bench_sinks(area: Area, args, report: dict) -> None:
    import bench_sinks as b
    measure(report, "sinks", "8. ccf and nats sinks: evidence/s to a CCF stand-in, a backlog drained into JetStream",
            lambda: b.run(ccf=2_000 if args.quick else 5_000, nats=20_000 if args.quick else 50_000, log=say))


def bench_confine(area: Area, args, report: dict) -> None:
    import bench_confine as b
    measure(report, "confine", "9. confinement: CPU to start one plugin, plain vs Landlock vs Landlock + a capability",
            lambda: b.run(runs=1500 if args.quick else 3000, log=say))


def bench_plugins(area: Area, args, report: dict) -> None:
    import bench_plugins_cis as cis
    import bench_plugins_openscap as scap
    measure(report, "plugins_cis", "10. CIS-style plugins on this host: wall time, CPU and peak RSS each",
            lambda: cis.run(repeats=3 if args.quick else 10, log=say), cis.format_result)
    measure(report, "plugins_openscap", "11. openscap plugin: the SSG standard profile vs oscap xccdf eval by hand",
            lambda: scap.run(repeats=2 if args.quick else 5, log=say))


def format_outbox(r) -> list[str]:
    if not isinstance(r, dict):
        return [f"  {r!r}"]
    lines = []
    rest = {k: v for k, v in r.items() if k != "cases"}
    if rest:
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in rest.items()))
    cases = r.get("cases")
    if isinstance(cases, list) and cases and all(isinstance(c, dict) for c in cases):
        keys = list(dict.fromkeys(k for c in cases for k in c))
        widths = [max(len(k), *(len(_fmt(c.get(k))) for c in cases)) for k in keys]
        lines.append("  " + "  ".join(k.rjust(w) for k, w in zip(keys, widths)))
        for c in cases:
            lines.append("  " + "  ".join(_fmt(c.get(k)).rjust(w) for k, w in zip(keys, widths)))
    elif cases is not None:
        lines.append(f"  cases: {cases!r}")
    return lines


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# -- summary -------------------------------------------------------------------------------

def summary(report: dict) -> list[str]:
    lines = []
    for r in report.get("per_run", []):
        if "error" in r:
            lines.append(f"  {r['name']:<18} FAILED: {r['error'].splitlines()[0]}")
        elif "skipped" in r:
            lines.append(f"  {r['name']:<18} skipped ({r['skipped']})")
        else:
            lines.append(
                f"  {r['name']:<18} {r['per_run_ms']['runtime_total']:.2f} ms/run vs baseline "
                f"{r['baseline_per_run_ms']['total']:.2f} ms -> {r['ratio_total_vs_baseline']:.2f}x "
                f"(target <= 1.3x); overhead beyond spawn+wait {r['overhead_beyond_spawn_wait_ms']:.2f} ms "
                f"(Nagios 0.51, Icinga 1.4); lost {r['results_lost']}")
    m = report.get("memory")
    if m and "runner_uss_mb" in m:
        lines.append(f"  {'idle runner USS':<18} mean {m['runner_uss_mb']['mean']:.2f} MB "
                     f"(max {m['runner_uss_mb']['max']:.2f}) -> {m['ratio_median_to_target']:.2f}x of the "
                     f"{m['target_mb']:g} MB target; fresh python {m['baseline_fresh_python']['uss_mb']:.2f} MB")
    s = report.get("spec_latency")
    if s and "latency_s" in s:
        lines.append(f"  {'spec change':<18} median {1000 * s['latency_s']['median']:.0f} ms, "
                     f"max {1000 * s['latency_s']['max']:.0f} ms -> {s['ratio_median_to_python_start']:.1f}x "
                     f"a fresh `python -c pass` ({1000 * s['baseline_python_start_s']['median']:.0f} ms)")
    c = report.get("confsync")
    if c and "all_running_s" in c:
        lines.append(f"  {'confsync 1000':<18} stored {1000 * c['snapshot_stored_s']:.0f} ms "
                     f"({c['ratio_stored_to_baseline']:.2f}x the same atomic writes), all running "
                     f"{1000 * c['all_running_s']:.0f} ms ({c['ratio_running_to_fork_baseline']:.2f}x 1,000 forks); "
                     f"1-spec delta {1000 * c['delta_applied_s']:.0f} ms, touched {c['runners_touched_by_delta']}")
    h = report.get("hub")
    if isinstance(h, dict) and "batched" in h:
        m = h["memory"]
        lines.append(f"  {'http sink':<18} {h['batched']['per_s']:,} results/s batched (target >= 20,000), "
                     f"{h['single']['per_s']:,}/s one POST each -> {h['speedup']}x (target >= 20x); publisher USS "
                     f"{m['pending']['uss_mb']} MB with {m['pending']['pending']:,} pending "
                     f"(+{m['uss_growth_mb']} MB over 1 pending)")
    t = report.get("start")
    if t and "ready_s" in t:
        lines.append(f"  {'start ' + str(t['jobs']) + ' stored':<18} READY {1000 * t['ready_s']:.0f} ms, all runners up "
                     f"{1000 * t['all_running_s']:.0f} ms ({t['ratio_running_to_fork_baseline']:.2f}x {t['jobs']} forks)")
    for kind, unit, target in (("ccf", "evidence/s", "500/s"), ("nats", "results/s", "10,000/s")):
        r = (report.get("sinks") or {}).get(kind)
        if isinstance(r, dict) and "per_s" in r:
            lines.append(f"  {kind + ' sink':<18} {r['per_s']:,} {unit} (target >= {target}) -> {r['ratio_to_bare']}x "
                         f"a bare loop of the same requests ({r['bare_per_s']:,}/s)")
        elif isinstance(r, dict) and "error" in r:
            lines.append(f"  {kind + ' sink':<18} FAILED: {r['error']}")
    c = report.get("confine")
    if isinstance(c, dict) and "confined" in c:
        lines.append(f"  {'confinement':<18} +{c['confined']['extra_cpu_us']:.1f} us CPU per plugin start "
                     f"({c['confined']['ratio_cpu']}x plain ar-exec), +{c['confined+capability']['extra_cpu_us']:.1f} us "
                     f"with a capability grant" + (f"; per run in the service: {report['confine_cost_ms']:+.3f} ms "
                                                   f"(within the run-to-run spread)" if 'confine_cost_ms' in report else ""))
    for name, e in ((report.get("plugins_cis") or {}).get("plugins") or {}).items():
        if isinstance(e, dict) and "wall_ms" in e:
            lines.append(f"  {'plugin ' + name:<18} {e['wall_ms']['median']:.0f} ms wall, {e['cpu_ms']:.0f} ms CPU, "
                         f"{e['peak_rss_mb']:.1f} MB peak RSS")
    o = report.get("plugins_openscap")
    if isinstance(o, dict) and "plugin" in o:
        c = o["counts"]
        lines.append(f"  {'plugin openscap':<18} {o['plugin']['wall_s']['median']:.2f} s vs oscap by hand "
                     f"{o['oscap_by_hand']['wall_s']['median']:.2f} s -> {o['plugin']['ratio_to_by_hand']:.2f}x "
                     f"(split first {o['plugin_split']['ratio_to_by_hand']:.2f}x); peak RSS {o['plugin']['peak_rss_mb']:.0f} MB; "
                     f"{o['rules_evaluated']} rules: {c['pass']} pass, {c['fail']} fail, "
                     f"{c['notapplicable']} notapplicable, {c['notchecked']} notchecked")
    elif isinstance(o, dict) and "skipped" in o:
        lines.append(f"  {'plugin openscap':<18} skipped: {o['skipped']}")
    o = report.get("outbox")
    if isinstance(o, dict) and isinstance(o.get("cases"), list):
        ratios = [c.get("ratio") for c in o["cases"] if isinstance(c, dict) and "ratio" in c]
        if ratios:
            lines.append(f"  {'outbox':<18} ours/baseline by batch size: " + ", ".join(
                f"{c.get('batch')}: {c.get('ratio')}" for c in o["cases"]))
    lines += cost_table(report)
    return lines


def cost_table(report: dict) -> list[str]:
    """Issue 9's figures at 200 jobs x 1 s (sh plugin): ours, the same-run baseline, the
    ratio, and the target (must / aim)."""
    rows = []
    runs = {r.get("name"): r for r in report.get("per_run", []) if "per_run_ms" in r}
    for name, how in (("per-run-sh-200", "KSM off"), ("per-run-sh-200-ksm", "KSM on")):
        run = runs.get(name)
        if not run:
            continue
        tries = [run] + [r for n, r in runs.items() if n.startswith(f"{name}-again")]
        # only runs whose bare loops before and after agreed: a difference against a loop
        # whose plugins' cost moved by more than our whole figure says nothing about us
        stable = [r for r in tries if r.get("baseline_stable", True)]
        left_out = f"; {len(tries) - len(stable)} left out, their baselines disagreed" if len(stable) < len(tries) else ""
        if not stable:
            rows.append((f"extra CPU per run over the bare loop, {how}",
                         f"not measured: in all {len(tries)} runs the bare loops before and after disagreed",
                         "-", "-", "<= 0.5 ms (aim 0.3)", None))
            run = tries[0]
        else:
            extras = sorted(r["overhead_beyond_spawn_wait_ms"] for r in stable)
            run = min(stable, key=lambda r: abs(r["overhead_beyond_spawn_wait_ms"] - statistics.median(extras)))
            ours = f"{run['overhead_beyond_spawn_wait_ms']:.3f} ms" + (
                f" (median of {len(extras)}: {extras[0]:.2f}-{extras[-1]:.2f}{left_out})" if len(tries) > 1 else "")
            base = run["baseline_per_run_ms"]["total"]
            rows.append((f"extra CPU per run over the bare loop, {how}", ours,
                         f"{base:.3f} ms/run", f"{run['ratio_total_vs_baseline']:.2f}x",
                         "<= 0.5 ms (aim 0.3)", run["overhead_beyond_spawn_wait_ms"] <= 0.5))
        pinned = run.get("baseline_one_cpu_per_run_ms")
        if pinned:  # the same placement given to the bare loop (our runners keep to one CPU each)
            extra = run["per_run_ms"]["runtime_total"] - pinned["total"]
            rows.append((f"  the same over a bare loop kept on one CPU, {how}", f"{extra:.3f} ms",
                         f"{pinned['total']:.3f} ms/run", f"{run['per_run_ms']['runtime_total'] / pinned['total']:.2f}x",
                         "(for comparison)", extra <= 0.5))
        floor = report.get("floor") or {}
        if how == "KSM off" and "runner_ms_per_run" in floor.get("c", {}):
            # what a runner alone costs per run, against stand-ins making its system calls
            for key, what in (("c", "in C"), ("python", "in minimal Python")):
                if "runner_ms_per_run" in floor.get(key, {}):
                    base = floor[key]["runner_ms_per_run"]
                    rows.append((f"  runner CPU per run, against a stand-in {what}", f"{run['per_run_ms']['runner']:.3f} ms",
                                 f"{base:.3f} ms/run", f"{run['per_run_ms']['runner'] / base:.2f}x", "(for comparison)",
                                 None))
        m = run["memory_active"]
        rows.append((f"whole service USS, 200 jobs x 1 s, {how}", f"{m['total_uss_mb']:.0f} MB", "-", "-",
                     "<= 350 MB (aim 250)", m["total_uss_mb"] <= 350))
        if how == "KSM off":
            for key, what in (("c", "in C"), ("python", "in minimal Python")):
                if "uss_mb_mean" in floor.get(key, {}):
                    base = floor[key]["uss_mb_mean"]
                    rows.append((f"  USS per active runner, against a stand-in {what}", f"{m['runner_mean_uss_mb']:.2f} MB",
                                 f"{base:.3f} MB", f"{m['runner_mean_uss_mb'] / base:.1f}x", "(for comparison)", None))
    run = runs.get("per-run-sh-200")
    if run:
        if run.get("lateness_ms"):
            rows.append(("schedule lateness p99, 200 jobs", f"{run['lateness_ms']['p99']:.1f} ms", "-", "-",
                         "aim < 20 ms", run["lateness_ms"]["p99"] < 20))
    mem = report.get("memory")
    if mem and "runner_uss_mb" in mem:
        fresh = mem["baseline_fresh_python"]["uss_mb"]
        rows.append((f"mean USS per idle runner ({mem['jobs']} jobs)", f"{mem['runner_uss_mb']['mean']:.2f} MB",
                     f"{fresh:.2f} MB fresh python", f"{mem['runner_uss_mb']['mean'] / fresh:.2f}x",
                     "<= 1.5 MB (aim 1.0)", mem["runner_uss_mb"]["mean"] <= 1.5))
        rows.append((f"whole service USS, {mem['jobs']} idle jobs", f"{mem['service_total_uss_mb']:.0f} MB",
                     f"{mem['jobs'] * fresh:.0f} MB as fresh pythons", f"{mem['service_total_uss_mb'] / (mem['jobs'] * fresh):.2f}x",
                     "<= 350 MB (aim 250)", mem["service_total_uss_mb"] <= 350))
    if not rows:
        return []
    head = ("figure", "ours", "baseline", "ratio", "target", "met")
    cells = [head] + [(a, b, c, d, e, "-" if ok is None else "yes" if ok else "NO") for a, b, c, d, e, ok in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    out = ["", "  per-job cost (issue 9):"]
    for row in cells:
        out.append("  " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="assessment-runtime benchmarks (printed, never asserted)")
    parser.add_argument("--window", type=float, default=12.0, help="measurement window per per-run variant (s)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up before each window (s)")
    parser.add_argument("--quick", action="store_true", help="shorter windows, 100 runs/s only, fewer repeats")
    parser.add_argument("--only", nargs="+", choices=ALL, help="run only these benchmarks")
    parser.add_argument("--json", default=str(HERE / "last-run.json"), help="where to write the numbers")
    args = parser.parse_args(argv)
    if args.quick:
        args.window = min(args.window, 6.0)
        args.warmup = min(args.warmup, 2.0)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = time.monotonic()
    report: dict = {"environment": environment(), "settings": {"window_s": args.window, "warmup_s": args.warmup,
                                                              "quick": args.quick}}
    env = report["environment"]
    say(f"assessment-runtime benchmarks - python {env['python']}, {env['cpus']} CPUs, kernel {env['kernel']}, "
        f"load average {env['loadavg'][0]:.2f}" + (f", plugins run as {RUN_AS_USER}" if IS_ROOT else ""))
    if env["loadavg"][0] > 0.5 * (env["cpus"] or 1):
        say(f"  note: the machine is busy (load average {env['loadavg'][0]:.2f}); CPU-time numbers hold up, "
            f"rates and latencies may not")
    if IS_ROOT:
        import pwd
        try:
            pwd.getpwnam(RUN_AS_USER)
        except KeyError:
            say(f"cannot run: we are root and user {RUN_AS_USER!r} does not exist")
            return 1
    steps = {"per-run": bench_per_run, "floor": bench_floor, "spawn": bench_spawn, "memory": bench_memory, "latency": bench_latency,
             "outbox": bench_outbox, "confsync": bench_confsync, "hub": bench_hub, "start": bench_start,
             "sinks": bench_sinks, "confine": bench_confine, "plugins": bench_plugins}
    chosen = args.only or list(ALL)
    area = Area()
    code = 0
    try:
        for name in ALL:
            if name in chosen:
                steps[name](area, args, report)
    except (KeyboardInterrupt, SystemExit) as e:
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
        say("", f"interrupted ({type(e).__name__}): every service started was stopped")
        report["interrupted"] = True
    finally:
        area.close()
        report["duration_s"] = round(time.monotonic() - started, 1)
        section("summary")
        say(*summary(report))
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            say(f"  numbers written to {os.path.relpath(args.json)}; took {report['duration_s']:.0f}s")
        except OSError as e:
            say(f"  cannot write {args.json}: {e}")
    if code == 0 and failed(report):
        say("  some benchmarks could not be carried out (see FAILED above)")
        code = 1
    return code


def failed(report: dict) -> bool:
    parts = list(report.get("per_run", [])) + [report.get(k) for k in ("floor", "memory", "spec_latency", "outbox", "confsync", "hub",
                                                                       "start", "confine", "plugins_cis",
                                                                       "plugins_openscap")]
    parts += list(report.get("spawn_paths", {}).values())
    parts += list((report.get("sinks") or {}).values()) if isinstance(report.get("sinks"), dict) else []
    return any(isinstance(p, dict) and "error" in p for p in parts)


if __name__ == "__main__":
    sys.exit(main())
