"""Per-job cgroups: the service started inside a cgroup of its own (as systemd's Delegate=yes
gives it) runs each job's plugins in `jobs/<uuid>/` and ends every run with cgroup.kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid as uuidlib

import pytest

from conftest import REPO, make_plugin, spec, wait_for
from supervisor.cgroups import _cgroup2_mount, _own_cgroup


def delegated_cgroup() -> str:
    mount, own = _cgroup2_mount(), _own_cgroup()
    if os.geteuid() != 0 or mount is None or own is None:
        pytest.skip("needs root and a cgroup2 hierarchy to make a cgroup for the service")
    parent = os.path.join(mount, own.lstrip("/"))
    path = os.path.join(parent, f"ar-test-{uuidlib.uuid4().hex[:8]}")
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip(f"cannot create a cgroup under {parent}: {e}")
    return path


def remove_tree(path: str) -> None:
    for root, dirs, _ in os.walk(path, topdown=False):
        for d in dirs:
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


@pytest.mark.timeout(60)
def test_plugins_run_in_their_jobs_cgroup_and_nothing_survives_a_run(service_factory, area):
    cgroup = delegated_cgroup()
    svc = service_factory()
    try:
        marks = area / "marks"
        marks.mkdir(mode=0o777)
        marks.chmod(0o777)
        make_plugin(svc.plugins, "where", """
            #!/bin/sh
            cg=$(grep '^0::' /proc/self/cgroup | cut -c4-)
            echo "{\\"status\\": \\"satisfied\\", \\"observations\\": [{\\"description\\": \\"$cg\\"}]}"
            """)
        # a grandchild that leaves the session and the process group, and outlives its parent
        make_plugin(svc.plugins, "escape", f"""
            #!/bin/sh
            setsid sh -c 'echo $$ > {marks}/escaped; exec sleep 300' </dev/null >/dev/null 2>&1 &
            sleep 0.2
            echo '{{"status": "satisfied"}}'
            """)
        where, escape = spec(plugin="where"), spec(plugin="escape")
        svc.write_spec("where.json", where)
        svc.write_spec("escape.json", escape)
        svc.grant_marks()
        svc._logf = open(svc.log, "ab")
        svc.proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"',
             sys.executable, "-m", "supervisor", "run", "--config", str(svc.config)],
            stdout=svc._logf, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(lambda: svc.proc.poll() is not None or svc.try_status() is not None, 20, what="the control socket")
        assert svc.proc.poll() is None, svc.log_text()

        status = svc.status()
        assert status["sandbox"]["limits"] == "cgroup", status["sandbox"]
        result = svc.wait_result(where["uuid"])[0]
        assert result["status"] == "satisfied"
        assert result["observations"][0]["description"].endswith(f"/jobs/{where['uuid']}")
        with open(f"{cgroup}/supervisor/cgroup.procs") as f:
            assert str(svc.proc.pid) in f.read().split()

        svc.wait_result(escape["uuid"])
        pid = int(wait_for(lambda: (marks / "escaped").exists() and (marks / "escaped").read_text().strip(),
                           what="the escaped pid"))
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, what="the escaped grandchild to be gone")
        with open(f"{cgroup}/jobs/{escape['uuid']}/cgroup.procs") as f:
            assert f.read().split() == []

        # a job that goes away takes its cgroup with it
        (svc.jobs / "escape.json").unlink()
        wait_for(lambda: not os.path.exists(f"{cgroup}/jobs/{escape['uuid']}"), 15, what="the job's cgroup removed")
        assert svc.stop() == 0
    finally:
        svc.kill_all()
        time.sleep(0.2)
        remove_tree(cgroup)
