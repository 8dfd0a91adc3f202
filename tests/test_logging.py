"""The redaction processor: secrets never reach a rendered log line, whichever logger wrote it."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from consent_flow.logging import REDACTED, configure_logging, scrub

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
SECRETS = [JWT, "opaque-refresh-token-value", "the-client-secret", "authcode123", "verif1er"]


@pytest.fixture(params=["json", "console"])
def output(request, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging(request.param)
    yield stream
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
    structlog.reset_defaults()


def test_secret_named_fields_are_masked(output):
    log = structlog.get_logger("test")
    log.info(
        "event",
        refresh_token="opaque-refresh-token-value",
        client_secret="the-client-secret",
        code="authcode123",
        code_verifier="verif1er",
        nested={"access_token": JWT},
        token_type="Bearer",
        user="alice",
    )
    text = output.getvalue()
    for secret in SECRETS:
        assert secret not in text
    assert "alice" in text
    assert REDACTED in text


def test_token_shaped_strings_are_scrubbed_anywhere(output):
    log = structlog.get_logger("test")
    log.warning(
        "provider said",
        detail=f"bad token {JWT}",
        url="https://mcp.example.com/oauth/callback?code=authcode123&state=xyz",
        header="Authorization: Bearer opaque-refresh-token-value",
    )
    text = output.getvalue()
    for secret in (JWT, "authcode123", "xyz", "opaque-refresh-token-value"):
        assert secret not in text


def test_standard_library_loggers_and_tracebacks_go_through_it(output):
    logging.getLogger("arq.worker").info("job args code=authcode123 token %s", JWT)
    try:
        raise RuntimeError(f"failed with refresh_token=opaque-refresh-token-value {JWT}")
    except RuntimeError:
        logging.getLogger("httpx").error("boom", exc_info=True)
        structlog.get_logger("test").exception("crashed")
    text = output.getvalue()
    assert "boom" in text
    assert "crashed" in text
    for secret in (JWT, "authcode123", "opaque-refresh-token-value"):
        assert secret not in text


def test_json_lines_stay_json(output):
    structlog.get_logger("test").info("transition", user="alice", **{"from": "a", "to": "b"})
    line = output.getvalue().strip().splitlines()[-1]
    if line.startswith("{"):
        data = json.loads(line)
        assert (data["from"], data["to"], data["user"]) == ("a", "b", "alice")


def test_scrub_leaves_ordinary_text_alone():
    text = "provision_requested for alice from pending to provisioned"
    assert scrub(text) is text


def test_a_line_below_the_level_is_dropped_before_any_processor(output, monkeypatch):
    """A worker writes a debug line per refresh: below the level, it must not pay for the
    redaction pass (or any other processor) only to be dropped."""
    import consent_flow.logging as logging_module

    seen: list[str] = []
    original = logging_module._clean

    def counting(value, depth=0):
        seen.append(repr(value))
        return original(value, depth)

    monkeypatch.setattr(logging_module, "_clean", counting)
    log = structlog.get_logger("test")
    log.debug("below", user="alice")
    assert seen == []
    assert "below" not in output.getvalue()
    log.info("above", user="alice")
    assert seen  # the same pass runs for a line that is written
    assert "above" in output.getvalue()
