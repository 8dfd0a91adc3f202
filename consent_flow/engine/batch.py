"""Scheduled refreshes in batches: the path ``consent-flow worker`` runs for due refreshes.

A worker's lanes each loop: a look at which of its shards have refreshes due (one round trip
for all of them), permits from the provider's fleet-wide limiter (queue/limits.py), then a
batch of due connections of one shard taken in one round trip (store/batch.py: the
soonest-lapsing first, each under its own lock, records read under the locks), the provider
calls of the batch
at once, and their commits sent together (one pipeline of the ordinary commit script, each
atomic for its own connection and applying or failing on its own).

Each member is the ordinary refresh of engine/refresh.py, so every rule of a single refresh
holds per connection: a failure is that member's alone (rescheduled with backoff, never ending
the grant unless the provider said ``invalid_grant``); once the provider answered, the answer is
spooled if its commit is slow and retried in the background if Redis is away; a member locked
elsewhere is left to its holder (single flight across the fleet). On-demand refreshes (the
token broker) keep their own path: an arq job each, answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence

import structlog

from consent_flow.core.records import Change, CommitResult
from consent_flow.core.table import Event, State
from consent_flow.engine.refresh import REDIS_ERRORS, Refresher, commit_group
from consent_flow.queue.bus import Envelope
from consent_flow.queue.limits import LATE_AFTER, Permits, ProviderLimiter
from consent_flow.store.batch import DRAIN_SLOT, DRAIN_TTL, BatchClaimer, Claim, Claimed, drain_key
from consent_flow.store.redis_store import RedisStore, due_ms

__all__ = ["BatchRefresher", "CommitGroup"]

log = structlog.get_logger("consent_flow.batch")

IDLE_POLL = 0.25  # seconds a lane waits when nothing is due (and between permit asks, at most)
# Seconds a commit waits for the batch's other members before its group goes out: well below
# the refresher's spool threshold, so a commit that waits is never taken for a slow one.
GROUP_WINDOW = 0.003


class CommitGroup:
    """The commits of one batch's members, sent together: when every member still running is
    waiting on its commit, or ``window`` seconds after the first one asked."""

    def __init__(self, store: RedisStore, members: int, *, window: float = GROUP_WINDOW) -> None:
        self.store = store
        self.running = members
        self.window = window
        self._waiting: list[tuple[Change, str | None, asyncio.Future[CommitResult]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.round_trips = 0

    async def commit(self, change: Change, *, unlock: str | None = None) -> CommitResult:
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((change, unlock, future))
        self._consider()
        return await future

    def member_done(self) -> None:
        self.running -= 1
        self._consider()

    def _consider(self) -> None:
        if not self._waiting:
            return
        if len(self._waiting) >= self.running:
            self._go()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self._go)

    def _go(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        if waiting:
            self.round_trips += 1
            asyncio.get_running_loop().create_task(self._send(waiting))

    async def _send(
        self, waiting: list[tuple[Change, str | None, asyncio.Future[CommitResult]]]
    ) -> None:
        try:
            results = await self.store.commit_many(
                [(change, unlock) for change, unlock, _ in waiting]
            )
        except BaseException as exc:  # noqa: BLE001 - each waiting member hears of it
            for _, _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(waiting, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class BatchRefresher:
    """Scheduled refreshes for one provider, in batches of up to ``size`` connections."""

    def __init__(
        self,
        refresher: Refresher,
        limiter: ProviderLimiter,
        *,
        size: int,
        lanes: int = 2,
        idle_poll: float = IDLE_POLL,
        shards: Sequence[int] | None = None,
    ) -> None:
        self.refresher = refresher
        self.engine = refresher.engine
        self.store: RedisStore = refresher.engine.store
        self.limiter = limiter
        self.claimer = BatchClaimer(self.store)
        self.shards = list(range(self.store.keys.shards) if shards is None else shards)
        self._stay: int | None = None  # the shard whose last batch was full: more is due there
        self.size = size
        self.lanes = lanes
        self.idle_poll = idle_poll
        refresher.throttle = self._throttle

    async def _throttle(self, retry_after: float | None) -> None:
        await self.limiter.pause(retry_after, self.engine.clock())
        log.warning(
            "provider_throttled",
            provider=self.limiter.provider,
            retry_after_s=None if retry_after is None else round(retry_after, 1),
        )

    # --- the lanes ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Take and refresh batches until cancelled; rides out Redis being away."""
        await asyncio.gather(*(self._lane(n) for n in range(self.lanes)))

    async def _lane(self, n: int) -> None:
        failing = False
        while True:
            try:
                wait = await self.run_once()
                failing = False
            except REDIS_ERRORS as exc:
                if not failing:
                    log.warning("batch_redis_unavailable", error=type(exc).__name__)
                failing = True
                wait = 1.0
            except Exception:  # a bug must not stop scheduled refreshes for good
                log.exception("batch_failed")
                wait = 1.0
            if wait >= self.idle_poll:
                # Jittered, so the lanes of a fleet do not poll in step.
                await asyncio.sleep(wait * (0.75 + random.random() / 2))
            elif wait > 0:
                await asyncio.sleep(wait)  # the limiter's own time: its next permit

    async def run_once(self) -> float:
        """One batch. Returns how long to wait before the next (0: at once)."""
        if (held := self.refresher.held_for()) > 0:
            return held
        shard, self._stay = self._stay, None
        if shard is None:
            due = await self.claimer.due(self.shards, self.engine.clock())
            if not due:
                return self.idle_poll
            # Any shard with work: the lanes of a fleet spread over them.
            shard = random.choice(list(due))
        # The permits, then a claim of no more members than were granted: the limiter's keys
        # and the shard's are in different slots, so the two are separate calls.
        permits = await self.limiter.acquire(self.size)
        if not permits:
            return min(max(permits.wait, 0.001), self.idle_poll)
        lease = self.engine.lock_ttl
        claim = await self.claimer.claim(
            shard, len(permits), lock_ttl=lease, lease=lease, throttle=self.limiter.pause_key
        )
        if claim.throttled_until > claim.now:
            # A 429 elsewhere between the permits and the claim: nobody calls during the pause
            # it asked for, these members included.
            for member in claim.locked:
                await self._put_back(member)
            await self.limiter.release([], list(permits.ids))
            return min(claim.throttled_until - claim.now, self.idle_poll)
        if not claim.members:
            await self.limiter.release([], list(permits.ids))
            return 0.0  # taken by another worker meanwhile: look again
        wait = await self.refresh_claimed(claim, permits)
        if wait == 0.0:
            self._stay = shard
        return wait

    async def refresh_claimed(self, claim: Claim, permits: Permits) -> float:
        """Refresh the members of ``claim`` concurrently; their commits go out together."""
        callers: list[tuple[Claimed, str]] = []
        skipped: list[Claimed] = []
        ids = list(permits.ids)
        for member in claim.members:
            if self._calls(member):
                callers.append((member, ids.pop()))
            else:
                skipped.append(member)
        # Permits of members that make no call give their place back, while the calls start.
        refund = asyncio.ensure_future(self.limiter.release([], ids))
        halt = await self.refresher._pause_from(claim.halt)
        group = CommitGroup(self.store, len(callers))
        ended: list[str] = []

        async def one(member: Claimed, permit: str) -> str | None:
            token = commit_group.set(group.commit)
            try:
                if paced and self.engine.clock() - claim.now > LATE_AFTER:
                    # A busy loop left this member past its grant: calling now could put more
                    # calls in a second than the rate allows. It goes back, due at once.
                    late.append(permit)
                    await self._put_back(member)
                    return None
                return await self._member(member, halt)
            except asyncio.CancelledError:
                raise
            except Exception:
                # This member's alone: its lease brings it back; the others go on.
                log.exception("batch_member_failed", user=member.user)
                return None
            finally:
                commit_group.reset(token)
                group.member_done()
                ended.append(permit)

        paced = self.limiter.limits.max_refresh_rate is not None
        late: list[str] = []
        started = time.monotonic()
        results = await asyncio.gather(*(one(m, p) for m, p in callers))
        if late:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.limiter.release([], late)
        with contextlib.suppress(*REDIS_ERRORS):
            await refund
        for member in skipped:
            await self._let_go(member)
        applied = sum(1 for r in results if r == "applied")
        with contextlib.suppress(*REDIS_ERRORS):
            await self._count(applied, ended)
        log.debug(
            "batch_refreshed",
            members=len(claim.members),
            called=len(callers),
            applied=applied,
            commit_round_trips=group.round_trips,
            seconds=round(time.monotonic() - started, 3),
        )
        # A full batch: more is likely due at once.
        return 0.0 if len(claim.members) >= len(permits) else self.idle_poll

    def _calls(self, member: Claimed) -> bool:
        """Whether ``member`` goes to the provider: locked here, a live grant, and no earlier
        answer of this process still waiting for Redis."""
        rec = member.record
        return (
            member.token is not None
            and rec is not None
            and rec.state is State.PROVISIONED
            and rec.tokens is not None
            and member.user not in self.refresher.pending_users
        )

    async def _member(self, member: Claimed, halt: dict[str, str] | None) -> str:
        rec = member.record
        assert rec is not None and member.token is not None
        envelope = Envelope(Event.TOKEN_REFRESHED, member.user, "worker", reply=False)
        lock = self.engine.user_lock(member.user)
        lock.token = member.token
        try:
            if halt is not None and not await self.refresher.may_probe():
                # Paused for everyone (invalid_client): tried again later, nobody revoked.
                await self.refresher._reschedule(
                    rec, envelope, self.engine.clock() + self.refresher.retry.halt_retry, error=None
                )
                return "failed"
            outcome = await self.refresher._refresh_locked(
                rec,
                lock,
                due=None,
                on_demand=False,
                min_ttl=0.0,
                envelope=envelope,
                probing=halt is not None,
                marked=True,
            )
            return outcome.result
        finally:
            if lock.token is not None:
                try:
                    await lock.__aexit__(None, None, None)
                except REDIS_ERRORS as exc:
                    # The user's refreshes wait for the lock's lifetime: say why they will.
                    log.warning(
                        "lock_release_failed",
                        user=member.user,
                        lock_ttl_s=lock.ttl,
                        error=type(exc).__name__,
                    )

    async def _put_back(self, member: Claimed) -> None:
        """A member not refreshed after all: its lock released, due again at once."""
        assert member.token is not None
        # The lock goes first: a claim between the two steps must not find the member due and
        # still locked, or it would lease it for a lock's lifetime. A lock no longer ours means
        # its new holder refreshes it (and reschedules it).
        if await self.store.release_lock(member.user, member.token):
            now = due_ms(self.engine.clock())
            sched = self.store.keys.of(member.user).sched
            await self.store.redis.zadd(sched, {member.user: now}, xx=True)

    async def _let_go(self, member: Claimed) -> None:
        """A member that makes no call: its lock released; a grant that ended leaves the
        schedule (a live one keeps its lease, and comes back after it)."""
        if member.token is None:
            return  # locked elsewhere: its holder reschedules it
        rec = member.record
        with contextlib.suppress(*REDIS_ERRORS):
            if rec is None or rec.state is not State.PROVISIONED or rec.tokens is None:
                await self.store.redis.zrem(self.store.keys.of(member.user).sched, member.user)
            await self.store.release_lock(member.user, member.token)

    async def _count(self, applied: int, ended: list[str]) -> None:
        slot = int(self.engine.clock() // DRAIN_SLOT)
        key = drain_key(self.store.keys, slot)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            if applied:
                pipe.incrby(key, applied)
                pipe.expire(key, DRAIN_TTL)
            self.limiter.release_into(pipe, ended, [])
            await pipe.execute()
