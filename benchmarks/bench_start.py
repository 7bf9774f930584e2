"""Benchmark 7: a start with 1,000 stored specs, to READY and to every runner up.

The service first runs once against a Configuration service (bench_confsync's) that answers
with 1,000 specs (interval 1h, run_on_start false), so that they are in its store; then the
Configuration service goes away and the service is started again, as an offline host boots
with only its stored specs (SPEC §5). It gets a NOTIFY_SOCKET of ours (a datagram socket, as
systemd's): we time READY=1 from the start, and the moment status shows all 1,000 jobs
running with a runner pid.
Baseline, in the same run: a Python process forking 1,000 children that exit at once.
"""

from __future__ import annotations

import os
import socket
import time

from bench_confsync import _fork_baseline, service_with_config_service
from benchlib import Area, BenchError, job_spec, wait_for


def run(area: Area, jobs: int = 1000, log=print) -> dict:
    root = area.sub(f"start-{jobs}")
    server, svc = service_with_config_service(root, "1h")
    server.publish([job_spec(interval="1h", run_on_start=False, title=f"stored job {i}") for i in range(jobs)])
    out: dict = {"jobs": jobs}
    try:
        svc.start()
        wait_for(lambda: (svc.state / "specs" / "http" / "revision").exists(), 120, 0.05, what="the stored specs")
    finally:
        svc.stop()
        server.server.shutdown()
        server.server.server_close()  # from now on its port refuses connections
    notify_path = str(root / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(0.1)
    try:
        os.environ["NOTIFY_SOCKET"] = notify_path
        t0 = time.monotonic()
        try:
            svc.start(timeout=120)
        finally:
            os.environ.pop("NOTIFY_SOCKET", None)
        ready = None
        deadline = t0 + 120
        while ready is None and time.monotonic() < deadline:
            try:
                if b"READY=1" in sock.recv(4096):
                    ready = time.monotonic() - t0
            except TimeoutError:
                pass
        if ready is None:
            raise BenchError(f"no READY=1 within 120 s; log tail:\n{svc.log_tail()}")
        out["ready_s"] = round(ready, 3)
        svc.wait_runners(jobs, timeout=180)
        out["all_running_s"] = round(time.monotonic() - t0, 3)
    finally:
        sock.close()
        out["stop_exit_code"] = svc.stop()
    out["baseline_fork_s"] = round(_fork_baseline(jobs), 3)
    out["ratio_running_to_fork_baseline"] = round(out["all_running_s"] / out["baseline_fork_s"], 2)
    return out


def format_result(r: dict) -> list[str]:
    return [f"  {r['jobs']} stored specs, the Configuration service down: READY after {r['ready_s'] * 1000:.0f} ms, "
            f"all {r['jobs']} runners up after {r['all_running_s'] * 1000:.0f} ms (status polled every 0.5 s)",
            f"    baseline          {r['baseline_fork_s'] * 1000:.0f} ms   a Python process forking {r['jobs']} "
            f"children that exit at once -> {r['ratio_running_to_fork_baseline']:.2f}x"]
