"""Logs are events with fields. The redaction processor is part of every chain we build.

Redaction works on two levels, so that neither a careless field name nor a stray string gets a
secret out: fields whose name says "secret" are masked whatever their value, and every string
value is scrubbed of things that look like tokens (JWTs, bearer credentials, ``code=``/``state=``
query parameters). Standard-library loggers (arq, uvicorn, httpx) go through the same chain.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "redact", "scrub"]

REDACTED = "[redacted]"

_SECRET_NAMES = re.compile(
    r"(token|secret|password|passwd|verifier|authorization|cookie|api[_-]?key|private|"
    r"^code$|^state$|^nonce$|^key$|^keys$|sealed|ciphertext|assertion)",
    re.IGNORECASE,
)
_SAFE_NAMES = frozenset(
    {
        "token_type",
        "token_refreshed",
        "state_from",
        "state_to",
        "from",
        "to",
        "key_id",
        "key_ids",
        "token_endpoint",
        "tokens_wiped",
    }
)
_PATTERNS = (
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),  # JWS / JWT
    re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(
        r"(?i)((?:code|state|code_verifier|refresh_token|access_token|id_token|client_secret|"
        r"token)=)[^&\s\"']+"
    ),
    re.compile(r"v1\.[0-9a-f]{12}\.[A-Za-z0-9_-]{16,}"),  # our own ciphertext
)


def scrub(text: str) -> str:
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


def _clean(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {
            k: (REDACTED if _is_secret_name(k) and v is not None else _clean(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_clean(v, depth + 1) for v in value)
    return value


def _is_secret_name(name: object) -> bool:
    return isinstance(name, str) and name not in _SAFE_NAMES and bool(_SECRET_NAMES.search(name))


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named fields, scrub token-shaped strings everywhere."""
    for name in list(event_dict):
        value = event_dict[name]
        if name != "event" and _is_secret_name(name) and value is not None:
            event_dict[name] = REDACTED
        else:
            event_dict[name] = _clean(value)
    exc = event_dict.get("exception")
    if isinstance(exc, str):
        event_dict["exception"] = scrub(exc)
    return event_dict


def _stdlib_message(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Standard-library records arrive with their formatted message as "event"; scrub it too.
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = scrub(event)
    return event_dict


def configure_logging(fmt: str = "console", level: int = logging.INFO) -> None:
    """Configure structlog and the standard library to share one redacting chain."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _stdlib_message,
        redact,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _final_scrub,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; the URLs are ours, but keep them out of INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").disabled = True
    # transitions logs every callback it runs at INFO: our own transition line says it better.
    logging.getLogger("transitions").setLevel(logging.WARNING)


def _final_scrub(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Runs after exception formatting too, so a traceback's text is scrubbed as well.
    return redact(logger, method, event_dict)
