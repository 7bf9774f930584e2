"""supervisor/spec.py: the Job Spec of SPEC §4 (validation, path safety, revision, limits),
and `validate` on spec files through the real CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from supervisor.spec import JobSpec, Limits, Spec, SpecError, canonical_json, parse_spec

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SHA = "0123456789abcdef" * 4

# SPEC §4, with real values where the SPEC shows placeholders.
EXAMPLE = {
    "uuid": "6f1c2b1e-8d2a-4c55-9b1e-0d6a3f2c9e10",
    "title": "sshd hardening",
    "plugin": {"name": "sshd-config", "version": "1.0.0",
               "sha256": SHA,
               "url": "https://plugins.example.org/sshd-config-1.0.0"},
    "interval": "5m",
    "timeout": "30s",
    "run_on_start": False,
    "config": {"any": "JSON object handed to the plugin"},
    "labels": {"env": "prod"},
    "assessment_plan_uuid": "optional", "component_uuid": "optional", "control_id": "optional",
    "limits": {"memory": "256MiB", "cpu_time": "30s", "open_files": 128, "processes": 16, "output": "4MiB"},
}
MINIMAL = {"uuid": "job-1", "plugin": {"name": "demo", "version": "1.0.0"}, "interval": "1m"}


def reason_of(obj, path: str = "$") -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(obj, "test", path)
    return info.value


# -- the example and the fields ---------------------------------------------------------------

def test_spec_example_is_valid():
    spec = parse_spec(copy.deepcopy(EXAMPLE), "dir:/x/a.json")
    assert isinstance(spec, Spec)
    job = spec.job
    assert job.uuid == EXAMPLE["uuid"]
    assert job.title == "sshd hardening"
    assert (job.plugin.name, job.plugin.version, job.plugin.sha256, job.plugin.url) == (
        "sshd-config", "1.0.0", SHA, "https://plugins.example.org/sshd-config-1.0.0")
    assert job.plugin.label == "sshd-config@1.0.0"
    assert job.interval == 300.0
    assert job.timeout == 30.0
    assert job.run_on_start is False
    assert job.config == {"any": "JSON object handed to the plugin"}
    assert job.labels == {"env": "prod"}
    assert (job.assessment_plan_uuid, job.component_uuid, job.control_id) == ("optional",) * 3
    assert job.limits == Limits(memory=256 * MIB, cpu_time=30.0, open_files=128, processes=16, output=4 * MIB)
    assert spec.source == "dir:/x/a.json"
    assert json.loads(spec.canonical) == EXAMPLE
    assert len(spec.revision) >= 12 and all(c in "0123456789abcdef" for c in spec.revision)


def test_minimal_spec_defaults():
    job = parse_spec(dict(MINIMAL), "test").job
    assert job.title is None and job.timeout is None and job.limits is None
    assert job.run_on_start is False and job.config == {} and job.labels == {}
    assert job.plugin.sha256 is None and job.plugin.url is None
    assert (job.assessment_plan_uuid, job.component_uuid, job.control_id) == (None, None, None)


@pytest.mark.parametrize("remove, field", [
    (("uuid",), "$.uuid"),
    (("plugin", "name"), "$.plugin.name"),
    (("plugin", "version"), "$.plugin.version"),
    (("interval",), "$.interval"),
    (("plugin",), "$.plugin"),
])
def test_required_fields(remove, field):
    obj = copy.deepcopy(EXAMPLE)
    holder = obj
    for key in remove[:-1]:
        holder = holder[key]
    del holder[remove[-1]]
    err = reason_of(obj)
    assert field in err.reason
    # the uuid is reported whenever the object has a usable one
    assert err.uuid == (None if remove == ("uuid",) else EXAMPLE["uuid"])


def test_reason_uses_the_given_path_prefix():
    obj = dict(MINIMAL)
    del obj["interval"]
    assert reason_of(obj, "$[3]").reason.startswith("$[3].interval")


@pytest.mark.parametrize("interval", ["500ms", "999ms", 0.5, 0, "0s"])
def test_interval_below_one_second_is_rejected(interval):
    err = reason_of(dict(MINIMAL, interval=interval))
    assert "$.interval" in err.reason
    assert err.uuid == "job-1"


@pytest.mark.parametrize("interval, seconds", [("1s", 1.0), ("1000ms", 1.0), (1, 1.0), ("90", 90.0),
                                               ("5m", 300.0), ("1h", 3600.0), (2.5, 2.5)])
def test_interval_of_one_second_or_more_is_accepted(interval, seconds):
    assert parse_spec(dict(MINIMAL, interval=interval), "t").job.interval == pytest.approx(seconds)


@pytest.mark.parametrize("interval", ["soon", "-5s", -5, True, "5 minutes", None, [1]])
def test_interval_that_is_not_a_duration_is_rejected(interval):
    assert "$.interval" in reason_of(dict(MINIMAL, interval=interval)).reason


@pytest.mark.parametrize("timeout", ["0s", 0, "-1s", "later"])
def test_bad_timeout_is_rejected(timeout):
    assert "$.timeout" in reason_of(dict(MINIMAL, timeout=timeout)).reason


UNSAFE = ["a/b", "/etc", "..", "../x", ".", ".hidden", "a" * 129, "", " x", "x y", "a\\b", "x\x00", "-rf",
          "_x", "+x", "é"]


@pytest.mark.parametrize("value", UNSAFE)
@pytest.mark.parametrize("field", ["plugin.name", "plugin.version", "uuid"])
def test_names_that_could_leave_our_folders_are_rejected(field, value):
    obj = copy.deepcopy(MINIMAL)
    if field == "uuid":
        obj["uuid"] = value
    else:
        obj["plugin"][field.split(".")[1]] = value
    err = reason_of(obj)
    assert f"$.{field}" in err.reason


@pytest.mark.parametrize("value", ["a", "a" * 128, "1.0.0", "1.0.0+build.5", "v2_rc-1", "A.b..c", "0"])
def test_safe_names_are_accepted(value):
    obj = copy.deepcopy(MINIMAL)
    obj["uuid"] = value
    obj["plugin"] = {"name": value, "version": value}
    job = parse_spec(obj, "t").job
    assert job.uuid == job.plugin.name == job.plugin.version == value


@pytest.mark.parametrize("field", ["uuid", "plugin.name", "plugin.version", "plugin.sha256"])
def test_trailing_newline_is_rejected(field):
    obj = copy.deepcopy(MINIMAL)
    if field == "uuid":
        obj["uuid"] = "job-1\n"
    elif field == "plugin.sha256":
        obj["plugin"]["sha256"] = SHA + "\n"
    else:
        obj["plugin"][field.split(".")[1]] += "\n"
    assert f"$.{field}" in reason_of(obj).reason


@pytest.mark.parametrize("where, extra, field", [
    ((), {"colour": "blue"}, "$.colour"),
    (("plugin",), {"path": "/bin/sh"}, "$.plugin.path"),
    (("limits",), {"swap": "1GiB"}, "$.limits.swap"),
])
def test_unknown_field_is_rejected(where, extra, field):
    obj = copy.deepcopy(EXAMPLE)
    holder = obj
    for key in where:
        holder = holder[key]
    holder.update(extra)
    err = reason_of(obj)
    assert field in err.reason and "unknown" in err.reason
    assert err.uuid == EXAMPLE["uuid"]


@pytest.mark.parametrize("sha, ok", [
    (SHA, True), (SHA.upper(), True), (SHA[:-1], False), (SHA + "0", False), ("g" * 64, False),
    ("", False), ("sha256:" + SHA[7:], False), (" " + SHA[1:], False),
])
def test_sha256_must_be_64_hex(sha, ok):
    obj = copy.deepcopy(MINIMAL)
    obj["plugin"]["sha256"] = sha
    if ok:
        assert parse_spec(obj, "t").job.plugin.sha256 == sha
    else:
        assert "$.plugin.sha256" in reason_of(obj).reason


@pytest.mark.parametrize("url", ["file:///usr/bin/id", "/usr/bin/id", "ftp://x/y", "../x"])
def test_plugin_url_must_be_http(url):
    obj = copy.deepcopy(MINIMAL)
    obj["plugin"]["url"] = url
    assert "$.plugin.url" in reason_of(obj).reason


@pytest.mark.parametrize("obj", [[MINIMAL], "spec", 5, None])
def test_not_an_object_is_rejected(obj):
    err = reason_of(obj)
    assert err.reason.startswith("$") and err.uuid is None


@pytest.mark.parametrize("field, value, path", [
    ("labels", {"env": 1}, "$.labels"),
    ("config", ["not", "an", "object"], "$.config"),
    ("run_on_start", "yes", "$.run_on_start"),
    ("title", 5, "$.title"),
])
def test_wrong_types_name_the_field(field, value, path):
    assert path in reason_of(dict(MINIMAL, **{field: value})).reason


# -- limits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("limits, expected", [
    ({"memory": "256MiB", "cpu_time": "30s", "open_files": 128, "processes": 16, "output": "4MiB"},
     Limits(memory=256 * MIB, cpu_time=30.0, open_files=128, processes=16, output=4 * MIB)),
    ({"memory": "512KiB", "output": 1000}, Limits(memory=512 << 10, output=1000)),
    ({"memory": "1GiB", "cpu_time": "500ms"}, Limits(memory=1 << 30, cpu_time=0.5)),
    ({"cpu_time": 90}, Limits(cpu_time=90.0)),
    ({"memory": 1048576, "cpu_time": "1h"}, Limits(memory=MIB, cpu_time=3600.0)),
    ({}, Limits()),
])
def test_limits_parse_sizes_and_durations(limits, expected):
    assert parse_spec(dict(MINIMAL, limits=limits), "t").job.limits == expected


@pytest.mark.parametrize("field, value", [
    ("memory", "lots"), ("memory", "1.5GiB"), ("memory", -1), ("output", "4 megs"),
    ("cpu_time", "forever"), ("open_files", 0), ("processes", -3), ("open_files", "many"),
])
def test_bad_limits_name_the_field(field, value):
    assert f"$.limits.{field}" in reason_of(dict(MINIMAL, limits={field: value})).reason


DEFAULTS = Limits(memory=512 * MIB, cpu_time=60.0, open_files=256, processes=64, output=16 * MIB)


def test_lowered_by_never_raises_a_default():
    higher = Limits(memory=1 << 30, cpu_time=600.0, open_files=4096, processes=1000, output=1 << 30)
    assert DEFAULTS.lowered_by(higher) == DEFAULTS


def test_lowered_by_lowers():
    lower = Limits(memory=256 * MIB, cpu_time=30.0, open_files=128, processes=16, output=4 * MIB)
    assert DEFAULTS.lowered_by(lower) == lower


def test_lowered_by_mixes_field_by_field():
    spec = Limits(memory=1 << 30, cpu_time=5.0)  # memory above the default, cpu below, rest unset
    merged = DEFAULTS.lowered_by(spec)
    assert merged == Limits(memory=512 * MIB, cpu_time=5.0, open_files=256, processes=64, output=16 * MIB)


def test_lowered_by_nothing_is_unchanged():
    assert DEFAULTS.lowered_by(None) == DEFAULTS
    assert DEFAULTS.lowered_by(Limits()) == DEFAULTS


def test_lowered_by_from_a_parsed_spec_and_the_config_defaults(tmp_path):
    from supervisor.config import load_config

    path = tmp_path / "config.toml"
    path.write_text('[specs]\ndir = "j"\n[[publisher.sink]]\nname = "a"\nkind = "file"\npath = "r"\n')
    defaults = load_config(str(path)).jobs.default_limits
    job = parse_spec(dict(MINIMAL, limits={"memory": "2GiB", "processes": 8}), "t").job
    merged = defaults.lowered_by(job.limits)
    assert merged.memory == 512 * MIB  # spec above the default: the default stays
    assert merged.processes == 8
    assert (merged.cpu_time, merged.open_files, merged.output) == (60.0, 256, 16 * MIB)


# -- revision ---------------------------------------------------------------------------------

def reordered(obj):
    """The same content with every object's keys in reverse order."""
    if isinstance(obj, dict):
        return {k: reordered(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [reordered(v) for v in obj]
    return obj


def test_revision_is_stable_whatever_the_key_order():
    obj = copy.deepcopy(EXAMPLE)
    obj["config"] = {"z": {"b": 1, "a": [{"y": 1, "x": 2}]}, "a": None}
    first = parse_spec(obj, "dir:a")
    second = parse_spec(reordered(obj), "http:b")
    assert list(reordered(obj)) != list(obj)
    assert first.revision == second.revision
    assert first.canonical == second.canonical
    assert parse_spec(copy.deepcopy(obj), "t").revision == first.revision


def test_same_spec_from_json_and_toml_has_the_same_revision():
    toml_text = """
        uuid = "job-1"
        interval = "1m"
        labels = { env = "prod" }
        [plugin]
        name = "demo"
        version = "1.0.0"
        [config]
        paths = ["/etc/ssh/sshd_config"]
        [limits]
        memory = "64MiB"
        """
    json_text = ('{"limits": {"memory": "64MiB"}, "config": {"paths": ["/etc/ssh/sshd_config"]}, '
                 '"plugin": {"version": "1.0.0", "name": "demo"}, "labels": {"env": "prod"}, '
                 '"interval": "1m", "uuid": "job-1"}')
    from_toml = parse_spec(tomllib.loads("\n".join(line.strip() for line in toml_text.splitlines())), "t")
    from_json = parse_spec(json.loads(json_text), "t")
    assert from_toml.revision == from_json.revision


CHANGES = {
    "uuid": lambda o: o.update(uuid="6f1c2b1e-8d2a-4c55-9b1e-0d6a3f2c9e11"),
    "title": lambda o: o.update(title="sshd hardening!"),
    "title removed": lambda o: o.pop("title"),
    "plugin.name": lambda o: o["plugin"].update(name="sshd-config2"),
    "plugin.version": lambda o: o["plugin"].update(version="1.0.1"),
    "plugin.sha256": lambda o: o["plugin"].update(sha256="f" + SHA[1:]),
    "plugin.url": lambda o: o["plugin"].update(url="https://plugins.example.org/other"),
    "interval": lambda o: o.update(interval="6m"),
    "timeout": lambda o: o.update(timeout="31s"),
    "run_on_start": lambda o: o.update(run_on_start=True),
    "config value": lambda o: o["config"].update(any="other"),
    "config key": lambda o: o["config"].update(more=1),
    "config type": lambda o: o.update(config={"any": ["JSON object handed to the plugin"]}),
    "labels": lambda o: o["labels"].update(env="test"),
    "assessment_plan_uuid": lambda o: o.update(assessment_plan_uuid="x"),
    "component_uuid": lambda o: o.update(component_uuid="x"),
    "control_id": lambda o: o.update(control_id="x"),
    "limits.memory": lambda o: o["limits"].update(memory="255MiB"),
    "limits.cpu_time": lambda o: o["limits"].update(cpu_time="29s"),
    "limits.open_files": lambda o: o["limits"].update(open_files=127),
    "limits.processes": lambda o: o["limits"].update(processes=15),
    "limits.output": lambda o: o["limits"].update(output="3MiB"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_field_change_is_a_new_revision(change):
    base = parse_spec(copy.deepcopy(EXAMPLE), "t")
    obj = copy.deepcopy(EXAMPLE)
    CHANGES[change](obj)
    changed = parse_spec(obj, "t")
    assert changed.revision != base.revision
    assert changed.canonical != base.canonical


def test_revision_does_not_depend_on_the_source():
    assert parse_spec(dict(MINIMAL), "dir:/a.json").revision == parse_spec(dict(MINIMAL), "http:x").revision


def test_canonical_form_is_sorted_compact_json():
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": None}}) == b'{"a":{"c":null,"d":[1,2]},"b":1}'


def test_canonical_form_round_trips_to_the_same_job():
    spec = parse_spec(copy.deepcopy(EXAMPLE), "t")
    again = parse_spec(json.loads(spec.canonical), "t")
    assert again == spec
    assert msgspec.json.decode(spec.canonical, type=dict) == EXAMPLE
    assert isinstance(spec.job, JobSpec)


# -- validate on the command line ------------------------------------------------------------

def validate(*paths) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ASSESSMENT_RUNTIME_CONFIG"}
    return subprocess.run([sys.executable, "-m", "supervisor", "validate", *map(str, paths)],
                          capture_output=True, text=True, timeout=30, cwd=REPO, env=env)


def test_validate_folder_with_one_bad_spec_exits_1_naming_file_and_field(tmp_path):
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(EXAMPLE))
    bad = dict(MINIMAL, uuid="job-bad")
    bad["plugin"] = {"name": "demo"}
    (folder / "bad.json").write_text(json.dumps(bad))
    r = validate(folder)
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert str(folder / "bad.json") in out
    assert "$.plugin.version" in out
    assert EXAMPLE["uuid"] in r.stdout  # the good one is reported as fine
    assert "Traceback" not in r.stderr


def test_validate_folder_with_only_good_specs_exits_0(tmp_path):
    folder = tmp_path / "jobs.d"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(EXAMPLE))
    (folder / "more.json").write_text(json.dumps([MINIMAL, dict(MINIMAL, uuid="job-2")]))
    (folder / "one.toml").write_text('uuid = "job-3"\ninterval = "1h"\n[plugin]\nname = "x"\nversion = "2"\n')
    r = validate(folder)
    assert r.returncode == 0, (r.stdout, r.stderr)
    for uuid in (EXAMPLE["uuid"], "job-1", "job-2", "job-3"):
        assert uuid in r.stdout


def test_validate_files_given_one_by_one(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(MINIMAL))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(MINIMAL, interval="500ms")))
    assert validate(good).returncode == 0
    r = validate(good, bad)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "$.interval" in r.stderr


def test_validate_file_that_does_not_parse_or_is_missing(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"uuid": ')
    r = validate(broken)
    assert r.returncode == 1 and str(broken) in r.stderr
    r = validate(tmp_path / "absent.json")
    assert r.returncode == 1 and str(tmp_path / "absent.json") in r.stderr


def test_validate_with_nothing_to_check_exits_1():
    assert validate().returncode == 1
