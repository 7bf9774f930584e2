"""What an operator sees (SPEC §8): processes named in ps, a log line per status change, and
run durations as a Prometheus histogram."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import psutil
import pytest

from conftest import OK_PLUGIN, control_status, make_plugin, spec, wait_for
from supervisor.control import request

# Counts its runs in a mark file (its scratch folder is emptied before each run):
# satisfied, satisfied, not-satisfied, not-satisfied, error, error, satisfied.
FLIPPER = """
#!/bin/sh
cat >/dev/null
f={marks}/flipper-count
n=$(cat "$f" 2>/dev/null || echo 0)
echo $((n + 1)) >"$f"
case $n in
  0|1|6) echo '{{"status": "satisfied"}}' ;;
  2|3) echo '{{"status": "not-satisfied"}}' ;;
  *) echo "disk on fire" >&2; exit 3 ;;
esac
"""


@pytest.fixture
def svc(service_factory, area):
    return service_factory()


def _args(pid: int) -> str:
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _metrics(svc) -> str:
    code, body = request(str(svc.root / "run" / "control.sock"), "GET", "/metrics")
    assert code == 200
    return body.decode()


def _run_now(svc, uuid: str, runs: int) -> dict:
    """Run the job now (unless it is its run on start, runs == 1); wait until the
    supervisor knows of its `runs`th result."""
    if runs > 1:
        code, _ = request(str(svc.root / "run" / "control.sock"), "POST", f"/jobs/{uuid}/run")
        assert code in (200, 202), code
    return wait_for(lambda: next((j for j in control_status(svc)["jobs"] if j["uuid"] == uuid and j["runs"] >= runs),
                                 None), 20, what=f"run {runs} of {uuid}")


@pytest.mark.timeout(90)
def test_ps_names_every_process_and_keeps_comm(svc):
    make_plugin(svc.plugins, "ok", OK_PLUGIN, version="1.2.3")
    docs = [spec(plugin="ok", title=f"job {i}") for i in range(2)]
    for i, doc in enumerate(docs):
        doc["plugin"]["version"] = "1.2.3"
        svc.write_spec(f"j{i}.json", doc)
    svc.start()
    for doc in docs:
        svc.wait_result(doc["uuid"])
    status = control_status(svc)
    for job in status["jobs"]:
        assert _args(job["pid"]) == f"assessment-runtime: runner {job['uuid']} ok@1.2.3"
        assert _cmdline(job["pid"]) == f"assessment-runtime: runner {job['uuid']} ok@1.2.3\0".encode()
        assert _comm(job["pid"]) == "ar-runner"
    publisher = status["publisher"]["pid"]
    assert _args(publisher) == "assessment-runtime: publisher"
    assert _comm(publisher) == "ar-publisher"
    [zygote] = [p.pid for p in svc.descendants() if _comm(p.pid) == "ar-zygote"]
    assert _args(zygote) == "assessment-runtime: zygote"
    assert psutil.Process(job["pid"]).ppid() == zygote
    assert _args(svc.proc.pid) == "assessment-runtime: supervisor"
    assert _comm(svc.proc.pid) == os.path.basename(sys.executable)[:15]  # as exec made it
    # the runners still work as before: a run now gives a result
    _run_now(svc, docs[0]["uuid"], 2)


@pytest.mark.timeout(120)
def test_status_changes_are_logged_once_each(svc, area):
    marks = area / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    make_plugin(svc.plugins, "flipper", FLIPPER.format(marks=marks))
    make_plugin(svc.plugins, "ok", OK_PLUGIN)
    flip = spec(plugin="flipper", title="sshd hardening")
    steady = spec(plugin="ok", title="always fine")
    svc.write_spec("flip.json", flip)
    svc.write_spec("steady.json", steady)
    svc.start()
    for n in range(1, 8):
        job = _run_now(svc, flip["uuid"], n)
        _run_now(svc, steady["uuid"], n)
    assert job["last_result"]["status"] == "satisfied", [(r["status"], r["reason"]) for r in svc.results_for(flip["uuid"])]
    reason = [r for r in svc.results_for(flip["uuid"]) if r["status"] == "error"][0]["reason"]
    assert "disk on fire" in reason or "3" in reason

    def lines(uuid: str) -> list[str]:
        out = []
        for line in svc.log_text().splitlines():
            m = re.search(r" (INFO|WARNING|ERROR|DEBUG) supervisor\[\d+\]: (.*)$", line)
            if m and f"({uuid})" in m.group(2):
                out.append(f"{m.group(1)} {m.group(2)}")
        return out

    name = f'job "sshd hardening" ({flip["uuid"]})'
    assert lines(flip["uuid"]) == [
        f"INFO {name}: satisfied (first result)",
        f"INFO {name}: satisfied -> not-satisfied",
        f"WARNING {name}: not-satisfied -> error: {reason}",
        f"INFO {name}: error -> satisfied",
    ]
    assert lines(steady["uuid"]) == [f'INFO job "always fine" ({steady["uuid"]}): satisfied (first result)']
    # the runner no longer logs error results itself (debug only): one line per error change
    assert not [line for line in svc.log_text().splitlines() if " INFO runner " in line and ": error: " in line]


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """The text format, as far as our output uses it: TYPE lines, and samples
    `name{k="v",...} value` with \\\\, \\" and \\n escapes in label values."""
    types: dict[str, str] = {}
    samples = []
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, f"not a sample line: {line!r}"
        labels = {}
        if m.group(2):
            pos = 0
            body = m.group(2)
            while pos < len(body):
                lm = label_re.match(body, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1),
                                             lm.group(2))
                pos = lm.end()
                if pos < len(body):
                    assert body[pos] == ",", f"bad labels in {line!r}"
                    pos += 1
        value = float(m.group(3).replace("+Inf", "inf"))
        samples.append((m.group(1), labels, value))
    return types, samples


@pytest.mark.timeout(90)
def test_run_durations_are_a_histogram(svc):
    make_plugin(svc.plugins, "ok", OK_PLUGIN)
    slow = make_plugin(svc.plugins, "slow", "#!/bin/sh\ncat >/dev/null\nsleep 0.3\necho '{\"status\": \"satisfied\"}'\n")
    assert slow.exists()
    fast, slowjob = spec(plugin="ok"), spec(plugin="slow")
    svc.write_spec("fast.json", fast)
    svc.write_spec("slow.json", slowjob)
    svc.start()
    for n in range(1, 4):  # 1: the run on start
        _run_now(svc, fast["uuid"], n)
        _run_now(svc, slowjob["uuid"], n)
    types, samples = parse_prometheus(_metrics(svc))
    name = "assessment_runtime_run_duration_seconds"
    assert types[name] == "histogram"
    assert f"{name}_sum" not in types and f"{name}_count" not in types  # no separate families any more
    assert types["assessment_runtime_job_last_result_age_seconds"] == "gauge"
    for job in (fast["uuid"], slowjob["uuid"]):
        buckets = [(float(lab["le"].replace("+Inf", "inf")), v) for n, lab, v in samples
                   if n == f"{name}_bucket" and lab["job"] == job]
        [count] = [v for n, lab, v in samples if n == f"{name}_count" and lab["job"] == job]
        [total] = [v for n, lab, v in samples if n == f"{name}_sum" and lab["job"] == job]
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[0] == 0.01 and bounds[-2] == 300 and math.isinf(bounds[-1])
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        assert counts[-1] == count == 3
        # the sum lies between what the bucket bounds allow
        per_bucket = [c - prev for c, prev in zip(counts, [0] + counts)]
        low = sum(lo * n for lo, n in zip([0.0] + bounds, per_bucket))
        high = sum(hi * n for hi, n in zip(bounds, per_bucket) if n)
        assert 0 < total and low <= total <= high
        [age] = [v for n, lab, v in samples if n == "assessment_runtime_job_last_result_age_seconds"
                 and lab["job"] == job]
        assert 0 <= age < 60
    slow_buckets = {lab["le"]: v for n, lab, v in samples if n == f"{name}_bucket" and lab["job"] == slowjob["uuid"]}
    assert slow_buckets["0.25"] == 0 and slow_buckets["+Inf"] == 3  # each slow run takes 0.3 s or more
    [slow_sum] = [v for n, lab, v in samples if n == f"{name}_sum" and lab["job"] == slowjob["uuid"]]
    assert 0.9 <= slow_sum < 3 * 300


def test_a_title_longer_than_the_command_line_is_cut_to_fit():
    code = ("import sys; from runner import linux; "
            "assert linux.set_title('assessment-runtime: a title much longer than this command line ' * 4); "
            "print(open('/proc/self/cmdline', 'rb').read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    shown = eval(out.stdout)  # noqa: S307 - the repr of bytes we printed
    room = sum(len(a.encode()) + 1 for a in (sys.executable, "-c", code))  # the argv strings and their NULs
    title = b"assessment-runtime: a title much longer than this command line " * 4
    assert shown == title[:room - 1] + b"\0"
