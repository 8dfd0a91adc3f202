"""The callback server: ``GET /oauth/callback`` and ``GET /healthz``, as Starlette routes.

``create_app`` builds the app ``consent-flow serve`` runs. An MCP server that already has a
Starlette app and a ``ConsentClient`` mounts the same routes with ``consent_routes(client)``.

Nothing a callback carries changes anything until it has passed every check: one value per
parameter, sane lengths, a known and live ``state`` (looked up by its hash), the authorization
server's ``iss`` (RFC 9207) and a single-use claim of the session. Pages never echo the code or
the state, and every response forbids caching and referrers (the URL holds a code).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from consent_flow.client import ConsentClient
from consent_flow.core.records import clip
from consent_flow.core.table import Event
from consent_flow.engine.provider_watch import ProviderWatch, read_provider_check
from consent_flow.errors import CallbackRejected, ConsentError, ProviderError, WorkerUnavailable
from consent_flow.queue.bus import Envelope, Outcome, new_id
from consent_flow.settings import Settings
from consent_flow.store.clock import skew_problem, worst_offset
from consent_flow.store.metrics import live_clock_offsets
from consent_flow.store.redis_store import session_shard, state_hash
from consent_flow.web.api import api_routes
from consent_flow.web.pages import SECURITY_HEADERS, render

__all__ = ["consent_routes", "create_app"]

log = structlog.get_logger("consent_flow.web")

MAX_QUERY_LENGTH = 8192
MAX_PARAM_LENGTH = 4096
MAX_STATE_LENGTH = 512
MAX_ERROR_LENGTH = 100
MAX_DESCRIPTION_LENGTH = 300
WORKER_STALE_AFTER = 3 * 10  # seconds without a worker heartbeat before /healthz turns red
# RFC 6749 4.1.2.1: error = 1*( %x20-21 / %x23-5B / %x5D-7E )
_ERROR_CODE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]{1,100}$")


class PageKind(StrEnum):
    """What a result page tells the person at the browser (its ``main`` element's id)."""

    GRANTED = "granted"
    DENIED = "denied"
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"


def page(
    request: Request,
    kind: PageKind,
    title: str,
    message: str,
    *,
    reason: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    """A result page for the person at the browser (templates/callback/page.html)."""
    context = {"kind": kind, "title": title, "message": message, "reason": reason}
    return render(request, "callback/page.html", context, status=status)


def _single_params(request: Request) -> dict[str, str]:
    query = request.url.query
    if len(query) > MAX_QUERY_LENGTH:
        raise CallbackRejected("the request is too large", status=414, reason_code="too_large")
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in params:
            # RFC 6749 3.1: request and response parameters must not be included more than once.
            raise CallbackRejected(
                f"parameter '{clip(name, 40)}' appears more than once", reason_code="duplicate"
            )
        if len(value) > MAX_PARAM_LENGTH:
            raise CallbackRejected(
                f"parameter '{clip(name, 40)}' is too long", status=414, reason_code="too_large"
            )
        params[name] = value
    return params


async def _callback(client: ConsentClient, request: Request) -> Response:
    started = time.monotonic()
    try:
        params = _single_params(request)
        state = params.get("state")
        if not state:
            raise CallbackRejected("the callback carries no state", reason_code="missing_state")
        if len(state) > MAX_STATE_LENGTH:
            raise CallbackRejected("the state is too long", reason_code="too_large")
        found = await _session_owner(client, state)
        if found is None:
            raise CallbackRejected(
                "unknown or expired authorization session", reason_code="unknown_state"
            )
        provider, user, session_id = found
        oauth = client.oauth_for(provider)
        meta = await oauth.metadata()
        oauth.check_authorization_response_issuer(meta, params.get("iss"))
        event_id = new_id()
        error = params.get("error")
        if error is not None:
            if not _ERROR_CODE.match(error):
                raise CallbackRejected("malformed error parameter", reason_code="bad_error")
            payload = {"session_id": session_id, "error": error}
            description = params.get("error_description")
            if description:
                payload["error_description"] = clip(description, MAX_DESCRIPTION_LENGTH) or ""
            await _claim(client, provider, user, session_id, event_id, None)
            envelope = Envelope(
                Event.AUTHORIZATION_FAILED,
                user,
                "browser",
                event_id=event_id,
                payload=payload,
                provider=provider,
            )
        else:
            code = params.get("code")
            if not code:
                raise CallbackRejected("the callback carries no code", reason_code="missing_code")
            ring = client.ring_for(provider)
            sealed = ring.encrypt(code.encode(), user=user, purpose=f"code:{event_id}")
            await _claim(client, provider, user, session_id, event_id, sealed)
            envelope = Envelope(
                Event.AUTHORIZATION_COMPLETED,
                user,
                "browser",
                event_id=event_id,
                payload={"session_id": session_id},
                provider=provider,
            )
        outcome = await client.emit(envelope)
    except CallbackRejected as exc:
        log.warning(
            "callback_rejected",
            reason_code=exc.reason_code,
            status=exc.status,
            detail=exc.message,
            elapsed_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return page(
            request, PageKind.REJECTED, "This link cannot be used", exc.message, status=exc.status
        )
    except WorkerUnavailable:
        log.error("callback_unanswered")
        return page(
            request,
            PageKind.UNAVAILABLE,
            "Please try again later",
            "Your approval was received but could not be processed in time. "
            "Ask for access again from your application.",
            status=503,
        )
    except ProviderError as exc:
        log.error("callback_provider_error", error=exc.code)
        return page(
            request,
            PageKind.UNAVAILABLE,
            "The sign-in service is unavailable",
            str(exc),
            status=502,
        )
    log.info(
        "callback_done",
        user=outcome.user,
        result=outcome.result,
        consent_state=outcome.state,
        error=outcome.error,
        elapsed_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return _outcome_page(request, outcome)


async def _session_owner(client: ConsentClient, state: str) -> tuple[str, str, str] | None:
    """The provider, user and session id of the live session of ``state`` (in the shard the
    state names): each provider keeps its own sessions, and one redirect URI serves them all."""
    shard = session_shard(state, client.settings.redis_shards)
    if shard is None:
        return None  # no state this deployment made: as unknown as an expired one
    digest = state_hash(state)
    for provider in client.providers:
        owner = await client.store_for(provider).session_owner(shard, digest)
        if owner is not None:
            return provider, *owner
    return None


async def _claim(
    client: ConsentClient,
    provider: str,
    user: str,
    session_id: str,
    event_id: str,
    sealed: str | None,
) -> None:
    result = await client.store_for(provider).claim_session(user, session_id, event_id, sealed)
    if result == "ok":
        return
    messages = {
        "already_used": ("this authorization response was already used", 409),
        "expired": ("the authorization session has expired", 400),
    }
    message, status = messages.get(result, ("unknown or expired authorization session", 400))
    raise CallbackRejected(message, status=status, reason_code=result)


def _outcome_page(request: Request, outcome: Outcome) -> Response:
    if outcome.result == "applied" and outcome.state == "provisioned":
        return page(
            request,
            PageKind.GRANTED,
            "Access granted",
            "You can close this window and return to your application.",
        )
    if outcome.event == Event.AUTHORIZATION_FAILED.value or outcome.result == "failed":
        denied = outcome.error == "access_denied"
        return page(
            request,
            PageKind.DENIED,
            "Access was denied" if denied else "Access was not granted",
            "Nothing was shared. You can ask for access again from your application.",
            reason=outcome.reason,
            status=403,
        )
    return page(
        request,
        PageKind.REJECTED,
        "This link cannot be used",
        "The authorization session is no longer waiting for an answer.",
        status=409,
    )


async def _healthz(client: ConsentClient, request: Request) -> Response:
    checks: dict[str, Any] = {}
    healthy = True
    try:
        await client.pool.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "down" here
        checks["redis"] = f"down: {type(exc).__name__}"
        healthy = False
    if healthy:
        beat = await client.pool.get(client.settings.queue_name + ":health-check")
        checks["worker"] = "ok" if beat is not None else "no recent heartbeat"
        paused = []
        for provider in client.providers:
            store = client.store_for(provider)
            halt = await store.redis.hget(store.keys.halt, "reason")
            if halt is not None:
                one = len(client.providers) == 1
                paused.append(halt.decode() if one else f"{provider}: {halt.decode()}")
        halt = "; ".join(paused) or None
        checks["refresh"] = "ok" if halt is None else f"paused: {halt}"
        unusable = []
        for provider in client.providers:
            store = client.store_for(provider)
            problem = await read_provider_check(store.redis, store.keys)
            if problem is not None:
                one = len(client.providers) == 1
                unusable.append(problem if one else f"{provider}: {problem}")
        provider_problem = "; ".join(unusable) or None
        checks["provider"] = provider_problem or "ok"
        skew = await _clock_skew(client)
        checks["clock"] = skew or "ok"
        healthy = beat is not None and halt is None and provider_problem is None and skew is None
    body = {"status": "ok" if healthy else "fail", "checks": checks}
    return JSONResponse(body, status_code=200 if healthy else 503, headers=SECURITY_HEADERS)


async def _clock_skew(client: ConsentClient) -> str | None:
    """Why the clocks are red: this process's or a live worker's clock is further from Redis's
    than ``MAX_CLOCK_SKEW``; None when they are all within it."""
    offsets = {"this server": await client.clock.sync()}
    workers = await live_clock_offsets(client.pool, client.bus.keys, client.clock())
    offsets.update((f"worker {worker}", offset) for worker, offset in workers.items())
    worst = worst_offset(offsets)
    return None if worst is None else skew_problem(*worst)


def consent_routes(
    client: ConsentClient | Callable[[], ConsentClient], *, callback_path: str | None = None
) -> list[Route]:
    """The callback and health routes, for mounting into an existing Starlette app."""

    def current() -> ConsentClient:
        return client if isinstance(client, ConsentClient) else client()

    if callback_path is None:
        callback_path = (
            client.settings.redirect_path
            if isinstance(client, ConsentClient)
            else "/oauth/callback"
        )

    async def callback(request: Request) -> Response:
        return await _callback(current(), request)

    async def healthz(request: Request) -> Response:
        return await _healthz(current(), request)

    return [
        Route(callback_path, callback, methods=["GET"], name="consent_callback"),
        Route("/healthz", healthz, methods=["GET"], name="consent_healthz"),
    ]


def _ops_routes(current: Callable[[], ConsentClient]) -> list[Route]:
    from consent_flow.web.ops import (
        ops_routes,  # the operator pages import this module's page helpers
    )

    return ops_routes(current)


def create_app(
    settings: Settings, *, redis_url: str | None = None, watch_provider: bool = True
) -> Starlette:
    """The ASGI app of ``consent-flow serve``: the callback, ``/healthz``, ``/metrics``, the
    operator pages and the HTTP API, on a ``ConsentClient`` of its own.

    ``watch_provider``: retry an unusable discovery document in the background, the reason on
    ``/healthz`` (``up`` leaves that to its worker)."""
    settings.check_provider()
    settings.check_keys()
    holder: dict[str, ConsentClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with ConsentClient(settings, redis_url=redis_url) as client:
            holder["client"] = client
            watches = []
            for provider in client.providers if watch_provider else ():
                store = client.store_for(provider)
                watcher = ProviderWatch(
                    client.oauth_for(provider), store.redis, store.keys, clock=client.clock
                )
                watches.append(asyncio.create_task(watcher.until_discovered()))
            try:
                yield
            finally:
                holder.clear()
                for watch in watches:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch

    def current() -> ConsentClient:
        try:
            return holder["client"]
        except KeyError:
            raise ConsentError("the callback server is not running") from None

    routes: list[BaseRoute] = [
        *consent_routes(current, callback_path=settings.redirect_path),
        *_ops_routes(current),
    ]
    routes += api_routes(current)  # /v1 answers 404 until CONSENT_API_KEYS is set
    return Starlette(routes=routes, lifespan=lifespan)
