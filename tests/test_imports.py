"""Every module of the project imports on its own in a fresh interpreter: no import cycle
depends on which module a process happens to import first."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

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
    # All at once: each is a fresh interpreter, and together they take the time of a few.
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    }
    failed = {}
    for name, process in running.items():
        _, err = process.communicate(timeout=120)
        if process.returncode:
            failed[name] = err.strip().splitlines()[-1:]
    assert not failed
