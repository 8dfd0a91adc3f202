"""The pure core: states, events and the transition table, as data.

One ``transitions.Machine`` serves every user: it is built once, per process, with no model, and
asked for the transitions of an (event, state) pair; the row whose guards hold is the decision.
The same table drives the engine, the ``diagram`` command and the documentation. Each row names
its guards (``Guard``) and its effect (``Effect``), the piece of handler code the engine runs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from transitions import Machine

from consent_flow.errors import InvalidTransition

__all__ = [
    "TRANSITIONS",
    "ConsentMachine",
    "Effect",
    "Event",
    "Facts",
    "Guard",
    "State",
    "Transition",
    "all_facts",
    "mermaid",
]


class State(enum.StrEnum):
    UNPROVISIONED = "unprovisioned"
    PENDING = "pending"
    PROVISIONED = "provisioned"
    REVOKED = "revoked"


class Event(enum.StrEnum):
    PROVISION_REQUESTED = "provision_requested"
    AUTHORIZATION_COMPLETED = "authorization_completed"
    AUTHORIZATION_FAILED = "authorization_failed"
    SESSION_EXPIRED = "session_expired"
    TOKEN_REFRESHED = "token_refreshed"
    REFRESH_REJECTED = "refresh_rejected"
    REVOKE_REQUESTED = "revoke_requested"
    GRANT_IMPORTED = "grant_imported"


class Guard(enum.StrEnum):
    """A condition a row may depend on, beyond the state: facts the engine reads from the record
    and the event (``Facts``) before it asks the machine."""

    # The event carries the session id of the session the record holds open.
    SESSION_MATCHES = "session_matches"
    # The record's open session is past its expiry (Redis's time).
    SESSION_LAPSED = "session_lapsed"
    # Every scope asked is in the open, live session already.
    ASKED_IN_SESSION = "asked_in_session"
    # Every scope asked is granted already.
    ASKED_GRANTED = "asked_granted"


class Effect(enum.StrEnum):
    """What the engine does for a row: each names one piece of handler code (``Engine``)."""

    OPEN_SESSION = "open_session"  # a new authorization session (replacing any open one)
    SESSION_URL = "session_url"  # the open session's URL again
    OPEN_UPGRADE = "open_upgrade"  # a session for more scopes beside the grant, which stays
    NOTHING = "nothing"  # answer the status as it is
    STORE_GRANT = "store_grant"  # code exchanged, ID token checked, tokens stored, scheduled
    REPLACE_GRANT = "replace_grant"  # the same, replacing the grant; the old one is revoked
    DROP_SESSION = "drop_session"  # the session ends without a grant, reason kept
    DROP_UPGRADE = "drop_upgrade"  # the upgrade session ends; the grant is untouched
    STORE_REFRESHED = "store_refreshed"  # new tokens and the next refresh, in one step
    END_GRANT = "end_grant"  # invalid_grant: tokens wiped, schedule cancelled
    REVOKE = "revoke"  # revoked at the provider, tokens wiped, schedule cancelled
    IMPORT_GRANT = "import_grant"  # an imported refresh token stored, refreshed at once
    SKIP_IMPORT = "skip_import"  # the import leaves this grant alone


# The effects of an upgrade session's rows: the grant stays while they run.
UPGRADE_EFFECTS = frozenset({Effect.OPEN_UPGRADE, Effect.REPLACE_GRANT, Effect.DROP_UPGRADE})


@dataclass(frozen=True, slots=True)
class Facts:
    """The guards' values for one decision (``Guard`` by name), computed by the engine."""

    session_matches: bool = False
    session_lapsed: bool = False
    asked_in_session: bool = False
    asked_granted: bool = False

    def holds(self, guard: Guard) -> bool:
        value: bool = getattr(self, guard.value)
        return value


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the transition table. ``dest`` None: the event leaves the state as it is.

    The row applies when every guard in ``when`` holds and none in ``unless`` does.
    """

    event: Event
    sources: tuple[State, ...]
    dest: State | None
    effect: Effect
    note: str
    when: tuple[Guard, ...] = ()
    unless: tuple[Guard, ...] = ()
    changes: bool = True
    """False for idempotent no-ops: nothing is written, nothing enters the history."""

    def applies(self, facts: Facts) -> bool:
        return all(facts.holds(g) for g in self.when) and not any(
            facts.holds(g) for g in self.unless
        )

    def label(self) -> str:
        """The row's event with its guards, as the diagram shows it."""
        guards = [g.value for g in self.when] + [f"not {g.value}" for g in self.unless]
        upgrade = " (upgrade)" if self.effect in UPGRADE_EFFECTS else ""
        return self.event.value + upgrade + (f" [{', '.join(guards)}]" if guards else "")


U, P, V, R = State.UNPROVISIONED, State.PENDING, State.PROVISIONED, State.REVOKED
E, G, X = Event, Guard, Effect

# An upgrade is a session opened while provisioned: the rows from ``provisioned`` that name
# a session are its rows, and they leave the grant in place.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(E.PROVISION_REQUESTED, (U, R), P, X.OPEN_SESSION, "new authorization session"),
    Transition(
        E.PROVISION_REQUESTED,
        (P,),
        None,
        X.SESSION_URL,
        "scopes already in the live session: its URL again",
        when=(G.ASKED_IN_SESSION,),
        changes=False,
    ),
    Transition(
        E.PROVISION_REQUESTED,
        (P,),
        None,
        X.OPEN_SESSION,
        "more scopes, or the session lapsed: a new session for the union replaces it",
        unless=(G.ASKED_IN_SESSION,),
    ),
    Transition(
        E.PROVISION_REQUESTED,
        (V,),
        None,
        X.NOTHING,
        "scopes already granted: nothing to do",
        when=(G.ASKED_GRANTED,),
        changes=False,
    ),
    Transition(
        E.PROVISION_REQUESTED,
        (V,),
        None,
        X.SESSION_URL,
        "more scopes, already in the live upgrade session: its URL again",
        when=(G.ASKED_IN_SESSION,),
        unless=(G.ASKED_GRANTED,),
        changes=False,
    ),
    Transition(
        E.PROVISION_REQUESTED,
        (V,),
        None,
        X.OPEN_UPGRADE,
        "more scopes: an upgrade session for the union; the grant keeps working",
        unless=(G.ASKED_GRANTED, G.ASKED_IN_SESSION),
    ),
    Transition(
        E.AUTHORIZATION_COMPLETED,
        (P,),
        V,
        X.STORE_GRANT,
        "code exchanged, ID token checked",
        when=(G.SESSION_MATCHES,),
    ),
    Transition(
        E.AUTHORIZATION_COMPLETED,
        (V,),
        None,
        X.REPLACE_GRANT,
        "upgrade: the same checks; new tokens and scopes replace the old, the old grant revoked",
        when=(G.SESSION_MATCHES,),
    ),
    Transition(
        E.AUTHORIZATION_FAILED,
        (P,),
        U,
        X.DROP_SESSION,
        "denied or failed; reason kept",
        when=(G.SESSION_MATCHES,),
    ),
    Transition(
        E.AUTHORIZATION_FAILED,
        (V,),
        None,
        X.DROP_UPGRADE,
        "upgrade denied or failed: dropped with its reason, the grant untouched",
        when=(G.SESSION_MATCHES,),
    ),
    Transition(
        E.SESSION_EXPIRED,
        (P,),
        U,
        X.DROP_SESSION,
        "session outlived its TTL",
        when=(G.SESSION_LAPSED,),
    ),
    Transition(
        E.SESSION_EXPIRED,
        (V,),
        None,
        X.DROP_UPGRADE,
        "upgrade session outlived its TTL: dropped, the grant untouched",
        when=(G.SESSION_LAPSED,),
    ),
    Transition(
        E.TOKEN_REFRESHED,
        (V,),
        None,
        X.STORE_REFRESHED,
        "new tokens stored, next refresh scheduled",
    ),
    Transition(E.REFRESH_REJECTED, (V,), R, X.END_GRANT, "invalid_grant: the grant is dead"),
    Transition(E.REVOKE_REQUESTED, (P, V), R, X.REVOKE, "revoked at the provider, tokens wiped"),
    Transition(E.REVOKE_REQUESTED, (U, R), None, X.NOTHING, "nothing to revoke", changes=False),
    Transition(
        E.GRANT_IMPORTED,
        (U, R),
        V,
        X.IMPORT_GRANT,
        "imported refresh token stored, refreshed at once",
    ),
    Transition(
        E.GRANT_IMPORTED, (P,), None, X.SKIP_IMPORT, "authorization under way", changes=False
    ),
    Transition(E.GRANT_IMPORTED, (V,), None, X.SKIP_IMPORT, "already provisioned", changes=False),
)
del E, G, X


class ConsentMachine:
    """Decides which row of :data:`TRANSITIONS` an event takes from a state, given the guards'
    values.

    One ``transitions.Machine``, built once from the table with no model: a decision asks it
    for the transitions of (event, state) with ``get_transitions`` and takes the one whose
    guards hold. Thread-safe (read only after construction) and shared.
    """

    def __init__(self, table: tuple[Transition, ...] = TRANSITIONS) -> None:
        self.table = table
        self._machine = Machine(
            model=None,
            states=[s.value for s in State],
            initial=State.UNPROVISIONED.value,
            auto_transitions=False,
        )
        # The machine's transition objects, back to the rows they were made from.
        self._rows: dict[int, Transition] = {}
        for row in table:
            for source in row.sources:
                self._machine.add_transition(
                    row.event.value,
                    source.value,
                    row.dest.value if row.dest is not None else None,  # None: internal
                    conditions=[g.value for g in row.when],
                    unless=[g.value for g in row.unless],
                )
                made = self._machine.get_transitions(row.event.value, source.value)[-1]
                self._rows[id(made)] = row
        self._check_exclusive()
        self._decided: dict[tuple[State, Event, Facts], Transition | None] = {}

    def _check_exclusive(self) -> None:
        """Two rows that could both apply to one (state, event, facts) make the table ambiguous:
        refused when the machine is built."""
        for state in State:
            for event in Event:
                for facts in all_facts():
                    rows = self._candidates(state, event, facts)
                    if len(rows) > 1:
                        raise ValueError(
                            f"two rows for {event.value} from {state.value} with {facts}"
                        )

    def _candidates(self, state: State, event: Event, facts: Facts) -> list[Transition]:
        found = []
        for made in self._machine.get_transitions(event.value, state.value):
            row = self._rows[id(made)]
            holds = all(facts.holds(Guard(str(c.func))) is c.target for c in made.conditions)
            if holds:
                found.append(row)
        return found

    def decide(
        self,
        state: State | str,
        event: Event | str,
        facts: Facts | None = None,
        *,
        user: str | None = None,
    ) -> Transition:
        """The row the event takes from ``state`` under ``facts``; :class:`InvalidTransition`
        when the table has none (the event is not allowed there, or its guards fail).

        The machine answers each (state, event, facts) once; its answer is remembered, since the
        table does not change while the machine lives.
        """
        try:
            state_, event_ = State(state), Event(event)
        except ValueError:
            raise InvalidTransition(
                f"unknown state or event: {state!r}, {event!r}", user=user, event=str(event)
            ) from None
        facts_ = facts or Facts()
        key = (state_, event_, facts_)
        if key in self._decided:
            row = self._decided[key]
        else:
            candidates = self._candidates(state_, event_, facts_)
            row = candidates[0] if candidates else None
            self._decided[key] = row
        if row is None:
            raise InvalidTransition(
                f"{event_.value} is not allowed from {state_.value}",
                user=user,
                event=event_.value,
            )
        return row

    def allowed(self, state: State, event: Event) -> bool:
        """Whether some row takes ``event`` from ``state`` (under some guards' values)."""
        return bool(self._machine.get_transitions(Event(event).value, State(state).value))


def all_facts() -> list[Facts]:
    """Every combination of the guards' values: what a test walking the table walks."""
    names = [g.value for g in Guard]
    return [
        Facts(**{name: bool(bits >> i & 1) for i, name in enumerate(names)})
        for bits in range(2 ** len(names))
    ]


def mermaid(table: tuple[Transition, ...] = TRANSITIONS) -> str:
    """The machine as a Mermaid state diagram, generated from the table."""
    lines = ["stateDiagram-v2", f"    [*] --> {State.UNPROVISIONED.value}"]
    for row in table:
        for source in row.sources:
            dest = row.dest or source
            note = "" if row.changes else " (no-op)"
            lines.append(f"    {source.value} --> {dest.value}: {row.label()}{note}")
    return "\n".join(lines) + "\n"
