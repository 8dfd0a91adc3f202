"""A provider's limits, fleet-wide: refreshes per second, calls at once, and the pause a 429 sets.

Every worker asks Redis for permits before it calls the provider (one script, one round trip
for a whole batch: ``store/lua/provider_permits.lua``), so the limits hold across the fleet,
however many workers run. The rate is a sliding log of grants: no window of a second ever holds
more than the rate allows (the window is a little longer than a second, so calls that leave a
few milliseconds after their grant still fit). Concurrency is a set of leases, released when a
call ends and expiring on their own when their worker dies. A 429 or ``Retry-After`` from the
provider pauses everyone's calls to it until then.

Why a script rather than the ``limits`` library: a batch needs up to N permits granted at once
and partly (its moving window grants all of a cost or nothing, one check per call), together
with the concurrency leases and the pause, in the single round trip a batch makes.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from consent_flow.store.redis_store import Keys
from consent_flow.store.scripts import lua

__all__ = ["DEFAULT_PAUSE", "LATE_AFTER", "Limits", "Permits", "ProviderLimiter"]

# A window a little longer than a second: a call leaves its worker a little after its grant,
# and no later than LATE_AFTER (a later one is not made: see engine/batch.py); measured at the
# provider, a second then still holds no more than the rate.
WINDOW_MS = 1040.0
LATE_AFTER = (WINDOW_MS - 1000.0) / 1000.0  # seconds
DEFAULT_PAUSE = 1.0  # seconds everyone waits after a 429 without Retry-After
MAX_PAUSE = 300.0


@dataclass(frozen=True, slots=True)
class Limits:
    """One provider's limits; None: unlimited."""

    max_refresh_rate: float | None = None  # refreshes per second
    max_concurrency: int | None = None  # provider calls at once, fleet-wide

    @property
    def per_window(self) -> int | None:
        """Grants one window holds: whole calls, never more than the rate allows."""
        if self.max_refresh_rate is None:
            return None
        return max(1, math.floor(self.max_refresh_rate))

    @property
    def window_ms(self) -> float:
        """The window's length: a second and a margin; one call's worth of time under 1/s."""
        rate = self.max_refresh_rate
        if rate is None or rate >= 1:
            return WINDOW_MS
        return 1000 / rate + (WINDOW_MS - 1000)

    @property
    def unlimited(self) -> bool:
        return self.max_refresh_rate is None and self.max_concurrency is None


@dataclass(frozen=True, slots=True)
class Permits:
    ids: tuple[str, ...]  # one per granted call
    wait: float  # seconds before asking again, when none were granted

    def __len__(self) -> int:
        return len(self.ids)


class ProviderLimiter:
    """The limits of one provider (by name), shared by every worker through Redis."""

    def __init__(
        self, redis: Any, *, prefix: str, provider: str, limits: Limits, lease: float
    ) -> None:
        self.redis = redis
        self.provider = provider
        self.limits = limits
        self.lease_ms = int(lease * 1000)
        keys = Keys(prefix, provider)
        self.log_key, self.leases_key, self.pause_key = (
            keys.limit("log"),
            keys.limit("leases"),
            keys.limit("pause"),
        )
        self._permits = redis.register_script(lua("provider_permits"))
        self._pause = redis.register_script(lua("provider_pause"))

    async def acquire(self, want: int) -> Permits:
        """Up to ``want`` permits to call the provider now (maybe fewer, maybe none)."""
        keys, args, stem = self.permits_call(want)
        return self.permits_result(await self._permits(keys=keys, args=args), stem)

    def permits_call(self, want: int) -> tuple[list[str], list[Any], str]:
        limits = self.limits
        cap = limits.per_window
        stem = secrets.token_hex(8)
        args = [
            want,
            "" if cap is None else cap,
            limits.window_ms,
            "" if limits.max_concurrency is None else limits.max_concurrency,
            self.lease_ms,
            stem,
        ]
        return [self.log_key, self.leases_key, self.pause_key], args, stem

    @staticmethod
    def permits_result(raw: Any, stem: str) -> Permits:
        granted, wait = raw
        n = int(granted)
        return Permits(tuple(f"{stem}:{i}" for i in range(1, n + 1)), int(wait) / 1000)

    def release_into(self, pipe: Any, ended: list[str], unused: list[str]) -> None:
        """Queue on ``pipe``: the leases of calls that ended, and the grants not used (they
        give their place in the window back)."""
        if ended or unused:
            if self.limits.max_concurrency is not None:
                pipe.zrem(self.leases_key, *ended, *unused)
            if unused and self.limits.max_refresh_rate is not None:
                pipe.zrem(self.log_key, *unused)

    async def release(self, ended: list[str], unused: list[str] | None = None) -> None:
        if not ended and not unused:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            self.release_into(pipe, ended, unused or [])
            await pipe.execute()

    async def pause(self, seconds: float | None, now: float) -> None:
        """Slow everyone down: no call to this provider starts for ``seconds`` (a default
        pause when the provider gave no Retry-After). ``now`` is Redis's time."""
        wait = DEFAULT_PAUSE if seconds is None else min(max(seconds, 0.0), MAX_PAUSE)
        await self._pause(keys=[self.pause_key], args=[int((now + wait) * 1000)])

    async def paused_for(self, now: float) -> float:
        raw = await self.redis.get(self.pause_key)
        return 0.0 if raw is None else max(0.0, int(raw) / 1000 - now)
