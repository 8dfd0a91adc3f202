"""A spool for refreshed tokens that are not yet committed to Redis.

At a provider that rotates refresh tokens, the answer to a refresh is the only copy of the grant:
the refresh token it replaced is spent. A refresh whose commit is slow (Redis failing over,
paused, away) writes its new tokens to a file in the worker's data folder (sealed with the key
ring and bound to the user, like every token at rest; never in clear), removed once the commit
applied or found the grant gone. A worker killed while the commit waits, or stopped during a
Redis outage, finds the file when it starts again on the same machine and commits it then.

A file written because the commit was slow is not fsync'd: a killed process leaves it in the
kernel's page cache, which survives. One whose commit failed is fsync'd with its folder, since
it may wait for minutes and should survive a machine crash too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

__all__ = ["PendingTokens", "TokenSpool", "token_digest"]

log = structlog.get_logger("consent_flow.spool")

SPOOL_VERSION = 1


def token_digest(token: str) -> str:
    """Which refresh token a refresh presented, without keeping the token (it is spent)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PendingTokens:
    """A refresh's answer, sealed, with what it replaced: everything its commit needs."""

    user: str
    event_id: str
    at: float  # when the refresh was made (its ``lastref``)
    since: float | None  # the grant it belongs to: the record's ``since`` when it was read
    base: str  # digest of the refresh token it presented
    sealed: bytes  # the new tokens, sealed for ``user``
    expires_at: float | None
    refresh_expires_at: float | None  # the refresh token's own lapse, when the provider says
    scopes: tuple[str, ...]
    due_at: float  # when the next refresh is due

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": SPOOL_VERSION,
                "user": self.user,
                "event_id": self.event_id,
                "at": self.at,
                "since": self.since,
                "base": self.base,
                "sealed": base64.b64encode(self.sealed).decode(),
                "expires_at": self.expires_at,
                "refresh_expires_at": self.refresh_expires_at,
                "scopes": list(self.scopes),
                "due_at": self.due_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> PendingTokens:
        d: dict[str, Any] = json.loads(raw)
        if d.get("v") != SPOOL_VERSION:
            raise ValueError(f"unknown spool format {d.get('v')!r}")
        return cls(
            user=str(d["user"]),
            event_id=str(d["event_id"]),
            at=float(d["at"]),
            since=None if d["since"] is None else float(d["since"]),
            base=str(d["base"]),
            sealed=base64.b64decode(d["sealed"]),
            expires_at=None if d["expires_at"] is None else float(d["expires_at"]),
            refresh_expires_at=None
            if d["refresh_expires_at"] is None
            else float(d["refresh_expires_at"]),
            scopes=tuple(str(s) for s in d["scopes"]),
            due_at=float(d["due_at"]),
        )


class TokenSpool:
    """One folder of spool files, one file per pending refresh (``<user digest>-<event id>``).

    The folder is per Redis key prefix: deployments sharing a machine never replay each
    other's tokens.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ready = False

    def path(self, pending: PendingTokens) -> Path:
        user = hashlib.sha256(pending.user.encode()).hexdigest()[:32]
        return self.directory / f"{user}-{pending.event_id}.json"

    def write(self, pending: PendingTokens) -> None:
        """Write ``pending``, not yet fsync'd. One write() of a small buffer: a process killed
        around it leaves the whole file or none (only a power loss could tear it, and a torn
        file is logged and left at replay)."""
        if not self._ready:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._ready = True
        fd = os.open(self.path(pending), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pending.to_json().encode())
        finally:
            os.close(fd)

    def make_durable(self, pending: PendingTokens) -> None:
        """fsync the file and its folder: it is about to wait for Redis."""
        path = self.path(pending)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folder = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def remove(self, pending: PendingTokens) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(pending).unlink()

    def entries(self, *, min_age: float = 0.0) -> list[PendingTokens]:
        """Every readable entry written at least ``min_age`` seconds ago, oldest first. An
        unreadable file is logged and left alone."""
        found: list[PendingTokens] = []
        if not self.directory.is_dir():
            return found
        written_by = time.time() - min_age
        for path in sorted(self.directory.glob("*.json")):
            try:
                if min_age and path.stat().st_mtime > written_by:
                    continue
                found.append(PendingTokens.from_json(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("spool_entry_unreadable", path=str(path), error=type(exc).__name__)
        return sorted(found, key=lambda p: p.at)
