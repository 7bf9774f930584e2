"""Prometheus text exposition for GET /metrics; every name starts with assessment_runtime_."""

from __future__ import annotations

import bisect
import datetime
import time
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.wire import JobDigest
    from supervisor.service import Service

PREFIX = "assessment_runtime_"
# Run durations, in seconds: from a quick shell check (10 ms) to a long scan (5 min).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unix_time(iso: str | None) -> float:
    if not iso:
        return 0
    try:
        return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0


class Metrics:
    """Counters the loop bumps; gauges are read from the live state when rendered."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], int] = defaultdict(int)
        self.duration_sum: dict[str, float] = defaultdict(float)
        # per job: runs in each bucket (not cumulative), the last one +Inf
        self.duration_buckets: dict[str, list[int]] = {}
        self.runner_exits = 0
        self.source_syncs: dict[tuple[str, str], int] = defaultdict(int)

    def runs_committed(self, digest: "JobDigest") -> None:
        job = digest.job_uuid
        for status, n in digest.runs.items():
            self.runs[(job, status)] += n
        buckets = self.duration_buckets.get(job)
        if buckets is None:
            buckets = self.duration_buckets[job] = [0] * (len(DURATION_BUCKETS) + 1)
        for d in digest.durations:
            buckets[bisect.bisect_left(DURATION_BUCKETS, d)] += 1  # le: a run of exactly 1 s is in le="1"
            self.duration_sum[job] += d

    def runner_exited(self) -> None:
        self.runner_exits += 1

    def source_synced(self, kind: str, outcome: str) -> None:
        """kind "http": snapshot, delta, not_modified, gone or failed; kind "dir": ok or failed."""
        self.source_syncs[(kind, outcome)] += 1

    def render(self, service: "Service") -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
            out.append(f"# HELP {PREFIX}{name} {help_}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                out.append(f"{PREFIX}{name}{{{text}}} {value:g}" if text else f"{PREFIX}{name} {value:g}")

        metric("runs_total", "counter", "Plugin runs by job and result status.",
               [({"job": j, "status": s}, n) for (j, s), n in sorted(self.runs.items())])
        name = f"{PREFIX}run_duration_seconds"
        out.append(f"# HELP {name} Wall time of finished runs, by job.")
        out.append(f"# TYPE {name} histogram")
        for job, buckets in sorted(self.duration_buckets.items()):
            label = f'job="{_label(job)}"'
            total = 0
            for bound, n in zip(DURATION_BUCKETS + ("+Inf",), buckets):
                total += n
                out.append(f'{name}_bucket{{{label},le="{bound}"}} {total}')
            out.append(f"{name}_sum{{{label}}} {self.duration_sum[job]:g}")
            out.append(f"{name}_count{{{label}}} {total}")
        runners = service.manager.runners.values()
        now = time.time()
        metric("job_last_result_age_seconds", "gauge", "Seconds since the end of the job's last result.",
               [({"job": r.uuid}, max(0.0, round(now - _unix_time(r.last_result["end"]), 3)))
                for r in sorted(runners, key=lambda r: r.uuid) if r.last_result and r.last_result.get("end")])
        metric("runner_restarts_total", "counter", "Runners restarted after they died.",
               [({"job": r.uuid}, r.restarts) for r in sorted(runners, key=lambda r: r.uuid)])
        states: dict[str, int] = defaultdict(int)
        for r in runners:
            states[r.state] += 1
        metric("jobs", "gauge", "Jobs by runner state.", [({"state": s}, n) for s, n in sorted(states.items())])
        metric("rejected_specs", "gauge", "Specs rejected (invalid or clashing).", [({}, len(service.rejected))])
        status = service.status()["publisher"]
        metric("publisher_restarts_total", "counter", "Publisher restarts.", [({}, service.publisher.restarts)])
        metric("outbox_results", "gauge", "Results in the outbox not yet taken by every sink.",
               [({}, status["outbox_results"])])
        metric("outbox_bytes", "gauge", "Bytes of outbox segment files.", [({}, status["outbox_bytes"])])
        metric("outbox_dropped_total", "counter", "Results dropped at the outbox bound.", [({}, status["dropped"])])
        metric("outbox_up", "gauge", "1 when the outbox takes writes, 0 while results wait in memory (full or "
               "read-only state_dir).", [({}, 0 if status["outbox_error"] else 1)])
        metric("outbox_write_errors_total", "counter", "Failed outbox writes (since the publisher started).",
               [({}, status["outbox_write_errors"])])
        metric("outbox_waiting_results", "gauge", "Results waiting in the publisher's memory for the outbox.",
               [({}, status["waiting"])])
        sinks = status["sinks"]
        for field, kind, help_ in (("delivered", "counter", "Results delivered by sink."),
                                   ("pending", "gauge", "Results waiting for the sink."),
                                   ("failures", "counter", "Failed delivery attempts by sink."),
                                   ("dead_lettered", "counter", "Results the sink refused, kept in dead-letter/.")):
            name = f"sink_{field}_total" if kind == "counter" else f"sink_{field}"
            metric(name, kind, help_, [({"sink": s["name"]}, s.get(field) or 0) for s in sinks])
        metric("sink_oldest_pending_age_seconds", "gauge", "Age of the oldest result waiting for the sink (0: none).",
               [({"sink": s["name"]}, s.get("oldest_pending_age") or 0) for s in sinks])
        metric("sink_last_success_timestamp_seconds", "gauge",
               "Unix time of the sink's last successful delivery (0: none since the publisher started).",
               [({"sink": s["name"]}, _unix_time(s.get("last_success"))) for s in sinks])
        metric("sink_up", "gauge", "1 when the sink's last delivery attempt succeeded (no last_error), else 0.",
               [({"sink": s["name"], "kind": s.get("kind", "")}, 0 if s.get("last_error") else 1) for s in sinks])
        metric("source_consecutive_failures", "gauge", "Failed syncs in a row by source.",
               [({"kind": s["kind"], "location": s["location"]}, s["consecutive_failures"])
                for s in service.status()["sources"]])
        metric("source_syncs_total", "counter", "Source syncs by source kind and outcome.",
               [({"kind": k, "outcome": o}, n) for (k, o), n in sorted(self.source_syncs.items())])
        metric("source_specs", "gauge", "Specs stored by source (before clashes are taken out).",
               [({"kind": k}, len(v)) for k, v in sorted(service.store.specs.items())])
        metric("source_last_success_timestamp_seconds", "gauge", "Unix time of the source's last good sync (0: none).",
               [({"kind": s["kind"], "location": s["location"]}, _unix_time(s["last_success"]))
                for s in service.status()["sources"]])
        return "\n".join(out) + "\n"
