"""The openscap plugin (plugins/openscap) on this host: the SCAP Security Guide's standard
profile, the whole plugin run next to `oscap xccdf eval` run by hand with the same arguments.

    .venv/bin/python benchmarks/bench_plugins_openscap.py [repeats]

The plugin runs with its default config (the SSG data stream it picks for this OS, the standard
profile), as a fresh process the way the runtime starts it (no arguments, the scrubbed
environment, the assessment/1 document on stdin, cwd = a scratch folder), twice over:
evaluating the data stream itself (what it does where /tmp can be written) and splitting it
into the scratch folder first (what it does under the runtime's confinement, where only the
scratch folder can be written). "By hand" is the same oscap command line the plugin runs in the
first case (`oscap xccdf eval --results R --profile standard [--cpe OVERRIDE] DS`, the --cpe
only when the content is for another release and its OS platform is taken as met). The
adapter's overhead is the ratio of the median wall times.

Per case, medians over the runs: wall time (spawn to reaped), CPU time (user + system, the
plugin and the oscap it runs, from wait4), peak RSS of the run's process tree (the sum over the
plugin and oscap, sampled every 10 ms with psutil; its largest value over the runs is kept too)
and the largest process's peak RSS (wait4's ru_maxrss, which is oscap's; the kernel's high-water
mark can miss memory given back with madvise, so it may read lower than the sampled peak).
Runs alternate between the cases so that drift in the machine's load hits them alike. When
oscap or SSG content for this OS is missing the benchmark is skipped with the reason. Nothing
is asserted.
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

import psutil

from benchlib import load_module

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugins" / "openscap" / "1.0.0" / "openscap"
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESULT_TYPES = ("pass", "fail", "notapplicable", "notchecked", "error", "unknown", "notselected")


def _env(scratch: str) -> dict:
    return {"PATH": PLUGIN_PATH, "LANG": "C.UTF-8", "HOME": scratch, "ASSESSMENT_JOB_UUID": str(uuid.uuid4()),
            "ASSESSMENT_RUN_UUID": str(uuid.uuid4()), "ASSESSMENT_RUNTIME_UUID": str(uuid.uuid4())}


def _document(config: dict) -> bytes:
    job = {"uuid": str(uuid.uuid4()), "plugin": {"name": "openscap", "version": "1.0.0"}, "interval": "1h",
           "config": config}
    return json.dumps({"protocol": "assessment/1", "run_uuid": str(uuid.uuid4()), "job": job,
                       "config": config}).encode()


def _measure(argv: list[str], stdin: bytes, cwd: str, timeout: float = 900) -> dict:
    """One run: wall, CPU and peak RSS (tree sum sampled, and wait4's largest process)."""
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        fin.write(stdin)
        fin.seek(0)
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=_env(cwd),
                                start_new_session=True)
        peak_tree = 0
        try:
            top = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            top = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                os.killpg(proc.pid, 9)
            if top is not None:
                total = 0
                try:
                    for p in [top] + top.children(recursive=True):
                        try:
                            total += p.memory_info().rss
                        except psutil.NoSuchProcess:
                            pass
                except psutil.NoSuchProcess:
                    pass
                peak_tree = max(peak_tree, total)
            time.sleep(0.01)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        return {"code": proc.returncode, "wall_s": wall, "cpu_s": rusage.ru_utime + rusage.ru_stime,
                "peak_tree_mb": peak_tree / 2 ** 20, "max_process_rss_mb": rusage.ru_maxrss / 1024,
                "stdout": fout.read(), "stderr": ferr.read()}


def _summary(samples: list[dict]) -> dict:
    walls = [s["wall_s"] for s in samples]
    return {"wall_s": {"median": round(statistics.median(walls), 3), "min": round(min(walls), 3),
                       "max": round(max(walls), 3)},
            "cpu_s": round(statistics.median(s["cpu_s"] for s in samples), 3),
            "peak_rss_mb": round(statistics.median(s["peak_tree_mb"] for s in samples), 1),
            "peak_rss_mb_max": round(max(s["peak_tree_mb"] for s in samples), 1),
            "max_process_rss_mb": round(statistics.median(s["max_process_rss_mb"] for s in samples), 1)}


def run(repeats: int = 3, log=print) -> dict:
    report: dict = {"repeats": repeats, "uid": os.getuid()}
    oscap = shutil.which("oscap", path=PLUGIN_PATH)
    if oscap is None:
        report["skipped"] = "oscap is not installed (apt-get install openscap-scanner; dnf install openscap-scanner)"
        log(f"  skipped: {report['skipped']}")
        return report
    m = load_module(PLUGIN, "openscap_plugin")
    config = m.parse_config({}, {})
    try:
        datastream, how, os_text, _ = m.pick_datastream(config)
    except m.Missing as e:
        report["skipped"] = str(e)
        log(f"  skipped: {e}")
        return report
    version = subprocess.run([oscap, "--version"], capture_output=True, text=True).stdout.splitlines()
    platforms = m.os_platforms(datastream)
    platform_check = how in ("explicit", "exact")
    report.update(datastream=datastream, datastream_match=how, os=os_text, profile=config["profile"],
                  platform_check=platform_check, oscap=version[0] if version else oscap)
    scratch = tempfile.mkdtemp(prefix="bench-openscap-")
    hand = tempfile.mkdtemp(prefix="bench-openscap-hand-")
    try:
        argv = [oscap, "xccdf", "eval", "--results", os.path.join(hand, "results.xml"), "--profile", config["profile"]]
        if not platform_check and platforms:
            argv += ["--cpe", m.write_platform_override(hand, platforms)]
        argv.append(datastream)
        report["by_hand_argv"] = argv
        cases = {
            "plugin": ([str(PLUGIN)], _document({"split_datastream": False}), scratch),
            "plugin_split": ([str(PLUGIN)], _document({"split_datastream": True}), scratch),
            "oscap_by_hand": (argv, b"", hand),
        }
        log(f"  {datastream} ({how} for {os_text}), profile {config['profile']}, platform_check "
            f"{str(platform_check).lower()}; {report['oscap']}; {repeats} runs of each case, as uid {os.getuid()}")
        samples: dict[str, list[dict]] = {name: [] for name in cases}
        for i in range(repeats + 1):  # the first round warms the page cache and is not counted
            for name, (cmd, stdin, cwd) in cases.items():
                s = _measure(cmd, stdin, cwd)
                if s["code"] not in ((0,) if name != "oscap_by_hand" else (0, 2)):
                    report["error"] = (f"{name} exited with {s['code']}: "
                                       f"{s['stderr'].decode(errors='replace').strip()[-500:]}")
                    log(f"  FAILED: {report['error']}")
                    return report
                if i:
                    samples[name].append(s)
        for name in cases:
            report[name] = _summary(samples[name])
        result = json.loads(samples["plugin"][-1]["stdout"])
        props = {p["name"]: p["value"] for p in result["observations"][0]["props"]}
        report["counts"] = {t: int(props["rules_" + t]) for t in RESULT_TYPES}
        report["rules_evaluated"] = int(props["rules_evaluated"])
        report["findings"] = len(result["findings"])
        report["status"] = result["status"]
        report["output_kb"] = round(len(samples["plugin"][-1]["stdout"]) / 1024, 1)
        hand_wall = report["oscap_by_hand"]["wall_s"]["median"]
        for name in ("plugin", "plugin_split"):
            report[name]["ratio_to_by_hand"] = round(report[name]["wall_s"]["median"] / hand_wall, 3)
            report[name]["overhead_s"] = round(report[name]["wall_s"]["median"] - hand_wall, 3)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(hand, ignore_errors=True)
    for line in format_result(report):
        log(line)
    return report


def format_result(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"  skipped: {r['skipped']}"]
    if "error" in r:
        return [f"  FAILED: {r['error']}"]
    lines = [f"  {'case':<34} {'wall s median (min-max)':<24} {'CPU s':>6} {'peak RSS':>9} {'largest':>9}  ratio"]
    for name, title in (("plugin", "plugin (evaluates the data stream)"), ("plugin_split", "plugin (splits it first)"),
                        ("oscap_by_hand", "oscap xccdf eval by hand")):
        e = r[name]
        w = e["wall_s"]
        ratio = (f"{e['ratio_to_by_hand']:.2f}x (+{e['overhead_s'] * 1000:.0f} ms)" if "ratio_to_by_hand" in e
                 else "1.00x")
        lines.append(f"  {title:<34} {w['median']:>7.3f} ({w['min']:.3f}-{w['max']:.3f}) {e['cpu_s']:>8.3f} "
                     f"{e['peak_rss_mb']:>6.1f} MB {e['max_process_rss_mb']:>6.1f} MB  {ratio}")
    c = r["counts"]
    lines.append(f"  {r['rules_evaluated']} rules evaluated: {c['pass']} pass, {c['fail']} fail, "
                 f"{c['notapplicable']} notapplicable, {c['notchecked']} notchecked, {c['error']} error, "
                 f"{c['unknown']} unknown ({c['notselected']} not selected); {r['findings']} findings, "
                 f"status {r['status']}, {r['output_kb']} KiB of output")
    return lines


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
