"""Running ``consent-flow import``: importable rows of a token store become provisioned grants.

The source side (reading, decrypting, classifying) is :mod:`consent_flow.store.import_source`;
this module turns each importable row into a ``grant_imported`` event through the queue, like
every other event. The refresh token never travels in the job: it waits sealed in the user's
inbox key, as an authorization code does, and the worker takes it from there.

The run keeps its place in Redis (under the deployment's prefix, keyed by a digest of the source
URL without its credentials) after every row, together with the counts so far, so an
interrupted run continues where it stopped and its summary covers the whole import. A run that
reaches the end drops its place: the next run reads the source again, and skips every user it
already provisioned.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import structlog
from cryptography.fernet import Fernet

from consent_flow.client import ConsentClient
from consent_flow.core.table import Event, State
from consent_flow.engine.engine import IMPORT_SKIPPED_PENDING
from consent_flow.errors import ConsentError
from consent_flow.queue.bus import Envelope, new_id
from consent_flow.store.import_source import (
    START,
    ImportCursor,
    ImportedGrant,
    ImportProgress,
    ImportSourceError,
    Outcome,
    RowStatus,
    Summary,
    open_source,
)

__all__ = [
    "IMPORT_ACTOR",
    "IMPORT_CURSOR_TTL",
    "ImportFailed",
    "ImportReport",
    "ProgressBar",
    "run_import",
    "source_digest",
]

log = structlog.get_logger("consent_flow.import")

IMPORT_ACTOR = "import"
# How long a half-done import can be resumed; after that a run starts over (and skips the users
# it already provisioned).
IMPORT_CURSOR_TTL = 30 * 24 * 3600
PROGRESS_REDRAW = 0.1  # seconds between two redraws of the progress bar
PROGRESS_WIDTH = 30  # characters of the bar itself


class ImportFailed(ConsentError):
    """The engine did not take an imported grant; the run stops before that row."""

    code = "import_failed"


def source_digest(url: str) -> str:
    """A digest naming the source: the same database under any credentials or driver suffix."""
    scheme, _, rest = url.partition("://")
    base = scheme.lower().split("+", 1)[0]
    if base == "sqlite":
        path = Path(unquote(rest[1:].split("?", 1)[0])).resolve()
        name = f"sqlite://{path}"
    else:
        parts = urlsplit(f"postgresql://{rest}")
        host = parts.hostname or ""
        port = parts.port or 5432
        name = f"postgresql://{host}:{port}{parts.path or '/'}"
    return hashlib.sha256(name.encode()).hexdigest()[:32]


@dataclass(slots=True)
class ImportReport:
    """What a run did: the counts, and whether it resumed, finished, or only looked."""

    source: str  # the URL, password masked
    summary: Summary
    dry_run: bool
    resumed: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dry_run": self.dry_run,
            "resumed": self.resumed,
            **self.summary.as_dict(),
        }

    def __str__(self) -> str:
        lines = []
        if self.resumed:
            lines.append("resumed where the last run stopped; counts include that run")
        lines.append(str(self.summary))
        if self.dry_run:
            lines.append("dry run: nothing was written (imported counts what would be)")
        return "\n".join(lines)


class ProgressBar:
    """A one-line progress bar on a terminal; silent when ``stream`` is not one."""

    def __init__(self, stream: IO[str] | None = None, *, clock: Any = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._clock = clock
        self._drawn_at: float | None = None
        self._drawn = False

    def __call__(self, progress: ImportProgress) -> None:
        if not self.enabled:
            return
        now = self._clock()
        last = progress.total > 0 and progress.done >= progress.total
        if self._drawn_at is not None and now - self._drawn_at < PROGRESS_REDRAW and not last:
            return
        self._drawn_at = now
        share = progress.done / progress.total if progress.total else 1.0
        filled = int(share * PROGRESS_WIDTH)
        bar = "#" * filled + "-" * (PROGRESS_WIDTH - filled)
        self.stream.write(
            f"\rimporting [{bar}] {progress.done}/{progress.total} {share * 100:3.0f}%"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


async def run_import(
    client: ConsentClient,
    url: str,
    fernet: Fernet,
    *,
    dry_run: bool = False,
    restart: bool = False,
    progress: ProgressBar | None = None,
    provider: str | None = None,
) -> ImportReport:
    """Import every importable row of the token store at ``url`` into ``client``'s deployment.

    ``dry_run`` reads, decrypts and classifies, and reads each user's state, but writes
    nothing (not even its place). ``restart`` ignores a place kept by an earlier run.
    Raises :class:`~consent_flow.store.import_source.WrongFernetKey` before anything is
    written when the key is not the store's. The grants become connections at ``provider``
    (None: the only configured provider).
    """
    provider = client.provider_name(provider)
    store = client.store_for(provider)
    cursor_key = store.keys.import_cursor(source_digest(url))
    after, summary, resumed = START, Summary(), False
    if not dry_run and not restart:
        saved = await store.redis.get(cursor_key)
        if saved is not None:
            after, summary = _read_place(saved)
            resumed = True
    with open_source(url, fernet) as source:
        log.info("import.started", source=source.location, dry_run=dry_run, resumed=resumed)
        try:
            for row in source.rows(after, progress=progress):
                if row.status is RowStatus.IMPORTABLE:
                    assert row.grant is not None
                    summary.record(await _import_row(client, provider, row.grant, dry_run=dry_run))
                else:
                    summary.record_row(row)
                if not dry_run:
                    await store.redis.set(
                        cursor_key, _place(row.cursor, summary), ex=IMPORT_CURSOR_TTL
                    )
        finally:
            if progress is not None:
                progress.close()
        if not dry_run:
            await store.redis.delete(cursor_key)
        log.info("import.finished", source=source.location, dry_run=dry_run, **summary.as_dict())
        return ImportReport(source.location, summary, dry_run, resumed)


async def _import_row(
    client: ConsentClient, provider: str, grant: ImportedGrant, *, dry_run: bool
) -> Outcome:
    store = client.store_for(provider)
    rec = await store.load(grant.user)
    # Read first so a second run sends no event at all for the users it already provisioned;
    # the worker decides again under the record's version, so a race changes nothing.
    if rec.state is State.PROVISIONED:
        return Outcome.SKIPPED_ALREADY_PROVISIONED
    if rec.state is State.PENDING:
        return Outcome.SKIPPED_PENDING
    if rec.state is State.REVOKED and rec.imported_at is not None:
        # Imported once and ended since (rejected by the provider, or revoked on purpose): the
        # source's copy of that grant must not bring it back.
        return Outcome.SKIPPED_ENDED_AFTER_IMPORT
    if dry_run:
        return Outcome.IMPORTED
    event_id = new_id()
    sealed = client.ring_for(provider).encrypt(
        grant.refresh_token.reveal().encode(), user=grant.user, purpose=f"import:{event_id}"
    )
    await store.put_inbox(grant.user, event_id, sealed)
    envelope = Envelope(
        Event.GRANT_IMPORTED,
        grant.user,
        IMPORT_ACTOR,
        event_id=event_id,
        payload={
            "scopes": " ".join(grant.scopes),
            "refresh_expires_at": "" if grant.expires_at is None else repr(grant.expires_at),
        },
        provider=provider,
    )
    outcome = await client.emit(envelope)
    if outcome.result == "applied":
        return Outcome.IMPORTED
    if outcome.result == "unchanged":
        if outcome.detail.get("skipped") == IMPORT_SKIPPED_PENDING:
            return Outcome.SKIPPED_PENDING
        return Outcome.SKIPPED_ALREADY_PROVISIONED
    raise ImportFailed(
        f"the grant of {grant.user} was not imported ({outcome.error}"
        + (f": {outcome.reason}" if outcome.reason else "")
        + "); run the import again to continue from this row"
    )


def _place(cursor: ImportCursor, summary: Summary) -> str:
    return json.dumps({"cursor": cursor.to_json(), "summary": summary.as_dict()})


def _read_place(raw: bytes | str) -> tuple[ImportCursor, Summary]:
    try:
        data = json.loads(raw)
        return ImportCursor.from_json(data["cursor"]), Summary.from_dict(data["summary"])
    except (ValueError, KeyError, TypeError):
        raise ImportSourceError(
            "the place kept by an earlier import is unreadable: run with --restart"
        ) from None
