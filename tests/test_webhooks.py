"""Signed webhooks: notices, payloads and signatures, and delivery through the real queue and
worker to a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import free_port, provision, stored_tokens
from standardwebhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs

from consent_flow import Event, Settings, State
from consent_flow.engine.webhooks import (
    Attempt,
    Delivery,
    Notice,
    NoticeKind,
    WebhookRetry,
    classify,
    notice_kind,
    parse_secret,
    post_notice,
    queue_notice,
    refresh_notice_kind,
    sign,
)
from consent_flow.queue.jobs import JobQueue
from consent_flow.settings import Secret
from consent_flow.store.metrics import read_snapshot

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
KEY = parse_secret(SECRET)


def notice(user: str = "alice", kind: NoticeKind = NoticeKind.REVOKED, **kw: Any) -> Notice:
    values: dict[str, Any] = {
        "at": 1_764_556_800.25,
        "cause": "ev-" + user,
        "from_state": State.PROVISIONED,
        "to_state": State.REVOKED,
        "reason": "user asked",
    }
    values.update(kw)
    return Notice.of(kind, user, **values)


# --- the pure part -------------------------------------------------------------------------


def test_payload_is_the_standard_webhooks_envelope():
    n = notice()
    assert n.payload() == {
        "type": "connection.revoked",
        "timestamp": "2025-12-01T02:40:00.250Z",
        "data": {
            "user": "alice",
            "provider": "default",
            "from": "provisioned",
            "to": "revoked",
            "reason": "user asked",
        },
    }
    assert json.loads(n.body()) == n.payload()
    assert n.body() == Notice.from_job(json.loads(json.dumps(n.to_job()))).body()


def test_a_notice_id_is_stable_for_its_cause_and_distinct_otherwise():
    assert notice().id == notice().id
    assert notice().id.startswith("msg_")
    assert notice().id != notice(cause="ev-other").id
    assert notice().id != notice(kind=NoticeKind.REFRESH_REJECTED).id
    assert notice().id != notice("bob", cause="ev-alice").id
    assert notice(cause=None).id != notice(cause=None).id


def test_a_token_shaped_reason_is_scrubbed_from_the_payload():
    n = notice(reason="provider said access_token=abc.def.ghi and Bearer abcdefghijkl")
    reason = n.payload()["data"]["reason"]
    assert "abc.def.ghi" not in reason
    assert "abcdefghijkl" not in reason


def test_signature_verifies_with_standardwebhooks_and_a_tampered_body_does_not():
    n = notice()
    now = int(time.time())
    headers = sign(KEY, n.id, now, n.body())
    assert Webhook(SECRET).verify(n.body(), headers) == n.payload()
    tampered = n.body().replace(b"user asked", b"user asks")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, headers)
    # The specification's construction, by hand: base64 HMAC-SHA256 of "id.timestamp.body".
    mac = hmac.new(KEY, f"{n.id}.{now}.".encode() + n.body(), hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()
    assert headers["webhook-id"] == n.id
    assert headers["webhook-timestamp"] == str(now)


@pytest.mark.parametrize(
    "bad",
    [
        base64.b64encode(os.urandom(32)).decode(),  # no prefix
        "whsec_" + "not*base64!",
        "whsec_" + base64.b64encode(os.urandom(16)).decode(),  # too short
        "whsec_" + base64.b64encode(os.urandom(65)).decode(),  # too long
    ],
    # Explicit ids: random values differ per process, and xdist workers must collect the same.
    ids=["no-prefix", "not-base64", "too-short", "too-long"],
)
def test_malformed_secrets_are_refused_without_echo(bad):
    with pytest.raises(ValueError, match="must") as info:
        parse_secret(bad)
    assert bad.removeprefix("whsec_") not in str(info.value)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Delivery.DELIVERED),
        (204, Delivery.DELIVERED),
        (299, Delivery.DELIVERED),
        (410, Delivery.GONE),
        (301, Delivery.RETRY),
        (400, Delivery.RETRY),
        (404, Delivery.RETRY),
        (429, Delivery.RETRY),
        (500, Delivery.RETRY),
        (503, Delivery.RETRY),
    ],
)
def test_what_an_answer_means(status, outcome):
    assert classify(status) is outcome


def test_backoff_doubles_with_jitter_and_honours_retry_after_within_the_cap():
    retry = WebhookRetry(base=1.0, cap=8.0, max_attempts=6)
    for attempt, raw in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [retry.delay(attempt) for _ in range(200)]
        assert all(raw / 2 <= d <= raw for d in delays)
        assert max(delays) - min(delays) > raw / 10  # jittered
    assert retry.delay(1, retry_after=5.0) == 5.0
    assert retry.delay(1, retry_after=3600.0) == 8.0
    assert retry.longest == 5 * 8.0 + 6 * retry.deadline
    with pytest.raises(ValueError, match="cap must be under"):
        WebhookRetry(cap=100_000.0)


@pytest.mark.parametrize(
    ("event", "source", "dest", "kind"),
    [
        (Event.AUTHORIZATION_COMPLETED, State.PENDING, State.PROVISIONED, "provisioned"),
        (Event.AUTHORIZATION_COMPLETED, State.PROVISIONED, State.PROVISIONED, "upgraded"),
        (Event.REVOKE_REQUESTED, State.PROVISIONED, State.REVOKED, "revoked"),
        (Event.REVOKE_REQUESTED, State.PENDING, State.REVOKED, "revoked"),
        (Event.REVOKE_REQUESTED, State.REVOKED, State.REVOKED, None),
        (Event.REFRESH_REJECTED, State.PROVISIONED, State.REVOKED, "refresh_rejected"),
        (Event.PROVISION_REQUESTED, State.UNPROVISIONED, State.PENDING, None),
        (Event.AUTHORIZATION_FAILED, State.PENDING, State.UNPROVISIONED, None),
        (Event.SESSION_EXPIRED, State.PENDING, State.UNPROVISIONED, None),
        (Event.TOKEN_REFRESHED, State.PROVISIONED, State.PROVISIONED, None),
        (Event.GRANT_IMPORTED, State.UNPROVISIONED, State.PROVISIONED, "provisioned"),
        (Event.GRANT_IMPORTED, State.REVOKED, State.PROVISIONED, "provisioned"),
        (Event.GRANT_IMPORTED, State.PROVISIONED, State.PROVISIONED, None),
    ],
)
def test_which_transitions_make_a_notice(event, source, dest, kind):
    found = notice_kind(event, source, dest)
    assert (found.value if found else None) == kind


def test_refresh_failing_once_past_the_threshold_then_recovered():
    kinds = [refresh_notice_kind(n, n + 1, 3) for n in range(6)]
    assert kinds == [None, None, NoticeKind.REFRESH_FAILING, None, None, None]
    assert refresh_notice_kind(6, 0, 3) is NoticeKind.REFRESH_RECOVERED
    assert refresh_notice_kind(3, 0, 3) is NoticeKind.REFRESH_RECOVERED
    assert refresh_notice_kind(2, 0, 3) is None  # a short run stays quiet both ways
    assert refresh_notice_kind(0, 0, 3) is None


# --- a real receiver ---------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def user(self) -> str:
        return str(json.loads(self.body)["data"]["user"])

    @property
    def type(self) -> str:
        return str(json.loads(self.body)["type"])


Answer = Callable[[Received], Awaitable[tuple[int, dict[str, str]]]]


class Receiver:
    """A small HTTP/1.1 server on a free loopback port; ``answer`` decides each response."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[Received] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/consent"

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Received(headers, body)
            async with self._arrived:
                self.requests.append(request)
                self._arrived.notify_all()
            status, extra = await self.answer(request)
            more = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            head = f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n"
            writer.write(f"{head}{more}\r\n".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def of(self, user: str) -> list[Received]:
        return [r for r in self.requests if r.user == user]

    async def wait_for(self, check: Callable[[], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(check)


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[Answer], Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def make(answer: Answer) -> Receiver:
        r = await Receiver(answer).start()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.close()


def answering(*statuses: int, then: int = 200, delay: float = 0.0) -> Answer:
    """Answers each request with the next status, and ``then`` once they run out."""
    queue = list(statuses)

    async def answer(_request: Received) -> tuple[int, dict[str, str]]:
        if delay:
            await asyncio.sleep(delay)
        return (queue.pop(0) if queue else then), {}

    return answer


async def test_one_attempt_against_a_real_receiver_follows_no_redirect_and_reads_retry_after(
    receiver,
):
    async def answer(request: Received) -> tuple[int, dict[str, str]]:
        kind = json.loads(request.body)["type"]
        if kind == "connection.revoked":
            return 307, {"Location": "http://127.0.0.1:1/elsewhere"}
        if kind == "connection.refresh_rejected":
            return 429, {"Retry-After": "7"}
        await asyncio.sleep(5)  # never in time
        return 200, {}

    r = await receiver(answer)
    now = time.time()
    async with httpx.AsyncClient() as client:
        moved = await post_notice(client, r.url, KEY, notice(), now=now)
        slow = await post_notice(
            client, r.url, KEY, notice(kind=NoticeKind.REFRESH_REJECTED), now=now
        )
        hung = await post_notice(
            client, r.url, KEY, notice(kind=NoticeKind.PROVISIONED), now=now, deadline=0.3
        )
        refused = await post_notice(
            client, f"http://127.0.0.1:{free_port()}/", KEY, notice(), now=now
        )
    assert moved == Attempt(Delivery.RETRY, status=307)
    assert slow == Attempt(Delivery.RETRY, status=429, retry_after=7.0)
    assert hung == Attempt(Delivery.RETRY, error="TimeoutError")
    assert refused == Attempt(Delivery.RETRY, error="ConnectError")
    assert len(r.requests) == 3  # the redirect was not followed
    assert r.requests[0].headers["content-type"] == "application/json"


# --- through the queue and a worker -------------------------------------------------------


def fast(max_attempts: int = 8, deadline: float = 3.0) -> dict[str, Any]:
    retry = WebhookRetry(
        base=0.05,
        cap=0.3,
        max_attempts=max_attempts,
        deadline=deadline,
        timeout=httpx.Timeout(2.0),
    )
    return {"webhook_retry": retry}


async def webhook_stack(make_stack, url: str, max_attempts: int = 8, deadline: float = 3.0):
    return await make_stack(
        webhook_url=url,
        webhook_secret=Secret(SECRET),
        worker_options=fast(max_attempts, deadline),
    )


async def counts(stack) -> dict[str, int]:
    snapshot = await read_snapshot(
        stack.client.pool, stack.client.store.keys, stack.settings.queue_name
    )
    return snapshot.webhook_outcomes


async def test_a_delivered_notice_verifies_at_the_receiver(make_stack, receiver):
    r = await receiver(answering())
    stack = await webhook_stack(make_stack, r.url)
    n = notice()
    assert await queue_notice(JobQueue(stack.client.pool), stack.settings, n)
    await r.wait_for(lambda: len(r.requests) == 1)
    got = r.requests[0]
    assert Webhook(SECRET).verify(got.body, got.headers) == n.payload()
    assert got.headers["webhook-id"] == n.id
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(got.body.replace(b"alice", b"mallory"), got.headers)
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(got.body, got.headers)


async def test_a_receiver_failing_five_times_gets_the_notice_once_more_under_one_id(
    make_stack, receiver
):
    r = await receiver(answering(503, 500, 429, 404, 503))
    stack = await webhook_stack(make_stack, r.url)
    queue = JobQueue(stack.client.pool)
    n = notice()
    assert await queue_notice(queue, stack.settings, n)
    assert not await queue_notice(queue, stack.settings, n)  # queued twice: one delivery
    await r.wait_for(lambda: len(r.requests) == 6)
    await asyncio.sleep(0.2)
    assert await counts(stack) == {"retried": 5, "delivered": 1}
    assert not await queue_notice(queue, stack.settings, n)  # delivered: still one
    await asyncio.sleep(0.5)
    assert len(r.requests) == 6
    assert {q.headers["webhook-id"] for q in r.requests} == {n.id}
    assert {q.body for q in r.requests} == {n.body()}
    for q in r.requests:
        assert Webhook(SECRET).verify(q.body, q.headers) == n.payload()
    gaps = [b.at - a.at for a, b in zip(r.requests, r.requests[1:], strict=False)]
    assert all(g >= 0.02 for g in gaps)  # backed off, not hammered


async def test_a_receiver_down_for_good_blocks_neither_events_nor_other_deliveries(
    make_stack, receiver
):
    async def answer(request: Received) -> tuple[int, dict[str, str]]:
        if request.user == "dave":
            await asyncio.sleep(0.5)  # slow, then failing, for every notice about dave
            return 503, {}
        return 204, {}

    r = await receiver(answer)
    stack = await webhook_stack(make_stack, r.url, max_attempts=4)
    queue = JobQueue(stack.client.pool)
    with capture_logs() as logs:
        await queue_notice(queue, stack.settings, notice("dave"))
        await r.wait_for(lambda: len(r.of("dave")) == 1)
        await queue_notice(queue, stack.settings, notice("erin"))
        await r.wait_for(lambda: len(r.of("erin")) == 1, timeout=3)
        started = time.monotonic()
        status = await stack.client.request_provisioning("frank")
        applied_in = time.monotonic() - started
        assert status.state == "pending"
        assert len(r.of("dave")) < 4, "erin and frank waited for dave's retries"
        await r.wait_for(lambda: len(r.of("dave")) == 4)
        await asyncio.sleep(1.0)
    assert applied_in < 2.0
    assert len(r.of("dave")) == 4  # bounded
    assert len({q.headers["webhook-id"] for q in r.of("dave")}) == 1
    assert await counts(stack) == {"delivered": 1, "retried": 3, "dead": 1}
    dead = [e for e in logs if e["event"] == "webhook_dead"]
    assert len(dead) == 1
    assert dead[0]["user"] == "dave"
    assert dead[0]["attempt"] == 4
    assert dead[0]["status"] == 503

    snapshot = await read_snapshot(
        stack.client.pool, stack.client.store.keys, stack.settings.queue_name
    )
    assert snapshot.public()["webhooks_dead"] == 1
    async with httpx.AsyncClient() as http:
        metrics = await http.get(f"http://127.0.0.1:{stack.settings.http_port}/metrics")
    assert 'consent_flow_webhook_deliveries_total{outcome="dead"} 1.0' in metrics.text
    assert 'consent_flow_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics.text


async def test_gone_stops_at_once(make_stack, receiver):
    r = await receiver(answering(410))
    stack = await webhook_stack(make_stack, r.url, max_attempts=3)
    await queue_notice(JobQueue(stack.client.pool), stack.settings, notice("gina"))
    await r.wait_for(lambda: len(r.requests) == 1)
    await asyncio.sleep(0.5)
    assert len(r.requests) == 1
    assert await counts(stack) == {"dead": 1}


async def test_a_refused_connection_is_retried_to_the_bound(make_stack):
    stack = await webhook_stack(make_stack, f"http://127.0.0.1:{free_port()}/", max_attempts=3)
    await queue_notice(JobQueue(stack.client.pool), stack.settings, notice("hank"))
    deadline = time.monotonic() + 10
    while (await counts(stack)).get("dead", 0) < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await counts(stack) == {"dead": 1, "retried": 2}


async def test_no_token_or_secret_in_a_payload_or_a_log_line(make_stack, receiver):
    failing = NoticeKind.REFRESH_FAILING.type
    answer_failing = answering(503, 503)

    async def answer(request: Received) -> tuple[int, dict[str, str]]:
        # Only the notice under test is retried: provisioning's own notice goes to the same
        # receiver, at a time of its own.
        return await answer_failing(request) if request.type == failing else (200, {})

    r = await receiver(answer)
    # Three attempts must arrive: a deadline a loaded machine cannot cut short (this test is
    # about what the payloads and log lines hold, not about when the retries go out).
    stack = await webhook_stack(make_stack, r.url, deadline=30.0)
    await provision(stack, "alice")
    tokens = await stored_tokens(stack, "alice")
    secrets = [v for v in tokens.values() if isinstance(v, str) and len(v) > 8]
    assert secrets
    secrets += [SECRET, SECRET.removeprefix("whsec_")]
    with capture_logs() as logs:
        n = notice(
            kind=NoticeKind.REFRESH_FAILING,
            from_state=State.PROVISIONED,
            to_state=State.PROVISIONED,
            reason=f"provider said refresh_token={tokens['refresh_token']}",
        )
        await queue_notice(JobQueue(stack.client.pool), stack.settings, n)
        await r.wait_for(lambda: sum(q.type == failing for q in r.requests) == 3)
        await asyncio.sleep(0.2)
    signatures = [q.headers["webhook-signature"].split(",", 1)[1] for q in r.requests]
    logged = json.dumps(logs, default=str)
    assert any(e["event"] == "webhook_delivered" for e in logs)
    for secret in [*secrets, *signatures]:
        assert secret not in logged
        for q in r.requests:
            assert secret.encode() not in q.body
    assert r.url not in logged  # the receiver's path may carry a credential of its own
    first = next(q for q in r.requests if q.type == failing)
    assert set(json.loads(first.body)["data"]) == {
        "user",
        "provider",
        "from",
        "to",
        "reason",
    }


async def test_queue_notice_without_a_webhook_url_queues_nothing(settings: Settings, make_stack):
    stack = await make_stack()
    assert stack.settings.webhook_url is None
    n = notice()
    assert not await queue_notice(JobQueue(stack.client.pool), stack.settings, n)
    assert not await stack.client.pool.exists(f"arq:job:wh:{stack.settings.redis_prefix}:{n.id}")


def test_a_webhook_attempt_always_ends_before_arqs_job_timeout():
    from workers import worker_settings

    options = worker_settings(Settings(), "redis://127.0.0.1:1/0", job_timeout=5)
    deliver = next(f for f in options["functions"] if f.name == "deliver_webhook")
    assert deliver.max_tries == WebhookRetry().max_attempts + 1
    with pytest.raises(ValueError, match="shorter than job_timeout"):
        worker_settings(
            Settings(), "redis://127.0.0.1:1/0", job_timeout=5, webhook_retry=WebhookRetry()
        )
