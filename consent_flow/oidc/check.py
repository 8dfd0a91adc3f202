"""Whether one provider's settings work: its discovery document, and its token endpoint's
acceptance of the client's authentication.

Both are functions over one provider's :class:`~consent_flow.oidc.OAuthClient`, so a deployment
of several providers checks each in a loop. Neither raises for what the provider answers: the
result says what was learnt.

* :func:`check_discovery` sorts a failure into "down" (connection refused, timeout, 5xx, 429:
  worth trying again) and "misconfigured" (an issuer that differs from the configured one, a
  document without a required endpoint, plain http where https is required, a 404: settings
  that can never work).
* :func:`probe_client_authentication` presents a refresh token that cannot exist: the provider
  authenticates the client before it looks at the grant (RFC 6749 5.2), so ``invalid_grant``
  means the client's credentials were accepted and ``invalid_client`` (or another client-level
  error) means they were not, with no user's grant involved.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from consent_flow.errors import (
    ClientRejected,
    GrantRejected,
    ProviderError,
    ProviderUnavailable,
)
from consent_flow.oidc.client import OAuthClient

__all__ = [
    "ClientAuth",
    "ClientCheck",
    "DiscoveryCheck",
    "Reach",
    "check_discovery",
    "probe_client_authentication",
    "shown_url",
]

_PROBE_TOKEN_PREFIX = "consent-flow-probe-"  # says what it is in the provider's own logs


class Reach(enum.Enum):
    """What fetching a provider's discovery document found."""

    OK = "ok"
    DOWN = "down"  # unreachable, timed out or answering 5xx/429: it may answer later
    MISCONFIGURED = "misconfigured"  # an answer that these settings can never work with


@dataclass(frozen=True, slots=True)
class DiscoveryCheck:
    reach: Reach
    url: str
    """The discovery URL, without any credentials it carries."""
    problem: str | None = None
    """What went wrong (no secret in it); None when the document is usable."""

    @property
    def ok(self) -> bool:
        return self.reach is Reach.OK

    def __str__(self) -> str:
        if self.ok:
            return f"the provider's discovery document at {self.url} is usable"
        return f"the provider's discovery document at {self.url}: {self.problem}"


class ClientAuth(enum.Enum):
    """What the token endpoint made of the client's authentication."""

    ACCEPTED = "accepted"
    REFUSED = "refused"
    UNKNOWN = "unknown"  # the provider was down, or answered something that decides nothing


@dataclass(frozen=True, slots=True)
class ClientCheck:
    outcome: ClientAuth
    rejection: ClientRejected | None = None
    """The provider's refusal, when ``outcome`` is REFUSED."""
    problem: str | None = None


def shown_url(url: str) -> str:
    """``url`` without the user and password of its authority, for messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


async def check_discovery(oauth: OAuthClient) -> DiscoveryCheck:
    """Fetch and validate the provider's discovery document once (a cached one counts)."""
    url = shown_url(oauth.discovery_url)
    try:
        await oauth.metadata()
    except ProviderUnavailable as exc:
        return DiscoveryCheck(Reach.DOWN, url, str(exc))
    except ProviderError as exc:
        return DiscoveryCheck(Reach.MISCONFIGURED, url, str(exc))
    return DiscoveryCheck(Reach.OK, url)


async def probe_client_authentication(oauth: OAuthClient) -> ClientCheck:
    """One token request with a refresh token that cannot exist; see the module docstring."""
    made_up = _PROBE_TOKEN_PREFIX + secrets.token_urlsafe(24)
    try:
        await oauth.refresh(made_up, scopes=())
    except GrantRejected:
        return ClientCheck(ClientAuth.ACCEPTED)
    except ClientRejected as exc:
        return ClientCheck(ClientAuth.REFUSED, rejection=exc, problem=str(exc))
    except ProviderError as exc:
        return ClientCheck(ClientAuth.UNKNOWN, problem=str(exc))
    # Tokens for a refresh token nobody issued: whatever else is wrong, the client got in.
    return ClientCheck(ClientAuth.ACCEPTED)
