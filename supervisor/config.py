"""The config file (SPEC §3): TOML, validated by msgspec; any problem names file and key."""

from __future__ import annotations

import logging
import os
import tomllib
import uuid as uuidlib
from typing import Annotated, Literal

import msgspec

from supervisor.files import set_aside, write_atomic
from supervisor.spec import Limits, Name, validation_reason
from runner.units import Duration, Size, dec_hook

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/assessment-runtime/config.toml"
CONFIG_ENV = "ASSESSMENT_RUNTIME_CONFIG"
EX_CONFIG = 78  # sysexits EX_CONFIG


class ConfigError(Exception):
    """Names the file and the key; the CLI prints it and exits 78."""


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class ConfigurationSource(Strict):
    url: str
    token_file: str | None = None
    ca_file: str | None = None
    sync_interval: Duration = Duration(30)
    timeout: Duration = Duration(10)
    allow_http: bool = False


class SpecsSource(Strict):
    dir: str


class DefaultLimits(Limits, forbid_unknown_fields=True, frozen=True):
    memory: Size | None = Size(512 << 20)
    cpu_time: Duration | None = Duration(60)
    open_files: Annotated[int, msgspec.Meta(ge=1)] | None = 256
    processes: Annotated[int, msgspec.Meta(ge=1)] | None = 64
    output: Size | None = Size(16 << 20)


class Jobs(Strict):
    resync_interval: Duration = Duration(10)
    default_timeout: Duration = Duration(60)
    stop_grace: Duration = Duration(5)
    run_as_user: str = "assessment-runtime"
    user_per_job: bool = True  # root only: each job's plugin runs as a uid/gid of its own from uid_range
    uid_range: str = "61184-65519"
    confine: bool = True  # Landlock where the kernel has it
    require_sha256: bool = False
    # local exceptions to run_as_user, by plugin "name" or "name@version" (never from a spec)
    plugin_users: dict[str, str] = {}
    # local grants, by plugin "name" or "name@version" (never from a spec): more write paths under
    # confinement, and ambient capabilities (SPEC §6)
    plugin_write_paths: dict[str, list[str]] = {}
    plugin_capabilities: dict[str, list[str]] = {}

    def id_range(self) -> tuple[int, int]:
        """uid_range as (first, last); checked by load_config."""
        first, _, last = self.uid_range.partition("-")
        return int(first), int(last)
    default_limits: DefaultLimits = msgspec.field(default_factory=DefaultLimits)


class PluginStore(Strict):
    allow_download: bool = False
    # beyond SPEC §3: how downloads are made (https only unless allow_http, for loopback tests)
    allow_http: bool = False
    ca_file: str | None = None
    timeout: Duration = Duration(30)
    max_size: Size = Size(64 << 20)


DEFAULT_NATS_SUBJECT = "assessment.results.{runtime_uuid}"
NATS_SUBJECT_FIELDS = ("runtime_uuid", "job_uuid", "status")


class Sink(Strict):
    name: Name
    kind: Literal["http", "file", "ccf", "nats"]
    url: str | list[str] | None = None  # a list only for nats: servers tried in turn
    path: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    allow_http: bool = False
    timeout: Duration = Duration(10)
    retry_max: Duration = Duration(300)  # beyond SPEC §3: the cap of the retry backoff (README)
    # ccf: agent credentials
    client_id: str | None = None
    client_secret_file: str | None = None
    # nats
    subject: str = DEFAULT_NATS_SUBJECT
    user: str | None = None
    password_file: str | None = None
    allow_plain: bool = False

    @property
    def urls(self) -> list[str]:
        return [] if self.url is None else [self.url] if isinstance(self.url, str) else list(self.url)

    def secret_files(self) -> list[tuple[str, str]]:
        """(key, path) of each secret file this sink reads: owner-only, checked before `run` starts."""
        keys = ("token_file", "client_secret_file", "password_file")
        return [(k, getattr(self, k)) for k in keys if getattr(self, k)]


class Publisher(Strict):
    outbox_max: Size = Size(1 << 30)
    memory_max: Size = Size(64 << 20)  # results waiting in memory while the outbox cannot be written
    batch_max: Annotated[int, msgspec.Meta(ge=1)] = 500
    flush_interval: Duration = Duration(1)
    sink: list[Sink] = []


class Config(Strict):
    state_dir: str = "/var/lib/assessment-runtime"
    run_dir: str = "/run/assessment-runtime"
    runtime_uuid: str | None = None
    plugin_dirs: list[str] = msgspec.field(
        default_factory=lambda: ["/usr/lib/assessment-runtime/plugins", "/var/lib/assessment-runtime/plugins"])
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    configuration: ConfigurationSource | None = None
    specs: SpecsSource | None = None
    jobs: Jobs = msgspec.field(default_factory=Jobs)
    plugin_store: PluginStore = msgspec.field(default_factory=PluginStore)
    publisher: Publisher = msgspec.field(default_factory=Publisher)


def config_path(arg: str | None) -> str:
    return arg or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def load_config(path: str) -> Config:
    """Read, parse and check the config file. Relative paths in it are taken from its folder."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        config = msgspec.convert(raw, Config, dec_hook=dec_hook)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: {_key_path(validation_reason(e))}") from None
    base = os.path.dirname(os.path.abspath(path))
    config = _absolute_paths(config, base)
    _check(config, path)
    return config


def _key_path(reason: str) -> str:
    """'$.jobs.stop_grace: ...' -> 'key jobs.stop_grace: ...' (TOML readers think in keys)."""
    if reason.startswith("$: "):
        return reason[3:]
    if reason.startswith("$."):
        key, _, rest = reason[2:].partition(": ")
        return f"key {key}: {rest}"
    return reason


def _absolute_paths(config: Config, base: str) -> Config:
    def fix(p: str | None) -> str | None:
        return None if p is None else os.path.normpath(os.path.join(base, p))

    sinks = [msgspec.structs.replace(s, path=fix(s.path), token_file=fix(s.token_file), ca_file=fix(s.ca_file),
                                     client_secret_file=fix(s.client_secret_file),
                                     password_file=fix(s.password_file))
             for s in config.publisher.sink]
    configuration = config.configuration and msgspec.structs.replace(
        config.configuration, token_file=fix(config.configuration.token_file), ca_file=fix(config.configuration.ca_file))
    return msgspec.structs.replace(
        config,
        state_dir=fix(config.state_dir),
        run_dir=fix(config.run_dir),
        plugin_dirs=[fix(d) for d in config.plugin_dirs],
        plugin_store=msgspec.structs.replace(config.plugin_store, ca_file=fix(config.plugin_store.ca_file)),
        specs=config.specs and SpecsSource(dir=fix(config.specs.dir)),
        configuration=configuration,
        publisher=msgspec.structs.replace(config.publisher, sink=sinks),
    )


def _check(config: Config, path: str) -> None:
    if config.configuration is None and config.specs is None:
        raise ConfigError(f"{path}: no spec source: set [configuration] or [specs]")
    if not config.publisher.sink:
        raise ConfigError(f"{path}: no sink: add at least one [[publisher.sink]]")
    names = set()
    for i, sink in enumerate(config.publisher.sink):
        where = f"{path}: key publisher.sink[{i}]"
        if sink.name in names:
            raise ConfigError(f"{where}.name: duplicate sink name {sink.name!r}")
        names.add(sink.name)
        _check_sink(sink, where, f"publisher.sink[{i}]")
    if config.configuration is not None:
        _check_url(config.configuration.url, config.configuration.allow_http, f"{path}: key configuration.url")
    positive = [("jobs.resync_interval", config.jobs.resync_interval), ("jobs.default_timeout", config.jobs.default_timeout),
                ("publisher.flush_interval", config.publisher.flush_interval)]
    positive += [(f"jobs.default_limits.{k}", getattr(config.jobs.default_limits, k))
                 for k in ("memory", "cpu_time", "output")]
    if config.configuration is not None:
        positive += [("configuration.sync_interval", config.configuration.sync_interval),
                     ("configuration.timeout", config.configuration.timeout)]
    positive += [(f"publisher.sink[{i}].timeout", s.timeout) for i, s in enumerate(config.publisher.sink)]
    positive += [(f"publisher.sink[{i}].retry_max", s.retry_max) for i, s in enumerate(config.publisher.sink)]
    for key, value in positive:
        if value is not None and value <= 0:
            raise ConfigError(f"{path}: key {key}: must be greater than 0")
    _check_isolation(config.jobs, path)
    if config.runtime_uuid is not None:
        try:
            uuidlib.UUID(config.runtime_uuid)
        except ValueError:
            raise ConfigError(f"{path}: key runtime_uuid: not a UUID: {config.runtime_uuid!r}") from None


# SPEC §6: the only capabilities a plugin may be given (by number, as the kernel counts them)
GRANTABLE_CAPABILITIES = {"CAP_DAC_READ_SEARCH": 2, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
                          "CAP_SYS_PTRACE": 19, "CAP_AUDIT_READ": 37}
ID_MAX = 2**31 - 2  # uids above this are not usable everywhere (and 2**32-1 is "none")


def _check_isolation(jobs: Jobs, path: str) -> None:
    import re

    m = re.fullmatch(r"(\d{1,10})-(\d{1,10})", jobs.uid_range)
    if not m or not 1000 <= int(m.group(1)) <= int(m.group(2)) <= ID_MAX:
        raise ConfigError(f"{path}: key jobs.uid_range: expected FIRST-LAST with 1000 <= FIRST <= LAST <= {ID_MAX} "
                          f"(like systemd's DynamicUser range 61184-65519), got {jobs.uid_range!r}")
    for plugin, paths in jobs.plugin_write_paths.items():
        for i, p in enumerate(paths):
            if not os.path.isabs(p) or ":" in p or "\n" in p or os.path.normpath(p) == "/":
                raise ConfigError(f"{path}: key jobs.plugin_write_paths.{plugin}[{i}]: an absolute path other than / "
                                  f"without ':' is needed, got {p!r}")
    for plugin, caps in jobs.plugin_capabilities.items():
        for i, cap in enumerate(caps):
            if cap not in GRANTABLE_CAPABILITIES:
                raise ConfigError(f"{path}: key jobs.plugin_capabilities.{plugin}[{i}]: {cap!r} cannot be granted; "
                                  f"only {', '.join(sorted(GRANTABLE_CAPABILITIES))}")


def _check_sink(sink: Sink, where: str, key: str) -> None:
    """What each kind of sink needs; `where` is "FILE: key publisher.sink[i]", `key` the last part."""
    defaults = Sink(name="x", kind=sink.kind)
    only = {"nats": ("subject", "user", "password_file", "allow_plain"), "ccf": ("client_id", "client_secret_file")}
    for kind, keys in only.items():
        for k in keys:
            if sink.kind != kind and getattr(sink, k) != getattr(defaults, k):
                raise ConfigError(f"{where}.{k}: only for a {kind} sink")
    if sink.kind == "file":
        if not sink.path:
            raise ConfigError(f"{where}.path: required for a file sink")
        return
    if not sink.url:
        raise ConfigError(f"{where}.url: required for {'an' if sink.kind == 'http' else 'a'} {sink.kind} sink")
    if sink.kind in ("http", "ccf"):
        if not isinstance(sink.url, str):
            raise ConfigError(f"{where}.url: one URL for {'an' if sink.kind == 'http' else 'a'} {sink.kind} sink, "
                              f"not a list")
        _check_url(sink.url, sink.allow_http, f"{where}.url")
    if sink.kind == "ccf":
        if (sink.client_id is None) != (sink.client_secret_file is None):
            missing = "client_secret_file" if sink.client_secret_file is None else "client_id"
            raise ConfigError(f"{where}.{missing}: client_id and client_secret_file go together")
        if sink.client_id is not None and (not sink.client_id or ":" in sink.client_id
                                           or not sink.client_id.isprintable()):
            raise ConfigError(f"{where}.client_id: not a usable client id (empty, or holds ':' or control "
                              f"characters): {sink.client_id!r}")
        if sink.client_id and sink.token_file:
            raise ConfigError(f"{where}.token_file: set either token_file or client_id, not both")
    if sink.kind == "nats":
        for i, url in enumerate(sink.urls):
            _check_nats_url(url, sink.allow_plain, f"{where}.url" + (f"[{i}]" if isinstance(sink.url, list) else ""),
                            f"{key}.allow_plain")
        if sink.token_file and (sink.user or sink.password_file):
            raise ConfigError(f"{where}.token_file: set either token_file or user and password_file, not both")
        if (sink.user is None) != (sink.password_file is None):
            missing = "password_file" if sink.password_file is None else "user"
            raise ConfigError(f"{where}.{missing}: user and password_file go together")
        _check_nats_subject(sink.subject, f"{where}.subject")


def _check_nats_url(url: str, allow_plain: bool, where: str, plain_key: str) -> None:
    import urllib.parse

    scheme, _, rest = url.partition("://")
    if scheme not in ("nats", "tls") or not rest:
        raise ConfigError(f"{where}: expected tls://host:port (or nats://host:port), got {url!r}")
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port
    except ValueError as e:
        raise ConfigError(f"{where}: {e}: {url!r}") from None
    if not parsed.hostname or parsed.path not in ("", "/") or parsed.query or parsed.username:
        raise ConfigError(f"{where}: expected tls://host:port (credentials go in token_file or user and "
                          f"password_file), got {url!r}")
    if scheme == "nats" and not allow_plain:
        raise ConfigError(f"{where}: nats:// (no TLS) is refused unless {plain_key} = true: {url}")


def _check_nats_subject(subject: str, where: str) -> None:
    try:
        filled = subject.format(**{k: "x" for k in NATS_SUBJECT_FIELDS})
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where}: {subject!r}: only {{runtime_uuid}}, {{job_uuid}} and {{status}} can be "
                          f"filled in ({type(e).__name__}: {e})") from None
    tokens = filled.split(".")
    if not filled or any(not t or t in ("*", ">") or any(c.isspace() or c in "*>" for c in t) for t in tokens):
        raise ConfigError(f"{where}: {subject!r} is not a NATS subject to publish to (dot-separated tokens, "
                          f"no spaces or wildcards)")


def _check_url(url: str, allow_http: bool, where: str) -> None:
    if url.startswith("https://"):
        return
    if url.startswith("http://"):
        if not allow_http:
            raise ConfigError(f"{where}: plain http is refused unless allow_http = true: {url}")
        return
    raise ConfigError(f"{where}: expected an https:// URL, got {url!r}")


def check_token_file(path: str, key: str) -> str:
    """Read a secret (a token, a password) from a file that only its owner can read, surrounding
    whitespace stripped; ConfigError otherwise."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise ConfigError(f"key {key}: {path} is readable or writable by group or others "
                              f"(mode {st.st_mode & 0o777:o}); chmod 600 it")
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(f"key {key}: cannot read {path}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"key {key}: {path} is empty")
    return token


def check_sink_files(config: Config, path: str) -> None:
    """What `run` checks before it starts (not every command: `status` may run as a user
    who cannot read the secrets): each sink's secret files (owner-only, not empty; a token
    holds only visible ASCII) and ca_file (loads as CA certificates). ConfigError names the
    file and the key."""
    import re
    import ssl

    for i, sink in enumerate(config.publisher.sink):
        key = f"publisher.sink[{i}]"
        for name, secret_file in sink.secret_files():
            try:
                secret = check_token_file(secret_file, f"{key}.{name}")
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
            if name == "token_file" and not re.fullmatch(r"[\x21-\x7e]+", secret):
                raise ConfigError(f"{path}: key {key}.{name}: {secret_file} holds characters a bearer "
                                  f"token cannot have (only visible ASCII, no spaces)")
        if sink.ca_file and any(u.startswith(("https://", "tls://")) for u in sink.urls):
            try:
                ssl.create_default_context(cafile=sink.ca_file)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"{path}: key {key}.ca_file: cannot load {sink.ca_file}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None


def load_runtime_uuid(config: Config) -> str:
    """runtime_uuid from config, else generated once and kept in state_dir/runtime_uuid."""
    if config.runtime_uuid:
        return config.runtime_uuid
    path = os.path.join(config.state_dir, "runtime_uuid")
    try:
        with open(path, "rb") as f:
            return str(uuidlib.UUID(f.read().decode("ascii").strip()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        # Nothing else holds the identity for sure: a new one, and the old file kept for an operator.
        log.error("unreadable %s (%s): %s; this runtime gets a new uuid", path, e, set_aside(path, config.state_dir))
    value = str(uuidlib.uuid4())
    save_runtime_uuid(config, value)
    return value


def save_runtime_uuid(config: Config, value: str) -> bool:
    """Keep a generated runtime_uuid in state_dir; False (logged) when that cannot be written
    now (a full or read-only state_dir): the service keeps it in memory and tries again."""
    try:
        write_atomic(os.path.join(config.state_dir, "runtime_uuid"), value.encode() + b"\n")
        return True
    except OSError as e:
        log.error(
            "cannot write %s/runtime_uuid: %s; using %s from memory until it can be written (a restart "
            "before then gets a new one)", config.state_dir, e, value)
        return False
