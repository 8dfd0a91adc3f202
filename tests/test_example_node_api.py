"""examples/api_client.mjs: the HTTP API from Node.js, against real `serve` and `worker`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT
from local_provider import approve_sync
from served import serving

from consent_flow.web.api import api_key_id

pytestmark = pytest.mark.integration

KEY = "node" * 4 + "0123456789abcdef0123456789abcdef"
RUN_TIMEOUT = 60.0


def test_the_node_example_provisions_gets_a_token_and_revokes(
    env: dict[str, str], tmp_path: Path, redirect_uri: str
):
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is required (the local provider needs it too)")
    env = {**env, "CONSENT_API_KEYS": KEY, "CONSENT_QUEUE_NAME": env["CONSENT_REDIS_PREFIX"] + ":q"}
    with serving(env, "serve", "worker", logs=tmp_path / "logs") as served:
        script = subprocess.Popen(
            [node, str(ROOT / "examples" / "api_client.mjs"), "nora"],
            env={
                "PATH": env["PATH"],
                "CONSENT_API_URL": served.url,
                "CONSENT_API_KEY": KEY,
                "CONSENT_WAIT_SECONDS": "30",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = [script.stdout.readline() for _ in range(2)] if script.stdout else []
            assert lines[0].strip() == "nora: pending", lines
            url = lines[1].removeprefix("approve at: ").strip()
            callback = approve_sync(url, "nora")
            assert callback.startswith(redirect_uri)
            assert httpx.get(callback, timeout=30).status_code == 200
            out, err = script.communicate(timeout=RUN_TIMEOUT)
        finally:
            if script.poll() is None:
                script.kill()
                script.communicate()
        assert script.returncode == 0, err
        rest = out.splitlines()
        assert rest[0].startswith("nora: provisioned, scopes ")
        assert rest[1].startswith("got a Bearer token (")
        assert rest[2] == "nora: revoked (example finished), at the provider: done"

        history: list[dict[str, Any]] = httpx.get(
            served.url + "/v1/connections/default/nora/history",
            headers={"Authorization": f"Bearer {KEY}"},
        ).json()
        assert [h["event"] for h in history] == [
            "provision_requested",
            "authorization_completed",
            "revoke_requested",
        ]
        assert history[-1]["actor"] == f"api:{api_key_id(KEY)}"
        assert KEY not in served.log_text()
