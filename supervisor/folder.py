"""The local folder source (`[specs] dir`): spec files (*.json, *.toml), and its watcher.

A file may hold one spec, a JSON array of specs, or TOML `[[job]]` tables. Each spec is
validated alone; a problem names the file and the field. The folder is read whole every
time (level-triggered): the watcher only says "look again".
"""

from __future__ import annotations

import json
import logging
import os
import threading
import tomllib
from collections.abc import Callable
from typing import Any

from supervisor.spec import Spec, SpecError, parse_spec
from supervisor.store import Rejection

log = logging.getLogger(__name__)

SPEC_SUFFIXES = (".json", ".toml")


def spec_files(folder: str) -> list[str]:
    """The spec files of a folder, sorted; hidden and editor backup files are skipped."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or name.endswith("~") or not name.endswith(SPEC_SUFFIXES):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            out.append(path)
    return out


def read_spec_file(path: str) -> tuple[list[Spec], list[Rejection]]:
    """Every spec in one file, each validated alone."""
    source = f"dir:{path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".toml"):
            doc: Any = tomllib.loads(data.decode("utf-8"))
            if set(doc) == {"job"} and isinstance(doc["job"], list):
                items = [(f"$.job[{i}]", obj) for i, obj in enumerate(doc["job"])]
            else:
                items = [("$", doc)]
        else:
            doc = json.loads(data)
            items = [(f"$[{i}]", obj) for i, obj in enumerate(doc)] if isinstance(doc, list) else [("$", doc)]
    except OSError as e:
        return [], [Rejection(uuid=None, source=source, reason=f"{path}: cannot read: {e.strerror}")]
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        return [], [Rejection(uuid=None, source=source, reason=f"{path}: does not parse: {e}")]
    specs, rejected = [], []
    for where, obj in items:
        try:
            specs.append(parse_spec(obj, source, where))
        except SpecError as e:
            rejected.append(Rejection(uuid=e.uuid, source=source, reason=f"{path}: {e.reason}"))
    return specs, rejected


def read_specs_folder(folder: str) -> tuple[dict[str, Spec], list[Rejection]]:
    """All specs of the folder by uuid. A uuid defined twice in it is rejected in both places."""
    by_uuid: dict[str, list[Spec]] = {}
    rejected: list[Rejection] = []
    for path in spec_files(folder):
        specs, problems = read_spec_file(path)
        rejected += problems
        for spec in specs:
            by_uuid.setdefault(spec.job.uuid, []).append(spec)
    out = {}
    for uuid, specs in by_uuid.items():
        if len(specs) == 1:
            out[uuid] = specs[0]
            continue
        places = " and ".join(s.source.removeprefix("dir:") for s in specs)
        for spec in specs:
            rejected.append(Rejection(uuid=uuid, source=spec.source, reason=f"uuid {uuid} is defined twice: in {places}"))
    return out, rejected


class FolderWatcher:
    """A thread that calls `notify()` soon after anything in the folder changes.

    watchfiles runs its own Rust threads; that is why runners are forked by the zygote and
    never by this (threaded) process.
    """

    def __init__(self, folder: str, notify: Callable[[], None], retry_interval: float):
        self.folder = folder
        self.notify = notify
        self.retry_interval = retry_interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="folder-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=2)

    def _loop(self) -> None:
        import watchfiles

        while not self.stop_event.is_set():
            try:
                for _changes in watchfiles.watch(self.folder, debounce=150, step=50, stop_event=self.stop_event,
                                                 raise_interrupt=False, recursive=False):
                    self.notify()
            except Exception as e:  # noqa: BLE001 - e.g. the folder does not exist (yet)
                log.warning("cannot watch %s (%s); re-reading it every %gs instead", self.folder, e,
                            self.retry_interval)
                self.notify()
                self.stop_event.wait(self.retry_interval)
