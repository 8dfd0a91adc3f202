"""The pure core: states, events and the transition table, as data.

One ``transitions.Machine`` serves every user: it is built once, per process, with no model of its
own, and a short-lived model is attached (``add_model``) for the one decision it is asked to make.
The same table drives the engine, the ``diagram`` command and the documentation.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from transitions import Machine, MachineError

from consent_flow.errors import InvalidTransition

__all__ = ["TRANSITIONS", "ConsentMachine", "Event", "State", "Transition", "mermaid"]


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


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the transition table. ``dest`` None: the event leaves the state as it is."""

    event: Event
    sources: tuple[State, ...]
    dest: State | None
    effect: str
    changes: bool = True
    """False for idempotent no-ops: nothing is written, nothing enters the history."""


U, P, V, R = State.UNPROVISIONED, State.PENDING, State.PROVISIONED, State.REVOKED

TRANSITIONS: tuple[Transition, ...] = (
    Transition(Event.PROVISION_REQUESTED, (U, R), P, "new authorization session"),
    Transition(Event.PROVISION_REQUESTED, (P,), None, "live session's URL again", changes=False),
    Transition(Event.PROVISION_REQUESTED, (V,), None, "already provisioned", changes=False),
    Transition(Event.AUTHORIZATION_COMPLETED, (P,), V, "code exchanged, ID token checked"),
    Transition(Event.AUTHORIZATION_FAILED, (P,), U, "denied or failed; reason kept"),
    Transition(Event.SESSION_EXPIRED, (P,), U, "session outlived its TTL"),
    Transition(Event.TOKEN_REFRESHED, (V,), None, "new tokens stored, next refresh scheduled"),
    Transition(Event.REFRESH_REJECTED, (V,), R, "invalid_grant: the grant is dead"),
    Transition(Event.REVOKE_REQUESTED, (P, V), R, "revoked at the provider, tokens wiped"),
    Transition(Event.REVOKE_REQUESTED, (U, R), None, "nothing to revoke", changes=False),
    Transition(Event.GRANT_IMPORTED, (U, R), V, "imported refresh token stored, refreshed at once"),
    Transition(Event.GRANT_IMPORTED, (P,), None, "authorization under way", changes=False),
    Transition(Event.GRANT_IMPORTED, (V,), None, "already provisioned", changes=False),
)


class _Decision:
    """The short-lived model a decision is made on; transitions adds its triggers to it."""

    state: str

    def __init__(self) -> None:
        self.fired: Transition | None = None


class ConsentMachine:
    """Decides which row of :data:`TRANSITIONS` an event takes from a state.

    Thread-safe and shared: build it once at start-up.
    """

    def __init__(self, table: tuple[Transition, ...] = TRANSITIONS) -> None:
        self.table = table
        self._rows: dict[tuple[Event, State], Transition] = {}
        for row in table:
            for source in row.sources:
                if (row.event, source) in self._rows:
                    raise ValueError(f"two rows for {row.event} from {source}")
                self._rows[(row.event, source)] = row
        self._machine = Machine(
            model=None,
            states=[s.value for s in State],
            initial=State.UNPROVISIONED.value,
            auto_transitions=False,
            send_event=True,
        )
        for row in table:
            self._machine.add_transition(
                row.event.value,
                [s.value for s in row.sources],
                row.dest.value if row.dest is not None else None,  # None: internal transition
                after=self._record(row),
            )
        self._lock = threading.Lock()  # add_model/remove_model mutate the machine's model list
        self._decided: dict[tuple[State, Event], Transition] = {}

    @staticmethod
    def _record(row: Transition):  # type: ignore[no-untyped-def]
        def after(event_data):  # type: ignore[no-untyped-def]
            event_data.model.fired = row

        return after

    def decide(
        self, state: State | str, event: Event | str, *, user: str | None = None
    ) -> Transition:
        """The row the event takes from ``state``; :class:`InvalidTransition` if there is none.

        The machine answers each (state, event) pair once; its answer is remembered, since the
        table does not change while the machine lives (every event pays a dict lookup, not a
        model attached and detached).
        """
        try:
            state_, event_ = State(state), Event(event)
        except ValueError:
            raise InvalidTransition(
                f"unknown state or event: {state!r}, {event!r}", user=user, event=str(event)
            ) from None
        known = self._decided.get((state_, event_))
        if known is not None:
            return known
        row = self._ask_machine(state_, event_, user=user)
        self._decided[(state_, event_)] = row
        return row

    def _ask_machine(self, state_: State, event_: Event, *, user: str | None) -> Transition:
        model = _Decision()
        with self._lock:
            self._machine.add_model(model, initial=state_.value)
            try:
                model.trigger(event_.value)  # type: ignore[attr-defined]
            except MachineError:
                raise InvalidTransition(
                    f"{event_.value} is not allowed from {state_.value}",
                    user=user,
                    event=event_.value,
                ) from None
            finally:
                self._machine.remove_model(model)
        assert model.fired is not None
        return model.fired

    def allowed(self, state: State, event: Event) -> bool:
        return (event, state) in self._rows


def mermaid(table: tuple[Transition, ...] = TRANSITIONS) -> str:
    """The machine as a Mermaid state diagram, generated from the table."""
    lines = ["stateDiagram-v2", f"    [*] --> {State.UNPROVISIONED.value}"]
    for row in table:
        for source in row.sources:
            dest = row.dest or source
            note = "" if row.changes else " (no-op)"
            lines.append(f"    {source.value} --> {dest.value}: {row.event.value}{note}")
    return "\n".join(lines) + "\n"
