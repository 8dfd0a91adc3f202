"""Connections: one user's grant at one configured provider, ``(user, provider name)``.

A provider's name is part of every key, job id and sealed value of its connections, so the names
are a closed, conservative alphabet: lower-case letters, digits, ``_`` and ``-``, starting with a
letter, at most 32 characters (no ``:``, ``{`` or ``}``, which the Redis layout uses).
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_PROVIDER", "PROVIDER_NAME", "is_provider_name"]

# The provider the v1 CONSENT_* variables define when no providers file is configured.
DEFAULT_PROVIDER = "default"
PROVIDER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def is_provider_name(name: object) -> bool:
    return isinstance(name, str) and PROVIDER_NAME.fullmatch(name) is not None
