"""The source side of `consent-flow import`: nextcloud-mcp-server's token store, read for real.

Each store is built the way that project builds it (tests/import_stores.py): in an SQLite file,
and in a PostgreSQL database of its own, created and dropped. An unreachable server fails the
run: the PostgreSQL path must not pass by being skipped.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet
from import_stores import PG_PASSWORD, Store, postgres_store, sqlite_store
from structlog.testing import capture_logs

from consent_flow.core.records import check_user
from consent_flow.errors import ConsentError
from consent_flow.store.import_source import (
    START,
    ImportCursor,
    ImportKeyError,
    ImportProgress,
    ImportSourceError,
    InvalidReason,
    Outcome,
    RowStatus,
    Secret,
    SourceFlow,
    Summary,
    WrongFernetKey,
    _usable_user,
    load_fernet_key,
    open_source,
)

NOW = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    key = Fernet.generate_key()
    if request.param == "sqlite":
        yield from sqlite_store(tmp_path, key)
    else:
        yield from postgres_store(key)


@pytest.fixture
def sqlite_only(tmp_path: Path) -> Iterator[Store]:
    yield from sqlite_store(tmp_path, Fernet.generate_key())


@pytest.fixture
def postgres_only() -> Iterator[Store]:
    yield from postgres_store(Fernet.generate_key())


FULL_SCOPES = ["openid", "profile", "email", "offline_access", "notes.read", "calendar:write"]


def fill(store: Store) -> dict[str, tuple[RowStatus, InvalidReason | None]]:
    """One row of every kind; returns what each user's row should come out as."""
    # flow 2 records the scopes the provider granted (colon scopes predate migration 004)
    store.store_refresh_token("alice", "rt-alice-0001", flow_type="flow2", scopes=FULL_SCOPES)
    # the hybrid callback records no scopes and no expiry
    store.store_refresh_token("bob@example.org", "rt-bob-0002")
    store.store_refresh_token(
        "carol", "rt-carol-0003", flow_type="flow2", scopes=["offline_access"],
        expires_at=int(NOW) + 3600,
    )  # fmt: skip
    store.store_refresh_token("dave", "rt-dave-0004")
    store.set_column("dave", "encrypted_token", b"gAAAAABgarbled-not-a-fernet-token")
    store.store_refresh_token("erin", "rt-erin-0005", key=Fernet.generate_key())
    store.store_refresh_token("", "rt-empty-user-0006")
    store.store_refresh_token("unknown", "rt-unknown-0007")
    store.store_refresh_token("has space", "rt-space-0008")
    store.store_refresh_token("frank", "rt-frank-0009", flow_type="flow2")
    store.set_column("frank", "scopes", "openid offline_access")
    store.store_refresh_token("grace", "rt-grace-0010", flow_type="flow1")
    store.store_refresh_token("heidi", "rt-heidi-0011", token_audience="mcp-server")
    store.store_refresh_token("ivan", "rt-ivan-0012", expires_at=int(NOW) - 1)
    store.store_refresh_token("judy", "rt-judy-0013", flow_type="flow2", scopes=["notes.read"])
    store.store_refresh_token("mallory", "rt-mallory-0014", flow_type="flow3")
    store.store_refresh_token("oscar", "line\nbreak")
    store.store_refresh_token("peggy", "rt-peggy-0015", flow_type="flow2", scopes=["openid"])
    store.set_column("peggy", "scopes", json.dumps(["openid", 7]))
    store.store_refresh_token("trent", "rt-trent-0016")
    store.set_column("trent", "flow_type", None)
    store.set_column("trent", "token_audience", None)
    ok, bad = RowStatus.IMPORTABLE, RowStatus.INVALID
    return {
        "alice": (ok, None),
        "bob@example.org": (ok, None),
        "carol": (ok, None),
        "dave": (RowStatus.UNDECRYPTABLE, None),
        "erin": (RowStatus.UNDECRYPTABLE, None),
        "": (bad, InvalidReason.MISSING_USER),
        "unknown": (bad, InvalidReason.PLACEHOLDER_USER),
        "has space": (bad, InvalidReason.BAD_USER),
        "frank": (bad, InvalidReason.BAD_SCOPES),
        "grace": (bad, InvalidReason.SIGN_IN_FLOW),
        "heidi": (bad, InvalidReason.WRONG_AUDIENCE),
        "ivan": (bad, InvalidReason.EXPIRED),
        "judy": (bad, InvalidReason.NO_OFFLINE_ACCESS),
        "mallory": (bad, InvalidReason.UNKNOWN_FLOW),
        "oscar": (bad, InvalidReason.BAD_TOKEN),
        "peggy": (bad, InvalidReason.BAD_SCOPES),
        "trent": (ok, None),
    }


def test_every_row_comes_out_classified_with_its_values(store: Store) -> None:
    expected = fill(store)
    with open_source(store.url, Fernet(store.key), now=lambda: NOW) as source:
        assert source.dialect == store.dialect
        assert source.count() == len(expected)
        rows = list(source.rows())

    assert [row.cursor.after_key for row in rows] == store.users_in_key_order()
    assert len(rows) == len(expected)
    assert {row.cursor.after_key: (row.status, row.reason) for row in rows} == expected
    grants = {row.grant.user: row.grant for row in rows if row.grant is not None}
    assert set(grants) == {user for user, (status, _) in expected.items() if status == "importable"}
    for user, grant in grants.items():
        assert grant.refresh_token.reveal() == store.tokens[user]
        assert grant.source_row_id == user
    assert grants["alice"].scopes == tuple(FULL_SCOPES)
    assert grants["alice"].flow_type is SourceFlow.FLOW2
    assert grants["alice"].expires_at is None
    assert grants["bob@example.org"].scopes == ()
    assert grants["bob@example.org"].flow_type is SourceFlow.HYBRID
    assert grants["carol"].expires_at == NOW + 3600
    assert isinstance(grants["carol"].expires_at, float)
    assert grants["trent"].flow_type is SourceFlow.HYBRID  # NULL reads as the project reads it
    for row in rows:
        assert (row.grant is not None) == (row.status is RowStatus.IMPORTABLE)
        assert (row.reason is not None) == (row.status is RowStatus.INVALID)
        assert row.user == (row.cursor.after_key if _usable_user(row.cursor.after_key) else None)


def test_offline_access_can_be_waived_for_providers_that_omit_it(store: Store) -> None:
    store.store_refresh_token("judy", "rt-judy", flow_type="flow2", scopes=["notes.read"])
    with open_source(store.url, Fernet(store.key), require_offline_access=False) as source:
        (row,) = source.rows()
    assert row.grant is not None and row.grant.scopes == ("notes.read",)


def test_a_wrong_key_is_detected_before_any_row_is_handed_out(store: Store) -> None:
    fill(store)
    heard: list[ImportProgress] = []
    with capture_logs() as logs, open_source(store.url, Fernet(Fernet.generate_key())) as source:
        with pytest.raises(WrongFernetKey) as caught:
            source.check_key()
        rows = source.rows(progress=heard.append)
        with pytest.raises(WrongFernetKey):
            next(rows)
    assert heard == []
    assert caught.value.code == "import_wrong_key"
    assert isinstance(caught.value, ConsentError)
    assert "nothing was imported" in str(caught.value)
    assert [entry["event"] for entry in logs].count("import.key_wrong") == 2
    assert not any(entry["event"].startswith("import.row_") for entry in logs)


def test_a_right_key_passes_the_check_despite_garbled_rows(store: Store) -> None:
    fill(store)
    with open_source(store.url, Fernet(store.key), key_check_sample=3) as source:
        check = source.check_key()
    # the empty user, alice and bob sort first: all three decrypt
    assert (check.sampled, check.decrypted) == (3, 3)
    with open_source(store.url, Fernet(store.key), key_check_sample=2) as source:
        check = source.check_key(ImportCursor(after_key="dave"))  # erin (foreign key), frank
    assert (check.sampled, check.decrypted) == (2, 1)


def test_a_store_of_only_garbled_rows_reads_as_a_wrong_key(store: Store) -> None:
    store.store_refresh_token("dave", "rt-dave")
    store.set_column("dave", "encrypted_token", b"gAAAAABgarbled")
    with open_source(store.url, Fernet(store.key)) as source, pytest.raises(WrongFernetKey):
        next(source.rows())


def test_an_empty_store_reads_as_nothing(store: Store) -> None:
    heard: list[ImportProgress] = []
    with open_source(store.url, Fernet(store.key)) as source:
        assert list(source.rows(progress=heard.append)) == []
    assert heard == [ImportProgress(0, 0)]


def test_resuming_from_a_cursor_yields_the_rest_exactly_once(store: Store) -> None:
    expected = fill(store)
    seen: list[object] = []
    with open_source(store.url, Fernet(store.key), now=lambda: NOW) as source:
        rows = source.rows()
        for _ in range(5):
            row = next(rows)
            seen.append(row.cursor.after_key)
        saved = row.cursor.to_json()  # what a caller persists after dealing with the row
        rows.close()
    with open_source(store.url, Fernet(store.key), now=lambda: NOW) as source:
        after = ImportCursor.from_json(saved)
        assert source.count(after) == len(expected) - 5
        rest = list(source.rows(after))
    seen += [row.cursor.after_key for row in rest]
    assert seen == store.users_in_key_order()
    assert sorted(seen) == sorted(expected)
    with open_source(store.url, Fernet(store.key)) as source:
        assert list(source.rows(rest[-1].cursor)) == []


def test_sqlite_null_users_are_invalid_and_resume_exactly_once(sqlite_only: Store) -> None:
    store = sqlite_only
    # SQLite lets a TEXT primary key hold NULL (and blobs): a damaged store can have both.
    store.store_refresh_token(None, "rt-null-1")
    store.store_refresh_token(None, "rt-null-2")
    store.store_refresh_token("zoe", "rt-zoe")
    store.store_refresh_token("blob", "rt-blob")
    store.set_column("blob", "user_id", b"\x00\xffblob")
    store.store_refresh_token("zz-number", "rt-number")
    store.set_column("zz-number", "encrypted_token", 12345)
    with open_source(store.url, Fernet(store.key)) as source:
        rows = list(source.rows())
    assert [(row.status, row.reason) for row in rows] == [
        (RowStatus.INVALID, InvalidReason.MISSING_USER),
        (RowStatus.INVALID, InvalidReason.MISSING_USER),
        (RowStatus.IMPORTABLE, None),  # text sorts before blobs in SQLite
        (RowStatus.UNDECRYPTABLE, None),  # a number where the ciphertext belongs
        (RowStatus.INVALID, InvalidReason.BAD_USER),
    ]
    for index, row in enumerate(rows):
        cursor = ImportCursor.from_json(row.cursor.to_json())
        assert cursor == row.cursor
        with open_source(store.url, Fernet(store.key)) as source:
            assert [r.cursor for r in source.rows(cursor)] == [r.cursor for r in rows[index + 1 :]]


def test_progress_is_reported_after_each_row(store: Store) -> None:
    expected = fill(store)
    heard: list[ImportProgress] = []
    handled: list[int] = []

    def progress(update: ImportProgress) -> None:
        heard.append(update)
        # the bar moves once the caller is done with the row, not when it is read
        assert update.done == len(handled)

    with open_source(store.url, Fernet(store.key)) as source:
        for row in source.rows(progress=progress):
            handled.append(1)
            assert row.status in RowStatus
    total = len(expected)
    assert heard == [ImportProgress(done, total) for done in range(total + 1)]


def test_no_secret_reaches_a_log_line_a_repr_or_a_message(store: Store) -> None:
    fill(store)
    secrets_ = [*store.tokens.values(), store.key.decode(), PG_PASSWORD]
    texts: list[str] = []
    with capture_logs() as logs, open_source(store.url, Fernet(store.key)) as source:
        texts.append(source.location)
        summary = Summary()
        for row in source.rows():
            texts += [repr(row), str(row)]
            if row.grant is not None:
                texts += [repr(row.grant), str(row.grant)]
                summary.record(Outcome.IMPORTED)
            else:
                summary.record_row(row)
        texts += [str(summary), json.dumps(summary.as_dict())]
    with capture_logs() as more, open_source(store.url, Fernet(Fernet.generate_key())) as source:
        with pytest.raises(WrongFernetKey) as caught:
            source.check_key()
        texts.append(str(caught.value))
    texts += [repr(entry) for entry in [*logs, *more]]
    assert any(entry["event"] == "import.row_invalid" for entry in logs)
    assert any(entry["event"] == "import.row_undecryptable" for entry in logs)
    for text in texts:
        for secret in secrets_:
            assert secret not in text
        assert "gAAAAA" not in text  # no ciphertext either


def test_secret_hides_its_value_and_refuses_pickling() -> None:
    secret = Secret("rt-very-secret")
    assert "rt-very-secret" not in repr(secret) + str(secret) + f"{secret}"
    assert secret.reveal() == "rt-very-secret"
    assert secret == Secret("rt-very-secret")
    assert secret != Secret("rt-other")
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        hash(secret)


def test_summary_counts_each_outcome() -> None:
    summary = Summary()
    summary.record(Outcome.IMPORTED)
    summary.record(Outcome.IMPORTED)
    summary.record(Outcome.SKIPPED_ALREADY_PROVISIONED)
    summary.record(Outcome.UNDECRYPTABLE)
    summary.record(Outcome.INVALID, InvalidReason.EXPIRED)
    summary.record(Outcome.INVALID, InvalidReason.BAD_SCOPES)
    summary.record(Outcome.INVALID, InvalidReason.BAD_SCOPES)
    assert summary.total == 7
    assert summary.as_dict() == {
        "imported": 2,
        "skipped_already_provisioned": 1,
        "skipped_pending": 0,
        "skipped_ended_after_import": 0,
        "undecryptable": 1,
        "invalid": 3,
        "invalid_by_reason": {"bad_scopes": 2, "expired": 1},
    }
    assert str(summary) == (
        "imported 2, skipped (already provisioned) 1, undecryptable 1, invalid 3 "
        "(bad_scopes 2, expired 1)"
    )
    assert Summary.from_dict(json.loads(json.dumps(summary.as_dict()))) == summary
    summary.record(Outcome.SKIPPED_PENDING)
    assert "skipped (authorization under way) 1" in str(summary)
    with pytest.raises(ImportSourceError):
        Summary.from_dict({"invalid_by_reason": {"no_such_reason": 1}})
    with pytest.raises(ValueError, match="reason"):
        summary.record(Outcome.INVALID)
    with pytest.raises(ValueError, match="reason"):
        summary.record(Outcome.IMPORTED, InvalidReason.EXPIRED)


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({}, "is not set"),
        ({"NC_KEY": "  "}, "is empty"),
        ({"NC_KEY": "not-a-key-at-all"}, "is not a Fernet key"),
        ({"NC_KEY": "c2hvcnQ="}, "is not a Fernet key"),
        (
            {"NC_KEY": f"{Fernet.generate_key().decode()},{Fernet.generate_key().decode()}"},
            "single",
        ),
    ],
)
def test_a_bad_key_variable_is_named_and_its_value_never_shown(
    environ: dict[str, str], problem: str
) -> None:
    with pytest.raises(ImportKeyError, match=problem) as caught:
        load_fernet_key(environ, "NC_KEY")
    assert str(caught.value).startswith("NC_KEY ")
    assert caught.value.code == "import_key_invalid"
    for value in environ.values():
        if value.strip():
            assert value.strip() not in str(caught.value)


def test_a_key_variable_is_read_like_the_project_reads_it() -> None:
    key = Fernet.generate_key()
    fernet = load_fernet_key({"TOKEN_ENCRYPTION_KEY": key.decode() + "\n"}, "TOKEN_ENCRYPTION_KEY")
    assert fernet.decrypt(Fernet(key).encrypt(b"x")) == b"x"
    with pytest.raises(ImportKeyError, match="not an environment variable name"):
        load_fernet_key({}, "1BAD-NAME")


def test_the_projects_database_url_is_accepted_with_its_driver(store: Store) -> None:
    store.store_refresh_token("alice", "rt-alice", flow_type="flow2", scopes=FULL_SCOPES)
    scheme = "sqlite+aiosqlite" if store.dialect == "sqlite" else "postgresql+asyncpg"
    url = scheme + store.url[store.url.index("://") :]
    with open_source(url, Fernet(store.key)) as source:
        (row,) = source.rows()
    assert row.grant is not None and row.grant.user == "alice"


def test_the_sqlite_source_is_opened_read_only(sqlite_only: Store) -> None:
    store = sqlite_only
    store.store_refresh_token("alice", "rt-alice")
    path = Path(store.url.removeprefix("sqlite:///"))
    before = path.read_bytes()
    with open_source(store.url, Fernet(store.key)) as source:
        list(source.rows())
        connection = source._reader.connection  # type: ignore[attr-defined]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            connection.execute("DELETE FROM refresh_tokens")
    assert path.read_bytes() == before


def test_the_postgres_source_cannot_write(postgres_only: Store) -> None:
    store = postgres_only
    store.store_refresh_token("alice", "rt-alice")
    with open_source(store.url, Fernet(store.key)) as source:
        connection = source._reader.connection  # type: ignore[attr-defined]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            connection.execute("DELETE FROM refresh_tokens")


def test_an_older_store_without_the_progressive_consent_columns_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    key = Fernet.generate_key()
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE refresh_tokens (user_id TEXT PRIMARY KEY, encrypted_token BLOB NOT NULL)"
        )
        connection.execute(
            "INSERT INTO refresh_tokens VALUES (?, ?)", ("alice", Fernet(key).encrypt(b"rt-old"))
        )
    connection.close()
    with open_source(f"sqlite:///{path}", Fernet(key)) as source:
        (row,) = source.rows()
    assert row.grant is not None
    assert (row.grant.scopes, row.grant.expires_at, row.grant.flow_type) == (
        (),
        None,
        SourceFlow.HYBRID,
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("tokens.db", "a source is a URL"),
        ("mysql://host/db", "unsupported source scheme"),
        ("sqlite://host/tokens.db", "has no host"),
        ("sqlite:///", "names a file"),
        ("sqlite:////nonexistent/tokens.db", "no SQLite file"),
    ],
)
def test_a_source_that_cannot_be_read_is_a_clear_error(url: str, problem: str) -> None:
    with pytest.raises(ImportSourceError, match=problem):
        open_source(url, Fernet(Fernet.generate_key()))


def test_a_database_that_is_not_the_token_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE refresh_tokens (token_hash TEXT, user_id TEXT)")
    connection.close()
    with pytest.raises(ImportSourceError, match="no encrypted_token"):
        open_source(f"sqlite:///{path}", Fernet(Fernet.generate_key()))
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(ImportSourceError, match="no such table"):
        open_source(f"sqlite:///{tmp_path / 'empty.db'}", Fernet(Fernet.generate_key()))


def test_an_unreachable_postgres_is_an_error_without_the_password() -> None:
    with socket_closed_port() as port:
        url = f"postgresql://importer:{PG_PASSWORD}@127.0.0.1:{port}/tokens?connect_timeout=3"
        with pytest.raises(ImportSourceError) as caught:
            open_source(url, Fernet(Fernet.generate_key()))
    assert PG_PASSWORD not in str(caught.value)
    assert f"postgresql://importer:***@127.0.0.1:{port}/tokens" in str(caught.value)


def test_a_postgres_database_without_the_table_is_refused(postgres_only: Store) -> None:
    store = postgres_only
    store.execute("DROP TABLE refresh_tokens", ())
    with pytest.raises(ImportSourceError, match="refresh_tokens") as caught:
        open_source(store.url, Fernet(store.key))
    assert PG_PASSWORD not in str(caught.value)


def test_cursors_survive_a_round_trip_and_reject_garbage() -> None:
    for cursor in (
        START,
        ImportCursor(after_key="alice"),
        ImportCursor(after_key='é"{}'),
        ImportCursor(after_key=b"\x00\xff"),
        ImportCursor(after_null_rowid=3),
    ):
        assert ImportCursor.from_json(cursor.to_json()) == cursor
    for garbage in ("", "[]", '{"after": 3}', '{"after_null_rowid": "3"}', '{"x": 1}', "{"):
        with pytest.raises(ImportSourceError, match="not an import cursor"):
            ImportCursor.from_json(garbage)
    with pytest.raises(ImportSourceError):
        ImportCursor(after_key="a", after_null_rowid=1)


def test_source_urls_hide_only_the_password() -> None:
    from consent_flow.store.connection import masked_url as redact_url

    assert redact_url("postgresql://u:p%40ss@db.example:5433/x?sslmode=require") == (
        "postgresql://u:***@db.example:5433/x?sslmode=require"
    )
    assert redact_url("postgresql://u@db/x") == "postgresql://u@db/x"
    assert redact_url("sqlite:////data/tokens.db") == "sqlite:////data/tokens.db"


@pytest.mark.parametrize(
    "user",
    ["alice", "a" * 255, "a" * 256, "", " ", "a b", "tab\there", "nul\x00", "ü", "x\u200by", "é"],
)
def test_the_user_rule_is_the_engines(user: str) -> None:
    try:
        check_user(user)
        accepted = True
    except ConsentError:
        accepted = False
    assert (_usable_user(user) is not None) == accepted


class socket_closed_port:
    """A local port that nothing listens on, for the length of a with block."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        return None
