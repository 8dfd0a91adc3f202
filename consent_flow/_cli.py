"""consent-flow: run the worker and the callback server, and drive and inspect consent.

Exit codes: 0 done, 1 the command failed (message on stderr), 2 bad settings or usage.
Results go to stdout (``--json`` for scripts); errors go to stderr, never as a traceback.
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
from typing import Any

from cryptography.fernet import Fernet
from redis.exceptions import RedisError

from ._client import ConsentClient, ConsentStatus
from ._errors import ConsentError, SettingsError
from ._import import ImportKeyError, load_fernet_key
from ._importer import PROVIDERS, ProgressBar, run_import
from ._logging import configure_logging
from ._machine import State, mermaid
from ._metrics import read_snapshot
from ._model import HistoryEntry, check_user, iso
from ._redis import embedded_redis, embedded_redis_stopped
from ._settings import REQUIRED_VARIABLES, Requirement, Settings
from ._vault import generate_key

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2


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


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="consent-flow",
        description=__doc__.split("\n")[0] if __doc__ else None,
        epilog="consent-flow COMMAND --help lists the settings COMMAND needs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter  # keeps the epilog's one variable per line

    def command(name: str, help_: str, *, json_: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=help_, epilog=_epilog(name), formatter_class=raw
        )
        if json_:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    command("up", "embedded or configured Redis, worker and callback server in one", json_=False)
    command("worker", "run an arq worker that applies consent events", json_=False)
    command("serve", "run the callback server (/oauth/callback, /healthz, /v1)", json_=False)
    p = command("provision", "ask for USER's consent; prints the authorization URL")
    p.add_argument("user")
    p = command("revoke", "revoke USER's consent at the provider and wipe local tokens")
    p.add_argument("user")
    p.add_argument("--reason", help="why (kept in the history)")
    p = command("status", "where USER's consent stands")
    p.add_argument("user")
    p = command("history", "every transition of USER, oldest first")
    p.add_argument("user")
    p = command("list", "users and their states")
    p.add_argument("--state", choices=[s.value for s in State])
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    command("stats", "counts per state")
    command("tail", "follow transitions live, across all users")
    p = command("token", "print a valid access token for USER", json_=False)
    p.add_argument("user")
    command("diagram", "the state machine as Mermaid", json_=False)
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
    keys_sub.add_parser(
        "generate",
        help="print a new key for CONSENT_ENCRYPTION_KEYS",
        epilog=_epilog("keys generate"),
        formatter_class=raw,
    )
    rotate = keys_sub.add_parser(
        "rotate",
        help="re-encrypt every record under the first key of CONSENT_ENCRYPTION_KEYS",
        epilog=_epilog("keys rotate"),
        formatter_class=raw,
    )
    rotate.add_argument("--json", action="store_true")
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


def _status_dict(status: ConsentStatus) -> dict[str, Any]:
    data = status.to_dict()
    data.pop("result", None)
    if data.get("error") is None:
        data.pop("error", None)
    return data


async def _with_client(settings: Settings, run: Callable[[ConsentClient], Awaitable[int]]) -> int:
    async with ConsentClient(settings) as client:
        return await run(client)


def _run_worker(settings: Settings, *, redis_url: str) -> None:
    from workers import ConsentWorker, worker_settings

    ConsentWorker(**worker_settings(settings, redis_url)).run()


def _uvicorn_server(settings: Settings, redis_url: str) -> Any:
    import uvicorn

    from ._web import create_app

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


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "keys" and args.keys_command == "generate":
        print(generate_key())
        return 0
    if args.command == "diagram":
        print(mermaid(), end="")
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
    configure_logging(settings.log_format, logging.INFO if server_side else logging.WARNING)

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
            print(
                f"consent-flow up: callback on http://{settings.http_host}:{settings.http_port}"
                f"{settings.redirect_path}, Redis at {url.split('@')[-1]}",
                file=sys.stderr,
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
        status = await client.request_provisioning(check_user(args.user), actor=_actor())
        _print(args, _status_dict(status), _status_text)
    elif args.command == "revoke":
        status = await client.revoke(check_user(args.user), actor=_actor(), reason=args.reason)
        _print(args, _status_dict(status), _status_text)
    elif args.command == "status":
        status = await client.status(check_user(args.user))
        _print(args, _status_dict(status), _status_text)
    elif args.command == "history":
        entries = await client.history(check_user(args.user))
        for e in entries:  # refreshes in a row share one entry: say how many it stands for
            if not args.json and e.get("count", 1) > 1:
                e["event"] = f"{e['event']} x{e['count']} since {e['first_at']}"
        _print(
            args,
            [{k: e[k] for k in ("event", "from", "to", "at", "actor", "reason")} for e in entries],
            lambda rows: _table(
                [(r["at"], r["event"], r["from"], r["to"], r["actor"], r["reason"]) for r in rows],
                ("AT", "EVENT", "FROM", "TO", "ACTOR", "REASON"),
            ),
        )
    elif args.command == "list":
        states = [State(args.state)] if args.state else list(State)
        rows: list[dict[str, Any]] = []
        for state in states:
            for user, since in await client.store.users(
                state, offset=max(0, args.offset), limit=max(1, min(args.limit, 10_000))
            ):
                rows.append({"user": user, "state": state.value, "since": iso(since)})
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
        print(await client.access_token(check_user(args.user)))
    elif args.command == "keys":
        from ._rotation import rotate_keys

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
        return 1 if report["skipped"] else 0
    return 0


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
    except SettingsError as exc:
        print(f"consent-flow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConsentError as exc:
        print(f"consent-flow: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except RedisError as exc:
        print(f"consent-flow: Redis is not reachable ({type(exc).__name__})", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"consent-flow: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
