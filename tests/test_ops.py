"""The operators' routes: /metrics against what Redis holds, /ops in headless Chromium, access.

Hundreds of users are seeded through ``RedisStore.commit`` with the changes the engine makes on
each transition path (provisioning through the provider for each would take minutes); two users
go through the real provider beside them. Refresh figures are recorded by ``MetricsRecorder``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import uvicorn
from conftest import free_port, provision, stored_tokens
from local_provider import approve
from prerequisites import ChromiumNotFound, find_chromium
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from consent_flow import ConsentClient, Event, State, consent_routes
from consent_flow.core.records import (
    MAX_REASON_LENGTH,
    MAX_USER_LENGTH,
    Change,
    RecordFields,
    iso,
)
from consent_flow.core.table import TRANSITIONS, ConsentMachine, Facts
from consent_flow.engine.engine import SESSION_FIELDS, TOKEN_FIELDS
from consent_flow.queue.bus import new_id
from consent_flow.settings import Secret
from consent_flow.store.metrics import LEAD_BUCKETS, MetricsRecorder
from consent_flow.store.redis_store import Keys, state_hash
from consent_flow.store.vault import seal_tokens
from consent_flow.web.callback import PageKind
from consent_flow.web.callback import page as result_page
from consent_flow.web.ops import ops_routes

pytestmark = pytest.mark.integration

U, P, V, R = State.UNPROVISIONED, State.PENDING, State.PROVISIONED, State.REVOKED
MACHINE = ConsentMachine()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# A user id that is markup, with the characters URLs and attributes treat specially.
HOSTILE_USER = "<img/src=x>&\"'#?%"
HOSTILE_REASON = 'access_denied: <b>no</b> & "never"'
LEADS = [-2.0, 0.0, 4.9, 5.0, 12.0, 30.0, 59.5, 100.0, 118.0, 119.9] * 4  # seconds
FAILURES, REJECTIONS, CLIENT_REJECTIONS = 7, 3, 1
DUE_SOON = 30  # seeded grants whose refresh falls due within the hour


# --- seeding --------------------------------------------------------------------------------


@dataclass
class Seeded:
    """What was written, for the expectations."""

    since: dict[str, tuple[State, float]] = field(default_factory=dict)
    transitions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    histories: dict[str, list[tuple[str, str, str, str, str | None]]] = field(default_factory=dict)
    due_next_hour: int = 0

    def users(self, state: State) -> list[str]:
        """Users in ``state``, in the index's order: by since, then by id."""
        rows = [(at, user) for user, (s, at) in self.since.items() if s is state]
        return [user for _, user in sorted(rows)]

    def counts(self) -> dict[str, int]:
        return {state.value: len(self.users(state)) for state in State}


class Seeder:
    """Commits realistic changes: the fields, sessions and schedules the engine writes."""

    def __init__(self, client: ConsentClient, seeded: Seeded) -> None:
        self.store = client.store
        self.ring = client.ring
        self.ttl = client.settings.session_ttl
        self.margin = client.settings.refresh_margin
        self.seeded = seeded

    def _tokens(self, user: str, at: float, due: float) -> RecordFields:
        tokens = {"access_token": secrets.token_hex(16), "refresh_token": new_id()}
        return {
            "tokens": seal_tokens(self.ring, user, tokens),
            "expires_at": due + self.margin,
            "scopes": ("openid", "offline_access", "notes:read"),
            "next_refresh_at": due,
            "last_refresh_at": at,
            "refresh_failures": 0,
        }

    async def path(self, user: str, steps: list[tuple[Any, ...]]) -> None:
        """Run ``steps`` of ``(event, at, actor, reason[, due])`` for one user, in order."""
        state, version, session_state = U, 0, None
        history = self.seeded.histories.setdefault(user, [])
        for event, at, actor, reason, *rest in steps:
            # Only paths the machine allows; each callback names the open session, each
            # expiry comes after the session's.
            row = MACHINE.decide(state, event, Facts(session_matches=True, session_lapsed=True))
            to = row.dest or state
            extra: dict[str, Any] = {}
            if event is Event.PROVISION_REQUESTED:
                session_state = secrets.token_urlsafe(32)
                session = json.dumps(
                    {
                        "state": session_state,
                        "verifier": secrets.token_urlsafe(48),
                        "nonce": secrets.token_urlsafe(16),
                        "url": f"https://id.example/authorize?state={session_state}",
                    }
                )
                extra = dict(
                    fields={
                        "session": self.ring.encrypt(
                            session.encode(), user=user, purpose="session"
                        ),
                        "session_id": new_id(),
                        "session_expires_at": at + self.ttl,
                        "session_digest": state_hash(session_state),
                    },
                    clear=("session_claim", "reason", *TOKEN_FIELDS),
                    session_lookup=(state_hash(session_state), self.ttl),
                    unschedule=True,
                )
            elif event is Event.AUTHORIZATION_COMPLETED:
                due = rest[0]
                fields = self._tokens(user, at, due)
                fields["subject"] = user
                extra = dict(
                    fields=fields,
                    clear=(*SESSION_FIELDS, "last_refresh_error", "reason"),
                    drop_session_lookup=state_hash(session_state or ""),
                    schedule_at=due,
                )
            elif event in (Event.AUTHORIZATION_FAILED, Event.SESSION_EXPIRED):
                extra = dict(
                    clear=SESSION_FIELDS,
                    drop_session_lookup=state_hash(session_state or ""),
                )
            elif event is Event.TOKEN_REFRESHED:
                due = rest[0]
                extra = dict(
                    fields=self._tokens(user, at, due),
                    clear=("last_refresh_error", "inflight"),
                    schedule_at=due,
                )
            elif event is Event.REFRESH_REJECTED:
                extra = dict(clear=TOKEN_FIELDS, unschedule=True)
            elif event is Event.REVOKE_REQUESTED:
                extra = dict(clear=(*SESSION_FIELDS, *TOKEN_FIELDS), unschedule=True)
                if state is P:
                    extra["drop_session_lookup"] = state_hash(session_state or "")
            change = Change(
                user=user,
                event=event,
                event_id=new_id(),
                expect_state=state,
                expect_version=version,
                to_state=to,
                actor=actor,
                at=at,
                reason=reason,
                correlation_id=new_id(),
                **extra,
            )
            result = await self.store.commit(change)
            assert result.ok, (user, event, result)
            self.seeded.transitions[(event.value, state.value, to.value)] += 1
            history.append((event.value, state.value, to.value, actor, reason))
            if to is not state or version == 0:
                self.seeded.since[user] = (to, at)
            state, version = to, result.version


async def seed(client: ConsentClient, seeded: Seeded | None = None) -> Seeded:
    """150 provisioned, 100 pending, 80 unprovisioned after failing, 70 revoked."""
    seeded = seeded or Seeded()
    seeder = Seeder(client, seeded)
    now = time.time()
    day = 86400.0
    paths: list[tuple[str, list[tuple[Any, ...]]]] = []
    for i in range(150):
        start = now - 30 * day + i * 9000
        # 30 refresh within the hour, the rest later today or tomorrow; 40 refreshed once.
        due = now + 300 + i * 60 if i < DUE_SOON else now + 2 * 3600 + i * 300
        steps: list[tuple[Any, ...]] = [
            (Event.PROVISION_REQUESTED, start, "user", None),
            (Event.AUTHORIZATION_COMPLETED, start + 40, "browser", None, due),
        ]
        if 100 <= i < 140:
            # Due in the future already: a live worker takes any due schedule for a real one.
            steps[-1] = (*steps[-1][:4], due)
            steps.append((Event.TOKEN_REFRESHED, start + 3600, "worker", None, due))
        paths.append((f"prov-{i:03d}", steps))
    for i in range(100):
        at = now - 200 + i  # younger than the session TTL: the cleanup job leaves them be
        steps = [(Event.PROVISION_REQUESTED, at, "user", None)]
        if i % 10 == 0:  # asked before, denied, asking again
            steps = [
                (Event.PROVISION_REQUESTED, at - 2 * day, "user", None),
                (Event.AUTHORIZATION_FAILED, at - 2 * day + 30, "browser", "access_denied"),
                *steps,
            ]
        paths.append((f"pend-{i:03d}", steps))
    for i in range(80):
        start = now - 10 * day + i * 4000
        user = HOSTILE_USER if i == 0 else f"unpr-{i:03d}"
        if i < 50:
            end = (Event.AUTHORIZATION_FAILED, start + 25, "browser", "access_denied: not now")
            if i == 0:
                end = (Event.AUTHORIZATION_FAILED, start + 25, "browser", HOSTILE_REASON)
        else:
            end = (Event.SESSION_EXPIRED, start + 600, "worker", "authorization session expired")
        paths.append((user, [(Event.PROVISION_REQUESTED, start, "user", None), end]))
    for i in range(70):
        start = now - 20 * day + i * 6000
        later = now + 5 * 3600
        steps = [(Event.PROVISION_REQUESTED, start, "user", None)]
        if i < 10:  # changed their mind before approving
            steps.append((Event.REVOKE_REQUESTED, start + 60, "user", "no longer needed"))
        else:
            steps.append((Event.AUTHORIZATION_COMPLETED, start + 30, "browser", None, later))
            if i < 50:
                steps.append((Event.REVOKE_REQUESTED, start + day, "operator:dana", "offboarded"))
            else:
                steps.append(
                    (
                        Event.REFRESH_REJECTED,
                        start + 2 * day,
                        "worker",
                        "refresh token rejected by provider: invalid_grant",
                    )
                )
        paths.append((f"rev-{i:03d}", steps))
    seeded.due_next_hour += DUE_SOON
    # Ten users at a time: each concurrent commit may open a connection of its own, and fifty
    # connecting at once to a Redis starved of CPU (pytest-xdist workers beside it) can exceed
    # arq's one-second connect timeout.
    for chunk in range(0, len(paths), 10):
        await asyncio.gather(*(seeder.path(u, s) for u, s in paths[chunk : chunk + 10]))
    return seeded


async def real_users(stack: Any, seeded: Seeded) -> None:
    """alice approves at the real provider, bob denies: the engine writes these two."""
    response = await provision(stack, "alice")
    assert response.status_code == 200, response.text
    status = await stack.client.request_provisioning("bob")
    denied = await approve(status.authorization_url, "bob", deny=True)
    assert (await stack.callback(denied)).status_code == 403
    for user in ("alice", "bob"):
        rec = await stack.client.store.load(user)
        assert rec.since is not None
        seeded.since[user] = (rec.state, rec.since)
        seeded.histories[user] = [
            (h.event, h.from_state, h.to_state, h.actor, h.reason)
            for h in await stack.client.store.history(user)
        ]
        for event, from_, to, *_ in seeded.histories[user]:
            seeded.transitions[(event, from_, to)] += 1
    seeded.due_next_hour += 1  # alice: 3600 s tokens, refreshed a margin before expiry
    assert [s for s, _ in (seeded.since["alice"], seeded.since["bob"])] == [V, U]


async def record_refreshes(client: ConsentClient) -> None:
    recorder = MetricsRecorder(client.pool, client.store.keys)
    for lead in LEADS:
        await recorder.refresh("success", user="alice", lead=lead)
    for _ in range(FAILURES):
        await recorder.refresh("transient_failure", user="alice")
    for _ in range(REJECTIONS):
        await recorder.refresh("rejected", user="bob")
    for _ in range(CLIENT_REJECTIONS):
        await recorder.refresh("client_rejected", user="bob")


# --- serving --------------------------------------------------------------------------------


def ops_app(client: ConsentClient) -> Starlette:
    return Starlette(routes=consent_routes(client) + ops_routes(client))


def asgi(client: ConsentClient, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=ops_app(client), client=(host, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080")


@contextlib.asynccontextmanager
async def serve(client: ConsentClient) -> AsyncIterator[str]:
    """The routes on a real port, as ``serve`` would run them."""
    port = free_port()
    config = uvicorn.Config(
        ops_app(client), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "ops server did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def chromium(**context_options: Any) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    try:
        executable = find_chromium()
    except ChromiumNotFound as exc:
        pytest.fail(str(exc))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(**context_options)
            yield await context.new_page()
        finally:
            await browser.close()


# --- /metrics -------------------------------------------------------------------------------


def samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = list(family.samples)
    return out


def by_label(rows: list[Any], name: str, *labels: str) -> dict[Any, float]:
    picked = [s for s in rows if s.name == name]
    return {
        (s.labels[labels[0]] if len(labels) == 1 else tuple(s.labels[k] for k in labels)): s.value
        for s in picked
    }


async def test_metrics_report_what_redis_holds(stack, settings):
    seeded = Seeded()
    await real_users(stack, seeded)
    await seed(stack.client, seeded)
    await record_refreshes(stack.client)
    # A queue of its own, no worker on it: 4 jobs due now and 2 deferred, exactly.
    queue = settings.with_changes(queue_name=f"{settings.redis_prefix}:idle-queue")
    async with ConsentClient(queue) as idle:
        for n in range(6):
            # Spread over three shards' queues: the figures are sums over every shard.
            shard_queue = Keys.queue(queue.queue_name, n % 3)
            await idle.pool.enqueue_job(
                "noop", n, _defer_by=3600 if n >= 4 else None, _queue_name=shard_queue
            )
        async with asgi(idle) as http:
            response = await http.get("/metrics")
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert response.headers["cache-control"] == "no-store"
            got = samples(response.text)

            consents = by_label(got["consent_flow_consents"], "consent_flow_consents", "state")
            assert consents == seeded.counts()
            assert consents == {
                "unprovisioned": 81,
                "pending": 100,
                "provisioned": 151,
                "revoked": 70,
            }

            counted = by_label(
                got["consent_flow_transitions"],
                "consent_flow_transitions_total",
                "event",
                "from_state",
                "to_state",
            )
            assert {k: v for k, v in counted.items() if v} == dict(seeded.transitions)
            for row in TRANSITIONS:  # every row that writes is there from the start
                for source in (s for s in row.sources if row.changes):
                    assert (row.event.value, source.value, (row.dest or source).value) in counted

            outcomes = by_label(
                got["consent_flow_refresh"], "consent_flow_refresh_total", "outcome"
            )
            assert outcomes == {
                "success": len(LEADS),
                "transient_failure": FAILURES,
                "rejected": REJECTIONS,
                "client_rejected": CLIENT_REJECTIONS,
            }

            lead = got["consent_flow_refresh_lead_seconds"]
            buckets = [
                (float(s.labels["le"]), s.value)
                for s in lead
                if s.name == "consent_flow_refresh_lead_seconds_bucket"
            ]
            assert [b for b, _ in buckets] == sorted(b for b, _ in buckets)
            assert [b for b, _ in buckets] == list(LEAD_BUCKETS)
            values = [v for _, v in buckets]
            assert values == sorted(values), "cumulative buckets never decrease"
            for bound, value in buckets:
                assert value == sum(1 for x in LEADS if max(0.0, x) <= bound), bound
            (count,) = by_label(lead, "consent_flow_refresh_lead_seconds_count").values()
            (total,) = by_label(lead, "consent_flow_refresh_lead_seconds_sum").values()
            assert count == len(LEADS) == buckets[-1][1]
            assert math.isclose(total, sum(max(0.0, x) for x in LEADS), rel_tol=1e-9)

            def gauge(name: str) -> float:
                (value,) = by_label(got[f"consent_flow_{name}"], f"consent_flow_{name}").values()
                return value

            assert gauge("queue_depth") == 4
            assert gauge("deferred_jobs") == 2
            assert gauge("workers_alive") == 1
            assert gauge("refreshes_paused") == 0
            assert gauge("refreshes_due_next_hour") == seeded.due_next_hour == DUE_SOON + 1
            assert gauge("refresh_failures_24h") == FAILURES
            assert gauge("refresh_rejections_24h") == REJECTIONS

            # invalid_client halts refreshes for everyone: the gauge says so on the next scrape.
            await idle.pool.hset(idle.store.keys.halt, mapping={"reason": "invalid_client"})
            try:
                again = samples((await http.get("/metrics")).text)
            finally:
                await idle.pool.delete(idle.store.keys.halt)
            (paused,) = by_label(
                again["consent_flow_refreshes_paused"], "consent_flow_refreshes_paused"
            ).values()
            assert paused == 1

            # A scraper that asks for OpenMetrics gets it, and its parser agrees.
            om = await http.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.text.endswith("# EOF\n")
            names = {f.name: f for f in openmetrics_families(om.text)}
            assert names["consent_flow_consents"].type == "gauge"
            assert names["consent_flow_transitions"].type == "counter"
            assert names["consent_flow_refresh_lead_seconds"].type == "histogram"


# --- /ops in a real browser -----------------------------------------------------------------


async def texts(page: Any, selector: str) -> list[str]:
    return [t.strip() for t in await page.locator(selector).all_inner_texts()]


@pytest.mark.browser
async def test_ops_page_shows_states_pages_and_timelines_in_chromium(stack):
    seeded = Seeded()
    await real_users(stack, seeded)
    await seed(stack.client, seeded)
    await record_refreshes(stack.client)
    counts = seeded.counts()
    async with serve(stack.client) as base, chromium() as page:
        response = await page.goto(f"{base}/ops")
        assert response.status == 200
        headers = response.headers
        assert "default-src 'none'" in headers["content-security-policy"]
        assert "script-src" not in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"

        # Counts per state, as the index holds them.
        for state in State:
            row = page.locator(f"table#states tr.state-row[data-state='{state.value}']")
            assert (await row.locator("td.count").inner_text()) == str(counts[state.value])
        assert await page.locator("#total").inner_text() == str(sum(counts.values()))
        assert await page.locator("#fig-due-next-hour").inner_text() == str(DUE_SOON + 1)
        assert await page.locator("#fig-failures-24h").inner_text() == str(FAILURES)
        assert await page.locator("#fig-rejections-24h").inner_text() == str(REJECTIONS)
        assert await page.locator("#fig-workers-alive").inner_text() == "1"
        assert await page.locator("#fig-paused").inner_text() == "no"
        assert await page.locator("#outcome-success").inner_text() == str(len(LEADS))

        # Provisioned by default, 50 rows a page, oldest first; next walks the index.
        provisioned = seeded.users(V)
        assert await page.locator("#list").get_attribute("data-state") == "provisioned"
        assert await texts(page, "table#users tr.user-row td.user") == provisioned[:50]
        assert await page.locator("#range").inner_text() == "1\u201350 of 151"
        first_since = page.locator("table#users tr.user-row td.since time").first
        stamp = await first_since.get_attribute("datetime")
        assert stamp == iso(seeded.since[provisioned[0]][1])
        walked: list[str] = []
        while True:
            walked += await texts(page, "table#users tr.user-row td.user")
            if await page.locator("a#next").count() == 0:
                break
            await page.click("a#next")
        assert walked == provisioned
        assert await page.locator("#range").inner_text() == "151\u2013151 of 151"
        assert "offset=150" in page.url
        await page.click("a#prev")
        assert await page.locator("#range").inner_text() == "101\u2013150 of 151"

        # Another state from the counts table; a bigger page by query.
        await page.click("table#states tr.state-row[data-state='revoked'] td.state a")
        assert await texts(page, "table#users tr.user-row td.user") == seeded.users(R)[:50]
        await page.goto(f"{base}/ops?state=pending&limit=500")
        assert await texts(page, "table#users tr.user-row td.user") == seeded.users(P)
        assert await page.locator("span#next.disabled").count() == 1

        # The hostile id and reason are text, never markup, and its page is reachable.
        await page.goto(f"{base}/ops?state=unprovisioned")
        row = page.locator("table#users tr.user-row").first
        assert await row.locator("td.user").inner_text() == HOSTILE_USER
        assert await row.locator("td.reason").inner_text() == HOSTILE_REASON
        assert await page.locator("main img, main b").count() == 0
        await row.locator("td.user a").click()
        assert await page.locator("h1#user").inner_text() == HOSTILE_USER
        assert await texts(page, "#timeline tr.entry td.reason") == ["—", HOSTILE_REASON]
        assert await page.locator("main img, main b").count() == 0

        # A revoked user's timeline, entry by entry, oldest first; back to the list.
        user = "rev-020"
        await page.goto(f"{base}/ops?state=revoked&limit=500")
        await page.click(f"table#users tr.user-row[data-user='{user}'] td.user a")
        assert await page.locator("h1#user").inner_text() == user
        assert await page.locator("#status-state").inner_text() == "revoked"
        assert await page.locator("#status-reason").inner_text() == "offboarded"
        shown = list(
            zip(
                await texts(page, "#timeline tr.entry td.event"),
                await texts(page, "#timeline tr.entry td.from"),
                await texts(page, "#timeline tr.entry td.to"),
                await texts(page, "#timeline tr.entry td.actor"),
                await texts(page, "#timeline tr.entry td.reason"),
                strict=True,
            )
        )
        expected = [(e, f, t, a, r or "—") for e, f, t, a, r in seeded.histories[user]]
        assert shown == expected
        assert [e for e, *_ in shown] == [
            "provision_requested",
            "authorization_completed",
            "revoke_requested",
        ]
        stamps = [
            await t.get_attribute("datetime")
            for t in await page.locator("#timeline tr.entry td.at time").all()
        ]
        assert stamps == sorted(stamps)
        await page.click("a#back")
        assert await page.locator("#list").get_attribute("data-state") == "revoked"

        # alice went through the real provider: her status has no secret, her timeline is real.
        await page.goto(f"{base}/ops/users/alice")
        assert await page.locator("#status-state").inner_text() == "provisioned"
        assert await page.locator("#status-subject").inner_text() == "alice"
        assert await texts(page, "#timeline tr.entry td.event") == [
            "provision_requested",
            "authorization_completed",
        ]
        html_text = await page.content()
        tokens = await stored_tokens(stack, "alice")
        assert tokens["access_token"] not in html_text
        assert tokens["refresh_token"] not in html_text
        assert "v1." not in html_text
        await page.goto(f"{base}/ops/users/bob")
        assert await page.locator("#status-state").inner_text() == "unprovisioned"
        assert "access_denied" in await page.locator("#status-reason").inner_text()

        # Unknown users get a 404 page.
        missing = await page.goto(f"{base}/ops/users/nobody-here")
        assert missing.status == 404
        assert await page.locator("main#error h1").inner_text() == "Unknown user"


# --- bad requests ---------------------------------------------------------------------------


async def test_bad_query_values_get_400_and_unknown_users_404(settings):
    async with ConsentClient(settings) as client:
        seeded = await seed(client)
        async with asgi(client) as http:
            for query in (
                "state=nope",
                "state=revoked&state=pending",
                "offset=-1",
                "offset=abc",
                "offset=1e3",
                "limit=0",
                "limit=501",
                "limit=99999999999",
            ):
                response = await http.get(f"/ops?{query}")
                assert response.status_code == 400, query
                assert "default-src 'none'" in response.headers["content-security-policy"]
                assert "<script" not in response.text
            ok = await http.get("/ops?state=revoked&limit=500&offset=0")
            assert ok.status_code == 200
            assert ok.text.count('class="user-row"') == len(seeded.users(R))
            beyond = await http.get("/ops?state=revoked&offset=1000")
            assert beyond.status_code == 200
            assert 'id="no-users"' in beyond.text
            assert (await http.get("/ops/users/nobody")).status_code == 404
            # The id is decoded from the path, slashes and all.
            path = "/ops/users/" + "%3Cimg%2Fsrc%3Dx%3E%26%22%27%23%3F%25"
            hostile = await http.get(path)
            assert hostile.status_code == 200
            assert "<img" not in hostile.text
            assert "&lt;img/src=x&gt;&amp;&#34;&#39;#?%" in hostile.text  # markupsafe's escapes


# --- access ---------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.browser
async def test_token_is_required_when_set(settings):
    token = secrets.token_urlsafe(24)
    async with ConsentClient(settings.with_changes(ops_token=Secret(token))) as client:
        await seed(client)
        async with serve(client) as base, httpx.AsyncClient(base_url=base) as http:
            for path in ("/ops", "/metrics", "/ops/users/prov-001"):
                refused = await http.get(path)  # loopback is not enough once a token is set
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"] == 'Basic realm="consent-flow operators"'
                assert "prov-001" not in refused.text
                for wrong in (
                    basic("ops", token + "x"),
                    basic("ops", ""),
                    "Bearer " + token[:-1],
                    "Basic not-base64!",
                    "Basic " + base64.b64encode(token.encode()).decode(),  # no colon
                    token,
                ):
                    response = await http.get(path, headers={"Authorization": wrong})
                    assert response.status_code == 401, (path, wrong)
                for right in (basic("anyone", token), basic("", token), f"Bearer {token}"):
                    response = await http.get(path, headers={"Authorization": right})
                    assert response.status_code == 200, (path, right)
            # The /oauth/callback and /healthz routes beside them stay public.
            assert (await http.get("/healthz")).status_code in (200, 503)
        async with asgi(client, host="203.0.113.7") as remote:
            response = await remote.get("/ops", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200

        # A browser answers the Basic challenge with the operator's credentials.
        async with (
            serve(client) as base,
            chromium(http_credentials={"username": "ops", "password": token}) as page,
        ):
            response = await page.goto(f"{base}/ops?state=pending")
            assert response.status == 200
            assert await page.locator("table#users tr.user-row").count() == 50


async def test_without_token_only_loopback_clients_are_served(settings):
    assert not settings.ops_token
    async with ConsentClient(settings) as client:
        for host in ("203.0.113.7", "10.0.0.5", "2001:db8::1", "testclient"):
            async with asgi(client, host=host) as http:
                for path in ("/ops", "/metrics", "/ops/users/alice"):
                    response = await http.get(path)
                    assert response.status_code == 403, (host, path)
                    assert "this machine only" in response.text
        for host in ("127.0.0.1", "::1", "127.0.0.2", "::ffff:127.0.0.1"):
            async with asgi(client, host=host) as http:
                assert (await http.get("/ops")).status_code == 200, host
                assert (await http.get("/metrics")).status_code == 200, host
        async with asgi(client) as http:
            # Through a reverse proxy on this machine every client looks local: not trusted.
            for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                response = await http.get("/ops", headers={header: "203.0.113.7"})
                assert response.status_code == 403, header


@contextlib.asynccontextmanager
async def tcp_forwarder(target_port: int) -> AsyncIterator[int]:
    """A plain TCP forwarder on this machine (what `socat`, `ssh -L`, Docker's userland proxy
    or a stream proxy do): bytes in, bytes out, no header added. Yields its port."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_same_host_forwarder_in_front_of_a_loopback_only_server(settings):
    """What the loopback-only guard (no CONSENT_OPS_TOKEN) can tell and what it cannot.

    Behind a forwarder on this machine every client is a loopback TCP peer, and a plain
    forwarder adds no X-Forwarded-For. What is left is the name the client asked for: a client
    that reached the forwarder by this machine's public name (or a DNS-rebinding page in an
    operator's browser) says so in Host and is refused. A client that forges `Host: 127.0.0.1`
    cannot be told from a local one: that is why `serve` and `up` refuse to listen beyond
    loopback without CONSENT_OPS_TOKEN, and the README says to set it behind any proxy. With the
    token set, the forwarder changes nothing: no token, no page."""
    assert not settings.ops_token
    async with (
        ConsentClient(settings) as client,
        serve(client) as base,
        tcp_forwarder(int(base.rsplit(":", 1)[1])) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        for path in ("/ops", "/metrics"):
            for public in (f"mcp.example.com:{port}", "mcp.example.com", "10.0.0.5"):
                refused = await http.get(path, headers={"Host": public})
                assert refused.status_code == 403, (path, public)
            # The limit: a forged loopback Host through the forwarder looks local.
            forged = await http.get(path, headers={"Host": f"127.0.0.1:{port}"})
            assert forged.status_code == 200, path
        assert (await http.get("/healthz")).status_code in (200, 503)  # public anyway
    token = secrets.token_urlsafe(24)
    async with (
        ConsentClient(settings.with_changes(ops_token=Secret(token))) as client,
        serve(client) as base,
        tcp_forwarder(int(base.rsplit(":", 1)[1])) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        for path in ("/ops", "/metrics"):
            response = await http.get(path, headers={"Host": f"127.0.0.1:{port}"})
            assert response.status_code == 401, path
            response = await http.get(path, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200, path


async def test_future_times_read_in_so_long_not_0_s_ago(stack):
    """A token's expiry and the next refresh lie ahead: "in 59 min", never "0 s ago"."""
    await provision(stack, "alice")
    async with asgi(stack.client) as http:
        page = (await http.get("/ops/users/alice")).text
    ahead = re.findall(r'<span class="age">in (\d+) (min|h)</span>', page)
    assert len(ahead) >= 2, page  # access_token_expires_at, next_refresh_at (tokens live 1 h)
    assert ("59", "min") in ahead
    assert "0 s ago" not in page


# --- layout ---------------------------------------------------------------------------------

# A reason as long as a reason may be (MAX_REASON_LENGTH), with words and with a provider's
# error_description that is one unbroken token (a URL, a base64 blob).
LONG_REASON = (
    "refresh token rejected by provider: invalid_grant: "
    + "https://id.example/errors/"
    + "a1b2c3d4" * 30
    + "; "
    + ", ".join(["and then some words that wrap normally"] * 6)
)[:MAX_REASON_LENGTH].strip()
LONG_ACTOR = "operator:" + "dana.the.operator.with.a.very.long.name" * 2
WINDOW = {"width": 1280, "height": 800}


async def document_width(page: Any) -> tuple[int, int]:
    """The document's scroll width and the viewport's width, in CSS pixels."""
    scroll, client = await page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    return int(scroll), int(client)


@pytest.mark.browser
async def test_long_histories_fit_a_1280_px_window(settings):
    """A user with many entries, reasons as long as they get, a long actor and correlation id:
    neither /ops nor the user's page grows wider than a 1280 px window."""
    user = "long-" + "u" * (MAX_USER_LENGTH - 5)
    start = time.time() - 3600
    steps: list[tuple[Any, ...]] = []
    for i in range(60):
        at = start + i * 20
        steps.append((Event.PROVISION_REQUESTED, at, "user", None))
        steps.append((Event.AUTHORIZATION_FAILED, at + 5, LONG_ACTOR, LONG_REASON))
    async with ConsentClient(settings) as client:
        await Seeder(client, Seeded()).path(user, steps)
        async with serve(client) as base, chromium(viewport=WINDOW) as page:
            await page.goto(f"{base}/ops/users/{quote(user, safe='')}")
            assert await page.locator("#timeline tr.entry").count() == 120
            reasons = await texts(page, "#timeline tr.entry td.reason")
            assert reasons[1] == LONG_REASON  # wrapped, not cut
            scroll, window = await document_width(page)
            assert window == WINDOW["width"]
            assert scroll <= window, f"the user page is {scroll} px wide"
            # The stylesheet applied: the CSP lets it through.
            header = await page.evaluate(
                "() => getComputedStyle(document.querySelector('header')).backgroundColor"
            )
            assert header == "rgb(29, 29, 31)"

            await page.goto(f"{base}/ops?state=unprovisioned")
            assert await texts(page, "table#users tr.user-row td.user") == [user]
            scroll, window = await document_width(page)
            assert scroll <= window, f"/ops is {scroll} px wide"


# --- escaping -------------------------------------------------------------------------------

SCRIPT = "<script>alert(document.cookie)</script>"


async def test_a_reason_with_a_script_is_text_on_every_page(stack):
    """A provider's error_description is whatever the redirect carried: the engine keeps it in
    the reason, and the callback page, /ops and the user's page show it as text."""
    status = await stack.client.request_provisioning("mallory")
    denied = urlsplit(await approve(status.authorization_url, "mallory", deny=True))
    params = dict(parse_qsl(denied.query))
    params["error_description"] = f'{SCRIPT} "quoted" & <img src=x onerror=alert(1)>'
    response = await stack.callback(urlunsplit(denied._replace(query=urlencode(params))))
    assert response.status_code == 403
    record = await stack.client.store.load("mallory")
    assert record.reason is not None
    assert SCRIPT in record.reason  # kept as it came, clipped only
    async with asgi(stack.client) as http:
        pages = {
            "callback": response.text,
            "ops": (await http.get("/ops?state=unprovisioned")).text,
            "user": (await http.get("/ops/users/mallory")).text,
        }
    for name, text in pages.items():
        assert "<script" not in text.lower(), name
        assert "<img" not in text, name
        assert "&lt;script&gt;alert(document.cookie)&lt;/script&gt;" in text, name
        assert "&lt;img src=x onerror=alert(1)&gt;" in text, name


async def test_refreshes_in_a_row_show_their_count_on_the_timeline(settings):
    """The store keeps refreshes in a row as one entry that counts them: the timeline says how
    many and since when, instead of showing one refresh where there were five."""
    now = float(int(time.time()))  # whole seconds: the page shows milliseconds, truncated
    due = now + 3000
    steps: list[tuple[Any, ...]] = [
        (Event.PROVISION_REQUESTED, now - 600, "user", None),
        (Event.AUTHORIZATION_COMPLETED, now - 590, "browser", None, due),
    ]
    steps += [(Event.TOKEN_REFRESHED, now - 500 + 60 * i, "worker", None, due) for i in range(5)]
    async with ConsentClient(settings) as client:
        await Seeder(client, Seeded()).path("refreshed", steps)
        async with asgi(client) as http:
            page = (await http.get("/ops/users/refreshed")).text
    assert page.count('<tr class="entry">') == 3
    assert f'title="5 in a row, the first at {iso(now - 500)}">\u00d75</span>' in page


def inline_styles(text: str) -> list[str]:
    return re.findall(r"<style>(.*?)</style>", text, flags=re.DOTALL)


def csp_admits(csp: str, style: str) -> bool:
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    return f"'sha256-{digest}'" in csp.split("style-src", 1)[1].split(";", 1)[0]


async def test_pages_mounted_under_a_prefix_of_another_app_keep_their_style(settings):
    """ops_routes mounted at /admin of someone else's app: the pages need no route of their
    own for the stylesheet, and the policy admits exactly the inline one each page carries."""
    async with ConsentClient(settings) as client:
        await Seeder(client, Seeded()).path(
            "mounted", [(Event.PROVISION_REQUESTED, time.time(), "user", None)]
        )
        app = Starlette(routes=[Mount("/admin", routes=ops_routes(client))])
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            overview = await http.get("/admin/ops?state=pending")
            user = await http.get("/admin/ops/users/mounted")
            missing = await http.get("/admin/ops/users/nobody")
        denied = result_page(
            Request({"type": "http", "method": "GET", "path": "/", "headers": []}),
            PageKind.DENIED,
            "Access was denied",
            "Nothing was shared.",
            reason="access_denied",
            status=403,
        )
    assert (overview.status_code, user.status_code, missing.status_code) == (200, 200, 404)
    assert 'href="ops/users/mounted"' in overview.text  # relative: resolves under /admin
    assert 'href="../../ops?state=pending"' in user.text
    served = [(r.headers, r.text) for r in (overview, user, missing)]
    served.append((denied.headers, bytes(denied.body).decode()))
    for headers, text in served:
        csp = headers["content-security-policy"]
        assert "unsafe-inline" not in csp
        assert "script-src" not in csp
        (style,) = inline_styles(text)
        assert csp_admits(csp, style)
        assert 'style="' not in text  # an inline style attribute would be refused
