"""`make demo` works: examples/demo.py runs the real command line end to end and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"


def _run_demo() -> subprocess.CompletedProcess[str]:
    # The demo builds its own CONSENT_* environment; give it none, as on a fresh machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
    return subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_walks_alice_through_every_state_and_cleans_up():
    result = _run_demo()
    out = result.stdout
    assert result.returncode == 0, f"stdout:\n{out}\nstderr:\n{result.stderr}"

    # The real commands' output, in order: unprovisioned -> pending -> granted -> provisioned
    # -> revoked -> the history table.
    milestones = [
        "$ consent-flow status alice\nalice: unprovisioned",
        "$ consent-flow provision alice\nalice: pending",
        "authorization_url: http",
        "callback server answers 200: 'Access granted'",
        "$ consent-flow status alice\nalice: provisioned",
        "alice: revoked",
        "$ consent-flow history alice\nAT",
    ]
    positions = []
    start = 0
    for milestone in milestones:
        index = out.find(milestone, start)
        assert index >= 0, f"{milestone!r} missing (in order) from:\n{out}"
        positions.append(index)
        start = index + len(milestone)

    history = out[positions[-1] :]
    rows = [
        r"^\S+\s+provision_requested\s+unprovisioned\s+pending\s+operator",
        r"^\S+\s+authorization_completed\s+pending\s+provisioned\s+browser",
        r"^\S+\s+revoke_requested\s+provisioned\s+revoked\s+operator\S*\s+demo finished$",
    ]
    found = [re.search(row, history, re.MULTILINE) for row in rows]
    assert all(found), f"history rows missing from:\n{history}"
    assert [m.start() for m in found if m] == sorted(m.start() for m in found if m)

    assert "stopped cleanly (exit code 0)" in out

    # Its fresh data folder (and the embedded Redis's socket in it) is gone afterwards.
    data_dir = re.search(r"CONSENT_DATA_DIR=(\S+)", out)
    assert data_dir, out
    assert not Path(data_dir.group(1)).exists()
    # No secret is printed: neither the key, the client secret, nor the authorization code.
    assert "CONSENT_ENCRYPTION_KEYS=********" in out
    assert "CONSENT_CLIENT_SECRET=********" in out
    assert not re.search(r"[?&]code=(?!\.\.\.)", out)
