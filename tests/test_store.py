"""supervisor/store.py (the on-disk spec store) and supervisor/folder.py (the `[specs] dir` source).

Real files under tmp_path; a "restart" is a fresh SpecStore loading the same state_dir.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from supervisor.folder import read_spec_file, read_specs_folder, spec_files
from supervisor.spec import parse_spec
from supervisor.store import SOURCES, SpecStore

HTTP = "http:https://config.example.org"


def spec_doc(uuid: str, interval: str = "1m", **extra) -> dict:
    doc = {"uuid": uuid, "plugin": {"name": "demo", "version": "1.0.0"}, "interval": interval}
    doc.update(extra)
    return doc


def make(uuid: str, source: str = "dir:/jobs.d/a.json", **extra):
    return parse_spec(spec_doc(uuid, **extra), source)


def fresh(state: Path) -> SpecStore:
    store = SpecStore(str(state))
    store.load()
    return store


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- writes and reloads -----------------------------------------------------------------------

def test_empty_store_loads_and_makes_its_folders(tmp_path):
    store = fresh(tmp_path)
    assert store.specs == {s: {} for s in SOURCES}
    assert store.revisions == {s: None for s in SOURCES}
    assert store.problems == []
    for source in SOURCES:
        folder = tmp_path / "specs" / source
        assert folder.is_dir()
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0


def test_apply_writes_files_that_a_fresh_store_loads(tmp_path):
    store = fresh(tmp_path)
    a, b = make("job-a", title="A", limits={"memory": "64MiB"}), make("job-b", interval="5m")
    h = make("job-h", source=HTTP, config={"x": [1, 2, {"y": None}]})
    assert store.apply("dir", [a, b], []) is True
    assert store.apply("http", [h], [], revision="rev-1") is True
    folder = tmp_path / "specs"
    assert files_in(folder / "dir") == ["job-a.json", "job-b.json"]
    assert files_in(folder / "http") == ["job-h.json", "revision"]
    assert json.loads((folder / "http" / "revision").read_text()) == "rev-1"
    stored = json.loads((folder / "dir" / "job-a.json").read_bytes())
    assert stored["source"] == "dir:/jobs.d/a.json"
    assert stored["spec"] == spec_doc("job-a", title="A", limits={"memory": "64MiB"})
    for p in (folder / "dir" / "job-a.json", folder / "http" / "job-h.json"):
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0

    again = fresh(tmp_path)
    assert again.specs == store.specs
    assert again.specs["dir"]["job-a"] == a
    assert again.specs["http"]["job-h"].revision == h.revision
    assert again.specs["http"]["job-h"].source == HTTP
    assert again.revisions == {"dir": None, "http": "rev-1"}
    assert again.problems == []


def test_apply_the_same_spec_again_changes_nothing(tmp_path):
    store = fresh(tmp_path)
    a = make("job-a")
    assert store.apply("dir", [a], []) is True
    path = tmp_path / "specs" / "dir" / "job-a.json"
    inode = path.stat().st_ino
    assert store.apply("dir", [make("job-a")], []) is False
    assert path.stat().st_ino == inode  # not rewritten
    # a new revision of it, or the same content from another file, is written
    assert store.apply("dir", [make("job-a", title="new")], []) is True
    assert store.apply("dir", [make("job-a", source="dir:/jobs.d/b.json", title="new")], []) is True
    assert fresh(tmp_path).specs["dir"]["job-a"].source == "dir:/jobs.d/b.json"


def test_apply_replaces_a_file_atomically(tmp_path):
    """The new content goes to a new file that is renamed over the old one: a reader that has
    the old file open keeps reading the whole old spec; nothing is truncated in place."""
    store = fresh(tmp_path)
    store.apply("dir", [make("job-a", title="old")], [])
    path = tmp_path / "specs" / "dir" / "job-a.json"
    old_bytes = path.read_bytes()
    old_inode = path.stat().st_ino
    with open(path, "rb") as old:
        store.apply("dir", [make("job-a", title="new " * 1000)], [])
        assert old.read() == old_bytes
    assert path.stat().st_ino != old_inode
    assert json.loads(path.read_bytes())["spec"]["title"].startswith("new ")
    assert files_in(path.parent) == ["job-a.json"]  # no .tmp left behind


def test_apply_deletes(tmp_path):
    store = fresh(tmp_path)
    store.apply("http", [make("a", source=HTTP), make("b", source=HTTP)], [], revision="1")
    assert store.apply("http", [], ["a", "unknown-uuid"], revision="2") is True
    assert files_in(tmp_path / "specs" / "http") == ["b.json", "revision"]
    assert store.apply("http", [], ["a"]) is False
    again = fresh(tmp_path)
    assert list(again.specs["http"]) == ["b"]
    assert again.revisions["http"] == "2"


def test_replace_makes_the_given_set_the_whole_set(tmp_path):
    store = fresh(tmp_path)
    store.replace("dir", {u: make(u) for u in ("a", "b", "c")})
    assert files_in(tmp_path / "specs" / "dir") == ["a.json", "b.json", "c.json"]
    assert store.replace("dir", {"b": make("b"), "d": make("d")}) is True
    assert files_in(tmp_path / "specs" / "dir") == ["b.json", "d.json"]
    assert set(store.specs["dir"]) == {"b", "d"}
    assert store.replace("dir", {"b": make("b"), "d": make("d")}) is False
    again = fresh(tmp_path)
    assert again.specs == store.specs
    assert store.replace("dir", {}) is True
    assert files_in(tmp_path / "specs" / "dir") == []
    assert fresh(tmp_path).specs["dir"] == {}


def test_replace_in_one_source_leaves_the_other_alone(tmp_path):
    store = fresh(tmp_path)
    store.replace("http", {"h": make("h", source=HTTP)}, revision="r")
    store.replace("dir", {"d": make("d")})
    store.replace("dir", {})
    again = fresh(tmp_path)
    assert list(again.specs["http"]) == ["h"] and again.revisions["http"] == "r"


def test_no_temp_files_are_left_behind(tmp_path):
    store = fresh(tmp_path)
    for i in range(5):
        store.replace("dir", {f"j{k}": make(f"j{k}", interval=f"{i + 1}m") for k in range(i, i + 3)})
        store.apply("http", [make(f"h{i}", source=HTTP)], [f"h{i - 1}"], revision=f"r{i}")
    names = all_files(tmp_path)
    assert not [n for n in names if ".tmp" in n], names
    assert names == ["specs/dir/j4.json", "specs/dir/j5.json", "specs/dir/j6.json",
                     "specs/http/h4.json", "specs/http/revision"]


def test_temp_files_of_an_interrupted_write_are_removed_at_load(tmp_path):
    fresh(tmp_path).apply("dir", [make("a")], [])
    leftover = tmp_path / "specs" / "dir" / "b.json.tmp.12345"
    leftover.write_bytes(b'{"source": "dir:x", "spec": {"uu')
    leftover_rev = tmp_path / "specs" / "http" / "revision.tmp.12345"
    leftover_rev.write_bytes(b"half")
    store = fresh(tmp_path)
    assert not leftover.exists() and not leftover_rev.exists()
    assert list(store.specs["dir"]) == ["a"]
    assert store.revisions["http"] is None
    assert store.problems == []


def test_forget_revision(tmp_path):
    store = fresh(tmp_path)
    store.apply("http", [make("h", source=HTTP)], [], revision="r1")
    store.forget_revision("http")
    assert store.revisions["http"] is None
    again = fresh(tmp_path)
    assert again.revisions["http"] is None
    assert list(again.specs["http"]) == ["h"]  # the specs stay: they keep running


# -- corrupt stored files ---------------------------------------------------------------------

CORRUPT = {
    "garbage.json": b"\x00\xff\xfe not json at all \x80",
    "torn.json": b'{"source": "dir:/x.json", "spec": {"uuid": "torn", "plu',
    "empty.json": b"",
    "wrong-shape.json": b'{"spec": {"uuid": "wrong-shape"}}',
    "not-an-object.json": b'[1, 2, 3]',
    "invalid-spec.json": json.dumps({"source": "dir:/x.json",
                                     "spec": {"uuid": "invalid-spec", "plugin": {"name": "demo"},
                                              "interval": "1m"}}).encode(),
    "too-fast.json": json.dumps({"source": "dir:/x.json", "spec": spec_doc("too-fast", interval="10ms")}).encode(),
    "other-name.json": json.dumps({"source": "dir:/x.json", "spec": spec_doc("job-z")}).encode(),
}


@pytest.mark.parametrize("name", list(CORRUPT))
@pytest.mark.parametrize("source", SOURCES)
def test_corrupt_stored_file_is_quarantined_and_others_load(tmp_path, name, source):
    store = fresh(tmp_path)
    good_source = "dir:/jobs.d/a.json" if source == "dir" else HTTP
    store.apply(source, [make("good-1", source=good_source), make("good-2", source=good_source)], [], revision="r")
    folder = tmp_path / "specs" / source
    bad = folder / name
    bad.write_bytes(CORRUPT[name])

    again = fresh(tmp_path)
    assert set(again.specs[source]) == {"good-1", "good-2"}
    assert again.specs[source] == store.specs[source]
    # the revision claimed the spec that did not load: forgotten, the next sync is a full one
    assert again.revisions[source] is None
    assert not bad.exists()
    assert files_in(folder) == ["good-1.json", "good-2.json"]
    moved = list((tmp_path / "quarantine").iterdir())
    assert len(moved) == 1
    assert moved[0].read_bytes() == CORRUPT[name]
    assert len(again.problems) == 1
    problem = again.problems[0]
    assert str(bad) in problem.reason
    assert str(moved[0]) in problem.reason
    assert source in problem.source
    assert problem.uuid == name.removesuffix(".json")

    # quarantined once: the next start is clean
    third = fresh(tmp_path)
    assert third.problems == [] and set(third.specs[source]) == {"good-1", "good-2"}


def test_several_corrupt_files_are_all_reported(tmp_path):
    store = fresh(tmp_path)
    store.apply("dir", [make("good")], [])
    for name, data in CORRUPT.items():
        (tmp_path / "specs" / "dir" / name).write_bytes(data)
    again = fresh(tmp_path)
    assert list(again.specs["dir"]) == ["good"]
    assert len(again.problems) == len(CORRUPT)
    reported = " ".join(p.reason for p in again.problems)
    for name in CORRUPT:
        assert str(tmp_path / "specs" / "dir" / name) in reported
    assert len(list((tmp_path / "quarantine").iterdir())) == len(CORRUPT)


def test_file_name_not_matching_uuid_names_the_uuid(tmp_path):
    fresh(tmp_path)
    (tmp_path / "specs" / "dir" / "other-name.json").write_bytes(CORRUPT["other-name.json"])
    store = fresh(tmp_path)
    assert store.specs["dir"] == {}
    assert "job-z" in store.problems[0].reason


# -- one uuid from two sources -----------------------------------------------------------------

def test_desired_rejects_a_uuid_from_both_sources_naming_both(tmp_path):
    store = fresh(tmp_path)
    dir_source = f"dir:{tmp_path}/jobs.d/shared.json"
    store.apply("dir", [make("shared", source=dir_source), make("only-dir", source=dir_source)], [])
    store.apply("http", [make("shared", source=HTTP, title="from http"), make("only-http", source=HTTP)], [])

    for s in (store, fresh(tmp_path)):  # the same after a restart
        desired, rejected = s.desired()
        assert set(desired) == {"only-dir", "only-http"}
        assert desired["only-dir"].source == dir_source and desired["only-http"].source == HTTP
        assert len(rejected) == 2
        assert {r.source for r in rejected} == {dir_source, HTTP}
        for r in rejected:
            assert r.uuid == "shared"
            assert dir_source in r.reason and HTTP in r.reason


def test_desired_without_clashes(tmp_path):
    store = fresh(tmp_path)
    store.apply("dir", [make("a")], [])
    store.apply("http", [make("b", source=HTTP)], [])
    desired, rejected = store.desired()
    assert set(desired) == {"a", "b"} and rejected == []
    store.apply("http", [make("a", source=HTTP)], [])
    desired, rejected = store.desired()
    assert set(desired) == {"b"} and len(rejected) == 2
    store.apply("http", [], ["a"])
    desired, rejected = store.desired()
    assert set(desired) == {"a", "b"} and rejected == []


# -- the specs folder -------------------------------------------------------------------------

def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_read_folder_with_json_object_json_array_toml_jobs_and_toml_single(tmp_path):
    write(tmp_path / "one.json", json.dumps(spec_doc("json-one", title="single")))
    write(tmp_path / "many.json", json.dumps([spec_doc("json-arr-0"), spec_doc("json-arr-1", interval="2h")]))
    write(tmp_path / "jobs.toml", """
[[job]]
uuid = "toml-job-0"
interval = "30s"
[job.plugin]
name = "demo"
version = "1.0.0"

[[job]]
uuid = "toml-job-1"
interval = 3600
labels = { env = "prod" }
[job.plugin]
name = "other"
version = "2.0"
[job.limits]
memory = "64MiB"
""")
    write(tmp_path / "single.toml", """
uuid = "toml-single"
interval = "5m"
run_on_start = true
[plugin]
name = "demo"
version = "1.0.0"
[config]
paths = ["/etc/ssh/sshd_config"]
""")
    specs, rejected = read_specs_folder(str(tmp_path))
    assert rejected == []
    assert set(specs) == {"json-one", "json-arr-0", "json-arr-1", "toml-job-0", "toml-job-1", "toml-single"}
    assert specs["json-one"].job.title == "single"
    assert specs["json-one"].source == f"dir:{tmp_path / 'one.json'}"
    assert specs["json-arr-1"].job.interval == 7200.0
    assert specs["json-arr-1"].source == f"dir:{tmp_path / 'many.json'}"
    assert specs["toml-job-0"].job.interval == 30.0
    assert specs["toml-job-1"].job.plugin.label == "other@2.0"
    assert specs["toml-job-1"].job.labels == {"env": "prod"}
    assert specs["toml-job-1"].job.limits.memory == 64 << 20
    assert specs["toml-job-1"].source == f"dir:{tmp_path / 'jobs.toml'}"
    assert specs["toml-single"].job.run_on_start is True
    assert specs["toml-single"].job.config == {"paths": ["/etc/ssh/sshd_config"]}


@pytest.mark.parametrize("name, content", [
    ("broken.json", '{"uuid": "x", '),
    ("broken.toml", 'uuid = = "x"\n'),
    ("latin1.toml", b'uuid = "caf\xe9"\n'),
    ("empty.json", ""),
])
def test_file_that_does_not_parse_is_rejected_naming_the_file(tmp_path, name, content):
    write(tmp_path / "good.json", json.dumps(spec_doc("good")))
    write(tmp_path / name, content)
    specs, rejected = read_specs_folder(str(tmp_path))
    assert list(specs) == ["good"]
    assert len(rejected) == 1
    assert str(tmp_path / name) in rejected[0].reason
    assert rejected[0].source == f"dir:{tmp_path / name}"


def test_one_bad_spec_in_an_array_is_rejected_alone(tmp_path):
    path = write(tmp_path / "many.json", json.dumps([
        spec_doc("arr-0"), spec_doc("arr-1", interval="soon"), spec_doc("arr-2"), spec_doc("arr-3", colour=1)]))
    specs, rejected = read_specs_folder(str(tmp_path))
    assert set(specs) == {"arr-0", "arr-2"}
    assert [r.uuid for r in rejected] == ["arr-1", "arr-3"]
    assert str(path) in rejected[0].reason and "$[1].interval" in rejected[0].reason
    assert str(path) in rejected[1].reason and "$[3].colour" in rejected[1].reason
    assert all(r.source == f"dir:{path}" for r in rejected)


def test_one_bad_spec_in_toml_jobs_is_rejected_alone(tmp_path):
    path = write(tmp_path / "jobs.toml", """
[[job]]
uuid = "t0"
interval = "1m"
plugin = { name = "demo", version = "1" }

[[job]]
uuid = "t1"
interval = "100ms"
plugin = { name = "demo", version = "1" }

[[job]]
uuid = "t2"
interval = "1m"
plugin = { name = "demo", version = "1" }
""")
    specs, rejected = read_specs_folder(str(tmp_path))
    assert set(specs) == {"t0", "t2"}
    assert len(rejected) == 1 and rejected[0].uuid == "t1"
    assert str(path) in rejected[0].reason and "job[1].interval" in rejected[0].reason


def test_a_bad_single_spec_names_file_and_field(tmp_path):
    path = write(tmp_path / "a.json", json.dumps({"uuid": "a", "plugin": {"name": "../../bin", "version": "1"},
                                                  "interval": "1m"}))
    specs, rejected = read_spec_file(str(path))
    assert specs == []
    assert rejected[0].uuid == "a"
    assert str(path) in rejected[0].reason and "$.plugin.name" in rejected[0].reason


def test_same_uuid_in_two_files_is_rejected_for_both(tmp_path):
    a = write(tmp_path / "a.json", json.dumps([spec_doc("dup"), spec_doc("only-a")]))
    b = write(tmp_path / "b.toml", 'uuid = "dup"\ninterval = "2m"\nplugin = { name = "x", version = "1" }\n')
    write(tmp_path / "c.json", json.dumps(spec_doc("only-c")))
    specs, rejected = read_specs_folder(str(tmp_path))
    assert set(specs) == {"only-a", "only-c"}
    assert len(rejected) == 2
    assert {r.source for r in rejected} == {f"dir:{a}", f"dir:{b}"}
    for r in rejected:
        assert r.uuid == "dup"
        assert str(a) in r.reason and str(b) in r.reason


def test_hidden_and_backup_files_are_ignored(tmp_path):
    write(tmp_path / "real.json", json.dumps(spec_doc("real")))
    write(tmp_path / ".hidden.json", json.dumps(spec_doc("hidden")))
    write(tmp_path / ".editor-swap.toml", "garbage = = =")
    write(tmp_path / "real.json~", json.dumps(spec_doc("backup")))
    write(tmp_path / "jobs.toml~", "garbage = = =")
    write(tmp_path / "notes.txt", "not a spec")
    write(tmp_path / "README", "not a spec")
    (tmp_path / "sub.json").mkdir()
    write(tmp_path / "sub.json" / "inner.json", json.dumps(spec_doc("inner")))
    assert spec_files(str(tmp_path)) == [str(tmp_path / "real.json")]
    specs, rejected = read_specs_folder(str(tmp_path))
    assert list(specs) == ["real"] and rejected == []


def test_empty_folder(tmp_path):
    assert read_specs_folder(str(tmp_path)) == ({}, [])


def test_folder_specs_round_trip_through_the_store(tmp_path):
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    write(jobs / "a.json", json.dumps([spec_doc("a"), spec_doc("b", limits={"cpu_time": "5s"})]))
    specs, _ = read_specs_folder(str(jobs))
    store = fresh(tmp_path / "state")
    assert store.replace("dir", specs) is True
    again = fresh(tmp_path / "state")
    assert again.specs["dir"] == specs
    assert again.desired()[0] == specs


def test_revision_and_location_of_earlier_versions_in_plain_text_still_load(tmp_path):
    fresh(tmp_path)
    (tmp_path / "specs" / "http" / "revision").write_text("rev-7\n")
    (tmp_path / "specs" / "http" / "location").write_text("https://config.example.org/x\n")
    again = fresh(tmp_path)
    assert again.revisions["http"] == "rev-7"
    assert again.locations["http"] == "https://config.example.org/x"
    again.apply("http", [], [], revision="rev-8")
    assert fresh(tmp_path).revisions["http"] == "rev-8"
