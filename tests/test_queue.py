"""Jobs in Redis are JSON, never pickles: a worker that unpickled whatever sits under a job key
would run code for anyone who can write to Redis."""

from __future__ import annotations

import pickle
import time
import uuid

import pytest
from arq.connections import create_pool
from arq.constants import job_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw, serialize_job, serialize_result

from consent_flow import Settings
from consent_flow.queue.bus import JOB_SERIALIZERS, dump_job, load_job
from consent_flow.queue.scheduler import REFRESH_JOB, Scheduler, refresh_job_id, refresh_payload
from consent_flow.store.connection import arq_redis_settings
from consent_flow.store.redis_store import Keys, due_ms
from workers import worker_settings


def test_a_refresh_job_is_compact_json():
    payload = serialize_job(
        REFRESH_JOB, ("alice", 1764175335123, "gh"), {}, None, 1764175335000, serializer=dump_job
    )
    assert payload == (
        b'{"f":"refresh_tokens","a":["alice",1764175335123,"gh"],"et":1764175335000}'
    )
    assert deserialize_job_raw(payload, deserializer=load_job) == (
        REFRESH_JOB,
        ["alice", 1764175335123, "gh"],
        {},
        None,
        1764175335000,
    )


def test_keyword_arguments_and_tries_survive():
    payload = serialize_job(
        "f", ("u",), {"on_demand": True, "min_ttl": 30.0}, 2, 5, serializer=dump_job
    )
    assert deserialize_job_raw(payload, deserializer=load_job) == (
        "f",
        ["u"],
        {"on_demand": True, "min_ttl": 30.0},
        2,
        5,
    )


def _explode() -> None:
    raise AssertionError("a job payload was unpickled")


class _Hostile:
    def __reduce__(self):  # unpickling calls _explode: what a hostile payload would run
        return (_explode, ())


def test_a_pickled_job_is_refused_not_unpickled():
    hostile = pickle.dumps({"t": None, "f": REFRESH_JOB, "a": (_Hostile(),), "k": {}, "et": 0})
    with pytest.raises(SerializationError):
        deserialize_job_raw(hostile, deserializer=load_job)


def test_a_failed_jobs_exception_serialises_and_other_objects_do_not():
    result = serialize_result(
        "f", (), {}, 1, 0, False, RuntimeError("lost"), 0, 0, "r", "q", "id", serializer=dump_job
    )
    assert result is not None and load_job(result)["r"] == "RuntimeError('lost')"
    with pytest.raises(SerializationError):
        serialize_job("f", (object(),), {}, None, 0, serializer=dump_job)


def test_every_worker_uses_the_json_serializer():
    settings = Settings(encryption_keys=())
    options = worker_settings(settings, "redis://127.0.0.1:1/0")
    assert options["job_serializer"] is dump_job
    assert options["job_deserializer"] is load_job
    assert {"job_serializer", "job_deserializer"} == set(JOB_SERIALIZERS)


@pytest.mark.integration
async def test_scheduled_jobs_are_stored_as_json(redis_server):
    pool = await create_pool(arq_redis_settings(redis_server.url), **JOB_SERIALIZERS)
    keys = Keys("s" + uuid.uuid4().hex[:8])
    try:
        scheduler = Scheduler(pool, keys=keys, queue_name=f"{keys.prefix}:queue")
        later, past = time.time() + 600, time.time() - 1
        await scheduler.schedule("alice", later)
        raw = await pool.get(job_key_prefix + refresh_job_id(keys, "alice", due_ms(later)))
        assert load_job(raw)["a"] == ["alice", due_ms(later), "default"]
        await pool.zadd(
            keys.of("bob").sched, {"bob": due_ms(past)}
        )  # its job lost: the sweep requeues
        assert (await scheduler.sweep())["requeued"] == 1
        raw = await pool.get(job_key_prefix + refresh_job_id(keys, "bob", due_ms(past)))
        assert load_job(raw)["a"] == ["bob", due_ms(past), "default"]
    finally:
        await pool.aclose()


@pytest.mark.parametrize("user", ["alice", 'quo"te', "üser", "back\\slash"])
def test_the_sweeps_payload_is_what_arq_would_write(user):
    expected = serialize_job(REFRESH_JOB, (user, 17, "gh"), {}, None, 42, serializer=dump_job)
    assert refresh_payload(user, 17, 42, "gh") == expected
    assert load_job(refresh_payload(user, 17, 42, "gh"))["a"] == [user, 17, "gh"]
