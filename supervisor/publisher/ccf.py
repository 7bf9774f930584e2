"""The ccf sink: one Evidence per result, POSTed to the Continuous Compliance Framework API (SPEC §7).

The API takes no arrays, so each result is one request over a kept-alive connection. Answers
are handled as for the http sink, per result: 2xx taken; 401/403/404/405 (a wrong token or
url), 408, 429, 5xx and no answer retried; any other 4xx a dead letter. Two additions:

- With `client_id`, a bearer token comes from {url}/api/auth/agent/token (HTTP Basic); it is
  kept until a minute before it expires (half its lifetime when that is under two minutes),
  and a 401 fetches a new one and tries once more.
- The API refuses a `start` or `end` in its future. A 400 for a result whose end is not
  before the API's clock (its answer's Date) means this host's clock runs ahead, not a bad
  result: it is retried once the API's clock should have passed it, with the skew in
  last_error and the log. Nothing is dead-lettered for a clock, nothing is lost.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import time
import uuid as uuidlib

import msgspec

from supervisor import __version__
from supervisor.config import ConfigError, Sink as SinkConfig, check_token_file
from supervisor.publisher import sink as http
from supervisor.publisher.sink import DEAD_LETTER_BODY, DeliveryError, HttpSink, _Retryable
from supervisor.files import set_aside, write_atomic

log = logging.getLogger("publisher")

EVIDENCE_PATH = "/api/evidence"
TOKEN_PATH = "/api/auth/agent/token"
TOKEN_ANSWER_MAX = 65536
TOKEN_MARGIN = 60.0  # a token is renewed this long before it expires...
TOKEN_SHORT = 120.0  # ...unless its lifetime is under this: then at half of it
SKEW_RETRY_MAX = 3600.0  # a host clock further ahead than this is retried at this pace
TITLES_FILE = "job-titles.json"
TITLES_KEPT = 20_000  # job revisions; far more than results can be pending for


class AgentToken(msgspec.Struct):
    access_token: str
    expires_in: float
    token_type: str = "Bearer"


class JobTitles:
    """Each job revision's title, for `description` and the activity: a plugin may give its
    result a title of its own, and by the time a result is delivered its spec may have changed
    or gone. The publisher notes the title with each result it commits (runners send it along)
    and keeps the map in state_dir/job-titles.json, written before the results it names are
    in the outbox, so a restarted publisher still knows the titles of what is pending."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, TITLES_FILE)
        self.titles: dict[str, str | None] = {}
        try:
            with open(self.path, "rb") as f:
                self.titles = msgspec.json.decode(f.read(), type=dict[str, str | None])
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("%s is unreadable (%s): %s; results pending from before take their own titles",
                        self.path, e, set_aside(self.path, state_dir))

    def note(self, batch) -> None:
        """Learn the titles of a batch of Publish frames; written once any is new."""
        new = False
        for message in batch:
            key = f"{message.job_uuid} {message.job_revision}"
            if key not in self.titles:
                self.titles[key] = message.job_title
                new = True
        if new:
            while len(self.titles) > TITLES_KEPT:  # the oldest first: a dict keeps insertion order
                del self.titles[next(iter(self.titles))]
            try:
                write_atomic(self.path, msgspec.json.encode(self.titles), 0o600)
            except OSError as e:  # known in memory still; lost only if the publisher restarts too
                log.warning("cannot write %s: %s", self.path, e)

    def get(self, job_uuid: object, revision: object) -> str | None:
        return self.titles.get(f"{job_uuid} {revision}")


def stream_uuid(runtime_uuid: str, job_uuid: str) -> str:
    """The Evidence uuid: one stream per job and host, the same for every run."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"assessment-runtime:{runtime_uuid}:{job_uuid}"))


def evidence(result: dict, result_json: bytes, job_title: str | None, hostname: str) -> dict:
    """The Evidence for one result (SPEC §7). Raises KeyError/TypeError/ValueError for a
    result that lacks what the mapping needs."""
    runtime, job, run = _text(result["runtime_uuid"]), _text(result["job_uuid"]), _text(result["uuid"])
    plugin = result["plugin"]
    name, version = _text(plugin["name"]), _text(plugin["version"])
    title = result.get("title") or job_title or f"{name}@{version}"
    job_title = job_title or title
    status = result["status"]
    if status == "satisfied":
        state = {"state": "satisfied", "reason": "pass"}
    elif status == "not-satisfied":
        state = {"state": "not-satisfied", "reason": "fail"}
    elif status == "error":
        state = {"state": "not-satisfied", "reason": "other", "remarks": result.get("reason") or ""}
    else:
        raise ValueError(f"unknown status {status!r}")
    labels = {str(k): str(v) for k, v in (result.get("labels") or {}).items()}
    labels.update({"_agent": runtime, "_plugin": name, "_policy": result.get("control_id") or name,
                   "_job": job, "hostname": hostname})
    props = []
    for finding in result.get("findings") or ():
        violation = _first(finding, ("id", "uuid", "title"))
        if violation is not None:
            props.append({"name": "_violation_id", "value": violation})
    props.append({"name": "run_uuid", "value": run})
    props.append({"name": "job_revision", "value": _text(result["job_revision"])})
    if plugin.get("sha256"):
        props.append({"name": "plugin_sha256", "value": _text(plugin["sha256"])})
    host = f"machine-instance/{hostname}"
    subjects = [{"identifier": host, "type": "InventoryItem"}]
    for subject in result.get("subjects") or ():
        identifier = _first(subject, ("identifier", "subject-uuid", "uuid", "title"))
        if identifier is not None:
            item = {"identifier": identifier}
            if isinstance(subject.get("type"), str):
                item["type"] = subject["type"]
            subjects.append(item)
    inventory = [{"identifier": host, "type": "operating-system", "title": hostname}]
    resource = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"assessment-runtime:result:{run}"))
    return {
        "uuid": stream_uuid(runtime, job),
        "title": title,
        "description": job_title,
        "start": _text(result["start"]),
        "end": _text(result["end"]),
        "labels": labels,
        "status": state,
        "props": props,
        "origins": [{"actors": [{"type": "tool", "actor-uuid": runtime, "uuid": runtime,
                                 "title": f"assessment-runtime {__version__}"}]}],
        "subjects": subjects,
        "inventory-items": inventory,
        "inventoryItems": inventory,
        "activities": [{"uuid": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL,
                                                  f"assessment-runtime:{runtime}:{job}:{name}@{version}")),
                        "title": job_title, "description": f"{name}@{version}"}],
        "links": [{"href": f"#{resource}", "rel": "evidence"}],
        "back-matter": {"resources": [{
            "uuid": resource, "title": f"assessment-runtime result {run}",
            "base64": {"filename": "result.json", "media-type": "application/json",
                       "value": base64.b64encode(result_json).decode("ascii")}}]},
    }


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _first(item: object, keys: tuple[str, ...]) -> str | None:
    if isinstance(item, dict):
        for key in keys:
            value = item.get(key)
            if value not in (None, ""):
                return str(value)
    return None


class CcfSink(HttpSink):
    kind = "ccf"

    def __init__(self, config_sink: SinkConfig, state_dir: str, key: str = "publisher.sink",
                 titles: JobTitles | None = None):
        self.client_id = config_sink.client_id
        self.client_secret_file = config_sink.client_secret_file
        base = config_sink.url.rstrip("/")
        self.evidence_url = base + EVIDENCE_PATH
        self.token_url = base + TOKEN_PATH
        self.hostname = os.uname().nodename
        self.titles = titles or JobTitles(state_dir)
        self._agent_authorization: str | None = None
        self._renew_at = 0.0
        super().__init__(config_sink, state_dir, key)

    def deliver(self, payloads: list[bytes], deadline: float | None = None) -> int:
        headers = self._headers()
        self._check_ca()
        letters: list[tuple[str, int | None, bytes]] = []
        try:
            for i, payload in enumerate(payloads):
                try:
                    self._deliver_one(payload, headers, deadline, letters, i)
                except _Retryable as e:
                    raise DeliveryError(str(e), done=i, dead_lettered=len(letters),
                                        retry_after=e.retry_after) from None
        finally:
            self._report_letters(letters)
        return len(letters)

    def _deliver_one(self, payload: bytes, headers: dict[str, str], deadline: float | None,
                     letters: list, done: int) -> None:
        result_json = self._json(payload)
        if result_json is None:
            self._dead_letter(payload, None, b"not a readable result", None, letters, done)
            return
        result = msgspec.json.decode(result_json)
        try:
            title = self.titles.get(result.get("job_uuid"), result.get("job_revision"))
            body = self._encoder.encode(evidence(result, result_json, title, self.hostname))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            why = f"cannot be made into Evidence: {type(e).__name__}: {e}".encode()
            self._dead_letter(payload, None, why, result_json, letters, done)
            return
        for attempt in (1, 2):
            if self.client_id:
                headers = {**headers, "Authorization": self._agent_token(deadline, renew=attempt == 2)}
            resp = self._send(self.evidence_url, body, headers, deadline)
            try:
                status = resp.status
                if 200 <= status < 300:
                    return
                head = http._read_some(resp, DEAD_LETTER_BODY)
                if status == 401 and self.client_id and attempt == 1:
                    continue  # the token may have been revoked: a new one, and once more
                if not 400 <= status < 500 or status in http.RETRIED_4XX:
                    raise self._retryable(resp, head, self.evidence_url)
                ahead = _ahead_of_api(result, resp.headers.get("Date")) if status == 400 else None
                if ahead is not None:
                    raise _Retryable(
                        f"HTTP 400 from {self.evidence_url}: {http._snippet(head)}: this host's clock runs "
                        f"ahead of the API's by at least {ahead:.1f}s (result end {result.get('end')}, API Date "
                        f"{resp.headers.get('Date')}): retried once the API's clock has passed it, never "
                        f"dead-lettered; fix the host's time (NTP)", min(SKEW_RETRY_MAX, ahead + 1.0))
                self._dead_letter(payload, status, head, result_json, letters, done)
                return
            finally:
                http._finish(resp)

    def _agent_token(self, deadline: float | None, renew: bool) -> str:
        """`Bearer <token>` from the token endpoint, kept until it is due for renewal."""
        now = time.monotonic()
        if self._agent_authorization and not renew and now < self._renew_at:
            return self._agent_authorization
        self._agent_authorization = None
        try:
            secret = check_token_file(self.client_secret_file, f"{self.key}.client_secret_file")
        except ConfigError as e:
            raise _Retryable(f"config error: {e}") from None
        basic = base64.b64encode(f"{self.client_id}:{secret}".encode()).decode("ascii")
        headers = {"Authorization": f"Basic {basic}", "Accept": "application/json",
                   "User-Agent": f"assessment-runtime/{__version__}"}
        resp = self._send(self.token_url, b"", headers, deadline)
        try:
            head = http._read_some(resp, TOKEN_ANSWER_MAX)
            if not 200 <= resp.status < 300:
                hint = "a wrong client_id or client_secret_file? retried" if resp.status in (401, 403) else None
                raise self._retryable(resp, head, f"{self.token_url} (the agent token)", hint)
        finally:
            http._finish(resp)
        try:
            token = msgspec.json.decode(head, type=AgentToken)
            if not http._BEARER.match(token.access_token) or not http._BEARER.match(token.token_type):
                raise ValueError("access_token or token_type holds characters a header cannot have")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise _Retryable(f"agent token from {self.token_url}: not a token answer ({e}): "
                             f"{http._snippet(head)}") from None
        lifetime = max(0.0, token.expires_in)
        self._renew_at = now + (lifetime - TOKEN_MARGIN if lifetime >= TOKEN_SHORT else lifetime / 2)
        scheme = "Bearer" if token.token_type.lower() == "bearer" else token.token_type
        self._agent_authorization = f"{scheme} {token.access_token}"
        return self._agent_authorization


def _ahead_of_api(result: dict, date: str | None) -> float | None:
    """Seconds by which the result's start or end is not before the API's clock (its Date,
    whole seconds), or None when it is before or either cannot be read."""
    if not date:
        return None
    import email.utils

    try:
        api_now = email.utils.parsedate_to_datetime(date)
        latest = max(datetime.datetime.fromisoformat(result["end"]), datetime.datetime.fromisoformat(result["start"]))
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    if api_now.tzinfo is None:
        api_now = api_now.replace(tzinfo=datetime.timezone.utc)
    if latest.tzinfo is None:
        return None
    ahead = (latest - api_now).total_seconds()
    return ahead if ahead >= 0 else None
