"""Plugins given by `plugin.url` (SPEC §6): downloaded only when plugin_store.allow_download
is on and the spec pins a sha256; stored under `state_dir/plugins/{name}/{version}/` with a
generated plugin.toml, atomically, and verified before they are ever used.

One background thread downloads, one plugin at a time, so a slow server never blocks the
supervisor's loop. The folder it writes is a plugin dir that runners of url specs search
last; until a download succeeds their runs end in an `error` result whose reason carries the
last download error (kept in `state_dir/plugins/.errors/{name}@{version}`). Failed downloads
are retried with exponential backoff and full jitter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import threading
import time

from supervisor.config import PluginStore
from supervisor.files import fsync_dir, remove_durably, write_atomic
from supervisor.spec import Spec

log = logging.getLogger(__name__)

BACKOFF_MIN, BACKOFF_MAX = 5.0, 3600.0
_CHUNK = 1 << 16


def downloads_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "plugins")


def error_file(state_dir: str, name: str, version: str) -> str:
    return os.path.join(downloads_dir(state_dir), ".errors", f"{name}@{version}")


class DownloadError(Exception):
    pass


class Downloader:
    def __init__(self, state_dir: str, settings: PluginStore):
        self.root = downloads_dir(state_dir)
        self.state_dir = state_dir
        self.settings = settings
        self.wanted: dict[tuple[str, str], tuple[str, str]] = {}  # (name, version) -> (url, sha256)
        self.retry_at: dict[tuple[str, str], float] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="plugin-downloads", daemon=True)
        self._http = None

    def start(self) -> None:
        os.makedirs(os.path.join(self.root, ".errors"), mode=0o755, exist_ok=True)
        os.chmod(self.root, 0o755)  # runners check trust up to here: root-owned, not writable by others
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self.thread.join(timeout=self.settings.timeout + 2)

    def want(self, specs: dict[str, Spec]) -> None:
        """Level-triggered: the set of url plugins the current specs need (main thread)."""
        wanted = {}
        for spec in specs.values():
            p = spec.job.plugin
            if p.url and p.sha256:
                wanted[(p.name, p.version)] = (p.url, p.sha256.lower())
        with self.lock:
            changed = wanted != self.wanted
            self.wanted = wanted
        if changed:
            self.wake.set()

    # -- the thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            now = time.monotonic()
            with self.lock:
                todo = [(k, v) for k, v in self.wanted.items()
                        if self.retry_at.get(k, 0) <= now and not self._present(k, v[1])]
            for (name, version), (url, sha256) in todo:
                if self.stop_event.is_set():
                    return
                self._attempt(name, version, url, sha256)
            with self.lock:
                next_retry = min((t for k, t in self.retry_at.items() if k in self.wanted), default=None)
            self.wake.wait(timeout=60.0 if next_retry is None else max(0.5, next_retry - time.monotonic()))
            self.wake.clear()

    def _present(self, key: tuple[str, str], sha256: str) -> bool:
        name, version = key
        path = os.path.join(self.root, name, version, name)
        try:
            with open(path + ".sha256", encoding="ascii") as f:
                return f.read().strip() == sha256 and os.path.isfile(path)
        except OSError:
            return False

    def _attempt(self, name: str, version: str, url: str, sha256: str) -> None:
        key = (name, version)
        try:
            self.fetch(name, version, url, sha256)
        except (DownloadError, OSError) as e:
            n = self.failures.get(key, 0) + 1
            self.failures[key] = n
            delay = random.uniform(BACKOFF_MIN, max(BACKOFF_MIN, min(BACKOFF_MAX, BACKOFF_MIN * 2 ** n)))
            self.retry_at[key] = time.monotonic() + delay
            message = f"download of {url} failed: {e}; retry {n} in {delay:.0f}s"
            log.error("plugin %s@%s: %s", name, version, message)
            try:
                write_atomic(error_file(self.state_dir, name, version), message.encode(), mode=0o644)
            except OSError:
                pass
            return
        self.failures.pop(key, None)
        self.retry_at.pop(key, None)
        remove_durably(error_file(self.state_dir, name, version))
        log.info("plugin %s@%s downloaded from %s (sha256 %s)", name, version, url, sha256)

    def fetch(self, name: str, version: str, url: str, sha256: str) -> None:
        """Download to a temp folder, verify size and digest, then rename it into place."""
        if url.startswith("http://") and not self.settings.allow_http:
            raise DownloadError("plain http is refused (plugin_store.allow_http = false)")
        if not url.startswith(("https://", "http://")):
            raise DownloadError("not an http(s) URL")
        folder = os.path.join(self.root, name)
        os.makedirs(folder, mode=0o755, exist_ok=True)
        tmp = os.path.join(folder, f".{version}.tmp.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o755)
        try:
            digest = self._download(url, os.path.join(tmp, name))
            if digest != sha256:
                raise DownloadError(f"sha256 mismatch: expected {sha256}, got {digest}")
            with open(os.path.join(tmp, "plugin.toml"), "w", encoding="utf-8") as f:
                f.write(f'name = "{name}"\nversion = "{version}"\nentrypoint = "{name}"\n'
                        f'protocol = "assessment/1"\ndescription = "downloaded from {_toml_escape(url)}"\n')
            with open(os.path.join(tmp, f"{name}.sha256"), "w", encoding="ascii") as f:
                f.write(digest + "\n")
            for entry in os.listdir(tmp):
                fd = os.open(os.path.join(tmp, entry), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            final = os.path.join(folder, version)
            if os.path.exists(final):
                old = f"{final}.old.{os.getpid()}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            fsync_dir(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, url: str, path: str) -> str:
        import urllib3

        if self._http is None:
            self._http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=self.settings.ca_file)
        timeout = urllib3.Timeout(connect=self.settings.timeout, read=self.settings.timeout)
        try:
            resp = self._http.request("GET", url, preload_content=False, timeout=timeout, retries=False,
                                      redirect=False)
        except urllib3.exceptions.HTTPError as e:
            raise DownloadError(str(e)) from None
        try:
            if resp.status != 200:
                raise DownloadError(f"HTTP {resp.status}")
            length = resp.headers.get("Content-Length")
            cap = self.settings.max_size
            if length is not None and length.isdigit() and int(length) > cap:
                raise DownloadError(f"too large: {length} bytes, over plugin_store.max_size ({cap})")
            h = hashlib.sha256()
            size = 0
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
            try:
                for chunk in resp.stream(_CHUNK):
                    size += len(chunk)
                    if size > cap:
                        raise DownloadError(f"too large: over plugin_store.max_size ({cap} bytes)")
                    h.update(chunk)
                    os.write(fd, chunk)
            except urllib3.exceptions.HTTPError as e:
                raise DownloadError(str(e)) from None
            finally:
                os.close(fd)
            os.chmod(path, 0o755)
            return h.hexdigest()
        finally:
            resp.release_conn()


def _toml_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
