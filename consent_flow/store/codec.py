"""The storage codec: the one place that knows how a record lies in Redis.

A user's record is a hash of short text fields (its ciphertext kept as v1 text) beside two keys
of sealed binary values (the tokens, and the tokens still to revoke at the provider: apart, they
leave the hash small enough for Redis's compact encoding). The engine and the core speak record
attributes (:class:`~consent_flow.core.records.ConsentRecord`) and changes to them
(:class:`~consent_flow.core.records.Change`); this module turns a change into field writes and a
hash back into a record. The Lua scripts in ``store/lua`` are the only other readers of these
names.

Times are written as ``repr`` of seconds since the epoch (Redis's time); an attribute cleared or
set to None is a field deleted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consent_flow.core.records import Change, ConsentRecord, ProviderRevocation
from consent_flow.core.table import State

__all__ = [
    "CIPHER_FIELDS",
    "SEALED_KEYS",
    "HashWrites",
    "field_name",
    "hash_writes",
    "record_from_hash",
]

VERSION = "v"
STATE = "state"
SINCE = "since"
ACTOR = "actor"
REASON = "reason"

# Record attribute -> hash field.
FIELDS: dict[str, str] = {
    "since": SINCE,
    "reason": REASON,
    "actor": ACTOR,
    "subject": "sub",
    "scopes": "scopes",
    "scopes_missing": "smiss",
    "expires_at": "exp",
    "refresh_expires_at": "rexp",
    "session": "sess",
    "session_id": "sid",
    "session_digest": "shash",
    "session_expires_at": "sexp",
    "session_claim": "claimed",
    "requested_scopes": "rscopes",
    "next_refresh_at": "next",
    "last_refresh_at": "lastref",
    "refresh_failures": "fails",
    "last_refresh_error": "referr",
    "failing_since": "failsince",
    "last_failure_at": "failat",
    "provider_revocation": "provrev",
    "revocation_attempts": "rvktries",
    "inflight": "inflight",
    "imported_at": "impat",
}
# Record attribute -> the suffix of the key beside the hash that holds it (binary ciphertext).
SEALED_KEYS: dict[str, str] = {"tokens": "tok", "revocation_pending": "rvk"}
# Hash fields that hold ciphertext (v1 text): counted per key id with the sealed keys.
CIPHER_FIELDS = (FIELDS["session"],)

_TIMES = frozenset(
    {
        "since",
        "expires_at",
        "refresh_expires_at",
        "session_expires_at",
        "next_refresh_at",
        "last_refresh_at",
        "failing_since",
        "last_failure_at",
        "inflight",
        "imported_at",
    }
)
_COUNTS = frozenset({"refresh_failures", "revocation_attempts"})
_SCOPES = frozenset({"scopes", "scopes_missing", "requested_scopes"})  # space separated


def field_name(attribute: str) -> str:
    """The hash field of a record attribute (for the store's own commands and scripts)."""
    try:
        return FIELDS[attribute]
    except KeyError:
        raise ValueError(f"{attribute!r} is not a record attribute kept in the hash") from None


def _text(attribute: str, value: Any) -> str:
    if attribute in _TIMES:
        return repr(float(value))
    if attribute in _COUNTS:
        return str(int(value))
    if attribute in _SCOPES:
        return " ".join(value)
    if isinstance(value, ProviderRevocation):
        return value.value
    if not isinstance(value, str):
        raise ValueError(f"{attribute} is not text: {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class HashWrites:
    """What one change writes: hash fields set and deleted, sealed keys set and wiped (by their
    key suffix)."""

    set: dict[str, str]
    delete: tuple[str, ...]
    seal: dict[str, bytes]
    wipe: tuple[str, ...]


def hash_writes(change: Change) -> HashWrites:
    """The Redis writes of ``change`` (the version aside: the commit script counts it)."""
    values: dict[str, Any] = dict.fromkeys(change.clear)
    values.update(change.fields)
    fields = {STATE: change.to_state.value}
    if change.moves:
        fields[SINCE] = repr(change.at)
    if change.record_history:
        fields[ACTOR] = change.actor
        values["reason"] = change.reason or None
    deletes: list[str] = []
    seal: dict[str, bytes] = {}
    wipe: list[str] = []
    for attribute, value in values.items():
        if attribute in SEALED_KEYS:
            if value is None:
                wipe.append(SEALED_KEYS[attribute])
            elif isinstance(value, bytes):
                seal[SEALED_KEYS[attribute]] = value
            else:
                raise ValueError(f"{attribute} is sealed bytes, not {type(value).__name__}")
        elif value is None or (attribute in _SCOPES and not value):
            deletes.append(field_name(attribute))
        else:
            name = field_name(attribute)
            fields[name] = _text(attribute, value)
    return HashWrites(fields, tuple(d for d in deletes if d not in fields), seal, tuple(wipe))


def _float(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _revocation(value: str | None) -> ProviderRevocation | None:
    try:
        return ProviderRevocation(value) if value else None
    except ValueError:
        return None  # written by a later version: shown as unknown, never fails a read


def record_from_hash(
    user: str, data: Mapping[str, str], sealed: Mapping[str, bytes | None] | None = None
) -> ConsentRecord:
    """The record from its hash and its sealed keys (by key suffix: ``tok``, ``rvk``)."""
    if not data:
        return ConsentRecord(user=user)
    held = sealed or {}
    values: dict[str, Any] = {}
    for attribute, name in FIELDS.items():
        raw = data.get(name)
        if attribute in _TIMES:
            values[attribute] = _float(raw)
        elif attribute in _COUNTS:
            values[attribute] = int(raw or 0)
        elif attribute in _SCOPES:
            values[attribute] = tuple((raw or "").split())
        elif attribute == "provider_revocation":
            values[attribute] = _revocation(raw)
        else:
            values[attribute] = raw or None
    for attribute, suffix in SEALED_KEYS.items():
        values[attribute] = held.get(suffix) or None
    return ConsentRecord(
        user=user,
        state=State(data.get(STATE, State.UNPROVISIONED.value)),
        version=int(data.get(VERSION, "0")),
        **values,
    )
