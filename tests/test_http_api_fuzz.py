"""Property-based run of the HTTP API from its own OpenAPI document (schemathesis + hypothesis).

A real `consent-flow up` (server and worker) on the test's Redis and the local provider gets a
few hundred generated requests, schema-valid and schema-invalid, with the right key, a wrong one
or none. Every answer must be a non-5xx the document allows (status, media type, headers, body
schema), schema-invalid input must be refused, and a refused request must leave every consent
key in Redis as it was.

The seed fixes the run for a given code base and test selection: hypothesis also draws constants
from the project's modules that are loaded. A failure prints the falsifying case and a curl
command that repeats it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from served import serving

pytestmark = pytest.mark.integration

KEY = "fuzz" * 4 + "0123456789abcdef0123456789abcdef"
SEED = 20261201  # the run is the same every time: a failure found once is found again
EXAMPLES = 400
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
PERIODIC_JOBS = ("{s0}:sweep:", "{s0}:cleanup:")


def snapshot(r: redis.Redis, prefix: str, queue: str) -> dict[str, Any]:
    """Every key that holds consent state, with its value, and the queued events."""
    # Every shard's keys: records, tokens, histories, indexes, schedules, streams, counts.
    names = set(r.scan_iter(match=f"{prefix}:{{*", count=1000))
    ordered = sorted(names)
    pipe = r.pipeline(transaction=False)
    for name in ordered:
        pipe.dump(name)
    state: dict[str, Any] = dict(zip(ordered, pipe.execute(), strict=True))
    queued = [j for q in r.scan_iter(match=queue + ":{*") for j in r.zrange(q, 0, -1)]
    state["queue"] = sorted(j for j in queued if not j.startswith(PERIODIC_JOBS))
    return state


def test_generated_requests_get_documented_answers_and_refusals_change_nothing(
    env: dict[str, str], redis_server: Any, tmp_path: Path
):
    prefix = env["CONSENT_REDIS_PREFIX"]
    queue = f"{prefix}:queue"
    env = {**env, "CONSENT_API_KEYS": KEY, "CONSENT_QUEUE_NAME": queue}
    r = redis.Redis(port=redis_server.port, decode_responses=True)
    with serving(env, "up", logs=tmp_path / "logs") as served:
        schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 6
        cases = st.one_of(
            [
                op.as_strategy(generation_mode=mode)
                for op in operations
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            ]
        )
        credentials = st.sampled_from(["key"] * 6 + ["none", "wrong", "basic"])
        seen: Counter[tuple[str, int]] = Counter()

        @seed(SEED)
        @settings(
            max_examples=EXAMPLES,
            database=None,
            deadline=None,
            phases=[Phase.generate, Phase.shrink],
            # Generating for six operations in two modes: some draws are large or filtered.
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(case=cases, credential=credentials)
        def run(case: Any, credential: str) -> None:
            headers = {
                "key": {"Authorization": f"Bearer {KEY}"},
                "none": {},
                "wrong": {"Authorization": f"Bearer {KEY[::-1]}"},
                "basic": {"Authorization": f"Basic {KEY}"},
            }[credential]
            before = snapshot(r, prefix, queue)
            response = case.call(base_url=served.url, headers=headers, timeout=30)
            seen[(case.operation.label, response.status_code)] += 1
            if credential != "key":
                assert response.status_code == 401, response.text
            case.validate_response(response, checks=CHECKS, headers=headers)
            if response.status_code >= 400:
                assert snapshot(r, prefix, queue) == before, (case.operation.label, response.text)

        run()

    total = sum(seen.values())
    assert total >= 300, seen
    statuses = Counter(status for _, status in seen.elements())
    # The run reached every operation, and both accepted and each kind of refused request.
    assert {label for label, _ in seen} == {op.label for op in operations}
    assert {200, 401, 404, 409, 422} <= set(statuses), statuses
    assert KEY not in served.log_text()
    assert hashlib.sha256(KEY.encode()).hexdigest()[:8] in served.log_text()
