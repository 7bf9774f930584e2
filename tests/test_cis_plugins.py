"""The CIS-style plugins (plugins/sshd, accounts, mounts, services, auditd), run as real
subprocesses the way SPEC §6 starts them: no arguments, a new session, cwd = a scratch folder,
exactly the scrubbed environment, the assessment/1 document on stdin.

- Fixture trees (tests/fixtures/cis/<plugin>/{pass,fail}): every rule passes in one tree and
  fails in the other, with the exact findings (target, CIS and NIST props, title). What git
  cannot hold well (home directories owned by given uids, systemd's enable/mask symlinks) is
  made at test time in a copy of the tree.
- sshd: the file reader against the real `sshd -T -f` on the same files, when sshd is installed.
- Least privilege: each root-only input (shadow, audit rules, a 0600 sshd_config, sshd's host
  keys) as uid 61999, with and without an ambient CAP_DAC_READ_SEARCH (setpriv), as
  jobs.plugin_capabilities grants it.
- A real run of each plugin on this host (root "/"), its counts printed; and all five through
  the real service.
"""

from __future__ import annotations

import datetime
import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from conftest import IS_ROOT, spec

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cis"
NAMES = ["sshd", "accounts", "mounts", "services", "auditd"]
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIME_UUID = str(uuid.uuid4())
OUTCOMES = ("pass", "fail", "not-applicable", "not-checked")
UNPRIVILEGED = 61999  # a uid no passwd entry knows, like the runtime's per-job uids

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, setpriv)")
needs_setpriv = pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None,
                                   reason="needs root and setpriv (util-linux)")
SSHD = shutil.which("sshd", path=PLUGIN_PATH)
needs_sshd = pytest.mark.skipif(SSHD is None, reason="openssh-server is not installed")

# The references each rule must carry: (CIS Debian Linux 12 v1.1.0, CIS RHEL 9 v2.0.0, NIST 800-53).
A = ("AU-2", "AU-12(c)")
REFS = {
    "sshd": {
        "permit-root-login": ("5.1.20", "5.1.20", ("AC-6(2)", "AC-17", "IA-2")),
        "password-authentication": (None, None, ("AC-17", "IA-2", "IA-5")),
        "max-auth-tries": ("5.1.16", "5.1.16", ("AC-7(a)",)),
        "ciphers": ("5.1.6", "5.1.4", ("AC-17(2)", "SC-8(1)", "SC-13")),
        "macs": ("5.1.15", "5.1.6", ("AC-17(2)", "SC-8(1)", "SC-13")),
        "kex-algorithms": ("5.1.12", "5.1.5", ("AC-17(2)", "SC-8(1)", "SC-13")),
        "x11-forwarding": ("5.1.8", "5.1.10", ("CM-7(a)", "CM-7(b)")),
        "login-grace-time": ("5.1.13", "5.1.14", ("AC-7(a)", "CM-6(b)")),
    },
    "accounts": {
        "uid0-only-root": ("5.4.2.1", "5.4.2.1", ("AC-6(5)", "IA-2", "IA-4(b)")),
        "no-empty-passwords": ("7.2.2", "7.2.2", ("IA-5(1)(a)", "IA-5(c)")),
        "pass-max-days": ("5.4.1.1", "5.4.1.1", ("IA-5(1)(d)", "IA-5(f)")),
        "pass-min-days": ("5.4.1.2", "5.4.1.2", ("IA-5(1)(d)", "IA-5(f)")),
        "pass-warn-age": ("5.4.1.3", "5.4.1.3", ("IA-5(f)",)),
        "duplicate-uids": ("7.2.5", "7.2.4", ("IA-2", "IA-4(b)")),
        "duplicate-gids": ("7.2.6", "7.2.5", ("IA-4(b)",)),
        "duplicate-user-names": ("7.2.7", "7.2.6", ("IA-2", "IA-4(b)")),
        "duplicate-group-names": ("7.2.8", "7.2.7", ("IA-4(b)",)),
        "home-directories": ("7.2.9", "7.2.8", ("AC-6", "CM-6(a)")),
    },
    "mounts": {
        "tmp-nodev": ("1.1.2.1.2", "1.1.2.1.2", ("CM-7(a)", "CM-7(b)", "AC-6")),
        "tmp-nosuid": ("1.1.2.1.3", "1.1.2.1.3", ("AC-6(1)", "CM-7(b)")),
        "tmp-noexec": ("1.1.2.1.4", "1.1.2.1.4", ("CM-7(a)", "CM-7(b)", "AC-6")),
        "dev-shm-nodev": ("1.1.2.2.2", "1.1.2.2.2", ("CM-7(a)", "CM-7(b)", "AC-6")),
        "dev-shm-nosuid": ("1.1.2.2.3", "1.1.2.2.3", ("AC-6(1)", "CM-7(b)")),
        "dev-shm-noexec": ("1.1.2.2.4", "1.1.2.2.4", ("CM-7(a)", "CM-7(b)", "AC-6")),
        "var-tmp-nodev": ("1.1.2.5.2", "1.1.2.5.2", ("CM-7(a)", "CM-7(b)", "AC-6")),
        "var-tmp-nosuid": ("1.1.2.5.3", "1.1.2.5.3", ("AC-6(1)", "CM-7(b)")),
        "var-tmp-noexec": ("1.1.2.5.4", "1.1.2.5.4", ("CM-7(a)", "CM-7(b)", "AC-6")),
        "var-log-separate": ("1.1.2.6.1", "1.1.2.6.1", ("AU-4", "SC-5(2)")),
    },
    "services": {
        "telnet": ("2.1.22", "2.1.15", ("CM-7(a)", "CM-7(b)", "IA-5(1)(c)")),
        "rsh": ("2.1.22", "2.1.22", ("CM-7(a)", "CM-7(b)", "IA-5(1)(c)")),
        "rlogin": ("2.1.22", "2.1.22", ("CM-7(a)", "CM-7(b)", "IA-5(1)(c)")),
        "tftp": ("2.1.16", "2.1.16", ("CM-7(a)", "CM-7(b)")),
        "xinetd": ("2.1.19", "2.1.19", ("CM-7(a)", "CM-7(b)")),
        "avahi": ("2.1.2", "2.1.2", ("CM-7(a)", "CM-7(b)")),
        "cups": ("2.1.11", "2.1.11", ("CM-7(a)", "CM-7(b)")),
        "talk": ("2.1.22", "2.1.22", ("CM-7(a)", "CM-7(b)")),
        "nis": ("2.1.10", "2.1.10", ("CM-7(a)", "CM-7(b)", "IA-5(1)(c)")),
    },
    "auditd": {
        "installed": ("6.3.1.1", "6.3.1.1", ("AU-2", "AU-12(a)")),
        "enabled": ("6.3.1.2", "6.3.1.4", ("AU-12(c)",)),
        "running": ("6.3.1.2", "6.3.1.4", ("AU-12(c)",)),
        "rules-scope": ("6.3.3.1", "6.3.3.1", A + ("AC-6(9)",)),
        "rules-user-emulation": ("6.3.3.2", "6.3.3.2", A + ("AC-6(9)",)),
        "rules-sudo-log": ("6.3.3.3", "6.3.3.3", A + ("AC-6(9)",)),
        "rules-time-change": ("6.3.3.4", "6.3.3.4", A + ("CM-6(a)",)),
        "rules-system-locale": ("6.3.3.5", "6.3.3.5", A + ("CM-6(a)",)),
        "rules-access": ("6.3.3.7", "6.3.3.7", A + ("AC-6(9)",)),
        "rules-identity": ("6.3.3.8", "6.3.3.8", A + ("AC-2(4)",)),
        "rules-perm-mod": ("6.3.3.9", "6.3.3.9", A + ("AC-6(9)",)),
        "rules-mounts": ("6.3.3.10", "6.3.3.10", A + ("CM-6(a)",)),
        "rules-session": ("6.3.3.11", "6.3.3.11", A + ("AU-14(1)",)),
        "rules-logins": ("6.3.3.12", "6.3.3.12", A + ("AC-6(9)",)),
        "rules-delete": ("6.3.3.13", "6.3.3.13", A + ("AC-6(9)",)),
        "rules-mac-policy": ("6.3.3.14", "6.3.3.14", A + ("CM-6(a)",)),
        "rules-modules": ("6.3.3.19", "6.3.3.19", A + ("AC-6(9)",)),
    },
}

# The exact findings of each "fail" tree: target rule -> title (in rule order).
FAIL_FINDINGS = {
    "sshd": {
        "permit-root-login": "sshd allows root logins: PermitRootLogin prohibit-password",
        "password-authentication": "sshd accepts passwords: PasswordAuthentication yes",
        "max-auth-tries": "sshd MaxAuthTries is 6, more than 4",
        "ciphers": "sshd Ciphers has weak algorithms: aes128-cbc",
        "macs": "sshd MACs has weak algorithms: hmac-md5",
        "kex-algorithms": "sshd KexAlgorithms has weak algorithms: diffie-hellman-group14-sha1",
        "x11-forwarding": "sshd allows X11 forwarding: X11Forwarding yes",
        "login-grace-time": "sshd LoginGraceTime is unlimited, not 1 to 60 seconds",
    },
    "accounts": {
        "uid0-only-root": "accounts other than root have uid 0: toor",
        "no-empty-passwords": "accounts with an empty password: dave, carol",
        "pass-max-days": "PASS_MAX_DAYS is 99999, expected at most 365",
        "pass-min-days": "PASS_MIN_DAYS is 0, expected at least 1",
        "pass-warn-age": "PASS_WARN_AGE is not set, expected at least 7",
        "duplicate-uids": "duplicate uids in /etc/passwd: 0, 600",  # toor is root again
        "duplicate-gids": "duplicate gids in /etc/group: 601",
        "duplicate-user-names": "duplicate user names in /etc/passwd: bob",
        "duplicate-group-names": "duplicate group names in /etc/group: bob",
        "home-directories": "home directories missing or not owned by their user: bob, carol, eve",
    },
    "mounts": {
        **{f"{p}-{o}": f"{d} is mounted without {o}" for d, p in (("/tmp", "tmp"), ("/dev/shm", "dev-shm"),
                                                                   ("/var/tmp", "var-tmp"))
           for o in ("nodev", "nosuid", "noexec")},
        "var-log-separate": "/var/log is not a separate partition",
    },
    "services": {
        "telnet": "telnet server is enabled",
        "rsh": "rsh/rexec server is enabled",
        "rlogin": "rlogin server is enabled",
        "tftp": "tftp server is enabled",
        "xinetd": "xinetd is enabled",
        "avahi": "avahi-daemon is enabled",
        "cups": "CUPS print server is enabled",
        "talk": "talk server is enabled",
        "nis": "NIS (ypserv, ypbind) is enabled",
    },
    "auditd": {
        "installed": "auditd is not installed",
        "enabled": "auditd.service is not enabled",
        **{rule: "audit rules missing: " + what for rule, what in (
            ("rules-scope", "changes to sudoers (scope)"),
            ("rules-user-emulation", "actions as another user"),
            ("rules-sudo-log", "changes to the sudo log file"),
            ("rules-time-change", "changes of date and time"),
            ("rules-system-locale", "changes of the network environment"),
            ("rules-access", "unsuccessful file access attempts"),
            ("rules-identity", "changes of user and group information"),
            ("rules-perm-mod", "permission changes (perm_mod)"),
            ("rules-mounts", "successful mounts"),
            ("rules-session", "session initiation"),
            ("rules-logins", "logins and logouts"),
            ("rules-delete", "file deletion by users"),
            ("rules-mac-policy", "changes of the MAC policy (AppArmor, SELinux)"),
            ("rules-modules", "kernel module loading and unloading"))},
    },
}
# rules that a fixture tree cannot exercise: a tree is not a running system
NOT_APPLICABLE_IN_TREES = {"auditd": {"running"}}


def ref_props(plugin: str, rule: str) -> list[dict]:
    cis_debian, cis_rhel, nist = REFS[plugin][rule]
    props = [{"name": "cis-debian", "value": cis_debian}] if cis_debian else []
    props += [{"name": "cis-rhel", "value": cis_rhel}] if cis_rhel else []
    return props + [{"name": "nist-800-53", "value": control} for control in nist]


# -- running a plugin --------------------------------------------------------------------------

def run_plugin(name: str, config, scratch: Path, *, user: int | None = None, caps: bool = False,
               raw_stdin: bytes | None = None, plugin_dir: Path = PLUGINS, timeout: float = 60):
    """Run {plugin_dir}/{name}/1.0.0/{name}; (exit code, parsed stdout or None, stderr).
    user: run as that uid/gid with no groups (setpriv), caps: with an ambient CAP_DAC_READ_SEARCH."""
    scratch.mkdir(parents=True, exist_ok=True)
    job_uuid, run_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    job = {"uuid": job_uuid, "plugin": {"name": name, "version": "1.0.0"}, "interval": "1h", "config": config}
    document = {"protocol": "assessment/1", "run_uuid": run_uuid, "job": job, "config": config}
    stdin = raw_stdin if raw_stdin is not None else json.dumps(document).encode()
    env = {"PATH": PLUGIN_PATH, "LANG": "C.UTF-8", "HOME": str(scratch), "ASSESSMENT_JOB_UUID": job_uuid,
           "ASSESSMENT_RUN_UUID": run_uuid, "ASSESSMENT_RUNTIME_UUID": RUNTIME_UUID}
    argv = [str(plugin_dir / name / "1.0.0" / name)]
    if user is not None:
        os.chown(scratch, user, user)
        scratch.chmod(0o700)
        argv = ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups"] + (
            ["--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"] if caps else []) + argv
    proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, cwd=scratch, start_new_session=True,
                          timeout=timeout)
    out = None
    if proc.returncode == 0:
        text = proc.stdout.decode()
        assert text.count("\n") == 1, "stdout must be exactly one JSON document"
        out = json.loads(text)
    return proc.returncode, out, proc.stderr.decode()


def props(item: dict) -> dict:
    """name -> value (a list when the name repeats)."""
    out: dict = {}
    for p in item["props"]:
        out.setdefault(p["name"], []).append(p["value"])
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def outcomes(out: dict) -> dict[str, str]:
    return {props(o)["rule"]: props(o)["outcome"] for o in out["observations"]}


def counts(out: dict) -> dict[str, int]:
    values = list(outcomes(out).values())
    return {k: values.count(k) for k in OUTCOMES}


def check_result(plugin: str, out: dict) -> None:
    """The assessment/1 document: one observation per rule with its outcome and references, one
    finding per failed rule that names the rule, status satisfied only without findings."""
    assert set(out) == {"status", "title", "observations", "findings", "risks", "subjects", "logs"}
    assert out["status"] in ("satisfied", "not-satisfied")
    assert out["risks"] == [] and out["logs"] == []
    assert len(out["subjects"]) == 1 and out["subjects"][0]["type"] == "resource"
    rules = list(REFS[plugin])
    assert [props(o)["rule"] for o in out["observations"]] == rules
    by_uuid = {}
    for obs in out["observations"]:
        uuid.UUID(obs["uuid"])
        by_uuid[obs["uuid"]] = obs
        p = props(obs)
        assert p["outcome"] in OUTCOMES
        assert obs["title"] and obs["description"] and obs["methods"] == ["TEST"]
        assert obs["subjects"] == out["subjects"]
        collected = datetime.datetime.fromisoformat(obs["collected"].replace("Z", "+00:00"))
        assert abs((datetime.datetime.now(datetime.timezone.utc) - collected).total_seconds()) < 120
        assert all(set(q) == {"name", "value"} and isinstance(q["value"], str) for q in obs["props"])
        assert obs["props"][2:2 + len(ref_props(plugin, p["rule"]))] == ref_props(plugin, p["rule"])
        if p["outcome"] == "not-checked":
            assert obs["description"].startswith("not checked: "), obs["description"]
        if p["outcome"] == "not-applicable":
            assert obs["description"].startswith("not applicable: "), obs["description"]
    result = outcomes(out)
    ids = [f["target"]["target_id"] for f in out["findings"]]
    assert ids in ([f"{plugin}:{r}" for r in rules if result[r] == "fail"],  # strict: not checked is a finding too
                   [f"{plugin}:{r}" for r in rules if result[r] in ("fail", "not-checked")]), ids
    for finding in out["findings"]:
        uuid.UUID(finding["uuid"])
        assert finding["title"] and finding["description"]
        target = finding["target"]
        assert target["type"] == "objective-id" and target["status"] == {"state": "not-satisfied"}
        rule = target["target_id"].split(":", 1)[1]
        assert target["target_id"] == f"{plugin}:{rule}"
        assert finding["props"] == ref_props(plugin, rule)
        related = by_uuid[finding["related_observations"][0]["observation_uuid"]]
        assert props(related)["rule"] == rule
    assert (out["status"] == "satisfied") == (not out["findings"])
    c = counts(out)
    assert out["title"] == "%s: %d passed, %d failed, %d not applicable, %d not checked" % (
        plugin, c["pass"], c["fail"], c["not-applicable"], c["not-checked"])


# -- fixture trees -------------------------------------------------------------------------------

def link(root: Path, path: str, target: str) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(target)


def home(root: Path, path: str, uid: int, mode: int = 0o750) -> None:
    p = root / path.lstrip("/")
    p.mkdir(parents=True)
    p.chmod(mode)
    os.chown(p, uid, uid)


ENABLE = "/etc/systemd/system/{}.wants/{}"


def make_tree(plugin: str, tree: str, dest: Path) -> Path:
    """A copy of the fixture tree with what git does not hold: owned home folders, unit links."""
    shutil.copytree(FIXTURES / plugin / tree, dest, symlinks=True)
    if (plugin, tree) == ("accounts", "pass"):
        home(dest, "/home/alice", 1000)
        home(dest, "/srv/homes/bob", 1001)
        link(dest, "/home/bob", "/srv/homes/bob")  # absolute: resolved inside the tree, not on this host
    elif (plugin, tree) == ("accounts", "fail"):
        home(dest, "/home/bob", 0)  # bob is uid 600
        home(dest, "/home/dave", 602)  # fine; carol (600) has none, eve's is a file
    elif (plugin, tree) == ("services", "pass"):
        link(dest, ENABLE.format("multi-user.target", "ssh.service"), "/lib/systemd/system/ssh.service")
        link(dest, ENABLE.format("multi-user.target", "openbsd-inetd.service"),
             "/lib/systemd/system/openbsd-inetd.service")
        # enabled once, masked since: a masked unit never starts
        link(dest, ENABLE.format("multi-user.target", "avahi-daemon.service"),
             "/lib/systemd/system/avahi-daemon.service")
        link(dest, "/etc/systemd/system/avahi-daemon.service", "/dev/null")
    elif (plugin, tree) == ("services", "fail"):
        for target, unit in (("sockets.target", "telnet.socket"), ("sockets.target", "rsh.socket"),
                             ("multi-user.target", "xinetd.service"), ("multi-user.target", "avahi-daemon.service"),
                             ("sockets.target", "cups.socket"), ("multi-user.target", "ypbind.service"),
                             ("multi-user.target", "openbsd-inetd.service")):
            link(dest, ENABLE.format(target, unit), "/lib/systemd/system/" + unit)
    elif (plugin, tree) == ("auditd", "pass"):
        link(dest, ENABLE.format("multi-user.target", "auditd.service"), "/lib/systemd/system/auditd.service")
    elif (plugin, tree) == ("auditd", "fail"):
        link(dest, ENABLE.format("multi-user.target", "auditd.service"), "/lib/systemd/system/auditd.service")
        link(dest, "/etc/systemd/system/auditd.service", "/dev/null")
    return dest


@pytest.fixture
def open_area():
    """A world-traversable folder: the unprivileged uid must reach the trees and the scratch."""
    d = Path(tempfile.mkdtemp(prefix="cis-test-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tree", ["pass", "fail"])
@pytest.mark.parametrize("plugin", NAMES)
def test_fixture_tree(tmp_path, plugin, tree):
    if plugin == "accounts" and not IS_ROOT:
        pytest.skip("the home folders of the accounts trees are chowned to their users: needs root")
    root = make_tree(plugin, tree, tmp_path / "root")
    code, out, err = run_plugin(plugin, {"root": str(root)}, tmp_path / "scratch")
    assert code == 0, err
    check_result(plugin, out)
    special = NOT_APPLICABLE_IN_TREES.get(plugin, set())
    expected_outcome = "pass" if tree == "pass" else "fail"
    assert outcomes(out) == {rule: "not-applicable" if rule in special else expected_outcome
                             for rule in REFS[plugin]}, [o["description"] for o in out["observations"]]
    if tree == "pass":
        assert out["status"] == "satisfied" and out["findings"] == []
        return
    assert out["status"] == "not-satisfied"
    expected = FAIL_FINDINGS[plugin]
    assert [(f["target"]["target_id"], f["title"], f["props"]) for f in out["findings"]] == \
        [(f"{plugin}:{rule}", title, ref_props(plugin, rule)) for rule, title in expected.items()]


@pytest.mark.timeout(60)
def test_fixture_details_sshd(tmp_path):
    """Where each value came from: the Include (relative and absolute), first value wins, Match
    blocks skipped, OpenSSH's defaults, +/-/^ lists."""
    obs = {}
    for tree in ("pass", "fail"):
        root = make_tree("sshd", tree, tmp_path / tree)
        code, out, err = run_plugin("sshd", {"root": str(root)}, tmp_path / f"scratch-{tree}")
        assert code == 0, err
        obs[tree] = {props(o)["rule"]: props(o) for o in out["observations"]}
        assert obs[tree]["ciphers"]["source"].startswith(f"files: {root}/etc/ssh/sshd_config, ")
    good, bad = obs["pass"], obs["fail"]
    assert good["permit-root-login"]["set-at"] == "/etc/ssh/sshd_config.d/10-cis.conf:2"
    assert good["login-grace-time"]["value"] == "60s"  # 1m, not 20-later.conf's 2m
    assert good["max-auth-tries"]["set-at"] == "/etc/ssh/sshd_config:7"  # the Match in 20-later.conf ended there
    assert "diffie-hellman" not in good["kex-algorithms"]["value"]  # -diffie-hellman-group*
    assert good["ciphers"]["source"] == f"files: {tmp_path}/pass/etc/ssh/sshd_config, " \
        f"{tmp_path}/pass/etc/ssh/sshd_config.d/10-cis.conf, {tmp_path}/pass/etc/ssh/sshd_config.d/20-later.conf"
    assert bad["permit-root-login"]["set-at"] == bad["max-auth-tries"]["set-at"] == "default (OpenSSH)"
    assert bad["password-authentication"]["set-at"] == "/etc/ssh/sshd_config.d/50-x11.conf:3"
    assert bad["ciphers"]["value"].endswith(",aes256-gcm@openssh.com,aes128-cbc")  # +aes128-cbc
    assert (bad["ciphers"]["weak"], bad["macs"]["weak"], bad["kex-algorithms"]["weak"]) == \
        ("aes128-cbc", "hmac-md5", "diffie-hellman-group14-sha1")


@pytest.mark.timeout(60)
@needs_root
def test_fixture_details_accounts_and_services(tmp_path):
    root = make_tree("accounts", "fail", tmp_path / "accounts")
    code, out, err = run_plugin("accounts", {"root": str(root)}, tmp_path / "s1")
    assert code == 0, err
    obs = {props(o)["rule"]: o for o in out["observations"]}
    assert props(obs["home-directories"])["interactive-users"] == "bob,carol,dave,eve"  # uid >= UID_MIN 600
    assert obs["home-directories"]["description"] == \
        "bob: /home/bob is owned by uid 0, not 600; carol: /home/carol does not exist; eve: /home/eve is not a directory"
    assert props(obs["no-empty-passwords"])["accounts"] == "dave (passwd),carol (shadow)"
    assert props(obs["duplicate-user-names"])["duplicates"] == "bob"

    root = make_tree("services", "fail", tmp_path / "services")
    code, out, err = run_plugin("services", {"root": str(root)}, tmp_path / "s2")
    assert code == 0, err
    enabled = {props(o)["rule"]: props(o)["enabled"] for o in out["observations"]}
    assert enabled == {
        "telnet": "sockets.target.wants/telnet.socket",
        "rsh": "sockets.target.wants/rsh.socket",
        "rlogin": "/etc/xinetd.d/rlogin (xinetd.service)",
        "tftp": "/etc/inetd.conf:2 (openbsd-inetd.service)",
        "xinetd": "multi-user.target.wants/xinetd.service",
        "avahi": "multi-user.target.wants/avahi-daemon.service",
        "cups": "sockets.target.wants/cups.socket",
        "talk": "/etc/inetd.conf:3 (openbsd-inetd.service)",
        "nis": "multi-user.target.wants/ypbind.service",
    }
    assert {props(o)["running"] for o in out["observations"]} == {"not applicable: root is not /"}
    # a workstation may print
    code, out, err = run_plugin("services", {"root": str(root), "server": False}, tmp_path / "s3")
    assert code == 0, err
    assert outcomes(out)["cups"] == "not-applicable"
    assert "services:cups" not in [f["target"]["target_id"] for f in out["findings"]]


@pytest.mark.timeout(60)
def test_mounts_image_fstab_and_mounts_file(tmp_path):
    """No <root>/proc/mounts: the image's fstab; a mounts_file: that table, escapes decoded."""
    code, out, err = run_plugin("mounts", {"root": str(FIXTURES / "mounts" / "image")}, tmp_path / "s1")
    assert code == 0, err
    check_result("mounts", out)
    assert outcomes(out) == {"tmp-nodev": "pass", "tmp-nosuid": "pass", "tmp-noexec": "pass",
                             "dev-shm-nodev": "not-applicable", "dev-shm-nosuid": "not-applicable",
                             "dev-shm-noexec": "not-applicable", "var-tmp-nodev": "pass", "var-tmp-nosuid": "fail",
                             "var-tmp-noexec": "fail", "var-log-separate": "pass"}
    assert props(out["observations"][0])["source"].startswith(str(FIXTURES / "mounts" / "image" / "etc" / "fstab"))
    table = tmp_path / "mounts"
    table.write_text("/dev/sda1 / ext4 rw 0 0\n/dev/sda2 /var/log\\040old ext4 rw 0 0\n"
                     "tmpfs /dev/shm tmpfs rw,nodev,nosuid,noexec 0 0\n")
    code, out, err = run_plugin("mounts", {"mounts_file": str(table)}, tmp_path / "s2")
    assert code == 0, err
    check_result("mounts", out)
    assert [r for r, o in outcomes(out).items() if o != "not-applicable"] == \
        ["dev-shm-nodev", "dev-shm-nosuid", "dev-shm-noexec", "var-log-separate"]
    assert [f["target"]["target_id"] for f in out["findings"]] == ["mounts:var-log-separate"]
    table.chmod(0)
    if not IS_ROOT:
        code, out, err = run_plugin("mounts", {"mounts_file": str(table)}, tmp_path / "s3")
        assert code == 0, err
        assert set(outcomes(out).values()) == {"not-checked"} and out["status"] == "satisfied"


@pytest.mark.timeout(60)
def test_sshd_not_installed_is_not_applicable(tmp_path):
    root = tmp_path / "empty"
    (root / "etc").mkdir(parents=True)
    code, out, err = run_plugin("sshd", {"root": str(root)}, tmp_path / "scratch")
    assert code == 0, err
    check_result("sshd", out)
    assert set(outcomes(out).values()) == {"not-applicable"} and out["status"] == "satisfied"
    # an sshd binary with no config: every setting is OpenSSH's default
    (root / "usr" / "sbin").mkdir(parents=True)
    (root / "usr" / "sbin" / "sshd").write_text("")
    code, out, err = run_plugin("sshd", {"root": str(root)}, tmp_path / "scratch")
    assert code == 0, err
    assert outcomes(out) == {"permit-root-login": "fail", "password-authentication": "fail", "max-auth-tries": "fail",
                             "ciphers": "pass", "macs": "fail", "kex-algorithms": "pass", "x11-forwarding": "pass",
                             "login-grace-time": "fail"}
    assert props(out["observations"][0])["source"] == "files: none (all defaults)"


SSHD_KEYS = {"permit-root-login": "permitrootlogin", "password-authentication": "passwordauthentication",
             "max-auth-tries": "maxauthtries", "ciphers": "ciphers", "macs": "macs",
             "kex-algorithms": "kexalgorithms", "x11-forwarding": "x11forwarding", "login-grace-time": "logingracetime"}


KEY_OWNER = 65534  # nobody: as root, sshd -T also wants /run/sshd, which only a started ssh.service makes


def sshd_t(config_file: Path, key: Path) -> dict[str, str]:
    argv = [SSHD, "-T", "-f", str(config_file), "-h", str(key)]
    if IS_ROOT and shutil.which("setpriv"):
        argv = ["setpriv", "--reuid", str(KEY_OWNER), "--regid", str(KEY_OWNER), "--clear-groups"] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


@pytest.fixture
def host_key(open_area):
    key = open_area / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    if IS_ROOT:
        os.chown(key, KEY_OWNER, KEY_OWNER)
    return key


@pytest.mark.timeout(60)
@needs_sshd
def test_sshd_file_reader_agrees_with_sshd_T(open_area, host_key):
    """The fixtures read by the plugin and by the real sshd (Include made absolute for it)."""
    tmp_path = open_area
    for tree in ("pass", "fail"):
        root = make_tree("sshd", tree, tmp_path / tree)
        main = root / "etc" / "ssh" / "sshd_config"
        code, out, err = run_plugin("sshd", {"root": str(root)}, tmp_path / f"scratch-{tree}")
        assert code == 0, err
        ours = {props(o)["rule"]: props(o)["value"] for o in out["observations"]}
        text = main.read_text().replace("Include sshd_config.d/", f"Include {root}/etc/ssh/sshd_config.d/")
        main.write_text(text.replace("Include /etc/ssh/", f"Include {root}/etc/ssh/"))
        theirs = sshd_t(main, host_key)
        for rule, keyword in SSHD_KEYS.items():
            value = theirs[keyword].replace("without-password", "prohibit-password")
            if rule == "login-grace-time":
                value += "s"
            assert ours[rule] == value, (tree, rule)
    # and a few more corners of the list syntax
    for i, lines in enumerate(["Ciphers ^aes256-cbc\nMACs -*etm@openssh.com,hmac-sha1\nKexAlgorithms +diffie-hellman-group1-sha1",
                               "Ciphers aes128-ctr,aes256-ctr\nMACs -hmac-sha2-*,umac*\nLoginGraceTime 1m30s\nPermitRootLogin without-password",
                               "ciphers=aes128-gcm@openssh.com\nMaxAuthTries \"2\"\nPermitRootLogin forced-commands-only"]):
        root = tmp_path / f"corner{i}"
        (root / "etc" / "ssh").mkdir(parents=True)
        (root / "etc" / "ssh" / "sshd_config").write_text(lines + "\n")
        code, out, err = run_plugin("sshd", {"root": str(root)}, tmp_path / f"scratch-corner{i}")
        assert code == 0, err
        ours = {props(o)["rule"]: props(o)["value"] for o in out["observations"]}
        theirs = sshd_t(root / "etc" / "ssh" / "sshd_config", host_key)
        for rule, keyword in SSHD_KEYS.items():
            value = theirs[keyword].replace("without-password", "prohibit-password")
            assert ours[rule] == value + ("s" if rule == "login-grace-time" else ""), (lines, rule)


@pytest.mark.timeout(60)
@needs_sshd
def test_sshd_uses_sshd_T_on_this_host(tmp_path, host_key):
    code, out, err = run_plugin("sshd", {}, tmp_path / "scratch")
    assert code == 0, err
    check_result("sshd", out)
    source = props(out["observations"][0])["source"]
    r = subprocess.run([SSHD, "-T"], capture_output=True, text=True, timeout=30)
    if IS_ROOT and r.returncode == 0:
        assert source == "sshd -T"
    if not source.startswith("sshd -T"):
        # as root, sshd -T wants /run/sshd, which only a started ssh.service makes; another uid
        # needs a host key it can read (a throwaway one needs ssh-keygen, so a passwd entry)
        assert source.startswith("files: /etc/ssh/sshd_config") and "sshd -T failed" in source, source
        return
    if r.returncode != 0:
        r = subprocess.run([SSHD, "-T", "-h", str(host_key)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    theirs = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    ours = {props(o)["rule"]: props(o)["value"] for o in out["observations"]}
    for rule, keyword in SSHD_KEYS.items():
        value = theirs[keyword].replace("without-password", "prohibit-password")
        assert ours[rule] == value + ("s" if rule == "login-grace-time" else ""), rule


# -- processes: running is read from /proc ---------------------------------------------------------

@pytest.fixture
def fake_daemons(open_area):
    """Processes named like the daemons (a copy of sleep), killed at the end."""
    started = []

    def start(name: str) -> int:
        exe = open_area / name
        shutil.copy("/bin/sleep", exe)
        exe.chmod(0o755)
        try:
            p = subprocess.Popen([str(exe), "60"], start_new_session=True)
        except PermissionError:
            pytest.skip(f"cannot run programs from {open_area} (noexec?)")
        started.append(p)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{p.pid}/comm").read_text().strip() == name:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        return p.pid

    yield start
    for p in started:
        p.kill()
        p.wait(5)


@pytest.mark.timeout(60)
def test_running_daemons_are_seen_in_proc(tmp_path, fake_daemons):
    avahi = fake_daemons("avahi-daemon")
    code, out, err = run_plugin("services", {}, tmp_path / "s1")
    assert code == 0, err
    check_result("services", out)
    obs = {props(o)["rule"]: o for o in out["observations"]}
    assert props(obs["avahi"])["outcome"] == "fail"
    assert f"avahi-daemon:{avahi}" in props(obs["avahi"])["running"].split(",")
    assert "services:avahi" in [f["target"]["target_id"] for f in out["findings"]]

    # the plugin is called auditd too: it must not count itself
    code, out, err = run_plugin("auditd", {}, tmp_path / "s2")
    assert code == 0, err
    before = props(out["observations"][2])
    auditd = fake_daemons("auditd")
    code, out, err = run_plugin("auditd", {}, tmp_path / "s3")
    assert code == 0, err
    check_result("auditd", out)
    after = props(out["observations"][2])
    assert after["outcome"] == "pass"
    assert set(after["pids"].split(",")) == set(filter(None, before["pids"].split(","))) | {str(auditd)}


# -- least privilege ---------------------------------------------------------------------------------

def root_only(path: Path, mode: int) -> None:
    os.chown(path, 0, 0)
    path.chmod(mode)


@pytest.mark.timeout(120)
@needs_setpriv
def test_root_only_inputs_need_cap_dac_read_search(open_area):
    """As uid 61999: without the capability the root-only rules are "not checked" and say why
    (never passed); with an ambient CAP_DAC_READ_SEARCH they are checked, and nothing is written."""
    cases = {
        # plugin: (tree, [(path, mode)], rules that depend on the root-only files)
        "accounts": ("pass", [("etc/shadow", 0o640)], {"no-empty-passwords"}),
        "auditd": ("pass", [("etc/audit", 0o750), ("etc/audit/rules.d", 0o750)],
                   {r for r in REFS["auditd"] if r.startswith("rules-")}),
        "sshd": ("pass", [("etc/ssh/sshd_config", 0o600)], set(REFS["sshd"])),  # RHEL's mode
    }
    for plugin, (tree, paths, rules) in cases.items():
        root = make_tree(plugin, tree, open_area / plugin)
        for path, mode in paths:
            root_only(root / path, mode)
        without = {}
        for caps in (False, True):
            code, out, err = run_plugin(plugin, {"root": str(root)}, open_area / f"scratch-{plugin}-{caps}",
                                        user=UNPRIVILEGED, caps=caps)
            assert code == 0, (plugin, caps, err)
            check_result(plugin, out)
            result = outcomes(out)
            if not caps:
                without = result
                for rule in rules:
                    assert result[rule] == "not-checked", (plugin, rule)
                    obs = [o for o in out["observations"] if props(o)["rule"] == rule][0]
                    assert "Permission denied" in obs["description"] and "CAP_DAC_READ_SEARCH" in obs["description"]
                assert out["status"] == "satisfied"  # not checked is not failed ...
                code, strict, err = run_plugin(plugin, {"root": str(root), "strict": True},
                                               open_area / f"scratch-{plugin}-strict", user=UNPRIVILEGED)
                assert code == 0, err
                check_result(plugin, strict)  # ... unless strict
                assert sorted(f["target"]["target_id"] for f in strict["findings"]) == \
                    sorted(f"{plugin}:{r}" for r in rules)
            else:
                assert all(result[r] == "pass" for r in rules), (plugin, result)
                assert {r: o for r, o in without.items() if r not in rules} == \
                    {r: o for r, o in result.items() if r not in rules}
        assert not [p for p in (open_area / f"scratch-{plugin}-True").iterdir()], "the plugin wrote files"


@pytest.mark.timeout(120)
@needs_setpriv
def test_this_host_as_an_unprivileged_uid(open_area):
    """The real root-only files of this host: /etc/shadow and sshd's host keys."""
    results = {}
    for caps in (False, True):
        code, out, err = run_plugin("accounts", {}, open_area / f"accounts-{caps}", user=UNPRIVILEGED, caps=caps)
        assert code == 0, err
        check_result("accounts", out)
        results[caps] = {props(o)["rule"]: o for o in out["observations"]}
    assert props(results[False]["no-empty-passwords"])["outcome"] in ("not-checked", "fail")
    if props(results[False]["no-empty-passwords"])["outcome"] == "not-checked":
        assert "/etc/shadow: Permission denied" in results[False]["no-empty-passwords"]["description"]
    assert props(results[True]["no-empty-passwords"])["outcome"] in ("pass", "fail")
    if SSHD is None:
        return
    sources = {}
    for caps in (False, True):
        code, out, err = run_plugin("sshd", {}, open_area / f"sshd-{caps}", user=UNPRIVILEGED, caps=caps)
        assert code == 0, err
        check_result("sshd", out)
        sources[caps] = props(out["observations"][0])["source"]
    # without the capability the host keys are out of reach, and ssh-keygen cannot make a
    # throwaway key for a uid without a passwd entry: the files are read instead, and it says so
    assert sources[False].startswith("files: /etc/ssh/sshd_config"), sources[False]
    assert "no hostkeys available" in sources[False] and "No user exists for uid 61999" in sources[False]
    assert sources[True] == "sshd -T"


# -- config errors -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("plugin,config,message", [
    ("sshd", [], "$.config: expected an object"),
    ("sshd", {"root": "etc"}, "$.config.root: expected an absolute path"),
    ("sshd", {"root": "/no/such/folder"}, "$.config.root: /no/such/folder is not a directory"),
    ("sshd", {"use_sshd_t": "yes"}, "$.config.use_sshd_t: expected true or false"),
    ("sshd", {"max_auth_tries": 0}, "$.config.max_auth_tries: expected an integer >= 1"),
    ("sshd", {"login_grace_time": True}, "$.config.login_grace_time: expected an integer >= 1"),
    ("sshd", {"weak_macs": "hmac-md5"}, "$.config.weak_macs: expected a list of algorithm names"),
    ("sshd", {"weak_ciphers": ["a,b"]}, "$.config.weak_ciphers: expected a list of algorithm names"),
    ("sshd", {"Root": "/"}, "$.config.Root: unknown key"),
    ("accounts", {"pass_max_days": "365"}, "$.config.pass_max_days: expected an integer >= 1"),
    ("accounts", {"strict": 1}, "$.config.strict: expected true or false"),
    ("accounts", {"root": 7}, "$.config.root: expected an absolute path"),
    ("mounts", {"mounts_file": "proc/mounts"}, "$.config.mounts_file: expected an absolute path"),
    ("mounts", {"mount_file": "/proc/mounts"}, "$.config.mount_file: unknown key"),
    ("services", {"server": "no"}, "$.config.server: expected true or false"),
    ("services", {"root": "/etc/passwd"}, "$.config.root: /etc/passwd is not a directory"),
    ("auditd", {"rules": []}, "$.config.rules: unknown key"),
    ("auditd", "root=/", "$.config: expected an object"),
])
def test_bad_config_exits_2(tmp_path, plugin, config, message):
    code, out, err = run_plugin(plugin, config, tmp_path / "scratch")
    assert code == 2 and out is None
    assert err.startswith(f"{plugin}: bad config: ") and message in err, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plugin", NAMES)
def test_stdin_not_json_exits_2(tmp_path, plugin):
    code, _, err = run_plugin(plugin, None, tmp_path / "scratch", raw_stdin=b"{not json")
    assert code == 2 and "stdin is not a JSON document" in err
    code, _, err = run_plugin(plugin, None, tmp_path / "scratch", raw_stdin=b"[1, 2]")
    assert code == 2 and "expected a JSON object" in err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plugin", NAMES)
def test_manifest(plugin):
    folder = PLUGINS / plugin / "1.0.0"
    manifest = tomllib.loads((folder / "plugin.toml").read_text())
    assert manifest["name"] == manifest["entrypoint"] == plugin and manifest["version"] == "1.0.0"
    assert manifest["protocol"] == "assessment/1" and manifest["network"] is False
    entry = folder / plugin
    assert entry.read_text().startswith("#!/usr/bin/python3\n")
    assert entry.stat().st_mode & 0o777 == 0o755
    imports = {line.split()[1] for line in entry.read_text().splitlines() if line.startswith("import ")}
    assert imports <= set(sys.stdlib_module_names), imports - set(sys.stdlib_module_names)


# -- this host -----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("plugin", NAMES)
def test_real_run_on_this_host(tmp_path, capsys, plugin):
    code, out, err = run_plugin(plugin, {}, tmp_path / "scratch")
    assert code == 0, err
    check_result(plugin, out)
    c = counts(out)
    with capsys.disabled():
        print(f"\n[this host, uid {os.getuid()}] {plugin}: {c['pass']} passed, {c['fail']} failed, "
              f"{c['not-applicable']} not applicable, {c['not-checked']} not checked -> {out['status']}; "
              f"failed: {', '.join(r for r, o in outcomes(out).items() if o == 'fail') or '-'}")


@pytest.mark.timeout(150)
def test_all_five_through_the_service(service_factory, capsys):
    # as packaged: read-only access to root-only files for the plugins that need it
    grants = "".join(f'"{n}" = ["CAP_DAC_READ_SEARCH"]\n' for n in ("accounts", "sshd", "auditd"))
    svc = service_factory("[jobs.plugin_capabilities]\n" + grants)
    for name in NAMES:
        folder = svc.plugins / name / "1.0.0"
        folder.mkdir(parents=True)
        for f in ("plugin.toml", name):
            shutil.copy(PLUGINS / name / "1.0.0" / f, folder / f)
        (folder / name).chmod(0o755)
        (folder / "plugin.toml").chmod(0o644)
        for p in (folder, folder.parent):
            p.chmod(0o755)
    specs = {name: spec(plugin=name, title=f"CIS {name}", labels={"benchmark": "cis"}, config={}) for name in NAMES}
    svc.start()
    for name, doc in specs.items():
        svc.write_spec(f"cis-{name}.json", doc)
    lines = []
    for name, doc in specs.items():
        result = svc.wait_result(doc["uuid"], timeout=60)[0]
        assert result["status"] in ("satisfied", "not-satisfied"), (name, result["reason"], result["logs"])
        assert result["reason"] is None and result["plugin"]["name"] == name
        assert result["labels"] == {"benchmark": "cis"}
        check_result(name, {k: result[k] for k in ("status", "title", "observations", "findings", "risks",
                                                    "subjects", "logs")})
        c = counts(result)
        lines.append(f"{name}: {c['pass']}/{c['fail']}/{c['not-applicable']}/{c['not-checked']}")
        if IS_ROOT and name == "accounts":  # the capability lets it read /etc/shadow as its own uid
            assert c["not-checked"] == 0, result["observations"]
    with capsys.disabled():
        print("\n[through the service, each job its own uid] pass/fail/n-a/not-checked: " + "; ".join(lines))


@pytest.mark.timeout(120)
def test_benchmark_module_runs(capsys):
    """benchmarks/bench_plugins_cis.py, once per plugin: the numbers `make bench` prints."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_plugins_cis
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    lines = []
    r = bench_plugins_cis.run(repeats=1, log=lines.append)
    assert set(r["plugins"]) == set(NAMES)
    for name, e in r["plugins"].items():
        assert "skipped" not in e, (name, e)
        assert e["wall_ms"]["median"] > 0 and e["peak_rss_mb"] > 0 and e["rules"] == len(REFS[name])
    assert r["baseline"]["python"]["wall_ms"]["median"] > 0
    assert lines[0].startswith("  1 fresh runs each") and len(lines) >= 7
