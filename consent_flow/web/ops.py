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

Pages escape every value, answer with the callback pages' security headers (a CSP of
``default-src 'none'`` with inline style only: the pages run no script), 400 for a bad query
value and 404 for a user the store has never seen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import ipaddress
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
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
from consent_flow.core.records import ProviderRevocation, check_user, iso
from consent_flow.core.table import TRANSITIONS, State
from consent_flow.errors import ConsentError
from consent_flow.settings import is_loopback_host
from consent_flow.store.metrics import LEAD_BUCKETS, REFRESH_OUTCOMES, Snapshot, read_snapshot
from consent_flow.web.callback import SECURITY_HEADERS

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


async def _snapshot(client: ConsentClient) -> Snapshot:
    return await read_snapshot(client.pool, client.store.keys, client.settings.queue_name)


async def _metrics(client: ConsentClient, request: Request) -> Response:
    try:
        snapshot = await _snapshot(client)
    except (RedisError, OSError) as exc:
        log.error("metrics_unavailable", error=type(exc).__name__)
        return Response("redis unavailable\n", status_code=503, media_type="text/plain")
    body, content_type = exposition(snapshot, request.headers.get("accept"))
    return Response(body, headers={**SECURITY_HEADERS, "Content-Type": content_type})


# --- pages ----------------------------------------------------------------------------------

_STYLE = """
 :root { color-scheme: light; }
 body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
 header { background: #1d1d1f; color: #fff; padding: .7rem 1.5rem; }
 header a { color: #fff; text-decoration: none; font-weight: 600; }
 main { max-width: 72rem; margin: 1.5rem auto; padding: 0 1.5rem; }
 h1 { font-size: 1.5rem; margin: 0 0 1rem; word-break: break-all; }
 h2 { font-size: 1.1rem; margin: 1.8rem 0 .6rem; }
 .cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(16rem, 1fr)); gap: 1rem; }
 .card { background: #fff; border: 1px solid #e4e4e7; border-radius: .5rem; padding: 1rem; }
 .card h2:first-child { margin-top: 0; }
 table { border-collapse: collapse; width: 100%; background: #fff; }
 th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #e4e4e7;
          vertical-align: top; }
 th { font-size: .8rem; text-transform: uppercase; letter-spacing: .03em; color: #52525b; }
 td.count, th.count { text-align: right; font-variant-numeric: tabular-nums; }
 tr.current td { background: #eef4ff; font-weight: 600; }
 td.user { word-break: break-all; }
 td.at, td.since { white-space: nowrap; }
 td.reason { color: #3f3f46; max-width: 28rem; }
 .age { color: #71717a; font-size: .85em; }
 dl.figures { display: grid; grid-template-columns: 1fr auto; gap: .3rem 1rem; margin: 0; }
 dl.figures dt { color: #3f3f46; }
 dl.figures dd { margin: 0; text-align: right; font-variant-numeric: tabular-nums; }
 dl.status { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1.2rem;
             background: #fff; border: 1px solid #e4e4e7; border-radius: .5rem; padding: 1rem; }
 dl.status dt { color: #52525b; } dl.status dd { margin: 0; word-break: break-all; }
 .warn { color: #b3261e; font-weight: 600; }
 .badge { display: inline-block; padding: 0 .45rem; border-radius: .6rem; font-size: .85em;
          background: #e4e4e7; }
 .badge.provisioned { background: #d7f5df; color: #0a5d26; }
 .badge.pending { background: #fff1c2; color: #6b4e00; }
 .badge.revoked { background: #fde0dd; color: #8c1d18; }
 .badge.unprovisioned { background: #e4e4e7; color: #3f3f46; }
 nav#pager { display: flex; gap: 1rem; align-items: center; margin: .8rem 0; }
 nav#pager .disabled { color: #a1a1aa; }
 .empty { color: #71717a; font-style: italic; }
 .muted { color: #71717a; }
"""

_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{title} · consent-flow</title>
<style>{style}</style></head>
<body><header><a id="home" href="{home}">consent-flow · operators</a></header>
<main id="{page_id}">{body}</main></body></html>
"""


def e(value: object) -> str:
    """Escape for HTML text and quoted attributes; None shows as a dash."""
    if value is None or value == "":
        return "—"
    return html.escape(str(value), quote=True)


def _layout(page_id: str, title: str, body: str, *, home: str, status: int = 200) -> HTMLResponse:
    text = _LAYOUT.format(title=e(title), style=_STYLE, home=e(home), page_id=page_id, body=body)
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


def _error(status: int, title: str, message: str, *, home: str) -> HTMLResponse:
    body = f'<h1>{e(title)}</h1><p id="message">{e(message)}</p>'
    return _layout("error", title, body, home=home, status=status)


class BadQuery(ValueError):
    """A query value the pages cannot use: answered with 400, never raised to callers."""


def _age(at: float, now: float) -> str:
    """How far ``at`` is from ``now``, either way: "5 min ago", "in 4 min", "now"."""
    seconds = abs(now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            return f"in {amount}" if at > now else f"{amount} ago"
    return "now"


def _time(at: float | None, now: float) -> str:
    stamp = iso(at)
    if at is None or stamp is None:
        return "—"
    shown = stamp.replace("T", " ")
    return f'<time datetime="{e(stamp)}">{e(shown)}</time> <span class="age">{_age(at, now)}</span>'


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


def _query(state: State, offset: int, limit: int) -> str:
    params: dict[str, str | int] = {"state": state.value}
    if offset:
        params["offset"] = offset
    if limit != DEFAULT_PAGE_SIZE:
        params["limit"] = limit
    return "?" + urlencode(params)


def user_link(user: str, *, base: str = "ops/users/") -> str:
    # Every reserved character is encoded ("/" too); the route takes the decoded rest of the path.
    return base + quote(user, safe="")


def _states_table(snapshot: Snapshot, current: State, limit: int) -> str:
    rows = []
    for state in State:
        n = snapshot.states.get(state.value, 0)
        css = "state-row current" if state is current else "state-row"
        rows.append(
            f'<tr class="{css}" data-state="{state.value}">'
            f'<td class="state"><a href="{e(_query(state, 0, limit))}">'
            f'<span class="badge {state.value}">{state.value}</span></a></td>'
            f'<td class="count">{n}</td></tr>'
        )
    total = sum(snapshot.states.values())
    return (
        '<table id="states"><thead><tr><th>State</th><th class="count">Users</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody>"
        f'<tfoot><tr><td>all</td><td class="count" id="total">{total}</td></tr></tfoot></table>'
    )


def _figures(snapshot: Snapshot) -> str:
    paused = snapshot.refreshes_paused
    paused_html = f'<span class="warn">yes: {e(paused)}</span>' if paused is not None else "no"
    workers = snapshot.workers_alive
    figures = [
        ("due-next-hour", "Refreshes due in the next hour", str(snapshot.refreshes_due_next_hour)),
        ("failures-24h", "Refresh failures, last 24 h", str(snapshot.refresh_failures_24h)),
        ("rejections-24h", "Refresh rejections, last 24 h", str(snapshot.refresh_rejections_24h)),
        ("paused", "Refreshes paused", paused_html),
        (
            "revocations-abandoned",
            "Provider revocations given up",
            str(snapshot.revocations_abandoned),
        ),
        ("webhooks-dead", "Webhook notices given up", str(snapshot.webhooks_dead)),
        ("queue-depth", "Queue depth", str(snapshot.queue_depth)),
        ("deferred-jobs", "Deferred jobs", str(snapshot.deferred_jobs)),
        (
            "workers-alive",
            "Workers alive",
            str(workers) if workers else '<span class="warn">0</span>',
        ),
    ]
    items = "".join(
        f'<dt>{e(label)}</dt><dd id="fig-{key}">{value}</dd>' for key, label, value in figures
    )
    outcomes = dict.fromkeys(REFRESH_OUTCOMES, 0)
    outcomes.update(snapshot.refresh_outcomes)
    outcome_items = "".join(
        f'<dt>{e(name.replace("_", " "))}</dt><dd id="outcome-{e(name)}">{n}</dd>'
        for name, n in outcomes.items()
    )
    return (
        f'<dl class="figures" id="figures">{items}</dl>'
        f'<h2>Refresh outcomes, all time</h2><dl class="figures" id="outcomes">{outcome_items}</dl>'
    )


def _pager(state: State, offset: int, limit: int, total: int, shown: int) -> str:
    first = offset + 1 if shown else 0
    last = offset + shown
    if offset > 0:
        prev_q = _query(state, max(0, offset - limit), limit)
        prev = f'<a id="prev" rel="prev" href="{e(prev_q)}">← previous</a>'
    else:
        prev = '<span id="prev" class="disabled">← previous</span>'
    if offset + limit < total:
        next_q = _query(state, offset + limit, limit)
        nxt = f'<a id="next" rel="next" href="{e(next_q)}">next →</a>'
    else:
        nxt = '<span id="next" class="disabled">next →</span>'
    shown_range = f'<span id="range">{first}&ndash;{last} of {total}</span>'
    return f'<nav id="pager">{prev}{shown_range}{nxt}</nav>'


async def _user_rows(client: ConsentClient, users: list[tuple[str, float]]) -> list[list[Any]]:
    rows = await client.store.actors_and_reasons([user for user, _since in users])
    return [list(row) for row in rows]


async def _overview(client: ConsentClient, request: Request) -> Response:
    try:
        state, offset, limit = _params(request)
    except BadQuery as exc:
        return _error(400, "Bad request", str(exc), home="ops")
    snapshot = await _snapshot(client)
    users = await client.store.users(state, offset=offset, limit=limit)
    details = await _user_rows(client, users) if users else []
    now = client.clock()
    total = snapshot.states.get(state.value, 0)
    rows = []
    for (user, since), (actor, reason) in zip(users, details, strict=True):
        rows.append(
            f'<tr class="user-row" data-user="{e(user)}">'
            f'<td class="user"><a href="{e(user_link(user))}">{e(user)}</a></td>'
            f'<td class="since">{_time(since, now)}</td>'
            f'<td class="actor">{e(actor)}</td><td class="reason">{e(reason)}</td></tr>'
        )
    if rows:
        table_body = "".join(rows)
    else:
        table_body = '<tr><td colspan="4" class="empty" id="no-users">No users here.</td></tr>'
    body = (
        "<h1>Consents</h1>"
        '<div class="cards">'
        f'<section class="card" id="by-state"><h2>By state</h2>'
        f"{_states_table(snapshot, state, limit)}</section>"
        f'<section class="card" id="refresh"><h2>Refresh</h2>{_figures(snapshot)}</section>'
        "</div>"
        f'<section id="list" data-state="{state.value}">'
        f'<h2 id="list-title"><span class="badge {state.value}">{state.value}</span> '
        f'<span class="muted">oldest first</span></h2>'
        f"{_pager(state, offset, limit, total, len(users))}"
        '<table id="users"><thead><tr><th>User</th><th>Since</th><th>Actor</th>'
        f"<th>Reason</th></tr></thead><tbody>{table_body}</tbody></table>"
        "</section>"
    )
    return _layout("ops", "Consents", body, home="ops")


def _status_value(name: str, value: Any, now: float) -> str:
    if isinstance(value, list):
        return " ".join(e(v) for v in value) or "—"
    if name == "state":
        return f'<span class="badge {e(value)}">{e(value)}</span>'
    if isinstance(value, str) and name.endswith(("_at", "since")):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return e(value)
        return _time(at, now)
    return e(value)


async def _user_page(client: ConsentClient, request: Request) -> Response:
    home = USER_PAGE_HOME
    raw = request.path_params["user"]
    try:
        user = check_user(raw)
    except ConsentError:
        return _error(400, "Bad request", "That is not a user id.", home=home)
    record = await client.store.load(user)
    entries = await client.store.history(user)
    if record.version == 0 and not entries:
        return _error(404, "Unknown user", f"No consent was ever recorded for {user}.", home=home)
    now = client.clock()
    public = record.public()
    status_items = "".join(
        f"<dt>{e(name.replace('_', ' '))}</dt>"
        f'<dd id="status-{e(name)}">{_status_value(name, value, now)}</dd>'
        for name, value in public.items()
        if name != "user"
    )
    rows = []
    for entry in entries:
        rows.append(
            '<tr class="entry">'
            f'<td class="at">{_time(entry.at, now)}</td>'
            f'<td class="event">{e(entry.event)}</td>'
            f'<td class="from">{e(entry.from_state)}</td>'
            f'<td class="to">{e(entry.to_state)}</td>'
            f'<td class="actor">{e(entry.actor)}</td>'
            f'<td class="reason">{e(entry.reason)}</td>'
            f'<td class="correlation">{e(entry.correlation_id)}</td></tr>'
        )
    timeline = "".join(rows) or (
        '<tr><td colspan="7" class="empty">No history kept (retention).</td></tr>'
    )
    back = f"{home}{_query(record.state, 0, DEFAULT_PAGE_SIZE)}"
    body = (
        f'<p><a id="back" href="{e(back)}">← all {e(record.state.value)} consents</a></p>'
        f'<h1 id="user">{e(user)}</h1>'
        f'<section id="status-section"><h2>Status</h2><dl class="status" id="status">'
        f"{status_items}</dl></section>"
        f'<section id="timeline-section"><h2>Timeline '
        f'<span class="muted">{len(entries)} entries, oldest first</span></h2>'
        '<table id="timeline"><thead><tr><th>At</th><th>Event</th><th>From</th><th>To</th>'
        "<th>Actor</th><th>Reason</th><th>Correlation id</th></tr></thead>"
        f"<tbody>{timeline}</tbody></table></section>"
    )
    return _layout("ops-user", user, body, home=home)


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
                    503, "Unavailable", "Redis did not answer. Try again shortly.", home=home
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
