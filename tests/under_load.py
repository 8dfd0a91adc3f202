"""A fleet under load while its Redis changes under it, and the checks that nothing was lost.

Shared by the Sentinel failover tests (tests/test_sentinel.py) and the Redis Cluster resharding
test (tests/test_cluster_reshard.py): worker processes on the topology's URL, a steady load of
provisions, callbacks, on-demand refreshes and probes with what each caller got, and the
accounting afterwards against the local provider's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_provider import approve
from test_faults import WorkerProcess, wait_for

from consent_flow import State
from consent_flow.errors import ProviderUnavailable, WorkerUnavailable
from consent_flow.store.vault import open_tokens

__all__ = [
    "RETRY_MEANING",
    "Ledger",
    "Load",
    "grant_alive",
    "grants_go_on",
    "nothing_lost",
    "refresh_held_at_provider",
    "spool_settled",
    "start_workers",
]

MIN_TTL = 3.0  # what the on-demand callers ask for: most of their calls refresh
# What tells a caller to try again: the event's outcome did not come in time, or the provider
# (or the store behind a refresh) is not there now.
RETRY_MEANING: tuple[type[BaseException], ...] = (WorkerUnavailable, ProviderUnavailable)


def start_workers(
    stack: Any, op: Any, env: dict[str, str], url: str, logs: Path, count: int = 2
) -> list[WorkerProcess]:
    """``count`` worker processes on ``url``, each logging to ``logs/worker-<i>.log``."""
    worker_env = {**os.environ, **env, "CONSENT_REDIS_URL": url, "CONSENT_ISSUER": op.issuer}
    return [
        WorkerProcess(worker_env, logs / f"worker-{i}.log", stack.settings.queue_name)
        for i in range(count)
    ]


async def refresh_held_at_provider(
    stack: Any, op: Any, user: str
) -> tuple[asyncio.Task[Any], float]:
    """An on-demand refresh of ``user`` (tokens of 60 s, asked for 58) that the provider answers
    2.5 s late: returns about a second before the answer comes, its start on the replica
    already, with the caller's task and the user's last refresh time before it."""
    before = (await stack.client.store.load(user)).last_refresh_at or 0.0
    op.reset_stats()
    op.fault(token_delay_ms=2500, count=1)
    await asyncio.sleep(2.5)  # the stored tokens have less than 58 s left now
    caller = asyncio.create_task(stack.client.access_token(user, min_ttl=58))

    async def held() -> bool:
        return op.stats().get("delays_injected", 0) >= 1

    await wait_for(held, timeout=15)  # the refresh's start is on the replica already
    await asyncio.sleep(1.5)  # the answer comes about a second after this
    return caller, before


async def spool_settled(worker: WorkerProcess, env: dict[str, str]) -> None:
    """Until ``worker`` settled the answer it spooled, and its spool is empty."""

    async def settled() -> bool:
        return bool(worker.named("refresh_commit_recovered"))

    await wait_for(settled, timeout=30)
    assert not list((Path(env["CONSENT_DATA_DIR"]) / "spool").rglob("*.json"))


@dataclass
class Ledger:
    """What every caller got."""

    answered: Counter[str] = field(default_factory=Counter)
    told_to_retry: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    granted: list[str] = field(default_factory=list)
    attempted: set[str] = field(default_factory=set)  # every user a provision was started for
    probes: list[tuple[float, float]] = field(default_factory=list)  # answered: start, end

    async def call(self, kind: str, work: Awaitable[Any]) -> Any:
        try:
            result = await work
        except RETRY_MEANING as exc:
            self.told_to_retry[f"{kind}: {exc.code}"] += 1
            return None
        except Exception as exc:  # noqa: BLE001 - anything else is what the test looks for
            self.unexpected.append(f"{kind}: {type(exc).__name__}: {exc}")
            return None
        self.answered[kind] += 1
        return result

    def unavailable(self, since: float) -> float:
        """The longest time after ``since`` with no probe answered: how long the fleet (a
        caller, Redis, a worker and back) was away."""
        ends = sorted(end for _, end in self.probes if end >= since)
        points = [since, *ends]
        return max(b - a for a, b in itertools.pairwise(points)) if len(points) > 1 else -1.0


class Load:
    """Provisions, callbacks, on-demand refreshes and a probe, each at a steady pace."""

    def __init__(self, stack: Any, users: list[str]) -> None:
        self.stack = stack
        self.users = users
        self.ledger = Ledger()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for run in (self._provisions, self._refreshes, self._probe):
            self._tasks.append(asyncio.create_task(run()))

    async def stop(self) -> Ledger:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.ledger

    async def _every(self, seconds: float, step: Callable[[int], Awaitable[None]]) -> None:
        for i in itertools.count():
            started = time.monotonic()
            await step(i)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stop.wait(), max(0.0, seconds - (time.monotonic() - started))
                )
            if self._stop.is_set():
                return

    async def _provisions(self) -> None:
        client, ledger = self.stack.client, self.ledger
        pending = [f"new{i}" for i in range(1000)]

        async def step(_: int) -> None:
            user = pending[0]
            ledger.attempted.add(user)
            status = await ledger.call("provision_requested", client.request_provisioning(user))
            if status is None or not status.authorization_url:
                return  # told to retry: the same user again
            callback = await approve(status.authorization_url, user)
            response = await ledger.call("callback", self.stack.callback(callback))
            if response is None:
                return
            if response.status_code == 200:
                ledger.granted.append(user)
                pending.pop(0)
            elif response.status_code == 400 and "unknown or expired" in response.text:
                # A pending session the old primary took in the second before this process
                # followed the new one: lost with it (README, Scale). The page says the link
                # cannot be used, and the user asks again: the same user, next round.
                ledger.answered["callback"] -= 1
                ledger.told_to_retry["callback: session lost, asked again"] += 1
            elif response.status_code == 503:
                ledger.answered["callback"] -= 1
                ledger.told_to_retry["callback: 503"] += 1
                pending.pop(0)  # its event may still apply; a new user for the next round
            else:
                ledger.unexpected.append(f"callback: {response.status_code} {response.text[:300]}")
                pending.pop(0)

        await self._every(0.3, step)

    async def _refreshes(self) -> None:
        client, ledger = self.stack.client, self.ledger

        async def step(i: int) -> None:
            user = self.users[i % len(self.users)]
            await ledger.call("access_token", client.access_token(user, min_ttl=MIN_TTL))

        await self._every(0.2, step)

    async def _probe(self) -> None:
        client, ledger = self.stack.client, self.ledger

        async def probe() -> None:
            # Through the whole fleet: an event queued, a worker's outcome read back.
            started = time.monotonic()
            status = await ledger.call("probe", client.request_provisioning(self.users[0]))
            if status is not None:
                ledger.probes.append((started, time.monotonic()))

        probes: list[asyncio.Task[None]] = []

        async def step(_: int) -> None:
            # One every 0.1 s whatever the others do: one that waits out the event timeout
            # (its event lost with the old primary) does not hide the ones answered meanwhile.
            probes.append(asyncio.create_task(probe()))

        await self._every(0.1, step)
        await asyncio.gather(*probes)


async def grant_alive(stack: Any, op: Any, user: str) -> None:
    """Provisioned, with a refresh token the provider honours. Workers keep refreshing: a token
    rotated between the read and the look at the provider is read again."""
    for _ in range(10):
        rec = await stack.client.store.load(user)
        assert rec.state is State.PROVISIONED, (user, rec.reason)
        tokens = open_tokens(stack.client.ring, user, rec.tokens)
        if op.introspect(tokens["refresh_token"])["active"]:
            return
        again = await stack.client.store.load(user)
        # A refresh at the provider (its mark on the record) or committed since the read.
        moving = rec.inflight or again.inflight or again.version != rec.version
        assert moving, f"{user}: the stored refresh token is dead"
        await asyncio.sleep(0.2)
    raise AssertionError(f"{user}: the stored refresh token kept changing")


async def grants_go_on(
    stack: Any, op: Any, users: list[str], granted: list[str], since: float, min_ttl: float
) -> None:
    """Every grant provisioned with its refresh token alive at the provider, each of ``users``
    refreshed on schedule after ``since`` (wall clock), and a refresh on demand (asking for
    ``min_ttl`` seconds) works for all of them."""
    for user in users + granted:
        await grant_alive(stack, op, user)

    async def all_refreshed_on_schedule() -> bool:
        recs = [await stack.client.store.load(u) for u in users]
        return all((r.last_refresh_at or 0) > since for r in recs)

    await wait_for(all_refreshed_on_schedule, timeout=30)
    for user in users + granted:
        token = await stack.client.access_token(user, min_ttl=min_ttl)
        assert op.introspect(token)["active"] is True, user


async def nothing_lost(
    stack: Any, op: Any, users: list[str], ledger: Ledger, workers: list[WorkerProcess]
) -> int:
    """Stop the workers, then: no refresh token reused, no grant ended at the provider but those
    a worker obtained for a callback whose transition the failover lost (the caller told to
    retry: those tokens are revoked at once, never stored), nothing applied twice (each event
    id once in a user's history, one grant per user) and every refresh the provider answered
    stored exactly once. Returns that count of refreshes."""
    for worker in workers:  # no refresh between the count below and the provider's
        assert worker.terminate() == 0, worker.log.read_text()[-3000:]
    stats = op.stats()
    assert stats.get("refresh_reuse_detected", 0) == 0, stats
    orphans = [e["user"] for w in workers for e in w.named("obtained_tokens_revoked")]
    assert stats.get("grants_revoked", 0) == len(orphans), (stats, orphans)
    assert stats.get("revocations", 0) <= 2 * len(orphans), (stats, orphans)  # refresh, access
    refreshes = 0
    # Every user: one whose callback was told to retry may have been granted after all.
    for user in users + sorted(ledger.attempted):
        if (await stack.client.store.load(user)).state is not State.PROVISIONED:
            continue
        ids = [h.event_id for h in await stack.client.store.history(user)]
        assert len(ids) == len(set(ids)), (user, ids)
        history = await stack.client.history(user)
        granted = [h for h in history if h["event"] == "authorization_completed"]
        assert len(granted) == 1, (user, history)
        assert not [h for h in history if h["to"] == "revoked"], (user, history)
        refreshes += sum(h.get("count", 1) for h in history if h["event"] == "token_refreshed")
    assert refreshes == stats["refresh_success"], (refreshes, stats)
    return refreshes
