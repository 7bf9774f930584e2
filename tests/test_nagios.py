"""SPEC §6 protocol "nagios", end to end with Debian's monitoring-plugins-basic.

check_disk, check_load and check_procs from /usr/lib/nagios/plugins run as plugins of the real
service (copies of the binaries in plugin folders: the runtime wants a regular root-owned file
inside the plugin folder, not a symlink). Each result is compared with what the same binary
prints when this test runs it itself, with the same arguments and as the same user. Values
(free space, load, process counts) change from one run to the next, so descriptions and perf
data items are compared with every number replaced by "#".

Needs the Debian package monitoring-plugins-basic (apt-get install monitoring-plugins-basic).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import RUN_AS_USER, make_plugin, spec, wait_for

NAGIOS_DIR = Path("/usr/lib/nagios/plugins")
BINARIES = ("check_disk", "check_load", "check_procs")

if not (NAGIOS_DIR / "check_disk").exists():
    pytest.skip(f"{NAGIOS_DIR}/check_disk is missing: install the Debian package monitoring-plugins-basic "
                f"(apt-get install monitoring-plugins-basic) to run the nagios protocol tests",
                allow_module_level=True)

PLUGIN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

# job name -> (plugin, config.args, expected status)
CASES = {
    "disk-ok": ("check_disk", ["-w", "1%", "-c", "1%", "-p", "/"], "satisfied"),  # critical only below 1% free
    "disk-warning": ("check_disk", ["-w", "100%", "-c", "0%", "-p", "/"], "not-satisfied"),  # exit 1
    "disk-critical": ("check_disk", ["-w", "100%", "-c", "100%", "-p", "/"], "not-satisfied"),  # exit 2
    "disk-bogus-option": ("check_disk", ["--no-such-option"], "error"),  # exit 3 (UNKNOWN)
    "load-ok": ("check_load", ["-w", "1000,1000,1000", "-c", "2000,2000,2000"], "satisfied"),
    "procs-ok": ("check_procs", ["-w", "1:", "-c", "1:"], "satisfied"),  # at least one process
    "procs-critical": ("check_procs", ["-w", "1000000:", "-c", "1000000:"], "not-satisfied"),
}
EXIT_CODES = {"satisfied": (0,), "not-satisfied": (1, 2), "error": (3,)}


def numbers(text: str) -> str:
    """The shape of a plugin's text: every number becomes #."""
    return re.sub(r"\d+(\.\d+)?", "#", text)


def run_as_plugin_user(path: Path, args: list[str]) -> tuple[int, str]:
    """Run the binary ourselves, as the plugins' user, with the plugins' environment."""
    kw = {}
    if os.geteuid() == 0:
        pw = pwd.getpwnam(RUN_AS_USER)
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    r = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=30, env=PLUGIN_ENV, cwd="/",
                       stdin=subprocess.DEVNULL, **kw)
    return r.returncode, r.stdout


def split_first_line(stdout: str) -> tuple[str, list[str]]:
    """(text before "|" on the first line, the perf data items after it)."""
    first = stdout.split("\n", 1)[0]
    text, _, perf = first.partition("|")
    return text.strip(), re.findall(r"'[^']*'=\S*|\S+", perf)


def perf_label(item: str) -> str:
    label = item.split("=", 1)[0]
    return label[1:-1] if len(label) >= 2 and label[0] == label[-1] == "'" else label


def install(plugin_dir: Path, binary: str) -> Path:
    """{plugin_dir}/{binary}/1.0.0/ with plugin.toml (protocol nagios) and a 0755 copy of the binary."""
    folder = plugin_dir / binary / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "plugin.toml").write_text(f'name = "{binary}"\nversion = "1.0.0"\nentrypoint = "{binary}"\n'
                                        f'protocol = "nagios"\ndescription = "monitoring-plugins {binary}"\n')
    entry = folder / binary
    shutil.copyfile(NAGIOS_DIR / binary, entry)
    entry.chmod(0o755)
    for p in (folder, folder.parent, plugin_dir):
        p.chmod(0o755)
    return entry


@pytest.fixture
def svc(service_factory):
    s = service_factory()
    for binary in BINARIES:
        install(s.plugins, binary)
    return s


def nagios_spec(plugin: str, args: list[str] | None) -> dict:
    doc = spec(plugin=plugin)
    if args is not None:
        doc["config"] = {"args": args}
    return doc


@pytest.mark.timeout(90)
def test_monitoring_plugins_map_exit_codes_text_and_perfdata(svc):
    docs = {name: nagios_spec(plugin, args) for name, (plugin, args, _) in CASES.items()}
    for name, doc in docs.items():
        svc.write_spec(f"{name}.json", doc)
    svc.start()
    results = {name: svc.wait_result(doc["uuid"], timeout=30)[0] for name, doc in docs.items()}
    sandbox = svc.status()["sandbox"]  # the binaries ran unchanged under the default confinement
    assert sandbox["confine"]["filesystem"] == (sandbox["landlock_abi"] > 0), sandbox

    for name, (plugin, args, expected) in CASES.items():
        result = results[name]
        entry = svc.plugins / plugin / "1.0.0" / plugin
        code, stdout = run_as_plugin_user(entry, args)
        assert code in EXIT_CODES[expected], f"{name}: the binary itself exits {code} with {args}: {stdout!r}"
        assert result["status"] == expected, (name, result["status"], result["reason"], result["logs"])
        if expected == "error":
            assert result["reason"].startswith(f"exit code {code}"), (name, result["reason"])
        else:
            assert result["reason"] is None, (name, result["reason"])
        assert result["plugin"]["name"] == plugin

        text, items = split_first_line(stdout)
        [observation] = result["observations"]
        assert numbers(observation["description"]) == numbers(text), (name, observation["description"], text)
        props = observation.get("props", [])
        assert [p["name"] for p in props] == [perf_label(item) for item in items], (name, props, items)
        for prop, item in zip(props, items):
            assert set(prop) == {"name", "value"}, prop
            assert numbers(prop["value"]) == numbers(item), (name, prop, item)
            assert prop["value"].startswith(item.split("=", 1)[0] + "="), prop

    # config.args reached the binaries: the thresholds show in their perf data
    load1 = results["load-ok"]["observations"][0]["props"][0]
    assert load1["name"] == "load1" and ";1000.000;2000.000;" in load1["value"], load1
    procs = results["procs-critical"]["observations"][0]["props"][0]
    assert procs["name"] == "procs" and ";1000000:;1000000:;" in procs["value"], procs
    assert results["disk-ok"]["observations"][0]["description"].startswith("DISK OK")
    assert results["disk-warning"]["observations"][0]["description"].startswith("DISK WARNING")
    assert results["disk-critical"]["observations"][0]["description"].startswith("DISK CRITICAL")
    assert [p["name"] for p in results["disk-ok"]["observations"][0]["props"]] == ["/"]


@pytest.mark.timeout(60)
def test_nagios_protocol_edge_cases(svc, area):
    """Exit codes beyond 3, quoted labels, no perf data, several lines, a plugin without args."""
    make_plugin(svc.plugins, "quoted", """
        #!/bin/sh
        echo "QUOTED OK - two items | 'free space'=10MB;20;30;0;100 plain=4s;;;"
        echo "a second line | later=1 is long output, not perf data of the first line"
        exit 0
        """, protocol="nagios")
    make_plugin(svc.plugins, "noperf", """
        #!/bin/sh
        echo "NOPERF WARNING - nothing to measure"
        exit 1
        """, protocol="nagios")
    make_plugin(svc.plugins, "four", """
        #!/bin/sh
        echo "FOUR - not a nagios state | x=1"
        exit 4
        """, protocol="nagios")
    args_dump = area / "args"
    args_dump.mkdir(mode=0o777)
    args_dump.chmod(0o777)
    make_plugin(svc.plugins, "argv", f"""
        #!/bin/sh
        printf '%s\\n' "$#" "$@" > {args_dump}/argv
        echo "ARGV OK - $# arguments"
        """, protocol="nagios")
    docs = {
        "quoted": nagios_spec("quoted", None),
        "noperf": nagios_spec("noperf", None),
        "four": nagios_spec("four", None),
        "argv": nagios_spec("argv", ["-w", "with space", "", "--x=1"]),
        "check_load-no-args": nagios_spec("check_load", None),  # UNKNOWN: -w and -c are required
    }
    for name, doc in docs.items():
        svc.write_spec(f"{name}.json", doc)
    svc.start()
    got = {name: svc.wait_result(doc["uuid"], timeout=30)[0] for name, doc in docs.items()}

    quoted = got["quoted"]
    assert quoted["status"] == "satisfied" and quoted["reason"] is None
    [obs] = quoted["observations"]
    assert obs["description"] == "QUOTED OK - two items"
    assert obs["props"] == [{"name": "free space", "value": "'free space'=10MB;20;30;0;100"},
                            {"name": "plain", "value": "plain=4s;;;"}]

    noperf = got["noperf"]
    assert noperf["status"] == "not-satisfied" and noperf["reason"] is None
    [obs] = noperf["observations"]
    assert obs["description"] == "NOPERF WARNING - nothing to measure" and not obs.get("props")

    four = got["four"]
    assert four["status"] == "error" and four["reason"].startswith("exit code 4"), four["reason"]

    argv = got["argv"]
    assert argv["status"] == "satisfied", (argv["reason"], argv["logs"])
    assert (args_dump / "argv").read_text().split("\n")[:-1] == ["4", "-w", "with space", "", "--x=1"]

    noargs = got["check_load-no-args"]
    code, _ = run_as_plugin_user(svc.plugins / "check_load" / "1.0.0" / "check_load", [])
    assert code == 3
    assert noargs["status"] == "error" and noargs["reason"].startswith("exit code 3"), noargs["reason"]


def test_plugins_command_lists_the_monitoring_plugins_as_nagios(svc):
    r = svc.cli("plugins")
    assert r.returncode == 0, r.stderr
    for binary in BINARIES:
        [line] = [line for line in r.stdout.splitlines() if binary in line]
        assert "nagios" in line and "1.0.0" in line, line


@pytest.mark.timeout(60)
def test_a_symlink_to_the_binary_is_refused(svc):
    folder = svc.plugins / "check_users" / "1.0.0"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    folder.parent.chmod(0o755)
    (folder / "plugin.toml").write_text('name = "check_users"\nversion = "1.0.0"\nentrypoint = "check_users"\n'
                                        'protocol = "nagios"\n')
    (folder / "check_users").symlink_to(NAGIOS_DIR / "check_users")
    doc = nagios_spec("check_users", ["-w", "1000", "-c", "2000"])
    svc.write_spec("users.json", doc)
    svc.start()
    result = svc.wait_result(doc["uuid"])[0]
    assert result["status"] == "error"
    assert result["reason"].startswith("untrusted plugin:") and "symlink" in result["reason"], result["reason"]
    wait_for(lambda: svc.job(doc["uuid"]) is not None, what="the job in status")
