"""Finding and trusting plugins (SPEC §6).

A plugin lives at `{plugin_dir}/{name}/{version}/` with a `plugin.toml` naming its entrypoint.
The first plugin_dir holding `{name}/{version}/plugin.toml` wins.

`PluginResolver.resolve()` is called by a runner before every run, so the common case costs a
handful of stat calls: the manifest is re-read only when its stat changes and the digest is
recomputed only when the file's (dev, ino, size, mtime_ns, ctime_ns) changes. Trust is checked on
every call: the entrypoint, its manifest, and every folder from the entrypoint up to and including
the plugin_dir must be owned by an allowed uid (root, the service user) and must not be writable
by group or others. The entrypoint and the `{name}` and `{version}` folders must not be symlinks
(so nothing can point the runtime at a file outside the plugin_dir); the plugin_dir itself is the
operator's choice and may be one. Folders above the plugin_dir are not checked.

This module is imported by every runner process: it imports only os, stat, hashlib, tomllib and
msgspec.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from typing import Literal

import msgspec

MANIFEST = "plugin.toml"
MANIFEST_MAX = 64 << 10  # a manifest is a few lines; refuse to read megabytes
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# Hashing reads into one small buffer, reused: 1 MiB reads left every runner 0.7 MB bigger (after
# freeing one, glibc keeps blocks that large on its heap instead of unmapping them).
_CHUNK = 64 << 10


class PluginError(Exception):
    """The plugin cannot be run; `reason` goes into the run's `error` result."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Manifest(msgspec.Struct):
    """plugin.toml. Unknown keys are ignored (room for later fields)."""

    name: str
    version: str
    entrypoint: str
    protocol: Literal["assessment/1", "nagios"]
    description: str = ""
    network: bool = False  # true: TCP bind and connect are allowed under confinement (SPEC §6)


class ResolvedPlugin(msgspec.Struct):
    path: str  # absolute path of the entrypoint: what is executed
    folder: str  # {plugin_dir}/{name}/{version}
    plugin_dir: str
    manifest: Manifest
    # the entrypoint's lstat at the time of the check
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    uid: int
    mode: int



def valid_name(s: object) -> bool:
    """^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$ without importing re."""
    return (isinstance(s, str) and 0 < len(s) <= 128 and s[0] in _ALNUM
            and all(c in _NAME_CHARS for c in s))


def _valid_entrypoint(s: str) -> bool:
    return bool(s) and s not in (".", "..") and "/" not in s and "\0" not in s and s != MANIFEST


def _validation_reason(err: msgspec.ValidationError) -> str:
    """msgspec says "Expected `str`, got `int` - at `$.name`"; we say "$.name: Expected ..."."""
    text = str(err)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return f"$: {text}"
    return f"${where.rstrip('`')[1:]}: {message}"


def _file_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _keys(sts: tuple[os.stat_result, ...]) -> tuple:
    """What the trust checks depend on, for each level they looked at."""
    return tuple((st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                 for st in sts)


def _check_trust(path: str, st: os.stat_result, allowed_uids: frozenset[int]) -> None:
    if st.st_uid not in allowed_uids:
        raise PluginError(f"untrusted plugin: {path} is owned by uid {st.st_uid}")
    if st.st_mode & stat.S_IWOTH:
        raise PluginError(f"untrusted plugin: {path} is writable by others")
    if st.st_mode & stat.S_IWGRP:
        raise PluginError(f"untrusted plugin: {path} is writable by group")


class PluginResolver:
    """Finds `name@version` in plugin_dirs and checks it can be trusted, before every run."""

    def __init__(self, plugin_dirs: list[str], name: str, version: str, allowed_uids: frozenset[int],
                 pin_sha256: str | None, require_sha256: bool):
        self.plugin_dirs = [os.path.abspath(d) for d in plugin_dirs]
        self.name = name
        self.version = version
        self.allowed_uids = frozenset(allowed_uids)
        self.pin_sha256 = pin_sha256.lower() if pin_sha256 else None
        self.require_sha256 = require_sha256
        self.hash_count = 0  # how many times a file was read to compute its digest
        self.manifest_reads = 0  # how many times a plugin.toml was read and parsed
        self._manifest_cache: tuple[str, tuple, Manifest | PluginError] | None = None
        self._digest_cache: tuple[str, tuple, str] | None = None
        self._names_ok = valid_name(name) and valid_name(version)
        # (plugin_dir, {name}/{version} folder, {name} folder, plugin.toml) for each plugin_dir,
        # joined once: os.path's functions are frozen modules whose objects live in
        # libpython's data, so calling them every run costs each runner private pages there
        self._places = [(d, os.path.join(d, name, version), os.path.join(d, name),
                         os.path.join(d, name, version, MANIFEST)) for d in self.plugin_dirs]
        # the last resolution that passed, and the stat of every file and folder it checked
        self._last: tuple[tuple, ResolvedPlugin, str] | None = None

    @property
    def identity(self) -> tuple:
        """What the checks of a resolution depend on besides the files: resolvers alike in it
        may share what they checked (learn_from)."""
        return (tuple(self.plugin_dirs), self.name, self.version, self.allowed_uids, self.pin_sha256,
                self.require_sha256)

    def learn_from(self, other: "PluginResolver") -> None:
        """Start from what a resolver alike checked last (the zygote checks ahead for many
        runners of one plugin): resolve() still stats every level again, and trusts that only
        if nothing changed, as between two runs."""
        if other.identity == self.identity:
            self._last, self._manifest_cache = other._last, other._manifest_cache
            self._digest_cache = other._digest_cache

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    # -- the checks ----------------------------------------------------------------------

    def resolve(self, hash_max: int | None = None) -> tuple[ResolvedPlugin, str]:
        """(plugin, sha256 hex of the file that will run), or PluginError with the reason.
        `hash_max`: a larger entrypoint is refused (the zygote checks ahead only what it hashes
        quickly)."""
        if self.pin_sha256 is None and self.require_sha256:
            raise PluginError("sha256 required: the spec has no plugin.sha256 and jobs.require_sha256 is true")
        if not self._names_ok:
            raise PluginError(f"invalid plugin name or version: {self.name!r}@{self.version!r}")
        plugin_dir, folder, name_dir, manifest_st = self._find()
        last = self._last
        if last is not None and last[1].folder == folder:
            # Every level is looked at again, every run; when nothing changed (inode, mode,
            # owner, size, times, ctime included) the checks that passed last time still pass.
            try:
                sts = (manifest_st, os.lstat(folder), os.lstat(name_dir), os.stat(plugin_dir),
                       os.lstat(last[1].path))
            except OSError:
                sts = None
            if sts is not None and _keys(sts) == last[0]:
                return last[1], last[2]
        folder_sts = self._check_folders(plugin_dir, folder)
        manifest_path = os.path.join(folder, MANIFEST)
        manifest = self._manifest(manifest_path, manifest_st)
        path = os.path.join(folder, manifest.entrypoint)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise PluginError(f"plugin entrypoint not found: {path}") from None
        except OSError as e:
            raise PluginError(f"cannot stat plugin entrypoint {path}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise PluginError(f"untrusted plugin: {path} is a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise PluginError(f"untrusted plugin: {path} is not a regular file")
        _check_trust(path, st, self.allowed_uids)
        if not st.st_mode & 0o111:
            raise PluginError(f"plugin not executable: {path} (mode {stat.S_IMODE(st.st_mode):04o})")
        if hash_max is not None and st.st_size > hash_max:
            raise PluginError(f"{path}: {st.st_size} bytes, more than are hashed ahead")
        digest = self._digest(path, st)
        if self.pin_sha256 is not None and digest != self.pin_sha256:
            raise PluginError(f"sha256 mismatch: {path}: expected {self.pin_sha256} got {digest}")
        resolved = ResolvedPlugin(
            path=path, folder=folder, plugin_dir=plugin_dir, manifest=manifest,
            dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns, uid=st.st_uid, mode=st.st_mode)
        self._last = (_keys((manifest_st, *folder_sts, st)), resolved, digest)  # exactly what was checked
        return resolved, digest

    def _find(self) -> tuple[str, str, str, os.stat_result]:
        """The first plugin_dir holding {name}/{version}/plugin.toml: it, that folder, the {name}
        folder and the manifest's lstat."""
        for plugin_dir, folder, name_dir, manifest in self._places:
            try:
                st = os.lstat(manifest)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise PluginError(f"cannot read {manifest}: {e.strerror}") from None
            return plugin_dir, folder, name_dir, st
        raise PluginError(f"plugin not found: {self.label} in {', '.join(self.plugin_dirs) or '(no plugin_dirs)'}")

    def _check_folders(self, plugin_dir: str, folder: str) -> tuple[os.stat_result, ...]:
        """{version} and {name} (real folders, not symlinks), then the plugin_dir itself;
        returns what was checked of each."""
        name_dir = os.path.dirname(folder)
        checked = []
        for path in (folder, name_dir):
            try:
                st = os.lstat(path)
            except OSError as e:
                raise PluginError(f"cannot stat {path}: {e.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise PluginError(f"untrusted plugin: {path} is a symlink")
            _check_trust(path, st, self.allowed_uids)
            checked.append(st)
        try:
            st = os.stat(plugin_dir)
        except OSError as e:
            raise PluginError(f"cannot stat {plugin_dir}: {e.strerror}") from None
        _check_trust(plugin_dir, st, self.allowed_uids)
        return (*checked, st)

    def _manifest(self, path: str, st: os.stat_result) -> Manifest:
        if stat.S_ISLNK(st.st_mode):
            raise PluginError(f"untrusted plugin: {path} is a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise PluginError(f"invalid plugin.toml: {path}: not a regular file")
        _check_trust(path, st, self.allowed_uids)
        key = _file_key(st)
        cached = self._manifest_cache
        if cached is None or cached[0] != path or cached[1] != key:
            try:
                result: Manifest | PluginError = self._read_manifest(path, key)
            except PluginError as e:
                result = e
            cached = self._manifest_cache = (path, key, result)
        result = cached[2]
        if isinstance(result, PluginError):
            raise PluginError(result.reason)
        return result

    def _read_manifest(self, path: str, key: tuple) -> Manifest:
        self.manifest_reads += 1
        data = _read_small(path, key)
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise PluginError(f"invalid plugin.toml: {path}: not UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise PluginError(f"invalid plugin.toml: {path}: invalid TOML: {e}") from None
        try:
            manifest = msgspec.convert(raw, Manifest)
        except msgspec.ValidationError as e:
            why = _validation_reason(e)
            if why.startswith("$.protocol: "):
                why += ' (expected "assessment/1" or "nagios")'
            raise PluginError(f"invalid plugin.toml: {path}: {why}") from None
        if manifest.name != self.name:
            raise PluginError(f"invalid plugin.toml: {path}: $.name: {manifest.name!r} "
                              f"is not the folder name {self.name!r}")
        if manifest.version != self.version:
            raise PluginError(f"invalid plugin.toml: {path}: $.version: {manifest.version!r} "
                              f"is not the folder name {self.version!r}")
        if not _valid_entrypoint(manifest.entrypoint):
            raise PluginError(f"invalid plugin.toml: {path}: $.entrypoint: must be a file name in the "
                              f"plugin's folder, got {manifest.entrypoint!r}")
        return manifest

    def _digest(self, path: str, st: os.stat_result) -> str:
        key = _file_key(st)
        cached = self._digest_cache
        if cached is not None and cached[0] == path and cached[1] == key:
            return cached[2]
        digest = self.hash_file(path, key)
        self._digest_cache = (path, key, digest)
        return digest

    def hash_file(self, path: str, key: tuple) -> str:
        """sha256 of the file at `path`, refusing it unless it is still the file that was checked."""
        self.hash_count += 1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise PluginError(f"cannot read plugin {path}: {e.strerror}") from None
        try:
            if _file_key(os.fstat(fd)) != key:
                raise PluginError(f"plugin changed while being checked: {path}")
            h = hashlib.sha256()
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := os.readv(fd, [buf]):
                h.update(view[:n])
            if _file_key(os.fstat(fd)) != key:
                raise PluginError(f"plugin changed while being checked: {path}")
        except OSError as e:
            raise PluginError(f"cannot read plugin {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        return h.hexdigest()


def _read_small(path: str, key: tuple) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise PluginError(f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if _file_key(st) != key:
            raise PluginError(f"plugin changed while being checked: {path}")
        if st.st_size > MANIFEST_MAX:
            raise PluginError(f"invalid plugin.toml: {path}: larger than {MANIFEST_MAX} bytes")
        chunks = []
        while chunk := os.read(fd, MANIFEST_MAX + 1 - sum(map(len, chunks))):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise PluginError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def list_plugins(plugin_dirs: list[str], allowed_uids: frozenset[int] | None = None) -> list[dict]:
    """Every {dir}/{name}/{version}/plugin.toml in plugin_dirs, in search order.

    Each item: name, version, protocol, sha256 (of the entrypoint; None on error), error (None
    or the reason the plugin would be refused), path (the entrypoint, or the manifest when that
    is unreadable), description. Trust is judged for root and the current user unless
    `allowed_uids` says otherwise. A name@version found in an earlier dir shadows later ones;
    both are listed.
    """
    if allowed_uids is None:
        allowed_uids = frozenset({0, os.geteuid()})
    found: list[dict] = []
    for plugin_dir in plugin_dirs:
        plugin_dir = os.path.abspath(plugin_dir)
        for name in _sorted_entries(plugin_dir):
            for version in _sorted_entries(os.path.join(plugin_dir, name)):
                folder = os.path.join(plugin_dir, name, version)
                manifest_path = os.path.join(folder, MANIFEST)
                if not os.path.lexists(manifest_path):
                    continue
                item = {"name": name, "version": version, "protocol": None, "sha256": None, "error": None,
                        "path": manifest_path, "description": "", "network": False}
                if not (valid_name(name) and valid_name(version)):
                    item["error"] = "invalid plugin name or version: folder names must match " \
                                    "^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
                    found.append(item)
                    continue
                resolver = PluginResolver([plugin_dir], name, version, allowed_uids, None, False)
                try:
                    plugin, digest = resolver.resolve()
                    item.update(protocol=plugin.manifest.protocol, sha256=digest, path=plugin.path,
                                description=plugin.manifest.description, network=plugin.manifest.network)
                except PluginError as e:
                    item["error"] = e.reason
                    manifest = _peek_manifest(manifest_path)
                    if manifest is not None:
                        item.update(protocol=manifest.get("protocol"),
                                    description=manifest.get("description") or "",
                                    network=manifest.get("network") is True)
                        if isinstance(manifest.get("entrypoint"), str) \
                                and _valid_entrypoint(manifest["entrypoint"]):
                            item["path"] = os.path.join(folder, manifest["entrypoint"])
                found.append(item)
    return found


def _sorted_entries(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    except OSError:
        return []


def _peek_manifest(path: str) -> dict | None:
    """Best effort, for listing a plugin that failed its checks: what its manifest says."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with open(path, "rb") as f:
            raw = tomllib.loads(f.read(MANIFEST_MAX).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    return {k: v for k, v in raw.items() if k in ("protocol", "description", "entrypoint") and isinstance(v, str)}
