"""The zygote leaves no free small-object blocks behind for runners to allocate into."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

PROBE = """
import json, runner.warmup as w
before = w._free_blocks()
made = w.fill_free_blocks()
after = w._free_blocks()
print(json.dumps({"before": sum(before.values()), "classes": len(before), "made": made,
                  "after": sum(after.values())}))
"""


def test_filling_takes_up_nearly_every_free_block():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # a fresh interpreter has free blocks in most of the 32 size classes
    assert got["classes"] >= 16 and got["before"] >= 1000, got
    assert got["made"] >= got["before"], got
    # a few hundred are freed again by the filling itself (its own temporary objects)
    assert got["after"] <= got["before"] // 4, got


def test_the_warm_up_leaves_no_file_open():
    """Whatever the zygote leaves open, every runner inherits."""
    probe = ("import os, runner.warmup as w; before = sorted(os.listdir('/proc/self/fd')); w.warm_up(3); "
             "print(before == sorted(os.listdir('/proc/self/fd')))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True", r.stdout
