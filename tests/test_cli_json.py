"""Every command of the command line with `--json` prints JSON a script can parse: one document
for the commands that answer, one JSON line per entry for `tail`, JSON log lines (and a JSON
start-up line) for `up`, `worker` and `serve`. The commands are the parser's own, so a command
added without JSON output fails here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, provision
from cryptography.fernet import Fernet
from import_stores import sqlite_store
from test_cli import _commands

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "consent_flow"]
SERVER_COMMANDS = {("up",), ("worker",), ("serve",)}
# tail: tests/test_operator_cli.py::test_tail_follows_transitions_live_as_json_lines
FOLLOWING = {("tail",)}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=90, check=False
    )


async def test_every_answering_command_prints_one_json_document(stack, env, settings, tmp_path):
    await provision(stack, "alice")
    key = Fernet.generate_key()
    cli_env = {
        **os.environ,
        **env,
        "CONSENT_QUEUE_NAME": settings.queue_name,
        "NC_TOKEN_KEY": key.decode(),
    }
    store = next(sqlite_store(tmp_path, key))
    store.store_refresh_token("erin", "a-refresh-token-from-elsewhere", scopes=["openid"])
    args: dict[tuple[str, ...], tuple[str, ...]] = {
        ("provision",): ("bob",),
        ("revoke",): ("carol",),
        ("status",): ("alice",),
        ("history",): ("alice",),
        ("list",): (),
        ("stats",): (),
        ("token",): ("alice",),
        ("diagram",): (),
        ("providers",): (),
        ("import",): ("--from", store.url, "--fernet-key-env", "NC_TOKEN_KEY", "--dry-run"),
        ("keys", "generate"): (),
        ("keys", "rotate"): (),
    }
    answering = set(_commands()) - SERVER_COMMANDS - FOLLOWING
    assert set(args) == answering, "a new command: give it arguments here"
    for command, extra in args.items():
        out = await asyncio.to_thread(_run, cli_env, *command, *extra, "--json")
        assert out.returncode == 0, (command, out.stderr)
        document = json.loads(out.stdout)
        assert isinstance(document, dict | list), command
        assert out.stdout.count("\n") == 1, (command, "one document on one line")


@pytest.mark.parametrize("command", sorted(SERVER_COMMANDS), ids=" ".join)
def test_server_commands_log_json_lines(env, settings, tmp_path: Path, command):
    port = free_port()
    cli_env: dict[str, Any] = {
        **os.environ,
        **env,
        "CONSENT_QUEUE_NAME": settings.queue_name,
        "CONSENT_HTTP_PORT": str(port),
        "CONSENT_LOG_FORMAT": "console",  # --json overrides it
    }
    expected = {"up": {"up", "worker_started"}, "worker": {"worker_started"}}.get(command[0])
    log = tmp_path / "output.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*CLI, *command, "--json"], env=cli_env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            events = {json.loads(line).get("event") for line in lines}
            if lines and (expected is None or expected <= events):
                break
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no {expected} within 60 s: {lines}"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    for line in log.read_text().splitlines():
        if line.strip():
            assert isinstance(json.loads(line), dict), line
