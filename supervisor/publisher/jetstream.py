"""The nats sink: each result one message to NATS JetStream, taken on its PubAck (SPEC §7).

A batch is published at once (up to batch_max in flight), each message with a reply subject
of its own and the header `Nats-Msg-Id: <result uuid>`, then the PubAcks are read. The
cursor moves past the longest run of acknowledged messages from the batch's start; the rest
is published again after a backoff, and JetStream's duplicate window drops what it already
stored. An error PubAck (no stream for the subject, for example), no responders, no PubAck
within `timeout` or a lost connection: retried. A lost connection is dropped and the next
delivery connects to the next URL. Only a message the server can never take (over its
max_payload) or a stored result that is not readable becomes a dead letter.
"""

from __future__ import annotations

import logging
import os
import re
import time

import msgspec

from supervisor.config import ConfigError, Sink as SinkConfig, check_token_file
from supervisor.publisher.nats import Credentials, NatsClient, NatsError
from supervisor.publisher.sink import DEAD_LETTER_DIR, DeadLetters, DeliveryError

log = logging.getLogger("publisher")

_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# JetStream errors about one message that no retry changes: dead letters (SPEC §7 "refusals of
# one message"). 10054: larger than the stream's max_msg_size.
REFUSED_FOR_GOOD = frozenset({10054})
HEADER_ROOM = 64  # the header block around Nats-Msg-Id, counted against the server's max_payload


class _Route(msgspec.Struct):
    """What the subject and the header need of a result (the rest is not decoded here)."""

    uuid: str = ""
    runtime_uuid: str = ""
    job_uuid: str = ""
    status: str = ""


class ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: ApiError | None = None


def subject_token(value: str) -> str:
    """A filled-in value as one subject token: nothing that would add a token or a wildcard."""
    return _SUBJECT_UNSAFE.sub("_", value) or "_"


class JetStreamSink:
    kind = "nats"

    def __init__(self, config_sink: SinkConfig, state_dir: str, key: str = "publisher.sink"):
        self.name = config_sink.name
        self.key = key
        self.subject = config_sink.subject
        self.timeout = float(config_sink.timeout)
        self.token_file = config_sink.token_file
        self.user, self.password_file = config_sink.user, config_sink.password_file
        self.dead_letters = DeadLetters(os.path.join(state_dir, DEAD_LETTER_DIR))
        self.client = NatsClient(config_sink.urls, self.timeout, config_sink.ca_file, self._credentials,
                                 name=f"assessment-runtime {os.uname().nodename}")
        self._inbox = f"_INBOX.{os.urandom(8).hex()}"
        self._batch = 0
        self._quiet_reconnect = False  # a connection the server dropped while idle: no news
        self._decoder = msgspec.msgpack.Decoder()
        self._route = msgspec.msgpack.Decoder(_Route)
        self._encoder = msgspec.json.Encoder()
        self._ack = msgspec.json.Decoder(PubAck)

    def _credentials(self) -> Credentials:
        try:
            if self.token_file:
                return Credentials(token=check_token_file(self.token_file, f"{self.key}.token_file"))
            if self.password_file:
                return Credentials(user=self.user, password=check_token_file(self.password_file,
                                                                             f"{self.key}.password_file"))
        except ConfigError as e:
            raise NatsError(f"config error: {e}") from None
        return Credentials()

    def deliver(self, payloads: list[bytes], deadline: float | None = None) -> int:
        try:
            if self.client.connected:
                try:
                    self.client.service_idle()
                except (NatsError, TimeoutError) as e:
                    log.debug("sink %s: the connection to %s ended while idle (%s): connecting again",
                              self.name, self.client.url, e or type(e).__name__)
                    self.client.close()
                    self._quiet_reconnect = True  # closed while we were idle: not a failure, a new connection
            if not self.client.connected:
                self._connect()
        except NatsError as e:
            self.client.close()
            raise DeliveryError(str(e)) from None
        messages, refused = self._messages(payloads, self.client.info.max_payload)
        try:
            acked, failure, silent = self._publish(messages, refused, deadline)
        except NatsError as e:
            acked, failure, silent = set(), f"{self.client.url}: {e}", True
        if silent:
            self.client.close()  # lost, or no answer: the next delivery connects to the next URL
        done = 0
        while done < len(payloads) and (done in refused or done in acked):
            done += 1
        letters = [i for i in refused if i < done]
        for n, i in enumerate(letters):
            why = refused[i]
            uuid, _, body = messages[i] or (None, None, None)
            try:
                self.dead_letters.put(self.name, None, why.encode(), body, uuid, payloads[i])
            except OSError as e:
                raise DeliveryError(f"cannot write a dead letter in {self.dead_letters.folder}: {e}",
                                    done=i, dead_lettered=n) from None
            log.error("sink %s: a result was refused (%s); kept in %s", self.name, why, self.dead_letters.folder)
        if done < len(payloads):
            raise DeliveryError(failure or "no PubAck", done=done, dead_lettered=len(letters))
        return len(letters)

    def _messages(self, payloads: list[bytes], max_payload: int) -> tuple[list, dict[int, str]]:
        """(uuid, subject, json) per payload (None for an unreadable one), and why each one the
        server can never take is refused."""
        messages: list[tuple[str, str, bytes] | None] = []
        refused: dict[int, str] = {}
        for i, payload in enumerate(payloads):
            try:
                route = self._route.decode(payload)
                body = self._encoder.encode(self._decoder.decode(payload))
            except (msgspec.DecodeError, msgspec.ValidationError, msgspec.EncodeError, TypeError, ValueError) as e:
                log.error("sink %s: a stored result is not readable (%s); it goes to the dead letters", self.name, e)
                messages.append(None)
                refused[i] = "not a readable result"
                continue
            subject = self.subject.format(runtime_uuid=subject_token(route.runtime_uuid),
                                          job_uuid=subject_token(route.job_uuid), status=subject_token(route.status))
            messages.append((route.uuid, subject, body))
            if len(body) + HEADER_ROOM + len(route.uuid) > max_payload:
                refused[i] = f"{len(body)} bytes: more than the server's max_payload of {max_payload}"
        return messages, refused

    def _connect(self) -> None:
        self._credentials()  # a secret file problem is said once, not once per URL
        self.client.connect()
        self.client.subscribe(f"{self._inbox}.>")
        log.log(logging.DEBUG if self._quiet_reconnect else logging.INFO, "sink %s: connected to %s (nats-server %s)",
                self.name, self.client.url, self.client.info.version)
        self._quiet_reconnect = False

    def _publish(self, messages: list, refused: dict[int, str],
                 deadline: float | None) -> tuple[set[int], str | None, bool]:
        """Publish every message not refused; read PubAcks until all are in or none comes for
        `timeout`. Returns the indexes acknowledged, the first failure (None if none), and
        whether the server fell silent. A message JetStream refuses for good (over the stream's
        maximum size) is added to `refused`."""
        self._batch += 1
        prefix = f"{self._inbox}.{self._batch}."
        frames = bytearray()
        waiting: set[int] = set()
        for i, message in enumerate(messages):
            if i not in refused:
                uuid, subject, body = message
                frames += NatsClient.hpub(subject, prefix + str(i),
                                          b"Nats-Msg-Id: " + _header_value(uuid) + b"\r\n", body)
                waiting.add(i)
        self.client.send(frames)
        acked: set[int] = set()
        failures: dict[int, str] = {}
        silent = False
        wait = self.timeout if deadline is None else max(0.1, min(self.timeout, deadline - time.monotonic()))
        until = time.monotonic() + wait
        while waiting:
            msg = self.client.next_msg(until)
            if msg is None:
                first = min(waiting)
                failures[first] = f"no PubAck within {wait:g}s (subject {messages[first][1]})"
                silent = True
                break
            if not msg.subject.startswith(prefix):
                continue  # a late answer to an earlier batch
            i = _index(msg.subject[len(prefix):])
            if i not in waiting:
                continue
            waiting.discard(i)
            until = time.monotonic() + wait  # time out on silence, not on a big batch
            problem, for_good = self._ack_problem(msg, messages[i][1])
            if problem is None:
                acked.add(i)
            elif for_good:
                refused[i] = problem
            else:
                failures[i] = problem
        if not failures:
            return acked, None, silent
        not_taken = len(failures) + len(waiting) - (1 if min(failures) in waiting else 0)
        return acked, f"{self.client.url}: {failures[min(failures)]}" + (
            f" ({not_taken} of {len(messages)} not taken)" if not_taken > 1 else ""), silent

    def _ack_problem(self, msg, subject: str) -> tuple[str | None, bool]:
        """What is wrong with this answer (None: a good PubAck), and whether it is a refusal of
        this message for good (a dead letter) rather than a failure to retry."""
        if msg.status is not None and msg.status >= 300:
            if msg.status == 503:
                return (f"no responders for subject {subject}: no JetStream stream takes it "
                        f"(create one whose subjects match it)"), False
            return f"status {msg.status} {msg.description}".strip(), False
        try:
            ack = self._ack.decode(msg.payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return f"a malformed PubAck ({e}): {msg.payload[:200]!r}", False
        if ack.error is not None:
            why = (f"JetStream refused the message: {ack.error.description or 'error'} "
                   f"(code {ack.error.code}, err_code {ack.error.err_code}; subject {subject})")
            return why, ack.error.err_code in REFUSED_FOR_GOOD
        if not ack.stream or ack.seq is None:
            return f"a malformed PubAck (no stream or seq): {msg.payload[:200]!r}", False
        return None, False

    def idle(self) -> None:
        """Between deliveries (about once a second): answer the server's PINGs, so an idle
        connection is not dropped as stale."""
        if self.client.connected:
            try:
                self.client.service_idle()
            except (NatsError, TimeoutError):
                self.client.close()
                self._quiet_reconnect = True

    def close(self) -> None:
        self.client.close()


def _index(token: str) -> int | None:
    return int(token) if token.isdigit() else None


def _header_value(value: str) -> bytes:
    """A header value cannot hold CR or LF (it would end the header block early)."""
    return value.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")
