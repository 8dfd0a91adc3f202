"""Every module of the project imports on its own in a fresh interpreter: no import cycle
depends on which module a process happens to import first."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import consent_flow
import workers


def test_every_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    names = [
        info.name
        for package in (consent_flow, workers)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")
        if not info.name.endswith(".__main__")  # runs the command line when imported
    ]
    assert "consent_flow.oidc.id_token" in names

    # A few at a time: each is a fresh interpreter, and dozens at once on a busy machine make
    # every one of them slow.
    def import_alone(name: str) -> tuple[str, list[str]]:
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
        return name, done.stderr.strip().splitlines()[-1:] if done.returncode else []

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failed = {name: err for name, err in pool.map(import_alone, names) if err}
    assert not failed
