"""The Job Spec (SPEC §4): one Struct, validated at the boundary, with its revision."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

import msgspec

from runner import cron
from runner.units import Duration, Size, dec_hook

# Names, versions and uuids end up in file names: this pattern keeps them inside our folders.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z"  # \Z: "$" would allow a final newline
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}\Z")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
_NAME_RE = re.compile(NAME_PATTERN)
_FIELD_MESSAGE = re.compile(r"^Object (missing required|contains unknown) field `(.+)`$")


class PluginRef(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    version: Name
    sha256: Sha256 | None = None
    url: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-run limits. In config every field is set; in a spec any may be left out."""

    memory: Size | None = None
    cpu_time: Duration | None = None
    open_files: PositiveInt | None = None
    processes: PositiveInt | None = None
    output: Size | None = None

    def lowered_by(self, other: "Limits | None") -> "Limits":
        """These limits, each lowered (never raised) by the one `other` sets."""
        if other is None:
            return self
        merged = {}
        for field in self.__struct_fields__:
            mine, theirs = getattr(self, field), getattr(other, field)
            merged[field] = mine if theirs is None else (theirs if mine is None else min(mine, theirs))
        return Limits(**merged)


class JobSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    uuid: Name
    plugin: PluginRef
    interval: Duration | None = None  # exactly one of interval and schedule
    schedule: str | None = None  # a cron expression (runner/cron.py), read in time_zone
    time_zone: str = "UTC"
    splay: Duration | None = None
    title: str | None = None
    timeout: Duration | None = None
    run_on_start: bool = False
    config: dict[str, Any] = {}
    labels: dict[str, str] = {}
    assessment_plan_uuid: str | None = None
    component_uuid: str | None = None
    control_id: str | None = None
    limits: Limits | None = None


class Spec(msgspec.Struct, frozen=True):
    """A validated spec with what we derive from it once: its canonical JSON and revision."""

    job: JobSpec
    canonical: bytes  # the spec as canonical JSON: what the plugin is handed as "job"
    revision: str
    source: str  # where it came from, e.g. "dir:/etc/assessment-runtime/jobs.d/a.json"


class SpecError(ValueError):
    """A spec that does not validate; `uuid` is set when the object had a readable one."""

    def __init__(self, reason: str, uuid: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.uuid = uuid


def canonical_json(obj: Any) -> bytes:
    return msgspec.json.encode(obj, order="sorted")


def revision_of(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()[:16]


def validation_reason(err: msgspec.ValidationError, prefix: str = "$") -> str:
    """msgspec says "Expected `int`, got `str` - at `$.a.b`"; we say "$.a.b: Expected ..."."""
    text = str(err)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, "$"
    path = prefix + where.rstrip("`")[1:]
    # name the field itself, not the object that lacks or has it
    m = _FIELD_MESSAGE.match(message)
    if m:
        return f"{path}.{m.group(2)}: {'required field is missing' if m.group(1) == 'missing required' else 'unknown field'}"
    return f"{path}: {message}"


def parse_spec(obj: Any, source: str, path: str = "$") -> Spec:
    """Validate one spec object (already parsed from JSON or TOML). Raises SpecError."""
    uuid = obj.get("uuid") if isinstance(obj, dict) else None
    uuid = uuid if isinstance(uuid, str) and _NAME_RE.match(uuid) else None
    if not isinstance(obj, dict):
        raise SpecError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    try:
        canonical = canonical_json(obj)
    except (TypeError, msgspec.EncodeError) as e:
        raise SpecError(f"{path}: not representable as JSON: {e}", uuid) from None
    try:
        job = msgspec.convert(obj, JobSpec, dec_hook=dec_hook)
    except msgspec.ValidationError as e:
        raise SpecError(validation_reason(e, path), uuid) from None
    if job.interval is None and job.schedule is None:
        raise SpecError(f"{path}.interval: required field is missing (or give a schedule)", uuid)
    if job.interval is not None and job.schedule is not None:
        raise SpecError(f"{path}.schedule: give either interval or schedule, not both", uuid)
    if job.interval is not None and job.interval < 1:
        raise SpecError(f"{path}.interval: must be at least 1s, got {job.interval:g}s", uuid)
    if job.schedule is not None:
        try:
            cron.parse(job.schedule)
        except ValueError as e:
            raise SpecError(f"{path}.schedule: {e}", uuid) from None
    try:
        cron.check_zone(job.time_zone)
    except ValueError as e:
        raise SpecError(f"{path}.time_zone: {e}", uuid) from None
    if job.timeout is not None and job.timeout <= 0:
        raise SpecError(f"{path}.timeout: must be greater than 0", uuid)
    if job.plugin.url is not None and not job.plugin.url.startswith(("https://", "http://")):
        raise SpecError(f"{path}.plugin.url: must be an http(s) URL, got {job.plugin.url!r}", uuid)
    return Spec(job=job, canonical=canonical, revision=revision_of(canonical), source=source)
