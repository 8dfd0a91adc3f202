"""The queue's bell: an idle worker blocks on it instead of polling, and the jobs callers wait on
(events, on-demand refreshes) ring it. Real Redis, real in-process workers."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import provision

pytestmark = pytest.mark.integration


async def test_an_idle_worker_waits_on_the_bell_instead_of_polling(make_stack):
    """An idle worker blocks on its queue's bell between polls: a handful of round trips a
    second, not one per poll delay (each is a round trip, and round trips were most of an idle
    worker's CPU: 9 % of a core per worker against 1 % now)."""
    stack = await make_stack()
    redis = stack.client.pool
    await asyncio.sleep(0.5)  # started, idle

    async def calls(command: str) -> int:
        stats = await redis.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    polls = await calls("evalsha")
    await asyncio.sleep(2.0)
    polls = await calls("evalsha") - polls
    # Polls are the claims (EVALSHA) and the batch lanes' looks; with a 5 ms poll delay alone
    # they were about 400 in two seconds.
    assert polls < 100, polls


async def test_the_jobs_callers_wait_on_ring_the_bell_and_wake_an_idle_worker(
    make_stack, make_provider, monkeypatch
):
    """Events (the provision request, the callback's) and on-demand refreshes ring the bell: a
    worker blocked on it for as long as it likes takes each at once."""
    import workers._worker

    monkeypatch.setattr(workers._worker, "BELL_WAIT", 30.0)
    stack = await make_stack(op=make_provider(access_token_ttl=10))
    await asyncio.sleep(0.5)  # the worker is blocked on the bell now
    started = time.monotonic()
    response = await provision(stack, "bell")
    assert response.status_code == 200
    before = (await stack.client.store.load("bell")).last_refresh_at
    await asyncio.sleep(1.5)
    token = await stack.client.access_token("bell", min_ttl=9)  # more than is left
    rec = await stack.client.store.load("bell")
    assert token and rec.last_refresh_at != before  # refreshed on demand
    assert time.monotonic() - started < 20.0  # three jobs, none waited for a 30 s poll
