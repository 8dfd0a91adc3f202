"""Real `consent-flow` processes (serve, worker, up) for tests that drive them over HTTP."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT = 30.0  # seconds for the processes to answer a green /healthz


@dataclass
class Served:
    url: str
    logs: list[Path]

    def log_text(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs)


@contextlib.contextmanager
def serving(env: dict[str, str], *commands: str, logs: Path) -> Iterator[Served]:
    """Start one ``consent-flow COMMAND`` process per command with ``env`` and yield once the
    server's /healthz is green (Redis, a worker's heartbeat, the clocks); stop them after."""
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    paths: list[Path] = []
    try:
        for command in commands:
            path = logs / f"{command}.log"
            paths.append(path)
            with path.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "consent_flow", command],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        served = Served(f"http://127.0.0.1:{env['CONSENT_HTTP_PORT']}", paths)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(served.url + "/healthz", timeout=2).status_code == 200:
                    break
            dead = [p for p in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"consent-flow did not come up:\n{served.log_text()[-3000:]}")
            time.sleep(0.1)
        yield served
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
