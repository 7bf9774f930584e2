"""runner/plugin.py: finding plugins in plugin_dirs, checking trust and digests (SPEC §6).

Real folders and files under tmp_path; nothing is mocked. tmp_path itself is above every
plugin_dir here, so its own modes do not matter (folders above the plugin_dir are not checked).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from runner.plugin import Manifest, PluginError, PluginResolver, ResolvedPlugin, list_plugins

REPO = Path(__file__).resolve().parent.parent
ALLOWED = frozenset({0, os.geteuid()})
SCRIPT = b"#!/bin/sh\necho '{\"status\": \"satisfied\"}'\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def make_plugin(plugin_dir: Path, name: str = "demo", version: str = "1.0.0", *, entrypoint: str = "run",
                protocol: str = "assessment/1", body: bytes = SCRIPT, manifest: str | None = None) -> Path:
    """{plugin_dir}/{name}/{version}/ with plugin.toml and an executable; returns the file's path."""
    folder = plugin_dir / name / version
    folder.mkdir(parents=True, exist_ok=True)
    for d in (plugin_dir, plugin_dir / name, folder):
        d.chmod(0o755)
    if manifest is None:
        manifest = (f'name = "{name}"\nversion = "{version}"\nentrypoint = "{entrypoint}"\n'
                    f'protocol = "{protocol}"\ndescription = "a test plugin"\nextra_key = "ignored"\n')
    (folder / "plugin.toml").write_text(manifest)
    (folder / "plugin.toml").chmod(0o644)
    path = folder / entrypoint
    if entrypoint and "/" not in entrypoint and entrypoint not in (".", "..", "plugin.toml"):
        path.write_bytes(body)
        path.chmod(0o755)
    return path


def resolver(dirs, name="demo", version="1.0.0", pin=None, require=False, allowed=ALLOWED) -> PluginResolver:
    return PluginResolver([str(d) for d in dirs], name, version, allowed, pin, require)


def reason_of(r: PluginResolver) -> str:
    with pytest.raises(PluginError) as info:
        r.resolve()
    assert str(info.value) == info.value.reason
    return info.value.reason


# -- finding -----------------------------------------------------------------------------

def test_resolve_ok(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    plugin, digest = resolver([pdir]).resolve()
    assert isinstance(plugin, ResolvedPlugin)
    assert plugin.path == str(path) and os.path.isabs(plugin.path)
    assert plugin.folder == str(pdir / "demo" / "1.0.0")
    assert plugin.plugin_dir == str(pdir)
    assert plugin.manifest == Manifest(name="demo", version="1.0.0", entrypoint="run",
                                       protocol="assessment/1", description="a test plugin")
    assert digest == hashlib.sha256(SCRIPT).hexdigest()
    st = os.lstat(path)
    assert (plugin.dev, plugin.ino, plugin.size, plugin.mtime_ns, plugin.ctime_ns, plugin.uid, plugin.mode) == \
        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_uid, st.st_mode)


def test_nagios_protocol_and_relative_plugin_dir(tmp_path, monkeypatch):
    make_plugin(tmp_path / "plugins", protocol="nagios")
    monkeypatch.chdir(tmp_path)
    plugin, _ = resolver(["plugins"]).resolve()
    assert plugin.manifest.protocol == "nagios"
    assert plugin.path == str(tmp_path / "plugins" / "demo" / "1.0.0" / "run")


def test_first_plugin_dir_wins(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    make_plugin(second, body=b"#!/bin/sh\n# second\n")
    (first).mkdir()
    first.chmod(0o755)
    # only in the second dir: found there
    plugin, digest = resolver([first, second]).resolve()
    assert plugin.plugin_dir == str(second)
    assert digest == hashlib.sha256(b"#!/bin/sh\n# second\n").hexdigest()
    # now also in the first: the first wins, on the very next call
    make_plugin(first, body=b"#!/bin/sh\n# first\n")
    r = resolver([first, second])
    plugin, digest = r.resolve()
    assert plugin.plugin_dir == str(first)
    assert digest == hashlib.sha256(b"#!/bin/sh\n# first\n").hexdigest()


def test_not_found_reason_lists_dirs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "missing"
    make_plugin(a, version="2.0.0")
    reason = reason_of(resolver([a, b]))
    assert reason == f"plugin not found: demo@1.0.0 in {a}, {b}"


def test_folder_without_manifest_is_not_a_plugin(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    (path.parent / "plugin.toml").unlink()
    assert reason_of(resolver([pdir])).startswith("plugin not found: demo@1.0.0 in ")


@pytest.mark.parametrize("name,version", [("..", "1.0.0"), ("demo", ".."), ("../etc", "1"), ("demo", "1/../../x"),
                                          ("", "1"), (".hidden", "1"), ("a" * 129, "1")])
def test_names_that_could_leave_plugin_dirs_are_refused(tmp_path, name, version):
    pdir = tmp_path / "plugins"
    make_plugin(pdir)
    reason = reason_of(resolver([pdir], name=name, version=version))
    assert reason.startswith("invalid plugin name or version:")


# -- manifest --------------------------------------------------------------------------

@pytest.mark.parametrize("manifest,expected", [
    ('name = "demo"\nversion = "1.0.0"\nentrypoint = "run"\nprotocol = "bogus"\n',
     "$.protocol: Invalid enum value 'bogus' (expected \"assessment/1\" or \"nagios\")"),
    ('name = "demo"\nversion = "1.0.0"\nprotocol = "nagios"\n', "$: Object missing required field `entrypoint`"),
    ('name = "demo"\nversion = "1.0.0"\nentrypoint = 7\nprotocol = "nagios"\n', "$.entrypoint: Expected `str`"),
    ('name = "demo"\nversion = "1.0.0"\nentrypoint = "run"\nprotocol = "nagios"\ndescription = 3\n', "$.description:"),
    ('name = "demo"\nthis is not toml\n', "invalid TOML:"),
    ('name = "other"\nversion = "1.0.0"\nentrypoint = "run"\nprotocol = "nagios"\n',
     "$.name: 'other' is not the folder name 'demo'"),
    ('name = "demo"\nversion = "9"\nentrypoint = "run"\nprotocol = "nagios"\n',
     "$.version: '9' is not the folder name '1.0.0'"),
])
def test_invalid_manifest(tmp_path, manifest, expected):
    pdir = tmp_path / "plugins"
    make_plugin(pdir, manifest=manifest)
    reason = reason_of(resolver([pdir]))
    prefix = f"invalid plugin.toml: {pdir / 'demo' / '1.0.0' / 'plugin.toml'}: "
    assert reason.startswith(prefix), reason
    assert expected in reason, reason


@pytest.mark.parametrize("entrypoint", ["../run", "sub/run", "/bin/sh", ".", "..", "", "plugin.toml"])
def test_entrypoint_must_be_a_file_name_in_the_folder(tmp_path, entrypoint):
    pdir = tmp_path / "plugins"
    make_plugin(pdir, entrypoint=entrypoint)
    (pdir / "demo" / "run").write_bytes(SCRIPT)  # something for "../run" to find, were it followed
    (pdir / "demo" / "run").chmod(0o755)
    reason = reason_of(resolver([pdir]))
    assert "$.entrypoint: must be a file name in the plugin's folder" in reason, reason


def test_missing_entrypoint(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    path.unlink()
    assert reason_of(resolver([pdir])) == f"plugin entrypoint not found: {path}"


# -- trust -----------------------------------------------------------------------------

def test_file_writable_by_others(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    path.chmod(0o757)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path} is writable by others"


def test_file_writable_by_group(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    path.chmod(0o775)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path} is writable by group"


def test_version_folder_writable_by_group(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    path.parent.chmod(0o775)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path.parent} is writable by group"


def test_name_folder_writable_by_others(tmp_path):
    pdir = tmp_path / "plugins"
    make_plugin(pdir)
    (pdir / "demo").chmod(0o1777)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {pdir / 'demo'} is writable by others"


def test_plugin_dir_writable_by_others(tmp_path):
    pdir = tmp_path / "plugins"
    make_plugin(pdir)
    pdir.chmod(0o777)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {pdir} is writable by others"


def test_folders_above_plugin_dir_are_not_checked(tmp_path):
    above = tmp_path / "world-writable"
    pdir = above / "plugins"
    make_plugin(pdir)
    above.chmod(0o777)
    plugin, _ = resolver([pdir]).resolve()
    assert plugin.plugin_dir == str(pdir)


def test_manifest_writable_by_others(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    (path.parent / "plugin.toml").chmod(0o666)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path.parent / 'plugin.toml'} is writable by others"


@needs_root
def test_file_owned_by_a_uid_not_allowed(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    os.chown(path, 12345, 12345)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path} is owned by uid 12345"
    # the service user's uid is allowed
    plugin, _ = resolver([pdir], allowed=ALLOWED | {12345}).resolve()
    assert plugin.uid == 12345


@needs_root
def test_folder_owned_by_a_uid_not_allowed(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    os.chown(path.parent, 12345, 0)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path.parent} is owned by uid 12345"
    os.chown(path.parent, 0, 0)
    os.chown(pdir, 12345, 0)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {pdir} is owned by uid 12345"


def test_symlink_entrypoint_refused(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir, entrypoint="run")
    real = path.parent / "real"
    path.rename(real)
    path.symlink_to("real")  # even pointing inside the folder: the entrypoint must be the file
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path} is a symlink"
    path.unlink()
    outside = tmp_path / "outside"
    outside.write_bytes(SCRIPT)
    outside.chmod(0o755)
    path.symlink_to(outside)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path} is a symlink"


def test_symlinked_version_folder_refused(tmp_path):
    pdir = tmp_path / "plugins"
    make_plugin(pdir, version="1.0.0")
    (pdir / "demo" / "latest").symlink_to("1.0.0")
    reason = reason_of(resolver([pdir], version="latest"))
    assert reason == f"untrusted plugin: {pdir / 'demo' / 'latest'} is a symlink"


def test_plugin_dir_may_be_a_symlink(tmp_path):
    real = tmp_path / "real-plugins"
    make_plugin(real)
    link = tmp_path / "plugins"
    link.symlink_to(real)
    plugin, _ = resolver([link]).resolve()
    assert plugin.plugin_dir == str(link)


def test_entrypoint_must_be_a_regular_executable_file(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    path.chmod(0o644)
    assert reason_of(resolver([pdir])) == f"plugin not executable: {path} (mode 0644)"
    path.unlink()
    path.mkdir(mode=0o755)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path} is not a regular file"
    path.rmdir()
    os.mkfifo(path, 0o755)
    assert reason_of(resolver([pdir])) == f"untrusted plugin: {path} is not a regular file"


def test_trust_is_checked_on_every_call(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    r = resolver([pdir])
    _, digest = r.resolve()
    path.parent.chmod(0o777)
    assert "is writable by others" in reason_of(r)
    path.parent.chmod(0o755)
    assert r.resolve()[1] == digest
    path.chmod(0o777)
    assert "is writable by others" in reason_of(r)


# -- digests ---------------------------------------------------------------------------

def test_sha256_pin_ok_case_insensitive(tmp_path):
    pdir = tmp_path / "plugins"
    make_plugin(pdir)
    want = hashlib.sha256(SCRIPT).hexdigest()
    _, digest = resolver([pdir], pin=want.upper()).resolve()
    assert digest == want
    _, digest = resolver([pdir], pin=want, require=True).resolve()
    assert digest == want


def test_sha256_pin_mismatch(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    pin = "ab" * 32
    reason = reason_of(resolver([pdir], pin=pin))
    assert reason == f"sha256 mismatch: {path}: expected {pin} got {hashlib.sha256(SCRIPT).hexdigest()}"


def test_require_sha256_without_pin(tmp_path):
    pdir = tmp_path / "plugins"
    make_plugin(pdir)
    assert reason_of(resolver([pdir], require=True)) == \
        "sha256 required: the spec has no plugin.sha256 and jobs.require_sha256 is true"


def test_an_entrypoint_larger_than_hash_max_is_not_hashed(tmp_path):
    """The zygote checks ahead only what it hashes quickly; the runner's own check hashes any size."""
    pdir = tmp_path / "plugins"
    make_plugin(pdir)
    r = resolver([pdir])
    with pytest.raises(PluginError, match="more than are hashed ahead"):
        r.resolve(hash_max=len(SCRIPT) - 1)
    assert r.hash_count == 0
    assert r.resolve(hash_max=len(SCRIPT))[1] == hashlib.sha256(SCRIPT).hexdigest()
    assert r.resolve()[1] == hashlib.sha256(SCRIPT).hexdigest() and r.hash_count == 1


def test_digest_and_manifest_are_cached(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    r = resolver([pdir])
    _, first = r.resolve()
    for _ in range(5):
        assert r.resolve()[1] == first
    assert r.hash_count == 1
    assert r.manifest_reads == 1

    # new content and a new mtime: hashed again, new digest
    new_body = SCRIPT + b"# changed\n"
    path.write_bytes(new_body)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _, second = r.resolve()
    assert second == hashlib.sha256(new_body).hexdigest() != first
    assert r.hash_count == 2
    assert r.resolve()[1] == second and r.hash_count == 2

    # same size and mtime put back by hand: ctime still moves, so the change is seen
    # (ctime has the kernel's coarse clock granularity: let it tick first)
    time.sleep(0.05)
    same_size = new_body.replace(b"changed", b"CHANGED")
    st = os.stat(path)
    path.write_bytes(same_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, third = r.resolve()
    assert third == hashlib.sha256(same_size).hexdigest()
    assert r.hash_count == 3

    # replaced by a new file (new inode) with the pinned content: seen too
    tmp = path.parent / "run.new"
    tmp.write_bytes(SCRIPT)
    tmp.chmod(0o755)
    tmp.rename(path)
    assert r.resolve()[1] == first
    assert r.hash_count == 4
    assert r.manifest_reads == 1

    # the manifest is read again only when it changes
    manifest = path.parent / "plugin.toml"
    manifest.write_text(manifest.read_text().replace("a test plugin", "described anew"))
    plugin, _ = r.resolve()
    assert plugin.manifest.description == "described anew"
    assert r.manifest_reads == 2
    r.resolve()
    assert r.manifest_reads == 2 and r.hash_count == 4


def test_pin_mismatch_after_the_file_changes(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir)
    r = resolver([pdir], pin=hashlib.sha256(SCRIPT).hexdigest())
    r.resolve()
    path.write_bytes(b"#!/bin/sh\necho evil\n")
    assert reason_of(r).startswith(f"sha256 mismatch: {path}: expected ")


def test_hash_file_is_the_only_reader(tmp_path):
    """A subclass sees every hash: the runner can rely on one read per change of the file."""
    pdir = tmp_path / "plugins"
    make_plugin(pdir)
    seen = []

    class Counting(PluginResolver):
        def hash_file(self, path, key):
            seen.append(path)
            return super().hash_file(path, key)

    r = Counting([str(pdir)], "demo", "1.0.0", ALLOWED, None, False)
    for _ in range(10):
        r.resolve()
    assert seen == [str(pdir / "demo" / "1.0.0" / "run")]


def test_invalid_manifest_error_is_cached_and_cleared(tmp_path):
    pdir = tmp_path / "plugins"
    path = make_plugin(pdir, protocol="bogus")
    r = resolver([pdir])
    first = reason_of(r)
    assert reason_of(r) == first
    assert r.manifest_reads == 1
    make_plugin(pdir)  # fixed
    assert r.resolve()[0].manifest.protocol == "assessment/1"
    assert path.exists()


# -- listing ---------------------------------------------------------------------------

def test_list_plugins_finds_the_reference_plugins():
    found = {(p["name"], p["version"]): p for p in list_plugins([str(REPO / "plugins")])}
    for name in ("file-permissions", "sysctl"):
        item = found[(name, "1.0.0")]
        assert item["protocol"] == "assessment/1"
        assert item["path"] == str(REPO / "plugins" / name / "1.0.0" / name)
        assert item["description"]
        if item["error"] is None:  # a checkout with umask 002 has group-writable folders
            assert item["sha256"] == hashlib.sha256(Path(item["path"]).read_bytes()).hexdigest()
        else:
            assert item["error"].startswith("untrusted plugin:"), item["error"]


def test_list_plugins_with_trusted_copies_and_broken_ones(tmp_path):
    pdir = tmp_path / "plugins"
    shutil.copytree(REPO / "plugins", pdir)
    for root, dirs, files in os.walk(pdir):
        os.chmod(root, 0o755)
        for f in files:
            p = os.path.join(root, f)
            os.chmod(p, 0o644 if f == "plugin.toml" else 0o755)
    make_plugin(pdir, "broken", "0.1", protocol="bogus")
    bad = make_plugin(pdir, "loose", "2.0")
    bad.chmod(0o777)
    (pdir / "not-a-plugin" / "1.0").mkdir(parents=True)  # no plugin.toml: not listed
    other = tmp_path / "more"
    make_plugin(other, "sysctl", "1.0.0", protocol="nagios")  # shadowed by the first dir: still listed

    items = list_plugins([str(pdir), str(other)])
    shipped = sorted(p.name for p in (REPO / "plugins").iterdir() if (p / "1.0.0" / "plugin.toml").exists())
    assert {"file-permissions", "sysctl"} <= set(shipped)
    first = sorted([(n, "1.0.0") for n in shipped] + [("broken", "0.1"), ("loose", "2.0")])
    assert [(p["name"], p["version"]) for p in items] == first + [("sysctl", "1.0.0")]
    by = {(p["name"], p["path"]): p for p in items}
    for name in shipped:
        item = by[(name, str(pdir / name / "1.0.0" / name))]
        assert item["error"] is None
        assert item["protocol"] == "assessment/1"
        assert item["sha256"] == hashlib.sha256((REPO / "plugins" / name / "1.0.0" / name).read_bytes()).hexdigest()
        assert set(item) == {"name", "version", "protocol", "sha256", "error", "path", "description", "network"}
        assert item["network"] is False
    broken = items[first.index(("broken", "0.1"))]
    assert broken["sha256"] is None and broken["error"].startswith("invalid plugin.toml:")
    assert broken["protocol"] == "bogus"
    loose = items[first.index(("loose", "2.0"))]
    assert loose["error"] == f"untrusted plugin: {bad} is writable by others"
    assert loose["sha256"] is None and loose["path"] == str(bad) and loose["protocol"] == "assessment/1"
    assert items[-1]["protocol"] == "nagios" and items[-1]["error"] is None


def test_list_plugins_missing_dir_is_empty(tmp_path):
    assert list_plugins([str(tmp_path / "nothing")]) == []


def test_reference_plugins_in_the_repo_are_executable():
    for name in ("file-permissions", "sysctl"):
        path = REPO / "plugins" / name / "1.0.0" / name
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o111 == 0o111, f"{path} mode {mode:o}"
        assert path.read_bytes().startswith(b"#!/usr/bin/env python3\n")
