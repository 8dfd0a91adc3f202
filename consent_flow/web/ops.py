"""Operator routes: ``GET /metrics`` for Prometheus and the read-only ``GET /ops`` pages.

``ops_routes(client)`` returns Starlette routes to mount beside ``consent_routes(client)``:

``GET /metrics``
    The Prometheus text exposition (OpenMetrics when the scraper asks for it), built by
    prometheus_client from one :class:`~consent_flow.store.metrics.Snapshot` read per scrape.
``GET /ops``
    Consents by state, the refresh figures, and the users of one state with since-when,
    oldest first (``?state=provisioned&offset=0&limit=50``; at most 500 rows a page).
``GET /ops/users/{user}``
    One user's status (the record's public view: no ciphertext, no authorization URL) and
    timeline (the history, oldest first).

Access. These routes show user ids and reasons, and the callback port they share may face the
internet, so they are never open to everyone:

* with ``CONSENT_OPS_TOKEN`` set, every request must present the token, either as HTTP Basic
  credentials (any user name, the token as password; a browser is asked for them with a
  ``WWW-Authenticate: Basic realm="consent-flow operators"`` challenge) or as
  ``Authorization: Bearer <token>`` (what a Prometheus scrape config sends). The comparison
  takes constant time. Anything else gets 401.
* without it, only loopback clients (127.0.0.0/8, ::1) are served; anyone else gets 403. A
  request that carries proxy headers (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) is
  not treated as local even when the proxy itself connects from loopback: behind a reverse
  proxy, set the token.

Pages come from ``templates/ops/`` with autoescaping (every value is text), answer with the
callback pages' security headers (a CSP of ``default-src 'none'`` that lets only the pages' own
stylesheet through: they run no script), 400 for a bad query value and 404 for a user the store
has never seen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast
from urllib.parse import quote, urlencode

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from consent_flow.client import ConsentClient
from consent_flow.core.records import ProviderRevocation, check_user
from consent_flow.core.table import TRANSITIONS, State
from consent_flow.errors import ConsentError, UnknownProvider
from consent_flow.settings import is_loopback_host
from consent_flow.store.batch import Backlog
from consent_flow.store.metrics import (
    LEAD_BUCKETS,
    REFRESH_OUTCOMES,
    Snapshot,
    merged_snapshot,
    read_snapshot,
)
from consent_flow.web.pages import SECURITY_HEADERS, render

__all__ = ["ops_routes"]

log = structlog.get_logger("consent_flow.ops")

REALM = "consent-flow operators"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_OFFSET = 10**9  # far beyond any index; keeps the number a Redis integer
DEFAULT_STATE = State.PROVISIONED
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
# Links are relative, so the pages work wherever the routes are mounted: from /ops/users/<id>
# (the id percent-encoded, slashes included) two levels up is the directory /ops lives in.
USER_PAGE_HOME = "../../ops"
_NUMBER = re.compile(r"^[0-9]{1,10}$")
# The bucket label format of prometheus_client's own histograms ("5.0", "+Inf"); it is untyped.
_le = cast("Callable[[float], str]", floatToGoString)


# --- access ---------------------------------------------------------------------------------


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the presented token's length too.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _presented_token(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, colon, password = decoded.partition(":")  # RFC 7617 2: user-id ":" password
        return password if colon else None
    return None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _host_name(header: str) -> str:
    """The name or address of a ``Host`` header, without its port."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _denied(client: ConsentClient, request: Request, home: str) -> Response | None:
    """None when the request may see operator data, else the 401 or 403 answer."""
    token = client.settings.ops_token
    host = request.client.host if request.client else None
    if token:
        presented = _presented_token(request)
        if presented is not None and hmac.compare_digest(
            _digest(presented), _digest(token.reveal())
        ):
            return None
        log.warning("ops_access_denied", why="token", client=host, path=request.url.path)
        response = _error(
            request,
            401,
            "Sign in required",
            "These pages need the operators' token (CONSENT_OPS_TOKEN).",
            home=home,
        )
        response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
        return response
    # What the guard can tell: the TCP peer, proxy headers, and the name the client asked for.
    # A client that arrives through a proxy or forwarder on this machine is a loopback peer; it
    # names this machine's public name (or the DNS-rebinding attacker's) unless it forges Host.
    # Hence the rule that serving beyond loopback needs CONSENT_OPS_TOKEN.
    proxied = any(name in request.headers for name in _PROXY_HEADERS)
    local_name = is_loopback_host(_host_name(request.headers.get("host", "")))
    if _is_loopback(host) and not proxied and local_name:
        return None
    log.warning("ops_access_denied", why="not_local", client=host, path=request.url.path)
    return _error(
        request,
        403,
        "Forbidden",
        "Without CONSENT_OPS_TOKEN these pages are served to this machine only.",
        home=home,
    )


# --- /metrics -------------------------------------------------------------------------------


def cumulative_buckets(raw: Mapping[str, int]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, ascending, ending at +Inf) from per-bucket counts."""
    counts: dict[float, int] = dict.fromkeys(LEAD_BUCKETS, 0)
    counts.setdefault(math.inf, 0)
    for key, n in raw.items():
        try:
            bound = float(key)
        except ValueError:
            continue  # not a bound: nothing a scraper could use
        if not math.isnan(bound):
            counts[bound] = counts.get(bound, 0) + n
    out: list[tuple[str, float]] = []
    total = 0
    for bound in sorted(counts):
        total += counts[bound]
        out.append((_le(bound), float(total)))
    return out


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"consent_flow_{name}", documentation, value=value)


class SnapshotCollector(Collector):
    """Turns one snapshot into metric families; a new one is built for every scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        transitions = CounterMetricFamily(
            "consent_flow_transitions",
            "State machine transitions committed, by event and states.",
            labels=["event", "from_state", "to_state"],
        )
        # Every row that writes starts at zero, so rate() sees the first one happen.
        counts: dict[tuple[str, str, str], int] = {}
        for row in TRANSITIONS:
            if row.changes:
                for source in row.sources:
                    dest = row.dest or source
                    counts[(row.event.value, source.value, dest.value)] = 0
        counts.update(s.transitions)
        for labels, n in sorted(counts.items()):
            transitions.add_metric(list(labels), n)
        yield transitions

        refresh = CounterMetricFamily(
            "consent_flow_refresh", "Token refresh attempts, by outcome.", labels=["outcome"]
        )
        outcomes = dict.fromkeys(REFRESH_OUTCOMES, 0)
        outcomes.update(s.refresh_outcomes)
        for outcome, n in outcomes.items():
            refresh.add_metric([outcome], n)
        yield refresh

        worker = CounterMetricFamily(
            "consent_flow_worker_events",
            "Redis outages workers rode out (and their seconds), refresh commits that waited for "
            "Redis, refreshes committed from a worker's spool at start.",
            labels=["event"],
        )
        for name, amount in sorted(s.worker_events.items()):
            worker.add_metric([name], amount)
        yield worker

        yield HistogramMetricFamily(
            "consent_flow_refresh_lead_seconds",
            "How long before the access token's expiry successful refreshes happened.",
            buckets=cumulative_buckets(s.lead_buckets),
            sum_value=s.lead_sum,
        )

        consents = GaugeMetricFamily(
            "consent_flow_consents", "Users in each consent state.", labels=["state"]
        )
        for state in State:
            consents.add_metric([state.value], s.states.get(state.value, 0))
        yield consents

        connections = GaugeMetricFamily(
            "consent_flow_connections",
            "Connections in each consent state, by provider.",
            labels=["provider", "state"],
        )
        for provider, states in sorted(s.provider_states.items()):
            for state in State:
                connections.add_metric([provider, state.value], states.get(state.value, 0))
        yield connections

        yield _gauge("queue_depth", "Jobs due in the queue, waiting for a worker.", s.queue_depth)
        yield _gauge("deferred_jobs", "Jobs queued to run later.", s.deferred_jobs)
        yield _gauge("workers_alive", "Workers with a recent heartbeat.", s.workers_alive)
        skew = s.clock_skew
        yield _gauge(
            "clock_skew_seconds",
            "Largest distance of a live worker's clock from Redis's time.",
            0.0 if skew is None else abs(skew[1]),
        )
        yield _gauge(
            "refreshes_paused",
            "1 while refreshes are halted for everyone (invalid_client).",
            1 if s.refreshes_paused is not None else 0,
        )
        yield _gauge(
            "refreshes_due_next_hour",
            "Grants whose refresh falls due within the next hour.",
            s.refreshes_due_next_hour,
        )
        backlog: dict[str, tuple[str, Callable[[Backlog], float]]] = {
            "refresh_backlog": (
                "Due scheduled refreshes not yet taken by a worker.",
                lambda b: b.due,
            ),
            "refresh_backlog_oldest_due_seconds": (
                "How long the oldest due scheduled refresh has waited.",
                lambda b: b.oldest_due_age or 0.0,
            ),
            "refresh_drain_per_second": (
                "Scheduled refreshes applied per second over the last minute.",
                lambda b: b.drain_per_s,
            ),
            "refresh_lapsing_before_turn": (
                "Due grants whose refresh token lapses before their turn at the drain rate.",
                lambda b: b.lapsing,
            ),
        }
        for name, (doc, value) in backlog.items():
            family = GaugeMetricFamily(f"consent_flow_{name}", doc, labels=["provider"])
            for provider, figures in s.backlogs.items():
                family.add_metric([provider], value(figures))
            yield family
        yield _gauge(
            "refresh_failures_24h",
            "Transient refresh failures in the last 24 hours.",
            s.refresh_failures_24h,
        )
        revocations = CounterMetricFamily(
            "consent_flow_provider_revocations",
            "Revoked grants by what became of them at the provider: done (revoked there), "
            "unsupported (no revocation endpoint), abandoned (the outbox gave up).",
            labels=["outcome"],
        )
        revocation_counts = dict.fromkeys(
            (r.value for r in ProviderRevocation if r is not ProviderRevocation.DEFERRED), 0
        )
        revocation_counts.update(s.revocation_outcomes)
        for outcome, n in revocation_counts.items():
            revocations.add_metric([outcome], n)
        yield revocations

        webhooks = CounterMetricFamily(
            "consent_flow_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retried (failed, tried again "
            "later), dead (a notice given up: the dead-letter count).",
            labels=["outcome"],
        )
        webhook_counts = dict.fromkeys(("delivered", "retried", "dead"), 0)
        webhook_counts.update(s.webhook_outcomes)
        for outcome, n in webhook_counts.items():
            webhooks.add_metric([outcome], n)
        yield webhooks

        yield _gauge(
            "refresh_rejections_24h",
            "Refreshes the provider rejected (invalid_grant) in the last 24 hours.",
            s.refresh_rejections_24h,
        )


def exposition(snapshot: Snapshot, accept: str | None = None) -> tuple[bytes, str]:
    """The scrape body and its content type, for the format the ``Accept`` header asks for."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SnapshotCollector(snapshot))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


async def _snapshot(client: ConsentClient, provider: str | None = None) -> Snapshot:
    """One provider's figures (the shared ones with them), or the whole deployment's."""
    keys = client.bus.keys
    if provider is not None:
        return await read_snapshot(
            client.pool, keys.for_provider(provider), client.settings.queue_name
        )
    return await merged_snapshot(client.pool, keys, client.providers, client.settings.queue_name)


def _ops_provider(client: ConsentClient, request: Request) -> str:
    """The provider an /ops page shows (``?provider=``; the first configured by default)."""
    name = request.query_params.get("provider") or client.providers[0]
    return client.provider_name(name)


async def _metrics(client: ConsentClient, request: Request) -> Response:
    try:
        snapshot = await _snapshot(client)
    except (RedisError, OSError) as exc:
        log.error("metrics_unavailable", error=type(exc).__name__)
        return Response("redis unavailable\n", status_code=503, media_type="text/plain")
    body, content_type = exposition(snapshot, request.headers.get("accept"))
    return Response(body, headers={**SECURITY_HEADERS, "Content-Type": content_type})


# --- pages ----------------------------------------------------------------------------------
# The handlers gather plain values; templates/ops/*.html lay them out, escaping every one.


class Shown(StrEnum):
    """How the user page shows one status value."""

    TEXT = "text"
    WORDS = "words"  # a list, space-separated (scopes)
    STATE = "state"  # a badge
    TIME = "time"  # seconds since the epoch, shown as a time and how far from now


@dataclass(frozen=True, slots=True)
class StatusItem:
    name: str
    kind: Shown
    value: Any


@dataclass(frozen=True, slots=True)
class StateRow:
    state: str
    count: int
    href: str
    current: bool


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    label: str
    value: str
    warn: bool = False


@dataclass(frozen=True, slots=True)
class Pager:
    first: int
    last: int
    total: int
    prev: str | None
    next: str | None


@dataclass(frozen=True, slots=True)
class UserRow:
    user: str
    href: str
    since: float
    actor: str | None
    reason: str | None


def _page(
    request: Request, name: str, context: dict[str, Any], *, home: str, status: int = 200
) -> HTMLResponse:
    return render(request, f"ops/{name}.html", {"home": home, **context}, status=status)


def _error(request: Request, status: int, title: str, message: str, *, home: str) -> HTMLResponse:
    return _page(request, "error", {"title": title, "message": message}, home=home, status=status)


class BadQuery(ValueError):
    """A query value the pages cannot use: answered with 400, never raised to callers."""


def _params(request: Request) -> tuple[State, int, int]:
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in values:
            raise BadQuery(f"'{name[:40]}' appears more than once")
        values[name] = value

    def number(name: str, default: int, low: int, high: int) -> int:
        raw = values.get(name)
        if raw is None or raw == "":
            return default
        if not _NUMBER.match(raw) or not low <= int(raw) <= high:
            raise BadQuery(f"'{name}' must be a whole number from {low} to {high}")
        return int(raw)

    raw_state = values.get("state") or DEFAULT_STATE.value
    try:
        state = State(raw_state)
    except ValueError:
        raise BadQuery("'state' must be one of " + ", ".join(s.value for s in State)) from None
    offset = number("offset", 0, 0, MAX_OFFSET)
    limit = number("limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    return state, offset, limit


def _query(state: State, offset: int, limit: int, provider: str | None = None) -> str:
    params: dict[str, str | int] = {"state": state.value}
    if provider is not None:
        params["provider"] = provider
    if offset:
        params["offset"] = offset
    if limit != DEFAULT_PAGE_SIZE:
        params["limit"] = limit
    return "?" + urlencode(params)


def user_link(user: str, *, base: str = "ops/users/", provider: str | None = None) -> str:
    # Every reserved character is encoded ("/" too); the route takes the decoded rest of the path.
    link = base + quote(user, safe="")
    return link if provider is None else f"{link}?{urlencode({'provider': provider})}"


def _shown_provider(client: ConsentClient, provider: str) -> str | None:
    """The provider a page's links must carry: none while only one is configured."""
    return provider if len(client.providers) > 1 else None


def _state_rows(
    snapshot: Snapshot, current: State, limit: int, provider: str | None
) -> list[StateRow]:
    return [
        StateRow(
            state=state.value,
            count=snapshot.states.get(state.value, 0),
            href=_query(state, 0, limit, provider),
            current=state is current,
        )
        for state in State
    ]


def _backlog_figures(snapshot: Snapshot) -> list[Figure]:
    """The due backlog per provider: its size, its age, the drain rate, what lapses first."""
    figures = []
    for provider, b in snapshot.backlogs.items():
        age = "-" if b.oldest_due_age is None else f"{b.oldest_due_age:.0f} s"
        figures += [
            Figure(f"backlog-{provider}", f"Due refreshes waiting ({provider})", str(b.due)),
            Figure(f"backlog-age-{provider}", f"Oldest due ({provider})", age),
            Figure(f"drain-{provider}", f"Drain rate ({provider})", f"{b.drain_per_s:.1f}/s"),
            Figure(
                f"lapsing-{provider}",
                f"Lapsing before their turn ({provider})",
                str(b.lapsing),
                warn=b.lapsing > 0,
            ),
        ]
    return figures


def _figures(snapshot: Snapshot) -> list[Figure]:
    paused = snapshot.refreshes_paused
    workers = snapshot.workers_alive
    return [
        Figure(
            "due-next-hour", "Refreshes due in the next hour", str(snapshot.refreshes_due_next_hour)
        ),
        Figure("failures-24h", "Refresh failures, last 24 h", str(snapshot.refresh_failures_24h)),
        Figure(
            "rejections-24h", "Refresh rejections, last 24 h", str(snapshot.refresh_rejections_24h)
        ),
        Figure(
            "paused",
            "Refreshes paused",
            "no" if paused is None else f"yes: {paused}",
            warn=paused is not None,
        ),
        Figure(
            "revocations-abandoned",
            "Provider revocations given up",
            str(snapshot.revocations_abandoned),
        ),
        Figure("webhooks-dead", "Webhook notices given up", str(snapshot.webhooks_dead)),
        *_backlog_figures(snapshot),
        Figure("queue-depth", "Queue depth", str(snapshot.queue_depth)),
        Figure("deferred-jobs", "Deferred jobs", str(snapshot.deferred_jobs)),
        Figure("workers-alive", "Workers alive", str(workers), warn=not workers),
    ]


def _pager(
    state: State, offset: int, limit: int, total: int, shown: int, provider: str | None
) -> Pager:
    back, on = max(0, offset - limit), offset + limit
    return Pager(
        first=offset + 1 if shown else 0,
        last=offset + shown,
        total=total,
        prev=_query(state, back, limit, provider) if offset > 0 else None,
        next=_query(state, on, limit, provider) if on < total else None,
    )


async def _user_rows(
    client: ConsentClient, provider: str, users: list[tuple[str, float]]
) -> list[list[Any]]:
    rows = await client.store_for(provider).actors_and_reasons([user for user, _since in users])
    return [list(row) for row in rows]


async def _overview(client: ConsentClient, request: Request) -> Response:
    try:
        provider = _ops_provider(client, request)
        state, offset, limit = _params(request)
    except BadQuery as exc:
        return _error(request, 400, "Bad request", str(exc), home="ops")
    except UnknownProvider as exc:
        return _error(request, 404, "Unknown provider", str(exc), home="ops")
    snapshot = await _snapshot(client, provider)
    users = await client.store_for(provider).users(state, offset=offset, limit=limit)
    details = await _user_rows(client, provider, users) if users else []
    total = snapshot.states.get(state.value, 0)
    outcomes = dict.fromkeys(REFRESH_OUTCOMES, 0)
    outcomes.update(snapshot.refresh_outcomes)
    shown = _shown_provider(client, provider)
    rows = [
        UserRow(
            user=user,
            href=user_link(user, provider=shown),
            since=since,
            actor=actor,
            reason=reason,
        )
        for (user, since), (actor, reason) in zip(users, details, strict=True)
    ]
    context = {
        "title": "Consents",
        "now": client.clock(),
        "state": state.value,
        "states": _state_rows(snapshot, state, limit, shown),
        "total": sum(snapshot.states.values()),
        "figures": _figures(snapshot),
        "outcomes": list(outcomes.items()),
        "pager": _pager(state, offset, limit, total, len(rows), shown),
        "rows": rows,
    }
    return _page(request, "overview", context, home="ops")


def _status_item(name: str, value: Any) -> StatusItem:
    if isinstance(value, list):
        return StatusItem(name, Shown.WORDS, value)
    if name == "state":
        return StatusItem(name, Shown.STATE, value)
    if isinstance(value, str) and name.endswith(("_at", "since")):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return StatusItem(name, Shown.TEXT, value)
        return StatusItem(name, Shown.TIME, at)
    return StatusItem(name, Shown.TEXT, value)


async def _user_page(client: ConsentClient, request: Request) -> Response:
    home = USER_PAGE_HOME
    raw = request.path_params["user"]
    try:
        user = check_user(raw)
        provider = _ops_provider(client, request)
    except UnknownProvider as exc:
        return _error(request, 404, "Unknown provider", str(exc), home=home)
    except ConsentError:
        return _error(request, 400, "Bad request", "That is not a user id.", home=home)
    store = client.store_for(provider)
    record = await store.load(user)
    entries = await store.history(user)
    if record.version == 0 and not entries:
        return _error(
            request, 404, "Unknown user", f"No consent was ever recorded for {user}.", home=home
        )
    context = {
        "title": user,
        "now": client.clock(),
        "user": user,
        "state": record.state.value,
        "back": home
        + _query(record.state, 0, DEFAULT_PAGE_SIZE, _shown_provider(client, provider)),
        "status": [
            _status_item(name, value) for name, value in record.public().items() if name != "user"
        ],
        "entries": entries,
    }
    return _page(request, "user", context, home=home)


# --- routes ---------------------------------------------------------------------------------

Handler = Callable[[ConsentClient, Request], Awaitable[Response]]


def ops_routes(client: ConsentClient | Callable[[], ConsentClient]) -> list[Route]:
    """``/metrics``, ``/ops`` and ``/ops/users/{user}``, guarded as the module docstring says."""

    def current() -> ConsentClient:
        return client if isinstance(client, ConsentClient) else client()

    def guarded(handler: Handler, home: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            consent = current()
            denied = _denied(consent, request, home)
            if denied is not None:
                return denied
            try:
                return await handler(consent, request)
            except (RedisError, OSError) as exc:
                log.error("ops_unavailable", error=type(exc).__name__, path=request.url.path)
                return _error(
                    request,
                    503,
                    "Unavailable",
                    "Redis did not answer. Try again shortly.",
                    home=home,
                )

        return endpoint

    return [
        Route("/metrics", guarded(_metrics, "ops"), methods=["GET"], name="consent_metrics"),
        Route("/ops", guarded(_overview, "ops"), methods=["GET"], name="consent_ops"),
        Route(
            "/ops/users/{user:path}",
            guarded(_user_page, USER_PAGE_HOME),
            methods=["GET"],
            name="consent_ops_user",
        ),
    ]
