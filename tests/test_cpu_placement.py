"""Where runs execute: a runner stays on one CPU, and a quick run with it; a run still going
after 50 ms gets back every CPU the service may use, for every thread it has."""

from __future__ import annotations

import os
import shutil
import signal
from collections import Counter

import psutil
import pytest

from conftest import make_plugin, spec, wait_for
from runner import linux


def cpu_list(text: str) -> set[int]:
    """/proc's Cpus_allowed_list ("0-3,6") as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


@pytest.mark.timeout(60)
def test_a_quick_run_stays_on_its_runners_cpu_and_a_long_one_gets_every_cpu_back(service_factory):
    ours = os.sched_getaffinity(0)
    if len(ours) < 2:
        pytest.skip("needs two CPUs")
    svc = service_factory()
    make_plugin(svc.plugins, "quick", """
        #!/bin/sh
        echo "{\\"status\\": \\"satisfied\\", \\"title\\": \\"$(grep Cpus_allowed_list /proc/self/status | cut -f2)\\"}"
        """)
    # its child starts at once, on the runner's CPU, and looks after the runner let the run go
    make_plugin(svc.plugins, "long", """
        #!/bin/sh
        sh -c 'sleep 0.5; grep Cpus_allowed_list /proc/self/status | cut -f2 > child'
        mine=$(grep Cpus_allowed_list /proc/self/status | cut -f2)
        echo "{\\"status\\": \\"satisfied\\", \\"title\\": \\"$mine $(cat child)\\"}"
        """)
    quick, long = spec(plugin="quick"), spec(plugin="long")
    svc.write_spec("quick.json", quick)
    svc.write_spec("long.json", long)
    # as the packaged unit runs it: root without CAP_SYS_NICE (its bounding set lacks it)
    root = os.geteuid() == 0 and shutil.which("setpriv")
    without_nice = ["setpriv", "--bounding-set=-sys_nice", "--"] if root else []
    svc.start(prefix=without_nice)

    result = svc.wait_result(quick["uuid"])[0]
    runner = wait_for(lambda: svc.job(quick["uuid"])["pid"], what="the quick job's runner")
    assert len(os.sched_getaffinity(runner)) == 1
    assert cpu_list(result["title"]) == os.sched_getaffinity(runner)
    assert cpu_list(result["title"]) <= ours

    result = svc.wait_result(long["uuid"])[0]
    plugin, child = result["title"].split()
    assert cpu_list(plugin) == ours
    if svc.status()["sandbox"]["limits"] == "cgroup":  # the job's cgroup names every thread
        assert cpu_list(child) == ours
    runner = svc.job(long["uuid"])["pid"]
    assert len(os.sched_getaffinity(runner)) == 1
    if without_nice:
        with open(f"/proc/{runner}/status") as f:
            caps = dict(line.split(":\t", 1) for line in f if line.startswith("Cap"))
        assert not int(caps["CapEff"], 16) & (1 << 23), caps  # CAP_SYS_NICE
        assert int(caps["CapEff"], 16) & (1 << 7)  # CAP_SETUID: still root, as in the unit
        with open(f"/proc/{runner}/status") as f:
            assert [line.split()[1:4] for line in f if line.startswith("Uid:")] == [["0", "0", "0"]]
    # borrowing the run's uid cleared the runner's parent-death signal: it was set again (the
    # supervisor is stopped meanwhile, or it would kill the zygote's runners itself)
    os.kill(svc.proc.pid, signal.SIGSTOP)
    try:
        os.kill(psutil.Process(runner).ppid(), signal.SIGKILL)  # the zygote
        wait_for(lambda: not psutil.pid_exists(runner) or psutil.Process(runner).status() == psutil.STATUS_ZOMBIE,
                 10, what="the runner to die with its zygote")
    finally:
        os.kill(svc.proc.pid, signal.SIGCONT)


def test_runners_spread_over_the_cpus_and_keep_theirs():
    cpus = frozenset(range(4))
    picks = Counter(linux.pick_cpu(f"job-{i:04d}", cpus) for i in range(400))
    assert set(picks) == cpus
    assert all(60 <= n <= 140 for n in picks.values()), picks
    assert linux.pick_cpu("job-0001", cpus) == linux.pick_cpu("job-0001", cpus)
    assert linux.pick_cpu("job-0001", frozenset({5})) == 5
