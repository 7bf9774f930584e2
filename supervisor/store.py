"""The on-disk spec store: the last good specs of every source, kept under state_dir.

Layout: `specs/<source>/<uuid>.json` (each `{"source": ..., "spec": {...}}`),
`specs/<source>/revision` (the Configuration service's opaque revision, a JSON string),
`rejected` (that source's rejected specs, JSON) and `location` (the endpoint the revision
belongs to, a JSON string; both were plain text before, which still loads). Every write is
atomic; specs and rejections are written before the revision, so a crash never leaves a
revision that claims more than the store holds. A file that does not load is moved to
`quarantine/` with one log line; it is never fatal. When a source's spec or rejections file
did not load, its revision no longer vouches for the store and is forgotten: the next sync
asks for the full set. After a restart the stored specs run before any source answers.
"""

from __future__ import annotations

import logging
import os
import time

import msgspec

from supervisor.files import fsync_dir, remove_durably, write_atomic, write_synced
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
        self.rejections: dict[str, list[Rejection]] = {s: [] for s in SOURCES}  # stored with the revision
        self.locations: dict[str, str | None] = {s: None for s in SOURCES}
        self.problems: list[Rejection] = []  # files quarantined at load

    def load(self) -> None:
        for source in SOURCES:
            folder = os.path.join(self.root, source)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            lost = False  # a file of this source did not load: the revision claims more than we have
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name in ("revision", "location"):
                    value = self._load_value(source, path)
                    (self.revisions if name == "revision" else self.locations)[source] = value
                elif name == "rejected":
                    lost |= not self._load_rejections(source, path)
                elif name.endswith(".json"):
                    lost |= not self._load_spec(source, path)
                elif ".tmp." in name:
                    os.unlink(path)  # a write that a crash interrupted
            if lost and self.revisions[source] is not None:
                log.warning("spec store: forgetting the stored revision of source %s: the next sync asks for "
                            "the full set", source)
                try:
                    self.forget_revision(source)
                except OSError as e:
                    self.revisions[source] = None
                    log.error("cannot remove the stored revision of source %s: %s", source, e)

    def _load_spec(self, source: str, path: str) -> bool:
        try:
            with open(path, "rb") as f:
                stored = msgspec.json.decode(f.read(), type=_Stored)
            spec = parse_spec(msgspec.json.decode(stored.spec), stored.source)
            if os.path.basename(path) != f"{spec.job.uuid}.json":
                raise SpecError(f"file name does not match uuid {spec.job.uuid}")
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, SpecError) as e:
            self._quarantine(source, path, getattr(e, "reason", None) or str(e))
            return False
        self.specs[source][spec.job.uuid] = spec
        return True

    def _load_rejections(self, source: str, path: str) -> bool:
        try:
            with open(path, "rb") as f:
                self.rejections[source] = msgspec.json.decode(f.read(), type=list[Rejection])
            return True
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            target = self._set_aside(source, path)
            log.error("corrupt stored rejections %s %s: %s", path, target, e)
            return False

    def _load_value(self, source: str, path: str) -> str | None:
        """A revision or location: a JSON string (a cut one does not decode), or the plain text
        of earlier versions. Anything else is set aside and counts as none."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            value = msgspec.json.decode(data, type=str) if data[:1] == b'"' else data.decode("utf-8").strip()
            if not value or len(value) > 4096 or value != value.strip() or not value.isprintable():
                raise ValueError("not a usable value")
            return value
        except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
            target = self._set_aside(source, path)
            log.error("corrupt stored %s %s %s (%s): ignored", os.path.basename(path), path, target, e)
            return None

    def _set_aside(self, source: str, path: str) -> str:
        """Move a file that did not load to quarantine/; says where it went (for the log line)."""
        target = os.path.join(self.quarantine_dir, f"{source}-{os.path.basename(path)}-{time.time_ns()}")
        try:
            os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
            os.replace(path, target)
            fsync_dir(os.path.dirname(path))
        except OSError as e:  # a read-only state_dir: it stays, and is ignored again next time
            return f"left in place (cannot move it: {e.strerror})"
        return f"moved to {target}"

    def _quarantine(self, source: str, path: str, reason: str) -> None:
        target = self._set_aside(source, path)
        uuid = os.path.basename(path).removesuffix(".json")
        message = f"corrupt stored spec {path} {target}: {reason}"
        log.error("%s", message)
        self.problems.append(Rejection(uuid=uuid, source=f"store:{source}", reason=message))

    # -- writes --------------------------------------------------------------------------

    def replace(self, source: str, specs: dict[str, Spec], revision: str | None = None,
                rejected: list[Rejection] | None = None) -> bool:
        """Make `specs` the whole set of this source. True when any spec changed."""
        current = self.specs[source]
        deleted = [u for u in current if u not in specs]
        return self.apply(source, list(specs.values()), deleted, revision, rejected)

    def apply(self, source: str, upserted: list[Spec], deleted: list[str], revision: str | None = None,
              rejected: list[Rejection] | None = None) -> bool:
        """Upsert and delete specs, then store `rejected` (when given) and last the revision."""
        current = self.specs[source]
        folder = os.path.join(self.root, source)
        writes: dict[str, Spec] = {}
        for spec in upserted:
            old = current.get(spec.job.uuid)
            if old is not None and old.revision == spec.revision and old.source == spec.source:
                continue
            writes[spec.job.uuid] = spec
        for uuid in deleted:  # a uuid both upserted and deleted ends up deleted
            writes.pop(uuid, None)
        gone = [uuid for uuid in dict.fromkeys(deleted) if uuid in current]
        # one fsync of the folder for the whole batch, not one per file (1,000 specs in a snapshot)
        _write_files(folder, [(f"{uuid}.json", b'{"source":' + msgspec.json.encode(spec.source) + b',"spec":'
                               + spec.canonical + b"}") for uuid, spec in writes.items()])
        current.update(writes)
        for uuid in gone:  # memory follows the disk: a removal that fails (read-only) leaves the spec stored
            try:
                os.unlink(os.path.join(folder, f"{uuid}.json"))
            except FileNotFoundError:
                pass
            del current[uuid]
        if gone:
            fsync_dir(folder)
        changed = bool(writes or gone)
        if rejected is not None and rejected != self.rejections[source]:
            path = os.path.join(folder, "rejected")
            if rejected:
                write_atomic(path, msgspec.json.encode(rejected))
            else:
                remove_durably(path)
            self.rejections[source] = list(rejected)
        if revision is not None and revision != self.revisions[source]:
            write_atomic(os.path.join(folder, "revision"), msgspec.json.encode(revision))
            self.revisions[source] = revision
        return changed

    def forget_revision(self, source: str) -> None:
        self.revisions[source] = None
        remove_durably(os.path.join(self.root, source, "revision"))

    def claim(self, source: str, location: str) -> bool:
        """The stored revision belongs to `location` (the service endpoint, which names the
        runtime uuid). Another location forgets it, so the next sync asks for a full set;
        the stored specs stay and keep running until that answer comes. True when forgotten."""
        if self.locations[source] == location:
            return False
        forgot = self.revisions[source] is not None
        self.forget_revision(source)  # first: never a revision next to a location it is not from
        write_atomic(os.path.join(self.root, source, "location"), msgspec.json.encode(location))
        self.locations[source] = location
        return forgot

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


def _write_files(folder: str, files: list[tuple[str, bytes]]) -> None:
    """Each file atomically (temp file, fsync, rename), then one fsync of the folder for all."""
    if not files:
        return
    renamed = 0
    temps = [(os.path.join(folder, f"{name}.tmp.{os.getpid()}"), os.path.join(folder, name)) for name, _ in files]
    try:
        for (tmp, _), (_, data) in zip(temps, files):
            write_synced(tmp, data)
        for tmp, path in temps:
            os.replace(tmp, path)
            renamed += 1
    finally:
        for tmp, _ in temps[renamed:]:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(folder)

