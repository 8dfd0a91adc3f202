"""The command line as scripts and operators use it: shapes of --json, exit codes, messages."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import free_port, provision

from consent_flow import KeyRing, mermaid

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "consent_flow"]


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


async def arun(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``run`` off the event loop: the in-process worker must keep working meanwhile."""
    return await asyncio.to_thread(run, env, *args)


@pytest.fixture
def cli_env(env, settings):
    """The stack's environment, pointed at the same queue as the in-process worker."""
    return {**os.environ, **env, "CONSENT_QUEUE_NAME": settings.queue_name}


def test_keys_generate_prints_a_usable_key():
    out = run(dict(os.environ), "keys", "generate")
    assert out.returncode == 0
    key = out.stdout.strip()
    assert KeyRing.from_strings([key]).primary_id


def test_diagram_is_the_engines_table():
    out = run(dict(os.environ), "diagram")
    assert out.returncode == 0
    assert out.stdout == mermaid()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONSENT_ISSUER", ""),
        ("CONSENT_ENCRYPTION_KEYS", "nope"),
        ("CONSENT_HTTP_PORT", "x"),
        ("CONSENT_WEBHOOK_URL", "http://hooks.example.com/consent"),  # clear text off loopback
        ("CONSENT_WEBHOOK_SECRET", ""),  # missing while the URL is set
        ("CONSENT_WEBHOOK_SECRET", "whsec_not-base64!"),
    ],
)
def test_bad_settings_exit_2_naming_the_variable(env, variable, value):
    webhook = {
        "CONSENT_WEBHOOK_URL": "https://hooks.example.com/consent",
        "CONSENT_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    broken = {**os.environ, **env, **(webhook if "WEBHOOK" in variable else {}), variable: value}
    out = run(broken, "worker", timeout=20)
    assert out.returncode == 2
    assert variable in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a server behind a dead proxy or a
    firewall that drops, where waiting would otherwise hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.fixture
def silent_redis() -> Iterator[str]:
    with silent_port() as port:
        yield f"redis://:hunter2@127.0.0.1:{port}/0"


@pytest.mark.parametrize("command", [("status", "alice"), ("list",), ("up",)])
@pytest.mark.parametrize("redis", ["refused", "silent"])
def test_unreachable_redis_answers_within_5_s_naming_the_url(env, silent_redis, command, redis):
    url = silent_redis if redis == "silent" else f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    broken = {**os.environ, **env, "CONSENT_REDIS_URL": url, "CONSENT_HTTP_PORT": str(free_port())}
    started = time.monotonic()
    run(broken, "--version")
    startup = time.monotonic() - started  # the interpreter and imports, slow on a loaded machine
    started = time.monotonic()
    out = run(broken, *command, timeout=60)
    elapsed = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    # Within 5 s on an idle machine (about 1 s of start-up); here, within 3 s of start-up.
    assert elapsed - startup < 3, f"answered after {elapsed:.1f} s ({startup:.1f} s start-up)"
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(
        f"consent-flow: Redis at {url.replace('hunter2', '***')} is not reachable"
    )
    assert "hunter2" not in out.stderr
    assert "CONSENT_REDIS_URL" in line


def test_up_answers_about_redis_before_waiting_on_a_silent_provider(env, silent_redis):
    with silent_port() as provider:
        broken = {
            **os.environ,
            **env,
            "CONSENT_REDIS_URL": silent_redis,
            "CONSENT_ISSUER": f"http://127.0.0.1:{provider}",
            "CONSENT_HTTP_TIMEOUT": "20",
            "CONSENT_HTTP_PORT": str(free_port()),
        }
        started = time.monotonic()
        out = run(broken, "up", timeout=60)
        elapsed = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    assert "Redis at" in out.stderr and "is not reachable" in out.stderr
    # The discovery document would have held it for CONSENT_HTTP_TIMEOUT (20 s).
    assert elapsed < 15, f"answered after {elapsed:.1f} s"


def test_usage_errors_exit_2():
    out = run(dict(os.environ), "list", "--state", "sideways")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


async def test_json_shapes_of_every_reading_and_driving_command(stack, cli_env):
    out = await arun(cli_env, "provision", "alice", "--json")
    assert out.returncode == 0, out.stderr
    provisioned = json.loads(out.stdout)
    assert {"user", "state", "since", "reason", "authorization_url"} <= provisioned.keys()
    assert provisioned["state"] == "pending"

    from local_provider import approve

    await stack.callback(await approve(provisioned["authorization_url"], "alice"))
    status = json.loads((await arun(cli_env, "status", "alice", "--json")).stdout)
    assert status["state"] == "provisioned"
    assert {"user", "state", "since", "reason"} <= status.keys()
    assert status["since"].endswith("Z")

    listed = json.loads((await arun(cli_env, "list", "--state", "provisioned", "--json")).stdout)
    assert listed == [
        {"user": "alice", "provider": "default", "state": "provisioned", "since": status["since"]}
    ]

    stats = json.loads((await arun(cli_env, "stats", "--json")).stdout)
    assert stats["states"] == {"unprovisioned": 0, "pending": 0, "provisioned": 1, "revoked": 0}

    token = await arun(cli_env, "token", "alice")
    assert token.returncode == 0
    assert token.stdout.strip() == await stack.client.access_token("alice", min_ttl=0)

    revoked = json.loads(
        (await arun(cli_env, "revoke", "alice", "--reason", "offboarding", "--json")).stdout
    )
    assert (revoked["state"], revoked["reason"]) == ("revoked", "offboarding")

    history = json.loads((await arun(cli_env, "history", "alice", "--json")).stdout)
    fields = ["event", "from", "to", "at", "actor", "reason", "count", "first_at"]
    assert [list(h) for h in history] == [fields] * 3
    assert all(h["count"] == 1 and h["first_at"] == h["at"] for h in history)
    assert [h["event"] for h in history] == [
        "provision_requested",
        "authorization_completed",
        "revoke_requested",
    ]
    assert history[0]["actor"].startswith("operator")
    assert history[1]["actor"] == "browser"
    assert history[2]["reason"] == "offboarding"


async def test_human_output_is_a_readable_table(stack, cli_env):
    await provision(stack, "alice")
    out = await arun(cli_env, "history", "alice")
    assert out.returncode == 0
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["AT", "EVENT", "FROM", "TO", "ACTOR", "REASON"]
    assert len(rows) == 2
    assert "provisioned" in (await arun(cli_env, "status", "alice")).stdout


async def test_token_for_a_user_without_consent_exits_1(stack, cli_env):
    out = await arun(cli_env, "token", "nobody")
    assert out.returncode == 1
    assert out.stdout == ""
    assert "not granted" in out.stderr
    assert "Traceback" not in out.stderr


async def test_keys_rotate_reports_what_it_rewrote(stack, cli_env, env):
    await provision(stack, "alice")
    new = (await arun(dict(os.environ), "keys", "generate")).stdout.strip()
    rotated_env = {**cli_env, "CONSENT_ENCRYPTION_KEYS": f"{new},{env['CONSENT_ENCRYPTION_KEYS']}"}
    out = await arun(rotated_env, "keys", "rotate", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rewritten"] == 1
    assert report["primary_key_id"] == KeyRing.from_strings([new]).primary_id
    only_new = {**cli_env, "CONSENT_ENCRYPTION_KEYS": new}
    assert (await arun(only_new, "token", "alice")).returncode == 0


def test_up_on_an_embedded_redis_serves_status_beside_it_and_stops_on_sigterm(
    tmp_path: Path, provider, env
):
    data = tmp_path / "data"
    up_env = {k: v for k, v in {**os.environ, **env}.items() if k != "CONSENT_REDIS_URL"}
    up_env.update(CONSENT_DATA_DIR=str(data), CONSENT_HTTP_PORT=str(free_port()))
    process = subprocess.Popen(
        [*CLI, "up"], env=up_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(
                    f"http://127.0.0.1:{up_env['CONSENT_HTTP_PORT']}/healthz", timeout=1
                )
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "up did not become healthy"
            time.sleep(0.2)
        assert (data / "redis.sock").exists()
        pending = run(up_env, "provision", "alice", "--json")
        assert json.loads(pending.stdout)["state"] == "pending"
        status = run(up_env, "status", "alice", "--json")
        assert json.loads(status.stdout)["state"] == "pending"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
    # The embedded Redis stopped with `up`, and kept the data: status still finds alice.
    assert not (data / "redis.sock").exists() or run(up_env, "status", "alice").returncode == 0
    after = run(up_env, "status", "alice", "--json")
    assert json.loads(after.stdout)["state"] == "pending"
    leftovers = subprocess.run(
        ["pgrep", "-f", f"redis-server.*{data}"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""


@pytest.mark.parametrize("command", ["serve", "up"])
def test_listening_beyond_loopback_without_an_ops_token_is_refused(cli_env, command):
    """/ops and /metrics would trust every client a proxy or forwarder on this machine passes
    on: beyond loopback, the operators' token is required before anything starts."""
    env = {**cli_env, "CONSENT_HTTP_HOST": "0.0.0.0"}  # noqa: S104
    env.pop("CONSENT_OPS_TOKEN", None)
    result = run(env, command, timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("consent-flow: CONSENT_OPS_TOKEN: is required when ")
    assert "CONSENT_HTTP_HOST (0.0.0.0) is not a loopback address" in result.stderr
    assert "proxy" in result.stderr
    assert "Traceback" not in result.stderr


# -- settings errors: everything at once, and --help says what each command needs -----------------

CONSENT_FLOW = Path(sys.executable).with_name("consent-flow")  # the installed console script


def no_settings(tmp_path: Path) -> dict[str, str]:
    """This environment without any CONSENT_* variable (and a private data folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
    return {**env, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}


def consent_flow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSENT_FLOW), *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_three_bad_variables_are_named_in_one_message_exit_2(tmp_path):
    env = {
        **no_settings(tmp_path),
        "CONSENT_ISSUER": "https://id.example.com",
        "CONSENT_CLIENT_ID": "mcp",
        "CONSENT_CLIENT_SECRET": "shh",
        "CONSENT_REDIRECT_URI": "https://mcp.example.com/oauth/callback",
        "CONSENT_REDIS_URL": "http://localhost:6379/0",
        "CONSENT_ENCRYPTION_KEYS": "nope",
        "CONSENT_HTTP_PORT": "abc",
    }
    out = consent_flow(env, "worker")
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    header, *lines = out.stderr.strip().splitlines()
    assert header == "consent-flow: 3 settings are missing or malformed:"
    assert [line.split(":", 1)[0].strip() for line in lines] == [
        "CONSENT_REDIS_URL",
        "CONSENT_ENCRYPTION_KEYS",
        "CONSENT_HTTP_PORT",
    ]
    assert "  CONSENT_HTTP_PORT: must be a port number from 1 to 65535, not 'abc'" in lines


def test_worker_help_names_the_variables_it_needs():
    out = consent_flow(dict(os.environ), "worker", "--help")
    assert out.returncode == 0, out.stderr
    needs = out.stdout.split("settings this command needs:", 1)[1]
    for variable in ("CONSENT_ISSUER", "CONSENT_CLIENT_ID", "CONSENT_ENCRYPTION_KEYS"):
        assert f"\n  {variable} " in needs


def _help_needs(env: dict[str, str], *command: str) -> list[str]:
    """The variables ``consent-flow COMMAND --help`` lists as needed, in order."""
    out = consent_flow(env, *command, "--help")
    assert out.returncode == 0, out.stderr
    if "settings this command needs:" not in out.stdout:
        return []
    section = out.stdout.split("settings this command needs:", 1)[1]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  CONSENT_")]


@pytest.mark.parametrize(
    "command",
    [("up",), ("worker",), ("serve",), ("token", "alice"), ("keys", "rotate"), ("status", "alice")],
)
def test_help_lists_exactly_what_the_command_demands(tmp_path, command):
    """One table drives both: with no settings at all (and a listener beyond loopback), a
    command refuses to start naming every variable its --help lists, and no other."""
    env = {**no_settings(tmp_path), "CONSENT_HTTP_HOST": "0.0.0.0"}  # noqa: S104
    listed = _help_needs(env, *command[:2] if command[0] == "keys" else command[:1])
    out = consent_flow(env, *command)
    if not listed:  # needs nothing: it runs, on an embedded Redis it starts and stops
        assert (out.returncode, out.stdout) == (0, "alice: unprovisioned\n"), out.stderr
        return
    assert out.returncode == 2, out.stderr
    lines = [line.removeprefix("consent-flow:").strip() for line in out.stderr.splitlines()]
    assert [line.split(":", 1)[0] for line in lines if line.startswith("CONSENT_")] == listed


# -- one consistent command line: --json everywhere, exit codes, shapes, formats ------------------

RFC3339_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def _commands() -> list[tuple[str, ...]]:
    """Every command the parser knows, ``keys`` as its subcommands."""
    from consent_flow.cli import _parser

    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    found = []
    for name, parser in subparsers(_parser()).items():
        nested = subparsers(parser)
        found += [(name, sub) for sub in nested] if nested else [(name,)]
    return found


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_takes_json(command):
    out = run(dict(os.environ), *command, "--help")
    assert out.returncode == 0, out.stderr
    assert "--json" in out.stdout


def test_version():
    out = run(dict(os.environ), "--version")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"consent-flow \d+\.\d+\.\d+\S*\n", out.stdout)


@pytest.mark.parametrize("command", [("diagram",), ("keys", "generate")])
def test_offline_commands_print_json(command):
    out = run(dict(os.environ), *command, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    if command == ("diagram",):
        assert data["mermaid"] == mermaid()
        assert {"event": "revoke_requested", "from": ["unprovisioned", "revoked"]}.items() <= (
            next(t for t in data["transitions"] if not t["changes"] and "revoked" in t["from"])
        ).items()
    else:
        assert KeyRing.from_strings([data["key"]]).primary_id == data["key_id"]


@pytest.mark.parametrize(
    "args",
    [("status", "a b"), ("token", "x" * 256), ("history", "tab\there"), ("revoke", "")],
    ids=["space", "too-long", "control", "empty"],
)
def test_a_bad_user_id_is_a_usage_error(tmp_path, args):
    out = run(no_settings(tmp_path), *args, timeout=20)
    assert out.returncode == 2, out.stderr
    assert "user id" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args", [("list", "--limit", "0"), ("list", "--offset", "-1"), ("token", "a", "--min-ttl", "x")]
)
def test_bad_numbers_are_usage_errors(tmp_path, args):
    out = run(no_settings(tmp_path), *args, timeout=20)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr


async def test_provision_and_status_share_one_shape(stack, cli_env):
    provisioned = json.loads((await arun(cli_env, "provision", "bob", "--json")).stdout)
    status = json.loads((await arun(cli_env, "status", "bob", "--json")).stdout)
    assert (
        list(provisioned)[:8]
        == list(status)[:8]
        == [
            "user",
            "provider",
            "state",
            "since",
            "reason",
            "scopes",
            "authorization_url",
            "requested_scopes",
        ]
    )
    assert {k: v for k, v in provisioned.items() if k != "session_expires_at"} == {
        k: v for k, v in status.items() if k != "session_expires_at"
    }
    assert status["provider"] == "default"
    assert status["requested_scopes"] == list(stack.settings.scopes)
    assert re.fullmatch(RFC3339_UTC, status["since"])

    from local_provider import approve

    await stack.callback(await approve(provisioned["authorization_url"], "bob"))
    status = json.loads((await arun(cli_env, "status", "bob", "--json")).stdout)
    assert list(status)[:6] == list(provisioned)[:6]
    assert "authorization_url" not in status and "requested_scopes" not in status
    assert status["scopes"]
    for name in ("since", "access_token_expires_at", "next_refresh_at"):
        assert re.fullmatch(RFC3339_UTC, status[name]), name


async def test_list_limit_and_offset_count_rows_across_states(stack, cli_env):
    from seed import seed

    from consent_flow import State

    await seed(stack.client.store, {State.PENDING: 2, State.PROVISIONED: 2, State.REVOKED: 2})
    every = json.loads((await arun(cli_env, "list", "--json")).stdout)
    assert len(every) == 6
    first = json.loads((await arun(cli_env, "list", "--limit", "3", "--json")).stdout)
    assert first == every[:3]
    rest = json.loads(
        (await arun(cli_env, "list", "--offset", "3", "--limit", "2", "--json")).stdout
    )
    assert rest == every[3:5]


async def test_revoking_a_user_never_seen_says_nothing_to_revoke_and_exits_0(stack, cli_env):
    out = await arun(cli_env, "revoke", "stranger")
    assert out.returncode == 0, out.stderr
    assert "nothing to revoke" in out.stdout
    data = json.loads((await arun(cli_env, "revoke", "stranger", "--json")).stdout)
    assert (data["state"], data["note"]) == (
        "unprovisioned",
        "nothing to revoke: no consent was granted",
    )


async def test_history_json_counts_the_refreshes_an_entry_stands_for(stack, cli_env):
    from seed import seed

    from consent_flow import Event, State
    from consent_flow.core.records import Change

    store = stack.client.store
    (user,) = await seed(store, {State.PROVISIONED: 1})
    start = time.time()
    for n in range(3):
        rec = await store.load(user)
        change = Change(
            user=user,
            event=Event.TOKEN_REFRESHED,
            event_id=uuid.uuid4().hex,
            expect_state=rec.state,
            expect_version=rec.version,
            to_state=State.PROVISIONED,
            actor="worker",
            at=start + n,
            correlation_id=uuid.uuid4().hex,
        )
        assert (await store.commit(change)).ok
    history = json.loads((await arun(cli_env, "history", user, "--json")).stdout)
    refreshed = history[-1]
    assert refreshed["event"] == "token_refreshed"
    assert refreshed["count"] == 3
    assert refreshed["first_at"] < refreshed["at"]
    assert re.fullmatch(RFC3339_UTC, refreshed["first_at"])
    text = (await arun(cli_env, "history", user)).stdout
    assert f"token_refreshed x3 since {refreshed['first_at']}" in text


async def test_token_json_and_min_ttl_serve_a_provider_with_short_lived_tokens(
    make_stack, cli_env, redirect_uri
):
    """Tokens living 20 s: the default asks for 30 s and cannot be served; --min-ttl 5 can."""
    from conftest import provider_clients
    from local_provider import LocalProvider

    with LocalProvider.start(
        clients=provider_clients(redirect_uri), access_token_ttl=20, rotate_refresh_token=False
    ) as short:
        stack = await make_stack(op=short)
        env = {**cli_env, "CONSENT_ISSUER": short.issuer}
        await provision(stack, "alice")
        default = await arun(env, "token", "alice")
        assert default.returncode == 1
        assert "less than the 30 s asked for" in default.stderr
        out = await arun(env, "token", "alice", "--min-ttl", "5", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {
            "user": "alice",
            "access_token": await stack.client.access_token("alice", min_ttl=5),
        }
        await stack.stop()


def _documented_exit_codes() -> list[int]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("| exit code | meaning |", 1)[1].split("\n\n", 1)[0]
    return [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)]


def test_the_readme_documents_every_exit_code_the_cli_has():
    import consent_flow.cli as _cli

    codes = {v for k, v in vars(_cli).items() if k.startswith("EXIT_")} | {0}
    assert sorted(codes) == _documented_exit_codes()


def _following_the_stream(data: Path) -> bool:
    """Whether a client of the embedded Redis under ``data`` is blocked in XREAD."""
    for path in data.rglob("redis.sock"):
        with (
            contextlib.suppress(redis.RedisError),
            redis.Redis(unix_socket_path=str(path), socket_timeout=1) as r,
        ):
            return any(c.get("cmd") == "xread" for c in r.client_list())
    return False


def _stop_embedded_redis(data: Path) -> None:
    """Stop an embedded Redis a command left running under ``data`` (one killed by a timeout
    never lets go of it)."""
    for path in data.rglob("redis.sock"):
        with contextlib.suppress(redis.RedisError, OSError):
            redis.Redis(unix_socket_path=str(path), socket_timeout=2).shutdown(nosave=True)


@pytest.fixture
def cli_home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    _stop_embedded_redis(tmp_path / "data")


@pytest.mark.parametrize("code", _documented_exit_codes())
def test_each_documented_exit_code(cli_home, code):
    """Each code of the README's table, from a real run of the command line."""
    tmp_path = cli_home
    env = no_settings(tmp_path)
    if code == 130:
        process = subprocess.Popen(
            [*CLI, "tail"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        # Interrupted once it waits for transitions (its XREAD blocks on the embedded Redis),
        # not after a fixed time: start-up on a loaded machine takes longer than on an idle one.
        deadline = time.monotonic() + 60
        while not _following_the_stream(tmp_path / "data"):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "tail did not start following the stream"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == code, stderr
        assert "Traceback" not in stderr
        return
    args = {
        0: ("status", "stranger"),  # on an embedded Redis it starts and stops
        1: ("token", "stranger"),  # no consent, no token
        2: ("status", "not a user id"),
    }[code]
    if code == 1:
        env["CONSENT_ENCRYPTION_KEYS"] = run(env, "keys", "generate").stdout.strip()
    out = run(env, *args, timeout=60)
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@db:6379/0", "redis://:***@db:6379/0"),
        ("rediss://app:s3cret@db:6380/1", "rediss://app:***@db:6380/1"),
        ("redis://db:6379/0", "redis://db:6379/0"),
        ("unix:///run/redis.sock?db=2&password=s3cret", "unix:///run/redis.sock?db=2&password=***"),
        (
            "redis+sentinel://:s3cret@s1:26379,s2:26379/main",
            "redis+sentinel://:***@s1:26379,s2:26379/main",
        ),
        ("redis+cluster://:s3cret@n1:6379,n2:6379", "redis+cluster://:***@n1:6379,n2:6379"),
    ],
)
def test_redis_urls_are_shown_without_their_password(url, shown):
    from consent_flow.store.connection import masked_url

    assert masked_url(url) == shown


@pytest.mark.parametrize(
    "scopes",
    [["notes write"], ["notes:\x01x"], [f"s{i}" for i in range(200)]],
    ids=["space", "control", "200-scopes"],
)
def test_provision_refuses_bad_scopes_as_usage_errors_before_any_io(scopes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
    args = [arg for scope in scopes for arg in ("--scope", scope)]
    out = run(env, "provision", "alice", *args)
    assert out.returncode == 2, out.stderr
    assert "scope" in out.stderr and "Traceback" not in out.stderr
