"""docker-compose.yml and the Dockerfiles, checked without a Docker engine.

The compose file is validated against the official Compose Specification schema (vendored in
tests/data, see tests/data/README.md), and the properties the design relies on are pinned:
Redis persists with an append-only file, the consent-flow services wait for a healthy Redis,
they share one environment, the issuer and client agree between provider and consumers, and no
secret value is written in the file.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"

SECRET_VARS = ("CONSENT_CLIENT_SECRET", "CONSENT_ENCRYPTION_KEYS", "CONSENT_OPS_TOKEN")
CONSENT_SERVICES = ("worker", "callback")
# The same two on Sentinel (profile "sentinel") and on a Redis Cluster (profile "cluster").
HA_SERVICES = ("worker-ha", "callback-ha")
CLUSTER_SERVICES = ("worker-cluster", "callback-cluster")
CLUSTER_NODES = ("redis-node-1", "redis-node-2", "redis-node-3")
# Every setting a consent-flow process needs to talk to the provider and to Redis.
REQUIRED_SETTINGS = (
    "CONSENT_REDIS_URL",
    "CONSENT_ISSUER",
    "CONSENT_CLIENT_ID",
    "CONSENT_CLIENT_SECRET",
    "CONSENT_REDIRECT_URI",
    "CONSENT_SCOPES",
    "CONSENT_ENCRYPTION_KEYS",
    "CONSENT_HTTP_HOST",
    "CONSENT_HTTP_PORT",
)


def _required_interpolation(var: str) -> re.Pattern[str]:
    """`${VAR:?message}` (or `${VAR?message}`): Compose refuses to start when VAR is unset."""
    return re.compile(r"\$\{" + re.escape(var) + r":?\?[^${}]+\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        document = yaml.safe_load(fh)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    # The Compose Specification declares draft-07; validate with exactly that dialect.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.Draft7Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever form (mapping or KEY=VALUE list) it uses."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return dict(environment)


def _redis_url_only(compose: dict[str, Any], service: dict[str, Any]) -> str:
    """The service's ``CONSENT_REDIS_URL``, the one setting it holds apart from the plain
    services' shared environment."""
    env = _env(service)
    plain = dict(compose["x-consent-env"])
    url = env.pop("CONSENT_REDIS_URL")
    plain.pop("CONSENT_REDIS_URL")
    assert env == plain, "the same environment as the plain services but for Redis"
    return url


def _ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Published ports in short syntax, as (host_ip, published, target)."""
    result = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        result.append((host_ip, int(parts[-2]), int(parts[-1])))
    return result


# -- the schema -------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.Draft7Validator
) -> None:
    assert _errors(validator, compose) == []


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {"services": {"x": {"image": 1, "unknown_key": 2}}},
            # (where, which JSON Schema keyword rejected it)
            {("services/x/image", "type"), ("services/x", "additionalProperties")},
            id="wrong-type-and-unknown-key",
        ),
        pytest.param(
            {"servics": {}}, {("<root>", "additionalProperties")}, id="unknown-top-level-key"
        ),
        pytest.param(
            {"services": {"x": {"image": "a", "depends_on": {"y": {"condition": "healthy"}}}}},
            {("services/x/depends_on", "oneOf")},
            id="bad-depends-on-condition",
        ),
    ],
)
def test_broken_documents_fail_validation(
    validator: jsonschema.Draft7Validator,
    document: dict[str, Any],
    expected: set[tuple[str, str]],
) -> None:
    errors = list(validator.iter_errors(document))
    assert errors, "a broken compose document passed validation"
    found = {("/".join(map(str, e.absolute_path)) or "<root>", str(e.validator)) for e in errors}
    assert expected <= found, _errors(validator, document)


def test_a_broken_copy_of_the_real_file_fails_validation(
    compose: dict[str, Any], validator: jsonschema.Draft7Validator
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["healthcheck"]["retries_typo"] = 3
    assert _errors(validator, broken)


# -- what the design needs ---------------------------------------------------------------------


def test_the_four_services_exist(compose: dict[str, Any]) -> None:
    assert {"redis", "worker", "callback", "provider"} <= set(compose["services"])


def test_redis_persists_with_an_append_only_file_on_a_named_volume(
    compose: dict[str, Any],
) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    argv = command.split() if isinstance(command, str) else list(command)
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--appendfsync") + 1] == "everysec"

    mounts = [str(volume).split(":") for volume in redis["volumes"]]
    data = [source for source, target, *_ in mounts if target == "/data"]
    assert len(data) == 1
    assert data[0] in compose["volumes"], "/data must be a named volume, not a bind mount"

    test = redis["healthcheck"]["test"]
    assert "redis-cli" in test
    assert "ping" in test


@pytest.mark.parametrize("name", CONSENT_SERVICES)
def test_consent_services_wait_for_a_healthy_redis_and_the_provider(
    compose: dict[str, Any], name: str
) -> None:
    depends_on = compose["services"][name]["depends_on"]
    assert isinstance(depends_on, dict), "use the long form, so conditions can be given"
    assert depends_on["redis"]["condition"] == "service_healthy"
    assert "provider" in depends_on
    if depends_on["provider"]["condition"] == "service_healthy":
        assert "healthcheck" in compose["services"]["provider"]


def test_services_run_the_right_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["worker"]["command"] in (["worker"], "worker")
    assert services["callback"]["command"] in (["serve"], "serve")


def test_every_service_has_a_restart_policy(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


def test_consent_services_share_one_complete_environment(compose: dict[str, Any]) -> None:
    shared = compose["x-consent-env"]
    assert set(REQUIRED_SETTINGS) <= set(shared)
    for name in CONSENT_SERVICES:
        assert _env(compose["services"][name]) == shared, name
    # YAML would turn a bare on/off/yes/600 into a bool or an int; the process needs strings.
    for key, value in shared.items():
        assert isinstance(value, str), f"{key} must be a quoted string, got {value!r}"
    assert shared["CONSENT_SUBJECT_MATCH"] in ("on", "off")
    assert shared["CONSENT_LOG_FORMAT"] in ("json", "console")
    assert "openid" in shared["CONSENT_SCOPES"].split()
    assert "offline_access" in shared["CONSENT_SCOPES"].split()


def test_no_secret_value_is_written_in_the_file(compose: dict[str, Any]) -> None:
    seen = 0
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if key in SECRET_VARS:
                seen += 1
                assert _required_interpolation(key).fullmatch(value), (name, key)
    assert seen == len(SECRET_VARS) * len(CONSENT_SERVICES + HA_SERVICES + CLUSTER_SERVICES)

    # The provider is given the same client secret, by the same interpolation.
    clients = json.loads(_env(compose["services"]["provider"])["CLIENTS"])
    assert clients
    for client in clients:
        pattern = _required_interpolation("CONSENT_CLIENT_SECRET")
        assert pattern.fullmatch(client["client_secret"])

    # Nothing else in the file looks like a secret handed in literally.
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if re.search(r"SECRET|PASSWORD|TOKEN|KEYS?$", key) and key not in SECRET_VARS:
                assert str(value).startswith("${"), (name, key)


def test_provider_and_consumers_agree_on_issuer_client_and_redirect(
    compose: dict[str, Any],
) -> None:
    shared = compose["x-consent-env"]
    provider = compose["services"]["provider"]
    provider_env = _env(provider)

    # The ID token's `iss` is compared byte for byte with CONSENT_ISSUER.
    assert provider_env["ISSUER"] == shared["CONSENT_ISSUER"]
    issuer = urlsplit(shared["CONSENT_ISSUER"])
    assert issuer.port is not None
    assert provider_env["PORT"] == str(issuer.port)

    # Containers reach the issuer host through a network alias of the provider ...
    aliases = provider["networks"]["default"]["aliases"]
    assert issuer.hostname in aliases
    # ... and the browser on the host through loopback (*.localhost) and the published port.
    assert issuer.hostname == "localhost" or str(issuer.hostname).endswith(".localhost")
    assert (issuer.port, issuer.port) in [(pub, target) for _, pub, target in _ports(provider)]

    clients = json.loads(provider_env["CLIENTS"])
    ours = [client for client in clients if client["client_id"] == shared["CONSENT_CLIENT_ID"]]
    assert len(ours) == 1
    assert shared["CONSENT_REDIRECT_URI"] in ours[0]["redirect_uris"]


def test_callback_is_published_and_health_checked_on_its_port(compose: dict[str, Any]) -> None:
    shared = compose["x-consent-env"]
    callback = compose["services"]["callback"]
    port = int(shared["CONSENT_HTTP_PORT"])
    redirect = urlsplit(shared["CONSENT_REDIRECT_URI"])

    assert redirect.path == "/oauth/callback"
    assert redirect.port == port
    assert (port, port) in [(pub, target) for _, pub, target in _ports(callback)]
    # Reachable through the published port only if it listens on every interface.
    assert shared["CONSENT_HTTP_HOST"] == "0.0.0.0"  # noqa: S104

    test = " ".join(callback["healthcheck"]["test"])
    assert f":{port}/healthz" in test


def test_the_callback_server_listening_beyond_loopback_has_an_ops_token(
    compose: dict[str, Any],
) -> None:
    """`serve` refuses a non-loopback CONSENT_HTTP_HOST without CONSENT_OPS_TOKEN: the file
    hands it the token, so the service starts (values filled in as Compose would)."""
    from consent_flow import Settings, SettingsError, generate_key

    filled = {"CONSENT_ENCRYPTION_KEYS": generate_key()}
    env = {
        key: filled.get(key, "x" * 32) if value.startswith("${") else value
        for key, value in _env(compose["services"]["callback"]).items()
    }
    Settings.from_env(env, require_provider=True, require_keys=True).check_listen_address()
    del env["CONSENT_OPS_TOKEN"]
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env, require_provider=True, require_keys=True).check_listen_address()
    assert info.value.variable == "CONSENT_OPS_TOKEN"


# -- the images --------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_application_image_runs_the_cli_as_an_unprivileged_user() -> None:
    instructions = _instructions(ROOT / "Dockerfile")
    assert instructions[0] == ("FROM", "python:3.12-slim")
    assert any(kw == "RUN" and "pip install ." in rest for kw, rest in instructions)
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoints = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entrypoints
    assert json.loads(entrypoints[-1]) == ["consent-flow"]


def test_provider_image_installs_locked_production_dependencies() -> None:
    instructions = _instructions(ROOT / "examples" / "provider" / "Dockerfile")
    assert instructions[0] == ("FROM", "node:22-alpine")
    assert any(kw == "RUN" and "npm ci --omit=dev" in rest for kw, rest in instructions)
    assert ("EXPOSE", "9090") in instructions
    commands = [rest for kw, rest in instructions if kw == "CMD"]
    assert commands
    assert json.loads(commands[-1]) == ["node", "server.mjs"]


def test_the_application_image_and_its_comments_agree_about_redis() -> None:
    """No redis-server in the image: nothing may suggest running it on an embedded Redis."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    installs_redis = any(
        kw == "RUN" and "redis-server" in rest for kw, rest in _instructions(ROOT / "Dockerfile")
    )
    if not installs_redis:
        comments = " ".join(
            line.lstrip("# ") for line in dockerfile.splitlines() if line.startswith("#")
        )
        assert "CONSENT_REDIS_URL is unset" not in comments
        assert "CONSENT_REDIS_URL=redis://" in comments


# -- the operator on the host, with the compose file's own environment -------------------------


def _outward_address() -> str | None:
    """This machine's address on its way out: what a container sees a host's request come from
    is not loopback either. None when the machine has no such interface."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.integration
def test_the_callback_service_serves_ops_and_metrics_to_the_operator_with_the_token(
    compose: dict[str, Any], redis_server: Any, provider: Any, tmp_path: Path
) -> None:
    """`serve` as compose runs it (every interface, the token from the environment), reached
    from an address that is not loopback, as published ports deliver the host's requests:
    without the token /ops and /metrics refuse (401 with a challenge), with it they answer."""
    import os
    import subprocess
    import sys
    import time

    import httpx
    from conftest import free_port

    from consent_flow import generate_key

    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no interface besides loopback")
    port = free_port()
    token = "t" * 40
    env = {
        key: value
        for key, value in _env(compose["services"]["callback"]).items()
        if not value.startswith("${")
    }
    env.update(
        # What compose fills in from the host's environment, and where this test's Redis and
        # provider are (the containers' names do not resolve here).
        CONSENT_CLIENT_SECRET="demo-secret",
        CONSENT_ENCRYPTION_KEYS=generate_key(),
        CONSENT_OPS_TOKEN=token,
        CONSENT_REDIS_URL=redis_server.url,
        CONSENT_REDIS_PREFIX="compose" + str(port),
        CONSENT_ISSUER=provider.issuer,
        CONSENT_HTTP_PORT=str(port),
        CONSENT_DATA_DIR=str(tmp_path / "data"),
    )
    assert env["CONSENT_HTTP_HOST"] == "0.0.0.0"  # noqa: S104
    process = subprocess.Popen(
        [sys.executable, "-m", "consent_flow", "serve"],
        env={**os.environ, **env, "HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://{address}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        for path in ("/ops", "/metrics"):
            refused = httpx.get(base + path, timeout=5)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Basic ")
            wrong = httpx.get(base + path, headers={"Authorization": "Bearer " + "x" * 40})
            assert wrong.status_code == 401, path
            bearer = httpx.get(base + path, headers={"Authorization": f"Bearer {token}"})
            assert bearer.status_code == 200, path
            browser = httpx.get(base + path, auth=("operator", token))  # any user name
            assert browser.status_code == 200, path
        metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert "consent_flow_" in metrics.text
    finally:
        process.terminate()
        process.wait(timeout=20)
        if process.stderr:
            process.stderr.close()


@pytest.mark.parametrize("name", ["Dockerfile", "docker-compose.yml", "README.md"])
def test_no_text_suggests_up_in_the_image_without_a_redis_url(name: str) -> None:
    """The image has no redis-server: wherever `docker run ... up` is suggested, the same
    paragraph hands it CONSENT_REDIS_URL."""
    installs_redis = any(
        kw == "RUN" and "redis-server" in rest for kw, rest in _instructions(ROOT / "Dockerfile")
    )
    assert not installs_redis
    text = (ROOT / name).read_text(encoding="utf-8")
    paragraphs = re.split(r"\n\s*#?\s*\n", text)
    suggesting = [p for p in paragraphs if re.search(r"docker run\b[^\n]*\bup\b", p)]
    for paragraph in suggesting:
        assert "CONSENT_REDIS_URL=redis://" in paragraph, paragraph


def test_the_sentinel_profile_runs_a_primary_a_replica_and_three_sentinels(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    ha = {name for name, service in services.items() if "sentinel" in service.get("profiles", ())}
    sentinels = {"sentinel-1", "sentinel-2", "sentinel-3"}
    assert ha == {"redis-primary", "redis-replica", *sentinels, *HA_SERVICES}
    # The plain services stay out of it: `up worker-ha callback-ha` starts the profile only.
    for name in ("redis", *CONSENT_SERVICES, "provider"):
        assert "profiles" not in services[name], name

    def argv(name: str) -> list[str]:
        command = services[name]["command"]
        return command.split() if isinstance(command, str) else list(command)

    primary, replica = argv("redis-primary"), argv("redis-replica")
    for line in (primary, replica):
        assert line[line.index("--appendonly") + 1] == "yes"
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis-primary", "6379"]
    assert "--replicaof" not in primary

    for name in sentinels:
        script = argv(name)[-1]
        assert services[name]["hostname"] == name
        assert "--sentinel" in script
        assert "sentinel monitor consentflow redis-primary 6379 2" in script  # quorum 2 of 3
        assert "sentinel resolve-hostnames yes" in script
        test = services[name]["healthcheck"]["test"]
        assert "26379" in test and "consentflow" in test
        assert services[name]["depends_on"]["redis-primary"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", HA_SERVICES)
def test_the_sentinel_profile_app_reaches_redis_through_every_sentinel(
    compose: dict[str, Any], name: str
) -> None:
    from consent_flow import Settings
    from consent_flow.store.connection import arq_redis_settings

    service = compose["services"][name]
    url = _redis_url_only(compose, service)
    settings = Settings.from_env({"CONSENT_REDIS_URL": url})
    assert settings.wait_replicas == 1  # commits of new tokens wait for the replica
    rs = arq_redis_settings(url)
    assert rs.sentinel and rs.sentinel_master == "consentflow"
    assert sorted(rs.host) == [(f"sentinel-{i}", 26379) for i in (1, 2, 3)]
    for sentinel in ("sentinel-1", "sentinel-2", "sentinel-3"):
        assert service["depends_on"][sentinel]["condition"] == "service_healthy"
    assert "redis" not in service["depends_on"]
    assert service["command"] in (["worker"], ["serve"])


def test_the_cluster_profile_runs_three_persistent_primaries_and_creates_the_cluster_once(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    profile = {
        name for name, service in services.items() if "cluster" in service.get("profiles", ())
    }
    assert profile == {*CLUSTER_NODES, "redis-cluster-init", *CLUSTER_SERVICES}
    for name in CLUSTER_NODES:
        script = services[name]["command"][-1]
        assert services[name]["hostname"] == name
        assert script.startswith("exec redis-server ")
        for option in (
            "--cluster-enabled yes",
            "--appendonly yes",
            "--cluster-config-file /data/nodes.conf",  # on the volume: a restart keeps its place
            "--cluster-announce-hostname $${HOSTNAME}",
            "--cluster-preferred-endpoint-type hostname",
        ):
            assert option in " ".join(script.split()), (name, option)
        [volume] = services[name]["volumes"]
        source, target = volume.split(":")
        assert target == "/data" and source in compose["volumes"]
    assert len({services[name]["volumes"][0] for name in CLUSTER_NODES}) == 3

    init = services["redis-cluster-init"]
    script = " ".join(init["command"][-1].split())
    create = "redis-cli --cluster create " + " ".join(f"{n}:6379" for n in CLUSTER_NODES)
    assert create in script and "--cluster-replicas 0" in script
    # Guarded: on a later start the slots are already handed out, and nothing is created.
    assert script.index("cluster_slots_assigned:16384") < script.index("||") < script.index(create)
    for name in CLUSTER_NODES:
        assert init["depends_on"][name]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", CLUSTER_SERVICES)
def test_the_cluster_profile_app_reaches_every_node_once_the_cluster_exists(
    compose: dict[str, Any], name: str
) -> None:
    from consent_flow import Settings
    from consent_flow.store.connection import arq_redis_settings

    service = compose["services"][name]
    url = _redis_url_only(compose, service)
    assert url.startswith("redis+cluster://")
    Settings.from_env({"CONSENT_REDIS_URL": url})
    rs = arq_redis_settings(url)
    assert sorted(rs.host) == [(node, 6379) for node in CLUSTER_NODES]
    condition = service["depends_on"]["redis-cluster-init"]["condition"]
    assert condition == "service_completed_successfully"
    assert "redis" not in service["depends_on"]
    assert service["command"] in (["worker"], ["serve"])
