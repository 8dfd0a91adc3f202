"""CONSENT_PROVIDERS_FILE: several providers per deployment, every bad input reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from consent_flow import ProviderConfig, Settings, SettingsError, UnknownProvider, generate_key

REDIRECT = {"CONSENT_REDIRECT_URI": "https://mcp.example.com/oauth/callback"}
TWO = """
[providers.nextcloud]
issuer = "https://cloud.example.com"
discovery_url = "https://cloud.example.com/index.php/.well-known/openid-configuration"
client_id = "mcp"
client_secret_env = "NC_SECRET"
scopes = ["openid", "offline_access", "profile"]
max_refresh_rate = 5
max_concurrency = 4

[providers.github]
issuer = "https://gh.example.com"
client_id = "mcp-gh"
client_secret_env = "GH_SECRET"
subject_match = false
token_auth_method = "client_secret_post"
resource = "https://api.gh.example.com/"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return str(path)


def env_for(path: str, **extra: str) -> dict[str, str]:
    return {
        "CONSENT_PROVIDERS_FILE": path,
        "NC_SECRET": "nc-secret-value",
        "GH_SECRET": "gh-secret-value",
        "CONSENT_ENCRYPTION_KEYS": generate_key(),
        **REDIRECT,
        **extra,
    }


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env, require_provider=True)
    return [str(p) for p in caught.value.problems]


def test_a_providers_file_defines_each_provider_in_file_order(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(write(tmp_path, TWO)), require_provider=True, require_keys=True)
    assert s.provider_names == ("nextcloud", "github")
    nextcloud, github = s.providers
    assert nextcloud.discovery_url.endswith("/index.php/.well-known/openid-configuration")
    assert nextcloud.scopes == ("openid", "offline_access", "profile")
    assert (nextcloud.max_refresh_rate, nextcloud.max_concurrency) == (5.0, 4)
    assert nextcloud.client_secret.reveal() == "nc-secret-value"
    assert github.discovery_url == "https://gh.example.com/.well-known/openid-configuration"
    assert (github.subject_match, github.token_auth_method) == (False, "client_secret_post")
    assert github.scopes == ("openid", "offline_access")
    assert (github.max_refresh_rate, github.max_concurrency) == (None, None)
    seen = s.for_provider("github")
    assert (seen.issuer, seen.client_id, seen.resource) == (
        "https://gh.example.com",
        "mcp-gh",
        "https://api.gh.example.com/",
    )
    assert "gh-secret-value" not in repr(s) and "gh-secret-value" not in str(github.public())


def test_without_a_file_the_v1_variables_are_the_provider_default() -> None:
    s = Settings.from_env(
        {
            "CONSENT_ISSUER": "https://id.example.com",
            "CONSENT_CLIENT_ID": "mcp",
            "CONSENT_CLIENT_SECRET": "shh",
            **REDIRECT,
        },
        require_provider=True,
    )
    (only,) = s.providers
    assert isinstance(only, ProviderConfig)
    assert (only.name, only.issuer, only.client_id) == ("default", s.issuer, "mcp")
    assert s.provider(None) is not None and s.provider("default").name == "default"
    assert s.for_provider(None) is s


def test_an_unknown_name_or_none_among_several_names_the_configured_ones(tmp_path: Path) -> None:
    s = Settings.from_env(env_for(write(tmp_path, TWO)))
    with pytest.raises(UnknownProvider) as caught:
        s.provider("gitlab")
    assert caught.value.code == "unknown_provider"
    assert "gitlab" in str(caught.value) and "nextcloud, github" in str(caught.value)
    with pytest.raises(UnknownProvider, match="name one of nextcloud, github"):
        s.provider(None)
    with pytest.raises(UnknownProvider, match="configured: default"):
        Settings().provider("nextcloud")


def test_every_problem_of_a_bad_file_is_reported_at_once(tmp_path: Path) -> None:
    bad = """
[providers.Bad]
issuer = "ftp://id.example.com"
client_id = "x"
client_secret_env = "UNSET_SECRET"
colour = "blue"

[providers.ok]
issuer = "https://ok.example.com"
client_id = ""
client_secret_env = "NC_SECRET"
scopes = ["profile", "bad\\u0001scope"]
max_refresh_rate = -1
max_concurrency = 2.5
subject_match = "yes"
token_auth_method = "private_key_jwt"
"""
    found = problems(env_for(write(tmp_path, bad), CONSENT_CLIENT_ID="mcp"))
    text = "\n".join(found)
    for expected in (
        "CONSENT_CLIENT_ID: must not be set together with CONSENT_PROVIDERS_FILE",
        "[providers.Bad] the name must match",
        "[providers.Bad] unknown key 'colour'",
        "[providers.Bad] issuer must be an absolute https:// URL",
        "[providers.Bad] client_secret_env names UNSET_SECRET, which is not set",
        "[providers.ok] client_id must be a non-empty string",
        "[providers.ok] scopes contains characters RFC 6749 3.3 forbids",
        "[providers.ok] max_refresh_rate must be a number",
        "[providers.ok] max_concurrency must be a whole number",
        "[providers.ok] subject_match must be true or false",
        "[providers.ok] token_auth_method must be",
    ):
        assert expected in text, expected
    assert "nc-secret-value" not in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[providers.x\nissuer = ", "is not valid TOML"),
        ("", "defines no provider"),
        ("[other]\n", "unknown top-level key 'other'"),
        ('[providers.x]\nissuer = "https://x.example.com"\n', "client_id is required"),
        (
            '[providers.x]\nissuer = "https://x.example.com"\nclient_id = "c"\n'
            'client_secret_env = "NC_SECRET"\nscopes = ["profile"]\n',
            "scopes must include 'openid'",
        ),
    ],
)
def test_a_malformed_file_is_a_settings_error(tmp_path: Path, text: str, expected: str) -> None:
    assert any(expected in p for p in problems(env_for(write(tmp_path, text))))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    found = problems(env_for(str(tmp_path / "nowhere.toml")))
    assert found and found[0].startswith("CONSENT_PROVIDERS_FILE: cannot be read")


def test_the_redirect_uri_is_still_required_with_a_file(tmp_path: Path) -> None:
    env = env_for(write(tmp_path, TWO))
    del env["CONSENT_REDIRECT_URI"]
    assert [p.split(":")[0] for p in problems(env)] == ["CONSENT_REDIRECT_URI"]
