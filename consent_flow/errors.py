"""The exception tree of consent-flow.

Every error the library raises on purpose derives from one base class, carries a stable
``code`` and the context it happened in (user, event), and never a secret::

    ConsentError
    ├── SettingsError               CONSENT_* variables are missing or malformed (all of them)
    ├── VaultError                  encryption key ring problems
    │   └── UnknownKeyError         a ciphertext names a key id the ring does not hold
    ├── StoreError                  the state store answered something it should not have
    ├── WorkerUnavailable           no worker answered an event within the timeout
    ├── InvalidTransition           the event is not allowed from the user's state
    ├── UnknownProvider             no configured provider has that name (or none was named
    │                               where several are configured)
    ├── InvalidScope                a scope asked for is not an RFC 6749 scope token, or too many
    ├── CallbackRejected            a bad, forged or replayed authorization callback
    ├── NotProvisioned              the user has granted no delegated access (yet)
    │   └── ConsentRevoked          the user's grant was revoked (reason attached)
    └── ProviderError               the OpenID provider misbehaved or refused
        ├── ProviderUnavailable     5xx, 429, timeouts, connection errors: transient
        ├── GrantRejected           invalid_grant: the grant is dead
        ├── ClientRejected          invalid_client: the deployment's credentials are wrong
        ├── ProviderResponseError   any other error response or malformed answer
        └── IDTokenError            the ID token failed a check (signature, iss, aud, ...)

Retry control flow (arq's ``Retry``) deliberately stays outside this tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CallbackRejected",
    "ClientRejected",
    "ConsentError",
    "ConsentRevoked",
    "GrantRejected",
    "IDTokenError",
    "InvalidScope",
    "InvalidTransition",
    "NotProvisioned",
    "ProviderError",
    "ProviderResponseError",
    "ProviderUnavailable",
    "SettingProblem",
    "SettingsError",
    "StoreError",
    "UnknownKeyError",
    "UnknownProvider",
    "VaultError",
    "WorkerUnavailable",
]


class ConsentError(Exception):
    """Base class of every error consent-flow raises on purpose."""

    code: str = "consent_error"

    def __init__(self, message: str, *, user: str | None = None, event: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.user = user
        self.event = event

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class SettingProblem:
    """One missing or malformed setting: the variable, what is wrong and what it accepts."""

    variable: str
    message: str

    def __str__(self) -> str:
        return f"{self.variable}: {self.message}"


class SettingsError(ConsentError):
    """Settings are missing or malformed: ``problems`` holds every one, ``variable`` names the
    first. The message lists them one per line, so one run shows everything to fix."""

    code = "settings_invalid"

    def __init__(self, variable: str, problem: str, *more: SettingProblem) -> None:
        self.problems: tuple[SettingProblem, ...] = (SettingProblem(variable, problem), *more)
        self.variable = variable
        if more:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"{len(self.problems)} settings are missing or malformed:\n{lines}"
        else:
            message = str(self.problems[0])
        super().__init__(message)

    @classmethod
    def of(cls, problems: Sequence[SettingProblem]) -> SettingsError:
        """One error for every problem found (``problems`` must not be empty)."""
        first, *more = problems
        return cls(first.variable, first.message, *more)


class VaultError(ConsentError):
    code = "vault_error"


class UnknownKeyError(VaultError):
    """A ciphertext was written under a key that is not in ``CONSENT_ENCRYPTION_KEYS``."""

    code = "unknown_key"

    def __init__(self, message: str, *, key_id: str, user: str | None = None) -> None:
        super().__init__(message, user=user)
        self.key_id = key_id


class StoreError(ConsentError):
    code = "store_error"


class WorkerUnavailable(ConsentError):
    """The event was queued but no worker reported an outcome in time."""

    code = "worker_unavailable"


class InvalidTransition(ConsentError):
    code = "invalid_transition"


class UnknownProvider(ConsentError):
    """No configured provider has the name asked for, or a call named none while several are
    configured. ``provider`` is the name asked for (None: none was named); ``names`` lists the
    configured ones, and so does the message."""

    code = "unknown_provider"

    def __init__(
        self, provider: str | None, names: Sequence[str], *, user: str | None = None
    ) -> None:
        listed = ", ".join(names) or "none"
        if provider is None:
            message = f"several providers are configured: name one of {listed}"
        else:
            shown = provider if len(provider) <= 40 else provider[:40] + "..."
            message = f"no provider is configured as {shown!r}; configured: {listed}"
        super().__init__(message, user=user)
        self.provider = provider
        self.names = tuple(names)


class InvalidScope(ConsentError):
    """Scopes asked for that no provider could be asked for: not RFC 6749 scope tokens (spaces,
    control characters, quotes), too long, or too many. Refused before anything is queued."""

    code = "invalid_scope"


class CallbackRejected(ConsentError):
    """An authorization callback that must not change anything (HTTP 4xx)."""

    code = "callback_rejected"

    def __init__(
        self, message: str, *, status: int = 400, reason_code: str = "bad_request"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason_code = reason_code


class NotProvisioned(ConsentError):
    """The user has not granted delegated access."""

    code = "not_provisioned"

    def __init__(
        self,
        message: str,
        *,
        user: str | None = None,
        state: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, user=user)
        self.state = state
        self.reason = reason


class ConsentRevoked(NotProvisioned):
    """The user's grant was revoked, by the user, an operator or the provider."""

    code = "consent_revoked"


class ProviderError(ConsentError):
    code = "provider_error"


class ProviderUnavailable(ProviderError):
    """Transient: the provider is down, slow or rate limiting. Never ends a grant."""

    code = "provider_unavailable"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        user: str | None = None,
    ) -> None:
        super().__init__(message, user=user)
        self.retry_after = retry_after
        self.status = status


class GrantRejected(ProviderError):
    """``invalid_grant``: the code or refresh token is dead (RFC 6749 section 5.2).

    ``description`` is the provider's ``error_description``, already sanitised (printable,
    bounded, secrets and token-shaped strings redacted), or None.
    """

    code = "invalid_grant"

    def __init__(
        self, message: str, *, description: str | None = None, user: str | None = None
    ) -> None:
        super().__init__(message, user=user)
        self.description = description


class ClientRejected(ProviderError):
    """The deployment's own client is refused (``invalid_client``, ``unauthorized_client``,
    ``expired_client``...): a fault of the whole deployment, never of one user's grant.

    ``code`` stays ``invalid_client`` for every such answer; ``error`` is the code the provider
    actually sent (sanitised), or None for a bare 401.
    """

    code = "invalid_client"

    def __init__(self, message: str, *, error: str | None = None, user: str | None = None) -> None:
        super().__init__(message, user=user)
        self.error = error or self.code


class ProviderResponseError(ProviderError):
    """Any other OAuth error response, or an answer that is not what the protocol says."""

    code = "provider_response_error"

    def __init__(self, message: str, *, error: str | None = None, user: str | None = None) -> None:
        super().__init__(message, user=user)
        self.error = error


class IDTokenError(ProviderError):
    """The ID token failed validation (OpenID Connect Core 1.0 section 3.1.3.7)."""

    code = "id_token_invalid"
