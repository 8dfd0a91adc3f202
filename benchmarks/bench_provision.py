"""Throughput and latency of ``provision_requested``, next to arq's own floor.

One run starts a private ``redis-server`` (a free port, a temporary folder) and the local OpenID
provider, then measures, each worker in a process of its own:

(a) arq's floor: no-op jobs per second through a bare arq worker (one ``noop`` function,
    ``keep_result=0``, the project's ``poll_delay`` and ``max_jobs``), enqueued by 50 concurrent
    callers that wait for each job the way the project's callers do: the job pushes a reply to a
    list the caller BLPOPs;
(b) ``provision_requested`` events per second end to end, ``ConsentClient.request_provisioning``
    through ``consent-flow worker``, 50 concurrent callers, a new user for every event (each creates
    a pending session: the realistic case, not the idempotent one);
(c) p50/p99 latency of ``request_provisioning`` at 10 concurrent callers.

Every phase warms up before it measures. Missed targets are reported, never an exit code: only a
failure (a worker that dies, an event that does not create its session) exits non-zero.

    .venv/bin/python benchmarks/bench_provision.py [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.config
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # _infra, also when loaded by path
sys.path.insert(0, str(ROOT / "examples" / "provider"))

import redis  # noqa: E402
from _infra import (  # noqa: E402
    CLIENT_ID,
    CLIENT_SECRET,
    BenchError,
    Redis,
    Run,
    WorkerProcess,
    add_phase_options,
    drive,
    free_port,
    percentile,
    run_measure,
    start_provider,
    start_redis,
    stop_process,
    tail,
    warmup_seconds,
)

TARGET_RATIO = 0.6  # (b) / (a)
TARGET_P99_MS = 25.0  # (c)
THROUGHPUT_CALLERS = 50
LATENCY_CALLERS = 10
READY_TIMEOUT = 30.0
EVENT_TIMEOUT = 30.0
# The floor's reply: the size of a pending outcome (its authorization URL is most of it).
FLOOR_ANSWER = json.dumps(
    {
        "user": "floor",
        "state": "pending",
        "since": "2025-01-01T00:00:00Z",
        "reason": None,
        "event": "provision_requested",
        "result": "applied",
        "authorization_url": "x" * 420,
    }
)


# --- the worker processes ----------------------------------------------------------------------


async def noop(ctx: dict[str, Any], data: dict[str, Any]) -> None:
    """The floor's job: answer on the caller's reply list exactly as ``EventBus.reply`` does."""
    async with ctx["redis"].pipeline(transaction=True) as pipe:
        pipe.rpush(data["reply"], data["answer"])
        pipe.expire(data["reply"], 60)
        await pipe.execute()


def run_floor_worker() -> None:
    """A bare arq worker, configured (and logging) as ``arq`` would run it."""
    from arq import func
    from arq.logs import default_log_config
    from arq.worker import Worker

    from consent_flow.queue.bus import JOB_SERIALIZERS
    from consent_flow.store.connection import arq_redis_settings
    from workers import POLL_DELAY

    logging.config.dictConfig(default_log_config(verbose=False))
    queue = os.environ["BENCH_QUEUE"]
    Worker(
        functions=[func(noop, name="noop", keep_result=0)],
        redis_settings=arq_redis_settings(os.environ["BENCH_REDIS_URL"]),
        **JOB_SERIALIZERS,  # the project's job format, so only the job itself differs
        queue_name=queue,
        health_check_key=queue + ":health-check",
        poll_delay=POLL_DELAY,
        keep_result=0,
        # The project worker's max_jobs (measure() passes it), so only the job itself differs.
        max_jobs=int(os.environ["BENCH_MAX_JOBS"]),
        handle_signals=True,
    ).run()


def bench_settings(env: dict[str, str]) -> Any:
    from consent_flow import Settings

    return Settings.from_env(env, require_provider=True, require_keys=True)


# --- infrastructure ----------------------------------------------------------------------------


def start_worker(kind: str, env: dict[str, str], workdir: Path) -> WorkerProcess:
    """``floor``: this script's bare arq worker; ``project``: ``consent-flow worker`` itself
    (``python -m consent_flow worker`` from the repository, so it runs this checkout's code)."""
    log = workdir / f"worker-{kind}.log"
    command = (
        [sys.executable, str(Path(__file__).resolve()), "--worker", "floor"]
        if kind == "floor"
        else [sys.executable, "-m", "consent_flow", "worker"]
    )
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    return WorkerProcess(kind, process, log)


def wait_ready(worker: WorkerProcess, redis_url: str, health_key: str) -> None:
    """arq records its health key on its first poll, after ``on_startup``: then it takes jobs."""
    deadline = time.monotonic() + READY_TIMEOUT
    with redis.Redis.from_url(redis_url) as r:
        while not r.exists(health_key):
            worker.check()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the {worker.name} worker was not ready after "
                    f"{READY_TIMEOUT:g} s:\n{tail(worker.log)}"
                )
            time.sleep(0.05)


# --- measuring ---------------------------------------------------------------------------------


async def bench_floor(
    redis_url: str,
    queue: str,
    worker: WorkerProcess,
    warmup: float,
    seconds: float,
    processes: dict[str, list[int]],
) -> Run:
    from arq.connections import create_pool

    from consent_flow.queue.bus import JOB_SERIALIZERS
    from consent_flow.store.connection import arq_redis_settings

    pool = await create_pool(
        arq_redis_settings(redis_url), default_queue_name=queue, **JOB_SERIALIZERS
    )
    try:

        async def call(n: int, i: int) -> None:
            event_id = uuid.uuid4().hex
            reply = f"{queue}:reply:{event_id}"
            # An argument the size and shape of an envelope, so arq's (de)serialisation is alike.
            data = {
                "event": "provision_requested",
                "user": f"floor-{n}-{i}",
                "actor": "user",
                "event_id": event_id,
                "correlation_id": uuid.uuid4().hex,
                "payload": {},
                "reply": reply,
                "answer": FLOOR_ANSWER,
            }
            await pool.enqueue_job(
                "noop", data, _job_id=f"ev:{event_id}", _queue_name=queue, _expires=EVENT_TIMEOUT
            )
            if await pool.blpop([reply], timeout=EVENT_TIMEOUT) is None:
                raise BenchError("the floor worker did not answer a job")

        return await drive(THROUGHPUT_CALLERS, warmup, seconds, call, worker.check, processes)
    finally:
        await pool.aclose()


async def bench_project(
    settings: Any,
    alive: Callable[[], None],
    warmup: float,
    seconds: float,
    processes: dict[str, list[int]],
    *,
    callers: int,
    tag: str,
) -> Run:
    from consent_flow import ConsentClient
    from consent_flow.core.table import State

    async with ConsentClient(settings) as client:

        async def call(n: int, i: int) -> None:
            status = await client.request_provisioning(f"bench-{tag}-{n}-{i}")
            # A new session each time ("applied"), not the idempotent answer ("unchanged").
            if (
                status.state is not State.PENDING
                or not status.authorization_url
                or status.details.get("result", "applied") != "applied"
            ):
                raise BenchError(f"request_provisioning did not start a session: {status}")

        return await drive(callers, warmup, seconds, call, alive, processes)


# --- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def infrastructure(workdir: Path) -> Iterator[tuple[Redis, Any]]:
    server = start_redis(workdir)
    try:
        with start_provider(free_port()) as provider:
            yield server, provider
    finally:
        stop_process(server.process)


def project_env(
    server: Redis, provider: Any, workdir: Path, prefix: str, queue: str
) -> dict[str, str]:
    from consent_flow import generate_key

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
    env.update(
        CONSENT_REDIS_URL=server.url,
        CONSENT_REDIS_PREFIX=prefix,
        CONSENT_ISSUER=provider.issuer,
        CONSENT_CLIENT_ID=CLIENT_ID,
        CONSENT_CLIENT_SECRET=CLIENT_SECRET,
        CONSENT_REDIRECT_URI=provider.clients[0]["redirect_uris"][0],
        CONSENT_SCOPES="openid offline_access profile",
        CONSENT_ENCRYPTION_KEYS=generate_key(),
        CONSENT_SESSION_TTL="600",
        CONSENT_EVENT_TIMEOUT=str(int(EVENT_TIMEOUT)),
        CONSENT_LOG_FORMAT="json",  # as docker-compose.yml runs it
        CONSENT_DATA_DIR=str(workdir / "data"),
        CONSENT_QUEUE_NAME=queue,
        BENCH_REDIS_URL=server.url,
    )
    return env


async def measure(seconds: float, warmup: float, workdir: Path) -> dict[str, Any]:
    from workers import POLL_DELAY, worker_settings

    with infrastructure(workdir) as (server, provider):
        prefix = "bench" + uuid.uuid4().hex[:10]
        env = project_env(server, provider, workdir, prefix, f"{prefix}:queue")
        settings = bench_settings(env)
        if settings.queue_name != env["CONSENT_QUEUE_NAME"]:
            raise BenchError("CONSENT_QUEUE_NAME is not honoured: the run needs its own queue")
        max_jobs = worker_settings(settings, server.url)["max_jobs"]
        env["BENCH_MAX_JOBS"] = str(max_jobs)

        def processes(worker: WorkerProcess) -> dict[str, list[int]]:
            return {
                "client": [os.getpid()],
                "worker": [worker.process.pid],
                "redis": [server.process.pid],
            }

        # (a) arq's floor
        floor_env = dict(env, BENCH_QUEUE=f"{prefix}:floor")
        floor = start_worker("floor", floor_env, workdir)
        try:
            wait_ready(floor, server.url, f"{prefix}:floor:health-check")
            run_a = await bench_floor(
                server.url, f"{prefix}:floor", floor, warmup, seconds, processes(floor)
            )
        finally:
            floor.stop()

        # (b) and (c): the project's worker
        project = start_worker("project", env, workdir)
        try:
            wait_ready(project, server.url, settings.queue_name + ":health-check")
            run_b = await bench_project(
                settings,
                project.check,
                warmup,
                seconds,
                processes(project),
                callers=THROUGHPUT_CALLERS,
                tag="b",
            )
            run_c = await bench_project(
                settings,
                project.check,
                warmup,
                seconds,
                processes(project),
                callers=LATENCY_CALLERS,
                tag="c",
            )
            project.check()
        finally:
            project.stop()

    a, b = run_a.per_second, run_b.per_second
    latencies = run_c.measured()
    p50, p99 = percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000
    return {
        "seconds": seconds,
        "warmup_seconds": warmup,
        "cpus": os.cpu_count(),
        "poll_delay": POLL_DELAY,
        "max_jobs": max_jobs,
        "floor_jobs_per_s": round(a, 1),
        "floor_callers": THROUGHPUT_CALLERS,
        "floor_jobs": len(run_a.measured()),
        "provision_per_s": round(b, 1),
        "provision_callers": THROUGHPUT_CALLERS,
        "provision_events": len(run_b.measured()),
        "ratio": round(b / a, 3),
        # CPU milliseconds each process spent per job/event in the measured window (Linux only):
        # with one worker process, the worker's share bounds the throughput.
        "floor_cpu_ms": run_a.cpu_ms_per_call(),
        "provision_cpu_ms": run_b.cpu_ms_per_call(),
        "latency_callers": LATENCY_CALLERS,
        "latency_samples": len(latencies),
        "latency_throughput_per_s": round(run_c.per_second, 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "target_ratio": TARGET_RATIO,
        "target_p99_ms": TARGET_P99_MS,
        "ratio_met": b / a >= TARGET_RATIO,
        "p99_met": p99 <= TARGET_P99_MS,
    }


def report(r: dict[str, Any]) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def cpu(a: dict[str, float], b: dict[str, float]) -> str:
        return (
            ", ".join(f"{name} {a[name]:.2f} / {b[name]:.2f}" for name in a if name in b) or "n/a"
        )

    return "\n".join(
        [
            f"consent-flow provision benchmark: {r['seconds']:g} s per phase after "
            f"{r['warmup_seconds']:g} s warm-up, {r['cpus']} CPUs, poll_delay {r['poll_delay']} s, "
            f"max_jobs {r['max_jobs']}",
            f"(a) arq floor (noop + reply/BLPOP), {r['floor_callers']} callers: "
            f"{r['floor_jobs_per_s']:.1f} jobs/s ({r['floor_jobs']} jobs)",
            f"(b) provision_requested, {r['provision_callers']} callers:      "
            f"{r['provision_per_s']:.1f} events/s ({r['provision_events']} events)",
            f"    ratio (b)/(a): {r['ratio']:.3f}   target >= {r['target_ratio']}: "
            f"{met(r['ratio_met'])}",
            "    CPU ms per job (a) / per event (b): "
            + cpu(r["floor_cpu_ms"], r["provision_cpu_ms"]),
            f"(c) request_provisioning latency, {r['latency_callers']} callers: "
            f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms "
            f"({r['latency_samples']} calls, {r['latency_throughput_per_s']:.1f}/s)",
            f"    p99 target <= {r['target_p99_ms']:g} ms: {met(r['p99_met'])}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_phase_options(parser)
    parser.add_argument("--worker", choices=("floor",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "floor":
        run_floor_worker()
        return 0
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    warmup = warmup_seconds(args)

    return run_measure(
        lambda workdir: measure(args.seconds, warmup, workdir), report, as_json=args.json
    )


if __name__ == "__main__":
    sys.exit(main())
