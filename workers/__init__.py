"""arq worker settings for consent-flow.

``consent-flow worker`` runs these (``ConsentWorker``). ``arq workers.WorkerSettings`` loads
them too (the name is looked up lazily, and reads the ``CONSENT_*`` environment then), but arq's
own worker polls one queue: it does not serve the shards' queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from arq import cron, func

from consent_flow.engine.batch import BatchRefresher
from consent_flow.engine.engine import Engine
from consent_flow.engine.provider_watch import ProviderWatch
from consent_flow.engine.refresh import Refresher, RetryPolicy
from consent_flow.engine.webhooks import (
    WEBHOOK_ATTEMPT_DEADLINE,
    WEBHOOK_DEDUP_WINDOW,
    WEBHOOK_JOB,
    WebhookRetry,
    WebhookSender,
)
from consent_flow.errors import UnknownKeyError
from consent_flow.oidc import OAuthClient, ProviderSession
from consent_flow.queue.bus import HANDLE_EVENT, JOB_SERIALIZERS, EventBus
from consent_flow.queue.commit_jobs import CommitJobs
from consent_flow.queue.jobs import JOB_TIMEOUT, REFRESH_MAX_TRIES
from consent_flow.queue.limits import Limits, ProviderLimiter
from consent_flow.queue.scheduler import REFRESH_JOB, Scheduler
from consent_flow.settings import ProviderConfig, Settings
from consent_flow.store.clock import MAX_CLOCK_SKEW, RedisClock
from consent_flow.store.connection import arq_redis_settings
from consent_flow.store.metrics import HEARTBEAT_INTERVAL, MetricsRecorder
from consent_flow.store.redis_store import RedisStore, check_shards
from consent_flow.store.vault import KeyRing

from ._context import EVENT_MAX_TRIES, ProviderStack, Services
from ._worker import ConsentWorker
from .jobs import cleanup, deliver_webhook, handle_event, refresh_tokens, sweep

__all__ = ["ConsentWorker", "check_key_ring", "worker_settings"]

log = structlog.get_logger("consent_flow.worker")

POLL_DELAY = 0.005  # seconds between queue polls: events are waited on by people and callers
HEALTH_CHECK_INTERVAL = 10  # seconds; arq's health key lives this long + 1: /healthz reads it
SWEEP_EVERY = 5  # seconds between schedule sweeps
CLEANUP_EVERY = 30  # seconds between cleanup runs
# After Redis comes back, refreshes wait this long, so that a worker holding tokens from before
# the outage (retrying its commit at least every second) stores them before any worker presents
# the refresh token they replaced.
RESUME_GRACE = 5.0
MAX_JOBS = 50  # arq jobs at once
BATCH_LANES = 2  # each provider's batches in flight at once
SHUTDOWN_COMMIT_WAIT = 1.0  # seconds a stopping worker gives commits that wait for Redis


async def check_key_ring(store: RedisStore, ring: KeyRing, providers: tuple[str, ...] = ()) -> None:
    """Refuse to start when stored data (of the store's provider and of ``providers``) was
    sealed under keys this process does not hold.

    A wrong or missing key is a clear error at start-up; nothing is wiped or overwritten.
    """
    missing = sorted(set(await store.key_ids_in_use(providers)) - set(ring.key_ids))
    if missing:
        raise UnknownKeyError(
            f"stored consent data is encrypted under key id(s) {', '.join(missing)} that "
            "CONSENT_ENCRYPTION_KEYS does not hold; add the old key back (after the new first key)",
            key_id=missing[0],
        )


async def _heartbeat(store: RedisStore, clock: RedisClock) -> None:
    """Tell operators this worker is alive (stats: live workers), and how far its own clock is
    from Redis's (measured again at every beat; health turns red on a large offset)."""
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    metrics = MetricsRecorder(store.redis, store.keys, clock=clock)
    failing = False
    while True:
        try:
            await clock.sync()
            await metrics.heartbeat(worker_id, clock_offset=clock.offset)
            failing = False
        except Exception as exc:  # noqa: BLE001 - a missed beat is not worth a crash
            if not failing:  # once per outage: the poll loop logs the outage itself
                log.warning("heartbeat_failed", error=type(exc).__name__)
            failing = True
        else:
            if abs(clock.offset) > MAX_CLOCK_SKEW:
                log.warning("clock_skew", offset_s=round(clock.offset, 3), limit_s=MAX_CLOCK_SKEW)
        await asyncio.sleep(HEARTBEAT_INTERVAL)


async def _gather(*work: Any) -> None:
    await asyncio.gather(*work)


async def _on_redis_back(ctx: dict[str, Any], down: float) -> None:
    services: Services = ctx["services"]
    for refresher in services.refreshers:
        refresher.hold(RESUME_GRACE)
    await services.refreshers[0].metrics.redis_outage(down)  # counted once: a shared figure


def _provider_stack(
    settings: Settings,
    config: ProviderConfig,
    redis: Any,
    http: ProviderSession,
    ring: KeyRing,
    clock: RedisClock,
    retry: RetryPolicy | None,
    batched: bool,
) -> ProviderStack:
    """One provider's engine stack: its settings, keys, OpenID client, bound ring, engine,
    schedule and refresher."""
    seen = settings.for_provider(config.name)
    store = RedisStore(
        redis,
        prefix=settings.redis_prefix,
        provider=config.name,
        wait_replicas=settings.wait_replicas,
        shards=settings.redis_shards,
    )
    bound = ring.for_provider(config.name)
    oauth = OAuthClient(seen, http, clock=clock)
    scheduler = Scheduler(
        redis, keys=store.keys, queue_name=settings.queue_name, clock=clock, batched=batched
    )
    store.commit_jobs = CommitJobs(scheduler, prefix=settings.redis_prefix)
    engine = Engine(
        settings=seen,
        store=store,
        oauth=oauth,
        ring=bound,
        clock=clock,
        on_scheduled=scheduler.schedule,
    )
    refresher = Refresher(engine, scheduler, retry=retry or RetryPolicy())
    # The provider's limits hold for the whole fleet; a 429 on any path slows everyone.
    limiter = ProviderLimiter(
        redis,
        prefix=settings.redis_prefix,
        provider=config.name,
        limits=Limits(config.max_refresh_rate, config.max_concurrency),
        lease=engine.lock_ttl,
    )
    batches = BatchRefresher(
        refresher,
        limiter,
        size=settings.refresh_batch,
        lanes=BATCH_LANES,
        shards=settings.worker_shards,
    )
    return ProviderStack(
        config=config,
        settings=seen,
        store=store,
        oauth=oauth,
        ring=bound,
        engine=engine,
        scheduler=scheduler,
        refresher=refresher,
        batches=batches,
    )


def worker_settings(
    settings: Settings,
    redis_url: str,
    *,
    job_timeout: float = JOB_TIMEOUT,
    sweep_every: int = SWEEP_EVERY,
    cleanup_every: int = CLEANUP_EVERY,
    retry: RetryPolicy | None = None,
    webhook_retry: WebhookRetry | None = None,
    batched: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker``, wired to one ``Settings`` object.

    Scheduled refreshes run in batches taken from the schedule by the worker's own lanes
    (``batched``); without, each is a deferred arq job of its own, with a sweep requeueing lost
    ones (the earlier path, kept for tests of the jobs themselves).

    ``sweep_every`` and ``cleanup_every`` are seconds and must divide 60 (arq's cron fields).
    A job whose worker died is run again ``job_timeout`` + 10 s later.
    """
    # A webhook attempt must end before arq's job timeout: arq would fail the job for good, and
    # the notice would be lost uncounted.
    webhook_retry = webhook_retry or WebhookRetry(
        deadline=min(WEBHOOK_ATTEMPT_DEADLINE, job_timeout / 2)
    )
    if 60 % sweep_every or 60 % cleanup_every:
        raise ValueError("sweep_every and cleanup_every must divide 60")
    if webhook_retry.deadline >= job_timeout:
        raise ValueError("webhook_retry.deadline must be shorter than job_timeout")
    if job_timeout > JOB_TIMEOUT:
        # The store remembers event ids for a window derived from JOB_TIMEOUT: a longer job
        # could be redelivered after its id was forgotten and apply twice.
        raise ValueError(f"job_timeout must be at most {JOB_TIMEOUT} s")

    async def startup(ctx: dict[str, Any]) -> None:
        shared = RedisStore(
            ctx["redis"], prefix=settings.redis_prefix, shards=settings.redis_shards
        )
        await check_shards(ctx["redis"], shared.keys)
        ring = KeyRing.from_strings(k.reveal() for k in settings.encryption_keys)
        await check_key_ring(shared, ring, settings.provider_names)
        # One clock for every decision this worker shares with other processes: Redis's.
        clock = RedisClock(ctx["redis"])
        await clock.sync()
        ctx["clock"] = clock
        # One connection for each provider call the worker can make at once: a job each, and
        # every member of each provider's lanes of batches.
        connections = MAX_JOBS + len(settings.providers) * BATCH_LANES * settings.refresh_batch
        http = ProviderSession(timeout=settings.http_timeout, connections=connections)
        bus = EventBus(
            ctx["redis"],
            keys=shared.keys,
            queue_name=settings.queue_name,
            timeout=settings.event_timeout,
            clock=clock,
        )
        services = Services(
            settings=settings,
            bus=bus,
            http=http,
            ring=ring,
            clock=clock,
            webhooks=WebhookSender(
                settings, ctx["redis"], shared.keys, retry=webhook_retry, clock=clock
            )
            if settings.webhook_url
            else None,
        )
        for config in settings.providers:
            services.stacks[config.name] = _provider_stack(
                settings, config, ctx["redis"], http, ring, clock, retry, batched
            )
        ctx["services"] = services
        # Tokens a worker on this machine obtained and could not store before it died: stored
        # now, before this worker takes a job that could present the refresh token they replaced.
        replayed = 0
        for refresher in services.refreshers:
            replayed += await refresher.replay()
        ctx["on_redis_back"] = _on_redis_back
        ctx["heartbeat"] = asyncio.create_task(
            _heartbeat(shared, clock), name="consent-flow-heartbeat"
        )
        if batched:
            # Each provider's lanes: its batches, within its own limits.
            ctx["batches"] = asyncio.create_task(
                _gather(*(stack.batches.run() for stack in services.stacks.values())),
                name="consent-flow-batches",
            )
        # A provider may be down at start: retried in the background, health red meanwhile.
        ctx["provider_watches"] = [
            asyncio.create_task(
                ProviderWatch(
                    stack.oauth,
                    ctx["redis"],
                    stack.store.keys,
                    refresher=stack.refresher,
                    clock=clock,
                ).run(),
                name=f"consent-flow-provider-{name}",
            )
            for name, stack in services.stacks.items()
        ]
        log.info(
            "worker_started",
            queue=settings.queue_name,
            providers=list(services.stacks),
            key_ids=list(ring.key_ids),
            clock_offset_s=round(clock.offset, 3),
            spool_replayed=replayed,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        # The batches first: a member whose answer is in flight goes on in the background,
        # and is given its moment below with the other deferred commits.
        tasks: list[asyncio.Task[None]] = [
            ctx[name] for name in ("batches", "heartbeat") if ctx.get(name) is not None
        ]
        for task in [*tasks, *ctx.get("provider_watches", ())]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        services: Services | None = ctx.get("services")
        if services is not None:
            await asyncio.gather(
                *(r.abandon_pending(SHUTDOWN_COMMIT_WAIT) for r in services.refreshers)
            )
            await services.http.aclose()
            if services.webhooks is not None:
                await services.webhooks.aclose()

    return {
        "functions": [
            func(
                handle_event,
                name=HANDLE_EVENT,
                keep_result=0,
                max_tries=EVENT_MAX_TRIES,
                timeout=job_timeout,
            ),
            func(
                refresh_tokens,
                name=REFRESH_JOB,
                keep_result=0,
                max_tries=REFRESH_MAX_TRIES,
                timeout=job_timeout,
            ),
            # One try more than attempts: a worker that died in the last attempt still counts
            # the notice as a dead letter on the next.
            func(
                deliver_webhook,
                name=WEBHOOK_JOB,
                keep_result=WEBHOOK_DEDUP_WINDOW,
                max_tries=webhook_retry.max_attempts + 1,
                timeout=job_timeout,
            ),
        ],
        "cron_jobs": [
            # Batched, the schedule itself is the queue: nothing can go missing from it.
            *(
                []
                if batched
                else [
                    cron(
                        sweep,
                        name="sweep",
                        second=set(range(0, 60, sweep_every)),
                        keep_result=0,
                        run_at_startup=True,
                        timeout=job_timeout,
                    )
                ]
            ),
            cron(
                cleanup,
                name="cleanup",
                second=set(range(0, 60, cleanup_every)),
                keep_result=0,
                run_at_startup=True,
                timeout=job_timeout,
            ),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": arq_redis_settings(redis_url),
        **JOB_SERIALIZERS,
        "queue_name": settings.queue_name,
        "queue_shards": settings.worker_shards or tuple(range(settings.redis_shards)),
        "health_check_key": settings.queue_name + ":health-check",
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "poll_delay": POLL_DELAY,
        "keep_result": 0,
        "max_jobs": MAX_JOBS,
        "handle_signals": True,
    }


def _from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    settings = Settings.from_env(environ, require_provider=True, require_keys=True)
    if not settings.redis_url:
        from consent_flow.errors import SettingsError

        raise SettingsError("CONSENT_REDIS_URL", "is required for `arq workers.WorkerSettings`")
    return worker_settings(settings, settings.redis_url)


def __getattr__(name: str) -> Any:
    # ``arq workers.WorkerSettings`` looks the name up when it starts: the environment is read
    # then, at the edge, and never at import. arq takes a dict of settings as well as a class.
    if name == "WorkerSettings":
        return _from_environment()
    raise AttributeError(name)
