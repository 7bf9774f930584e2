"""The openscap plugin (plugins/openscap/1.0.0): run as a real subprocess the way SPEC §6 starts
it (no arguments, a new session, cwd = a scratch folder, the scrubbed environment, the
assessment/1 document on stdin), against a small hand-written SCAP source data stream
(tests/fixtures/openscap/fixture-ds.xml, XCCDF 1.2 + OVAL 5.11 + a CPE dictionary) with an
exact expected result, against the SCAP Security Guide content of this host when
openscap-scanner and ssg-* are installed, and once through the real service.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import IS_ROOT, spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from benchlib import load_module  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "plugins" / "openscap" / "1.0.0"
PLUGIN = PLUGIN_DIR / "openscap"
FIXTURES = REPO / "tests" / "fixtures" / "openscap"
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SSG_CONTENT = Path("/usr/share/xml/scap/ssg/content")
OSCAP = shutil.which("oscap", path=PLUGIN_PATH)
PROFILE = "xccdf_org.example_profile_default"
R = "xccdf_org.example_rule_"
FINDING_NS = uuid.uuid5(uuid.NAMESPACE_URL, "https://assessment-runtime/plugins/openscap")

needs_oscap = pytest.mark.skipif(OSCAP is None, reason="oscap is not installed (apt-get install openscap-scanner)")


def load_plugin_module():
    """The plugin as a module (its file has no .py suffix), for the XML reader's own tests."""
    return load_module(PLUGIN, "openscap_plugin")


def run_plugin(config, scratch: Path, *, raw_stdin: bytes | None = None, path: str = PLUGIN_PATH,
               job_extra: dict | None = None, timeout: float = 120, address_space: int | None = None):
    """Run the plugin; returns (exit code, parsed stdout or None, stderr, raw stdout)."""
    scratch.mkdir(exist_ok=True)
    job_uuid, run_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    job = {"uuid": job_uuid, "plugin": {"name": "openscap", "version": "1.0.0"}, "interval": "1h", "config": config,
           **(job_extra or {})}
    document = {"protocol": "assessment/1", "run_uuid": run_uuid, "job": job, "config": config}
    stdin = raw_stdin if raw_stdin is not None else json.dumps(document).encode()
    env = {"PATH": path, "LANG": "C.UTF-8", "HOME": str(scratch), "ASSESSMENT_JOB_UUID": job_uuid,
           "ASSESSMENT_RUN_UUID": run_uuid, "ASSESSMENT_RUNTIME_UUID": str(uuid.uuid4())}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))) if address_space else None
    proc = subprocess.run([str(PLUGIN)], input=stdin, capture_output=True, env=env, cwd=scratch,
                          start_new_session=True, timeout=timeout, preexec_fn=limit)
    out = None
    if proc.returncode == 0:
        text = proc.stdout.decode()
        assert text.count("\n") == 1 and text.endswith("\n"), "stdout must be exactly one JSON document"
        out = json.loads(text)
    assert list(scratch.iterdir()) == [], "the plugin leaves its scratch folder as it found it"
    return proc.returncode, out, proc.stderr.decode(), proc.stdout


def props(obj: dict) -> dict:
    """name -> value, or name -> [values] for a name that repeats."""
    out: dict = {}
    for p in obj.get("props", []):
        if p["name"] in out:
            out[p["name"]] = (out[p["name"]] if isinstance(out[p["name"]], list) else [out[p["name"]]]) + [p["value"]]
        else:
            out[p["name"]] = p["value"]
    return out


def check_shape(out: dict) -> None:
    """The assessment/1 output with OSCAL-style observations and findings, as this plugin makes them."""
    assert set(out) == {"status", "title", "observations", "findings", "risks", "subjects", "logs"}
    assert out["status"] in ("satisfied", "not-satisfied") and out["title"]
    assert out["risks"] == [] and len(out["subjects"]) == 1
    assert out["subjects"][0]["type"] in ("inventory-item", "resource") and out["subjects"][0]["title"]
    for log in out["logs"]:
        assert set(log) == {"stream", "text"} and log["stream"] == "oscap-stderr"
    uuids = set()
    for obs in out["observations"]:
        uuid.UUID(obs["uuid"])
        uuids.add(obs["uuid"])
        assert set(obs) == {"uuid", "title", "description", "methods", "collected", "subjects", "props"}
        assert obs["methods"] == ["TEST"] and obs["title"] and obs["description"]
        collected = datetime.datetime.fromisoformat(obs["collected"].replace("Z", "+00:00"))
        assert collected.tzinfo is not None
        assert abs((datetime.datetime.now(datetime.timezone.utc) - collected).total_seconds()) < 3600
        assert obs["subjects"] == out["subjects"]
        assert all(set(p) == {"name", "value"} and isinstance(p["value"], str) for p in obs["props"])
    summary = props(out["observations"][0])
    for key in ("datastream", "datastream_match", "profile_id", "platform_check", "rules_evaluated", "rules_pass",
                "rules_fail", "rules_notapplicable", "rules_notchecked", "rules_notselected", "rules_error"):
        assert key in summary, key
    rule_obs = [o for o in out["observations"] if "rule_id" in props(o)]
    for obs in rule_obs:
        p = props(obs)
        assert p["result"] in ("pass", "fail", "error", "unknown", "notapplicable", "notchecked", "informational")
        assert p["title"] == obs["title"] and p["severity"]
    for finding in out["findings"]:
        assert str(uuid.UUID(finding["uuid"])) == finding["uuid"]
        assert finding["title"] and finding["description"]
        target = finding["target"]
        rule_id = props(finding)["rule_id"]
        assert finding["uuid"] == str(uuid.uuid5(FINDING_NS, rule_id))
        assert target["type"] == "objective-id" and target["target_id"] == "openscap:" + rule_id
        assert target["status"]["state"] == "not-satisfied" and target["status"]["reason"] in ("fail", "other")
        assert props(target)["rule_id"] == rule_id
        for rel in finding.get("related_observations", []):
            assert rel["observation_uuid"] in uuids
    bad = int(summary["rules_fail"]) + int(summary["rules_error"]) + int(summary["rules_unknown"])
    assert (out["status"] == "not-satisfied") == (bad > 0) == bool(out["findings"]) or len(out["findings"]) < bad
    assert len(uuids) == len(out["observations"])


# -- the fixture --------------------------------------------------------------------------

def install_fixture(area: Path, name: str = "fx", root_in_paths: bool = True, version_id: str = "1") -> dict:
    """A copy of the fixture tree and its data stream in a world-readable folder; @ROOT@ in the
    data stream becomes the tree (root_in_paths) or "" (for an offline scan with config root)."""
    base = area / name
    shutil.copytree(FIXTURES / "tree", base / "tree")
    if version_id != "1":
        release = base / "tree" / "etc" / "os-release"
        release.write_text(release.read_text().replace('VERSION_ID="1"', f'VERSION_ID="{version_id}"'))
    text = (FIXTURES / "fixture-ds.xml").read_text().replace("@ROOT@", str(base / "tree") if root_in_paths else "")
    ds = base / "fixture-ds.xml"
    ds.write_text(text)
    for p in [base, *base.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return {"base": base, "tree": base / "tree", "ds": ds}


@pytest.fixture
def fixture(area):
    return install_fixture(area)


EXPECTED_RULES = [  # (rule, title, severity, result, cce) in benchmark order
    ("root_login_disabled", "Disable SSH Root Login", "high", "pass", "CCE-00001-1"),
    ("x11_forwarding_off", "Disable X11 Forwarding", "medium", "fail", "CCE-00002-9"),
    ("sshd_config_exists", "sshd_config Exists", "low", "pass", None),
    ("required_conf_exists", "required.conf Exists", "low", "fail", None),
    ("never_platform", "A Rule For Another Platform", "medium", "notapplicable", None),
    ("manual_review", "Review the Site Policy by Hand", "unknown", "notchecked", None),
]


def expect_fixture_result(out: dict, *, datastream: str, match: str = "explicit", platform_check: str = "true",
                          root: str = "/", oscap_input: str = "datastream") -> None:
    """The exact result of the fixture profile: 2 pass, 2 fail, 1 notapplicable, 1 notchecked."""
    check_shape(out)
    assert out["status"] == "not-satisfied"
    assert out["title"] == "OpenSCAP Fixture profile: 2 of 6 rules failed"
    subject = {"type": "inventory-item", "title": os.uname().nodename} if root == "/" else \
        {"type": "resource", "title": root}
    assert out["subjects"] == [subject]
    summary, *rule_obs = out["observations"]
    assert summary["title"] == "OpenSCAP Fixture profile: 2 pass, 2 fail, 1 notapplicable, 1 notchecked"
    assert summary["description"].startswith(
        "6 rules evaluated with profile Fixture profile (Fixture benchmark) (data stream %s, " % datastream)
    assert "2 pass, 2 fail, 1 notapplicable, 1 notchecked; 2 not selected." in summary["description"]
    p = props(summary)
    assert {k: v for k, v in p.items() if k not in ("os", "score")} == {
        "datastream": datastream, "datastream_match": match, "benchmark_id": "xccdf_org.example_benchmark_fixture",
        "benchmark_version": "1.0", "profile_id": PROFILE, "profile_title": "Fixture profile",
        "platform_check": platform_check, "root": root, "oscap_input": oscap_input, "oscap_exit_code": "2",
        "rules_evaluated": "6",
        "rules_pass": "2", "rules_fail": "2", "rules_error": "0", "rules_unknown": "0", "rules_notapplicable": "1",
        "rules_notchecked": "1", "rules_notselected": "2", "rules_informational": "0", "rules_fixed": "0",
        **({"os_platform_taken_as_met": "cpe:/o:example:fixtureos:1"} if platform_check == "false" else {})}
    assert float(p["score"]) == pytest.approx(33.33, abs=0.01)
    assert [o["title"] for o in rule_obs] == [t for _, t, _, _, _ in EXPECTED_RULES]
    for obs, (rule, title, severity, result, cce) in zip(rule_obs, EXPECTED_RULES):
        assert props(obs) == {"rule_id": R + rule, "title": title, "severity": severity, "result": result,
                              **({"cce": cce} if cce else {})}
        message = ". oscap: No candidate or applicable check found." if result == "notchecked" else ""
        assert obs["description"] == f"{result}: {title} ({R + rule}){message}"
    by_rule = {props(o)["rule_id"]: o for o in rule_obs}
    profile_text = "profile Fixture profile (Fixture benchmark)"
    assert out["findings"] == [
        {"uuid": str(uuid.uuid5(FINDING_NS, R + "x11_forwarding_off")),
         "title": "Disable X11 Forwarding",
         "description": f"Disable X11 Forwarding ({R}x11_forwarding_off, severity medium) failed in {profile_text}.",
         "target": {"type": "objective-id", "target_id": f"openscap:{R}x11_forwarding_off",
                    "title": "Disable X11 Forwarding", "status": {"state": "not-satisfied", "reason": "fail"},
                    "props": [{"name": "rule_id", "value": R + "x11_forwarding_off"},
                              {"name": "nist-800-53", "value": "CM-6(a)"}, {"name": "nist-800-53", "value": "CM-7(a)"},
                              {"name": "cis-debian", "value": "5.2.6"}, {"name": "cis-controls", "value": "9.2"},
                              {"name": "nist-800-171", "value": "3.1.13"}, {"name": "pci-dss", "value": "Req-2.2.4"}]},
         "props": [{"name": "rule_id", "value": R + "x11_forwarding_off"}, {"name": "severity", "value": "medium"},
                   {"name": "result", "value": "fail"}, {"name": "cce", "value": "CCE-00002-9"},
                   {"name": "nist-800-53", "value": "CM-6(a)"}, {"name": "nist-800-53", "value": "CM-7(a)"},
                   {"name": "cis-debian", "value": "5.2.6"}, {"name": "cis-controls", "value": "9.2"},
                   {"name": "nist-800-171", "value": "3.1.13"}, {"name": "pci-dss", "value": "Req-2.2.4"}],
         "related_observations": [{"observation_uuid": by_rule[R + "x11_forwarding_off"]["uuid"]}]},
        {"uuid": str(uuid.uuid5(FINDING_NS, R + "required_conf_exists")),
         "title": "required.conf Exists",
         "description": f"required.conf Exists ({R}required_conf_exists, severity low) failed in {profile_text}.",
         "target": {"type": "objective-id", "target_id": f"openscap:{R}required_conf_exists",
                    "title": "required.conf Exists", "status": {"state": "not-satisfied", "reason": "fail"},
                    "props": [{"name": "rule_id", "value": R + "required_conf_exists"}]},
         "props": [{"name": "rule_id", "value": R + "required_conf_exists"}, {"name": "severity", "value": "low"},
                   {"name": "result", "value": "fail"}],
         "related_observations": [{"observation_uuid": by_rule[R + "required_conf_exists"]["uuid"]}]},
    ]


@needs_oscap
@pytest.mark.timeout(60)
def test_fixture_data_stream_is_valid_scap(fixture, tmp_path):
    r = subprocess.run([OSCAP, "ds", "sds-validate", str(fixture["ds"])], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([OSCAP, "xccdf", "eval", "--profile", PROFILE, "--progress", "--results",
                        str(tmp_path / "r.xml"), str(fixture["ds"])], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr  # 2: some rule failed
    assert r.stdout.split() == [f"{R}{rule}:{result}" for rule, _, _, result, _ in EXPECTED_RULES]


@needs_oscap
@pytest.mark.timeout(60)
def test_fixture_gives_the_exact_result(fixture, tmp_path):
    left = tmp_path / "scratch" / "openscap-k1lled99"  # what a run killed on its timeout leaves
    left.mkdir(parents=True)
    (left / "results.xml").write_text("<partial")
    code, out, err, _ = run_plugin({"datastream": str(fixture["ds"]), "profile": PROFILE}, tmp_path / "scratch")
    assert code == 0, err
    expect_fixture_result(out, datastream=str(fixture["ds"]))
    assert out["logs"] == []
    # a second run: new observations, the same findings (stable uuids per rule)
    code, again, err, _ = run_plugin({"datastream": str(fixture["ds"]), "profile": "default"}, tmp_path / "scratch")
    assert code == 0, err
    assert [f["uuid"] for f in again["findings"]] == [f["uuid"] for f in out["findings"]]
    assert not {o["uuid"] for o in again["observations"]} & {o["uuid"] for o in out["observations"]}


@needs_oscap
@pytest.mark.timeout(60)
def test_offline_scan_of_a_root_and_content_chosen_from_its_os_release(area, tmp_path):
    """root = the fixture tree: os-release is read there (fixtureos 1 -> ssg-fixtureos1-ds.xml in
    content_dir) and oscap's probes read under it (OSCAP_PROBE_ROOT); the paths in the content are /etc/..."""
    fx = install_fixture(area, root_in_paths=False)
    content = area / "content"
    content.mkdir(mode=0o755)
    shutil.copy(fx["ds"], content / "ssg-fixtureos1-ds.xml")
    shutil.copy(fx["ds"], content / "ssg-fixtureos1-ds-1.2.xml")  # -ds.xml is preferred
    shutil.copy(fx["ds"], content / "ssg-otheros1-ds.xml")
    config = {"root": str(fx["tree"]), "content_dir": str(content), "profile": PROFILE}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 0, err
    expect_fixture_result(out, datastream=str(content / "ssg-fixtureos1-ds.xml"), match="exact", root=str(fx["tree"]))
    assert props(out["observations"][0])["os"] == "fixtureos 1"


@needs_oscap
@pytest.mark.timeout(60)
def test_content_of_an_older_release_is_evaluated_without_its_os_platform_check(area, tmp_path):
    """Like Debian 12 with only Debian 11 content: fixtureos 2 gets ssg-fixtureos1-ds.xml (the
    newest older release), whose benchmark platform cpe:/o:example:fixtureos:1 is not met. By
    default the OS platform is then taken as met; the rules' own platforms still apply."""
    fx = install_fixture(area, root_in_paths=False, version_id="2")
    root = str(fx["tree"])
    content = area / "content"
    content.mkdir(mode=0o755)
    for version in ("1", "3"):  # 3 is newer than the host: never picked
        shutil.copy(fx["ds"], content / f"ssg-fixtureos{version}-ds.xml")
    config = {"root": root, "content_dir": str(content), "profile": PROFILE}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 0, err
    ds = str(content / "ssg-fixtureos1-ds.xml")
    expect_fixture_result(out, datastream=ds, match="nearest", platform_check="false", root=root)
    assert "the nearest release to fixtureos 2" in out["observations"][0]["description"]
    assert "(cpe:/o:example:fixtureos:1) was taken as met" in out["observations"][0]["description"]

    # with the platform check: every rule notapplicable, nothing failed, and the summary says why
    code, out, err, _ = run_plugin({**config, "platform_check": True}, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out)
    assert out["status"] == "satisfied" and out["findings"] == []
    assert out["title"] == "OpenSCAP Fixture profile: no rule failed (6 notapplicable)"
    p = props(out["observations"][0])
    assert (p["rules_notapplicable"], p["rules_pass"], p["platform_check"]) == ("6", "0", "true")
    assert [props(o)["result"] for o in out["observations"][1:]] == ["notapplicable"] * 6
    assert "Every rule is notapplicable" in out["observations"][0]["description"]
    assert "cpe:/o:example:fixtureos:1" in out["observations"][0]["description"]

    # an explicit data stream keeps the check unless told otherwise
    code, out, err, _ = run_plugin({"datastream": ds, "profile": PROFILE, "root": root}, tmp_path / "scratch")
    assert code == 0, err
    assert props(out["observations"][0])["rules_notapplicable"] == "6"
    code, out, err, _ = run_plugin({"datastream": ds, "profile": PROFILE, "root": root, "platform_check": False},
                                   tmp_path / "scratch")
    assert code == 0, err
    expect_fixture_result(out, datastream=ds, platform_check="false", root=root)


@needs_oscap
@pytest.mark.timeout(60)
def test_rules_and_skip_rules_choose_what_is_evaluated(fixture, tmp_path):
    config = {"datastream": str(fixture["ds"]), "profile": PROFILE,
              "rules": [R + "x11_forwarding_off", R + "root_login_disabled"]}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out)
    assert [(props(o)["rule_id"], props(o)["result"]) for o in out["observations"][1:]] == [
        (R + "root_login_disabled", "pass"), (R + "x11_forwarding_off", "fail")]
    assert props(out["observations"][0])["rule_selected"] == config["rules"]
    assert props(out["observations"][0])["rules_notselected"] == "6"
    assert [f["target"]["target_id"] for f in out["findings"]] == [f"openscap:{R}x11_forwarding_off"]

    code, out, err, _ = run_plugin({"datastream": str(fixture["ds"]), "profile": "", "rules": ["xccdf_org.example_rule_"
                                                                                           "not_in_profile"]},
                                   tmp_path / "scratch")
    assert code == 0, err
    assert [(props(o)["rule_id"], props(o)["result"]) for o in out["observations"][1:]] == [
        (R + "not_in_profile", "pass")]
    assert out["title"] == "OpenSCAP (no profile): no rule failed (1 pass)"

    config = {"datastream": str(fixture["ds"]), "profile": PROFILE,
              "skip_rules": [R + "x11_forwarding_off", R + "required_conf_exists"]}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out)
    assert out["status"] == "satisfied" and out["findings"] == []
    assert out["title"] == "OpenSCAP Fixture profile: no rule failed (2 pass, 1 notapplicable, 1 notchecked)"


@needs_oscap
@pytest.mark.timeout(60)
def test_split_data_stream_gives_the_same_result(fixture, area, tmp_path):
    """split_datastream: the data stream is split into the scratch folder and its checklist
    evaluated from there (what happens by default where /tmp cannot be written)."""
    config = {"datastream": str(fixture["ds"]), "profile": PROFILE, "split_datastream": True}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 0, err
    expect_fixture_result(out, datastream=str(fixture["ds"]), oscap_input="split")
    # with the OS platform taken as met, and with rules
    fx2 = install_fixture(area, name="fx2", root_in_paths=False, version_id="2")
    config = {"datastream": str(fx2["ds"]), "root": str(fx2["tree"]), "profile": PROFILE, "split_datastream": True,
              "platform_check": False}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 0, err
    expect_fixture_result(out, datastream=str(fx2["ds"]), platform_check="false", root=str(fx2["tree"]),
                          oscap_input="split")
    code, out, err, _ = run_plugin({**config, "rules": [R + "x11_forwarding_off"]}, tmp_path / "scratch")
    assert code == 0, err
    assert [props(o)["result"] for o in out["observations"][1:]] == ["fail"]


@needs_oscap
@pytest.mark.timeout(60)
@pytest.mark.parametrize("split", [False, True])
def test_tailoring(fixture, tmp_path, split):
    config = {"datastream": str(fixture["ds"]), "tailoring": str(FIXTURES / "tailoring.xml"),
              "profile": "xccdf_org.example_profile_tailored", "split_datastream": split}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out)
    assert out["title"] == "OpenSCAP Fixture profile, tailored: 1 of 5 rules failed"
    assert [props(o)["rule_id"] for o in out["observations"][1:]] == \
        [R + r for r, *_ in EXPECTED_RULES if r != "x11_forwarding_off"]
    assert [f["target"]["target_id"] for f in out["findings"]] == [f"openscap:{R}required_conf_exists"]
    assert props(out["observations"][0])["tailoring"] == str(FIXTURES / "tailoring.xml")


# -- error paths ----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_no_oscap_is_an_error_naming_the_package(fixture, tmp_path):
    code, out, err, _ = run_plugin({"datastream": str(fixture["ds"])}, tmp_path / "scratch", path="/nonexistent")
    assert code == 3 and out is None
    assert err.startswith("openscap: oscap not found in PATH /nonexistent: install the package openscap-scanner"), err
    code, out, err, _ = run_plugin({"datastream": str(fixture["ds"]), "oscap": "/nonexistent/oscap"},
                                   tmp_path / "scratch")
    assert code == 3 and "/nonexistent/oscap not found: install the package openscap-scanner" in err, err


@pytest.mark.timeout(60)
def test_no_content_is_an_error_naming_the_package(area, tmp_path):
    fx = install_fixture(area)
    release = fx["tree"] / "etc" / "os-release"
    release.write_text('ID=debian\nVERSION_ID="12"\n')
    empty = area / "empty"
    empty.mkdir()
    code, out, err, _ = run_plugin({"root": str(fx["tree"]), "content_dir": str(empty)}, tmp_path / "scratch")
    assert code == 3 and out is None
    assert err.startswith(f"openscap: no SCAP Security Guide data stream for debian 12 under {empty} (none found): "
                          "install the SCAP Security Guide: ssg-debian"), err
    shutil.copy(fx["ds"], empty / "ssg-debian13-ds.xml")  # only newer content: not used
    code, out, err, _ = run_plugin({"root": str(fx["tree"]), "content_dir": str(empty)}, tmp_path / "scratch")
    assert code == 3 and "(found: ssg-debian13-ds.xml)" in err, err
    release.write_text('ID=ubuntu\nVERSION_ID="22.04"\n')
    code, out, err, _ = run_plugin({"root": str(fx["tree"]), "content_dir": str(empty)}, tmp_path / "scratch")
    assert code == 3 and "for ubuntu 22.04" in err and "ssg-debderived" in err, err
    code, out, err, _ = run_plugin({"datastream": str(area / "nope.xml")}, tmp_path / "scratch")
    assert code == 3 and f"data stream {area / 'nope.xml'} does not exist" in err, err


@needs_oscap
@pytest.mark.timeout(60)
def test_bad_profile_is_an_error_with_oscaps_message_and_the_profiles(fixture, tmp_path):
    code, out, err, _ = run_plugin({"datastream": str(fixture["ds"]), "profile": "no_such_profile"},
                                   tmp_path / "scratch")
    assert code == 4 and out is None
    assert 'No profile matching suffix "no_such_profile" was found' in err, err
    assert "oscap xccdf eval failed with exit code 1" in err
    assert f"profiles in {fixture['ds']}: {PROFILE}" in err
    assert len(err.encode()) < 4096, "the runtime keeps the last 4 KiB of stderr"


@needs_oscap
@pytest.mark.timeout(60)
def test_corrupt_data_stream_is_an_error_with_oscaps_message(fixture, area, tmp_path):
    corrupt = area / "corrupt-ds.xml"
    corrupt.write_bytes(fixture["ds"].read_bytes()[:5000])
    code, out, err, _ = run_plugin({"datastream": str(corrupt), "profile": PROFILE}, tmp_path / "scratch")
    assert code == 4 and out is None
    assert "OpenSCAP Error" in err and "oscap xccdf eval failed with exit code 1: OpenSCAP Error:" in err, err
    notscap = area / "not-scap.xml"
    notscap.write_text("<a>not SCAP</a>\n")
    code, out, err, _ = run_plugin({"datastream": str(notscap), "profile": PROFILE}, tmp_path / "scratch")
    assert code == 4 and "Unknown document type" in err, err
    code, out, err, _ = run_plugin({"datastream": str(fixture["ds"]), "profile": PROFILE, "rules": [R + "nope"]},
                                   tmp_path / "scratch")
    assert code == 4 and f"Rule '{R}nope' not found" in err, err
    code, out, err, _ = run_plugin({"datastream": str(fixture["ds"]), "tailoring": str(area / "no-tailoring.xml")},
                                   tmp_path / "scratch")
    assert code == 2 and "$.config.tailoring: " in err, err


@needs_oscap
@pytest.mark.timeout(60)
def test_address_space_limit(fixture, tmp_path):
    """The runtime's memory limit is RLIMIT_AS where no cgroup enforces it. oscap's probe threads
    each get a 64 MiB malloc arena of address space: under 512 MiB the probes could not start and
    oscap said notapplicable to everything with exit code 0. The plugin caps the arenas there
    (MALLOC_ARENA_MAX=1), and a run that still starves is an error, never a result."""
    config = {"datastream": str(fixture["ds"]), "profile": PROFILE}
    code, out, err, _ = run_plugin(config, tmp_path / "scratch", address_space=512 << 20)
    assert code == 0, err
    expect_fixture_result(out, datastream=str(fixture["ds"]))
    before = set(Path("/tmp").glob("oscap.*"))
    try:
        code, out, err, _ = run_plugin(config, tmp_path / "scratch", address_space=160 << 20)
    finally:  # a starved oscap may crash and leave its empty temporary folder behind
        for left in set(Path("/tmp").glob("oscap.*")) - before:
            if left.is_dir() and left.stat().st_uid == os.getuid() and not any(left.iterdir()):
                left.rmdir()
    assert code == 4 and out is None, out
    # exit code 0 with every rule notapplicable, exit code 12 or a crash: whichever oscap does, an error
    assert re.search(r"oscap xccdf eval (ran out of memory or threads|failed with exit code|was killed by signal)",
                     err), err
    assert "Cannot allocate memory" in err, err  # what the runtime looks for to name the memory limit
    assert "the address-space limit is 160 MiB); raise the job's limits.memory" in err, err


def big_fixture(area: Path, rules: int) -> Path:
    """The fixture with `rules` more rules in its profile, every fourth failing."""
    fx = install_fixture(area, name="big")
    text = fx["ds"].read_text()
    extra, selects = [], []
    for i in range(rules):
        rid = f"{R}extra_{i:04d}"
        definition = "oval:org.example:def:2" if i % 4 == 0 else "oval:org.example:def:4"
        extra.append(f"""<Rule id="{rid}" selected="false" severity="low"><title>Extra rule number {i} with a
            somewhat long title, as SSG titles go</title><description>x</description>
            <reference href="http://nvlpubs.nist.gov/nistpubs/SpecialPublications/NIST.SP.800-53r4.pdf">CM-6(a)</reference>
            <check system="http://oval.mitre.org/XMLSchema/oval-definitions-5">
            <check-content-ref href="fixture-oval.xml" name="{definition}"/></check></Rule>""")
        selects.append(f'<select idref="{rid}" selected="true"/>')
    text = text.replace("      </Group>\n    </Benchmark>", "\n".join(extra) + "\n      </Group>\n    </Benchmark>")
    text = text.replace("      </Profile>", "\n".join(selects) + "\n      </Profile>")
    fx["ds"].write_text(text)
    return fx["ds"]


@needs_oscap
@pytest.mark.timeout(120)
def test_output_over_the_limits_is_cut_with_a_note(area, tmp_path):
    ds = big_fixture(area, 400)  # 406 rules: 102 fail + the fixture's
    base = {"datastream": str(ds), "profile": PROFILE}
    code, full, err, raw = run_plugin(base, tmp_path / "scratch")
    assert code == 0, err
    check_shape(full)
    assert len(full["observations"]) == 407 and len(full["findings"]) == 102
    assert full["title"] == "OpenSCAP Fixture profile: 102 of 406 rules failed"
    full_size = len(raw)

    # max_observations: the failed rules' observations are kept first
    code, out, err, raw = run_plugin({**base, "max_observations": 150}, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out)
    summary, *rule_obs, note = out["observations"]
    assert len(rule_obs) == 150
    assert sum(props(o)["result"] == "fail" for o in rule_obs) == 102
    assert note["title"] == "256 of 406 rule observations cut"
    assert note["description"] == ("256 of 406 rule observations cut to stay within max_observations = 150; the "
                                   "counts in the summary observation cover every rule; failed rules were kept first.")
    assert props(note) == {"observations_cut": "256", "findings_cut": "0", "max_observations": "150",
                           "max_output": str(4 << 20)}
    assert props(summary)["rules_evaluated"] == "406" and props(summary)["rules_pass"] == "302"
    assert len(out["findings"]) == 102 and all(f.get("related_observations") for f in out["findings"])
    kept = [props(o)["rule_id"] for o in rule_obs]
    assert kept == sorted(kept, key=[props(o)["rule_id"] for o in full["observations"][1:]].index), "document order"

    # max_output: bytes, exactly respected
    code, out, err, raw = run_plugin({**base, "max_output": "64KiB"}, tmp_path / "scratch")
    assert code == 0, err
    check_shape(out)
    assert full_size > 64 << 10 >= len(raw)
    note = out["observations"][-1]
    cut, findings_cut = int(props(note)["observations_cut"]), int(props(note)["findings_cut"])
    assert cut > 0 and note["description"].endswith(
        "cut to stay within max_output = 65536 bytes; the counts in the summary observation cover every rule; "
        "failed rules were kept first.")
    assert len(out["observations"]) - 2 == 406 - cut and len(out["findings"]) == 102 - findings_cut
    assert out["status"] == "not-satisfied" and props(out["observations"][0])["rules_fail"] == "102"

    # the job's own limits.output is a ceiling for max_output
    code, out, err, raw = run_plugin(base, tmp_path / "scratch", job_extra={"limits": {"output": "40KiB"}})
    assert code == 0, err
    assert len(raw) <= 40 << 10 and props(out["observations"][-1])["max_output"] == str(40 << 10)
    assert "findings_cut" in props(out["observations"][-1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config,message", [
    ([], "$.config: expected an object"),
    ({"profiles": "x"}, "$.config.profiles: unknown key"),
    ({"datastream": "relative.xml"}, "$.config.datastream: expected an absolute path"),
    ({"root": "/nonexistent-root"}, "$.config.root: /nonexistent-root is not a directory"),
    ({"profile": "--help"}, "$.config.profile: expected a profile id"),
    ({"profile": 3}, "$.config.profile: expected a profile id"),
    ({"rules": []}, "$.config.rules: expected a non-empty list"),
    ({"rules": "sshd_disable_root_login"}, "$.config.rules: expected a non-empty list"),
    ({"rules": ["ok_rule", "-x"]}, "$.config.rules[1]: expected a rule id"),
    ({"skip_rules": [1]}, "$.config.skip_rules[0]: expected a rule id"),
    ({"platform_check": "no"}, "$.config.platform_check: expected true or false"),
    ({"split_datastream": 1}, "$.config.split_datastream: expected true or false"),
    ({"oscap": "bin/oscap"}, "$.config.oscap: expected an absolute path or a command name"),
    ({"max_observations": -1}, "$.config.max_observations: expected a number >= 0"),
    ({"max_output": "lots"}, "$.config.max_output: expected a size"),
    ({"max_output": 100}, "$.config.max_output: at least 16384 bytes"),
])
def test_bad_config_exits_2(tmp_path, config, message):
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")
    assert code == 2, out
    assert err.startswith("openscap: bad config: ") and message in err, err


@pytest.mark.timeout(60)
def test_stdin_not_json_exits_2(tmp_path):
    code, _, err, _ = run_plugin(None, tmp_path / "scratch", raw_stdin=b"{not json")
    assert code == 2 and "stdin is not a JSON document" in err
    code, _, err, _ = run_plugin(None, tmp_path / "scratch", raw_stdin=b"[1, 2]")
    assert code == 2 and "expected a JSON object" in err


# -- the results reader: streaming, no DOCTYPE, no entities --------------------------------------

RESULTS = """<?xml version="1.0" encoding="UTF-8"?>
{prolog}<Benchmark xmlns="http://checklists.nist.gov/xccdf/1.2" id="xccdf_b_benchmark_x">
  <status>draft</status><title>T</title><version>1</version>
  <Rule id="xccdf_b_rule_a" severity="high"><title>Rule {body}</title>
    <reference href="https://nvlpubs.nist.gov/x/NIST.SP.800-53r5.pdf">AC-1, AC-2</reference></Rule>
  <TestResult id="xccdf_b_testresult_x"><profile idref="xccdf_b_profile_p"/><target>h</target>
    <rule-result idref="xccdf_b_rule_a" severity="high" time="2024-01-01T00:00:00+00:00"><result>fail</result>
      <message severity="info">m</message></rule-result></TestResult>
</Benchmark>
"""


@pytest.mark.timeout(30)
def test_results_reader_refuses_doctype_and_entities(tmp_path):
    m = load_plugin_module()
    path = tmp_path / "r.xml"
    path.write_text(RESULTS.format(prolog="<!-- a comment <!DOCTYPE> -->\n<?pi x?>\n", body="<![CDATA[<!DOCTYPE x>]]>"))
    bench, profiles, rules, test, results = m.read_results(str(path))
    assert rules["xccdf_b_rule_a"] == {"title": "Rule <!DOCTYPE x>", "severity": "high",
                                       "refs": [("nist-800-53", "AC-1"), ("nist-800-53", "AC-2")]}
    assert results == [{"rule_id": "xccdf_b_rule_a", "result": "fail", "severity": "high",
                        "time": "2024-01-01T00:00:00+00:00", "idents": [], "messages": ["m"]}]
    assert (bench["title"], test["profile"], test["target"]) == ("T", "xccdf_b_profile_p", "h")
    laughs = ('<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
              '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>\n')
    for prolog in (laughs, '<!DOCTYPE x SYSTEM "file:///etc/passwd">\n', "<!-- c -->\n<!DOCTYPE x>\n",
                   "\n" * 70000 + "<!DOCTYPE x>"):
        path.write_text(RESULTS.format(prolog=prolog, body="&lol3;"))
        with pytest.raises(m.UnsafeXML, match="document type declaration"):
            m.read_results(str(path))
    path.write_bytes(RESULTS.format(prolog="", body="x").encode("utf-16"))
    with pytest.raises(m.UnsafeXML, match="only UTF-8"):
        m.read_results(str(path))
    path.write_text(RESULTS.format(prolog="", body="&undefined;"))
    with pytest.raises(m.ET.ParseError):
        m.read_results(str(path))
    path.write_text('<?xml version="1.0"?><oval_results xmlns="http://oval.mitre.org/x"/>')
    with pytest.raises(m.OscapFailed, match="not an XCCDF results file"):
        m.read_results(str(path))


# -- the SCAP Security Guide on this host ------------------------------------------------------

def ssg_datastream() -> str | None:
    """The data stream the plugin picks here by default (None when there is none)."""
    if OSCAP is None or not SSG_CONTENT.is_dir():
        return None
    m = load_plugin_module()
    c = m.parse_config({}, {})
    try:
        ds = m.pick_datastream(c)[0]
    except m.Missing:
        return None
    with open(ds, "rb") as f:  # the tests use its standard profile (RHEL content has none)
        return ds if b'content_profile_standard"' in f.read() else None


needs_ssg = pytest.mark.skipif(ssg_datastream() is None, reason="no SCAP Security Guide content with a standard "
                               "profile for this OS (apt-get install ssg-debian)")


def standard_profile_rules(ds: str, count: int) -> list[str]:
    text = Path(ds).read_text(errors="replace")
    profile = re.search(r'<(?:\w[\w.-]*:)?Profile [^>]*id="xccdf_org\.ssgproject\.content_profile_standard".*?'
                        r'</(?:\w[\w.-]*:)?Profile>', text, re.S)
    assert profile, "the content has a standard profile"
    return re.findall(r'<(?:\w[\w.-]*:)?select idref="([^"]+)" selected="true"', profile.group(0))[:count]


def print_counts(what: str, out: dict, seconds: float | None = None) -> None:
    p = props(out["observations"][0])
    print(f"\n{what}: {p['datastream']} ({p['datastream_match']}, platform_check {p['platform_check']}), "
          f"profile {p['profile_id']}: {p['rules_evaluated']} rules evaluated: pass {p['rules_pass']}, "
          f"fail {p['rules_fail']}, notapplicable {p['rules_notapplicable']}, notchecked {p['rules_notchecked']}, "
          f"error {p['rules_error']}, unknown {p['rules_unknown']} (notselected {p['rules_notselected']}); "
          f"{len(out['findings'])} findings" + (f"; {seconds:.1f}s" if seconds is not None else ""))


@needs_ssg
@pytest.mark.timeout(300)
def test_ssg_standard_profile_on_this_host(tmp_path):
    """The default config: this OS's SSG content, its standard profile. Counts are printed."""
    start = time.monotonic()
    code, out, err, raw = run_plugin({}, tmp_path / "scratch", timeout=280)
    seconds = time.monotonic() - start
    assert code == 0, err
    check_shape(out)
    print_counts("SSG standard profile", out, seconds)
    p = props(out["observations"][0])
    assert p["datastream"] == ssg_datastream() and p["profile_id"] == "xccdf_org.ssgproject.content_profile_standard"
    assert int(p["rules_evaluated"]) == len(out["observations"]) - 1 > 0
    assert int(p["rules_evaluated"]) > int(p["rules_notapplicable"]), "some rule applies to this host"
    counted = {t: int(p["rules_" + t]) for t in ("pass", "fail", "error", "unknown", "notapplicable", "notchecked",
                                                 "informational", "fixed")}
    assert sum(counted.values()) == int(p["rules_evaluated"])
    results = [props(o)["result"] for o in out["observations"][1:]]
    assert {t: results.count(t) for t in counted} == counted
    assert len(out["findings"]) == counted["fail"] + counted["error"] + counted["unknown"]
    assert len(raw) < 4 << 20


@needs_ssg
@pytest.mark.timeout(300)
def test_ssg_rule_subset_and_its_references(tmp_path):
    """20 rules of the standard profile; the NIST 800-53 / CIS references that SSG carries reach the findings."""
    ds = ssg_datastream()
    rules = standard_profile_rules(ds, 20)
    short = [r.removeprefix("xccdf_org.ssgproject.content_rule_") for r in rules]
    code, out, err, _ = run_plugin({"rules": short}, tmp_path / "scratch", timeout=280)
    assert code == 0, err
    check_shape(out)
    print_counts(f"SSG {len(rules)} rules", out)
    assert sorted(props(o)["rule_id"] for o in out["observations"][1:]) == sorted(rules)
    # the references as the plugin reads them from a results file of this content
    m = load_plugin_module()
    results = tmp_path / "r.xml"
    r = subprocess.run([OSCAP, "xccdf", "eval", "--profile", "standard", "--rule", rules[0], "--results", str(results),
                        ds], capture_output=True, timeout=120, cwd=tmp_path)
    assert r.returncode in (0, 2), r.stderr
    _, profiles, benchmark_rules, _, _ = m.read_results(str(results))
    with_nist = [rid for rid, rule in benchmark_rules.items() if any(n == "nist-800-53" for n, _ in rule["refs"])]
    with_cis = [rid for rid, rule in benchmark_rules.items() if any(n.startswith("cis-") for n, _ in rule["refs"])]
    print(f"{len(benchmark_rules)} rules in the benchmark, {len(with_nist)} with NIST 800-53 references, "
          f"{len(with_cis)} with CIS references")
    assert with_nist and with_cis
    for finding in out["findings"]:
        assert [(p["name"], p["value"]) for p in finding["target"]["props"][1:]] == \
            benchmark_rules[props(finding)["rule_id"]]["refs"]


# -- least privilege: its own uid, CAP_DAC_READ_SEARCH, Landlock ------------------------------------

LANDLOCK_EXEC = r"""
import ctypes, os, struct, sys
# landlock_exec.py SCRATCH PROGRAM: exec PROGRAM confined as SPEC section 6 confines plugins:
# read and execute everything, write only inside SCRATCH and to /dev/null (Landlock, no_new_privs)
libc = ctypes.CDLL(None, use_errno=True)
abi = libc.syscall(444, None, 0, 1)                      # landlock_create_ruleset(.., VERSION)
fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
attr = struct.pack("Q", fs)
ruleset = libc.syscall(444, attr, len(attr), 0)
def allow(path, access):
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    if libc.syscall(445, ruleset, 1, struct.pack("=Qi", access, fd), 0) != 0:   # landlock_add_rule
        raise OSError(ctypes.get_errno(), "landlock_add_rule " + path)
    os.close(fd)
allow("/", 1 | 4 | 8)                                    # EXECUTE, READ_FILE, READ_DIR
allow(sys.argv[1], fs)
allow("/dev/null", 2 | 4 | (1 << 14 if abi >= 3 else 0))
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(446, ruleset, 0) != 0:       # no_new_privs, restrict_self
    raise OSError(ctypes.get_errno(), "landlock_restrict_self")
os.execv(sys.argv[2], sys.argv[2:])
"""


def landlock_abi() -> int:
    import ctypes
    try:
        return max(0, ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1))
    except OSError:
        return 0


needs_sandbox = pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None or landlock_abi() < 1,
                                   reason="needs root, setpriv and a kernel with Landlock")


def run_confined(area: Path, config: dict, uid: int = 61999, caps: str = "+dac_read_search"):
    """The plugin as the runtime runs it with jobs.plugin_capabilities = {"openscap" =
    ["CAP_DAC_READ_SEARCH"]}: a uid of its own (in no passwd entry), no groups, that capability
    ambient, no new privileges, Landlock: write only the scratch folder (0700, its uid's)."""
    helper = area / "landlock_exec.py"
    if not helper.exists():
        helper.write_text(LANDLOCK_EXEC)
        helper.chmod(0o644)
        install_plugin(area / "plugins")
    scratch = area / f"scratch-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(mode=0o700)
    os.chown(scratch, uid, uid)
    document = {"protocol": "assessment/1", "run_uuid": str(uuid.uuid4()),
                "job": {"uuid": str(uuid.uuid4()), "plugin": {"name": "openscap", "version": "1.0.0"},
                        "interval": "1h", "config": config}, "config": config}
    env = {"PATH": PLUGIN_PATH, "LANG": "C.UTF-8", "HOME": str(scratch), "ASSESSMENT_JOB_UUID": document["job"]["uuid"],
           "ASSESSMENT_RUN_UUID": document["run_uuid"], "ASSESSMENT_RUNTIME_UUID": str(uuid.uuid4())}
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if caps:
        argv += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
    argv += ["/usr/bin/python3", str(helper), str(scratch), str(area / "plugins" / "openscap" / "1.0.0" / "openscap")]
    proc = subprocess.run(argv, input=json.dumps(document).encode(), capture_output=True, env=env, cwd=scratch,
                          start_new_session=True, timeout=280)
    leftovers = list(scratch.iterdir())
    assert leftovers == [], leftovers
    out = json.loads(proc.stdout) if proc.returncode == 0 else None
    return proc.returncode, out, proc.stderr.decode()


@needs_oscap
@needs_sandbox
@pytest.mark.timeout(300)
def test_least_privilege_own_uid_capability_and_landlock(area, tmp_path):
    """oscap under the runtime's confinement: /tmp cannot be written, so the data stream is split
    into the scratch folder (oscap 1.3 insists on /tmp for its temporary folders otherwise)."""
    area.chmod(0o755)
    fx = install_fixture(area)
    (fx["tree"] / "etc" / "fixture" / "sshd_config").chmod(0o600)  # root's only, like /etc/shadow
    code, out, err = run_confined(area, {"datastream": str(fx["ds"]), "profile": PROFILE})
    assert code == 0, err
    expect_fixture_result(out, datastream=str(fx["ds"]), oscap_input="split")
    assert out["logs"] == [], "oscap's getpwuid() warning for a uid without a passwd entry is left out"
    # without the capability the file cannot be read: those rules are errors (findings), not passes
    code, out, err = run_confined(area, {"datastream": str(fx["ds"]), "profile": PROFILE}, caps="")
    assert code == 0, err
    check_shape(out)
    assert [props(o)["result"] for o in out["observations"][1:]] == \
        ["error", "error", "pass", "fail", "notapplicable", "notchecked"]
    assert out["title"] == "OpenSCAP Fixture profile: 1 of 6 rules failed, 2 could not be evaluated"
    assert [(f["target"]["target_id"], f["target"]["status"]["reason"]) for f in out["findings"]] == [
        (f"openscap:{R}root_login_disabled", "other"), (f"openscap:{R}x11_forwarding_off", "other"),
        (f"openscap:{R}required_conf_exists", "fail")]
    assert out["findings"][0]["title"] == "Disable SSH Root Login: error"
    assert out["observations"][1]["description"] == f"error: Disable SSH Root Login ({R}root_login_disabled)"
    # an offline scan (root) with a probe that chroot()s: uid 0 only; oscap aborts, the run is an error
    fx_offline = install_fixture(area, name="offline", root_in_paths=False)
    config = {"datastream": str(fx_offline["ds"]), "root": str(fx_offline["tree"]), "profile": "",
              "rules": [R + "no_telnet_in_xinetd"]}
    code, out, err = run_confined(area, config, caps="")
    assert code == 4, out
    assert "chroot failed: Operation not permitted" in err, err
    assert f"root = {fx_offline['tree']}: some probes of this content chroot() into the root, which needs uid 0" in err
    code, out, err, _ = run_plugin(config, tmp_path / "scratch")  # as root it works
    assert code == 0, err
    assert [props(o)["result"] for o in out["observations"][1:]] in (["pass"], ["notapplicable"])
    # told not to split, oscap fails on /tmp, and says so
    code, out, err = run_confined(area, {"datastream": str(fx["ds"]), "profile": PROFILE, "split_datastream": False})
    assert code == 4 and "Could not create temp directory /tmp/oscap.XXXXXX" in err, err
    assert "give the plugin /tmp (jobs.plugin_write_paths) or set config split_datastream = true" in err

    if ssg_datastream() is None:
        return
    start = time.monotonic()
    code, confined, err = run_confined(area, {})
    assert code == 0, err
    print_counts("SSG standard profile, uid 61999 + CAP_DAC_READ_SEARCH + Landlock", confined,
                 time.monotonic() - start)
    code, unconfined, err, _ = run_plugin({}, tmp_path / "scratch", timeout=280)
    assert code == 0, err
    print_counts("SSG standard profile, root, unconfined", unconfined)
    results = lambda o: {props(x)["rule_id"]: props(x)["result"] for x in o["observations"][1:]}  # noqa: E731
    assert results(confined) == results(unconfined)
    assert props(confined["observations"][0])["oscap_input"] == "split"


# -- through the real service --------------------------------------------------------------------

def install_plugin(plugin_dir: Path) -> Path:
    folder = plugin_dir / "openscap" / "1.0.0"
    folder.mkdir(parents=True)
    shutil.copy(PLUGIN_DIR / "plugin.toml", folder / "plugin.toml")
    shutil.copy(PLUGIN, folder / "openscap")
    (folder / "plugin.toml").chmod(0o644)
    (folder / "openscap").chmod(0o755)
    for p in (folder, folder.parent, plugin_dir):
        p.chmod(0o755)
    return folder / "openscap"


def capabilities_config() -> str:
    """jobs.plugin_capabilities where this runtime has it (the isolation issue), else nothing."""
    from supervisor.config import Jobs
    if "plugin_capabilities" in getattr(Jobs, "__struct_fields__", ()):
        return '\n[jobs.plugin_capabilities]\nopenscap = ["CAP_DAC_READ_SEARCH"]\n'
    return ""


@needs_oscap
@pytest.mark.timeout(180)
def test_through_the_service(service_factory, area):
    """The plugin under the product's sandbox (its run_as_user / per-job uid, confinement where
    the runtime has it): oscap writes its results in the scratch folder only."""
    svc = service_factory(capabilities_config())
    install_plugin(svc.plugins)
    fx = install_fixture(area)
    fixture_job = spec(plugin="openscap", title="openscap fixture", timeout="60s",
                       config={"datastream": str(fx["ds"]), "profile": PROFILE})
    svc.write_spec("fixture.json", fixture_job)
    ssg = ssg_datastream()
    ssg_job = spec(plugin="openscap", title="openscap SSG standard", timeout="120s", config={}) if ssg else None
    if ssg_job:
        svc.write_spec("ssg.json", ssg_job)
    svc.start()
    result = svc.wait_result(fixture_job["uuid"], timeout=90)[0]
    assert result["status"] == "not-satisfied", (result["reason"], result["logs"])
    assert result["reason"] is None
    out = {k: result[k] for k in ("status", "title", "observations", "findings", "risks", "subjects", "logs")}
    # confined (write only in scratch), oscap cannot make its /tmp folder: the plugin splits first
    confined = IS_ROOT and svc.status()["sandbox"]["confine"]["filesystem"]
    expect_fixture_result(out, datastream=str(fx["ds"]), oscap_input="split" if confined else "datastream")
    if ssg_job:
        result = svc.wait_result(ssg_job["uuid"], timeout=150)[0]
        assert result["status"] in ("satisfied", "not-satisfied"), (result["reason"], result["logs"])
        out = {k: result[k] for k in ("status", "title", "observations", "findings", "risks", "subjects", "logs")}
        check_shape(out)
        print_counts(f"SSG standard profile through the service ({'root' if IS_ROOT else 'unprivileged'} service)",
                     out)
        assert int(props(out["observations"][0])["rules_evaluated"]) > 0
    scratch = svc.state / "scratch"
    if scratch.is_dir():  # every run cleaned up after itself
        assert [p for p in scratch.rglob("*") if p.is_file()] == []
