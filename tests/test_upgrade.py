"""Progressive scopes against the real provider and Redis: extra scopes, upgrade sessions beside a
grant (approved, denied, expired, replayed, forged), fewer scopes granted than asked, bad scopes."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import provision, stored_tokens
from local_provider import approve

from consent_flow import Event, InvalidScope, State
from consent_flow.core.table import TRANSITIONS
from consent_flow.errors import GrantRejected
from consent_flow.queue.bus import Envelope

pytestmark = pytest.mark.asyncio

BASE = ["openid", "offline_access", "profile", "notes:read"]  # CONSENT_SCOPES of the fixtures
EXTRA = "notes:write"


def asked_in(url: str) -> list[str]:
    return parse_qs(urlsplit(url).query)["scope"][0].split()


async def committed_only_table_rows(stack) -> None:
    """Every transition Redis counted for this test is a row of the table."""
    counted: dict[bytes, bytes] = {}
    for shard in stack.client.store.keys.every_shard():
        counted.update(await stack.client.pool.hgetall(shard.transition_counts))
    rows = {
        (row.event.value, source.value, (row.dest or source).value)
        for row in TRANSITIONS
        if row.changes
        for source in row.sources
    }
    for name in counted:
        assert tuple(name.decode().split("|")) in rows, name


async def upgrade(stack, user: str = "alice", scopes=(EXTRA,)):
    status = await stack.client.request_provisioning(user, scopes=scopes)
    assert status.state is State.PROVISIONED and status.upgrade
    assert status.authorization_url
    return status


async def test_a_first_session_asks_for_the_base_scopes_plus_those_asked(stack):
    status = await stack.client.request_provisioning("alice", scopes=[EXTRA, "openid"])
    assert status.state is State.PENDING
    assert asked_in(status.authorization_url) == [*BASE, EXTRA]
    assert list(status.requested_scopes) == [*BASE, EXTRA]
    # The same scopes again: the same session; more scopes: a new one for the union.
    again = await stack.client.request_provisioning("alice", scopes=[EXTRA])
    assert again.authorization_url == status.authorization_url
    more = await stack.client.request_provisioning("alice", scopes=["email"])
    assert more.authorization_url != status.authorization_url
    assert asked_in(more.authorization_url) == [*BASE, EXTRA, "email"]
    callback = await approve(more.authorization_url, "alice")
    assert (await stack.callback(callback)).status_code == 200
    done = await stack.client.status("alice")
    assert done.state is State.PROVISIONED
    assert set(done.scopes) == {*BASE, EXTRA, "email"}
    assert done.scopes_missing == () and done.requested_scopes == () and not done.upgrade
    await committed_only_table_rows(stack)


async def test_an_approved_upgrade_keeps_the_replaced_grant_unless_told_to_revoke_it(stack):
    """Off by default: at a provider that extends the grant it holds, revoking the replaced
    refresh token would end the new grant too; the replaced one stays as the provider has it."""
    assert (await provision(stack)).status_code == 200
    before = await stored_tokens(stack, "alice")
    opened = await upgrade(stack)
    page = await stack.callback(await approve(opened.authorization_url, "alice"))
    assert page.status_code == 200
    tokens = await stored_tokens(stack, "alice")
    assert tokens["refresh_token"] != before["refresh_token"]
    assert EXTRA in (await stack.client.status("alice")).scopes
    assert stack.provider.introspect(tokens["refresh_token"])["active"]
    assert stack.provider.introspect(before["refresh_token"])["active"]  # not revoked by us
    assert (await stack.client.store.load("alice")).revocation_pending is None
    await committed_only_table_rows(stack)


async def test_an_approved_upgrade_replaces_the_grant_and_revokes_the_old_one(make_stack):
    stack = await make_stack(revoke_replaced_grant=True)
    assert (await provision(stack)).status_code == 200
    before = await stored_tokens(stack, "alice")
    granted = (await stack.client.status("alice")).scopes
    assert EXTRA not in granted
    assert (await stack.client.request_provisioning("alice", scopes=["notes:read"])).details[
        "already"
    ]

    opened = await upgrade(stack)
    assert asked_in(opened.authorization_url) == [*BASE, EXTRA]
    # The grant keeps working while the upgrade is open: served, and shown with the upgrade.
    assert await stack.client.access_token("alice") == before["access_token"]
    status = await stack.client.status("alice")
    assert status.state is State.PROVISIONED and status.upgrade
    assert status.authorization_url == opened.authorization_url
    assert list(status.requested_scopes) == [*BASE, EXTRA]
    assert status.scopes == granted
    # Asking again while it is open: the same upgrade session.
    assert (await upgrade(stack)).authorization_url == opened.authorization_url
    # ... and refreshed: an on-demand refresh leaves the upgrade open.
    services = stack._workers[0].ctx["services"]
    outcome = await services.stack(None).refresher.refresh("alice", on_demand=True, min_ttl=3600)
    assert outcome.result == "applied", outcome
    refreshed = await stack.client.access_token("alice")
    assert refreshed != before["access_token"]
    assert (await stack.client.status("alice")).upgrade
    before = await stored_tokens(stack, "alice")
    assert before["access_token"] == refreshed

    page = await stack.callback(await approve(opened.authorization_url, "alice"))
    assert page.status_code == 200 and "granted" in page.text
    after = await stack.client.status("alice")
    assert after.state is State.PROVISIONED and not after.upgrade
    assert EXTRA in after.scopes and after.requested_scopes == ()
    assert after.since == status.since  # still the same provisioned spell
    tokens = await stored_tokens(stack, "alice")
    assert tokens["refresh_token"] != before["refresh_token"]
    assert await stack.client.access_token("alice") == tokens["access_token"]
    assert stack.provider.introspect(tokens["refresh_token"])["active"]
    # The replaced grant is revoked at the provider: its refresh token is refused.
    with pytest.raises(GrantRejected):
        await stack.client.oauth.refresh(before["refresh_token"])
    rec = await stack.client.store.load("alice")
    assert rec.revocation_pending is None
    history = await stack.client.history("alice")
    assert [(h["event"], h["from"], h["to"]) for h in history[-3:]] == [
        ("provision_requested", "provisioned", "provisioned"),
        ("token_refreshed", "provisioned", "provisioned"),
        ("authorization_completed", "provisioned", "provisioned"),
    ]
    await committed_only_table_rows(stack)


async def test_a_denied_upgrade_is_dropped_with_its_reason_and_the_grant_is_untouched(stack):
    assert (await provision(stack)).status_code == 200
    before = await stored_tokens(stack, "alice")
    status = await stack.client.status("alice")
    opened = await upgrade(stack)
    page = await stack.callback(await approve(opened.authorization_url, "alice", deny=True))
    assert page.status_code == 403
    after = await stack.client.status("alice")
    assert after.state is State.PROVISIONED and not after.upgrade
    assert after.scopes == status.scopes and after.since == status.since
    assert after.authorization_url is None and after.requested_scopes == ()
    assert "upgrade dropped: access_denied" in (after.reason or "")
    assert await stored_tokens(stack, "alice") == before
    assert await stack.client.access_token("alice") == before["access_token"]
    history = await stack.client.history("alice")
    assert history[-1]["event"] == "authorization_failed"
    assert (history[-1]["from"], history[-1]["to"]) == ("provisioned", "provisioned")
    # The refresh token still works at the provider, and keeps being used.
    assert stack.provider.introspect(before["refresh_token"])["active"]
    await committed_only_table_rows(stack)


async def test_an_expired_upgrade_session_is_dropped_by_the_cleanup_job(make_stack):
    stack = await make_stack(session_ttl=2)
    assert (await provision(stack)).status_code == 200
    before = await stored_tokens(stack, "alice")
    opened = await upgrade(stack)
    shard = stack.client.store.keys.shard_of("alice")
    assert await stack.client.store.upgrades_due(stack.client.clock() + 60, shard=shard) == [
        "alice"
    ]
    await asyncio.sleep(2.2)
    # What the cleanup job does for an upgrade session past its expiry.
    from workers.jobs import cleanup

    services = stack._workers[0].ctx["services"]
    await cleanup({"services": services})
    for _ in range(100):
        status = await stack.client.status("alice")
        if not status.upgrade:
            break
        await asyncio.sleep(0.05)
    assert status.state is State.PROVISIONED and not status.upgrade
    assert "upgrade dropped: authorization session expired" in (status.reason or "")
    assert await stored_tokens(stack, "alice") == before
    assert await stack.client.store.upgrades_due(stack.client.clock() + 60, shard=shard) == []
    # Its callback no longer changes anything.
    page = await stack.callback(await approve(opened.authorization_url, "alice"))
    assert page.status_code in (400, 409)
    assert await stored_tokens(stack, "alice") == before
    await committed_only_table_rows(stack)


async def test_fewer_scopes_granted_than_asked_are_named(stack):
    status = await stack.client.request_provisioning("alice", scopes=[EXTRA])
    callback = await approve(status.authorization_url, "alice", grant_only=BASE)
    assert (await stack.callback(callback)).status_code == 200
    after = await stack.client.status("alice")
    assert after.state is State.PROVISIONED
    assert EXTRA not in after.scopes and "notes:read" in after.scopes
    assert after.scopes_missing == (EXTRA,)
    assert after.to_dict()["scopes_missing"] == [EXTRA]
    # Not granted is not granted: asking for it again opens an upgrade.
    assert (await upgrade(stack)).upgrade


async def test_an_upgrade_callback_is_as_strict_as_the_first(stack):
    assert (await provision(stack)).status_code == 200
    before = await stored_tokens(stack, "alice")
    scopes = (await stack.client.status("alice")).scopes
    opened = await upgrade(stack)
    callback = await approve(opened.authorization_url, "alice")
    params = parse_qs(urlsplit(callback).query)
    base = callback.split("?")[0]
    # A forged state, a wrong issuer, a code without state: refused, nothing changes.
    forged = f"{base}?code={params['code'][0]}&state=forged&iss={params['iss'][0]}"
    assert (await stack.callback(forged)).status_code == 400
    wrong_iss = callback.replace("iss=", "iss=https%3A%2F%2Fevil.example&x=")
    assert (await stack.callback(wrong_iss)).status_code == 400
    assert (await stack.client.status("alice")).upgrade
    assert await stored_tokens(stack, "alice") == before
    # The real one applies once; replayed, it is refused and changes nothing more.
    assert (await stack.callback(callback)).status_code == 200
    upgraded = await stored_tokens(stack, "alice")
    assert (await stack.callback(callback)).status_code in (400, 409)
    assert await stored_tokens(stack, "alice") == upgraded
    assert len(scopes) < len((await stack.client.status("alice")).scopes)


async def test_an_upgrade_approved_by_another_subject_changes_nothing(stack):
    assert (await provision(stack)).status_code == 200
    before = await stored_tokens(stack, "alice")
    opened = await upgrade(stack)
    # mallory signs in at the provider and approves alice's upgrade: the ID token's subject is
    # not the one that holds the grant.
    page = await stack.callback(await approve(opened.authorization_url, "mallory"))
    assert page.status_code == 403
    after = await stack.client.status("alice")
    assert after.state is State.PROVISIONED and not after.upgrade
    assert EXTRA not in after.scopes
    assert await stored_tokens(stack, "alice") == before
    assert stack.provider.introspect(before["refresh_token"])["active"]


@pytest.mark.parametrize(
    "scopes",
    [["notes write"], ["notes:\x01"], ['say"hi'], [f"s{i}" for i in range(200)], ["x" * 129], [""]],
    ids=["space", "control", "quote", "200-scopes", "too-long", "empty"],
)
async def test_bad_scopes_are_refused_before_anything_is_queued(stack, scopes):
    assert (await provision(stack)).status_code == 200
    before = await stack.client.store.load("alice")
    queued = await stack.client.pool.zcard(stack.settings.queue_name)
    with pytest.raises(InvalidScope) as info:
        await stack.client.request_provisioning("alice", scopes=scopes)
    assert info.value.code == "invalid_scope"
    assert await stack.client.store.load("alice") == before
    assert await stack.client.pool.zcard(stack.settings.queue_name) == queued


async def test_bad_scopes_in_a_queued_event_change_nothing(stack):
    """The engine checks again what the edge checked: an event queued by other means."""
    assert (await provision(stack)).status_code == 200
    before = await stack.client.store.load("alice")
    envelope = Envelope(
        Event.PROVISION_REQUESTED, "alice", "user", payload={"scopes": "ok " + "x" * 300}
    )
    outcome = await stack.client.emit(envelope)
    assert (outcome.result, outcome.error) == ("rejected", "invalid_scope")
    assert await stack.client.store.load("alice") == before


async def test_an_upgrade_expires_at_its_own_provider_only(make_stack, settings):
    """Two providers (both served by the fixture's provider): the cleanup job expires an
    upgrade at the second one, and the first connection is left as it is."""
    from consent_flow.settings import ProviderConfig

    table = tuple(
        ProviderConfig(
            name=name,
            issuer=settings.issuer,
            discovery_url=settings.discovery_url,
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            scopes=settings.scopes,
        )
        for name in ("notes", "files")
    )
    stack = await make_stack(provider_table=table, session_ttl=2)
    client = stack.client
    for name in ("notes", "files"):
        status = await client.request_provisioning("alice", name)
        page = await stack.callback(await approve(status.authorization_url, "alice"))
        assert page.status_code == 200
    notes = await client.request_provisioning("alice", "notes", scopes=[EXTRA])
    files = await client.request_provisioning("alice", "files", scopes=[EXTRA])
    assert notes.upgrade and files.upgrade
    await asyncio.sleep(2.2)
    # The notes upgrade is approved in time (its claim is checked against Redis's clock, so
    # it is renewed first); the files one lapses.
    notes = await client.request_provisioning("alice", "notes", scopes=[EXTRA])
    from workers.jobs import cleanup

    await cleanup({"services": stack._workers[0].ctx["services"]})
    for _ in range(100):
        if not (await client.status("alice", "files")).upgrade:
            break
        await asyncio.sleep(0.05)
    status = await client.status("alice", "files")
    assert status.state is State.PROVISIONED and not status.upgrade
    assert "authorization session expired" in (status.reason or "")
    assert (await client.status("alice", "notes")).upgrade
    page = await stack.callback(await approve(notes.authorization_url, "alice"))
    assert page.status_code == 200
    assert EXTRA in (await client.status("alice", "notes")).scopes
    assert EXTRA not in (await client.status("alice", "files")).scopes
