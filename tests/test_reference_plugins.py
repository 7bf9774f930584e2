"""The reference plugins under plugins/, run as real subprocesses the way SPEC §6 starts them:
no arguments, a new session, cwd = a scratch folder, exactly the scrubbed environment, the
assessment/1 document on stdin. Also: the example config and specs use them correctly.
"""

from __future__ import annotations

import datetime
import glob
import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import tomllib
import uuid
from pathlib import Path

import pytest

from runner.plugin import PluginError, PluginResolver
from supervisor.config import load_config
from supervisor.spec import parse_spec

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIME_UUID = str(uuid.uuid4())


def run_plugin(name: str, config, scratch: Path, *, raw_stdin: bytes | None = None, user: int | None = None):
    """Run plugins/{name}/1.0.0/{name}; returns (exit code, parsed stdout or None, stderr)."""
    scratch.mkdir(exist_ok=True)
    if user is not None:
        os.chown(scratch, user, user)
    job_uuid, run_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    job = {"uuid": job_uuid, "plugin": {"name": name, "version": "1.0.0"}, "interval": "1m", "config": config}
    document = {"protocol": "assessment/1", "run_uuid": run_uuid, "job": job, "config": config}
    stdin = raw_stdin if raw_stdin is not None else json.dumps(document).encode()
    env = {"PATH": PLUGIN_PATH, "LANG": "C.UTF-8", "HOME": str(scratch), "ASSESSMENT_JOB_UUID": job_uuid,
           "ASSESSMENT_RUN_UUID": run_uuid, "ASSESSMENT_RUNTIME_UUID": RUNTIME_UUID}
    try:
        proc = subprocess.run([str(PLUGINS / name / "1.0.0" / name)], input=stdin, capture_output=True, env=env,
                              cwd=scratch, start_new_session=True, timeout=30,
                              **({"user": user, "group": user, "extra_groups": []} if user is not None else {}))
    except PermissionError as e:  # exec refused: as another user, the checkout may be out of reach
        return 126, None, f"Permission denied: {e}"
    out = None
    if proc.returncode == 0:
        text = proc.stdout.decode()
        out = json.loads(text)
        assert text.count("\n") == 1, "stdout must be exactly one JSON document"
    return proc.returncode, out, proc.stderr.decode()


def check_shape(out: dict, n_observations: int) -> None:
    """The assessment/1 output document, with OSCAL-style observations and findings."""
    assert set(out) == {"status", "title", "observations", "findings", "risks", "subjects", "logs"}
    assert out["status"] in ("satisfied", "not-satisfied")
    assert isinstance(out["title"], str) and out["title"]
    assert out["risks"] == [] and out["logs"] == []
    assert len(out["observations"]) == n_observations
    assert len(out["subjects"]) == n_observations
    observation_uuids = set()
    for obs in out["observations"]:
        uuid.UUID(obs["uuid"])
        observation_uuids.add(obs["uuid"])
        assert obs["methods"] == ["TEST"]
        assert obs["title"] and obs["description"]
        collected = datetime.datetime.fromisoformat(obs["collected"].replace("Z", "+00:00"))
        assert abs((datetime.datetime.now(datetime.timezone.utc) - collected).total_seconds()) < 60
        assert len(obs["subjects"]) == 1 and obs["subjects"][0]["type"] == "resource"
        assert obs["subjects"][0] in out["subjects"]
        assert all(set(p) == {"name", "value"} and isinstance(p["value"], str) for p in obs["props"])
    for finding in out["findings"]:
        uuid.UUID(finding["uuid"])
        assert finding["title"] and finding["description"]
        target = finding["target"]
        assert target["type"] == "objective-id" and target["target_id"]
        assert target["status"] == {"state": "not-satisfied"}
        assert finding["related_observations"][0]["observation_uuid"] in observation_uuids
    assert (out["status"] == "satisfied") == (not out["findings"])
    assert len({o["uuid"] for o in out["observations"]} | {f["uuid"] for f in out["findings"]}) == \
        len(out["observations"]) + len(out["findings"])


def props(obs: dict) -> dict:
    return {p["name"]: p["value"] for p in obs["props"]}


# -- file-permissions -----------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    a, b = d / "a.conf", d / "secret"
    a.write_text("a\n")
    b.write_text("b\n")
    a.chmod(0o644)
    b.chmod(0o600)
    return a, b


def me():
    uid, gid = os.getuid(), os.getgid()
    return pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name, uid, gid


def test_file_permissions_satisfied(tmp_path, files):
    a, b = files
    user, group, uid, gid = me()
    config = {"files": [
        {"path": str(a), "owner": user, "group": group, "mode": "0644"},
        {"path": str(b), "owner": uid, "group": str(gid), "max_mode": "0640"},
        {"path": str(tmp_path / "absent"), "must_exist": False, "mode": "0600"},
        {"path": str(a), "max_mode": "0o644"},
    ]}
    code, out, err = run_plugin("file-permissions", config, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out, 4)
    assert out["status"] == "satisfied" and out["findings"] == []
    first = out["observations"][0]
    assert first["subjects"] == [{"type": "resource", "title": str(a)}]
    assert props(first) == {"path": str(a), "exists": "true", "type": "regular file", "owner": user,
                            "uid": str(uid), "group": group, "gid": str(gid), "mode": "0644"}
    assert props(out["observations"][1])["mode"] == "0600"
    assert props(out["observations"][2])["exists"] == "false"
    assert [s["title"] for s in out["subjects"]] == [str(a), str(b), str(tmp_path / "absent"), str(a)]


def test_file_permissions_not_satisfied(tmp_path, files):
    a, b = files
    b.chmod(0o664)
    a.chmod(0o4755)
    user, group, uid, gid = me()
    config = {"files": [
        {"path": str(a), "owner": 12345, "group": "no-such-group-xyz", "mode": "0644"},  # 3 findings
        {"path": str(b), "owner": user, "max_mode": "0640"},  # 1 finding: group write
        {"path": str(tmp_path / "absent")},  # must exist: 1 finding
        {"path": str(tmp_path / "dir"), "must_exist": True, "max_mode": "0755"},  # missing too
    ]}
    code, out, err = run_plugin("file-permissions", config, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out, 4)
    assert out["status"] == "not-satisfied"
    targets = [f["target"]["target_id"] for f in out["findings"]]
    assert targets == [f"file-permissions:{a}:owner", f"file-permissions:{a}:group", f"file-permissions:{a}:mode",
                       f"file-permissions:{b}:max_mode", f"file-permissions:{tmp_path / 'absent'}:exists",
                       f"file-permissions:{tmp_path / 'dir'}:exists"]
    by_target = dict(zip(targets, out["findings"]))
    assert "4755" in by_target[f"file-permissions:{a}:mode"]["title"]
    assert "0664" in by_target[f"file-permissions:{b}:max_mode"]["title"]
    assert "12345" in by_target[f"file-permissions:{a}:owner"]["description"]
    assert "no-such-group-xyz" in by_target[f"file-permissions:{a}:group"]["title"]
    obs = {o["uuid"]: o for o in out["observations"]}
    assert obs[by_target[f"file-permissions:{b}:max_mode"]["related_observations"][0]["observation_uuid"]][
        "subjects"] == [{"type": "resource", "title": str(b)}]
    assert props(out["observations"][0])["mode"] == "4755"
    assert out["title"] == "File permissions: 4 of 4 files not as expected"


def test_file_permissions_follows_symlinks_and_reports_directories(tmp_path, files):
    a, _ = files
    link = tmp_path / "link"
    link.symlink_to(a)
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    config = {"files": [{"path": str(link), "mode": "0644"}, {"path": str(d), "mode": "0755"}]}
    code, out, err = run_plugin("file-permissions", config, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out, 2)
    assert out["status"] == "satisfied"
    assert props(out["observations"][0])["symlink_target"] == str(a)
    assert props(out["observations"][1])["type"] == "directory"


@pytest.fixture
def open_tmp():
    """A folder that another user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="plugin-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running the plugin as another user needs root")


@needs_root
def test_file_permissions_as_unprivileged_user_reports_what_it_cannot_see(open_tmp):
    """As run_as_user the plugin may not reach a file: a finding, not a crash."""
    hidden = open_tmp / "hidden"
    hidden.mkdir(mode=0o700)
    secret = hidden / "f"
    secret.write_text("x")
    config = {"files": [{"path": str(secret), "max_mode": "0644"}, {"path": "/etc/passwd", "owner": "root"}]}
    code, out, err = run_plugin("file-permissions", config, open_tmp / "scratch", user=65534)
    if code == 126 or (code != 0 and "Permission denied" in err):
        pytest.skip(f"the checkout is not reachable by uid 65534: {err}")
    assert code == 0, err
    check_shape(out, 2)
    assert out["status"] == "not-satisfied"
    assert [f["target"]["target_id"] for f in out["findings"]] == [f"file-permissions:{secret}:readable"]
    assert "Permission denied" in out["findings"][0]["description"]


@pytest.mark.parametrize("config,message", [
    ([], "$.config: expected an object"),
    ({}, "$.config.files: expected a non-empty list"),
    ({"files": []}, "$.config.files: expected a non-empty list"),
    ({"files": "/etc/passwd"}, "$.config.files: expected a non-empty list"),
    ({"files": [{"owner": "root"}]}, "$.config.files[0].path: required"),
    ({"files": ["/etc/passwd"]}, "$.config.files[0]: expected an object"),
    ({"files": [{"path": "etc/passwd"}]}, "$.config.files[0].path: expected an absolute path"),
    ({"files": [{"path": "/etc/passwd", "mode": 644}]}, "$.config.files[0].mode: expected an octal mode string"),
    ({"files": [{"path": "/etc/passwd", "max_mode": "0999"}]}, "$.config.files[0].max_mode: expected an octal"),
    ({"files": [{"path": "/etc/passwd", "owner": True}]}, "$.config.files[0].owner: expected a user name"),
    ({"files": [{"path": "/etc/passwd", "group": -1}]}, "$.config.files[0].group: a group id must not be negative"),
    ({"files": [{"path": "/etc/passwd", "must_exist": "no"}]}, "$.config.files[0].must_exist: expected true or false"),
    ({"files": [{"path": "/etc/passwd", "max-mode": "0644"}]}, "$.config.files[0].max-mode: unknown key"),
    ({"files": [{"path": "/etc/passwd"}], "file": []}, "$.config.file: unknown key"),
])
def test_file_permissions_bad_config_exits_2(tmp_path, config, message):
    code, out, err = run_plugin("file-permissions", config, tmp_path / "scratch")
    assert code == 2
    assert err.startswith("file-permissions: bad config: ") and message in err, err


@pytest.mark.parametrize("plugin", ["file-permissions", "sysctl"])
def test_stdin_not_json_exits_2(tmp_path, plugin):
    code, _, err = run_plugin(plugin, None, tmp_path / "scratch", raw_stdin=b"{not json")
    assert code == 2 and "stdin is not a JSON document" in err
    code, _, err = run_plugin(plugin, None, tmp_path / "scratch", raw_stdin=b"[1, 2]")
    assert code == 2 and "expected a JSON object" in err


# -- sysctl ---------------------------------------------------------------------------

def read_sysctl(key: str) -> str:
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read()


KNOWN = ["kernel.ostype", "kernel.pid_max", "kernel.randomize_va_space", "vm.overcommit_memory"]


def test_sysctl_satisfied_with_values_read_first(tmp_path):
    expect = {key: read_sysctl(key).strip() for key in KNOWN}
    expect["kernel.pid_max"] = int(expect["kernel.pid_max"])  # numbers are fine too
    if os.path.exists("/proc/sys/net/ipv4/ip_local_port_range"):
        low, high = read_sysctl("net.ipv4.ip_local_port_range").split()
        expect["net.ipv4.ip_local_port_range"] = f"  {low}    {high} "  # whitespace does not matter
    code, out, err = run_plugin("sysctl", {"expect": expect}, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out, len(expect))
    assert out["status"] == "satisfied", out["findings"]
    first = out["observations"][0]
    assert props(first) == {"key": "kernel.ostype", "path": "/proc/sys/kernel/ostype",
                            "expected": read_sysctl("kernel.ostype").strip(), "value": "Linux"}
    assert out["subjects"][0] == {"type": "resource", "title": "kernel.ostype"}


def test_sysctl_not_satisfied_and_missing(tmp_path):
    actual = read_sysctl("kernel.randomize_va_space").strip()
    wrong = "0" if actual != "0" else "2"
    expect = {"kernel.ostype": "Linux", "kernel.randomize_va_space": wrong,
              "kernel.no_such_parameter_xyz": "1", "kernel": "1"}
    code, out, err = run_plugin("sysctl", {"expect": expect}, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out, 4)
    assert out["status"] == "not-satisfied"
    assert [f["target"]["target_id"] for f in out["findings"]] == [
        "sysctl:kernel.randomize_va_space", "sysctl:kernel.no_such_parameter_xyz", "sysctl:kernel"]
    assert out["findings"][0]["title"] == f"kernel.randomize_va_space = {actual}, expected {wrong}"
    assert out["findings"][1]["title"] == "kernel.no_such_parameter_xyz is missing"
    assert "not a parameter" in out["findings"][2]["description"]
    assert props(out["observations"][1])["value"] == actual
    assert "value" not in props(out["observations"][2])
    assert out["title"] == "sysctl: 3 of 4 kernel parameters not as expected"


@needs_root
def test_sysctl_as_unprivileged_user(open_tmp):
    expect = {key: read_sysctl(key).strip() for key in KNOWN}
    code, out, err = run_plugin("sysctl", {"expect": expect}, open_tmp / "scratch", user=65534)
    if code == 126 or (code != 0 and "Permission denied" in err):
        pytest.skip(f"the checkout is not reachable by uid 65534: {err}")
    assert code == 0, err
    check_shape(out, len(expect))
    assert out["status"] == "satisfied", out["findings"]


@pytest.mark.parametrize("key", ["../../etc/passwd", "kernel/ostype", "kernel..ostype", ".kernel.ostype",
                                 "kernel.ostype.", "kernel.os type", "kernel.ostype\n", "kernel.$x", ""])
def test_sysctl_refuses_keys_that_could_leave_proc_sys(tmp_path, key):
    code, out, err = run_plugin("sysctl", {"expect": {"kernel.ostype": "Linux", key: "1"}}, tmp_path / "scratch")
    assert code == 2, out
    assert err.startswith("sysctl: bad config: $.config.expect["), err


@pytest.mark.parametrize("config,message", [
    ("kernel.ostype", "$.config: expected an object"),
    ({}, "$.config.expect: expected a non-empty object"),
    ({"expect": {}}, "$.config.expect: expected a non-empty object"),
    ({"expect": ["kernel.ostype"]}, "$.config.expect: expected a non-empty object"),
    ({"expect": {"kernel.ostype": None}}, "expected a string, a number or a list"),
    ({"expect": {"kernel.ostype": {"a": 1}}}, "expected a string, a number or a list"),
    ({"expect": {"kernel.ostype": "Linux"}, "expected": {}}, "$.config.expected: unknown key"),
])
def test_sysctl_bad_config_exits_2(tmp_path, config, message):
    code, out, err = run_plugin("sysctl", config, tmp_path / "scratch")
    assert code == 2, out
    assert err.startswith("sysctl: bad config: ") and message in err, err


# -- the example config and specs use the reference plugins -----------------------------

EXAMPLES = REPO / "examples"


def example_specs():
    specs = []
    for path in sorted(glob.glob(str(EXAMPLES / "jobs.d" / "*"))):
        if path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
        elif path.endswith(".toml"):
            with open(path, "rb") as f:
                data = tomllib.load(f)
            data = data["job"] if "job" in data else data
        else:
            continue
        for i, obj in enumerate(data if isinstance(data, list) else [data]):
            specs.append(parse_spec(obj, f"dir:{path}", f"$[{i}]"))
    return specs


def test_example_config_loads():
    config = load_config(str(EXAMPLES / "config.toml"))
    assert config.plugin_dirs == [str(PLUGINS)]
    assert config.specs.dir == str(EXAMPLES / "jobs.d")
    assert config.state_dir == str(EXAMPLES / "state")
    assert config.run_dir == str(EXAMPLES / "state" / "run")
    assert config.jobs.resync_interval == 10 and config.jobs.default_timeout == 30
    assert [(s.name, s.kind, s.path) for s in config.publisher.sink] == \
        [("archive", "file", str(EXAMPLES / "state" / "results.jsonl"))]


def test_example_specs_are_valid_and_run(tmp_path):
    specs = example_specs()
    assert len(specs) >= 4
    assert len({s.job.uuid for s in specs}) == len(specs)
    config = load_config(str(EXAMPLES / "config.toml"))
    for spec in specs:
        job = spec.job
        assert uuid.UUID(job.uuid).version == 4 and str(uuid.UUID(job.uuid)) == job.uuid
        assert 10 <= job.interval <= 60 and job.run_on_start and job.labels
        resolver = PluginResolver(config.plugin_dirs, job.plugin.name, job.plugin.version,
                                  frozenset({0, os.geteuid()}), job.plugin.sha256, config.jobs.require_sha256)
        try:
            plugin, _ = resolver.resolve()
        except PluginError as e:  # a checkout with umask 002: folders writable by group
            assert "untrusted plugin" in e.reason, e.reason
        else:
            assert plugin.manifest.protocol == "assessment/1"
        code, out, err = run_plugin(job.plugin.name, job.config, tmp_path / job.uuid)
        assert code == 0, (job.uuid, err)
        check_shape(out, len(job.config.get("files", job.config.get("expect", []))))
