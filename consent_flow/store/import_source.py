"""Reading grants out of nextcloud-mcp-server's token store, for ``consent-flow import``.

This is the source side of an import: it reads, decrypts and classifies rows and never writes,
neither to the source (opened read-only) nor anywhere else. The caller turns each importable row
into a ``grant_imported`` event.

What the source looks like, as read in the public repository cbcoutinho/nextcloud-mcp-server
(commit f2b7bf132f31bf8084dc2f37d43e4f9a437375b8):

* ``nextcloud_mcp_server/alembic/versions/20251217_2200_001_initial_schema.py`` creates
  ``refresh_tokens``: ``user_id`` TEXT PRIMARY KEY, ``encrypted_token`` BLOB (BYTEA on
  PostgreSQL) NOT NULL, ``expires_at`` BIGINT NULL, ``created_at``/``updated_at`` BIGINT,
  ``flow_type`` TEXT DEFAULT 'hybrid', ``token_audience`` TEXT DEFAULT 'nextcloud',
  ``provisioned_at``, ``provisioning_client_id``, ``scopes`` TEXT, ``user_profile``,
  ``profile_cached_at``. Later migrations (002 to 011) leave the table alone.
* ``nextcloud_mcp_server/auth/storage.py`` (``store_refresh_token``, ``get_refresh_token``):
  ``encrypted_token = Fernet(TOKEN_ENCRYPTION_KEY).encrypt(refresh_token.encode())`` with one key
  (no ``MultiFernet``, no rotation); ``scopes = json.dumps(scopes) if scopes else None`` (a JSON
  array, NULL when none were recorded); ``expires_at`` is the refresh token's expiry in whole
  seconds since the epoch, NULL when unknown, and a row past it counts as gone; a NULL
  ``flow_type`` reads as 'hybrid' and a NULL ``token_audience`` as 'nextcloud'.
* ``docs/ADR-026-pluggable-database-backend.md``: the store is SQLite by default or PostgreSQL via
  ``DATABASE_URL`` (``sqlite+aiosqlite:///...``, ``postgresql+asyncpg://...``).
* ``docs/ADR-004-mcp-application-oauth.md`` and ``auth/oauth_routes.py``: 'flow1' is a client's
  sign-in to the MCP server (audience 'mcp-server'); the offline grant for Nextcloud comes from
  the 'hybrid' callback (which asks for ``offline_access`` and records no scopes) or the 'flow2'
  provisioning callback (which records the scopes the provider granted). Both store the user as
  the ID token's ``sub``, or the placeholder ``unknown`` when they could not read the ID token.

A row is **importable** when all of these hold; otherwise it is *undecryptable* (the first) or
*invalid* with an :class:`InvalidReason`:

1. its ciphertext decrypts under the given key;
2. the plaintext is a refresh token (RFC 6749 appendix A.17: one or more VSCHAR);
3. ``user_id`` is a usable user id (1 to 255 printable characters, no whitespace) and not the
   ``unknown`` placeholder, which would hand one person's grant to whoever is called that;
4. ``flow_type`` is 'hybrid', 'flow2' or NULL: a flow-1 token is a sign-in, not a delegated grant;
5. ``token_audience`` is 'nextcloud' or NULL: a token for the MCP server itself reaches no API;
6. ``scopes`` is NULL (not recorded: the first refresh learns them) or a JSON array of RFC 6749
   scope tokens, which includes ``offline_access`` unless the caller waives that;
7. ``expires_at`` is NULL or a number of seconds after now.

Wrong keys stop the import before anything is written: :meth:`TokenStoreSource.rows` first
decrypts a sample of the rows it is about to read and raises :class:`WrongFernetKey` when not one
decrypts (a Fernet token under another key never does), before it hands out any row.

Rows come in primary-key order inside one read snapshot; each carries the
:class:`ImportCursor` just past it, which the caller persists once the row is dealt with and
passes back to resume exactly there.

The errors of this module, under the package's base class::

    ConsentError
    └── ImportSourceError       the source cannot be read as that token store
        ├── ImportKeyError      the key variable is unset or holds no Fernet key
        └── WrongFernetKey      no sampled token decrypts: the key is not the store's
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self
from urllib.parse import unquote, urlsplit

import structlog
from cryptography.fernet import Fernet, InvalidToken

from consent_flow import settings
from consent_flow.errors import ConsentError
from consent_flow.store.connection import masked_url

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "KEY_CHECK_SAMPLE",
    "FernetKeyCheck",
    "ImportCursor",
    "ImportKeyError",
    "ImportProgress",
    "ImportSourceError",
    "ImportedGrant",
    "InvalidReason",
    "Outcome",
    "RowStatus",
    "Secret",
    "SourceFlow",
    "SourceRow",
    "Summary",
    "TokenStoreSource",
    "WrongFernetKey",
    "load_fernet_key",
    "open_source",
]

log = structlog.get_logger("consent_flow.import")

TABLE = "refresh_tokens"
# Enough rows that a few garbled ones cannot pass for a wrong key; few enough to stay instant.
KEY_CHECK_SAMPLE = 50
# How long to wait for a PostgreSQL server that does not answer, unless the URL says otherwise.
CONNECT_TIMEOUT = 10
# How long to wait for an SQLite file another process holds locked (a write in progress).
SQLITE_BUSY_TIMEOUT = 5.0
# Rows fetched per round trip from a PostgreSQL server-side cursor or an SQLite cursor.
FETCH_BATCH = 500
MAX_USER_LENGTH = 255  # OpenID Connect Core 2: a subject is at most 255 ASCII characters
# What nextcloud-mcp-server stores as the user when it could not read the ID token.
PLACEHOLDER_USERS = frozenset({"unknown"})
OFFLINE_ACCESS = "offline_access"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REQUIRED_COLUMNS = ("user_id", "encrypted_token")
# Columns every release since the first migration has; an older store without them reads NULL.
_OPTIONAL_COLUMNS = ("expires_at", "flow_type", "token_audience", "scopes")


class ImportSourceError(ConsentError):
    """The source cannot be read as nextcloud-mcp-server's token store."""

    code = "import_source_error"


class ImportKeyError(ImportSourceError):
    """The variable meant to hold the store's Fernet key is unset or holds no Fernet key."""

    code = "import_key_invalid"


class WrongFernetKey(ImportSourceError):
    """Not one sampled token decrypts: the key is not the one the store was written with."""

    code = "import_wrong_key"


class RowStatus(StrEnum):
    IMPORTABLE = "importable"
    UNDECRYPTABLE = "undecryptable"
    INVALID = "invalid"


class InvalidReason(StrEnum):
    """Why a row that decrypted (or could not be judged) is not importable."""

    MISSING_USER = "missing_user"
    BAD_USER = "bad_user"
    PLACEHOLDER_USER = "placeholder_user"
    BAD_TOKEN = "bad_token"
    SIGN_IN_FLOW = "sign_in_flow"
    UNKNOWN_FLOW = "unknown_flow"
    WRONG_AUDIENCE = "wrong_audience"
    BAD_SCOPES = "bad_scopes"
    NO_OFFLINE_ACCESS = "no_offline_access"
    BAD_EXPIRY = "bad_expiry"
    EXPIRED = "expired"


class SourceFlow(StrEnum):
    """The flows of nextcloud-mcp-server that leave an offline grant behind."""

    HYBRID = "hybrid"
    FLOW2 = "flow2"


_FLOWS = frozenset(flow.value for flow in SourceFlow)


class Outcome(StrEnum):
    """What became of one source row, as the import's summary counts it."""

    IMPORTED = "imported"
    SKIPPED_ALREADY_PROVISIONED = "skipped_already_provisioned"
    SKIPPED_PENDING = "skipped_pending"
    SKIPPED_ENDED_AFTER_IMPORT = "skipped_ended_after_import"
    UNDECRYPTABLE = "undecryptable"
    INVALID = "invalid"


class Secret(settings.Secret):
    """A refresh token read from the source: a settings secret that is not hashable either,
    so it never keys a dict or a set by accident."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class ImportedGrant:
    """One importable row as plain domain values.

    ``scopes`` is empty when the store recorded none (its hybrid flow never does);
    ``expires_at`` is the refresh token's own expiry (float seconds since the epoch), ``None``
    when the store did not know it. ``source_row_id`` is the row's primary key in the source.
    """

    user: str
    refresh_token: Secret = field(repr=False)
    scopes: tuple[str, ...]
    expires_at: float | None
    flow_type: SourceFlow
    source_row_id: str


@dataclass(frozen=True, slots=True)
class ImportCursor:
    """A position in the source's primary-key order: everything up to it has been read.

    ``after_key`` is the last primary key read (text, or bytes for an SQLite blob);
    ``after_null_rowid`` the SQLite rowid of the last row read among those with a NULL primary
    key, which SQLite allows and sorts first. Both ``None``: the start.
    """

    after_key: str | bytes | None = None
    after_null_rowid: int | None = None

    def __post_init__(self) -> None:
        if self.after_key is not None and self.after_null_rowid is not None:
            raise ImportSourceError("an import cursor is past a key or past a NULL row, not both")

    def to_json(self) -> str:
        """A compact text form to persist; :meth:`from_json` reads it back."""
        if isinstance(self.after_key, bytes):
            return json.dumps({"after_hex": self.after_key.hex()})
        if self.after_key is not None:
            return json.dumps({"after": self.after_key})
        if self.after_null_rowid is not None:
            return json.dumps({"after_null_rowid": self.after_null_rowid})
        return "{}"

    @classmethod
    def from_json(cls, text: str) -> ImportCursor:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or len(data) > 1:
                raise ValueError
            if "after" in data and isinstance(data["after"], str):
                return cls(after_key=data["after"])
            if "after_hex" in data and isinstance(data["after_hex"], str):
                return cls(after_key=bytes.fromhex(data["after_hex"]))
            rowid = data.get("after_null_rowid")
            if rowid is not None:
                if type(rowid) is not int:
                    raise ValueError
                return cls(after_null_rowid=rowid)
            if data:
                raise ValueError
            return cls()
        except ValueError:
            raise ImportSourceError(
                "not an import cursor (a saved cursor is a JSON object)"
            ) from None


START = ImportCursor()


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One row of the source, classified.

    ``grant`` is set exactly when ``status`` is importable, ``reason`` exactly when it is
    invalid. ``user`` is the row's user id when it is a usable one (for reports and logs).
    ``cursor`` is the position just past this row.
    """

    cursor: ImportCursor
    status: RowStatus
    user: str | None = None
    reason: InvalidReason | None = None
    grant: ImportedGrant | None = None


@dataclass(frozen=True, slots=True)
class ImportProgress:
    """Rows dealt with so far out of the rows the pass will read (for a progress bar)."""

    done: int
    total: int


@dataclass(frozen=True, slots=True)
class FernetKeyCheck:
    """The outcome of the key check: ciphertexts tried and how many decrypted."""

    sampled: int
    decrypted: int


@dataclass(slots=True)
class Summary:
    """The counts an import reports. Invalid rows are also counted by reason."""

    imported: int = 0
    skipped_already_provisioned: int = 0
    skipped_pending: int = 0
    skipped_ended_after_import: int = 0
    undecryptable: int = 0
    invalid: int = 0
    invalid_by_reason: Counter[InvalidReason] = field(default_factory=Counter)

    def record(self, outcome: Outcome, reason: InvalidReason | None = None) -> None:
        if (outcome is Outcome.INVALID) != (reason is not None):
            raise ValueError("an invalid row has a reason, and only an invalid row has one")
        if outcome is Outcome.IMPORTED:
            self.imported += 1
        elif outcome is Outcome.SKIPPED_ALREADY_PROVISIONED:
            self.skipped_already_provisioned += 1
        elif outcome is Outcome.SKIPPED_PENDING:
            self.skipped_pending += 1
        elif outcome is Outcome.SKIPPED_ENDED_AFTER_IMPORT:
            self.skipped_ended_after_import += 1
        elif outcome is Outcome.UNDECRYPTABLE:
            self.undecryptable += 1
        else:
            assert reason is not None
            self.invalid += 1
            self.invalid_by_reason[reason] += 1

    def record_row(self, row: SourceRow) -> None:
        """Count a row the source itself already judged (undecryptable or invalid)."""
        if row.status is RowStatus.UNDECRYPTABLE:
            self.record(Outcome.UNDECRYPTABLE)
        elif row.status is RowStatus.INVALID:
            self.record(Outcome.INVALID, row.reason)
        else:
            raise ValueError("an importable row is counted once the import decided its fate")

    @property
    def total(self) -> int:
        return (
            self.imported
            + self.skipped_already_provisioned
            + self.skipped_pending
            + self.skipped_ended_after_import
            + self.undecryptable
            + self.invalid
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "skipped_already_provisioned": self.skipped_already_provisioned,
            "skipped_pending": self.skipped_pending,
            "skipped_ended_after_import": self.skipped_ended_after_import,
            "undecryptable": self.undecryptable,
            "invalid": self.invalid,
            "invalid_by_reason": {
                reason.value: count for reason, count in sorted(self.invalid_by_reason.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        """Read back what :meth:`as_dict` wrote (a resumed import carries its counts on)."""
        try:
            counts = {
                name: int(data.get(name, 0))
                for name in (
                    "imported",
                    "skipped_already_provisioned",
                    "skipped_pending",
                    "skipped_ended_after_import",
                    "undecryptable",
                    "invalid",
                )
            }
            reasons = Counter(
                {
                    InvalidReason(k): int(v)
                    for k, v in dict(data.get("invalid_by_reason", {})).items()
                }
            )
        except (TypeError, ValueError):
            raise ImportSourceError("not an import summary") from None
        return cls(**counts, invalid_by_reason=reasons)

    def __str__(self) -> str:
        text = (
            f"imported {self.imported}, skipped (already provisioned) "
            f"{self.skipped_already_provisioned}, "
        )
        if self.skipped_pending:
            text += f"skipped (authorization under way) {self.skipped_pending}, "
        if self.skipped_ended_after_import:
            text += f"skipped (imported before, since revoked) {self.skipped_ended_after_import}, "
        text += f"undecryptable {self.undecryptable}, invalid {self.invalid}"
        if self.invalid_by_reason:
            reasons = ", ".join(
                f"{reason.value} {count}"
                for reason, count in sorted(self.invalid_by_reason.items())
            )
            text += f" ({reasons})"
        return text


def load_fernet_key(environ: Mapping[str, str], name: str) -> Fernet:
    """The Fernet key held by the variable ``name`` of ``environ`` (the caller's environment).

    nextcloud-mcp-server encrypts with exactly one key (``TOKEN_ENCRYPTION_KEY``), so a value
    with a comma is refused rather than read as a key ring. Messages name the variable, never
    its value.
    """
    if not _ENV_NAME.fullmatch(name):
        raise ImportKeyError(f"{name!r} is not an environment variable name")
    value = environ.get(name)
    if value is None:
        raise ImportKeyError(f"{name} is not set: it should hold the store's Fernet key")
    value = value.strip()
    if not value:
        raise ImportKeyError(f"{name} is empty: it should hold the store's Fernet key")
    if "," in value:
        raise ImportKeyError(
            f"{name} holds several keys: nextcloud-mcp-server encrypts with a single key "
            "(its TOKEN_ENCRYPTION_KEY)"
        )
    try:
        return Fernet(value.encode())
    except (ValueError, TypeError):
        raise ImportKeyError(
            f"{name} is not a Fernet key (32 bytes in url-safe base64, 44 characters)"
        ) from None


# --- classification: pure functions of one row ---------------------------------------------


def _usable_user(value: object) -> str | None:
    if (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_USER_LENGTH
        and all(ch.isprintable() and not ch.isspace() for ch in value)
    ):
        return value
    return None


def _is_refresh_token(text: str) -> bool:
    # RFC 6749 appendix A.17: refresh-token = 1*VSCHAR, VSCHAR = %x20-7E.
    return bool(text.strip()) and all(0x20 <= ord(ch) <= 0x7E for ch in text)


def _is_scope_token(text: str) -> bool:
    # RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
    return bool(text) and all(0x21 <= ord(ch) <= 0x7E and ch not in ('"', "\\") for ch in text)


def _decrypt(fernet: Fernet, ciphertext: object) -> bytes | None:
    if isinstance(ciphertext, memoryview | bytearray):
        ciphertext = bytes(ciphertext)
    if not isinstance(ciphertext, bytes | str) or not ciphertext:
        return None
    try:
        return fernet.decrypt(ciphertext)
    except InvalidToken:
        return None


def _scopes(raw: object) -> tuple[str, ...] | None:
    """The recorded scopes, () when none were recorded, ``None`` when the value is malformed."""
    if raw is None or raw == "":
        return ()
    if not isinstance(raw, str):
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, list) or not all(
        isinstance(item, str) and _is_scope_token(item) for item in data
    ):
        return None
    return tuple(dict.fromkeys(data))


def _expiry(raw: object) -> float | InvalidReason | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return InvalidReason.BAD_EXPIRY
    value = float(raw)
    return value if math.isfinite(value) else InvalidReason.BAD_EXPIRY


def classify(
    values: Sequence[object],
    cursor: ImportCursor,
    fernet: Fernet,
    *,
    now: float,
    require_offline_access: bool = True,
) -> SourceRow:
    """Judge one row: ``values`` are user_id, encrypted_token, expires_at, flow_type,
    token_audience, scopes, as read."""
    raw_user, ciphertext, raw_expiry, raw_flow, raw_audience, raw_scopes = values
    user = _usable_user(raw_user)

    def invalid(reason: InvalidReason) -> SourceRow:
        return SourceRow(cursor, RowStatus.INVALID, user=user, reason=reason)

    plaintext = _decrypt(fernet, ciphertext)
    if plaintext is None:
        return SourceRow(cursor, RowStatus.UNDECRYPTABLE, user=user)
    try:
        token = plaintext.decode("utf-8")
    except UnicodeDecodeError:
        return invalid(InvalidReason.BAD_TOKEN)
    if not _is_refresh_token(token):
        return invalid(InvalidReason.BAD_TOKEN)
    if raw_user is None or raw_user == "":
        return invalid(InvalidReason.MISSING_USER)
    if user is None:
        return invalid(InvalidReason.BAD_USER)
    if user in PLACEHOLDER_USERS:
        return invalid(InvalidReason.PLACEHOLDER_USER)
    if raw_flow is None:
        flow = SourceFlow.HYBRID
    elif raw_flow == "flow1":
        return invalid(InvalidReason.SIGN_IN_FLOW)
    elif isinstance(raw_flow, str) and raw_flow in _FLOWS:
        flow = SourceFlow(raw_flow)
    else:
        return invalid(InvalidReason.UNKNOWN_FLOW)
    if raw_audience is not None and raw_audience != "nextcloud":
        return invalid(InvalidReason.WRONG_AUDIENCE)
    scopes = _scopes(raw_scopes)
    if scopes is None:
        return invalid(InvalidReason.BAD_SCOPES)
    if scopes and require_offline_access and OFFLINE_ACCESS not in scopes:
        return invalid(InvalidReason.NO_OFFLINE_ACCESS)
    expires_at = _expiry(raw_expiry)
    if isinstance(expires_at, InvalidReason):
        return invalid(expires_at)
    if expires_at is not None and expires_at <= now:
        return invalid(InvalidReason.EXPIRED)
    grant = ImportedGrant(
        user=user,
        refresh_token=Secret(token),
        scopes=scopes,
        expires_at=expires_at,
        flow_type=flow,
        source_row_id=user,
    )
    return SourceRow(cursor, RowStatus.IMPORTABLE, user=user, grant=grant)


# --- the two databases ---------------------------------------------------------------------


class _Reader:
    """One read-only snapshot of the source table, in primary-key order."""

    dialect: str
    placeholder: str
    with_rowid: bool

    def columns(self) -> list[str]:
        raise NotImplementedError

    def query(self, sql: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def where(self, position: ImportCursor) -> tuple[str, list[object]]:
        if position.after_key is not None:
            return f"WHERE user_id > {self.placeholder}", [position.after_key]
        if position.after_null_rowid is not None:
            if not self.with_rowid:
                raise ImportSourceError("this cursor belongs to an SQLite source")
            return f"WHERE user_id IS NOT NULL OR rowid > {self.placeholder}", [
                position.after_null_rowid
            ]
        return "", []

    def order(self) -> str:
        # SQLite lets a TEXT primary key hold NULLs and sorts them first; rowid orders those.
        return "ORDER BY user_id, rowid" if self.with_rowid else "ORDER BY user_id"


class _SqliteReader(_Reader):
    dialect = "sqlite"
    placeholder = "?"
    with_rowid = True

    def __init__(self, path: str) -> None:
        if not path:
            raise ImportSourceError(
                "an SQLite URL names a file: sqlite:///relative or sqlite:////abs"
            )
        if not Path(path).is_file():
            raise ImportSourceError(f"no SQLite file at {path}")
        uri = f"{Path(path).resolve().as_uri()}?mode=ro"
        try:
            self.connection = sqlite3.connect(
                uri, uri=True, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT
            )
            # One read transaction: the count, the key check and the rows see the same table.
            self.connection.execute("BEGIN")
        except sqlite3.Error as exc:
            raise ImportSourceError(f"cannot open {path}: {exc}") from None

    def columns(self) -> list[str]:
        try:
            cursor = self.connection.execute(f"SELECT * FROM {TABLE} LIMIT 0")  # noqa: S608
        except sqlite3.Error as exc:
            raise ImportSourceError(f"cannot read {TABLE}: {exc}") from None
        return [column[0] for column in cursor.description]

    def query(self, sql: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        try:
            cursor = self.connection.execute(sql, params)
            while batch := cursor.fetchmany(FETCH_BATCH):
                yield from batch
        except sqlite3.Error as exc:
            raise ImportSourceError(f"cannot read {TABLE}: {exc}") from None

    def close(self) -> None:
        self.connection.close()


class _PostgresReader(_Reader):
    dialect = "postgresql"
    placeholder = "%s"
    with_rowid = False

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ImportSourceError(
                "a PostgreSQL source needs the 'import' extra: pip install 'consent-flow[import]'"
            ) from None
        self._psycopg = psycopg
        self._location = masked_url(url)
        self._password = urlsplit(url).password
        options: dict[str, Any] = {}
        if "connect_timeout=" not in urlsplit(url).query:
            options["connect_timeout"] = CONNECT_TIMEOUT
        try:
            self.connection: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(url, **options)
            # One snapshot for the count, the key check and the rows, and no way to write.
            self.connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self.connection.read_only = True
        except psycopg.Error as exc:
            self._fail("cannot connect to", exc)
        self._cursors = 0

    def _fail(self, what: str, exc: Exception) -> NoReturn:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self._password:
            message = message.replace(self._password, "***")
        raise ImportSourceError(f"{what} {self._location}: {message}") from None

    def columns(self) -> list[str]:
        try:
            with self.connection.cursor() as cursor:
                cursor.execute(f"SELECT * FROM {TABLE} LIMIT 0")  # noqa: S608
                return [column.name for column in cursor.description or ()]
        except self._psycopg.Error as exc:
            self._fail(f"cannot read {TABLE} at", exc)

    def query(self, sql: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        self._cursors += 1
        try:
            # A server-side cursor: rows arrive in batches, not all at once.
            with self.connection.cursor(name=f"consent_flow_import_{self._cursors}") as cursor:
                cursor.itersize = FETCH_BATCH
                cursor.execute(sql, params)
                yield from cursor
        except self._psycopg.Error as exc:
            self._fail(f"cannot read {TABLE} at", exc)

    def close(self) -> None:
        self.connection.close()


def _reader(url: str) -> _Reader:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ImportSourceError("a source is a URL: sqlite:///PATH or postgresql://...")
    # nextcloud-mcp-server's DATABASE_URL names a driver (sqlite+aiosqlite, postgresql+asyncpg).
    base = scheme.lower().split("+", 1)[0]
    if base == "sqlite":
        if not rest.startswith("/"):
            raise ImportSourceError("an SQLite URL has no host: sqlite:///PATH")
        return _SqliteReader(unquote(rest[1:].split("?", 1)[0]))
    if base in ("postgresql", "postgres"):
        return _PostgresReader(f"postgresql://{rest}")
    raise ImportSourceError(f"unsupported source scheme {scheme!r}: use sqlite:// or postgresql://")


class TokenStoreSource:
    """nextcloud-mcp-server's ``refresh_tokens`` table, read-only, as classified rows.

    Use as a context manager (or call :meth:`close`). Every method reads the same snapshot.
    """

    def __init__(
        self,
        url: str,
        fernet: Fernet,
        *,
        now: Callable[[], float] = time.time,
        require_offline_access: bool = True,
        key_check_sample: int = KEY_CHECK_SAMPLE,
    ) -> None:
        if key_check_sample < 1:
            raise ValueError("the key check samples at least one row")
        self._fernet = fernet
        self._now = now
        self._require_offline_access = require_offline_access
        self._sample = key_check_sample
        self.location = masked_url(url)
        self._reader = _reader(url)
        try:
            self._select = self._select_list()
        except BaseException:
            self._reader.close()
            raise
        log.info("import.source_opened", dialect=self._reader.dialect, location=self.location)

    def _select_list(self) -> str:
        present = set(self._reader.columns())
        missing = [name for name in _REQUIRED_COLUMNS if name not in present]
        if missing:
            raise ImportSourceError(
                f"{TABLE} has no {', '.join(missing)}: not a nextcloud-mcp-server token store"
            )
        optional = [name if name in present else f"NULL AS {name}" for name in _OPTIONAL_COLUMNS]
        rowid = "rowid" if self._reader.with_rowid else "NULL"
        return ", ".join([rowid, *_REQUIRED_COLUMNS, *optional])

    @property
    def dialect(self) -> str:
        return self._reader.dialect

    def count(self, after: ImportCursor = START) -> int:
        """How many rows lie past ``after``."""
        where, params = self._reader.where(after)
        for (number,) in self._reader.query(f"SELECT count(*) FROM {TABLE} {where}", params):  # noqa: S608
            return int(number)
        return 0

    def check_key(self, after: ImportCursor = START) -> FernetKeyCheck:
        """Decrypt the first ciphertexts past ``after``; raise :class:`WrongFernetKey` if none
        of them decrypts. Rows without a ciphertext are not sampled."""
        where, params = self._reader.where(after)
        sql = (
            f"SELECT encrypted_token FROM {TABLE} {where} {self._reader.order()} "  # noqa: S608
            f"LIMIT {int(self._sample)}"
        )
        sampled = decrypted = 0
        for (ciphertext,) in self._reader.query(sql, params):
            # SQLite keeps whatever was written: only non-empty text or bytes can be a token.
            if not isinstance(ciphertext, bytes | str | memoryview) or len(ciphertext) == 0:
                continue
            sampled += 1
            if _decrypt(self._fernet, ciphertext) is not None:
                decrypted += 1
        if sampled and not decrypted:
            log.error("import.key_wrong", location=self.location, sampled=sampled)
            raise WrongFernetKey(
                f"none of the first {sampled} tokens in {self.location} decrypts with this key: "
                "it is not the store's TOKEN_ENCRYPTION_KEY; nothing was imported"
            )
        log.info("import.key_checked", sampled=sampled, decrypted=decrypted)
        return FernetKeyCheck(sampled=sampled, decrypted=decrypted)

    def rows(
        self,
        after: ImportCursor = START,
        *,
        progress: Callable[[ImportProgress], None] | None = None,
    ) -> Iterator[SourceRow]:
        """Every row past ``after``, classified, in primary-key order.

        The key check runs first, so a wrong key raises before the first row is handed out.
        ``progress`` hears ``(0, total)`` at the start and again after the caller is done with
        each row.
        """
        self.check_key(after)
        total = self.count(after) if progress is not None else 0
        if progress is not None:
            progress(ImportProgress(0, total))
        where, params = self._reader.where(after)
        sql = f"SELECT {self._select} FROM {TABLE} {where} {self._reader.order()}"  # noqa: S608
        for done, values in enumerate(self._reader.query(sql, params), start=1):
            rowid, key = values[0], values[1]
            if key is None:
                cursor = ImportCursor(after_null_rowid=int(rowid))
            else:
                cursor = ImportCursor(after_key=bytes(key) if isinstance(key, memoryview) else key)
            row = classify(
                values[1:],
                cursor,
                self._fernet,
                now=self._now(),
                require_offline_access=self._require_offline_access,
            )
            if row.status is RowStatus.UNDECRYPTABLE:
                log.warning("import.row_undecryptable", user=row.user)
            elif row.status is RowStatus.INVALID:
                log.warning("import.row_invalid", user=row.user, reason=row.reason)
            yield row
            if progress is not None:
                progress(ImportProgress(done, max(total, done)))

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_source(
    url: str,
    fernet: Fernet,
    *,
    now: Callable[[], float] = time.time,
    require_offline_access: bool = True,
    key_check_sample: int = KEY_CHECK_SAMPLE,
) -> TokenStoreSource:
    """Open ``url`` (``sqlite:///PATH``, ``postgresql://...``, or nextcloud-mcp-server's own
    ``DATABASE_URL`` with its driver suffix) read-only."""
    return TokenStoreSource(
        url,
        fernet,
        now=now,
        require_offline_access=require_offline_access,
        key_check_sample=key_check_sample,
    )
