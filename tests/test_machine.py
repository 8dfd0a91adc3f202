"""The pure core: every row of the transition table, and nothing else, is allowed."""

from __future__ import annotations

import pytest

from consent_flow import TRANSITIONS, Event, InvalidTransition, State, mermaid
from consent_flow.core.table import ConsentMachine

U, P, V, R = State.UNPROVISIONED, State.PENDING, State.PROVISIONED, State.REVOKED

# docs/design.md "States and the table", one line per row: (event, from, to); to None = unchanged.
DESIGN_TABLE = {
    (Event.PROVISION_REQUESTED, U): P,
    (Event.PROVISION_REQUESTED, R): P,
    (Event.PROVISION_REQUESTED, P): P,
    (Event.PROVISION_REQUESTED, V): V,
    (Event.AUTHORIZATION_COMPLETED, P): V,
    (Event.AUTHORIZATION_FAILED, P): U,
    (Event.SESSION_EXPIRED, P): U,
    (Event.TOKEN_REFRESHED, V): V,
    (Event.REFRESH_REJECTED, V): R,
    (Event.REVOKE_REQUESTED, P): R,
    (Event.REVOKE_REQUESTED, V): R,
    (Event.REVOKE_REQUESTED, U): U,
    (Event.REVOKE_REQUESTED, R): R,
    (Event.GRANT_IMPORTED, U): V,
    (Event.GRANT_IMPORTED, R): V,
    (Event.GRANT_IMPORTED, P): P,
    (Event.GRANT_IMPORTED, V): V,
}


@pytest.fixture(scope="module")
def machine() -> ConsentMachine:
    return ConsentMachine()


@pytest.mark.parametrize(("event", "source"), [(e, s) for e in Event for s in State])
def test_every_event_from_every_state_matches_the_design(machine, event, source):
    expected = DESIGN_TABLE.get((event, source))
    if expected is None:
        with pytest.raises(InvalidTransition) as info:
            machine.decide(source, event, user="alice")
        assert info.value.user == "alice"
        assert info.value.event == event.value
    else:
        row = machine.decide(source, event)
        assert (row.dest or source) is expected


def test_idempotent_rows_change_nothing(machine):
    assert not machine.decide(P, Event.PROVISION_REQUESTED).changes
    assert not machine.decide(V, Event.PROVISION_REQUESTED).changes
    assert not machine.decide(U, Event.REVOKE_REQUESTED).changes
    assert not machine.decide(R, Event.REVOKE_REQUESTED).changes
    assert not machine.decide(P, Event.GRANT_IMPORTED).changes
    assert not machine.decide(V, Event.GRANT_IMPORTED).changes
    assert machine.decide(R, Event.GRANT_IMPORTED).changes
    assert machine.decide(V, Event.TOKEN_REFRESHED).changes


def test_unknown_names_are_invalid_transitions(machine):
    with pytest.raises(InvalidTransition):
        machine.decide("nowhere", Event.PROVISION_REQUESTED)
    with pytest.raises(InvalidTransition):
        machine.decide(U, "explode")


def test_the_machine_is_shared_not_rebuilt(machine):
    # One Machine serves every decision: models are attached and detached again.
    for _ in range(100):
        machine.decide(U, Event.PROVISION_REQUESTED)
    assert machine._machine.models == []


def test_diagram_is_generated_from_the_table():
    text = mermaid()
    assert text.startswith("stateDiagram-v2\n")
    edges = [line.strip() for line in text.splitlines()[2:]]
    expected = [
        f"{s.value} --> {(row.dest or s).value}: {row.event.value}"
        + ("" if row.changes else " (no-op)")
        for row in TRANSITIONS
        for s in row.sources
    ]
    assert edges == expected
    assert len(edges) == len(DESIGN_TABLE)


def test_a_table_with_two_rows_for_one_pair_is_refused():
    row = TRANSITIONS[0]
    with pytest.raises(ValueError, match="two rows"):
        ConsentMachine((row, row))
