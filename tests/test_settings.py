"""Settings: one frozen object from the environment; a bad value names its variable."""

from __future__ import annotations

import dataclasses

import pytest

from consent_flow import Settings, SettingsError, generate_key

BASE = {
    "CONSENT_ISSUER": "https://id.example.com",
    "CONSENT_CLIENT_ID": "mcp",
    "CONSENT_CLIENT_SECRET": "shh-very-secret",
    "CONSENT_REDIRECT_URI": "https://mcp.example.com/oauth/callback",
    "CONSENT_ENCRYPTION_KEYS": generate_key(),
}


def test_complete_environment():
    s = Settings.from_env(BASE, require_provider=True, require_keys=True)
    assert s.discovery_url == "https://id.example.com/.well-known/openid-configuration"
    assert s.scopes == ("openid", "offline_access")
    assert s.subject_match is True
    assert s.redirect_path == "/oauth/callback"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.issuer = "x"  # type: ignore[misc]


def test_secrets_do_not_show_in_repr():
    s = Settings.from_env(BASE)
    text = repr(s)
    assert "shh-very-secret" not in text
    assert BASE["CONSENT_ENCRYPTION_KEYS"] not in text
    assert s.client_secret.reveal() == "shh-very-secret"


def test_discovery_override_for_nextcloud():
    env = {
        **BASE,
        "CONSENT_DISCOVERY_URL": "https://cloud.example.com/index.php/.well-known/openid-configuration",
    }
    assert Settings.from_env(env).discovery_url.endswith(
        "/index.php/.well-known/openid-configuration"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONSENT_ISSUER", "not a url"),
        ("CONSENT_ISSUER", "http://id.example.com"),  # clear text outside loopback
        ("CONSENT_REDIRECT_URI", "https://mcp.example.com/cb#frag"),
        ("CONSENT_REDIS_URL", "http://localhost:6379"),
        ("CONSENT_SESSION_TTL", "ten"),
        ("CONSENT_SESSION_TTL", "1"),
        ("CONSENT_REFRESH_MARGIN", "-5"),
        ("CONSENT_HTTP_PORT", "70000"),
        ("CONSENT_SUBJECT_MATCH", "maybe"),
        ("CONSENT_LOG_FORMAT", "xml"),
        ("CONSENT_ENCRYPTION_KEYS", "too-short"),
        ("CONSENT_SCOPES", 'openid "quoted"'),
        ("CONSENT_TOKEN_AUTH_METHOD", "private_key_jwt"),
        ("CONSENT_EVENT_TIMEOUT", "0"),
        ("CONSENT_COMMIT_RETRY_LIMIT", "30"),
        ("CONSENT_COMMIT_RETRY_LIMIT", "soon"),
    ],
)
def test_malformed_values_name_their_variable(variable, value):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, variable: value})
    assert info.value.variable == variable
    assert str(info.value).startswith(variable)


@pytest.mark.parametrize(
    "missing",
    ["CONSENT_ISSUER", "CONSENT_CLIENT_ID", "CONSENT_CLIENT_SECRET", "CONSENT_REDIRECT_URI"],
)
def test_missing_provider_settings_name_their_variable(missing):
    env = {k: v for k, v in BASE.items() if k != missing}
    Settings.from_env(env)  # fine for read-only commands
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env, require_provider=True)
    assert info.value.variable == missing


def test_missing_keys_point_at_the_generator():
    env = {k: v for k, v in BASE.items() if k != "CONSENT_ENCRYPTION_KEYS"}
    with pytest.raises(SettingsError, match="keys generate") as info:
        Settings.from_env(env, require_keys=True)
    assert info.value.variable == "CONSENT_ENCRYPTION_KEYS"


def test_a_bad_key_value_is_not_echoed():
    bad = "A" * 40 + "!!"
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_ENCRYPTION_KEYS": f"{generate_key()},{bad}"})
    assert bad not in str(info.value)
    assert "key 2" in str(info.value)


def test_scopes_must_include_openid():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_SCOPES": "offline_access"}, require_provider=True)
    assert info.value.variable == "CONSENT_SCOPES"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("ops.localhost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),  # noqa: S104 - every interface
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
        ("mcp.example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_hosts(host, loopback):
    from consent_flow._settings import is_loopback_host

    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "mcp.example.com"])  # noqa: S104
def test_listening_beyond_loopback_needs_the_ops_token(host):
    settings = Settings.from_env({**BASE, "CONSENT_HTTP_HOST": host})
    with pytest.raises(SettingsError) as info:
        settings.check_listen_address()
    assert info.value.variable == "CONSENT_OPS_TOKEN"
    assert f"CONSENT_HTTP_HOST ({host}) is not a loopback address" in str(info.value)
    Settings.from_env(
        {**BASE, "CONSENT_HTTP_HOST": host, "CONSENT_OPS_TOKEN": "t" * 32}
    ).check_listen_address()


def test_loopback_listeners_need_no_ops_token():
    for host in ("127.0.0.1", "::1", "localhost"):
        Settings.from_env({**BASE, "CONSENT_HTTP_HOST": host}).check_listen_address()
    Settings.from_env(BASE).check_listen_address()  # the default: 127.0.0.1


WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks example


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"CONSENT_WEBHOOK_URL": "http://hooks.example.com/consent"}, "CONSENT_WEBHOOK_URL"),
        ({"CONSENT_WEBHOOK_URL": "ftp://hooks.example.com/"}, "CONSENT_WEBHOOK_URL"),
        ({"CONSENT_WEBHOOK_URL": "https://hooks.example.com/"}, "CONSENT_WEBHOOK_SECRET"),
        (
            {
                "CONSENT_WEBHOOK_URL": "https://hooks.example.com/",
                "CONSENT_WEBHOOK_SECRET": "x" * 40,
            },
            "CONSENT_WEBHOOK_SECRET",
        ),
        ({"CONSENT_WEBHOOK_SECRET": "whsec_short"}, "CONSENT_WEBHOOK_SECRET"),
        ({"CONSENT_WEBHOOK_FAILING_AFTER": "0"}, "CONSENT_WEBHOOK_FAILING_AFTER"),
        ({"CONSENT_WEBHOOK_FAILING_AFTER": "many"}, "CONSENT_WEBHOOK_FAILING_AFTER"),
        ({"CONSENT_WEBHOOK_FAILING_AFTER": "1001"}, "CONSENT_WEBHOOK_FAILING_AFTER"),
    ],
)
def test_bad_webhook_settings_name_their_variable(changes, variable):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, **changes})
    assert info.value.variable == variable
    secret = changes.get("CONSENT_WEBHOOK_SECRET")
    if secret:
        assert secret not in str(info.value)


def test_webhook_settings():
    s = Settings.from_env(BASE)
    assert (s.webhook_url, s.webhook_secret.reveal(), s.webhook_failing_after) == (None, "", 8)
    for url, extra in [
        ("https://hooks.example.com/consent?via=cf", {}),
        ("http://127.0.0.1:9000/hooks", {}),
        ("http://hooks.localhost/hooks", {}),
        ("http://hooks.test.internal/hooks", {"CONSENT_ALLOW_INSECURE_HTTP": "1"}),
    ]:
        s = Settings.from_env(
            {
                **BASE,
                **extra,
                "CONSENT_WEBHOOK_URL": url,
                "CONSENT_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "CONSENT_WEBHOOK_FAILING_AFTER": "3",
            }
        )
        assert s.webhook_url == url
        assert s.webhook_secret.reveal() == WEBHOOK_SECRET
        assert WEBHOOK_SECRET not in repr(s)
        assert s.webhook_failing_after == 3


def test_commit_retry_limit_defaults_well_above_five_minutes():
    assert Settings.from_env(BASE).commit_retry_limit == 1800
    env = {**BASE, "CONSENT_COMMIT_RETRY_LIMIT": "600"}
    assert Settings.from_env(env).commit_retry_limit == 600


def test_api_keys_are_secrets_read_from_a_comma_separated_list():
    first, second = "a" * 32, "B0-._~+/" * 5 + "=="
    s = Settings.from_env({**BASE, "CONSENT_API_KEYS": f" {first} , {second},"})
    assert [k.reveal() for k in s.api_keys] == [first, second]
    assert first not in repr(s)
    assert Settings.from_env(BASE).api_keys == ()


@pytest.mark.parametrize("bad", ["a" * 31, "a" * 31 + " b", "a" * 40 + "\u00e9", "a" * 32 + ":x"])
def test_a_short_or_unsendable_api_key_is_a_settings_error_that_hides_it(bad):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_API_KEYS": f"{'k' * 32},{bad}"})
    assert info.value.variable == "CONSENT_API_KEYS"
    assert "key 2" in str(info.value)
    assert "at least 32 characters" in str(info.value)
    assert bad not in str(info.value)
