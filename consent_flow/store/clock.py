"""One clock: Redis's.

Every time that one process writes and another compares (queue scores and job due times, session
expiry, refresh schedules, the refresh pause, history and index timestamps) is Redis's time, not
the time of the process that wrote it: a worker whose clock is 90 s off would otherwise pick up
events 90 s late, or expire sessions another process just opened. Scripts read Redis's clock with
``TIME``; Python code reads a :class:`RedisClock`, which measures its offset from Redis's clock
with ``TIME`` (the round trip taken into account) and then runs on the monotonic clock, so a wall
clock that steps between two measurements changes nothing either.

A process whose own clock is off still works correctly; its measured offset is reported (workers
send it with their heartbeat) and health turns red above :data:`MAX_CLOCK_SKEW`, so that the
operator fixes the machine's time synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CLOCK_RESYNC_INTERVAL",
    "MAX_CLOCK_SKEW",
    "RedisClock",
    "redis_time",
    "skew_problem",
    "worst_offset",
]

MAX_CLOCK_SKEW = 30.0  # seconds between a process's clock and Redis's before health turns red
CLOCK_RESYNC_INTERVAL = 60.0  # seconds a measured offset is trusted before it is measured again
CLOCK_SAMPLES = 3  # TIME round trips per measurement: the shortest one bounds the error best


async def redis_time(redis: Any) -> float:
    """Redis's time now, in seconds since the epoch (one round trip)."""
    seconds, micros = await redis.time()
    return int(seconds) + int(micros) / 1_000_000


class RedisClock:
    """Redis's time, read without a round trip: call it like ``time.time``.

    :meth:`sync` measures Redis's time against this process's monotonic clock; until the first
    measurement the clock is this process's own. ``offset`` is Redis's time minus this process's
    wall clock at the last measurement (positive: this process is behind), and ``error`` bounds
    the measurement (half the round trip that measured it).
    """

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.offset = 0.0
        self.error: float | None = None
        self._base: float | None = None  # Redis's time at the monotonic instant _mono
        self._mono = 0.0
        self._measured = -float("inf")  # monotonic time of the last measurement

    def __call__(self) -> float:
        if self._base is None:
            return time.time()
        return self._base + (time.monotonic() - self._mono)

    @property
    def synced(self) -> bool:
        return self._base is not None

    @property
    def age(self) -> float:
        """Seconds since the last measurement (infinite before the first)."""
        return time.monotonic() - self._measured

    async def sync(self) -> float:
        """Measure Redis's time now; returns the offset of this process's wall clock from it."""
        best: tuple[float, float, float, float] | None = None  # rtt, redis, mono, wall
        for _ in range(CLOCK_SAMPLES):
            wall0, mono0 = time.time(), time.monotonic()
            server = await redis_time(self.redis)
            mono1, wall1 = time.monotonic(), time.time()
            rtt = mono1 - mono0
            if best is None or rtt < best[0]:
                # Redis read its clock somewhere within the round trip: the middle is the best
                # guess, off by half the round trip at most.
                best = (rtt, server, (mono0 + mono1) / 2, (wall0 + wall1) / 2)
        assert best is not None
        rtt, server, mono, wall = best
        self._base, self._mono = server, mono
        self.offset = server - wall
        self.error = rtt / 2
        self._measured = time.monotonic()
        return self.offset

    async def sync_if_stale(self, max_age: float = CLOCK_RESYNC_INTERVAL) -> None:
        if self.age > max_age:
            await self.sync()


def worst_offset(offsets: Mapping[str, float]) -> tuple[str, float] | None:
    """The name and offset with the largest absolute value, or None when there are none."""
    if not offsets:
        return None
    name = max(offsets, key=lambda n: (abs(offsets[n]), n))
    return name, offsets[name]


def skew_problem(name: str, offset: float, *, limit: float = MAX_CLOCK_SKEW) -> str | None:
    """Why health is red over one clock's offset from Redis's time, or None within ``limit``."""
    if abs(offset) <= limit:
        return None
    way = "behind" if offset > 0 else "ahead of"
    return (
        f"{name}'s clock is {abs(offset):.1f} s {way} Redis's time (limit {limit:g} s); "
        "timing still follows Redis's clock, but fix the machine's time synchronisation (NTP)"
    )
