"""supervisor/config.py: the config file of SPEC §3, and the CLI's exit codes for a bad one (§2).

Every config here is a real TOML file under tmp_path; the CLI runs as a real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid as uuidlib
from pathlib import Path

import pytest

from supervisor import config as cfg
from supervisor.config import ConfigError, check_token_file, load_config, load_runtime_uuid

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def minimal(tmp_path: Path, extra: str = "", head: str = "") -> Path:
    """A smallest valid config (a specs dir and a file sink), plus `extra` TOML at the end
    and `head` TOML at the top (top-level keys must come before any table)."""
    text = head + textwrap.dedent(f"""
        state_dir = "{tmp_path / 'state'}"
        run_dir = "{tmp_path / 'run'}"
        [specs]
        dir = "{tmp_path / 'jobs.d'}"
        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "{tmp_path / 'results.jsonl'}"
        """) + textwrap.dedent(extra)
    return write(tmp_path / "config.toml", text)


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return str(info.value)


# -- the SPEC example -----------------------------------------------------------------------

def spec_example(tmp_path: Path, runtime_uuid: str) -> str:
    """SPEC §3 verbatim, with temp paths for the paths and a real UUID for "0b6d..."."""
    return textwrap.dedent(f"""
        runtime_uuid = "{runtime_uuid}"     # optional; else generated once and kept in state_dir/runtime_uuid
        state_dir = "{tmp_path}/var/lib/assessment-runtime"   # spec store, outbox, per-job scratch space
        run_dir = "{tmp_path}/run/assessment-runtime"         # control socket lives here: control.sock
        plugin_dirs = ["{tmp_path}/usr/lib/assessment-runtime/plugins", "{tmp_path}/var/lib/assessment-runtime/plugins"]
        log_format = "text"          # or "json"
        log_level = "info"

        [configuration]              # optional: a remote Configuration service
        url = "https://config.example.org"
        token_file = "{tmp_path}/etc/assessment-runtime/token"   # optional; must not be readable by group/others
        ca_file = "{tmp_path}/etc/assessment-runtime/ca.pem"     # optional
        sync_interval = "30s"        # config_sync_interval
        timeout = "10s"
        allow_http = false           # plain http is refused unless true (tests set it on loopback)

        [specs]                      # optional: a local folder of job spec files (*.json, *.toml)
        dir = "{tmp_path}/etc/assessment-runtime/jobs.d"          # watched; a change is applied within 1 s

        [jobs]
        resync_interval = "10s"      # job_run_resync_interval: reconcile runners with the store
        default_timeout = "60s"
        stop_grace = "5s"            # SIGTERM, then SIGKILL to the whole process group
        run_as_user = "assessment-runtime"   # unprivileged user for plugins when started as root
        require_sha256 = false       # true: a spec without plugin.sha256 is rejected

        [jobs.default_limits]        # per run; a spec's limits may lower these, never raise them
        memory = "512MiB"
        cpu_time = "60s"
        open_files = 256
        processes = 64
        output = "16MiB"             # most bytes read from a plugin's stdout

        [plugin_store]               # optional download of plugins by URL (off for air-gapped hosts)
        allow_download = false

        [publisher]
        outbox_max = "1GiB"          # beyond this the oldest undelivered results are dropped and counted
        batch_max = 500
        flush_interval = "1s"

        [[publisher.sink]]
        name = "hub"
        kind = "http"
        url = "https://hub.example.org/v1/results"
        token_file = "{tmp_path}/etc/assessment-runtime/hub-token"
        ca_file = "{tmp_path}/etc/assessment-runtime/ca.pem"
        allow_http = false
        timeout = "10s"

        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "{tmp_path}/var/lib/assessment-runtime/results.jsonl"
        """)


def test_spec_example_loads(tmp_path):
    rid = str(uuidlib.uuid4())
    path = write(tmp_path / "config.toml", spec_example(tmp_path, rid))
    c = load_config(str(path))
    assert c.runtime_uuid == rid
    assert c.state_dir == f"{tmp_path}/var/lib/assessment-runtime"
    assert c.run_dir == f"{tmp_path}/run/assessment-runtime"
    assert c.plugin_dirs == [f"{tmp_path}/usr/lib/assessment-runtime/plugins",
                             f"{tmp_path}/var/lib/assessment-runtime/plugins"]
    assert (c.log_format, c.log_level) == ("text", "info")
    assert c.configuration.url == "https://config.example.org"
    assert c.configuration.token_file == f"{tmp_path}/etc/assessment-runtime/token"
    assert c.configuration.ca_file == f"{tmp_path}/etc/assessment-runtime/ca.pem"
    assert c.configuration.sync_interval == 30.0
    assert c.configuration.timeout == 10.0
    assert c.configuration.allow_http is False
    assert c.specs.dir == f"{tmp_path}/etc/assessment-runtime/jobs.d"
    assert c.jobs.resync_interval == 10.0
    assert c.jobs.default_timeout == 60.0
    assert c.jobs.stop_grace == 5.0
    assert c.jobs.run_as_user == "assessment-runtime"
    assert c.jobs.require_sha256 is False
    lim = c.jobs.default_limits
    assert (lim.memory, lim.cpu_time, lim.open_files, lim.processes, lim.output) == (512 * MIB, 60.0, 256, 64, 16 * MIB)
    assert c.plugin_store.allow_download is False
    assert c.publisher.outbox_max == 1 << 30
    assert c.publisher.batch_max == 500
    assert c.publisher.flush_interval == 1.0
    hub, archive = c.publisher.sink
    assert (hub.name, hub.kind, hub.url) == ("hub", "http", "https://hub.example.org/v1/results")
    assert hub.token_file == f"{tmp_path}/etc/assessment-runtime/hub-token"
    assert hub.ca_file == f"{tmp_path}/etc/assessment-runtime/ca.pem"
    assert hub.allow_http is False and hub.timeout == 10.0
    assert (archive.name, archive.kind, archive.path) == (
        "archive", "file", f"{tmp_path}/var/lib/assessment-runtime/results.jsonl")


def test_spec_example_with_placeholder_runtime_uuid_is_refused(tmp_path):
    """The SPEC's literal "0b6d..." is a placeholder, not a UUID: it is named as the bad key."""
    path = write(tmp_path / "config.toml", spec_example(tmp_path, "0b6d..."))
    message = config_error(path)
    assert str(path) in message and "runtime_uuid" in message


def test_defaults(tmp_path):
    path = write(tmp_path / "config.toml", """
        [specs]
        dir = "/etc/assessment-runtime/jobs.d"
        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "/var/lib/assessment-runtime/results.jsonl"
        """)
    c = load_config(str(path))
    assert c.runtime_uuid is None
    assert c.state_dir == "/var/lib/assessment-runtime"
    assert c.run_dir == "/run/assessment-runtime"
    assert c.plugin_dirs == ["/usr/lib/assessment-runtime/plugins", "/var/lib/assessment-runtime/plugins"]
    assert (c.log_format, c.log_level) == ("text", "info")
    assert c.configuration is None
    assert c.jobs.resync_interval == 10.0
    assert c.jobs.default_timeout == 60.0
    assert c.jobs.stop_grace == 5.0
    assert c.jobs.run_as_user == "assessment-runtime"
    assert c.jobs.require_sha256 is False
    lim = c.jobs.default_limits
    assert (lim.memory, lim.cpu_time, lim.open_files, lim.processes, lim.output) == (512 * MIB, 60.0, 256, 64, 16 * MIB)
    assert c.plugin_store.allow_download is False
    assert (c.publisher.outbox_max, c.publisher.batch_max, c.publisher.flush_interval) == (1 << 30, 500, 1.0)
    assert c.publisher.sink[0].timeout == 10.0 and c.publisher.sink[0].allow_http is False


def test_defaults_of_the_configuration_table(tmp_path):
    path = minimal(tmp_path, """
        [configuration]
        url = "https://config.example.org"
        """)
    c = load_config(str(path)).configuration
    assert (c.sync_interval, c.timeout, c.allow_http, c.token_file, c.ca_file) == (30.0, 10.0, False, None, None)


def test_default_plugin_dirs_are_not_shared_between_configs(tmp_path):
    a = load_config(str(minimal(tmp_path)))
    a.plugin_dirs.append("/somewhere/else")
    b = load_config(str(minimal(tmp_path)))
    assert "/somewhere/else" not in b.plugin_dirs


def test_partial_default_limits_keep_the_other_defaults(tmp_path):
    path = minimal(tmp_path, """
        [jobs.default_limits]
        memory = "128MiB"
        """)
    lim = load_config(str(path)).jobs.default_limits
    assert (lim.memory, lim.cpu_time, lim.open_files, lim.processes, lim.output) == (128 * MIB, 60.0, 256, 64, 16 * MIB)


# -- durations and sizes --------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ('"500ms"', 0.5), ('"30s"', 30.0), ('"5m"', 300.0), ('"1h"', 3600.0),
    ("7", 7.0), ("2.5", 2.5), ('"45"', 45.0), ('"1.5s"', 1.5),
])
def test_durations(tmp_path, text, seconds):
    path = minimal(tmp_path, f"""
        [jobs]
        stop_grace = {text}
        [publisher]
        flush_interval = {text}
        """)
    c = load_config(str(path))
    assert c.jobs.stop_grace == pytest.approx(seconds)
    assert c.publisher.flush_interval == pytest.approx(seconds)
    assert isinstance(c.jobs.stop_grace, float)


@pytest.mark.parametrize("text, size", [
    ('"512KiB"', 512 << 10), ('"256MiB"', 256 << 20), ('"1GiB"', 1 << 30), ("4096", 4096), ('"4096"', 4096),
])
def test_sizes(tmp_path, text, size):
    path = minimal(tmp_path, f"""
        [jobs.default_limits]
        memory = {text}
        output = {text}
        [publisher]
        outbox_max = {text}
        """)
    c = load_config(str(path))
    assert c.jobs.default_limits.memory == size
    assert c.jobs.default_limits.output == size
    assert c.publisher.outbox_max == size
    assert isinstance(c.publisher.outbox_max, int)


@pytest.mark.parametrize("table, key, value", [
    ("jobs", "stop_grace", '"soon"'),
    ("jobs", "stop_grace", "-1"),
    ("jobs", "stop_grace", "true"),
    ("jobs", "default_timeout", '"5 minutes"'),
    ("jobs.default_limits", "memory", '"lots"'),
    ("jobs.default_limits", "memory", '"1.5GiB"'),
    ("jobs.default_limits", "memory", "-5"),
    ("jobs.default_limits", "open_files", "0"),
    ("publisher", "batch_max", '"x"'),
    ("publisher", "batch_max", "0"),
    ("publisher", "outbox_max", '"big"'),
    ("configuration", "sync_interval", '"often"'),
])
def test_wrong_values_name_file_and_key(tmp_path, table, key, value):
    extra = f"[{table}]\n{key} = {value}\n"
    if table == "configuration":
        extra = f'[configuration]\nurl = "https://config.example.org"\n{key} = {value}\n'
    path = minimal(tmp_path, extra)
    message = config_error(path)
    assert str(path) in message
    assert f"{table}.{key}" in message


@pytest.mark.parametrize("head, value", [
    ('log_level = "loud"\n', "log_level"),
    ('log_format = "xml"\n', "log_format"),
    ('plugin_dirs = "/not/a/list"\n', "plugin_dirs"),
    ("runtime_uuid = 5\n", "runtime_uuid"),
])
def test_wrong_top_level_values_name_file_and_key(tmp_path, head, value):
    path = minimal(tmp_path, head=head)
    message = config_error(path)
    assert str(path) in message and value in message


def test_wrong_sink_kind_names_file_and_key(tmp_path):
    path = minimal(tmp_path, """
        [[publisher.sink]]
        name = "other"
        kind = "kafka"
        """)
    message = config_error(path)
    assert str(path) in message and "publisher.sink[1].kind" in message


# -- unknown keys ---------------------------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
    path = minimal(tmp_path, head="colour = \"blue\"\n")
    message = config_error(path)
    assert str(path) in message and "colour" in message and "unknown" in message


@pytest.mark.parametrize("extra, container, key", [
    ("[jobs]\nfoo = 1\n", "jobs", "foo"),
    ("[jobs.default_limits]\nswap = \"1GiB\"\n", "jobs.default_limits", "swap"),
    ("[publisher]\nretries = 3\n", "publisher", "retries"),
    ("[plugin_store]\nmirror = \"x\"\n", "plugin_store", "mirror"),
    ('[configuration]\nurl = "https://c.example.org"\ntokenfile = "t"\n', "configuration", "tokenfile"),
    ('[specs]\ndir = "x"\nrecursive = true\n', "specs", "recursive"),
])
def test_unknown_nested_key_names_file_table_and_key(tmp_path, extra, container, key):
    if container == "specs":
        path = write(tmp_path / "config.toml",
                     extra + '[[publisher.sink]]\nname = "a"\nkind = "file"\npath = "r.jsonl"\n')
    else:
        path = minimal(tmp_path, extra)
    message = config_error(path)
    assert str(path) in message
    assert f"{container}.{key}" in message


def test_unknown_key_in_a_sink_names_the_sink_index(tmp_path):
    path = minimal(tmp_path, """
        [[publisher.sink]]
        name = "second"
        kind = "file"
        path = "b.jsonl"
        bar = 1
        """)
    message = config_error(path)
    assert str(path) in message and "publisher.sink[1].bar" in message
    path = write(tmp_path / "other.toml", """
        [specs]
        dir = "x"
        [[publisher.sink]]
        name = "a"
        kind = "file"
        path = "a.jsonl"
        bar = 1
        """)
    message = config_error(path)
    assert str(path) in message and "publisher.sink[0].bar" in message


@pytest.mark.parametrize("extra, head, dotted", [
    ("[jobs]\nfoo = 1\n", "", "key jobs.foo"),
    ("[jobs.default_limits]\nswap = 1\n", "", "key jobs.default_limits.swap"),
    ('[[publisher.sink]]\nname = "b"\nkind = "file"\npath = "b.jsonl"\nbar = 1\n', "", "key publisher.sink[1].bar"),
    ("", "colour = 1\n", "key colour"),
])
def test_unknown_key_is_named_by_its_dotted_path(tmp_path, extra, head, dotted):
    path = minimal(tmp_path, extra, head=head)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert dotted in message and "unknown" in message


# -- other errors ---------------------------------------------------------------------------

def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path / "broken.toml", "state_dir = [\n")
    message = config_error(path)
    assert str(path) in message and "TOML" in message


def test_missing_file_names_the_file(tmp_path):
    message = config_error(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in message


def test_no_spec_source_is_an_error(tmp_path):
    path = write(tmp_path / "config.toml", """
        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "results.jsonl"
        """)
    message = config_error(path)
    assert str(path) in message and "spec source" in message


def test_configuration_alone_is_a_spec_source(tmp_path):
    path = write(tmp_path / "config.toml", """
        [configuration]
        url = "https://config.example.org"
        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "results.jsonl"
        """)
    c = load_config(str(path))
    assert c.specs is None and c.configuration.url == "https://config.example.org"


def test_no_sink_is_an_error(tmp_path):
    path = write(tmp_path / "config.toml", """
        [specs]
        dir = "jobs.d"
        [publisher]
        batch_max = 10
        """)
    message = config_error(path)
    assert str(path) in message and "sink" in message


def test_http_sink_needs_allow_http_for_plain_http(tmp_path):
    sink = """
        [[publisher.sink]]
        name = "hub"
        kind = "http"
        url = "http://127.0.0.1:8080/v1/results"
        """
    message = config_error(minimal(tmp_path, sink))
    assert str(tmp_path / "config.toml") in message and "publisher.sink[1].url" in message
    c = load_config(str(minimal(tmp_path, sink + "allow_http = true\n")))
    assert c.publisher.sink[1].url == "http://127.0.0.1:8080/v1/results"


def test_configuration_needs_allow_http_for_plain_http(tmp_path):
    message = config_error(minimal(tmp_path, '[configuration]\nurl = "http://127.0.0.1:9/"\n'))
    assert "configuration.url" in message
    c = load_config(str(minimal(tmp_path, '[configuration]\nurl = "http://127.0.0.1:9/"\nallow_http = true\n')))
    assert c.configuration.allow_http is True


def test_http_sink_without_url_and_file_sink_without_path(tmp_path):
    message = config_error(minimal(tmp_path, '[[publisher.sink]]\nname = "hub"\nkind = "http"\n'))
    assert "publisher.sink[1].url" in message
    message = config_error(minimal(tmp_path, '[[publisher.sink]]\nname = "f"\nkind = "file"\n'))
    assert "publisher.sink[1].path" in message


def test_duplicate_sink_names_are_an_error(tmp_path):
    path = minimal(tmp_path, """
        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "other.jsonl"
        """)
    message = config_error(path)
    assert str(path) in message and "publisher.sink[1].name" in message and "archive" in message


def test_sink_name_must_be_a_safe_name(tmp_path):
    message = config_error(minimal(tmp_path, '[[publisher.sink]]\nname = "../x"\nkind = "file"\npath = "x"\n'))
    assert "publisher.sink[1].name" in message


# -- paths ----------------------------------------------------------------------------------

def test_relative_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "ar"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(folder / "config.toml", """
        state_dir = "state"
        run_dir = "./run"
        plugin_dirs = ["plugins", "../shared/plugins", "/abs/plugins"]
        [configuration]
        url = "https://config.example.org"
        token_file = "secrets/token"
        ca_file = "ca.pem"
        [specs]
        dir = "jobs.d"
        [[publisher.sink]]
        name = "hub"
        kind = "http"
        url = "https://hub.example.org/"
        token_file = "hub-token"
        ca_file = "certs/ca.pem"
        [[publisher.sink]]
        name = "archive"
        kind = "file"
        path = "out/results.jsonl"
        """)
    # a relative --config path too: resolved from the cwd, then its folder is the base
    c = load_config(os.path.relpath(path, elsewhere))
    assert c.state_dir == str(folder / "state")
    assert c.run_dir == str(folder / "run")
    assert c.plugin_dirs == [str(folder / "plugins"), str(tmp_path / "etc" / "shared" / "plugins"), "/abs/plugins"]
    assert c.configuration.token_file == str(folder / "secrets" / "token")
    assert c.configuration.ca_file == str(folder / "ca.pem")
    assert c.specs.dir == str(folder / "jobs.d")
    hub, archive = c.publisher.sink
    assert hub.token_file == str(folder / "hub-token")
    assert hub.ca_file == str(folder / "certs" / "ca.pem")
    assert archive.path == str(folder / "out" / "results.jsonl")


def test_config_path_default_and_env(monkeypatch):
    monkeypatch.delenv("ASSESSMENT_RUNTIME_CONFIG", raising=False)
    assert cfg.config_path(None) == "/etc/assessment-runtime/config.toml"
    monkeypatch.setenv("ASSESSMENT_RUNTIME_CONFIG", "/tmp/x.toml")
    assert cfg.config_path(None) == "/tmp/x.toml"
    assert cfg.config_path("/given.toml") == "/given.toml"


# -- token files ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602])
def test_token_file_readable_or_writable_by_others_is_refused(tmp_path, mode):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(mode)
    with pytest.raises(ConfigError) as info:
        check_token_file(str(token), "configuration.token_file")
    message = str(info.value)
    assert "configuration.token_file" in message and str(token) in message
    assert "s3cret" not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_token_file_of_the_owner_only_is_read(tmp_path, mode):
    token = tmp_path / "token"
    token.write_text("  s3cret-token\n")
    token.chmod(mode)
    assert check_token_file(str(token), "publisher.sink[0].token_file") == "s3cret-token"


def test_missing_or_empty_token_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="configuration.token_file"):
        check_token_file(str(tmp_path / "absent"), "configuration.token_file")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        check_token_file(str(empty), "configuration.token_file")


# -- runtime uuid ---------------------------------------------------------------------------

def test_runtime_uuid_is_generated_once_and_kept(tmp_path):
    c = load_config(str(minimal(tmp_path)))
    stored = Path(c.state_dir) / "runtime_uuid"
    assert not stored.exists()
    first = load_runtime_uuid(c)
    assert str(uuidlib.UUID(first)) == first
    assert stored.read_text().strip() == first
    assert load_runtime_uuid(c) == first
    # a new process (a fresh config object) still finds the same one
    assert load_runtime_uuid(load_config(str(minimal(tmp_path)))) == first
    assert [p.name for p in stored.parent.iterdir()] == ["runtime_uuid"]  # no temp file left


def test_runtime_uuid_from_config_is_preferred(tmp_path):
    rid = str(uuidlib.uuid4())
    path = minimal(tmp_path, head=f'runtime_uuid = "{rid}"\n')
    c = load_config(str(path))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "runtime_uuid").write_text(str(uuidlib.uuid4()) + "\n")
    assert load_runtime_uuid(c) == rid


def test_runtime_uuid_in_config_must_be_a_uuid(tmp_path):
    message = config_error(minimal(tmp_path, head='runtime_uuid = "not-a-uuid"\n'))
    assert "runtime_uuid" in message


# -- the CLI --------------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ASSESSMENT_RUNTIME_CONFIG"}
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          timeout=30, cwd=REPO, env=env)


def test_cli_validate_bad_config_exits_1_naming_the_key(tmp_path):
    path = minimal(tmp_path, "[jobs]\nstop_grace = \"soon\"\n")
    r = cli("validate", "--config", str(path))
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert "jobs.stop_grace" in out and str(path) in out
    assert "Traceback" not in r.stderr


def test_cli_validate_good_config_exits_0(tmp_path):
    (tmp_path / "jobs.d").mkdir()
    path = minimal(tmp_path)
    r = cli("validate", "--config", str(path))
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_cli_status_with_unknown_key_exits_78_naming_the_key(tmp_path):
    path = minimal(tmp_path, "[jobs]\nfoo = 1\n")
    r = cli("status", "--config", str(path))
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert str(path) in r.stderr and "jobs.foo" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_status_with_unknown_sink_key_exits_78_naming_the_sink(tmp_path):
    path = minimal(tmp_path, '[[publisher.sink]]\nname = "b"\nkind = "file"\npath = "b"\nbar = 2\n')
    r = cli("status", "--config", str(path))
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert str(path) in r.stderr and "publisher.sink[1].bar" in r.stderr

