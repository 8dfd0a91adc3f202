"""consent-flow: run the worker and the callback server, and drive and inspect consent.

Exit codes: 0 done, 1 the command failed (message on stderr), 2 bad settings or usage,
130 interrupted. Results go to stdout (``--json`` for scripts, one JSON document per command and
one line per entry for ``tail``); errors go to stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
from cryptography.fernet import Fernet
from redis.exceptions import AuthenticationError, RedisError

from consent_flow.client import DEFAULT_MIN_TTL, MAX_MIN_TTL, ConsentClient, ConsentStatus
from consent_flow.core.connections import PROVIDER_NAME, is_provider_name
from consent_flow.core.records import HistoryEntry, check_scopes, check_user, iso
from consent_flow.core.table import TRANSITIONS, State, mermaid
from consent_flow.errors import (
    ConsentError,
    InvalidScope,
    SettingProblem,
    SettingsError,
    UnknownProvider,
)
from consent_flow.importer import ProgressBar, run_import
from consent_flow.logging import configure_logging
from consent_flow.oidc import OAuthClient
from consent_flow.oidc.check import DiscoveryCheck, Reach, check_discovery
from consent_flow.settings import REQUIRED_VARIABLES, Requirement, Settings
from consent_flow.store.connection import (
    arq_redis_settings,
    create_redis_pool,
    embedded_redis,
    embedded_redis_stopped,
    masked_url,
)
from consent_flow.store.import_source import ImportKeyError, load_fernet_key
from consent_flow.store.metrics import read_snapshot
from consent_flow.store.vault import KeyRing, generate_key

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MAX_LIST_LIMIT = 10_000  # one `list` page: enough for a script, small enough for one reply
REDIS_CHECK_TIMEOUT = 1.5  # seconds a command that answers a person waits for Redis to answer


# Which settings each command needs: the one table behind both its --help and what it demands
# at start (commands not listed need none).
_NEEDS: dict[str, frozenset[Requirement]] = {
    "up": frozenset(Requirement),
    "worker": frozenset({Requirement.PROVIDER, Requirement.KEYS}),
    "serve": frozenset(Requirement),
    "token": frozenset({Requirement.KEYS}),
    "keys rotate": frozenset({Requirement.KEYS}),
    "import": frozenset({Requirement.KEYS}),
}
_OFFLINE = frozenset({"diagram", "keys generate"})  # read no settings and touch no Redis


def _epilog(command: str) -> str:
    """The settings section of ``consent-flow COMMAND --help``, from :data:`_NEEDS`."""
    if command in _OFFLINE:
        return "settings: this command reads none"
    needs = _NEEDS.get(command, frozenset())
    rows = [row for r in Requirement if r in needs for row in REQUIRED_VARIABLES[r]]
    width = max((len(name) for name, _ in rows), default=0)
    lines = ["settings this command needs:"] if rows else ["settings: none required"]
    lines += [f"  {name.ljust(width)}  {what}" for name, what in rows]
    lines.append(
        "optional: CONSENT_REDIS_URL (unset: the embedded Redis under CONSENT_DATA_DIR);\n"
        "every setting: the Configuration section of README.md"
    )
    return "\n".join(lines)


def _command_name(args: argparse.Namespace) -> str:
    return f"keys {args.keys_command}" if args.command == "keys" else str(args.command)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"consent-flow: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _version() -> str:
    try:
        return version("consent-flow")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree never installed
        return "unknown"


def _user(value: str) -> str:
    """A USER argument: a malformed id is a usage error (exit 2), caught before any I/O."""
    try:
        return check_user(value)
    except ConsentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _provider(value: str) -> str:
    """A --provider NAME: malformed is a usage error before any I/O; a well-formed name that is
    not configured is one too, once the settings are read (UnknownProvider)."""
    if not is_provider_name(value):
        raise argparse.ArgumentTypeError(
            f"a provider name matches {PROVIDER_NAME.pattern}, not {value[:40]!r}"
        )
    return value


def _scope(value: str) -> str:
    """A --scope argument: not an RFC 6749 scope token is a usage error (exit 2)."""
    try:
        return check_scopes((value,))[0]
    except ConsentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, not {number}")
    return number


def _limit(value: str) -> int:
    number = _count(value)
    if not 1 <= number <= MAX_LIST_LIMIT:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LIST_LIMIT}, not {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {value!r}") from None
    if not 0 <= number <= MAX_MIN_TTL:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_MIN_TTL:g} seconds, not {value}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="consent-flow",
        description=__doc__.split("\n")[0] if __doc__ else None,
        epilog="consent-flow COMMAND --help lists the settings COMMAND needs.",
    )
    parser.add_argument("--version", action="version", version=f"consent-flow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter  # keeps the epilog's one variable per line

    def command(
        name: str, help_: str, *, json_help: str = "print JSON for scripts", parent: Any = sub
    ) -> argparse.ArgumentParser:
        full = name if parent is sub else f"keys {name}"
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_, epilog=_epilog(full), formatter_class=raw
        )
        p.add_argument("--json", action="store_true", help=json_help)
        return p

    def provider_option(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--provider",
            type=_provider,
            metavar="NAME",
            help=f"{what} (optional when one provider is configured)",
        )

    server_json = "log JSON lines (overrides CONSENT_LOG_FORMAT) and the start-up line as JSON"
    command(
        "up",
        "embedded or configured Redis, worker and callback server in one",
        json_help=server_json,
    )
    command("worker", "run an arq worker that applies consent events", json_help=server_json)
    command(
        "serve", "run the callback server (/oauth/callback, /healthz, /v1)", json_help=server_json
    )
    p = command("provision", "ask for USER's consent; prints the authorization URL")
    p.add_argument("user", type=_user)
    provider_option(p, "the provider to ask at")
    p.add_argument(
        "--scope",
        action="append",
        default=[],
        type=_scope,
        help="a scope to ask for beyond the provider's base scopes (repeatable); while USER is "
        "provisioned without it, an upgrade session asks for it and the grant keeps working",
    )
    p = command(
        "revoke",
        "revoke USER's consent at the provider and wipe local tokens "
        "(nothing to revoke is not an error: exit 0)",
    )
    p.add_argument("user", type=_user)
    provider_option(p, "the provider whose connection to revoke")
    p.add_argument("--reason", help="why (kept in the history)")
    p = command("status", "where USER's consent stands")
    p.add_argument("user", type=_user)
    provider_option(p, "the provider of the connection")
    p = command("history", "every transition of USER, oldest first")
    p.add_argument("user", type=_user)
    provider_option(p, "the provider of the connection")
    p = command(
        "list",
        "connections and their states, by provider, then by state, then by when they entered it",
    )
    provider_option(p, "list this provider's connections only (default: every provider's)")
    p.add_argument("--state", choices=[s.value for s in State])
    p.add_argument("--offset", type=_count, default=0, help="rows to skip (default 0)")
    p.add_argument(
        "--limit",
        type=_limit,
        default=100,
        help=f"rows at most, 1 to {MAX_LIST_LIMIT} (default 100)",
    )
    command("stats", "counts per state, in total and per provider")
    command("providers", "each provider: its discovered endpoints, whether it can revoke")
    command("tail", "follow transitions live, across all users", json_help="one JSON line each")
    p = command("token", "print a valid access token for USER")
    p.add_argument("user", type=_user)
    provider_option(p, "the provider the token is for")
    p.add_argument(
        "--min-ttl",
        type=_seconds,
        default=DEFAULT_MIN_TTL,
        metavar="SECONDS",
        help="the token must stay valid this long; refreshed first if it would not "
        f"(default {DEFAULT_MIN_TTL:g}; lower it for a provider whose tokens live shorter)",
    )
    command("diagram", "the state machine as Mermaid")
    p = command("import", "import grants from nextcloud-mcp-server's token store")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB (its DATABASE_URL works)",
    )
    p.add_argument(
        "--fernet-key-env",
        required=True,
        metavar="VAR",
        help="the environment variable holding the store's Fernet key (its TOKEN_ENCRYPTION_KEY)",
    )
    provider_option(p, "the provider the grants are for")
    p.add_argument("--dry-run", action="store_true", help="read and classify, write nothing")
    p.add_argument(
        "--restart", action="store_true", help="start from the first row, not where a run stopped"
    )
    keys = sub.add_parser("keys", help="encryption keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    command("generate", "print a new key for CONSENT_ENCRYPTION_KEYS", parent=keys_sub)
    command(
        "rotate",
        "re-encrypt every record under the first key of CONSENT_ENCRYPTION_KEYS",
        parent=keys_sub,
    )
    return parser


def _print(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=None, separators=(",", ":"), ensure_ascii=False))
    else:
        print(human(data))


def _actor() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


def _status_text(data: dict[str, Any]) -> str:
    line = f"{data['user']}: {data['state']}"
    if data.get("since"):
        line += f" since {data['since']}"
    if data.get("reason"):
        line += f" ({data['reason']})"
    if data.get("note"):
        line += f": {data['note']}"
    extra = []
    for name in (
        "scopes",
        "access_token_expires_at",
        "refresh_token_expires_at",
        "next_refresh_at",
        "refresh_failures",
        "failing_since",
        "last_refresh_error",
        "provider_revocation",
        "provider_revocation_note",
        "session_expires_at",
        "requested_scopes",
        "authorization_url",
    ):
        if data.get(name) not in (None, [], 0, ""):
            value = data[name]
            extra.append(f"  {name}: {' '.join(value) if isinstance(value, list) else value}")
    return "\n".join([line, *extra])


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(header)] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells
    )


def _stats_text(data: dict[str, Any]) -> str:
    lines = [_table(list(data["states"].items()), ("STATE", "COUNT")), ""]
    for name in (
        "refreshes_due_next_hour",
        "refresh_failures_24h",
        "refresh_rejections_24h",
        "queue_depth",
        "deferred_jobs",
        "workers_alive",
        "refreshes_paused",
        "revocations_abandoned",
        "webhooks_dead",
    ):
        lines.append(f"{name.replace('_', ' ')}: {data[name] if data[name] is not None else '-'}")
    if data["clock_skew"] is not None:
        skew = f"{data['clock_skew']:+.3f} s (worker {data['clock_skew_worker']})"
        lines.append(f"clock skew: {data['clock_skew_problem'] or skew}")
    backlog = [
        (
            name,
            b["due"],
            "-" if b["oldest_due_age_s"] is None else f"{b['oldest_due_age_s']:g} s",
            f"{b['drain_per_s']:g}/s",
            b["lapsing_before_turn"],
        )
        for name, b in data.get("backlog", {}).items()
    ]
    if backlog:
        header = ("PROVIDER", "DUE", "OLDEST DUE", "DRAIN", "LAPSING BEFORE TURN")
        lines += ["", _table(backlog, header)]
    providers = data.get("providers", {})
    if len(providers) > 1:
        # The figures above are summed over providers: each one's own, side by side.
        rows = [
            (
                name,
                *(p["states"].get(state.value, 0) for state in State),
                p["refreshes_due_next_hour"],
                p["refresh_failures_24h"],
                p["refresh_rejections_24h"],
                "yes" if p["refreshes_paused"] else "no",
            )
            for name, p in providers.items()
        ]
        columns = (
            "PROVIDER",
            *(state.value.upper() for state in State),
            "DUE NEXT HOUR",
            "FAILURES 24H",
            "REJECTIONS 24H",
            "PAUSED",
        )
        lines += ["", _table(rows, columns)]
    return "\n".join(lines)


def _consent_dict(status: ConsentStatus) -> dict[str, Any]:
    """The one shape of ``provision``, ``status`` and ``revoke`` for scripts: the same keys first,
    the session's while one is open, then what the record adds (token expiry, refresh state)."""
    out: dict[str, Any] = {
        "user": status.user,
        "provider": status.provider,
        "state": status.state.value,
        "since": status.to_dict()["since"],
        "reason": status.reason,
        "scopes": list(status.scopes),
    }
    if status.authorization_url:
        # A session is open: the first authorization, or an upgrade beside the grant.
        out["authorization_url"] = status.authorization_url
        out["requested_scopes"] = list(status.requested_scopes)
        if status.upgrade:
            out["upgrade"] = True
    if status.scopes_missing:
        out["scopes_missing"] = list(status.scopes_missing)
    details = {
        k: v
        for k, v in status.details.items()
        if k not in out and k not in ("result", "error", "already", "actor", "version")
    }
    return {**out, **details}


class RedisUnreachable(ConsentError):
    """Redis did not answer a command that a person waits on: one line saying where and why."""

    def __init__(self, url: str, exc: BaseException) -> None:
        if isinstance(exc, AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            why, check = "it refused the credentials", "the user name and password in"
        elif isinstance(exc, TimeoutError | asyncio.TimeoutError):
            why, check = f"no answer within {REDIS_CHECK_TIMEOUT:g} s", "that it runs and"
        else:
            text = str(exc).strip().rstrip(".")
            why = "connection refused" if "refused" in text.lower() or "111" in text else text
            check = "that it runs and"
        super().__init__(
            f"Redis at {masked_url(url)} is not reachable ({why or type(exc).__name__}): "
            f"check {check} CONSENT_REDIS_URL"
        )


async def _check_redis(url: str) -> None:
    """Answer within seconds when Redis is not there, instead of riding out an outage as the
    worker's connections do: one try, no reconnects, a bounded wait."""
    options = arq_redis_settings(url, startup_retries=0)
    options.retry, options.retry_on_error = None, None
    try:
        async with asyncio.timeout(REDIS_CHECK_TIMEOUT):
            pool = await create_redis_pool(options)
            await pool.aclose()
    except (RedisError, OSError, TimeoutError) as exc:
        raise RedisUnreachable(url, exc) from None


async def _with_client(settings: Settings, run: Callable[[ConsentClient], Awaitable[int]]) -> int:
    if settings.redis_url:
        await _check_redis(settings.redis_url)
    try:
        async with ConsentClient(settings) as client:
            return await run(client)
    except RedisError as exc:  # Redis went away after the check
        raise RedisUnreachable(settings.redis_url or "the embedded Redis", exc) from None


async def _discover(settings: Settings) -> list[tuple[str, DiscoveryCheck]]:
    async with httpx.AsyncClient(timeout=settings.http_timeout, follow_redirects=False) as http:
        names = settings.provider_names
        checks = await asyncio.gather(
            *(check_discovery(OAuthClient(settings.for_provider(n), http)) for n in names)
        )
    return list(zip(names, checks, strict=True))


def _check_providers(settings: Settings, *, as_json: bool) -> None:
    """``up``, ``worker``, ``serve``: each provider's discovery document, once, before starting.

    Settings one can never work with are a settings error (exit 2) naming the URL; a provider
    that is merely down is said in one line, and the process starts and keeps trying."""
    found = asyncio.run(_discover(settings))
    several = len(found) > 1
    problems = []
    for name, check in found:
        if check.reach is Reach.MISCONFIGURED:
            problems.append(
                SettingProblem(
                    _variable_to_fix(settings, name, check),
                    f"{check}; these settings can never work with it",
                )
            )
    if problems:
        raise SettingsError.of(problems)
    for name, check in found:
        if check.reach is not Reach.DOWN:
            continue
        if as_json:
            line: dict[str, Any] = {"event": "provider_unreachable", "provider": name}
            line.update(url=check.url, problem=check.problem, retrying=True)
            print(json.dumps(line, separators=(",", ":")), file=sys.stderr)
        else:
            print(
                f"consent-flow: {f'provider {name}: ' if several else ''}{check}; starting "
                "anyway and trying again in the background (/healthz is red until it answers)",
                file=sys.stderr,
            )


def _variable_to_fix(settings: Settings, name: str, check: DiscoveryCheck) -> str:
    """The variable (or providers file entry) an operator changes for an unusable document."""
    if settings.provider_table:
        return f"CONSENT_PROVIDERS_FILE [providers.{name}]"
    derived = settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
    explicit = settings.discovery_url not in ("", derived)
    if explicit and "issuer" not in (check.problem or ""):
        return "CONSENT_DISCOVERY_URL"
    return "CONSENT_ISSUER"


def _run_worker(settings: Settings, *, redis_url: str) -> None:
    from workers import ConsentWorker, worker_settings

    ConsentWorker(**worker_settings(settings, redis_url)).run()


def _uvicorn_server(settings: Settings, redis_url: str, *, watch_provider: bool = True) -> Any:
    import uvicorn

    from consent_flow.web.callback import create_app

    config = uvicorn.Config(
        create_app(settings, redis_url=redis_url, watch_provider=watch_provider),
        host=settings.http_host,
        port=settings.http_port,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
    )
    return uvicorn.Server(config)


async def _up(settings: Settings, redis_url: str) -> None:
    from workers import ConsentWorker, worker_settings

    options = worker_settings(settings, redis_url)
    options["handle_signals"] = False  # uvicorn owns SIGINT/SIGTERM; the worker stops with it
    worker = ConsentWorker(**options)
    server = _uvicorn_server(settings, redis_url, watch_provider=False)  # the worker watches
    worker_task = asyncio.create_task(worker.main())

    async def stop_when_redis_stops() -> None:
        # Nothing restarts an embedded Redis that died: exit and say so, rather than serve on
        # with every request failing.
        await embedded_redis_stopped(settings.data_dir)
        server.should_exit = True

    watch = None if settings.redis_url else asyncio.create_task(stop_when_redis_stops())
    try:
        await server.serve()
    finally:
        redis_lost = watch is not None and watch.done() and not watch.cancelled()
        for task in (worker_task, watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not redis_lost:
            await worker.close()  # its last words go to Redis; a lost one would only retry
    if redis_lost:
        raise ConsentError(
            f"the embedded Redis ({redis_url}) stopped while `up` was running "
            f"(see {settings.data_dir / 'redis.log'}); `up` stops too: start it again"
        )


def _terminate_like_interrupt() -> None:
    """SIGTERM (docker stop, systemd) shuts down as cleanly as Ctrl-C.

    uvicorn stops on SIGTERM and then raises the signal again under the handler it found; with
    Python's default that kills the process before our clean-up (the embedded Redis) runs.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _key_text(data: dict[str, Any]) -> str:
    return str(data["key"])


def _diagram_dict() -> dict[str, Any]:
    return {
        "mermaid": mermaid(),
        "transitions": [
            {
                "event": t.event.value,
                "from": [state.value for state in t.sources],
                "to": t.dest.value if t.dest else None,
                "changes": t.changes,
                "effect": t.effect.value,
                "when": [g.value for g in t.when],
                "unless": [g.value for g in t.unless],
                "note": t.note,
            }
            for t in TRANSITIONS
        ],
    }


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "provision":
        check_scopes(args.scope)  # too many is a usage error too, found before any I/O
    if args.command == "keys" and args.keys_command == "generate":
        key = generate_key()
        _print(args, {"key": key, "key_id": KeyRing.from_strings([key]).primary_id}, _key_text)
        return 0
    if args.command == "diagram":
        _print(args, _diagram_dict(), lambda data: str(data["mermaid"]).rstrip("\n"))
        return 0

    fernet = None
    if args.command == "import":
        try:
            fernet = load_fernet_key(os.environ, args.fernet_key_env)
        except ImportKeyError as exc:
            print(f"consent-flow: {exc}", file=sys.stderr)
            return EXIT_USAGE

    server_side = args.command in ("up", "worker", "serve")
    settings = Settings.from_env(requires=_NEEDS.get(_command_name(args), frozenset()))
    log_format = "json" if server_side and args.json else settings.log_format
    configure_logging(log_format, logging.INFO if server_side else logging.WARNING)
    if args.command == "up" and settings.redis_url:
        # Before the providers: a person waits on `up`, and a slow discovery document must not
        # push the answer about a missing Redis past its bound.
        asyncio.run(_check_redis(settings.redis_url))
    if server_side:
        _check_providers(settings, as_json=args.json)

    if args.command == "worker":
        with embedded_redis(settings) as url:
            _run_worker(settings, redis_url=url)
        return 0
    if args.command == "serve":
        _terminate_like_interrupt()
        with embedded_redis(settings) as url, contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_uvicorn_server(settings, url).serve())
        return 0
    if args.command == "up":
        _terminate_like_interrupt()
        with embedded_redis(settings) as url:
            callback = f"http://{settings.http_host}:{settings.http_port}{settings.redirect_path}"
            redis_at = url.split("@")[-1]
            if args.json:
                start = {"event": "up", "callback": callback, "redis": redis_at}
                print(json.dumps(start, separators=(",", ":")), file=sys.stderr)
            else:
                print(
                    f"consent-flow up: callback on {callback}, Redis at {redis_at}", file=sys.stderr
                )
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_up(settings, url))
        return 0

    async def run(client: ConsentClient) -> int:
        if fernet is not None:
            return await _import(args, client, fernet)
        return await _client_command(args, client)

    return asyncio.run(_with_client(settings, run))


# Commands about one connection: with several providers they must name one.
_CONNECTION_COMMANDS = ("provision", "revoke", "status", "history", "token")


async def _client_command(args: argparse.Namespace, client: ConsentClient) -> int:
    provider = getattr(args, "provider", None)
    if provider is not None or args.command in _CONNECTION_COMMANDS:
        # An unknown name, or none where several are configured: a usage error, before any I/O.
        provider = client.provider_name(provider)
    if args.command == "provision":
        status = await client.request_provisioning(
            args.user, provider, scopes=args.scope, actor=_actor()
        )
        _print(args, _consent_dict(status), _status_text)
    elif args.command == "revoke":
        status = await client.revoke(args.user, provider, actor=_actor(), reason=args.reason)
        data = _consent_dict(status)
        if status.details.get("result") == "unchanged":  # the table's idempotent no-op
            data["note"] = (
                "nothing to revoke: already revoked"
                if status.state is State.REVOKED
                else "nothing to revoke: no consent was granted"
            )
        _print(args, data, _status_text)
    elif args.command == "status":
        _print(args, _consent_dict(await client.status(args.user, provider)), _status_text)
    elif args.command == "history":
        rows = [_history_row(e) for e in await client.history(args.user, provider)]
        _print(args, rows, _history_text)
    elif args.command == "list":
        rows = await _list_rows(args, client, provider)
        several = len(client.providers) > 1
        _print(
            args,
            rows,
            lambda rs: _table(
                [
                    ((r["user"], r["provider"]) if several else (r["user"],))
                    + (r["state"], r["since"])
                    for r in rs
                ],
                ("USER", "PROVIDER", "STATE", "SINCE") if several else ("USER", "STATE", "SINCE"),
            ),
        )
    elif args.command == "stats":
        _print(args, await _stats(client), _stats_text)
    elif args.command == "providers":
        _print(args, await client.describe_providers(), _providers_text)
    elif args.command == "tail":
        await _tail(args, client)
    elif args.command == "token":
        token = await client.access_token(args.user, provider, min_ttl=args.min_ttl)
        _print(args, {"user": args.user, "access_token": token}, lambda d: str(d["access_token"]))
    elif args.command == "keys":
        from consent_flow.engine.rotation import rotate_keys

        report = await rotate_keys(client)
        _print(
            args,
            report,
            lambda r: (
                f"re-encrypted {r['rewritten']} of {r['records']} records"
                + (f"; {r['skipped']} busy, run it again" if r["skipped"] else "")
            ),
        )
        # Records left under the old key: the operator must not drop it yet.
        return EXIT_FAILED if report["skipped"] else 0
    return 0


HISTORY_FIELDS = ("event", "from", "to", "at", "actor", "reason", "count", "first_at")


def _history_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One history entry for scripts: refreshes in a row share one entry, so ``count`` says how
    many it stands for and ``first_at`` when the first of them ran (``at``: the last)."""
    row = {k: entry.get(k) for k in HISTORY_FIELDS}
    row["count"] = entry.get("count", 1)
    row["first_at"] = entry.get("first_at") or entry["at"]
    return row


def _history_text(rows: list[dict[str, Any]]) -> str:
    def event(r: dict[str, Any]) -> str:
        return f"{r['event']} x{r['count']} since {r['first_at']}" if r["count"] > 1 else r["event"]

    return _table(
        [(r["at"], event(r), r["from"], r["to"], r["actor"], r["reason"]) for r in rows],
        ("AT", "EVENT", "FROM", "TO", "ACTOR", "REASON"),
    )


async def _list_rows(
    args: argparse.Namespace, client: ConsentClient, provider: str | None
) -> list[dict[str, Any]]:
    """``--offset`` and ``--limit`` count rows across the providers and states listed, in
    provider order, then state order."""
    states = [State(args.state)] if args.state else list(State)
    skip, left = args.offset, args.limit
    rows: list[dict[str, Any]] = []
    for name in [provider] if provider is not None else client.providers:
        store = client.store_for(name)
        counts = await store.counts() if len(states) > 1 or provider is None else {}
        for state in states:
            if left <= 0:
                break
            if state in counts and skip >= counts[state]:
                skip -= counts[state]
                continue
            page = await store.users(state, offset=skip, limit=left)
            skip = 0
            left -= len(page)
            rows += [
                {"user": user, "provider": name, "state": state.value, "since": iso(since)}
                for user, since in page
            ]
    return rows


# What ``stats`` shows per provider (the rest of a snapshot is the deployment's own).
PROVIDER_FIGURES = (
    "states",
    "refreshes_due_next_hour",
    "refresh_failures_24h",
    "refresh_rejections_24h",
    "refreshes_paused",
    "revocations_abandoned",
)


async def _stats(client: ConsentClient) -> dict[str, Any]:
    """The deployment's figures, with ``states`` and the provider's own figures summed over
    providers, and each provider's under ``providers``."""
    per: dict[str, dict[str, Any]] = {}
    total: dict[str, Any] = {}
    for name in client.providers:
        keys = client.store_for(name).keys
        public = (await read_snapshot(client.pool, keys, client.settings.queue_name)).public()
        per[name] = {figure: public[figure] for figure in PROVIDER_FIGURES}
        if not total:
            total = public
            continue
        # Each provider's backlog is its own: side by side, never summed.
        total["backlog"] = {**total["backlog"], **public["backlog"]}
        for figure in PROVIDER_FIGURES:
            mine, sum_ = public[figure], total[figure]
            if figure == "states":
                total["states"] = {s: sum_.get(s, 0) + n for s, n in mine.items()}
            elif figure == "refreshes_paused":
                total[figure] = sum_ or mine
            else:
                total[figure] = sum_ + mine
    return {**total, "providers": per}


def _providers_text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        can = {True: "yes", False: "no", None: "unknown"}[row["can_revoke"]]
        lines.append(f"{row['name']}: {row['issuer']} (client {row['client_id']})")
        lines.append(f"  scopes: {' '.join(row['scopes'])}")
        for name, url in (row["endpoints"] or {}).items():
            if url:
                lines.append(f"  {name}: {url}")
        if row.get("discovery_error"):
            lines.append(f"  discovery: {row['discovery_error']}")
        lines.append(f"  can revoke: {can}")
    return "\n".join(lines)


async def _import(args: argparse.Namespace, client: ConsentClient, fernet: Fernet) -> int:
    try:
        report = await run_import(
            client,
            args.source,
            fernet,
            dry_run=args.dry_run,
            restart=args.restart,
            progress=ProgressBar(sys.stderr),
            provider=args.provider,
        )
    except asyncio.CancelledError:
        print(
            "consent-flow: import interrupted; run the same command again to continue",
            file=sys.stderr,
        )
        raise
    _print(args, report.as_dict(), lambda _: str(report))
    return 0


TAIL_POLL = 0.25  # seconds between reads of the streams while nothing comes


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


async def _tail(args: argparse.Namespace, client: ConsentClient) -> None:
    """Follow the transition streams (one per shard and provider) from their ends, merged in
    time order; other consumers can read them the same way. One XREAD per stream, pipelined:
    a blocking XREAD of several streams would span slots."""
    streams = [
        shard.stream
        for provider in client.providers
        for shard in client.keys.for_provider(provider).every_shard()
    ]
    async with client.pool.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        ends = await pipe.execute()
    last: dict[str, bytes] = {
        s: rows[0][0] if rows else b"0-0" for s, rows in zip(streams, ends, strict=True)
    }
    while True:
        async with client.pool.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xread({stream: last[stream]}, count=100)
            answers = await pipe.execute()
        found: list[tuple[bytes, dict[bytes, bytes]]] = []
        for stream, batches in zip(streams, answers, strict=True):
            for _, entries in batches or []:
                for entry_id, fields in entries:
                    last[stream] = entry_id
                    found.append((entry_id, fields))
        if not found:
            await asyncio.sleep(TAIL_POLL)
        for _entry_id, fields in sorted(found, key=lambda item: _entry_order(item[0])):
            entry = {
                "user": fields[b"user"].decode(),
                "provider": fields.get(b"provider", b"").decode() or None,
                **HistoryEntry.from_json(fields[b"entry"]).public(),
            }
            if args.json:
                print(json.dumps(entry, separators=(",", ":")), flush=True)
            else:
                reason = f"  ({entry['reason']})" if entry.get("reason") else ""
                print(
                    f"{entry['at']}  {entry['user']}  {entry['event']}  "
                    f"{entry['from']} -> {entry['to']}  {entry['actor']}{reason}",
                    flush=True,
                )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (SettingsError, UnknownProvider, InvalidScope) as exc:
        print(f"consent-flow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConsentError as exc:
        print(f"consent-flow: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RedisError as exc:  # a server command's Redis: its URL is in the log lines before
        print(f"consent-flow: Redis is not reachable ({type(exc).__name__})", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"consent-flow: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
