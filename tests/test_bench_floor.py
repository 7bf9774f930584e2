"""`make bench`'s floor stand-ins (benchmarks/bench_floor.py) really run their plugins: a floor
measured over failed spawns would be a number about nothing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from runner.sandbox import HELPER

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_floor  # noqa: E402
from benchlib import Area  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the stand-ins give each job a uid and cgroups"),
    pytest.mark.skipif(not os.access(HELPER, os.X_OK), reason="runner/ar-exec is not built (make venv builds it)"),
]


@pytest.mark.timeout(90)
def test_both_stand_ins_run_their_plugins_through_ar_exec_and_send_a_frame_per_run():
    with Area() as area:
        r = bench_floor.run(area, jobs=4, window=3.0, warmup=1.0, log=lambda *a: None)
    for name in ("c", "python"):
        d = r[name]
        assert "runner_ms_per_run" in d, d  # compiled and measured, not skipped or failed
        assert d["failed_runs"] == 0, d  # every plugin exited 0 with its output read
        assert d["runs"] >= 8, d  # 4 jobs x 1/s over 3 s (12), with slack for the grid
        assert 0 < d["runner_ms_per_run"] < 50, d
    if r["cgroups"] != "-":  # the per-job cgroups are gone again
        assert not any(Path(p).exists() for p in r["cgroups"].split(":"))
    lines = bench_floor.format_result(r)
    assert len(lines) == 2 and all("ms CPU per run" in line for line in lines), lines


@pytest.mark.timeout(90)
def test_a_stand_in_whose_plugin_fails_is_reported_as_an_error_not_measured(monkeypatch):
    monkeypatch.setattr(bench_floor, "SH_PLUGIN", "#!/bin/sh\nexit 3\n")
    with Area() as area:
        r = bench_floor.run(area, jobs=2, window=2.0, warmup=0.5, log=lambda *a: None)
    for name in ("c", "python"):
        assert "runner_ms_per_run" not in r[name], r[name]
        assert "failed" in r[name]["error"] and "exit status" in r[name]["error"], r[name]
