"""Signed webhooks: what an integrator hears about a connection, and how it gets there.

A :class:`Notice` is one change that matters outside (a grant provisioned, upgraded, revoked or
rejected by the provider; refreshes failing for a while, then recovering). It carries names,
states, a reason and a time, never a token, code or secret. It is delivered as one JSON POST
signed per the Standard Webhooks specification (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``: HMAC-SHA256 over ``id.timestamp.body`` with the ``whsec_`` secret), at
least once, through the queue: :func:`queue_notice` writes an arq job whose id is the notice's,
so a notice queued twice is delivered once, and every redelivery of it carries the same
``webhook-id`` for the receiver to deduplicate by.

One attempt (:meth:`WebhookSender.attempt`) is one POST with named timeouts and no redirects
followed: a 2xx delivers; 410 Gone is the receiver saying stop (a dead letter at once); anything
else (429, 5xx, other 4xx, a 3xx, timeouts, refused connections) is tried again later with
exponential backoff and jitter, honouring ``Retry-After`` up to the backoff's cap, for at most
:attr:`WebhookRetry.max_attempts` attempts. Then the notice is counted as a dead letter (``stats``
and ``/metrics``) and logged.

The pure part (notices, payloads, signatures, the backoff, which transitions make which notice)
needs no server; the sender and :func:`queue_notice` are the adapters.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import structlog
from standardwebhooks import Webhook

from consent_flow.core.records import NoticeJob, clip, iso
from consent_flow.core.table import Event, State
from consent_flow.logging import scrub
from consent_flow.oidc import HttpClients
from consent_flow.oidc.transport import retry_after as parse_retry_after
from consent_flow.queue.jobs import NOTICE_JOB, REDELIVERY_WINDOW, JobQueue, QueuedJob
from consent_flow.settings import Settings
from consent_flow.store.redis_store import Keys

__all__ = [
    "DEFAULT_PROVIDER",
    "WEBHOOK_ATTEMPT_DEADLINE",
    "WEBHOOK_DEDUP_WINDOW",
    "WEBHOOK_JOB",
    "WEBHOOK_TIMEOUT",
    "Attempt",
    "Delivery",
    "Notice",
    "NoticeKind",
    "WebhookRetry",
    "WebhookSender",
    "classify",
    "commit_notice",
    "notice_job",
    "notice_kind",
    "parse_secret",
    "queue_notice",
    "refresh_notice_kind",
    "sign",
]

log = structlog.get_logger("consent_flow.webhooks")

WEBHOOK_JOB: Final = NOTICE_JOB  # the arq function that delivers one notice
DEFAULT_PROVIDER: Final = "default"
SECRET_PREFIX: Final = "whsec_"
# The Standard Webhooks specification asks for secrets of 24 to 64 bytes.
MIN_SECRET_BYTES: Final = 24
MAX_SECRET_BYTES: Final = 64
WEBHOOK_TIMEOUT: Final = httpx.Timeout(10.0, connect=5.0)
"""One POST: 5 s to connect, 10 s for each read, write and wait for a pooled connection."""
WEBHOOK_ATTEMPT_DEADLINE: Final = 30.0
"""One attempt as a whole: a receiver that trickles its answer byte by byte is cut off here."""
WEBHOOK_DEDUP_WINDOW: Final = REDELIVERY_WINDOW
"""Seconds a delivered (or dead) notice's id is remembered, refusing the same notice again: as
long as the engine may see the event that caused it again."""
ARQ_RETRY_KEY_TTL: Final = 88_400
"""arq forgets a job's try count after this many seconds without a run: a longer gap between
two attempts would start the count again."""
MAX_REASON_CHARS: Final = 500


class NoticeKind(enum.StrEnum):
    """What happened to a connection, as the receiver reads it in ``type`` (``connection.*``)."""

    PROVISIONED = "provisioned"
    UPGRADED = "upgraded"
    REVOKED = "revoked"
    REFRESH_REJECTED = "refresh_rejected"
    REFRESH_FAILING = "refresh_failing"
    REFRESH_RECOVERED = "refresh_recovered"

    @property
    def type(self) -> str:
        return f"connection.{self.value}"


def notice_kind(event: Event, source: State, dest: State) -> NoticeKind | None:
    """The notice a committed transition makes, or None for one an integrator need not hear of
    (sessions opened or dropped, refreshes, no-ops). An authorization completed on a grant
    already provisioned is an upgrade: it added scopes."""
    if event is Event.AUTHORIZATION_COMPLETED and dest is State.PROVISIONED:
        return NoticeKind.UPGRADED if source is State.PROVISIONED else NoticeKind.PROVISIONED
    if source is dest:
        return None
    if event is Event.GRANT_IMPORTED and dest is State.PROVISIONED:
        return NoticeKind.PROVISIONED
    if event is Event.REFRESH_REJECTED and dest is State.REVOKED:
        return NoticeKind.REFRESH_REJECTED
    if event is Event.REVOKE_REQUESTED and dest is State.REVOKED:
        return NoticeKind.REVOKED
    return None


def refresh_notice_kind(
    failures_before: int, failures_after: int, threshold: int
) -> NoticeKind | None:
    """The notice a refresh outcome makes: ``refresh_failing`` once, at the failure that makes
    ``threshold`` in a row (``CONSENT_WEBHOOK_FAILING_AFTER``); ``refresh_recovered`` at the
    success that ends such a run; None otherwise (a short run of failures stays quiet)."""
    if failures_after > failures_before:
        return NoticeKind.REFRESH_FAILING if failures_after == threshold else None
    if failures_after == 0 and failures_before >= threshold:
        return NoticeKind.REFRESH_RECOVERED
    return None


def _stable_id(kind: NoticeKind, user: str, provider: str, cause: str) -> str:
    digest = hashlib.sha256(f"{provider}\x00{user}\x00{kind.value}\x00{cause}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


@dataclass(frozen=True, slots=True)
class Notice:
    """One change an integrator hears of. ``at`` is when it happened (seconds since the epoch);
    ``id`` is the ``webhook-id`` every delivery of it carries. ``failures`` and
    ``failing_since`` describe a run of failed refreshes (``refresh_failing``,
    ``refresh_recovered``); other notices leave them out."""

    kind: NoticeKind
    user: str
    at: float
    id: str
    provider: str = DEFAULT_PROVIDER
    from_state: State | None = None
    to_state: State | None = None
    reason: str | None = None
    failures: int | None = None
    failing_since: float | None = None

    @classmethod
    def of(
        cls,
        kind: NoticeKind,
        user: str,
        *,
        at: float,
        cause: str | None,
        provider: str = DEFAULT_PROVIDER,
        from_state: State | None = None,
        to_state: State | None = None,
        reason: str | None = None,
        failures: int | None = None,
        failing_since: float | None = None,
    ) -> Notice:
        """A notice whose id derives from ``cause`` (the id of the event that made it): the
        same event, applied again or reported twice, makes the same notice, which the queue
        and the receiver both recognise. No cause: an id of its own."""
        notice_id = _stable_id(kind, user, provider, cause) if cause else f"msg_{uuid.uuid4().hex}"
        return cls(
            kind,
            user,
            at,
            notice_id,
            provider,
            from_state,
            to_state,
            reason,
            failures,
            failing_since,
        )

    def payload(self) -> dict[str, Any]:
        """The envelope Standard Webhooks suggests: ``type``, ``timestamp`` (when it happened,
        RFC 3339 UTC) and ``data``."""
        reason = clip(scrub(self.reason), MAX_REASON_CHARS) if self.reason else None
        data: dict[str, Any] = {
            "user": self.user,
            "provider": self.provider,
            "from": None if self.from_state is None else self.from_state.value,
            "to": None if self.to_state is None else self.to_state.value,
            "reason": reason,
        }
        if self.failures is not None:
            data["failures"] = self.failures
        if self.failing_since is not None:
            data["failing_since"] = iso(self.failing_since)
        return {"type": self.kind.type, "timestamp": iso(self.at), "data": data}

    def body(self) -> bytes:
        """The POST body: the same bytes at every attempt (ASCII JSON, keys in a fixed order)."""
        return json.dumps(self.payload(), separators=(",", ":"), ensure_ascii=True).encode()

    def to_job(self) -> dict[str, Any]:
        """The notice as a job argument (JSON; nothing secret in it)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "user": self.user,
            "provider": self.provider,
            "from": None if self.from_state is None else self.from_state.value,
            "to": None if self.to_state is None else self.to_state.value,
            "reason": self.reason,
            "at": self.at,
            "failures": self.failures,
            "failing_since": self.failing_since,
        }

    @classmethod
    def from_job(cls, data: dict[str, Any]) -> Notice:
        return cls(
            kind=NoticeKind(data["kind"]),
            user=str(data["user"]),
            at=float(data["at"]),
            id=str(data["id"]),
            provider=str(data.get("provider") or DEFAULT_PROVIDER),
            from_state=State(data["from"]) if data.get("from") else None,
            to_state=State(data["to"]) if data.get("to") else None,
            reason=str(data["reason"]) if data.get("reason") is not None else None,
            failures=int(data["failures"]) if data.get("failures") is not None else None,
            failing_since=float(data["failing_since"])
            if data.get("failing_since") is not None
            else None,
        )


def parse_secret(text: str) -> bytes:
    """The key of a ``whsec_`` secret; ValueError (never echoing the value) when malformed."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX} (the Standard Webhooks form)")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {SECRET_PREFIX} followed by standard base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes, not {len(key)}"
        )
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` sent at ``timestamp`` (whole seconds)."""
    when = datetime.fromtimestamp(timestamp, UTC)
    signature = Webhook(key).sign(message_id, when, body.decode("ascii"))
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


@dataclass(frozen=True, slots=True)
class WebhookRetry:
    """Exponential backoff with equal jitter between attempts, and how many attempts at most.

    Defaults: 5 s doubling to an hour, 24 attempts: about 7 to 14 hours of trying before a
    notice is a dead letter."""

    base: float = 5.0
    cap: float = 3600.0
    max_attempts: int = 24
    deadline: float = WEBHOOK_ATTEMPT_DEADLINE
    timeout: httpx.Timeout = field(default_factory=lambda: WEBHOOK_TIMEOUT)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base <= 0 or self.cap < self.base:
            raise ValueError("max_attempts must be at least 1 and cap at least base > 0")
        if self.cap >= ARQ_RETRY_KEY_TTL:
            raise ValueError(f"cap must be under {ARQ_RETRY_KEY_TTL} s (arq's try count)")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first)."""
        raw = min(self.cap, self.base * 2.0 ** max(0, attempt - 1))
        delay = raw / 2 + random.random() * raw / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap))
        return delay

    @property
    def longest(self) -> float:
        """The longest a notice can take from queued to dead: every wait at the cap (a
        receiver that keeps asking with Retry-After), every attempt to its deadline."""
        return (self.max_attempts - 1) * self.cap + self.max_attempts * self.deadline


class Delivery(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GONE = "gone"  # 410: the receiver asks us to stop


def classify(status: int) -> Delivery:
    """What an answer means: 2xx delivered, 410 stop, anything else try again later."""
    if 200 <= status < 300:
        return Delivery.DELIVERED
    if status == 410:
        return Delivery.GONE
    return Delivery.RETRY


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: Delivery
    status: int | None = None
    error: str | None = None  # the exception's class name for a failure without an answer
    retry_after: float | None = None


def _origin(url: str) -> str:
    # Only scheme, host and port reach a log line: a receiver's path or query may hold a token.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


async def post_notice(
    client: httpx.AsyncClient,
    url: str,
    key: bytes,
    notice: Notice,
    *,
    now: float,
    deadline: float = WEBHOOK_ATTEMPT_DEADLINE,
) -> Attempt:
    """One signed POST of ``notice``; ``now`` (Redis's time) is the signed timestamp."""
    body = notice.body()
    headers = {
        **sign(key, notice.id, int(now), body),
        "content-type": "application/json",
        "user-agent": "consent-flow-webhooks",
    }
    try:
        async with asyncio.timeout(deadline):
            request = client.build_request("POST", url, content=body, headers=headers)
            # The answer's body is never read: a status and Retry-After are all that count.
            response = await client.send(request, stream=True, follow_redirects=False)
            await response.aclose()
    except TimeoutError:
        return Attempt(Delivery.RETRY, error="TimeoutError")
    except httpx.HTTPError as exc:
        return Attempt(Delivery.RETRY, error=type(exc).__name__)
    return Attempt(
        classify(response.status_code),
        status=response.status_code,
        retry_after=parse_retry_after(response.headers.get("retry-after"), now),
    )


class WebhookSender:
    """Delivers notices from a worker: one attempt per call, counting the outcomes in Redis."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        keys: Keys,
        *,
        retry: WebhookRetry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not settings.webhook_url:
            raise ValueError("CONSENT_WEBHOOK_URL is not set")
        self.url = settings.webhook_url
        self.key = parse_secret(settings.webhook_secret.reveal())
        self.redis = redis
        self.keys = keys
        self.retry = retry or WebhookRetry()
        self.clock = clock
        self.http = HttpClients(timeout=self.retry.timeout, max_idle=8, follow_redirects=False)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def attempt(self, notice: Notice, attempt: int) -> float | None:
        """Attempt number ``attempt`` (1 for the first) to deliver ``notice``. Returns the
        seconds to wait before the next attempt, or None when the notice is done with
        (delivered, or counted as a dead letter)."""
        fields: dict[str, Any] = {
            "notice_id": notice.id,
            "notice_kind": notice.kind.value,
            "user": notice.user,
            "attempt": attempt,
            "receiver": _origin(self.url),
        }
        if attempt > self.retry.max_attempts:
            # The worker running the last attempt died: that attempt counts.
            await self._dead(notice, fields, why="max_attempts")
            return None
        async with self.http.lease() as client:
            result = await post_notice(
                client, self.url, self.key, notice, now=self.clock(), deadline=self.retry.deadline
            )
        fields.update(status=result.status, error=result.error)
        if result.outcome is Delivery.DELIVERED:
            await self._count(Delivery.DELIVERED.value)
            log.info("webhook_delivered", **fields)
            return None
        if result.outcome is Delivery.GONE:
            await self._dead(notice, fields, why="gone")
            return None
        if attempt >= self.retry.max_attempts:
            await self._dead(notice, fields, why="max_attempts")
            return None
        delay = self.retry.delay(attempt, result.retry_after)
        await self._count("retried")
        log.warning("webhook_retry", retry_in_s=round(delay, 3), **fields)
        return delay

    async def _dead(self, notice: Notice, fields: dict[str, Any], *, why: str) -> None:
        await self._count("dead")
        log.error("webhook_dead", why=why, **fields)

    async def _count(self, outcome: str) -> None:
        await self.redis.hincrby(self.keys.webhook_counts, outcome, 1)


def commit_notice(notice: Notice, *, retry: WebhookRetry | None = None) -> NoticeJob:
    """``notice`` as a commit carries it: queued only if the commit applies. Its id is kept as
    long as any attempt may run, and as long as the event that caused it may come again."""
    retry = retry or WebhookRetry()
    return NoticeJob(notice.id, notice.to_job(), keep_for=retry.longest + WEBHOOK_DEDUP_WINDOW)


def notice_job(
    queue: JobQueue, settings: Settings, notice: Notice, *, retry: WebhookRetry | None = None
) -> QueuedJob | None:
    """The job that delivers ``notice`` (for a commit script to write with its own changes), or
    None when no webhook URL is configured. Its id is the notice's: arq refuses a second one
    while the first is queued, retrying, or remembered as done."""
    if not settings.webhook_url:
        return None
    retry = retry or WebhookRetry()
    # The user's shard, where a commit would queue the same notice.
    shard = Keys(settings.redis_prefix, shards=settings.redis_shards).of(notice.user)
    return queue.job(
        WEBHOOK_JOB,
        (notice.to_job(),),
        # The prefix: deployments sharing one Redis share arq's job keys.
        job_id=shard.job_id(f"wh:{settings.redis_prefix}:{notice.id}"),
        queue=shard.queue(settings.queue_name),
        # The job key must outlive every attempt: arq keeps it across retries, never renews it.
        expires_ms=int((retry.longest + WEBHOOK_DEDUP_WINDOW) * 1000),
    )


async def queue_notice(
    queue: JobQueue, settings: Settings, notice: Notice, *, retry: WebhookRetry | None = None
) -> bool:
    """Queue ``notice`` for delivery. False when webhooks are off or the notice is already
    queued, retrying or delivered (within :data:`WEBHOOK_DEDUP_WINDOW`)."""
    job = notice_job(queue, settings, notice, retry=retry)
    if job is None:
        return False
    return await queue.put(job)
