"""Runners log without the logging module, in the same two formats as the supervisor."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEXT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<name>.+)\[(?P<pid>\d+)\]: (?P<msg>.*)$")


def _lines(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr
    return out.stderr.splitlines()


def test_text_lines_match_the_supervisors_format_and_levels_filter():
    runner = _lines("from runner.log import Log; log = Log('runner job-1', 'text', 'info'); "
                    "log.debug('hidden'); log.info('run %s: %s', 'r1', 'error'); log.warning('w'); log.error('e')")
    supervisor = _lines("from supervisor.log import setup_logging; log = setup_logging('runner job-1', 'text', 'info'); "
                        "log.debug('hidden'); log.info('run %s: %s', 'r1', 'error'); log.warning('w'); log.error('e')")
    assert len(runner) == len(supervisor) == 3
    for ours, theirs in zip(runner, supervisor):
        a, b = TEXT.match(ours), TEXT.match(theirs)
        assert a and b, (ours, theirs)
        assert (a["level"], a["name"], a["msg"]) == (b["level"], b["name"], b["msg"])
    assert [TEXT.match(x)["level"] for x in runner] == ["INFO", "WARNING", "ERROR"]


def test_json_lines_have_the_same_keys():
    runner = _lines("from runner.log import Log; Log('runner j', 'json', 'debug').warning('odd %d', 7)")
    supervisor = _lines("from supervisor.log import setup_logging; setup_logging('runner j', 'json', 'debug').warning('odd %d', 7)")
    a, b = json.loads(runner[0]), json.loads(supervisor[0])
    assert set(a) == set(b) == {"time", "level", "process", "pid", "message"}
    assert (a["level"], a["process"], a["message"]) == (b["level"], b["process"], b["message"]) == ("warning", "runner j", "odd 7")
    assert a["time"].endswith("Z")


def test_the_zygote_imports_neither_logging_nor_threading():
    """Their fork handlers and objects would cost every forked runner private pages."""
    out = subprocess.run([sys.executable, "-c", "import sys, runner.zygote; "
                          "print(sorted(m for m in ('logging', 'threading', 'supervisor') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=20, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
