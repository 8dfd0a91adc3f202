"""Settings: read from the environment once, at the edge, into one frozen object.

The library itself never reads ``os.environ``; ``Settings.from_env`` is called by the command line,
the worker settings and ``ConsentClient.from_env`` and the object is passed down from there.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NoReturn
from urllib.parse import parse_qs, urlsplit

from consent_flow.core.connections import DEFAULT_PROVIDER, PROVIDER_NAME, is_provider_name
from consent_flow.errors import SettingProblem, SettingsError, UnknownProvider

__all__ = [
    "DEFAULT_PROVIDER",
    "PROVIDER_FILE_KEYS",
    "PROVIDER_VARIABLES",
    "REQUIRED_VARIABLES",
    "ProviderConfig",
    "Requirement",
    "Secret",
    "SettingProblem",
    "Settings",
    "is_loopback_host",
    "parse_shard_set",
]

DEFAULT_SCOPES = ("openid", "offline_access")
DEFAULT_SESSION_TTL = 600  # seconds a user has to approve at the provider
DEFAULT_REFRESH_MARGIN = 120  # refresh this long before the access token expires
DEFAULT_KEEPALIVE = 24 * 3600  # refresh at least this often, even if the token never expires
DEFAULT_HISTORY_RETENTION = 90 * 24 * 3600
DEFAULT_EVENT_TIMEOUT = 15.0  # how long a caller waits for the worker's outcome
MAX_EVENT_TIMEOUT = 3600.0  # the longest an event may wait for a worker before it expires
DEFAULT_HTTP_PORT = 8080
DEFAULT_HTTP_TIMEOUT = 10.0  # seconds for one call to the provider
# Seconds a worker keeps retrying the commit of tokens a provider already issued (Redis away);
# well above a Sentinel failover, and above the 5-minute outage a worker is built to ride out.
DEFAULT_COMMIT_RETRY_LIMIT = 1800
MIN_COMMIT_RETRY_LIMIT = 60
MAX_WAIT_REPLICAS = 5
MIN_HTTP_TIMEOUT = 0.1
DEFAULT_REFRESH_BATCH = 64  # scheduled refreshes one worker takes at once
MAX_REFRESH_BATCH = 1000
DEFAULT_REDIS_SHARDS = 16  # hash tags connections are spread over (CONSENT_REDIS_SHARDS)
MAX_REDIS_SHARDS = 1024
MAX_HTTP_TIMEOUT = 120.0
MAX_SCOPES_LENGTH = 2000
# A refresh_failing webhook goes out at this many consecutive transient refresh failures (with
# the default backoff, two to four minutes of failing), refresh_recovered after a run that long.
DEFAULT_WEBHOOK_FAILING_AFTER = 8
MAX_WEBHOOK_FAILING_AFTER = 1000
MIN_API_KEY_LENGTH = 32  # characters: a guessable key would open every user's tokens
# RFC 6750 2.1: what an Authorization: Bearer header can carry.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

# The schemes store.connection connects with (redis-py's and arq's, Sentinel's and Cluster's).
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
REDIS_URL_ACCEPTED = (
    "accepted: redis://[:password@]host:6379/0, rediss://host:6380/0 (TLS), "
    "unix:///path/to/redis.sock (a socket), redis+sentinel://host:26379,host2:26379/mymaster "
    "or redis+cluster://host:6379,host2:6379 (nodes of a Redis Cluster); "
    "e.g. redis://localhost:6379/0"
)
WEBHOOK_SECRET_ACCEPTED = (
    "expected whsec_ and 24 to 64 random bytes in base64, e.g. from: python -c "
    "\"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
)
MAX_SHOWN_VALUE = 40  # characters of a rejected value quoted back in a message
MAX_PROVIDERS = 64  # providers one deployment serves; each has its own engine stack per worker
MAX_REFRESH_RATE = 1_000_000.0  # refreshes per second to one provider: beyond it, a typo
MAX_CONCURRENCY = 100_000

# The v1 variables that describe the one provider; with CONSENT_PROVIDERS_FILE they must be unset
# (the file is then the only source of providers, and a stray variable would be silently ignored).
PROVIDER_VARIABLES = (
    "CONSENT_ISSUER",
    "CONSENT_DISCOVERY_URL",
    "CONSENT_CLIENT_ID",
    "CONSENT_CLIENT_SECRET",
    "CONSENT_SCOPES",
    "CONSENT_RESOURCE",
    "CONSENT_SUBJECT_MATCH",
    "CONSENT_TOKEN_AUTH_METHOD",
    "CONSENT_REVOKE_REPLACED_GRANT",
)
# What a [providers.NAME] table of CONSENT_PROVIDERS_FILE may hold; issuer, client_id and
# client_secret_env are required.
PROVIDER_FILE_KEYS = (
    "issuer",
    "discovery_url",
    "client_id",
    "client_secret_env",
    "scopes",
    "resource",
    "subject_match",
    "token_auth_method",
    "revoke_replaced_grant",
    "max_refresh_rate",
    "max_concurrency",
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class Requirement(enum.Enum):
    """What a caller of :meth:`Settings.from_env` is about to do, and so which settings it needs."""

    PROVIDER = "provider"  # talk to the OpenID provider as its confidential client
    KEYS = "keys"  # read or write encrypted tokens
    LISTENER = "listener"  # listen on CONSENT_HTTP_HOST, serving /ops and /metrics too


# The one table of required variables: ``from_env`` demands them and ``--help`` lists them.
REQUIRED_VARIABLES: Mapping[Requirement, tuple[tuple[str, str], ...]] = {
    Requirement.PROVIDER: (
        ("CONSENT_ISSUER", "the provider's issuer URL"),
        ("CONSENT_CLIENT_ID", "the client id registered at the provider"),
        ("CONSENT_CLIENT_SECRET", "that client's secret: a confidential client"),
        ("CONSENT_REDIRECT_URI", "the redirect URI registered for that client"),
    ),
    Requirement.KEYS: (("CONSENT_ENCRYPTION_KEYS", "create one with: consent-flow keys generate"),),
    Requirement.LISTENER: (
        ("CONSENT_OPS_TOKEN", "only when CONSENT_HTTP_HOST is not a loopback address"),
    ),
}

AuthMethod = Literal["client_secret_basic", "client_secret_post"]
LogFormat = Literal["json", "console"]


class Secret:
    """A string that does not show itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # arq pickles job arguments into Redis: a secret must fail loudly on the way there.
        raise TypeError("a Secret cannot be pickled")


def parse_shard_set(raw: str, shards: int) -> tuple[int, ...]:
    """``CONSENT_WORKER_SHARDS``: shard numbers and ranges, e.g. "0-7,12", each below
    ``shards``; returned sorted, each once."""
    chosen: set[int] = set()
    for part in raw.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.strip().isdigit() or (dash and not high.strip().isdigit()):
            raise ValueError(f"{_shown(part)!s} is not a shard number or range (e.g. 0-7,12)")
        first, last = int(low), int(high) if dash else int(low)
        if first > last or last >= shards:
            raise ValueError(f"{part} is not within the shards 0-{shards - 1}")
        chosen.update(range(first, last + 1))
    return tuple(sorted(chosen))


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or a name, without a port) can only mean this machine:
    ``localhost`` and names under ``.localhost`` (RFC 6761), 127.0.0.0/8, ::1."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _shown(raw: str) -> str:
    """A rejected (non-secret) value as quoted back in a message, cut short if long."""
    if len(raw) > MAX_SHOWN_VALUE:
        return repr(raw[:MAX_SHOWN_VALUE] + "...")
    return repr(raw)


def _redis_url_problem(value: str) -> str | None:
    """What is wrong with a Redis URL, without echoing it (it may hold a password)."""
    parts = urlsplit(value)
    if "://" not in value:
        return "is not a URL"
    if parts.scheme not in REDIS_URL_SCHEMES:
        return f"{parts.scheme}:// is not a Redis scheme"
    if parts.scheme == "unix":
        return None if parts.path else "names no socket path"
    bad_port = "has a port that is not a number from 1 to 65535"
    if parts.scheme not in ("redis+sentinel", "redis+cluster"):
        try:
            parts.port  # noqa: B018 - urllib checks the port when it is read
        except ValueError:
            return bad_port
        return None
    # The forms consent_flow.store.connection parses: redis+sentinel://host:26379,host2:26379/
    # mymaster?db=0 and redis+cluster://host:6379,host2:6379
    for host in parts.netloc.rsplit("@", 1)[-1].split(","):
        port = host.partition(":")[2] or "6379"
        if not (port.isdigit() and 0 < int(port) <= 65535):
            return bad_port
    if parts.scheme == "redis+cluster":
        if parts.path.strip("/") or parts.query:
            return "names a database or options; a Redis Cluster has database 0 only"
        return None
    if not all(db.isdigit() for db in parse_qs(parts.query).get("db", [])):
        return "has a db= that is not a whole number"
    return None


def _scope_problem(scopes: tuple[str, ...], raw_length: int) -> str | None:
    """What is wrong with a list of base scopes, or None."""
    if raw_length > MAX_SCOPES_LENGTH:
        return f"is {raw_length} characters long; at most {MAX_SCOPES_LENGTH} are accepted"
    # RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    if not all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in "".join(scopes)):
        return (
            "contains characters RFC 6749 3.3 forbids; expected space separated scopes "
            'of printable ASCII without " or \\, e.g. "openid offline_access"'
        )
    return None


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One configured OpenID provider: its issuer, this deployment's client there, the base
    scopes every session asks for, and the limits refreshes to it keep."""

    name: str
    issuer: str
    discovery_url: str
    client_id: str
    client_secret: Secret
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    resource: str | None = None
    subject_match: bool = True
    token_auth_method: AuthMethod = "client_secret_basic"
    # Whether an approved upgrade revokes the refresh token it replaces. Off by default: most
    # providers extend the grant they already hold (oidc-provider within one browser session,
    # Keycloak's offline session, Google's per-client grant), and revoking the replaced token
    # there ends the new grant too. On only for a provider that issues a separate grant each time.
    revoke_replaced_grant: bool = False
    max_refresh_rate: float | None = None  # refreshes per second, fleet-wide; None: no limit
    max_concurrency: int | None = None  # refreshes in flight at once, fleet-wide; None: no limit

    def public(self) -> dict[str, object]:
        """What an operator may see (no secret, not even the variable holding it)."""
        return {
            "name": self.name,
            "issuer": self.issuer,
            "discovery_url": self.discovery_url,
            "client_id": self.client_id,
            "scopes": list(self.scopes),
            "resource": self.resource,
            "subject_match": self.subject_match,
            "token_auth_method": self.token_auth_method,
            "revoke_replaced_grant": self.revoke_replaced_grant,
            "max_refresh_rate": self.max_refresh_rate,
            "max_concurrency": self.max_concurrency,
        }


def _read_providers(
    path_text: str, env: Mapping[str, str], insecure: bool
) -> tuple[tuple[ProviderConfig, ...], list[SettingProblem]]:
    """The providers of a ``CONSENT_PROVIDERS_FILE``, and every problem found in it (all of
    them, so one run shows everything to fix). Secrets come from the variables the file names."""
    problems: list[SettingProblem] = []

    def problem(where: str, message: str) -> None:
        problems.append(SettingProblem("CONSENT_PROVIDERS_FILE", f"{where}{message}"))

    try:
        with open(path_text, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        problem("", f"cannot be read ({exc.strerror or type(exc).__name__}): {_shown(path_text)}")
        return (), problems
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problem("", f"is not valid TOML: {exc}")
        return (), problems
    for key in document:
        if key != "providers":
            problem("", f"has an unknown top-level key {_shown(key)}; expected [providers.NAME]")
    tables = document.get("providers")
    if not isinstance(tables, dict) or not tables:
        problem("", "defines no provider; expected one [providers.NAME] table per provider")
        return (), problems
    if len(tables) > MAX_PROVIDERS:
        problem("", f"defines {len(tables)} providers; at most {MAX_PROVIDERS} are accepted")
    found: list[ProviderConfig] = []
    for name, table in tables.items():
        config, wrong = _provider_from_table(str(name), table, env, insecure)
        problems.extend(wrong)
        if config is not None:
            found.append(config)
    return tuple(found), problems


def _provider_from_table(
    name: str, table: object, env: Mapping[str, str], insecure: bool
) -> tuple[ProviderConfig | None, list[SettingProblem]]:
    """One ``[providers.NAME]`` table as a provider, or None and every problem it has."""
    problems: list[SettingProblem] = []

    def problem(where: str, message: str) -> None:
        problems.append(SettingProblem("CONSENT_PROVIDERS_FILE", f"{where}{message}"))

    where = f"[providers.{name if len(name) <= MAX_SHOWN_VALUE else name[:40] + '...'}] "
    if not is_provider_name(name):
        problem(where, f"the name must match {PROVIDER_NAME.pattern}")
    if not isinstance(table, dict):
        problem(where, "must be a table of settings")
        return None, problems
    for key in table:
        if key not in PROVIDER_FILE_KEYS:
            problem(where, f"unknown key {_shown(key)}; known: {', '.join(PROVIDER_FILE_KEYS)}")

    def text(key: str, *, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                problem(where, f"{key} is required")
            return None
        if not isinstance(value, str) or not value.strip():
            problem(where, f"{key} must be a non-empty string")
            return None
        return value.strip()

    def url(key: str, example: str, *, required: bool = False) -> str | None:
        value = text(key, required=required)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
            problem(where, f"{key} must be an absolute https:// URL without #, e.g. {example}")
            return None
        if parts.scheme == "http" and not is_loopback_host(parts.hostname) and not insecure:
            problem(
                where,
                f"{key} must use https:// off loopback (set CONSENT_ALLOW_INSECURE_HTTP=1 "
                "for test networks)",
            )
            return None
        return value

    issuer = url("issuer", "https://id.example.com", required=True)
    discovery = url("discovery_url", "https://id.example.com/.well-known/openid-configuration") or (
        issuer and issuer.rstrip("/") + "/.well-known/openid-configuration"
    )
    client_id = text("client_id", required=True)
    secret = Secret("")
    secret_env = text("client_secret_env", required=True)
    if secret_env is not None:
        if not _ENV_NAME.fullmatch(secret_env):
            problem(where, "client_secret_env must name an environment variable, e.g. GH_SECRET")
        elif not (env.get(secret_env) or "").strip():
            problem(
                where,
                f"client_secret_env names {secret_env}, which is not set: put the client's "
                "secret there (secrets never sit in the file)",
            )
        else:
            secret = Secret(env[secret_env].strip())
    scopes = DEFAULT_SCOPES
    raw_scopes = table.get("scopes")
    if raw_scopes is not None:
        if isinstance(raw_scopes, str):
            raw_scopes = raw_scopes.split()
        if not isinstance(raw_scopes, list) or not all(
            isinstance(x, str) and x for x in raw_scopes
        ):
            problem(where, 'scopes must be a list of strings, e.g. ["openid", "offline_access"]')
        else:
            scopes = tuple(dict.fromkeys(raw_scopes))
            if wrong := _scope_problem(scopes, len(" ".join(scopes))):
                problem(where, f"scopes {wrong}")
            elif "openid" not in scopes:
                problem(where, "scopes must include 'openid' (the ID token names the user)")
    resource = url("resource", "https://api.example.com/")
    subject_match = table.get("subject_match", True)
    if not isinstance(subject_match, bool):
        problem(where, "subject_match must be true or false")
    revoke_replaced = table.get("revoke_replaced_grant", False)
    if not isinstance(revoke_replaced, bool):
        problem(where, "revoke_replaced_grant must be true or false")
    auth_method = table.get("token_auth_method", "client_secret_basic")
    if auth_method not in ("client_secret_basic", "client_secret_post"):
        problem(
            where,
            "token_auth_method must be 'client_secret_basic' or 'client_secret_post', "
            f"not {_shown(str(auth_method))}",
        )
    rate = table.get("max_refresh_rate")
    if rate is not None and (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not 0 < rate <= MAX_REFRESH_RATE
    ):
        problem(
            where,
            f"max_refresh_rate must be a number of refreshes per second > 0 and <= "
            f"{MAX_REFRESH_RATE:g}, not {_shown(str(rate))}",
        )
    concurrency = table.get("max_concurrency")
    if concurrency is not None and (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        problem(
            where,
            f"max_concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, "
            f"not {_shown(str(concurrency))}",
        )
    if problems:
        return None, problems
    assert issuer is not None and client_id is not None
    return (
        ProviderConfig(
            name=name,
            issuer=issuer,
            discovery_url=discovery or "",
            client_id=client_id,
            client_secret=secret,
            scopes=scopes,
            resource=resource,
            subject_match=bool(subject_match),
            token_auth_method=auth_method,
            revoke_replaced_grant=bool(revoke_replaced),
            max_refresh_rate=None if rate is None else float(rate),
            max_concurrency=concurrency,
        ),
        problems,
    )


def _default_data_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", ".")) / ".local" / "share")
    return Path(base) / "consent-flow"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything consent-flow is configured with. Build it with :meth:`from_env`."""

    redis_url: str | None = None
    issuer: str = ""
    discovery_url: str = ""
    client_id: str = ""
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    redirect_uri: str = ""
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    resource: str | None = None
    encryption_keys: tuple[Secret, ...] = ()
    session_ttl: int = DEFAULT_SESSION_TTL
    refresh_margin: int = DEFAULT_REFRESH_MARGIN
    keepalive: int = DEFAULT_KEEPALIVE
    history_retention: int = DEFAULT_HISTORY_RETENTION
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    subject_match: bool = True
    revoke_replaced_grant: bool = False  # see ProviderConfig
    log_format: LogFormat = "console"
    token_auth_method: AuthMethod = "client_secret_basic"
    event_timeout: float = DEFAULT_EVENT_TIMEOUT
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    commit_retry_limit: int = DEFAULT_COMMIT_RETRY_LIMIT
    # Replicas that must confirm a commit storing tokens (CONSENT_REDIS_WAIT_REPLICAS); None:
    # one behind Sentinel or on a cluster (a failover must not lose a spent refresh token's
    # successor), else 0.
    redis_wait_replicas: int | None = None
    ops_token: Secret = field(default_factory=lambda: Secret(""))
    api_keys: tuple[Secret, ...] = ()
    data_dir: Path = field(default_factory=lambda: _default_data_dir(os.environ))
    redis_prefix: str = "cf"
    queue_name: str = "consent-flow:queue"
    # Connections are spread over this many shards (hash tags), fixed for a deployment's life;
    # a worker serves the shards in worker_shards (None: all of them).
    redis_shards: int = DEFAULT_REDIS_SHARDS
    worker_shards: tuple[int, ...] | None = None
    webhook_url: str | None = None
    webhook_secret: Secret = field(default_factory=lambda: Secret(""))
    webhook_failing_after: int = DEFAULT_WEBHOOK_FAILING_AFTER
    # Scheduled refreshes: connections per batch. The v1 provider's limits (fleet-wide; None:
    # unlimited), which its ProviderConfig carries as a providers file's tables do.
    refresh_batch: int = DEFAULT_REFRESH_BATCH
    max_refresh_rate: float | None = None
    max_concurrency: int | None = None
    providers_file: Path | None = None
    provider_table: tuple[ProviderConfig, ...] = ()
    """The providers of ``CONSENT_PROVIDERS_FILE``, in file order; empty without one (then the
    v1 fields above define the one provider, ``default``). Read :attr:`providers`."""

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        require_provider: bool = False,
        require_keys: bool = False,
        requires: Collection[Requirement] = (),
    ) -> Settings:
        """Read ``CONSENT_*`` variables. Raises one :class:`SettingsError` naming every missing
        or malformed variable (``exc.problems``), so a single run shows all there is to fix.

        ``requires`` says what the caller is about to do (:data:`REQUIRED_VARIABLES`);
        ``require_provider`` and ``require_keys`` are shorthands for ``Requirement.PROVIDER`` and
        ``Requirement.KEYS``. Read-only commands need none.
        """
        env = dict(os.environ if environ is None else environ)
        needs = set(requires)
        if require_provider:
            needs.add(Requirement.PROVIDER)
        if require_keys:
            needs.add(Requirement.KEYS)
        problems: list[SettingProblem] = []

        def problem(name: str, message: str) -> None:
            problems.append(SettingProblem(name, message))

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None:
                return None
            value = value.strip()
            return value or None

        def integer(name: str, default: int, low: int, high: int | None, accepted: str) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                value = low - 1
            if value < low or (high is not None and value > high):
                problem(name, f"must be {accepted}, not {_shown(raw)}")
                return default
            return value

        def number(
            name: str, default: float, low: float, high: float, accepted: str, *, open_low: bool
        ) -> float:
            """A float from ``low`` (excluded if ``open_low``) to ``high``; NaN never passes."""
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not (low < value if open_low else low <= value) or not value <= high:
                problem(name, f"must be {accepted}, not {_shown(raw)}")
                return default
            return value

        def choice(name: str, default: str, options: tuple[str, ...], *, fold: bool) -> str:
            raw = get(name)
            if raw is None:
                return default
            value = raw.lower() if fold else raw
            if value not in options:
                listed = ", ".join(repr(o) for o in options)
                problem(name, f"must be one of {listed}, not {_shown(raw)}")
                return default
            return value

        insecure = choice("CONSENT_ALLOW_INSECURE_HTTP", "0", ("0", "1"), fold=False)

        def url(name: str, example: str) -> str | None:
            """An absolute http(s) URL; the value is not echoed: it may carry credentials."""
            value = get(name)
            if value is None:
                return None
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problem(name, f"must be an absolute https:// URL, e.g. {example}")
                return None
            if parts.fragment:
                problem(name, f"must not contain a #fragment, e.g. {example}")
                return None
            # RFC 9700 section 2.6: no clear-text redirects or token traffic outside a developer's
            # own machine.
            if parts.scheme == "http" and not is_loopback_host(parts.hostname) and insecure != "1":
                problem(
                    name,
                    "must use https:// off loopback (set CONSENT_ALLOW_INSECURE_HTTP=1 for test "
                    "networks)",
                )
                return None
            return value

        redis_url = get("CONSENT_REDIS_URL")
        if redis_url is not None and (wrong := _redis_url_problem(redis_url)):
            problem("CONSENT_REDIS_URL", f"{wrong}; {REDIS_URL_ACCEPTED}")

        issuer = url("CONSENT_ISSUER", "https://id.example.com") or ""
        discovery = url(
            "CONSENT_DISCOVERY_URL", "https://id.example.com/.well-known/openid-configuration"
        )
        if discovery is None:
            discovery = issuer and issuer.rstrip("/") + "/.well-known/openid-configuration"
        redirect_uri = url("CONSENT_REDIRECT_URI", "https://mcp.example.com/oauth/callback") or ""
        resource = url("CONSENT_RESOURCE", "https://mcp.example.com/")

        raw_scopes = get("CONSENT_SCOPES")
        scopes: tuple[str, ...] = DEFAULT_SCOPES
        if raw_scopes is not None:
            scopes = tuple(dict.fromkeys(raw_scopes.split()))
            if wrong := _scope_problem(scopes, len(raw_scopes)):
                problem("CONSENT_SCOPES", wrong)

        raw_keys = get("CONSENT_ENCRYPTION_KEYS")
        keys: tuple[Secret, ...] = ()
        if raw_keys is not None:
            from consent_flow.store.vault import (
                KeyRing,  # local: the vault validates its own key format
            )

            parts_ = [k.strip() for k in raw_keys.split(",") if k.strip()]
            try:
                KeyRing.from_strings(parts_)
            except ValueError as exc:  # the vault's messages never echo a key
                problem(
                    "CONSENT_ENCRYPTION_KEYS",
                    f"{exc}; expected comma separated keys from: consent-flow keys generate",
                )
            else:
                keys = tuple(Secret(k) for k in parts_)

        subject_match = choice("CONSENT_SUBJECT_MATCH", "on", ("on", "off"), fold=True)
        revoke_replaced = choice("CONSENT_REVOKE_REPLACED_GRANT", "off", ("on", "off"), fold=True)
        log_format = choice("CONSENT_LOG_FORMAT", "console", ("json", "console"), fold=True)
        auth_method = choice(
            "CONSENT_TOKEN_AUTH_METHOD",
            "client_secret_basic",
            ("client_secret_basic", "client_secret_post"),
            fold=False,
        )
        session_ttl = integer(
            "CONSENT_SESSION_TTL", DEFAULT_SESSION_TTL, 2, None, "a whole number of seconds >= 2"
        )
        refresh_margin = integer(
            "CONSENT_REFRESH_MARGIN",
            DEFAULT_REFRESH_MARGIN,
            0,
            None,
            "a whole number of seconds >= 0",
        )
        keepalive = integer(
            "CONSENT_KEEPALIVE", DEFAULT_KEEPALIVE, 2, None, "a whole number of seconds >= 2"
        )
        history_retention = integer(
            "CONSENT_HISTORY_RETENTION",
            DEFAULT_HISTORY_RETENTION,
            60,
            None,
            "a whole number of seconds >= 60",
        )
        http_host = get("CONSENT_HTTP_HOST") or "127.0.0.1"
        port = integer(
            "CONSENT_HTTP_PORT", DEFAULT_HTTP_PORT, 1, 65535, "a port number from 1 to 65535"
        )
        event_timeout = number(
            "CONSENT_EVENT_TIMEOUT",
            DEFAULT_EVENT_TIMEOUT,
            0,
            MAX_EVENT_TIMEOUT,
            f"a number of seconds > 0 and <= {MAX_EVENT_TIMEOUT:g}",
            open_low=True,
        )
        http_timeout = number(
            "CONSENT_HTTP_TIMEOUT",
            DEFAULT_HTTP_TIMEOUT,
            MIN_HTTP_TIMEOUT,
            MAX_HTTP_TIMEOUT,
            f"a number of seconds from {MIN_HTTP_TIMEOUT:g} to {MAX_HTTP_TIMEOUT:g}",
            open_low=False,
        )

        webhook_url = url("CONSENT_WEBHOOK_URL", "https://hooks.example.com/consent")
        webhook_secret = get("CONSENT_WEBHOOK_SECRET")
        if webhook_secret is not None:
            from consent_flow.engine.webhooks import (
                parse_secret,  # local: the webhooks module owns the format
            )

            try:
                parse_secret(webhook_secret)
            except ValueError as exc:  # its messages never echo the secret
                problem("CONSENT_WEBHOOK_SECRET", f"{exc}; {WEBHOOK_SECRET_ACCEPTED}")
        elif get("CONSENT_WEBHOOK_URL") is not None:
            problem(
                "CONSENT_WEBHOOK_SECRET",
                f"is required when CONSENT_WEBHOOK_URL is set; {WEBHOOK_SECRET_ACCEPTED}",
            )
        failing_after = integer(
            "CONSENT_WEBHOOK_FAILING_AFTER",
            DEFAULT_WEBHOOK_FAILING_AFTER,
            1,
            MAX_WEBHOOK_FAILING_AFTER,
            f"a whole number of consecutive failures from 1 to {MAX_WEBHOOK_FAILING_AFTER}",
        )
        api_keys = tuple(
            Secret(k.strip()) for k in (get("CONSENT_API_KEYS") or "").split(",") if k.strip()
        )
        for position, key in enumerate(api_keys, 1):
            if len(key.reveal()) < MIN_API_KEY_LENGTH or not _B64TOKEN.fullmatch(key.reveal()):
                problem(
                    "CONSENT_API_KEYS",
                    f"key {position} must be at least {MIN_API_KEY_LENGTH} characters of "
                    "A-Z a-z 0-9 - . _ ~ + / (make one with: openssl rand -hex 32)",
                )
        redis_shards = integer(
            "CONSENT_REDIS_SHARDS",
            DEFAULT_REDIS_SHARDS,
            1,
            MAX_REDIS_SHARDS,
            f"a whole number of shards from 1 to {MAX_REDIS_SHARDS}",
        )
        worker_shards: tuple[int, ...] | None = None
        if get("CONSENT_WORKER_SHARDS"):
            try:
                worker_shards = parse_shard_set(get("CONSENT_WORKER_SHARDS") or "", redis_shards)
            except ValueError as exc:
                problem("CONSENT_WORKER_SHARDS", str(exc))
        refresh_batch = integer(
            "CONSENT_REFRESH_BATCH",
            DEFAULT_REFRESH_BATCH,
            1,
            MAX_REFRESH_BATCH,
            f"a whole number of connections from 1 to {MAX_REFRESH_BATCH}",
        )
        max_refresh_rate = (
            number(
                "CONSENT_MAX_REFRESH_RATE",
                0,
                0,
                MAX_REFRESH_RATE,
                f"refreshes per second, a number > 0 and <= {MAX_REFRESH_RATE:g}",
                open_low=True,
            )
            if get("CONSENT_MAX_REFRESH_RATE") is not None
            else None
        )
        max_concurrency = (
            integer(
                "CONSENT_MAX_CONCURRENCY",
                0,
                1,
                MAX_CONCURRENCY,
                f"a whole number of provider calls at once from 1 to {MAX_CONCURRENCY}",
            )
            if get("CONSENT_MAX_CONCURRENCY") is not None
            else None
        )
        commit_retry_limit = integer(
            "CONSENT_COMMIT_RETRY_LIMIT",
            DEFAULT_COMMIT_RETRY_LIMIT,
            MIN_COMMIT_RETRY_LIMIT,
            None,
            f"a whole number of seconds >= {MIN_COMMIT_RETRY_LIMIT}",
        )

        wait_replicas = get("CONSENT_REDIS_WAIT_REPLICAS")
        redis_wait_replicas = (
            None
            if wait_replicas is None
            else integer(
                "CONSENT_REDIS_WAIT_REPLICAS", 0, 0, MAX_WAIT_REPLICAS, "a whole number from 0 to 5"
            )
        )

        providers_file = get("CONSENT_PROVIDERS_FILE")
        provider_table: tuple[ProviderConfig, ...] = ()
        if providers_file is not None:
            stray = [name for name in PROVIDER_VARIABLES if get(name) is not None]
            for name in stray:
                problem(
                    name,
                    "must not be set together with CONSENT_PROVIDERS_FILE: the file alone "
                    "defines the providers (move it into a [providers.NAME] table)",
                )
            provider_table, found = _read_providers(providers_file, env, insecure == "1")
            problems.extend(found)

        settings = cls(
            redis_url=redis_url,
            issuer=issuer,
            discovery_url=discovery,
            client_id=get("CONSENT_CLIENT_ID") or "",
            client_secret=Secret(get("CONSENT_CLIENT_SECRET") or ""),
            redirect_uri=redirect_uri,
            scopes=scopes,
            resource=resource,
            encryption_keys=keys,
            session_ttl=session_ttl,
            refresh_margin=refresh_margin,
            keepalive=keepalive,
            commit_retry_limit=commit_retry_limit,
            refresh_batch=refresh_batch,
            max_refresh_rate=max_refresh_rate,
            max_concurrency=max_concurrency,
            redis_wait_replicas=redis_wait_replicas,
            history_retention=history_retention,
            http_host=http_host,
            http_port=port,
            subject_match=subject_match == "on",
            revoke_replaced_grant=revoke_replaced == "on",
            log_format=log_format,  # type: ignore[arg-type]
            token_auth_method=auth_method,  # type: ignore[arg-type]
            event_timeout=event_timeout,
            http_timeout=http_timeout,
            ops_token=Secret(get("CONSENT_OPS_TOKEN") or ""),
            api_keys=api_keys,
            data_dir=Path(get("CONSENT_DATA_DIR") or _default_data_dir(env)),
            redis_prefix=get("CONSENT_REDIS_PREFIX") or "cf",
            queue_name=get("CONSENT_QUEUE_NAME") or "consent-flow:queue",
            redis_shards=redis_shards,
            worker_shards=worker_shards,
            webhook_url=webhook_url,
            webhook_secret=Secret(webhook_secret or ""),
            webhook_failing_after=failing_after,
            providers_file=Path(providers_file) if providers_file else None,
            provider_table=provider_table,
        )
        # A malformed variable already has its problem; "is required" on top would only repeat it.
        reported = {p.variable for p in problems}
        for requirement in Requirement:
            if requirement in needs:
                problems.extend(
                    p for p in settings.missing(requirement) if p.variable not in reported
                )
        if problems:
            raise SettingsError.of(problems)
        return settings

    def missing(self, requirement: Requirement) -> list[SettingProblem]:
        """What these settings lack for ``requirement``, one problem per variable."""
        if requirement is Requirement.PROVIDER and self.providers_file is not None:
            # The file's providers were checked when it was read: only the redirect is left.
            if self.redirect_uri:
                return []
            name, what = REQUIRED_VARIABLES[requirement][-1]
            return [SettingProblem(name, f"is required ({what})")]
        if requirement is Requirement.PROVIDER:
            present = {
                "CONSENT_ISSUER": bool(self.issuer),
                "CONSENT_CLIENT_ID": bool(self.client_id),
                "CONSENT_CLIENT_SECRET": bool(self.client_secret),
                "CONSENT_REDIRECT_URI": bool(self.redirect_uri),
            }
            found = [
                SettingProblem(name, f"is required ({what})")
                for name, what in REQUIRED_VARIABLES[requirement]
                if not present[name]
            ]
            if "openid" not in self.scopes:
                found.append(
                    SettingProblem(
                        "CONSENT_SCOPES",
                        "must include 'openid' (the ID token names the user), e.g. "
                        '"openid offline_access"',
                    )
                )
            return found
        if requirement is Requirement.KEYS:
            if self.encryption_keys:
                return []
            return [
                SettingProblem(name, f"is required ({what})")
                for name, what in REQUIRED_VARIABLES[requirement]
            ]
        if self.ops_token or is_loopback_host(self.http_host):
            return []
        return [
            SettingProblem(
                "CONSENT_OPS_TOKEN",
                f"is required when CONSENT_HTTP_HOST ({self.http_host}) is not a loopback "
                "address: without it /ops and /metrics trust any client that arrives from this "
                "machine, which every client does through a proxy or a port forwarder",
            )
        ]

    def _check(self, requirement: Requirement) -> None:
        if problems := self.missing(requirement):
            raise SettingsError.of(problems)

    def check_provider(self) -> None:
        """Raise :class:`SettingsError` naming every missing OpenID client setting."""
        self._check(Requirement.PROVIDER)

    def check_listen_address(self) -> None:
        """``serve`` and ``up``: beyond loopback, /ops and /metrics need ``CONSENT_OPS_TOKEN``.

        Without the token they answer loopback clients only, and any client reaching a
        non-loopback listener through a proxy or forwarder on this machine arrives from loopback.
        """
        self._check(Requirement.LISTENER)

    def check_keys(self) -> None:
        self._check(Requirement.KEYS)

    @property
    def providers(self) -> tuple[ProviderConfig, ...]:
        """Every configured provider, in file order; without a providers file, the one the v1
        variables define, named ``default``."""
        if self.provider_table or self.providers_file is not None:
            return self.provider_table
        return (
            ProviderConfig(
                name=DEFAULT_PROVIDER,
                issuer=self.issuer,
                discovery_url=self.discovery_url,
                client_id=self.client_id,
                client_secret=self.client_secret,
                scopes=self.scopes,
                resource=self.resource,
                subject_match=self.subject_match,
                token_auth_method=self.token_auth_method,
                max_refresh_rate=self.max_refresh_rate,
                max_concurrency=self.max_concurrency,
                revoke_replaced_grant=self.revoke_replaced_grant,
            ),
        )

    @property
    def provider_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)

    def provider(self, name: str | None = None) -> ProviderConfig:
        """The provider called ``name``; None means the only one. Raises
        :class:`UnknownProvider` for a name not configured, or None while several are."""
        providers = self.providers
        if name is None:
            if len(providers) == 1:
                return providers[0]
        else:
            for config in providers:
                if config.name == name:
                    return config
        raise UnknownProvider(name, [p.name for p in providers])

    def for_provider(self, name: str | None = None) -> Settings:
        """These settings as one provider's engine stack sees them: the provider fields
        (issuer, client, base scopes, resource, subject match, client authentication) are that
        provider's. Without a providers file, ``default``'s are the v1 fields already."""
        config = self.provider(name)
        if not self.provider_table:
            return self
        return replace(
            self,
            issuer=config.issuer,
            discovery_url=config.discovery_url,
            client_id=config.client_id,
            client_secret=config.client_secret,
            scopes=config.scopes,
            resource=config.resource,
            subject_match=config.subject_match,
            token_auth_method=config.token_auth_method,
            revoke_replaced_grant=config.revoke_replaced_grant,
        )

    @property
    def redirect_path(self) -> str:
        return urlsplit(self.redirect_uri).path or "/oauth/callback"

    @property
    def wait_replicas(self) -> int:
        """How many replicas confirm a commit that stores tokens: the setting, else 1 behind
        Sentinel and on a Redis Cluster (both fail over by themselves) and 0 otherwise."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        failover = (self.redis_url or "").startswith(("redis+sentinel://", "redis+cluster://"))
        return 1 if failover else 0

    def with_changes(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
