"""Plain data the engine passes around: a user's record, a change to it, a history entry."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypedDict

from consent_flow.core.table import Event, Facts, State
from consent_flow.errors import ConsentError, InvalidScope

__all__ = [
    "ON_DEMAND_COOLDOWN",
    "Change",
    "CommitResult",
    "ConsentRecord",
    "HistoryEntry",
    "Job",
    "NoticeJob",
    "ProviderRevocation",
    "RecordFields",
    "RefreshCount",
    "RefreshJob",
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


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """What the store holds for one user. Ciphertext stays sealed here."""

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
    session_claim: str | None = None  # the event id of the callback that claimed the session
    requested_scopes: tuple[str, ...] = ()  # what the open session asks for
    next_refresh_at: float | None = None
    last_refresh_at: float | None = None
    refresh_failures: int = 0
    last_refresh_error: str | None = None
    failing_since: float | None = None  # the first failure of the current run of failures
    last_failure_at: float | None = None
    revocation_pending: bytes | None = None  # ciphertext: tokens still to revoke at the provider
    provider_revocation: ProviderRevocation | None = None  # set by a revocation
    revocation_attempts: int = 0  # failed tries to revoke ``revocation_pending`` at the provider
    inflight: float | None = None  # a refresh request was sent at this time and not answered
    imported_at: float | None = None  # when the grant was last imported; no revocation clears it

    def after(self, change: Change, version: int) -> ConsentRecord:
        """This record as the store holds it once ``change`` committed on top of it."""
        values: dict[str, Any] = {name: _DEFAULTS[name] for name in change.clear}
        values.update(change.fields)
        values.update(state=change.to_state, version=version)
        if change.moves:
            values["since"] = change.at
        if change.record_history:
            values.update(actor=change.actor, reason=change.reason or None)
        return dataclasses.replace(self, **values)

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
class RefreshJob:
    """The refresh due at ``at`` (one job per user and due time)."""

    at: float


@dataclass(frozen=True, slots=True)
class NoticeJob:
    """A webhook notice to deliver: its id, its job form (JSON, nothing secret), and how long
    the queue must remember its id so the same notice is never delivered twice (seconds)."""

    id: str
    notice: dict[str, Any]
    keep_for: float


Job = RefreshJob | NoticeJob


@dataclass(frozen=True, slots=True)
class RefreshCount:
    """A refresh for the figures: its outcome, and how long before expiry it happened."""

    outcome: str
    lead: float | None = None


class RecordFields(TypedDict, total=False):
    """What a change may set on a record, by attribute (see :class:`ConsentRecord`)."""

    subject: str | None
    scopes: tuple[str, ...]
    scopes_missing: tuple[str, ...]
    tokens: bytes | None
    expires_at: float | None
    refresh_expires_at: float | None
    session: str | None
    session_id: str | None
    session_digest: str | None
    session_expires_at: float | None
    session_claim: str | None
    requested_scopes: tuple[str, ...]
    next_refresh_at: float | None
    last_refresh_at: float | None
    refresh_failures: int
    last_refresh_error: str | None
    failing_since: float | None
    last_failure_at: float | None
    revocation_pending: bytes | None
    provider_revocation: ProviderRevocation | None
    revocation_attempts: int
    inflight: float | None
    imported_at: float | None


# What clearing an attribute leaves: its default (the state and version are the store's).
_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(ConsentRecord)
    if f.name not in ("user", "state", "version")
}


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
    # Record attributes the step sets (None clears one), and those it resets to their default.
    fields: RecordFields = field(default_factory=lambda: RecordFields())
    clear: tuple[str, ...] = ()
    schedule_at: float | None = None  # refresh due time; None leaves the schedule alone
    unschedule: bool = False
    session_lookup: tuple[str, int] | None = None  # (state hash, ttl) to register
    drop_session_lookup: str | None = None  # state hash to forget
    # An upgrade session opened (its expiry, for the cleanup job to find it), or ended.
    upgrade_until: float | None = None
    drop_upgrade: bool = False
    record_history: bool = True
    # (the event id its caller waits on, the outcome JSON): pushed if the commit applies
    reply: tuple[str, str] | None = None
    # Also only if the commit applies: jobs to queue (the next refresh, a webhook notice; each
    # refused while the queue still holds its id), the queued refresh of the schedule it
    # cancels or replaces (by its due time), and the refresh it counts.
    jobs: tuple[Job, ...] = ()
    drop_refresh_at: float | None = None
    refresh_count: RefreshCount | None = None

    @property
    def moves(self) -> bool:
        """Whether the user enters a state (a new ``since``, the state indexes updated)."""
        return self.to_state is not self.expect_state or self.expect_version == 0

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
