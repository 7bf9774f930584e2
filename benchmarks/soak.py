"""`make soak`: the real service under faults for SOAK_S seconds (default 3600), watched.

    SOAK_S=3600 SOAK_JOBS=200 python benchmarks/soak.py [--scale K] [--out DIR]

200 jobs x 1 s (a /bin/sh plugin) with a file sink and an http sink to a loopback hub, and:
- a random runner SIGKILLed every 10 s;
- the publisher SIGKILLed every 5 min;
- the supervisor SIGKILLed every 20 min and the service started again at once (as systemd
  would restart it; its old runners must notice and leave: orphans are counted);
- the hub answering 503 for 60 s every 7 min.
`--scale K` divides those periods by K, for a short run that still meets every fault.

Every 10 s it samples RSS, USS, fds and threads of every process of the service, by role.
At the end (a clean stop, then the hub drained) it reports, in text and a small hand-written
SVG chart under --out (default benchmarks/results/):
- memory and fds: the mean of the last third against the first third after warm-up (flat:
  within 5%);
- results: every result in the file sink also reached the hub (lost = 0), duplicates at each;
- orphans: processes of ours left after the stop;
- restarts: what was killed, how often.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402

from bench_hub import serve_posts  # noqa: E402
from benchlib import SH_PLUGIN, Area, Service, install_plugin, job_spec, wait_for  # noqa: E402

SAMPLE = 10.0
WARMUP = 60.0
FLAT = 0.05  # the last third within 5% of the first third
OUR_COMMS = ("ar-runner", "ar-zygote", "ar-publisher")
MARK = "AR_SOAK_ROOT"  # in the service's environment: which processes are this soak's


class Hub:
    """Takes JSON arrays of results; answers 503 while `down`. Counts every uuid it took."""

    def __init__(self):
        self.down = False
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server, self.url = serve_posts(self._take, "/results")

    def _take(self, body: bytes) -> int:
        if self.down:
            return 503
        with self.lock:
            for r in json.loads(body):
                self.seen[r["uuid"]] = self.seen.get(r["uuid"], 0) + 1
        return 200


def sample(svc: Service) -> dict:
    out: dict = {"t": time.monotonic()}
    for role, procs in svc.tree().items():
        if role in ("plugin", "other"):
            continue
        rss = uss = fds = threads = 0.0
        n = 0
        for p in procs:
            try:
                mem = p.memory_full_info()
                rss, uss = rss + mem.rss, uss + mem.uss
                fds += p.num_fds()
                threads += p.num_threads()
                n += 1
            except psutil.Error:
                continue
        out[role] = {"n": n, "rss_mb": rss / 2**20, "uss_mb": uss / 2**20, "fds": fds, "threads": threads}
    return out


def orphans(root: Path) -> list[str]:
    """Processes of this service (ours by comm and marked with MARK=root in their environment,
    which runners inherit; or a plugin under our folder) still alive. Other services on the
    machine (a test suite, another soak) are not ours."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            mine = p.info["name"] in OUR_COMMS and p.environ().get(MARK) == str(root)
            if mine or str(root) in " ".join(p.info["cmdline"] or []):
                found.append(f"{p.pid} {p.info['name']} {' '.join(p.info['cmdline'] or [])[:80]}")
        except psutil.Error:
            continue
    return found


def flat(samples: list[dict], role: str, key: str, warmup: float = WARMUP) -> tuple[float, float, float]:
    """(first third mean, last third mean, change) after warm-up: a role's total, or for the
    runners the mean per runner (killed runners come back after a backoff, so their number
    moves)."""
    start = samples[0]["t"] + warmup
    values = [s[role][key] / (s[role]["n"] if role == "runner" else 1)
              for s in samples if s["t"] >= start and role in s and s[role]["n"]]
    if len(values) < 3:
        return 0.0, 0.0, 0.0
    third = len(values) // 3
    first, last = statistics.mean(values[:third]), statistics.mean(values[-third:])
    return first, last, (last - first) / first if first else 0.0


def svg(samples: list[dict], path: Path) -> None:
    """Total USS (MB) and fds of the service over time, two polylines, no dependency."""
    if len(samples) < 2:
        return
    t0 = samples[0]["t"]
    width, height, pad = 800, 300, 40
    series = {
        "USS MB": [sum(s[r]["uss_mb"] for r in ("supervisor", "zygote", "publisher", "runner") if r in s)
                   for s in samples],
        "fds": [sum(s[r]["fds"] for r in ("supervisor", "zygote", "publisher", "runner") if r in s) for s in samples],
    }
    xs = [s["t"] - t0 for s in samples]
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for i, (name, ys) in enumerate(series.items()):
        top = max(ys) or 1
        pts = " ".join(f"{pad + (x / max(xs[-1], 1)) * (width - 2 * pad):.1f},"
                       f"{height - pad - (y / top) * (height - 2 * pad):.1f}" for x, y in zip(xs, ys))
        color = ("#1f77b4", "#d62728")[i]
        lines.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        lines.append(f'<text x="{pad + 200 * i}" y="20" fill="{color}">{name} (max {top:,.0f})</text>')
    lines.append(f'<text x="{pad}" y="{height - 10}">0 s</text>'
                 f'<text x="{width - pad - 40}" y="{height - 10}">{xs[-1]:.0f} s</text></svg>')
    path.write_text("\n".join(lines) + "\n")


def periods_for(scale: float) -> tuple[dict[str, float], float]:
    """The fault periods (s) of `make soak`, divided by `scale`, and how long the hub stays down."""
    return {"runner": 10 / scale, "publisher": 300 / scale, "supervisor": 1200 / scale, "hub": 420 / scale}, 60 / scale


def run(seconds: float, jobs: int, periods: dict[str, float], hub_down_for: float, out_dir: Path,
        sample_every: float = SAMPLE, warmup: float = WARMUP, log=print) -> dict:
    """The soak itself: faults every `periods[kind]` seconds; returns the report (see verdict)."""
    hub = Hub()
    area = Area("ar-soak-")
    root = area.sub("svc")
    svc = Service(root, extra_config=f'[[publisher.sink]]\nname = "hub"\nkind = "http"\nurl = "{hub.url}"\n'
                                     f'allow_http = true\nretry_max = "5s"\n')
    install_plugin(svc.plugins, "trivial", script=SH_PLUGIN)
    for i in range(jobs):
        svc.write_spec(f"job-{i:04d}.json", job_spec(plugin="trivial", interval="1s", title=f"soak {i}"))
    kills = {"runner": 0, "publisher": 0, "supervisor": 0, "hub_outages": 0}
    samples: list[dict] = []
    os.environ[MARK] = str(root)  # inherited by the service's processes (plugins get a scrubbed one)
    try:
        svc.start()
        svc.wait_runners(jobs, timeout=120)
        started = time.monotonic()
        due = {k: started + v for k, v in periods.items()}
        hub_up_at = None
        next_sample = started
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(sample(svc))
                next_sample += sample_every
            if now >= due["runner"]:
                due["runner"] += periods["runner"]
                runners = svc.tree()["runner"]
                if runners:
                    try:
                        random.choice(runners).send_signal(signal.SIGKILL)
                        kills["runner"] += 1
                    except psutil.Error:
                        pass
            if now >= due["publisher"]:
                due["publisher"] += periods["publisher"]
                for p in svc.tree()["publisher"]:
                    p.send_signal(signal.SIGKILL)
                    kills["publisher"] += 1
            if now >= due["supervisor"]:
                due["supervisor"] += periods["supervisor"]
                svc.proc.send_signal(signal.SIGKILL)  # only the supervisor: its children must follow
                svc.proc.wait(10)
                kills["supervisor"] += 1
                svc._logf.close()
                svc._logf = None
                svc.start()
            if hub_up_at is None and now >= due["hub"]:
                due["hub"] += periods["hub"]
                hub.down, hub_up_at = True, now + hub_down_for
                kills["hub_outages"] += 1
            if hub_up_at is not None and now >= hub_up_at:
                hub.down, hub_up_at = False, None
            time.sleep(0.2)
        hub.down = False
        samples.append(sample(svc))
        svc.stop(timeout=60)
        # what the file sink holds must all reach the hub: restart once to drain, then stop
        results = [json.loads(line) for line in svc.results_file.read_text().splitlines() if line.strip()]
        file_uuids = [r["uuid"] for r in results]
        svc.start()
        wait_for(lambda: set(file_uuids) <= set(hub.seen), 120, what="the hub to have every result")
        svc.stop(timeout=60)
        left = orphans(root)
    finally:
        svc.kill_all()
        area.close()
        os.environ.pop(MARK, None)
    file_dupes = len(file_uuids) - len(set(file_uuids))
    report = {
        "seconds": seconds, "jobs": jobs, "periods": periods, "hub_down_for": hub_down_for, "kills": kills,
        "samples": len(samples),
        "results_in_file": len(set(file_uuids)), "duplicates_in_file": file_dupes,
        "lost_between_file_and_hub": len(set(file_uuids) - set(hub.seen)),
        "duplicates_at_hub": sum(n - 1 for n in hub.seen.values() if n > 1), "orphans": left,
        "flat": {f"{role}.{key}": [round(v, 3) for v in flat(samples, role, key, warmup)]
                 for role in ("supervisor", "zygote", "publisher", "runner") for key in ("uss_mb", "fds", "threads")},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"soak-{stamp}.json").write_text(json.dumps({**report, "series": samples}, indent=1) + "\n")
    svg(samples, out_dir / f"soak-{stamp}.svg")
    every = ", ".join(f"{kind} {period:g} s" for kind, period in periods.items())
    lines = [f"soak: {seconds:.0f} s, {jobs} jobs x 1 s; faults every: {every} (hub down {hub_down_for:g} s); "
             f"kills {kills}",
             f"results {report['results_in_file']:,} in the file, lost between file and hub "
             f"{report['lost_between_file_and_hub']}, duplicates: file {file_dupes}, hub {report['duplicates_at_hub']}",
             f"orphans after the stop: {len(left)}"]
    lines.append("memory, fds, threads after warm-up (runners: per runner):")
    for name, (first, last, change) in report["flat"].items():
        mark = "flat" if abs(change) <= FLAT else "NOT flat"
        lines.append(f"  {name:<20} first third {first:10.2f}  last third {last:10.2f}  {change:+.1%}  {mark}")
    (out_dir / f"soak-{stamp}.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        log(line)
    return report


def expected_faults(seconds: float, periods: dict[str, float]) -> dict[str, int]:
    """How many of each fault a run of `seconds` must have met (the first is due one period in;
    a runner kill finds no runner while they all restart, so 90% of those)."""
    due = {kind: max(0, math.ceil(seconds / period) - 1) for kind, period in periods.items()}
    due["runner"] = int(due["runner"] * 0.9)
    due["hub_outages"] = due.pop("hub")
    return due


def verdict(report: dict, expected_kills: dict[str, int], flat_within: float = FLAT,
            flat_keys: tuple[str, ...] = ("uss_mb", "fds", "threads"), not_judged: tuple[str, ...] = ()) -> list[str]:
    """What went wrong, if anything: results lost between the file and the hub, orphans, a
    fault that did not happen as often as planned, a figure that is not flat."""
    bad = []
    if report["lost_between_file_and_hub"]:
        bad.append(f"{report['lost_between_file_and_hub']} results in the file never reached the hub")
    if report["orphans"]:
        bad.append(f"orphans after the stop: {report['orphans']}")
    for kind, least in expected_kills.items():
        if report["kills"][kind] < least:
            bad.append(f"{kind}: {report['kills'][kind]} faults, expected at least {least}")
    for name, (first, last, change) in report["flat"].items():
        if name.split(".")[1] in flat_keys and name not in not_judged and abs(change) > flat_within:
            bad.append(f"{name} not flat: {first:.2f} -> {last:.2f} ({change:+.1%}, allowed {flat_within:.0%})")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="divide the fault periods by this")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    seconds = float(os.environ.get("SOAK_S", "3600"))
    jobs = int(os.environ.get("SOAK_JOBS", "200"))
    periods, hub_down_for = periods_for(args.scale)
    report = run(seconds, jobs, periods, hub_down_for, Path(args.out))
    bad = verdict(report, expected_faults(seconds, periods))
    for line in bad:
        print(f"soak: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
