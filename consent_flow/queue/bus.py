"""Events through the queue: the envelope, the outcome, and the bus that carries them.

An event is an arq job whose arguments are the envelope: event name, user, provider (the two name
the connection), ids, actor and a small payload of non-secret values. arq stores and logs job
arguments, so secrets never travel here; an authorization code waits sealed in the user's inbox
key instead.

The caller does not poll arq's result (``Job.result()`` polls every 0.5 s and arq would store the
result): the worker pushes the outcome to a reply list the caller blocks on with BLPOP. The reply
waits in Redis up to ``REPLY_TTL``, and an authorization URL carries the session's ``state`` and
nonce: so the caller sends the public half of a one-time key with its event
(:class:`~consent_flow.store.vault.ReplyKey`) and the worker seals the URL to it. Nothing in the
reply, the job or anywhere else in Redis shows them in clear, and only that caller can open it.

arq pickles jobs by default, and a worker unpickles whatever it finds under a job key: anyone who
can write to Redis could run code in every worker. Every arq pool and worker of the project
passes :data:`JOB_SERIALIZERS` instead, JSON that only ever decodes to data (and takes less
memory per queued job).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis

from consent_flow.core.connections import DEFAULT_PROVIDER
from consent_flow.core.table import Event
from consent_flow.errors import VaultError, WorkerUnavailable
from consent_flow.queue.jobs import JobQueue, bell_key
from consent_flow.store.redis_store import REPLY_TTL, Keys
from consent_flow.store.scripts import lua
from consent_flow.store.vault import ReplyKey, seal_reply

__all__ = [
    "HANDLE_EVENT",
    "JOB_SERIALIZERS",
    "REPLY_TTL",
    "Envelope",
    "EventBus",
    "Outcome",
    "dump_job",
    "load_job",
]

HANDLE_EVENT = "handle_event"  # the arq function name every event goes through


def _result_value(value: object) -> str:
    # arq puts a failed job's exception in the result it serialises (and, with keep_result=0,
    # never stores): its name and message, like arq's own log line. Anything else is a bug.
    if isinstance(value, BaseException):
        return repr(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_result_value)


def dump_job(data: dict[str, Any]) -> bytes:
    """arq's job (or result) dict as compact JSON; an unset try and no keyword arguments are
    left out (:func:`load_job` puts them back)."""
    if data.get("t") is None:
        data = {k: v for k, v in data.items() if k != "t"}
    if not data.get("k", True):
        data = {k: v for k, v in data.items() if k != "k"}
    return _ENCODER.encode(data).encode()


def load_job(raw: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(raw)
    data.setdefault("t", None)
    data.setdefault("k", {})
    return data


# For arq's create_pool and Worker: JOB_SERIALIZERS in every pool and worker, or none at all.
JOB_SERIALIZERS: dict[str, Any] = {"job_serializer": dump_job, "job_deserializer": load_job}


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Envelope:
    event: Event
    user: str
    actor: str
    event_id: str = field(default_factory=new_id)
    correlation_id: str = field(default_factory=new_id)
    payload: dict[str, str] = field(default_factory=dict)
    reply: bool = True
    reply_to: str | None = None
    """The public half of the caller's reply key: what the reply seals secrets to."""
    reply_key: ReplyKey | None = field(default=None, repr=False, compare=False)
    """The caller's private half; only in the caller's process, never in the job."""
    provider: str = DEFAULT_PROVIDER
    """The provider of the connection (user, provider) the event is about."""

    def with_reply_key(self) -> Envelope:
        """This envelope with a fresh reply key, unless it has one or wants no reply."""
        if not self.reply or self.reply_key is not None:
            return self
        key = ReplyKey()
        return dataclasses.replace(self, reply_to=key.public, reply_key=key)

    def to_job(self) -> dict[str, Any]:
        job: dict[str, Any] = {
            "event": self.event.value,
            "user": self.user,
            "provider": self.provider,
            "actor": self.actor,
            "event_id": self.event_id,
            "correlation_id": self.correlation_id,
            "payload": dict(self.payload),
            "reply": self.reply,
        }
        if self.reply_to:
            job["reply_to"] = self.reply_to
        return job

    @classmethod
    def from_job(cls, data: dict[str, Any]) -> Envelope:
        return cls(
            event=Event(data["event"]),
            user=str(data["user"]),
            actor=str(data["actor"]),
            event_id=str(data["event_id"]),
            correlation_id=str(data["correlation_id"]),
            payload={str(k): str(v) for k, v in dict(data.get("payload") or {}).items()},
            reply=bool(data.get("reply", True)),
            reply_to=str(data["reply_to"]) if data.get("reply_to") else None,
            provider=str(data.get("provider") or DEFAULT_PROVIDER),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the worker reports back: the user's status after the event, and what happened."""

    user: str
    state: str
    since: str | None
    reason: str | None
    event: str
    result: str  # "applied", "unchanged", "rejected", "failed"
    authorization_url: str | None = None
    error: str | None = None  # a stable error code when result is "rejected" or "failed"
    detail: dict[str, Any] = field(default_factory=dict)
    replied: bool = field(default=False, compare=False)
    """True once the caller's reply was pushed (by the commit that applied the event)."""

    def sent(self) -> Outcome:
        return dataclasses.replace(self, replied=True)

    def reply_json(self, envelope: Envelope) -> str:
        """The outcome as the reply list holds it for ``envelope``'s caller: the authorization
        URL sealed to the caller's reply key, or left out when the caller sent none."""
        sealed = None
        if self.authorization_url and envelope.reply_to:
            try:
                sealed = seal_reply(
                    envelope.reply_to, self.authorization_url, context=envelope.event_id
                )
            except VaultError:
                sealed = None  # a malformed key from the job: the caller reads `status` instead
        # Built by hand: dataclasses.asdict deep-copies, and this runs for every event.
        return json.dumps(
            {
                "user": self.user,
                "state": self.state,
                "since": self.since,
                "reason": self.reason,
                "event": self.event,
                "result": self.result,
                "sealed_url": sealed,
                "error": self.error,
                "detail": self.detail,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_reply(cls, raw: str | bytes, envelope: Envelope) -> Outcome:
        """What :meth:`reply_json` wrote, with the URL opened by ``envelope``'s reply key (None
        for a waiter that holds another key: a duplicate of someone else's event)."""
        data = json.loads(raw)
        sealed = data.pop("sealed_url", None)
        data.pop("authorization_url", None)
        url = None
        if sealed and envelope.reply_key is not None:
            try:
                url = envelope.reply_key.open(sealed, context=envelope.event_id)
            except VaultError:
                url = None
        return cls(**data, authorization_url=url, replied=True)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user": self.user,
            "state": self.state,
            "since": self.since,
            "reason": self.reason,
        }
        if self.authorization_url:
            out["authorization_url"] = self.authorization_url
        out.update(self.detail)
        return out


class EventBus:
    """Emits envelopes as arq jobs and waits for their outcome."""

    def __init__(
        self,
        pool: ArqRedis,
        *,
        keys: Keys,
        queue_name: str,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.queue_name = queue_name
        self.timeout = timeout
        self.jobs = JobQueue(pool, clock=clock)
        self._reply = pool.register_script(lua("reply"))

    async def emit(self, envelope: Envelope, *, timeout: float | None = None) -> Outcome | None:
        """Queue the event; with ``envelope.reply`` wait for its outcome.

        The job expires if no worker starts it within the timeout, so a caller that gave up
        never has its event applied behind its back.
        """
        wait = self.timeout if timeout is None else timeout
        envelope = envelope.with_reply_key()
        # arq refuses a job id it still holds (the same event queued or running): that job's
        # outcome answers this caller too.
        await self.jobs.put(
            self.jobs.job(
                HANDLE_EVENT,
                (envelope.to_job(),),
                # In the user's shard, beside the connection's keys and its refresh jobs.
                job_id=self.keys.of(envelope.user).job_id(f"ev:{envelope.event_id}"),
                queue=self.keys.of(envelope.user).queue(self.queue_name),
                expires_ms=int(max(1.0, wait) * 1000),
            ),
            ring=bell_key(self.queue_name),
        )
        if not envelope.reply:
            return None
        return await self.wait(envelope, timeout=wait)

    async def wait(self, envelope: Envelope, *, timeout: float | None = None) -> Outcome:
        """Block until the outcome of the event ``envelope.event_id`` is reported."""
        wait = self.timeout if timeout is None else timeout
        key = self.keys.reply(envelope.user, envelope.event_id)
        redis: Any = self.pool  # redis-py's async types are sync|async unions
        # BLMOVE from the list onto itself waits like BLPOP but leaves the outcome in place, in
        # one round trip, for anyone else waiting on the same event (a duplicate emit); the key
        # expires on its own.
        outcome = await redis.blmove(key, key, wait, "LEFT", "RIGHT")
        if outcome is None:
            raise WorkerUnavailable(
                f"no worker answered {envelope.event.value} within {wait:g} s "
                "(is `consent-flow worker` running?)",
                user=envelope.user,
                event=envelope.event.value,
            )
        return Outcome.from_reply(outcome, envelope)

    async def reply(self, envelope: Envelope, outcome: Outcome) -> None:
        """Push ``outcome`` to ``envelope``'s caller (secrets sealed to its reply key)."""
        key = self.keys.reply(envelope.user, envelope.event_id)
        await self._reply(keys=[key], args=[outcome.reply_json(envelope), REPLY_TTL])
