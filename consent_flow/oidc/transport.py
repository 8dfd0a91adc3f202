"""HTTP to the provider: lent clients, one bounded request, strict JSON, URL checks.

Every provider call goes through :meth:`Transport.request`: no redirect is followed (RFC 9700
4.11), a body is never read past :data:`MAX_RESPONSE_BYTES`, and a transport failure becomes
:class:`ProviderUnavailable` without chaining the httpx exception (its request holds credentials).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from consent_flow.errors import ProviderResponseError, ProviderUnavailable

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER",
    "TRANSIENT_STATUSES",
    "HttpClients",
    "Reply",
    "Transport",
    "check_url",
    "clip",
    "is_loopback",
    "json_object",
    "loads_strict",
    "retry_after",
]

MAX_RESPONSE_BYTES: Final = 256 * 1024
"""Provider responses above this size are refused without being read in full."""
MAX_RETRY_AFTER: Final = 3600.0
"""A Retry-After beyond this is clamped: the provider does not get to park our retries for days."""
DEFAULT_TIMEOUT_SECONDS: Final = 10.0
"""Any timeout phase the shared client leaves unbounded gets this, so no request hangs forever."""
TRANSIENT_STATUSES: Final = frozenset({408, 429})
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


class HttpClients:
    """httpx clients lent out one request at a time, for processes that call the provider at once.

    httpcore's connection pool does work in proportion to its connections and waiting requests on
    every request, including a readiness poll of each pooled connection, so one client shared by
    many concurrent requests costs more CPU per request than a client each (benchmarks/README.md).
    A worker runs up to ``max_jobs`` provider calls at once, so it lends each call a client of its
    own; an idle client keeps its kept-alive connection for the next call.

    Idle ``httpx.AsyncClient`` are built alike (``options`` go to each); ``lease()`` lends one, a
    new one when none is idle, and takes it back afterwards. At most ``max_idle`` are kept.
    ``aclose()`` closes the idle ones at once and the lent ones when they come back.
    """

    def __init__(self, *, timeout: float | httpx.Timeout, max_idle: int = 64, **options: Any):
        self.timeout = httpx.Timeout(timeout)
        if "transport" not in options:
            # One TLS context for all of them: building one loads the CA store (milliseconds).
            options.setdefault("verify", httpx.create_ssl_context())
        self._options = options
        self._max_idle = max_idle
        self._idle: list[httpx.AsyncClient] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._closed:
            raise RuntimeError("the HTTP clients are closed")
        client = self._idle.pop() if self._idle else self._new()
        try:
            yield client
        finally:
            if self._closed or client.is_closed or len(self._idle) >= self._max_idle:
                await client.aclose()
            else:
                self._idle.append(client)

    def _new(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.timeout, **self._options)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for client in idle:
            await client.aclose()


@dataclass(frozen=True)
class Reply:
    """One provider answer: the body is empty for statuses that need none (5xx, 408, 429)."""

    status: int
    headers: httpx.Headers
    body: bytes


class Transport:
    """Sends the provider requests of one :class:`~consent_flow.oidc.OAuthClient`.

    ``http`` is one ``httpx.AsyncClient`` for every request, or :class:`HttpClients` that lend
    each request a client of its own.
    """

    def __init__(self, http: httpx.AsyncClient | HttpClients) -> None:
        self._http = http

    def _client(self) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        if isinstance(self._http, HttpClients):
            return self._http.lease()
        return contextlib.nullcontext(self._http)

    def _timeout(self) -> httpx.Timeout:
        t = self._http.timeout
        d = DEFAULT_TIMEOUT_SECONDS

        def pick(value: float | None) -> float:
            return d if value is None else value

        return httpx.Timeout(
            connect=pick(t.connect), read=pick(t.read), write=pick(t.write), pool=pick(t.pool)
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str],
        data: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request; the body is read only for statuses that need it, and never past
        :data:`MAX_RESPONSE_BYTES`. Transport failures become :class:`ProviderUnavailable`; the
        httpx exception is not chained (its request holds the credentials)."""
        try:
            async with (
                self._client() as http,
                http.stream(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    timeout=self._timeout(),
                    follow_redirects=False,
                ) as response,
            ):
                status = response.status_code
                if status >= 500 or status in TRANSIENT_STATUSES:
                    return Reply(status, response.headers, b"")
                return Reply(status, response.headers, await _read_limited(response, what))
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(f"{what} timed out ({type(exc).__name__})") from None
        except httpx.DecodingError:
            raise ProviderResponseError(f"{what} sent a body that cannot be decoded") from None
        except httpx.RequestError as exc:
            raise ProviderUnavailable(f"{what} unreachable ({type(exc).__name__})") from None


async def _read_limited(response: httpx.Response, what: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise ProviderResponseError(f"{what} response is larger than {MAX_RESPONSE_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ProviderResponseError(
                f"{what} response is larger than {MAX_RESPONSE_BYTES} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(data: bytes | str) -> Any:
    """``json.loads`` refusing NaN and Infinity (RFC 8259 6 has no such numbers)."""
    return json.loads(data, parse_constant=_reject_constant)


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """The body as a JSON object, or :class:`ProviderResponseError` naming ``what`` sent it."""
    try:
        doc = loads_strict(body)
    except (ValueError, RecursionError):
        raise ProviderResponseError(f"{what} response is not JSON") from None
    if not isinstance(doc, dict):
        raise ProviderResponseError(f"{what} response is not a JSON object")
    return doc


def retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date (RFC 9110 10.2.3), clamped."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(int(value[:12]))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def clip(value: str, limit: int = 100) -> str:
    """A provider's string made printable ASCII and cut to ``limit`` for a message."""
    cleaned = "".join(c if 0x20 <= ord(c) <= 0x7E else "?" for c in value)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def check_url(name: str, value: str, *, insecure_ok: bool) -> None:
    """An absolute URL without a fragment, https unless loopback or ``insecure_ok`` (RFC 9700
    2.6: no plain http to a remote endpoint)."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ProviderResponseError(f"discovery document {name} is not an absolute URL")
    if parts.fragment:
        raise ProviderResponseError(f"discovery document {name} has a fragment")
    if parts.scheme == "http" and not insecure_ok and not is_loopback(parts.hostname):
        raise ProviderResponseError(f"discovery document {name} is not https")


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
