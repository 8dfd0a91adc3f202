"""Watching one provider from a running process: its discovery document until it answers, then
its acceptance of the client's credentials while refreshes are paused.

``up``, ``worker`` and ``serve`` check the provider once before they start (the command line
fails fast on settings that can never work). When it was merely down, the process starts anyway
and this watch keeps trying in the background: the reason sits in Redis under
``Keys.provider_check`` (with a time to live, so a process that died leaves no stale red
behind), ``/healthz`` shows it, and it is gone once the document is usable.

In a worker the watch then checks the client's authentication at the token endpoint (see
:func:`~consent_flow.oidc.check.probe_client_authentication`): at once, and while refreshes are
paused for everyone, once per the pause's probe interval across the fleet. A pass lifts the
pause without waiting for a refresh to fall due; a refusal pauses refreshes before one does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis

from consent_flow.core.records import iso
from consent_flow.engine.refresh import REDIS_ERRORS, Refresher
from consent_flow.oidc import OAuthClient
from consent_flow.oidc.check import (
    ClientAuth,
    ClientCheck,
    DiscoveryCheck,
    Reach,
    check_discovery,
    probe_client_authentication,
)
from consent_flow.store.redis_store import Keys

__all__ = [
    "CHECK_TTL",
    "DISCOVERY_RETRY_CAP",
    "DISCOVERY_RETRY_FIRST",
    "ProviderWatch",
    "read_provider_check",
]

log = structlog.get_logger("consent_flow.provider")

DISCOVERY_RETRY_FIRST = 1.0  # seconds before the first retry of an unusable discovery document
DISCOVERY_RETRY_CAP = 30.0  # the retries double up to this
# A reason outlives its last retry by this much: a process that stopped retrying (it ended)
# leaves no red health behind for long.
CHECK_TTL = 3 * DISCOVERY_RETRY_CAP


class ProviderWatch:
    """The background watch of one provider in one process (see the module docstring).

    ``oauth`` and ``keys`` are that provider's; ``refresher`` is the worker's for it: without
    one (``serve``) only discovery is watched. A deployment of several providers runs one each.
    """

    def __init__(
        self,
        oauth: OAuthClient,
        redis: Redis,
        keys: Keys,
        *,
        refresher: Refresher | None = None,
        clock: Callable[[], float],
        retry_first: float = DISCOVERY_RETRY_FIRST,
        retry_cap: float = DISCOVERY_RETRY_CAP,
    ) -> None:
        self.oauth = oauth
        self.redis: Any = redis
        self.key = keys.provider_check
        self.provider = keys.provider
        self.refresher = refresher
        self.clock = clock
        self.retry_first = retry_first
        self.retry_cap = retry_cap

    async def run(self) -> None:
        try:
            await self.until_discovered()
            if self.refresher is not None:
                await self.watch_client(self.refresher)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the watch must not end the process it watches
            log.error("provider_watch_failed", provider=self.provider, error=type(exc).__name__)

    # --- discovery ---------------------------------------------------------------------------

    async def until_discovered(self) -> DiscoveryCheck:
        """Fetch the discovery document until it is usable, the reason kept in Redis meanwhile."""
        delay = self.retry_first
        since: float | None = None
        last: DiscoveryCheck | None = None
        while True:
            check = await check_discovery(self.oauth)
            if check.ok:
                await self._forget()
                if last is not None:
                    log.info("provider_reachable", provider=self.provider, url=check.url)
                return check
            since = since if since is not None else self.clock()
            if last is None or (last.reach, last.problem) != (check.reach, check.problem):
                log.error(
                    "provider_unusable",
                    provider=self.provider,
                    url=check.url,
                    reach=check.reach.value,
                    problem=check.problem,
                    retry_in=round(delay, 1),
                )
            last = check
            await self._remember(check, since)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_cap)

    async def _remember(self, check: DiscoveryCheck, since: float) -> None:
        fields = {
            "url": check.url,
            "reach": check.reach.value,
            "problem": check.problem or "",
            "since": iso(since),
        }
        try:
            # Not a MULTI, which a Redis Cluster client refuses: the two go out together on one
            # connection, in order, and a write that met an error is made again by the retry.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(self.key, mapping=fields)
                pipe.expire(self.key, int(CHECK_TTL))
                await pipe.execute()
        except REDIS_ERRORS:
            pass  # health is red while Redis is away anyway; the next retry writes it

    async def _forget(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # else it expires by itself
            await self.redis.delete(self.key)

    # --- the client's credentials --------------------------------------------------------------

    async def watch_client(self, refresher: Refresher) -> None:
        """Check the client's authentication now, then again while refreshes are paused."""
        await self.check_client(refresher)
        while True:
            await asyncio.sleep(refresher.retry.halt_probe)
            try:
                if await refresher.paused() and await refresher.may_probe():
                    await self.check_client(refresher)
            except REDIS_ERRORS:
                continue

    async def check_client(self, refresher: Refresher) -> ClientCheck:
        """One probe of the token endpoint; lifts or sets the pause by what it learnt."""
        check = await probe_client_authentication(self.oauth)
        try:
            if check.outcome is ClientAuth.ACCEPTED:
                await refresher.lift_pause("the token endpoint accepted the client's credentials")
            elif check.rejection is not None and not await refresher.paused():
                await refresher.pause(check.rejection)
        except REDIS_ERRORS:
            pass  # tried again at the next probe, or decided by the next refresh
        log.info(
            "client_checked",
            provider=self.provider,
            outcome=check.outcome.value,
            problem=check.problem,
        )
        return check


async def read_provider_check(redis: Any, keys: Keys) -> str | None:
    """Why the discovery document of ``keys``' provider cannot be used now, for ``/healthz``;
    None: it can."""
    raw = await redis.hgetall(keys.provider_check)
    if not raw:
        return None
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    text = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in fields.items()}
    what = "unreachable" if text.get("reach") == Reach.DOWN.value else "misconfigured"
    return f"{what} since {text.get('since')}: {text.get('url')}: {text.get('problem')}"
