"""nextcloud-mcp-server's token store, built the way that project builds it, for the import tests.

Its own DDL (the SQLite one of migration 001 that existing SQLite stores carry, and the
PostgreSQL one its SQLAlchemy migration emits) and its own write,
``Fernet(key).encrypt(token.encode())`` with ``json.dumps(scopes) if scopes else None`` and whole
epoch seconds. PostgreSQL runs on 127.0.0.1:5432 (``CONSENT_TEST_POSTGRES`` overrides); a store
there is a database of its own, created and dropped. An unreachable server fails the run: the
PostgreSQL path must not pass by being skipped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

# user[:password]@host:port of a server where that user may create databases
POSTGRES = os.environ.get("CONSENT_TEST_POSTGRES", "postgres@127.0.0.1:5432")
_CREDENTIALS, _, PG_HOST = POSTGRES.rpartition("@")
PG_USER, _, _password = _CREDENTIALS.partition(":")
# Under trust authentication the server ignores it: it is there to show it never gets out.
PG_PASSWORD = _password or "pg-pass-never-shown-7Q"
PG_ADMIN = f"postgresql://{PG_USER}:{PG_PASSWORD}@{PG_HOST}"

# nextcloud_mcp_server/alembic/versions/20251217_2200_001_initial_schema.py, as first written
# (raw SQL): the schema of every SQLite store, which skip the later rewrite of the migration.
SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS refresh_tokens (
    user_id TEXT PRIMARY KEY,
    encrypted_token BLOB NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    flow_type TEXT DEFAULT 'hybrid',
    token_audience TEXT DEFAULT 'nextcloud',
    provisioned_at INTEGER,
    provisioning_client_id TEXT,
    scopes TEXT,
    user_profile TEXT,
    profile_cached_at INTEGER
)
"""
# What the rewritten migration (op.create_table with sa.Text, sa.LargeBinary, sa.BigInteger)
# emits on PostgreSQL.
POSTGRES_DDL = """
CREATE TABLE refresh_tokens (
    user_id TEXT NOT NULL,
    encrypted_token BYTEA NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    flow_type TEXT DEFAULT 'hybrid',
    token_audience TEXT DEFAULT 'nextcloud',
    provisioned_at BIGINT,
    provisioning_client_id TEXT,
    scopes TEXT,
    user_profile TEXT,
    profile_cached_at BIGINT,
    PRIMARY KEY (user_id)
)
"""
# auth/storage.py, store_refresh_token.
UPSERT = """
INSERT INTO refresh_tokens
(user_id, encrypted_token, expires_at, created_at, updated_at,
 flow_type, token_audience, provisioned_at, provisioning_client_id, scopes)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (user_id) DO UPDATE SET
    encrypted_token = EXCLUDED.encrypted_token,
    expires_at = EXCLUDED.expires_at,
    updated_at = EXCLUDED.updated_at,
    flow_type = EXCLUDED.flow_type,
    token_audience = EXCLUDED.token_audience,
    provisioned_at = EXCLUDED.provisioned_at,
    provisioning_client_id = EXCLUDED.provisioning_client_id,
    scopes = EXCLUDED.scopes
"""


@dataclass
class Store:
    """A token store under construction, written as nextcloud-mcp-server writes it."""

    url: str
    dialect: str
    key: bytes
    execute: Callable[[str, tuple[Any, ...]], None]
    query: Callable[[str], list[tuple[Any, ...]]]
    tokens: dict[str, str] = field(default_factory=dict)

    def users_in_key_order(self) -> list[object]:
        """The primary keys in the database's own order (its collation, not Python's)."""
        return [user for (user,) in self.query("SELECT user_id FROM refresh_tokens ORDER BY 1")]

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def store_refresh_token(
        self,
        user_id: str | None,
        refresh_token: str,
        expires_at: int | None = None,
        flow_type: str = "hybrid",
        token_audience: str = "nextcloud",  # noqa: S107
        provisioning_client_id: str | None = None,
        scopes: list[str] | None = None,
        key: bytes | None = None,
    ) -> None:
        encrypted_token = Fernet(key or self.key).encrypt(refresh_token.encode())
        now = int(time.time())
        scopes_json = json.dumps(scopes) if scopes else None
        provisioned_at = now if flow_type == "flow2" else None
        self.execute(
            self.sql(UPSERT),
            (
                user_id,
                encrypted_token,
                expires_at,
                now,
                now,
                flow_type,
                token_audience,
                provisioned_at,
                provisioning_client_id,
                scopes_json,
            ),
        )
        if isinstance(user_id, str):
            self.tokens[user_id] = refresh_token

    def set_column(self, user_id: str, column: str, value: object) -> None:
        """A value the project itself would not write (a damaged or hand-edited row)."""
        sql = f"UPDATE refresh_tokens SET {column} = ? WHERE user_id = ?"  # noqa: S608
        self.execute(self.sql(sql), (value, user_id))


def sqlite_store(directory: Path, key: bytes) -> Iterator[Store]:
    path = directory / "tokens.db"
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(SQLITE_DDL)

    def execute(sql: str, params: tuple[Any, ...]) -> None:
        connection.execute(sql, params)

    def query(sql: str) -> list[tuple[Any, ...]]:
        return connection.execute(sql).fetchall()

    yield Store(f"sqlite:///{path}", "sqlite", key, execute, query)
    connection.close()


def postgres_admin() -> psycopg.Connection[tuple[Any, ...]]:
    try:
        return psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable as {PG_USER}@{PG_HOST} ({exc}); install and start it "
            "(Debian: apt-get install postgresql; pg_ctlcluster VERSION main start) and let "
            "that user in over TCP (trust, or CONSENT_TEST_POSTGRES=user:password@host:port)"
        )


def postgres_store(key: bytes) -> Iterator[Store]:
    name = f"cf_import_{uuid.uuid4().hex[:12]}"
    with postgres_admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        with psycopg.connect(f"{PG_ADMIN}/{name}", autocommit=True) as connection:
            connection.execute(POSTGRES_DDL)

            def execute(sql: str, params: tuple[Any, ...]) -> None:
                connection.execute(sql, params)

            def query(sql: str) -> list[tuple[Any, ...]]:
                return connection.execute(sql).fetchall()

            yield Store(f"{PG_ADMIN}/{name}", "postgresql", key, execute, query)
    finally:
        with postgres_admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
