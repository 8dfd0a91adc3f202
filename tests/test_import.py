"""`consent-flow import`: a token store of nextcloud-mcp-server becomes provisioned grants.

The stores are real (an SQLite file, a PostgreSQL database of their own; tests/import_stores.py
writes them the way that project does), the command runs as its own process, and the events
go through the real queue to a real worker refreshing at the real local provider. Valid refresh
tokens are minted by that provider through its own authorization code flow.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import Stack, provision, stored_tokens
from cryptography.fernet import Fernet
from import_stores import PG_HOST, PG_PASSWORD, Store, postgres_store, sqlite_store
from local_provider import approve

from consent_flow import State
from consent_flow.core.table import Event
from consent_flow.importer import ProgressBar, source_digest
from consent_flow.oidc import code_challenge_s256, new_code_verifier, new_nonce, new_state
from consent_flow.queue.bus import Envelope, new_id
from consent_flow.store.import_source import ImportProgress

pytestmark = pytest.mark.integration

KEY_VAR = "NC_TOKEN_ENCRYPTION_KEY"
# A dead grant must show within seconds: the first refresh is due at once.
DEAD_WITHIN = 15.0


@pytest.fixture(params=["sqlite", "postgresql"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    key = Fernet.generate_key()
    if request.param == "sqlite":
        yield from sqlite_store(tmp_path, key)
    else:
        yield from postgres_store(key)


@pytest.fixture
def sqlite_source(tmp_path: Path) -> Iterator[Store]:
    yield from sqlite_store(tmp_path, Fernet.generate_key())


@pytest.fixture
def postgres_source() -> Iterator[Store]:
    yield from postgres_store(Fernet.generate_key())


async def mint(stack: Stack, login: str) -> tuple[str, tuple[str, ...]]:
    """A live refresh token for ``login`` from the provider's own code flow, and its scopes;
    no consent-flow record is made for it."""
    oauth = stack.client.oauth
    verifier = new_code_verifier()
    url = await oauth.authorization_url(
        state=new_state(), nonce=new_nonce(), code_challenge=code_challenge_s256(verifier)
    )
    callback = await approve(url, login)
    code = parse_qs(urlsplit(callback).query)["code"][0]
    tokens = await oauth.exchange_code(code, code_verifier=verifier)
    assert tokens.refresh_token
    return tokens.refresh_token, tokens.scopes


def cli_env(stack: Stack, env: dict[str, str], key: bytes | str) -> dict[str, str]:
    return {
        **env,
        "CONSENT_QUEUE_NAME": stack.settings.queue_name,
        KEY_VAR: key.decode() if isinstance(key, bytes) else key,
    }


async def run_cli(environ: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consent_flow",
        "import",
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def import_json(environ: dict[str, str], url: str, *extra: str) -> dict[str, Any]:
    code, out, err = await run_cli(
        environ, "--from", url, "--fernet-key-env", KEY_VAR, "--json", *extra
    )
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


async def wait_for(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def redis_dump(stack: Stack, *, everything: bool = False) -> bytes:
    """The keys an import could write (users' records, inboxes and histories, the indexes, the
    schedule, the transition stream, the queue and its jobs, the import's place), as one blob;
    ``everything``: every key under the test's prefix and of arq, worker heartbeats included."""
    redis = stack.client.store.redis
    prefix = stack.settings.redis_prefix
    patterns = (
        (f"{prefix}*", "arq:*")
        if everything
        else (
            # Every shard's keys: records, indexes, schedules, streams.
            f"{prefix}:{{*",
            f"{prefix}:import:*",
            stack.settings.queue_name + ":{*",
        )
    )
    # The worker's cron jobs (shard 0's) come and go on their own.
    cron = (b"arq:job:{s0}:sweep:", b"arq:job:{s0}:cleanup:", b"{s0}:sweep:", b"{s0}:cleanup:")
    blob = b""
    for pattern in patterns:
        async for key in redis.scan_iter(match=pattern):
            if key.startswith(cron):
                continue
            kind = (await redis.type(key)).decode()
            if kind == "string":
                value = await redis.get(key)
            elif kind == "hash":
                value = repr(sorted((await redis.hgetall(key)).items())).encode()
            elif kind == "list":
                value = repr(await redis.lrange(key, 0, -1)).encode()
            elif kind == "zset":
                members = [m for m in await redis.zrange(key, 0, -1) if not m.startswith(cron)]
                if not members:
                    continue  # a queue holding only cron jobs, or none at all
                value = repr(members).encode()
                if key.startswith(stack.settings.queue_name.encode()):
                    # The queue's jobs, whose arguments must carry no secret.
                    for job in members:
                        value += b" " + (await redis.get(b"arq:job:" + job) or b"")
            elif kind == "stream":
                value = repr(await redis.xrange(key)).encode()
            else:
                value = b""
            blob += key + b"=" + (value or b"") + b"\n"
    return blob


async def test_a_store_becomes_provisioned_grants_and_a_dead_one_is_revoked_at_once(
    make_stack: Any, env: dict[str, str], source: Store
) -> None:
    stack = await make_stack()
    alice_token, alice_scopes = await mint(stack, "alice")
    bob_token, _ = await mint(stack, "bob")
    # flow2 records the scopes the provider granted; hybrid records none.
    source.store_refresh_token("alice", alice_token, flow_type="flow2", scopes=list(alice_scopes))
    source.store_refresh_token("bob", bob_token, expires_at=int(time.time()) + 86400)
    source.store_refresh_token("carol", "dead-refresh-token-no-provider-knows-it")
    source.store_refresh_token("dave", "sign-in-only-token", flow_type="flow1")
    source.store_refresh_token("erin", "other-key-token", key=Fernet.generate_key())
    environ = cli_env(stack, env, source.key)

    report = await import_json(environ, source.url)
    assert report["imported"] == 3
    assert report["skipped_already_provisioned"] == 0
    assert report["undecryptable"] == 1
    assert report["invalid"] == 1
    assert report["invalid_by_reason"] == {"sign_in_flow": 1}
    assert report["resumed"] is False and report["dry_run"] is False

    store = stack.client.store
    rec = await store.load("alice")
    assert rec.state is State.PROVISIONED
    assert set(rec.scopes) == set(alice_scopes)
    history = await stack.client.history("alice")
    assert [(h["event"], h["from"], h["to"], h["actor"]) for h in history][:1] == [
        ("grant_imported", "unprovisioned", "provisioned", "import")
    ]

    async def refreshed(user: str) -> bool:
        return (await store.load(user)).last_refresh_at is not None

    # The first refresh is due at once and succeeds with the imported refresh token.
    await wait_for(lambda: refreshed("alice"), DEAD_WITHIN, "alice's first refresh")
    await wait_for(lambda: refreshed("bob"), DEAD_WITHIN, "bob's first refresh")
    assert (await stored_tokens(stack, "alice"))["access_token"]
    assert await stack.client.access_token("bob")

    async def carol_revoked() -> bool:
        return (await store.load("carol")).state is State.REVOKED

    took = await wait_for(carol_revoked, DEAD_WITHIN, "carol's dead grant to end")
    assert took < DEAD_WITHIN
    events = [(h["event"], h["to"]) for h in await stack.client.history("carol")]
    assert events == [("grant_imported", "provisioned"), ("refresh_rejected", "revoked")]
    assert (await store.load("dave")).state is State.UNPROVISIONED
    assert (await store.load("erin")).state is State.UNPROVISIONED

    # A second run imports nothing new, and does not bring carol's ended grant back.
    again = await import_json(environ, source.url)
    assert again["imported"] == 0
    assert again["skipped_already_provisioned"] == 2
    assert again["skipped_ended_after_import"] == 1
    assert (await store.load("carol")).state is State.REVOKED

    # Nothing secret in Redis in clear: not in a job, not in an inbox, not in the history.
    dump = await redis_dump(stack, everything=True)
    for secret in (alice_token, bob_token, "dead-refresh-token-no-provider-knows-it"):
        assert secret.encode() not in dump


def unchanged(before: bytes, after: bytes) -> bool:
    """Whether the dumps match; the lines that differ are printed for a failing assertion."""
    old, new = set(before.splitlines()), set(after.splitlines())
    if old != new:
        print("only before:", sorted(old - new), "only after:", sorted(new - old))
    return old == new


async def test_a_wrong_key_stops_before_anything_is_written(
    make_stack: Any, env: dict[str, str], source: Store
) -> None:
    stack = await make_stack()
    source.store_refresh_token("alice", "some-refresh-token")
    wrong = Fernet.generate_key()
    before = await redis_dump(stack)
    code, out, err = await run_cli(
        cli_env(stack, env, wrong), "--from", source.url, "--fernet-key-env", KEY_VAR
    )
    assert code == 1
    assert "TOKEN_ENCRYPTION_KEY" in err and "nothing was imported" in err
    assert out == ""
    assert wrong.decode() not in err
    assert unchanged(before, await redis_dump(stack))
    assert (await stack.client.store.load("alice")).state is State.UNPROVISIONED


async def test_a_dry_run_reads_and_classifies_and_writes_nothing(
    make_stack: Any, env: dict[str, str], source: Store
) -> None:
    stack = await make_stack()
    source.store_refresh_token("alice", "token-a")
    source.store_refresh_token("unknown", "token-b")
    before = await redis_dump(stack)
    report = await import_json(cli_env(stack, env, source.key), source.url, "--dry-run")
    assert report["dry_run"] is True
    assert report["imported"] == 1
    assert report["invalid_by_reason"] == {"placeholder_user": 1}
    assert unchanged(before, await redis_dump(stack))


async def test_an_interrupted_run_resumes_where_it_stopped(
    make_stack: Any, env: dict[str, str], sqlite_source: Store
) -> None:
    stack = await make_stack()
    users = [f"user-{n:03d}" for n in range(200)]
    for user in users:
        sqlite_source.store_refresh_token(user, f"token-of-{user}", expires_at=None)
    environ = cli_env(stack, env, sqlite_source.key)
    redis = stack.client.store.redis
    place = stack.client.store.keys.import_cursor(source_digest(sqlite_source.url))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consent_flow",
        "import",
        "--from",
        sqlite_source.url,
        "--fernet-key-env",
        KEY_VAR,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await wait_for(lambda: redis.exists(place), 30, "the first row to be imported")
    # No worker takes the next row's event: the run waits on it, mid-run however fast the
    # machine (a signal sent while it ran on was seen to arrive after its last row).
    await stack.stop_workers()
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 130, err.decode()
    assert "run the same command again to continue" in err.decode()
    saved = json.loads(await redis.get(place))
    done_before = saved["summary"]["imported"]
    assert 0 < done_before < len(users)

    await stack.start_worker()
    report = await import_json(environ, sqlite_source.url)
    assert report["resumed"] is True
    # The row in flight when the run stopped may have been applied before its place was kept
    # (and, its token being dead, ended since).
    skipped = report["skipped_already_provisioned"] + report["skipped_ended_after_import"]
    assert report["imported"] + skipped == len(users)
    assert skipped <= 1
    assert not await redis.exists(place)
    for user in users:
        history = await stack.client.history(user)
        assert [h["event"] for h in history].count("grant_imported") == 1, user


async def test_restart_starts_from_the_first_row(
    make_stack: Any, env: dict[str, str], sqlite_source: Store
) -> None:
    stack = await make_stack()
    sqlite_source.store_refresh_token("alice", "token-a")
    sqlite_source.store_refresh_token("bob", "token-b")
    redis = stack.client.store.redis
    place = stack.client.store.keys.import_cursor(source_digest(sqlite_source.url))
    # As an interrupted run leaves it: past alice, who is counted but (here) not provisioned.
    await redis.set(
        place,
        json.dumps(
            {
                "cursor": json.dumps({"after": "alice"}),
                "summary": {"imported": 1},
            }
        ),
    )
    environ = cli_env(stack, env, sqlite_source.key)
    resumed = await import_json(environ, sqlite_source.url, "--dry-run")
    assert resumed["imported"] == 2, "a dry run ignores the place and reads every row"
    assert await redis.exists(place)
    report = await import_json(environ, sqlite_source.url, "--restart")
    assert report["resumed"] is False and report["imported"] == 2
    assert (await stack.client.history("alice"))[0]["event"] == "grant_imported"


async def test_no_secret_is_printed_or_logged(
    make_stack: Any, env: dict[str, str], postgres_source: Store
) -> None:
    stack = await make_stack()
    store, key = postgres_source, postgres_source.key
    store.store_refresh_token("alice", "alice-secret-refresh-token")
    store.store_refresh_token("bob", "bob-secret-refresh-token", flow_type="bogus")
    environ = cli_env(stack, env, key)
    outputs = []
    for extra in ((), ("--json",), ("--dry-run",)):
        code, out, err = await run_cli(
            environ, "--from", store.url, "--fernet-key-env", KEY_VAR, *extra
        )
        assert code == 0, err
        outputs.append(out + err)
    text = "\n".join(outputs)
    assert "imported 1" in text
    for secret in (
        "alice-secret-refresh-token",
        "bob-secret-refresh-token",
        key.decode(),
        PG_PASSWORD,
    ):
        assert secret not in text
    code, _, err = await run_cli(
        environ,
        "--from",
        store.url.replace(PG_HOST, "127.0.0.1:1"),
        "--fernet-key-env",
        KEY_VAR,
    )
    assert code == 1
    assert PG_PASSWORD not in err and "***" in err


async def test_usage_errors_exit_2(make_stack: Any, env: dict[str, str], sqlite_source: Store):
    stack = await make_stack()
    environ = cli_env(stack, env, sqlite_source.key)
    code, _, err = await run_cli(
        environ,
        "--from",
        sqlite_source.url,
        "--fernet-key-env",
        KEY_VAR,
        "--provider",
        "nextcloud",
    )
    assert code == 2 and "no provider is configured as 'nextcloud'" in err
    code, _, err = await run_cli(
        environ, "--from", sqlite_source.url, "--fernet-key-env", "NOT_SET_ANYWHERE"
    )
    assert code == 2 and "NOT_SET_ANYWHERE is not set" in err


async def test_an_import_event_from_pending_or_provisioned_changes_nothing(stack: Stack) -> None:
    """The handler's no-op rows, driven through the queue: the sealed token is dropped."""
    client = stack.client
    await client.request_provisioning("pat")

    async def emit(user: str) -> Any:
        event_id = new_id()
        sealed = client.ring.encrypt(b"some-token", user=user, purpose=f"import:{event_id}")
        await client.store.put_inbox(user, event_id, sealed)
        return await client.emit(
            Envelope(Event.GRANT_IMPORTED, user, "import", event_id=event_id)
        ), event_id

    outcome, event_id = await emit("pat")
    assert (outcome.result, outcome.state, outcome.detail["skipped"]) == (
        "unchanged",
        "pending",
        "pending",
    )
    assert await client.store.take_inbox("pat", event_id) is None
    await provision(stack, "quinn")
    again, _ = await emit("quinn")
    assert (again.result, again.detail["skipped"]) == ("unchanged", "already_provisioned")
    assert "grant_imported" not in [h["event"] for h in await client.history("quinn")]


async def test_an_import_event_without_its_token_changes_nothing(stack: Stack) -> None:
    outcome = await stack.client.emit(Envelope(Event.GRANT_IMPORTED, "rita", "import"))
    assert (outcome.result, outcome.error, outcome.state) == (
        "failed",
        "interrupted",
        "unprovisioned",
    )


def test_the_progress_bar_draws_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    bar = ProgressBar(plain)
    bar(ImportProgress(1, 2))
    bar.close()
    assert plain.getvalue() == ""
    terminal = Terminal()
    bar = ProgressBar(terminal, clock=iter([0.0, 0.01, 0.02]).__next__)
    bar(ImportProgress(0, 2))
    bar(ImportProgress(1, 2))  # within the redraw interval: skipped
    bar(ImportProgress(2, 2))  # the last one is always drawn
    bar.close()
    lines = terminal.getvalue().split("\r")
    assert lines[1].startswith("importing [---") and "0/2" in lines[1]
    assert "2/2 100%" in lines[2] and terminal.getvalue().endswith("\n")


def test_the_source_digest_ignores_credentials_and_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = source_digest("postgresql://u:secret@db.example:5432/tokens")
    assert a == source_digest("postgresql+asyncpg://other@db.example/tokens")
    assert a != source_digest("postgresql://u@db.example/other")
    monkeypatch.chdir(tmp_path)
    assert source_digest("sqlite:///tokens.db") == source_digest(
        f"sqlite+aiosqlite:///{tmp_path}/tokens.db"
    )
