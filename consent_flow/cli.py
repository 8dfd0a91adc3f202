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

from cryptography.fernet import Fernet
from redis.exceptions import AuthenticationError, RedisError

from consent_flow.client import DEFAULT_MIN_TTL, MAX_MIN_TTL, ConsentClient, ConsentStatus
from consent_flow.core.records import HistoryEntry, check_scopes, check_user, iso
from consent_flow.core.table import TRANSITIONS, State, mermaid
from consent_flow.engine.importer import PROVIDERS, ProgressBar, run_import
from consent_flow.errors import ConsentError, InvalidScope, SettingsError
from consent_flow.logging import configure_logging
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

DEFAULT_PROVIDER = "default"  # one provider per deployment today; the field keeps room for more
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
    p.add_argument("--reason", help="why (kept in the history)")
    p = command("status", "where USER's consent stands")
    p.add_argument("user", type=_user)
    p = command("history", "every transition of USER, oldest first")
    p.add_argument("user", type=_user)
    p = command("list", "users and their states, by state then by when they entered it")
    p.add_argument("--state", choices=[s.value for s in State])
    p.add_argument("--offset", type=_count, default=0, help="rows to skip (default 0)")
    p.add_argument(
        "--limit",
        type=_limit,
        default=100,
        help=f"rows at most, 1 to {MAX_LIST_LIMIT} (default 100)",
    )
    command("stats", "counts per state")
    command("tail", "follow transitions live, across all users", json_help="one JSON line each")
    p = command("token", "print a valid access token for USER")
    p.add_argument("user", type=_user)
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
    p.add_argument(
        "--provider",
        default="default",
        choices=PROVIDERS,
        help="the provider the grants are for (one today: default)",
    )
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
    return "\n".join(lines)


def _consent_dict(status: ConsentStatus) -> dict[str, Any]:
    """The one shape of ``provision``, ``status`` and ``revoke`` for scripts: the same keys first,
    the session's while one is open, then what the record adds (token expiry, refresh state)."""
    out: dict[str, Any] = {
        "user": status.user,
        "provider": DEFAULT_PROVIDER,
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


def _run_worker(settings: Settings, *, redis_url: str) -> None:
    from workers import ConsentWorker, worker_settings

    ConsentWorker(**worker_settings(settings, redis_url)).run()


def _uvicorn_server(settings: Settings, redis_url: str) -> Any:
    import uvicorn

    from consent_flow.web.callback import create_app

    config = uvicorn.Config(
        create_app(settings, redis_url=redis_url),
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
    server = _uvicorn_server(settings, redis_url)
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
        if settings.redis_url:
            asyncio.run(_check_redis(settings.redis_url))
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


async def _client_command(args: argparse.Namespace, client: ConsentClient) -> int:
    if args.command == "provision":
        status = await client.request_provisioning(args.user, scopes=args.scope, actor=_actor())
        _print(args, _consent_dict(status), _status_text)
    elif args.command == "revoke":
        status = await client.revoke(args.user, actor=_actor(), reason=args.reason)
        data = _consent_dict(status)
        if status.details.get("result") == "unchanged":  # the table's idempotent no-op
            data["note"] = (
                "nothing to revoke: already revoked"
                if status.state is State.REVOKED
                else "nothing to revoke: no consent was granted"
            )
        _print(args, data, _status_text)
    elif args.command == "status":
        _print(args, _consent_dict(await client.status(args.user)), _status_text)
    elif args.command == "history":
        rows = [_history_row(e) for e in await client.history(args.user)]
        _print(args, rows, _history_text)
    elif args.command == "list":
        rows = await _list_rows(args, client)
        _print(
            args,
            rows,
            lambda rs: _table(
                [(r["user"], r["state"], r["since"]) for r in rs], ("USER", "STATE", "SINCE")
            ),
        )
    elif args.command == "stats":
        snapshot = await read_snapshot(
            client.store.redis, client.store.keys, client.settings.queue_name
        )
        _print(args, snapshot.public(), _stats_text)
    elif args.command == "tail":
        await _tail(args, client)
    elif args.command == "token":
        token = await client.access_token(args.user, min_ttl=args.min_ttl)
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


async def _list_rows(args: argparse.Namespace, client: ConsentClient) -> list[dict[str, Any]]:
    """``--offset`` and ``--limit`` count rows across the states listed, in state order."""
    states = [State(args.state)] if args.state else list(State)
    counts = await client.store.counts() if len(states) > 1 else {}
    skip, left = args.offset, args.limit
    rows: list[dict[str, Any]] = []
    for state in states:
        if left <= 0:
            break
        if state in counts and skip >= counts[state]:
            skip -= counts[state]
            continue
        page = await client.store.users(state, offset=skip, limit=left)
        skip = 0
        left -= len(page)
        rows += [{"user": user, "state": state.value, "since": iso(since)} for user, since in page]
    return rows


async def _import(args: argparse.Namespace, client: ConsentClient, fernet: Fernet) -> int:
    try:
        report = await run_import(
            client,
            args.source,
            fernet,
            dry_run=args.dry_run,
            restart=args.restart,
            progress=ProgressBar(sys.stderr),
        )
    except asyncio.CancelledError:
        print(
            "consent-flow: import interrupted; run the same command again to continue",
            file=sys.stderr,
        )
        raise
    _print(args, report.as_dict(), lambda _: str(report))
    return 0


async def _tail(args: argparse.Namespace, client: ConsentClient) -> None:
    """Follow the transition stream from its end; other consumers can read it the same way."""
    stream = client.store.keys.stream
    last: bytes | str = "$"
    while True:
        batches = await client.pool.xread({stream: last}, block=5000, count=100)
        for _, entries in batches or []:
            for entry_id, fields in entries:
                last = entry_id
                entry = {
                    "user": fields[b"user"].decode(),
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
    except (SettingsError, InvalidScope) as exc:
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
