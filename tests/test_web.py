"""The callback server's app (`serve`, `up`) carries every route an operator needs."""

from __future__ import annotations

import httpx
import pytest
from conftest import provision

pytestmark = pytest.mark.integration


async def test_serve_answers_health_metrics_and_ops_pages(stack):
    await provision(stack, "alice")
    base = f"http://127.0.0.1:{stack.settings.http_port}"
    async with httpx.AsyncClient(base_url=base) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["checks"] == {
            "redis": "ok",
            "worker": "ok",
            "refresh": "ok",
            "provider": "ok",
            "clock": "ok",
        }
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert 'consent_flow_consents{state="provisioned"} 1.0' in metrics.text
        page = await http.get("/ops")
        assert page.status_code == 200
        assert "alice" in page.text
        assert (await http.get("/ops/users/alice")).status_code == 200


async def test_healthz_is_red_without_a_worker(make_stack):
    stack = await make_stack(workers=0)
    await stack.client.pool.delete(stack.settings.queue_name + ":health-check")
    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{stack.settings.http_port}/healthz")
    assert health.status_code == 503
    assert health.json()["checks"]["worker"] == "no recent heartbeat"
