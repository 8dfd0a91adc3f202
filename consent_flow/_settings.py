"""Settings: read from the environment once, at the edge, into one frozen object.

The library itself never reads ``os.environ``; ``Settings.from_env`` is called by the command line,
the worker settings and ``ConsentClient.from_env`` and the object is passed down from there.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ._errors import SettingsError

__all__ = ["Secret", "Settings", "is_loopback_host"]

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
MAX_SCOPES_LENGTH = 2000
# A refresh_failing webhook goes out at this many consecutive transient refresh failures (with
# the default backoff, two to four minutes of failing), refresh_recovered after a run that long.
DEFAULT_WEBHOOK_FAILING_AFTER = 8
MAX_WEBHOOK_FAILING_AFTER = 1000
MIN_API_KEY_LENGTH = 32  # characters: a guessable key would open every user's tokens
# RFC 6750 2.1: what an Authorization: Bearer header can carry.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

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
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


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
    log_format: LogFormat = "console"
    token_auth_method: AuthMethod = "client_secret_basic"
    event_timeout: float = DEFAULT_EVENT_TIMEOUT
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    commit_retry_limit: int = DEFAULT_COMMIT_RETRY_LIMIT
    ops_token: Secret = field(default_factory=lambda: Secret(""))
    api_keys: tuple[Secret, ...] = ()
    data_dir: Path = field(default_factory=lambda: _default_data_dir(os.environ))
    redis_prefix: str = "cf"
    queue_name: str = "consent-flow:queue"
    webhook_url: str | None = None
    webhook_secret: Secret = field(default_factory=lambda: Secret(""))
    webhook_failing_after: int = DEFAULT_WEBHOOK_FAILING_AFTER

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        require_provider: bool = False,
        require_keys: bool = False,
    ) -> Settings:
        """Read ``CONSENT_*`` variables. Raises :class:`SettingsError` naming the variable.

        ``require_provider`` demands the OpenID client settings (worker, server, token broker);
        ``require_keys`` demands ``CONSENT_ENCRYPTION_KEYS``. Read-only commands need neither.
        """
        env = dict(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None:
                return None
            value = value.strip()
            return value or None

        def integer(name: str, default: int, *, minimum: int = 0, unit: str = "seconds") -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise SettingsError(
                    name, f"must be a whole number of {unit}, not {raw!r}"
                ) from None
            if value < minimum:
                raise SettingsError(name, f"must be at least {minimum}")
            return value

        def url(name: str, value: str, *, https_unless_local: bool = True) -> str:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError(name, "must be an absolute http(s) URL")
            if parts.fragment:
                raise SettingsError(name, "must not contain a fragment")
            local = parts.hostname in ("localhost", "127.0.0.1", "::1") or parts.hostname.endswith(
                ".localhost"
            )
            # RFC 9700 section 2.6: no clear-text redirects or token traffic outside a developer's
            # own machine.
            if https_unless_local and parts.scheme == "http" and not local:
                allow = get("CONSENT_ALLOW_INSECURE_HTTP") == "1"
                if not allow:
                    raise SettingsError(
                        name, "must use https (set CONSENT_ALLOW_INSECURE_HTTP=1 for test networks)"
                    )
            return value

        redis_url = get("CONSENT_REDIS_URL")
        if redis_url is not None and urlsplit(redis_url).scheme not in (
            "redis",
            "rediss",
            "unix",
            "redis+sentinel",
        ):
            raise SettingsError("CONSENT_REDIS_URL", "must be a redis://, rediss:// or unix:// URL")

        issuer = get("CONSENT_ISSUER") or ""
        if issuer:
            issuer = url("CONSENT_ISSUER", issuer)
        discovery = get("CONSENT_DISCOVERY_URL") or ""
        if discovery:
            discovery = url("CONSENT_DISCOVERY_URL", discovery)
        elif issuer:
            discovery = issuer.rstrip("/") + "/.well-known/openid-configuration"
        redirect_uri = get("CONSENT_REDIRECT_URI") or ""
        if redirect_uri:
            redirect_uri = url("CONSENT_REDIRECT_URI", redirect_uri)
        resource = get("CONSENT_RESOURCE")
        if resource is not None:
            resource = url("CONSENT_RESOURCE", resource)

        raw_scopes = get("CONSENT_SCOPES")
        scopes: tuple[str, ...] = DEFAULT_SCOPES
        if raw_scopes is not None:
            if len(raw_scopes) > MAX_SCOPES_LENGTH:
                raise SettingsError("CONSENT_SCOPES", "is too long")
            scopes = tuple(dict.fromkeys(raw_scopes.split()))
            bad = [
                s for s in scopes if not all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in s)
            ]
            if bad:
                # RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
                raise SettingsError("CONSENT_SCOPES", "contains characters RFC 6749 3.3 forbids")

        raw_keys = get("CONSENT_ENCRYPTION_KEYS")
        keys: tuple[Secret, ...] = ()
        if raw_keys is not None:
            from ._vault import KeyRing  # local: the vault validates its own key format

            parts_ = [k.strip() for k in raw_keys.split(",") if k.strip()]
            try:
                KeyRing.from_strings(parts_)
            except ValueError as exc:
                raise SettingsError("CONSENT_ENCRYPTION_KEYS", str(exc)) from None
            keys = tuple(Secret(k) for k in parts_)

        subject_match_raw = (get("CONSENT_SUBJECT_MATCH") or "on").lower()
        if subject_match_raw not in ("on", "off"):
            raise SettingsError("CONSENT_SUBJECT_MATCH", "must be 'on' or 'off'")
        log_format = (get("CONSENT_LOG_FORMAT") or "console").lower()
        if log_format not in ("json", "console"):
            raise SettingsError("CONSENT_LOG_FORMAT", "must be 'json' or 'console'")
        auth_method = get("CONSENT_TOKEN_AUTH_METHOD") or "client_secret_basic"
        if auth_method not in ("client_secret_basic", "client_secret_post"):
            raise SettingsError(
                "CONSENT_TOKEN_AUTH_METHOD", "must be 'client_secret_basic' or 'client_secret_post'"
            )
        port = integer("CONSENT_HTTP_PORT", DEFAULT_HTTP_PORT, minimum=0)
        if port > 65535:
            raise SettingsError("CONSENT_HTTP_PORT", "must be a TCP port (0-65535)")
        event_timeout_raw = get("CONSENT_EVENT_TIMEOUT")
        event_timeout = DEFAULT_EVENT_TIMEOUT
        if event_timeout_raw is not None:
            try:
                event_timeout = float(event_timeout_raw)
            except ValueError:
                raise SettingsError(
                    "CONSENT_EVENT_TIMEOUT", "must be a number of seconds"
                ) from None
            if not 0 < event_timeout <= MAX_EVENT_TIMEOUT:
                raise SettingsError(
                    "CONSENT_EVENT_TIMEOUT", f"must be between 0 and {MAX_EVENT_TIMEOUT:g} seconds"
                )

        http_timeout = DEFAULT_HTTP_TIMEOUT
        if (raw_timeout := get("CONSENT_HTTP_TIMEOUT")) is not None:
            try:
                http_timeout = float(raw_timeout)
            except ValueError:
                raise SettingsError("CONSENT_HTTP_TIMEOUT", "must be a number of seconds") from None
            if not 0.1 <= http_timeout <= 120:
                raise SettingsError("CONSENT_HTTP_TIMEOUT", "must be between 0.1 and 120 seconds")

        webhook_url = get("CONSENT_WEBHOOK_URL")
        if webhook_url is not None:
            webhook_url = url("CONSENT_WEBHOOK_URL", webhook_url)
        webhook_secret = get("CONSENT_WEBHOOK_SECRET")
        if webhook_secret is not None:
            from ._webhooks import parse_secret  # local: the webhooks module owns the format

            try:
                parse_secret(webhook_secret)
            except ValueError as exc:
                raise SettingsError("CONSENT_WEBHOOK_SECRET", str(exc)) from None
        elif webhook_url is not None:
            raise SettingsError(
                "CONSENT_WEBHOOK_SECRET",
                "is required when CONSENT_WEBHOOK_URL is set (whsec_ and 24 to 64 random bytes "
                'in base64, e.g. from: python -c "import base64, os; '
                "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\")",
            )
        failing_after = integer(
            "CONSENT_WEBHOOK_FAILING_AFTER",
            DEFAULT_WEBHOOK_FAILING_AFTER,
            minimum=1,
            unit="failures",
        )
        if failing_after > MAX_WEBHOOK_FAILING_AFTER:
            raise SettingsError(
                "CONSENT_WEBHOOK_FAILING_AFTER", f"must be at most {MAX_WEBHOOK_FAILING_AFTER}"
            )
        api_keys = tuple(
            Secret(k.strip()) for k in (get("CONSENT_API_KEYS") or "").split(",") if k.strip()
        )
        for number, key in enumerate(api_keys, 1):
            if len(key.reveal()) < MIN_API_KEY_LENGTH or not _B64TOKEN.fullmatch(key.reveal()):
                raise SettingsError(
                    "CONSENT_API_KEYS",
                    f"key {number} must be at least {MIN_API_KEY_LENGTH} characters of "
                    "A-Z a-z 0-9 - . _ ~ + / (make one with: openssl rand -hex 32)",
                )

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
            session_ttl=integer("CONSENT_SESSION_TTL", DEFAULT_SESSION_TTL, minimum=2),
            refresh_margin=integer("CONSENT_REFRESH_MARGIN", DEFAULT_REFRESH_MARGIN, minimum=0),
            keepalive=integer("CONSENT_KEEPALIVE", DEFAULT_KEEPALIVE, minimum=2),
            commit_retry_limit=integer(
                "CONSENT_COMMIT_RETRY_LIMIT",
                DEFAULT_COMMIT_RETRY_LIMIT,
                minimum=MIN_COMMIT_RETRY_LIMIT,
            ),
            history_retention=integer(
                "CONSENT_HISTORY_RETENTION", DEFAULT_HISTORY_RETENTION, minimum=60
            ),
            http_host=get("CONSENT_HTTP_HOST") or "127.0.0.1",
            http_port=port,
            subject_match=subject_match_raw == "on",
            log_format=log_format,  # type: ignore[arg-type]
            token_auth_method=auth_method,  # type: ignore[arg-type]
            event_timeout=event_timeout,
            http_timeout=http_timeout,
            ops_token=Secret(get("CONSENT_OPS_TOKEN") or ""),
            api_keys=api_keys,
            data_dir=Path(get("CONSENT_DATA_DIR") or _default_data_dir(env)),
            redis_prefix=get("CONSENT_REDIS_PREFIX") or "cf",
            queue_name=get("CONSENT_QUEUE_NAME") or "consent-flow:queue",
            webhook_url=webhook_url,
            webhook_secret=Secret(webhook_secret or ""),
            webhook_failing_after=failing_after,
        )
        if require_provider:
            settings.check_provider()
        if require_keys:
            settings.check_keys()
        return settings

    def check_provider(self) -> None:
        """Raise :class:`SettingsError` for the first missing OpenID client setting."""
        if not self.issuer:
            raise SettingsError("CONSENT_ISSUER", "is required (the provider's issuer URL)")
        if not self.client_id:
            raise SettingsError("CONSENT_CLIENT_ID", "is required")
        if not self.client_secret:
            raise SettingsError("CONSENT_CLIENT_SECRET", "is required (a confidential client)")
        if not self.redirect_uri:
            raise SettingsError("CONSENT_REDIRECT_URI", "is required")
        if "openid" not in self.scopes:
            raise SettingsError("CONSENT_SCOPES", "must include 'openid'")

    def check_listen_address(self) -> None:
        """``serve`` and ``up``: beyond loopback, /ops and /metrics need ``CONSENT_OPS_TOKEN``.

        Without the token they answer loopback clients only, and any client reaching a
        non-loopback listener through a proxy or forwarder on this machine arrives from loopback.
        """
        if not self.ops_token and not is_loopback_host(self.http_host):
            raise SettingsError(
                "CONSENT_OPS_TOKEN",
                f"is required when CONSENT_HTTP_HOST ({self.http_host}) is not a loopback "
                "address: without it /ops and /metrics trust any client that arrives from this "
                "machine, which every client does through a proxy or a port forwarder",
            )

    def check_keys(self) -> None:
        if not self.encryption_keys:
            raise SettingsError(
                "CONSENT_ENCRYPTION_KEYS",
                "is required (create one with: consent-flow keys generate)",
            )

    @property
    def redirect_path(self) -> str:
        return urlsplit(self.redirect_uri).path or "/oauth/callback"

    def with_changes(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
