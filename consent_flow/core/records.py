"""Plain data the engine passes around: a user's record, a change to it, a history entry."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from consent_flow.core.table import Event, Facts, State
from consent_flow.errors import ConsentError, InvalidScope

if TYPE_CHECKING:
    from consent_flow.queue.jobs import JobRef, QueuedJob

__all__ = [
    "CIPHER_FIELDS",
    "ON_DEMAND_COOLDOWN",
    "SEALED_KEYS",
    "Change",
    "CommitResult",
    "ConsentRecord",
    "HistoryEntry",
    "ProviderRevocation",
    "check_scopes",
    "check_user",
    "cooldown_reason",
    "guard_facts",
    "iso",
    "join_scopes",
    "revocation_note",
]

MAX_USER_LENGTH = 255  # OpenID Connect Core 2: a subject is at most 255 ASCII characters
MAX_REASON_LENGTH = 500
MAX_SCOPES_ASKED = 32  # scopes one request may ask for, beyond the provider's base scopes
MAX_SCOPE_LENGTH = 128
# After a failed refresh, on-demand refreshes leave the provider alone until the retry is due, and
# at least this long after the failure: a tool calling in a loop during an outage must not hammer.
ON_DEMAND_COOLDOWN = 5.0


class ProviderRevocation(StrEnum):
    """What became of a revoked grant at the provider (RFC 7009)."""

    DONE = "done"  # the provider revoked it
    DEFERRED = "deferred"  # not reachable now: the outbox tries again, a bounded number of times
    UNSUPPORTED = "unsupported"  # no revocation endpoint: nothing to try, nothing retried
    ABANDONED = "abandoned"  # the outbox ran out of attempts and dropped the tokens


_WITHDRAW = "withdraw it in the provider's account settings"


def revocation_note(value: ProviderRevocation) -> str:
    """One plain sentence for a caller or an operator on what the provider did with the grant."""
    if value is ProviderRevocation.DONE:
        return "revoked at the provider"
    if value is ProviderRevocation.DEFERRED:
        return "the provider could not be reached; its revocation is tried again later"
    if value is ProviderRevocation.UNSUPPORTED:
        return (
            "this provider cannot revoke a grant (it offers no revocation endpoint): the grant "
            f"stays valid there until it lapses; {_WITHDRAW}"
        )
    return (
        "revocation at the provider kept failing and was given up: the grant stays valid there "
        f"until it lapses; {_WITHDRAW}"
    )


# Record hash fields that hold ciphertext (v1 text): the authorization session.
CIPHER_FIELDS = ("sess",)
# Ciphertext kept beside the record, each in a key of its own (v2 binary): the tokens, and the
# tokens still to revoke at the provider. Apart, they leave the record hash small enough for
# Redis's compact encoding. Records written by earlier versions hold them as hash fields of the
# same names (v1 text): still read, and moved into the keys by the next write or `keys rotate`.
# The store counts ciphertexts per key id over both (start-up key check, rotation).
SEALED_KEYS = ("tok", "rvk")


def check_user(user: object) -> str:
    """A user id: 1-255 printable characters, no whitespace. Raises :class:`ConsentError`."""
    if not isinstance(user, str) or not 1 <= len(user) <= MAX_USER_LENGTH:
        raise ConsentError("a user id is 1 to 255 characters")
    if any(not ch.isprintable() or ch.isspace() for ch in user):
        raise ConsentError("a user id has no spaces or control characters")
    return user


def check_scopes(scopes: object) -> tuple[str, ...]:
    """Scopes asked for: each an RFC 6749 3.3 scope-token (``%x21 / %x23-5B / %x5D-7E``), at
    most ``MAX_SCOPE_LENGTH`` characters, at most ``MAX_SCOPES_ASKED`` of them; duplicates
    dropped, order kept. A string is one scope, not a list of characters. Raises
    :class:`InvalidScope` naming the problem."""
    if isinstance(scopes, str):
        scopes = (scopes,)
    if not isinstance(scopes, list | tuple):
        raise InvalidScope("scopes are a list of strings")
    if len(scopes) > MAX_SCOPES_ASKED:
        raise InvalidScope(f"{len(scopes)} scopes asked; at most {MAX_SCOPES_ASKED} are allowed")
    for scope in scopes:
        if not isinstance(scope, str) or not scope:
            raise InvalidScope("a scope is a non-empty string")
        if len(scope) > MAX_SCOPE_LENGTH:
            raise InvalidScope(f"a scope is at most {MAX_SCOPE_LENGTH} characters")
        if not all(0x21 <= ord(ch) <= 0x7E and ch not in ('"', "\\") for ch in scope):
            raise InvalidScope(
                f"scope {clip(scope, 40)!r} is not an RFC 6749 scope token (no spaces, control "
                "characters, quotes or backslashes)"
            )
    return tuple(dict.fromkeys(scopes))


def join_scopes(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """The union of scope lists, first-seen order kept, duplicates dropped."""
    return tuple(dict.fromkeys(scope for group in groups for scope in group))


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clip(text: str | None, limit: int = MAX_REASON_LENGTH) -> str | None:
    """Reasons can carry a provider's error_description: keep them short and printable."""
    if text is None:
        return None
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def guard_facts(
    rec: ConsentRecord,
    *,
    now: float,
    asked: tuple[str, ...] = (),
    session_id: str | None = None,
) -> Facts:
    """The guards' values for an event on ``rec``: ``asked`` the scopes it asks for (beyond the
    provider's base scopes), ``session_id`` the session a callback's event names."""
    live = rec.session_id is not None and (rec.session_expires_at or 0) > now
    return Facts(
        session_matches=rec.session_id is not None and session_id == rec.session_id,
        session_lapsed=rec.session_id is not None and not live,
        asked_in_session=live and set(asked) <= set(rec.requested_scopes),
        asked_granted=set(asked) <= set(rec.scopes),
    )


def cooldown_reason(rec: ConsentRecord, retry_at: float) -> str:
    """Why an on-demand refresh did not call the provider, and when it is tried next."""
    last = rec.last_refresh_error or "the last refresh failed"
    return f"{last}; the provider is tried again at {iso(retry_at)}"


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


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """What the store holds for one user. Ciphertext fields stay sealed here."""

    user: str
    state: State = State.UNPROVISIONED
    version: int = 0
    since: float | None = None
    reason: str | None = None
    actor: str | None = None
    subject: str | None = None
    scopes: tuple[str, ...] = ()  # what the provider granted
    # Asked for at the last completed authorization but not granted (the provider chose fewer).
    scopes_missing: tuple[str, ...] = ()
    tokens: bytes | None = None  # ciphertext: access and refresh token
    expires_at: float | None = None  # the access token's absolute expiry
    refresh_expires_at: float | None = None  # the refresh token's, when the provider says
    session: str | None = None  # ciphertext: state, verifier, nonce, authorization URL
    session_id: str | None = None
    session_digest: str | None = None  # SHA-256 of the session's state: its lookup key
    session_expires_at: float | None = None
    requested_scopes: tuple[str, ...] = ()  # what the open session asks for
    next_refresh_at: float | None = None
    last_refresh_at: float | None = None
    refresh_failures: int = 0
    last_refresh_error: str | None = None
    failing_since: float | None = None  # the first failure of the current run of failures
    last_failure_at: float | None = None
    revocation_pending: bytes | None = None  # ciphertext: tokens still to revoke at the provider
    provider_revocation: ProviderRevocation | None = None  # set by a revocation
    inflight: float | None = None  # a refresh request was sent at this time and not answered
    raw: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hash(
        cls, user: str, data: dict[str, str], sealed: Mapping[str, bytes] | None = None
    ) -> ConsentRecord:
        """The record from its hash and its sealed keys (``SEALED_KEYS`` by name)."""
        if not data:
            return cls(user=user)

        def _sealed(name: str) -> bytes | None:
            value = (sealed or {}).get(name)
            if value:
                return value
            legacy = data.get(name)  # an earlier version's layout: v1 text in the hash
            return legacy.encode() if legacy else None

        return cls(
            user=user,
            state=State(data.get("state", State.UNPROVISIONED.value)),
            version=int(data.get("v", "0")),
            since=_float(data.get("since")),
            reason=data.get("reason") or None,
            actor=data.get("actor") or None,
            subject=data.get("sub") or None,
            scopes=tuple(data.get("scopes", "").split()),
            scopes_missing=tuple(data.get("smiss", "").split()),
            tokens=_sealed("tok"),
            expires_at=_float(data.get("exp")),
            refresh_expires_at=_float(data.get("rexp")),
            session=data.get("sess") or None,
            session_id=data.get("sid") or None,
            session_digest=data.get("shash") or None,
            session_expires_at=_float(data.get("sexp")),
            requested_scopes=tuple(data.get("rscopes", "").split()),
            next_refresh_at=_float(data.get("next")),
            last_refresh_at=_float(data.get("lastref")),
            refresh_failures=int(data.get("fails", "0") or 0),
            last_refresh_error=data.get("referr") or None,
            failing_since=_float(data.get("failsince")),
            last_failure_at=_float(data.get("failat")),
            revocation_pending=_sealed("rvk"),
            provider_revocation=_revocation(data.get("provrev")),
            inflight=_float(data.get("inflight")),
            raw=data,
        )

    def after(self, change: Change, version: int) -> ConsentRecord:
        """This record as the store holds it once ``change`` committed on top of it."""
        writes, deletes = change.writes()
        data = {k: v for k, v in self.raw.items() if k not in deletes and k not in change.sealed}
        data.update(writes)
        data["v"] = str(version)
        sealed = {
            name: value
            for name, value in (("tok", self.tokens), ("rvk", self.revocation_pending))
            if value is not None and name not in deletes
        }
        sealed.update(change.sealed)
        return ConsentRecord.from_hash(self.user, data, sealed)

    @property
    def upgrading(self) -> bool:
        """An upgrade session is open: a session beside a grant that stays in force."""
        return self.state is State.PROVISIONED and self.session_id is not None

    def on_demand_retry_at(self) -> float | None:
        """While refreshes fail, when an on-demand refresh may call the provider again: the
        scheduled retry, and never sooner than ``ON_DEMAND_COOLDOWN`` after the last failure.
        None when the last refresh did not fail."""
        if self.refresh_failures <= 0:
            return None
        times = [self.next_refresh_at]
        if self.last_failure_at is not None:
            times.append(self.last_failure_at + ON_DEMAND_COOLDOWN)
        known = [t for t in times if t is not None]
        return max(known) if known else None

    def public(self) -> dict[str, Any]:
        """The status an operator or a caller may see: no ciphertext, no secrets."""
        out: dict[str, Any] = {
            "user": self.user,
            "state": self.state.value,
            "since": iso(self.since),
            "reason": self.reason,
            "actor": self.actor,
            "version": self.version,
        }
        if self.state is State.PROVISIONED:
            out.update(
                subject=self.subject,
                scopes=list(self.scopes),
                access_token_expires_at=iso(self.expires_at),
                refresh_token_expires_at=iso(self.refresh_expires_at),
                next_refresh_at=iso(self.next_refresh_at),
                last_refresh_at=iso(self.last_refresh_at),
                refresh_failures=self.refresh_failures,
                last_refresh_error=self.last_refresh_error,
                failing_since=iso(self.failing_since),
            )
        if self.state is State.REVOKED and self.provider_revocation is not None:
            out.update(
                provider_revocation=self.provider_revocation.value,
                provider_revocation_note=revocation_note(self.provider_revocation),
            )
        if self.state is State.PROVISIONED and self.scopes_missing:
            out["scopes_missing"] = list(self.scopes_missing)
        if self.session_id is not None and self.state in (State.PENDING, State.PROVISIONED):
            out["requested_scopes"] = list(self.requested_scopes)
            out["session_expires_at"] = iso(self.session_expires_at)
        return out


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    event: str
    from_state: str
    to_state: str
    at: float
    actor: str
    reason: str | None
    correlation_id: str | None
    event_id: str
    count: int = 1  # refreshes in a row share one entry
    first_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": self.event,
                "from": self.from_state,
                "to": self.to_state,
                "at": self.at,
                "actor": self.actor,
                "reason": self.reason,
                "correlation_id": self.correlation_id,
                "event_id": self.event_id,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> HistoryEntry:
        d = json.loads(raw)
        return cls(
            event=d["event"],
            from_state=d["from"],
            to_state=d["to"],
            at=float(d["at"]),
            actor=d["actor"],
            reason=d.get("reason"),
            correlation_id=d.get("correlation_id"),
            event_id=d.get("event_id", ""),
            count=int(d.get("count", 1)),
            first_at=float(d["first_at"]) if d.get("first_at") is not None else None,
        )

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": self.event,
            "from": self.from_state,
            "to": self.to_state,
            "at": iso(self.at),
            "actor": self.actor,
            "reason": self.reason,
            "correlation_id": self.correlation_id,
        }
        if self.count > 1:
            out.update(count=self.count, first_at=iso(self.first_at))
        return out


@dataclass(slots=True)
class Change:
    """One committed step: the state change, fields, schedule and history entry, all or nothing.

    ``expect_state`` and ``expect_version`` are what the step read; the store applies the change
    only if the record is still exactly there (one writer wins).
    """

    user: str
    event: Event
    event_id: str
    expect_state: State
    expect_version: int
    to_state: State
    actor: str
    at: float
    reason: str | None = None
    correlation_id: str | None = None
    set_fields: dict[str, str] = field(default_factory=dict)
    # Ciphertext for the keys beside the record (``SEALED_KEYS``); naming one of those in
    # ``delete_fields`` wipes it, wherever it is kept.
    sealed: dict[str, bytes] = field(default_factory=dict)
    delete_fields: tuple[str, ...] = ()
    schedule_at: float | None = None  # refresh due time; None leaves the schedule alone
    unschedule: bool = False
    session_lookup: tuple[str, int] | None = None  # (state hash, ttl) to register
    drop_session_lookup: str | None = None  # state hash to forget
    # An upgrade session opened (its expiry, for the cleanup job to find it), or ended.
    upgrade_until: float | None = None
    drop_upgrade: bool = False
    record_history: bool = True
    reply: tuple[str, str] | None = None  # (reply key, outcome JSON) pushed if the commit applies
    # Also only if the commit applies: arq jobs to queue (the next refresh, a webhook notice;
    # each refused while arq still holds its id), the job of the schedule it cancels or
    # replaces, the release of the user's lock (its owner token), and counters added to hashes
    # (key, field, amount as text).
    jobs: tuple[QueuedJob, ...] = ()
    drop_job: JobRef | None = None
    unlock: str | None = None
    counters: tuple[tuple[str, str, str], ...] = ()

    @property
    def moves(self) -> bool:
        """Whether the user enters a state (a new ``since``, the state indexes updated)."""
        return self.to_state is not self.expect_state or self.expect_version == 0

    def writes(self) -> tuple[dict[str, str], tuple[str, ...]]:
        """Every record field this change sets, and the ones it deletes (the version aside)."""
        misplaced = set(SEALED_KEYS) & set(self.set_fields) or set(self.sealed) - set(SEALED_KEYS)
        if misplaced:
            raise ValueError(f"sealed values go in Change.sealed, by SEALED_KEYS: {misplaced}")
        fields = dict(self.set_fields)
        fields["state"] = self.to_state.value
        if self.moves:
            fields["since"] = repr(self.at)
        if self.record_history:
            fields["actor"] = self.actor
            fields["reason"] = self.reason or ""
        return fields, self.delete_fields

    def history_entry(self) -> HistoryEntry:
        return HistoryEntry(
            event=self.event.value,
            from_state=self.expect_state.value,
            to_state=self.to_state.value,
            at=self.at,
            actor=self.actor,
            reason=self.reason,
            correlation_id=self.correlation_id,
            event_id=self.event_id,
        )


@dataclass(frozen=True, slots=True)
class CommitResult:
    status: str  # "ok", "conflict" or "duplicate"
    version: int = 0
    state: State | None = None
    # False when the store was asked to wait for replicas and too few acknowledged the commit in
    # time: a failover now could lose it.
    replicated: bool = True

    @property
    def ok(self) -> bool:
        return self.status == "ok"
