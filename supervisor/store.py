"""The on-disk spec store: the last good specs of every source, kept under state_dir.

Layout: `specs/<source>/<uuid>.json` (each `{"source": ..., "spec": {...}}`) and
`specs/<source>/revision` (the Configuration service's opaque revision). Every write is
atomic; specs are written before the revision, so a crash never leaves a revision that
claims more than the store holds. A file that does not load is moved to `quarantine/` and
reported; it is never fatal. After a restart the stored specs run before any source answers.
"""

from __future__ import annotations

import logging
import os
import time

import msgspec

from supervisor.files import fsync_dir, remove_durably, write_atomic
from supervisor.spec import Spec, SpecError, parse_spec

log = logging.getLogger(__name__)

SOURCES = ("dir", "http")  # fixed folder names: nothing from a source names a path here


class Rejection(msgspec.Struct):
    uuid: str | None
    source: str
    reason: str


class _Stored(msgspec.Struct):
    source: str
    spec: msgspec.Raw


class SpecStore:
    def __init__(self, state_dir: str):
        self.root = os.path.join(state_dir, "specs")
        self.quarantine_dir = os.path.join(state_dir, "quarantine")
        self.specs: dict[str, dict[str, Spec]] = {s: {} for s in SOURCES}
        self.revisions: dict[str, str | None] = {s: None for s in SOURCES}
        self.problems: list[Rejection] = []  # files quarantined at load

    def load(self) -> None:
        for source in SOURCES:
            folder = os.path.join(self.root, source)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name == "revision":
                    self.revisions[source] = _read_text(path)
                elif name.endswith(".json"):
                    self._load_spec(source, path)
                elif ".tmp." in name:
                    os.unlink(path)  # a write that a crash interrupted

    def _load_spec(self, source: str, path: str) -> None:
        try:
            with open(path, "rb") as f:
                stored = msgspec.json.decode(f.read(), type=_Stored)
            spec = parse_spec(msgspec.json.decode(stored.spec), stored.source)
            if os.path.basename(path) != f"{spec.job.uuid}.json":
                raise SpecError(f"file name does not match uuid {spec.job.uuid}")
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, SpecError) as e:
            self._quarantine(source, path, getattr(e, "reason", None) or str(e))
            return
        self.specs[source][spec.job.uuid] = spec

    def _quarantine(self, source: str, path: str, reason: str) -> None:
        os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
        target = os.path.join(self.quarantine_dir, f"{source}-{os.path.basename(path)}-{time.time_ns()}")
        os.replace(path, target)
        fsync_dir(os.path.dirname(path))
        uuid = os.path.basename(path).removesuffix(".json")
        message = f"corrupt stored spec {path} moved to {target}: {reason}"
        log.error("%s", message)
        self.problems.append(Rejection(uuid=uuid, source=f"store:{source}", reason=message))

    # -- writes --------------------------------------------------------------------------

    def replace(self, source: str, specs: dict[str, Spec], revision: str | None = None) -> bool:
        """Make `specs` the whole set of this source. True when anything changed."""
        current = self.specs[source]
        deleted = [u for u in current if u not in specs]
        return self.apply(source, list(specs.values()), deleted, revision)

    def apply(self, source: str, upserted: list[Spec], deleted: list[str], revision: str | None = None) -> bool:
        current = self.specs[source]
        folder = os.path.join(self.root, source)
        changed = False
        for spec in upserted:
            old = current.get(spec.job.uuid)
            if old is not None and old.revision == spec.revision and old.source == spec.source:
                continue
            doc = b'{"source":' + msgspec.json.encode(spec.source) + b',"spec":' + spec.canonical + b"}"
            write_atomic(os.path.join(folder, f"{spec.job.uuid}.json"), doc)
            current[spec.job.uuid] = spec
            changed = True
        for uuid in deleted:
            if current.pop(uuid, None) is not None:
                remove_durably(os.path.join(folder, f"{uuid}.json"))
                changed = True
        if revision is not None and revision != self.revisions[source]:
            write_atomic(os.path.join(folder, "revision"), revision.encode())
            self.revisions[source] = revision
        return changed

    def forget_revision(self, source: str) -> None:
        self.revisions[source] = None
        remove_durably(os.path.join(self.root, source, "revision"))

    # -- reads ---------------------------------------------------------------------------

    def desired(self) -> tuple[dict[str, Spec], list[Rejection]]:
        """Every stored spec by uuid; a uuid that two sources both define runs from neither."""
        out: dict[str, Spec] = {}
        rejected: list[Rejection] = []
        seen: dict[str, Spec] = {}
        clashes: set[str] = set()
        for source in SOURCES:
            for uuid, spec in self.specs[source].items():
                if uuid in seen:
                    clashes.add(uuid)
                    other = seen[uuid]
                    reason = f"uuid {uuid} is defined by two sources: {other.source} and {spec.source}"
                    rejected.append(Rejection(uuid=uuid, source=other.source, reason=reason))
                    rejected.append(Rejection(uuid=uuid, source=spec.source, reason=reason))
                else:
                    seen[uuid] = spec
        for uuid, spec in seen.items():
            if uuid not in clashes:
                out[uuid] = spec
        return out, rejected


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None
