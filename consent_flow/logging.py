"""Logs are events with fields. The redaction processor is part of every chain we build.

Redaction works on two levels, so that neither a careless field name nor a stray string gets a
secret out: fields whose name says "secret" are masked whatever their value, and every string
value is scrubbed of things that look like tokens (JWTs, bearer credentials, ``code=``/``state=``
query parameters). Standard-library loggers (arq, uvicorn, httpx) go through the same chain.
"""

from __future__ import annotations

import functools
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


def _may_hold_secret(text: str) -> bool:
    """A cheap test every pattern above needs to pass: most log strings skip the regexes."""
    if "=" in text or "eyJ" in text or "v1." in text:
        return True
    lowered = text.casefold()  # casefold, not lower: re.IGNORECASE matches U+017F as "s"
    return "bearer" in lowered or "basic" in lowered


def scrub(text: str) -> str:
    if not _may_hold_secret(text):
        return text
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
    return isinstance(name, str) and _is_secret_str(name)


@functools.lru_cache(maxsize=4096)
def _is_secret_str(name: str) -> bool:
    # Field names come from code, not data: a small set, looked up on every log line.
    return name not in _SAFE_NAMES and bool(_SECRET_NAMES.search(name))


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
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Tracebacks become text before the redaction pass, so that one pass scrubs them too.
    shared += [structlog.processors.format_exc_info, _stdlib_message, redact]
    structlog.configure(
        # A line below the level is dropped before any processor runs: a worker's debug lines
        # (one per refresh) cost a level check, not the redaction pass.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
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
    # transitions logs every callback it runs, and arq two lines per job, at INFO: our own
    # transition line says it better, at a fraction of the cost per event. Failures still show.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("arq.worker").setLevel(logging.WARNING)


def _final_scrub(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # The shared chain ran ``redact`` already, after ``format_exc_info``; nothing between it and
    # the renderer adds a field. Tracebacks the renderer formats itself (console) are scrubbed
    # here, as a last line of defence.
    for name in ("exception", "stack", "exc_info"):
        value = event_dict.get(name)
        if isinstance(value, str):
            event_dict[name] = scrub(value)
    return event_dict
