"""Connections spread over shards (hash tags): every script stays in one slot, the shard count is
fixed for the data's life, the callback finds a session's shard from its state, and a worker
serves the shards it is given. Real Redis, the real local provider, real workers."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq import func
from arq.connections import create_pool
from conftest import provision
from local_provider import approve
from redis.asyncio.client import Pipeline, Redis
from redis.crc import key_slot

from consent_flow import ConsentClient, State
from consent_flow.errors import SettingsError
from consent_flow.queue.bus import JOB_SERIALIZERS
from consent_flow.queue.jobs import JobQueue
from consent_flow.queue.scheduler import Scheduler
from consent_flow.settings import Settings, parse_shard_set
from consent_flow.store.connection import arq_redis_settings
from consent_flow.store.metrics import Snapshot, read_snapshot
from consent_flow.store.redis_store import Keys, session_shard, shard_job_id
from consent_flow.store.scripts import lua
from workers import ConsentWorker

pytestmark = pytest.mark.integration

LUA = Path(__file__).resolve().parent.parent / "consent_flow" / "store" / "lua"
# Not a script of its own: the text the scripts that queue jobs start with.
PRELUDE = "enqueue_function"
# arq's aborts, in the job store for arq's tooling: the project never aborts a job, and its
# workers run without arq's allow_abort_jobs (test_jobstore.py drives both, on a cluster too).
NEVER_RUN = {"job_aborts", "job_hurry"}


def _sha(text: str) -> str:
    """Redis's name of a script: the SHA1 of its text (an identifier, not a safeguard)."""
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _script_names() -> dict[str, str]:
    """The SHA1 of every script text the project sends to Redis, with the script's name."""
    names = {}
    for path in LUA.glob("*.lua"):
        if path.stem == PRELUDE:
            continue
        for text in (lua(path.stem), lua(PRELUDE) + lua(path.stem)):
            names[_sha(text)] = path.stem
    return names


class SlotRecorder:
    """Every script call (EVAL and EVALSHA, alone or in a pipeline) with its KEYS."""

    def __init__(self) -> None:
        self.names = _script_names()
        self.calls: list[tuple[str, list[str]]] = []

    def record(self, sha: str, numkeys: int, keys_and_args: tuple[Any, ...]) -> None:
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys_and_args[:numkeys]]
        self.calls.append((self.names.get(sha, f"unknown script {sha}"), keys))

    def crossing(self) -> list[tuple[str, list[str]]]:
        """The calls whose KEYS are not all in one slot."""
        return [
            (name, keys)
            for name, keys in self.calls
            if len({key_slot(k.encode()) for k in keys}) > 1
        ]


@pytest.fixture
def slots(monkeypatch: pytest.MonkeyPatch) -> SlotRecorder:
    """Records the scripts as sent: every EVAL and EVALSHA command, whichever way it was made
    (a script object, ``evalsha``, or ``execute_command`` as ``queue_script`` queues them)."""
    recorder = SlotRecorder()

    def recording(execute: Any) -> Any:
        def execute_command(self: Any, *args: Any, **options: Any) -> Any:
            name = args[0].upper() if args and isinstance(args[0], str) else None
            if name == "EVALSHA":
                recorder.record(args[1], int(args[2]), args[3:])
            elif name == "EVAL":
                recorder.record(_sha(args[1]), int(args[2]), args[3:])
            return execute(self, *args, **options)

        return execute_command

    for cls in (Redis, Pipeline):
        monkeypatch.setattr(cls, "execute_command", recording(cls.execute_command))
    return recorder


async def _wait(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def run_the_worker_through_its_work(stack: Any) -> Snapshot:
    """Provisions and callbacks of four users on several shards, an on-demand refresh,
    scheduled refreshes taken by the batches, a revocation, a lost job requeued by the sweep
    (the jobs path), a second worker's start-up checks and heartbeat, the limiter and cleanup
    ticks (the stack's worker given ``cleanup_every=1``). Returns the stats snapshot after."""
    client, store = stack.client, stack.client.store
    users = ["alice", "bob", "carol", "dave"]
    assert len({store.keys.shard_of(u) for u in users}) > 1  # several shards at work
    for user in users:
        assert (await provision(stack, user)).status_code == 200
    await client.access_token("alice", min_ttl=3599.5)  # an on-demand refresh (a job)
    # Due now: the worker's batches take them, shard by shard.
    before = {u: (await store.load(u)).last_refresh_at for u in ("bob", "carol")}
    for user in ("bob", "carol"):
        await store.redis.zadd(store.keys.of(user).sched, {user: int(time.time() * 1000) - 5})

    async def refreshed() -> bool:
        recs = [await store.load(u) for u in before]
        return all((r.last_refresh_at or 0) > (before[r.user] or 0) for r in recs)

    await _wait(refreshed)
    assert (await client.revoke("dave")).state is State.REVOKED
    # What the jobs path does (a deployment without batches): a lost job requeued by the sweep.
    scheduler = Scheduler(store.redis, keys=store.keys, queue_name=stack.settings.queue_name)
    await store.redis.zadd(store.keys.of("erin").sched, {"erin": int(time.time() * 1000) - 5})
    assert (await scheduler.sweep())["requeued"] == 1
    await stack.start_worker()  # a second worker: its start-up checks and heartbeat too
    services = stack._workers[0].ctx["services"]
    await services.stacks["default"].batches.limiter.pause(0.01, time.time())
    await asyncio.sleep(2.5)  # cleanup ticks (trim_history) and heartbeats on both workers
    return await read_snapshot(store.redis, store.keys, stack.settings.queue_name)


async def test_every_script_the_project_runs_keeps_its_keys_in_one_slot(slots, make_stack):
    """The worker through its work (``run_the_worker_through_its_work``): each script call's
    KEYS hash to one slot (what Redis Cluster requires), and every script of
    consent_flow/store/lua ran at least once."""
    stack = await make_stack(worker_options={"cleanup_every": 1})
    await run_the_worker_through_its_work(stack)
    ran = {name for name, _ in slots.calls}
    expected = {p.stem for p in LUA.glob("*.lua")} - {PRELUDE} - NEVER_RUN
    assert ran >= expected, f"never ran: {sorted(expected - ran)}"
    assert not [name for name in ran if name.startswith("unknown")]
    assert slots.crossing() == []


async def test_a_script_whose_keys_span_slots_is_caught(slots, redis_server):
    """The recorder above can fail: keys of two shards in one call are reported."""
    pool = await create_pool(arq_redis_settings(redis_server.url), **JOB_SERIALIZERS)
    try:
        keys = Keys("x" + uuid.uuid4().hex[:6])
        one, other = keys.shard(1), keys.shard(2)
        jobs = JobQueue(pool)
        job = jobs.job("f", (), job_id=one.job_id("j"), queue=other.queue("q"))
        await jobs.put(job)
    finally:
        await pool.aclose()
    # (Twice when the server had to load the script first: redis-py sends it again.)
    assert {name for name, _ in slots.crossing()} == {"enqueue"}


async def test_a_start_with_another_shard_count_is_refused(settings, env):
    async with ConsentClient(settings.with_changes(redis_shards=8)):
        pass  # the first start: the data is laid out for 8 shards from now on
    with pytest.raises(SettingsError, match="the data was laid out for 8 shards"):
        async with ConsentClient(settings.with_changes(redis_shards=16)):
            pass
    async with ConsentClient(settings.with_changes(redis_shards=8)):
        pass
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consent_flow", "status", "alice"],
        env={**env, "CONSENT_REDIS_SHARDS": "4"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "the data was laid out for 8 shards" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "state", ["nodot", "16.abc", "-1.abc", "01.abc", "x.abc", "3.", ".abc", "99999.abc"]
)
def test_a_state_that_names_no_shard_names_none(state):
    assert session_shard(state, 16) is None


def test_a_state_names_its_shard():
    assert session_shard("7.Zm9v", 16) == 7
    assert session_shard("0.x.y", 1) == 0


async def test_a_callback_whose_state_names_no_shard_is_an_unknown_state(stack):
    """The state carries its session's shard; a state that names none, another shard, or a
    forged random part is refused like an expired session, and nothing changes."""
    status = await stack.client.request_provisioning("alice")
    assert status.authorization_url
    callback = await approve(status.authorization_url, "alice")
    state = httpx.URL(callback).params["state"]
    shard, _, rest = state.partition(".")
    assert int(shard) == stack.client.store.keys.shard_of("alice")
    other = (int(shard) + 1) % stack.settings.redis_shards
    for forged in (rest, f"{other}.{rest}", f"99.{rest}", f"{shard}.x{rest}"):
        page = await stack.callback(str(httpx.URL(callback).copy_set_param("state", forged)))
        assert page.status_code == 400, forged
        assert (await stack.client.status("alice")).state is State.PENDING
    assert (await stack.callback(callback)).status_code == 200
    assert (await stack.client.status("alice")).state is State.PROVISIONED


def test_worker_shards_are_numbers_and_ranges_within_the_count():
    assert parse_shard_set("0-3,12, 7", 16) == (0, 1, 2, 3, 7, 12)
    for bad in ("16", "3-1", "a", "1-", "", "0-16"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard_set(bad, 16)
    base = {"CONSENT_REDIS_SHARDS": "8", "CONSENT_WORKER_SHARDS": "0-1,5"}
    settings = Settings.from_env(base)
    assert (settings.redis_shards, settings.worker_shards) == (8, (0, 1, 5))
    assert Settings.from_env({}).redis_shards == 16
    with pytest.raises(SettingsError, match="CONSENT_WORKER_SHARDS"):
        Settings.from_env({"CONSENT_REDIS_SHARDS": "4", "CONSENT_WORKER_SHARDS": "4"})
    with pytest.raises(SettingsError, match="CONSENT_REDIS_SHARDS"):
        Settings.from_env({"CONSENT_REDIS_SHARDS": "1025"})


async def test_a_worker_takes_the_jobs_of_its_shards_only(redis_server):
    """Jobs on four shards' queues; a worker given two of them runs theirs (and finishes them
    on their own queues), and leaves the others queued."""
    queue = "q" + uuid.uuid4().hex[:8]
    ran: list[int] = []

    async def job(ctx: dict[str, Any], n: int) -> None:
        ran.append(n)

    pool = await create_pool(arq_redis_settings(redis_server.url), **JOB_SERIALIZERS)
    jobs = JobQueue(pool)
    for n in range(8):
        shard = n % 4
        await jobs.put(
            jobs.job(
                "job", (n,), job_id=shard_job_id(shard, f"j{n}"), queue=Keys.queue(queue, shard)
            )
        )
    worker = ConsentWorker(
        functions=[func(job, name="job")],
        queue_name=queue,
        queue_shards=[1, 3],
        redis_settings=arq_redis_settings(redis_server.url),
        poll_delay=0.005,
        keep_result=0,
        handle_signals=False,
        burst=True,
        **JOB_SERIALIZERS,
    )
    try:
        await asyncio.wait_for(worker.main(), timeout=20)
        assert sorted(ran) == [1, 3, 5, 7]
        for shard, left in ((0, 2), (1, 0), (2, 2), (3, 0)):
            assert await pool.zcard(Keys.queue(queue, shard)) == left
        # Its health line (what `arq --check` reads) counts what waits on the queues it serves.
        other = ConsentWorker(
            functions=[func(job, name="job")],
            queue_name=queue,
            queue_shards=[0, 1, 2],
            redis_pool=pool,
            handle_signals=False,
        )
        await other.record_health()
        assert (await pool.get(other.health_check_key)).decode().endswith(" queued=4")
    finally:
        await worker.close()
        await pool.aclose()


async def test_a_burst_worker_on_shards_runs_every_job_of_its_queues(redis_server):
    """arq ends a burst once its base queue is empty, which no job reaches once queues are
    sharded: a burst worker with two slots stopped after its first poll's two jobs. It runs
    all nine, and stops."""
    queue = "q" + uuid.uuid4().hex[:8]
    ran: list[int] = []

    async def job(ctx: dict[str, Any], n: int) -> None:
        await asyncio.sleep(0.05)
        ran.append(n)

    pool = await create_pool(arq_redis_settings(redis_server.url), **JOB_SERIALIZERS)
    jobs = JobQueue(pool)
    for n in range(9):
        shard = n % 3
        await jobs.put(
            jobs.job(
                "job",
                (n,),
                job_id=shard_job_id(shard, f"{queue}-{n}"),
                queue=Keys.queue(queue, shard),
            )
        )
    worker = ConsentWorker(
        functions=[func(job, name="job")],
        queue_name=queue,
        queue_shards=[0, 1, 2],
        redis_settings=arq_redis_settings(redis_server.url),
        poll_delay=0.005,
        max_jobs=2,
        keep_result=0,
        handle_signals=False,
        burst=True,
        **JOB_SERIALIZERS,
    )
    try:
        await asyncio.wait_for(worker.main(), timeout=20)
        assert sorted(ran) == list(range(9))
    finally:
        await worker.close()
        await pool.aclose()
