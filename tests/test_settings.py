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
        ("CONSENT_REDIS_WAIT_REPLICAS", "-1"),
        ("CONSENT_REDIS_WAIT_REPLICAS", "all"),
        ("CONSENT_REDIS_WAIT_REPLICAS", "9"),
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
    from consent_flow.settings import is_loopback_host

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


# -- every problem at once, each saying what is accepted ------------------------------------------


def test_every_bad_or_missing_variable_is_named_in_one_error():
    env = {k: v for k, v in BASE.items() if k != "CONSENT_CLIENT_ID"}
    env.update(
        CONSENT_HTTP_PORT="abc",
        CONSENT_REDIS_URL="http://user:hunter2@cache.example.com:6379/0",
        CONSENT_LOG_FORMAT="xml",
    )
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env, require_provider=True, require_keys=True)
    problems = info.value.problems
    assert [p.variable for p in problems] == [
        "CONSENT_REDIS_URL",
        "CONSENT_LOG_FORMAT",
        "CONSENT_HTTP_PORT",
        "CONSENT_CLIENT_ID",
    ]
    assert info.value.variable == "CONSENT_REDIS_URL"
    header, *lines = str(info.value).splitlines()
    assert header == "4 settings are missing or malformed:"
    assert lines == [f"  {p.variable}: {p.message}" for p in problems]
    assert "hunter2" not in str(info.value)  # a Redis URL may carry a password


def test_one_problem_is_one_line_starting_with_its_variable():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_LOG_FORMAT": "xml"})
    assert str(info.value) == "CONSENT_LOG_FORMAT: must be one of 'json', 'console', not 'xml'"
    assert [(p.variable, p.message) for p in info.value.problems] == [
        ("CONSENT_LOG_FORMAT", "must be one of 'json', 'console', not 'xml'")
    ]


def test_a_malformed_required_variable_is_named_once():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_ISSUER": "id.example.com"}, require_provider=True)
    assert [p.variable for p in info.value.problems] == ["CONSENT_ISSUER"]
    assert "e.g. https://id.example.com" in str(info.value)


def test_the_ops_token_rule_joins_the_other_problems():
    from consent_flow.settings import Requirement

    env = {**BASE, "CONSENT_HTTP_HOST": "0.0.0.0", "CONSENT_SESSION_TTL": "ten"}  # noqa: S104
    del env["CONSENT_ENCRYPTION_KEYS"]
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env, requires=set(Requirement))
    assert [p.variable for p in info.value.problems] == [
        "CONSENT_SESSION_TTL",
        "CONSENT_ENCRYPTION_KEYS",
        "CONSENT_OPS_TOKEN",
    ]


def test_secrets_stay_out_of_a_many_problem_message():
    key_like = "B" * 40 + "!!"
    env = {
        **BASE,
        "CONSENT_ENCRYPTION_KEYS": key_like,
        "CONSENT_WEBHOOK_URL": "https://hooks.example.com/",
        "CONSENT_WEBHOOK_SECRET": "whsec_" + "!" * 40,
        "CONSENT_ISSUER": "ftp://admin:s3cr3t-pass@id.example.com",
    }
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert [p.variable for p in info.value.problems] == [
        "CONSENT_ISSUER",
        "CONSENT_ENCRYPTION_KEYS",
        "CONSENT_WEBHOOK_SECRET",
    ]
    for secret in (key_like, "!" * 40, "s3cr3t-pass"):
        assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("CONSENT_HTTP_PORT", "abc", "a port number from 1 to 65535"),
        ("CONSENT_HTTP_PORT", "0", "a port number from 1 to 65535"),
        ("CONSENT_HTTP_PORT", "65536", "a port number from 1 to 65535"),
        ("CONSENT_SESSION_TTL", "ten", "a whole number of seconds >= 2"),
        ("CONSENT_REFRESH_MARGIN", "-5", "a whole number of seconds >= 0"),
        ("CONSENT_KEEPALIVE", "1.5", "a whole number of seconds >= 2"),
        ("CONSENT_HISTORY_RETENTION", "59", "a whole number of seconds >= 60"),
        ("CONSENT_EVENT_TIMEOUT", "0", "a number of seconds > 0 and <= 3600"),
        ("CONSENT_EVENT_TIMEOUT", "nan", "a number of seconds > 0 and <= 3600"),
        ("CONSENT_HTTP_TIMEOUT", "soon", "a number of seconds from 0.1 to 120"),
        ("CONSENT_HTTP_TIMEOUT", "inf", "a number of seconds from 0.1 to 120"),
        (
            "CONSENT_WEBHOOK_FAILING_AFTER",
            "many",
            "a whole number of consecutive failures from 1 to 1000",
        ),
    ],
)
def test_each_number_states_its_own_unit_and_range(variable, value, accepted):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, variable: value})
    assert str(info.value) == f"{variable}: must be {accepted}, not {value!r}"


def test_a_port_is_not_a_number_of_seconds():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_HTTP_PORT": "abc"})
    assert "seconds" not in str(info.value)
    assert "port number from 1 to 65535" in str(info.value)


def test_number_bounds_are_accepted():
    s = Settings.from_env(
        {
            **BASE,
            "CONSENT_HTTP_PORT": "65535",
            "CONSENT_HTTP_TIMEOUT": "0.1",
            "CONSENT_EVENT_TIMEOUT": "3600",
            "CONSENT_WEBHOOK_FAILING_AFTER": "1000",
            "CONSENT_SESSION_TTL": "2",
        }
    )
    assert (s.http_port, s.http_timeout, s.event_timeout) == (65535, 0.1, 3600.0)
    assert (s.webhook_failing_after, s.session_ttl) == (1000, 2)


@pytest.mark.parametrize(
    ("url", "wrong"),
    [
        ("http://localhost:6379", "http:// is not a Redis scheme"),
        ("redis+tls://user:pw@cache:6379", "redis+tls:// is not a Redis scheme"),
        ("localhost:6379", "is not a URL"),
        ("redis://cache.example.com:63x79/0", "has a port that is not a number from 1 to 65535"),
        ("redis+sentinel://s1:26379,s2:port/mymaster", "has a port that is not a number"),
        ("redis+cluster://n1:6379,n2:63x79", "has a port that is not a number"),
        ("redis+cluster://n1:6379,n2:6379/1", "names a database or options; a Redis Cluster"),
        ("unix://", "names no socket path"),
    ],
)
def test_a_bad_redis_url_lists_every_accepted_scheme(url, wrong):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_REDIS_URL": url})
    message = str(info.value)
    assert message.startswith(f"CONSENT_REDIS_URL: {wrong}")
    for scheme in ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://"):
        assert scheme in message.split("accepted:", 1)[1]
    assert "e.g. redis://localhost:6379/0" in message
    assert "pw@" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://:secret@cache.example.com/2",
        "rediss://cache.example.com:6380/0",
        "unix:///run/redis/redis.sock",
        "redis+sentinel://s1:26379,s2:26380/mymaster?db=1",
        "redis+sentinel://:pw@s1/mymaster",
        "redis+cluster://n1:6379,n2:6380,n3",
        "redis+cluster://:pw@n1:7000/",
    ],
)
def test_every_accepted_redis_url_form_passes(url):
    assert Settings.from_env({**BASE, "CONSENT_REDIS_URL": url}).redis_url == url


def test_allow_insecure_http_takes_0_or_1():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**BASE, "CONSENT_ALLOW_INSECURE_HTTP": "true"})
    assert str(info.value) == "CONSENT_ALLOW_INSECURE_HTTP: must be one of '0', '1', not 'true'"
    plain = {**BASE, "CONSENT_ISSUER": "http://id.test.internal"}
    assert Settings.from_env({**plain, "CONSENT_ALLOW_INSECURE_HTTP": "1"}).issuer
    with pytest.raises(SettingsError, match="CONSENT_ISSUER: must use https://"):
        Settings.from_env({**plain, "CONSENT_ALLOW_INSECURE_HTTP": "0"})


def test_check_provider_names_every_missing_variable():
    settings = Settings.from_env({"CONSENT_SCOPES": "profile"})
    with pytest.raises(SettingsError) as info:
        settings.check_provider()
    assert [p.variable for p in info.value.problems] == [
        "CONSENT_ISSUER",
        "CONSENT_CLIENT_ID",
        "CONSENT_CLIENT_SECRET",
        "CONSENT_REDIRECT_URI",
        "CONSENT_SCOPES",
    ]


@pytest.mark.parametrize(
    ("url", "setting", "waits"),
    [
        ("redis+sentinel://s1:26379,s2:26379/main", None, 1),
        ("redis+sentinel://s1:26379,s2:26379/main", "0", 0),
        ("redis+sentinel://s1:26379,s2:26379/main", "2", 2),
        ("redis+cluster://n1:6379,n2:6379", None, 1),
        ("redis+cluster://n1:6379,n2:6379", "0", 0),
        ("redis://127.0.0.1:6379/0", None, 0),
        ("redis://127.0.0.1:6379/0", "1", 1),
        (None, None, 0),
    ],
)
def test_commits_of_new_tokens_wait_for_a_replica_behind_sentinel_or_on_a_cluster_by_default(
    url, setting, waits
):
    env = dict(BASE)
    env.pop("CONSENT_REDIS_URL", None)
    if url is not None:
        env["CONSENT_REDIS_URL"] = url
    if setting is not None:
        env["CONSENT_REDIS_WAIT_REPLICAS"] = setting
    assert Settings.from_env(env).wait_replicas == waits
