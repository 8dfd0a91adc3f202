"""HTTP to the provider: a shared aiohttp session or httpx clients, one bounded request, strict
JSON, URL checks.

Every provider call goes through :meth:`Transport.request`, on either HTTP stack: no redirect is
followed (RFC 9700 4.11), a body is never read past :data:`MAX_RESPONSE_BYTES` (decompressed),
every timeout phase is bounded, and a transport failure becomes :class:`ProviderUnavailable`
without chaining the HTTP library's exception or quoting its text (its request holds credentials).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode, urlsplit

import httpx

from consent_flow.errors import ProviderResponseError, ProviderUnavailable

if TYPE_CHECKING:
    # Imported where a session is built or used: importing aiohttp costs a process about a
    # quarter of a second, and only the workers call the provider through it.
    import aiohttp
    from multidict import CIMultiDictProxy
    from yarl import URL

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_RESPONSE_BYTES",
    "MAX_RETRY_AFTER",
    "TRANSIENT_STATUSES",
    "HttpClients",
    "ProviderSession",
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
"""Any timeout phase a client or session leaves unbounded gets this: no request hangs forever."""
TRANSIENT_STATUSES: Final = frozenset({408, 429})
KEEPALIVE_SECONDS: Final = 5.0
"""An idle pooled connection is closed after this (httpcore's default keep-alive expiry)."""
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


class HttpClients:
    """httpx clients lent out one request at a time, for processes that call the provider at once.

    httpcore's connection pool does work in proportion to its connections and waiting requests on
    every request, including a readiness poll of each pooled connection, so one client shared by
    many concurrent requests costs more CPU per request than a client each (benchmarks/README.md).
    So each call gets a client of its own; an idle client keeps its kept-alive connection for the
    next call. (The workers use :class:`ProviderSession`, cheaper still; the webhook sender and
    callers who stay on httpx use these.)

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


class ProviderSession:
    """One ``aiohttp.ClientSession`` for every provider call of a process (workers).

    aiohttp's connection pool hands a request a kept-alive connection without the per-request
    work of httpcore's, so one session shared by all concurrent calls costs a fraction of the CPU
    of an httpx client lent to each (benchmarks/README.md). ``timeout`` is read as httpx reads
    it, phase by phase; ``connections`` caps the pool, and should cover every call the process
    can have in flight (a call beyond it waits for a connection within the connect timeout).

    TLS is verified against the CA store httpx uses, and proxies come from the environment as
    httpx takes them (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), but neither ``.netrc`` nor
    cookies are used: a provider's cookie must not ride along on another user's refresh. The
    session opens on the first request, in the running loop; ``aclose()`` refuses new requests
    at once and closes the session when the requests in flight have ended.
    """

    def __init__(self, *, timeout: float | httpx.Timeout, connections: int = 100) -> None:
        import aiohttp

        self.timeout = httpx.Timeout(timeout)
        bounded = _bounded(self.timeout)
        assert bounded.connect is not None and bounded.pool is not None
        # aiohttp's connect phase includes waiting for a pooled connection; it has no write
        # phase, and needs none here: a request body is a small form handed to the socket whole.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=bounded.pool + bounded.connect,
            sock_connect=bounded.connect,
            sock_read=bounded.read,
        )
        # Building a TLS context loads the CA store (milliseconds): once per session.
        self._ssl = httpx.create_ssl_context()
        self._proxies = {k: v for k, v in urllib.request.getproxies().items() if v}
        self._proxy_of: dict[str, tuple[URL | None, aiohttp.BasicAuth | None]] = {}
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._closed:
            raise RuntimeError("the provider session is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._connections,
                ssl=self._ssl,
                # As httpx's pool: servers often close a connection idle for 5 s (Node's default),
                # and a POST sent as the server closes it fails, not retried.
                keepalive_timeout=KEEPALIVE_SECONDS,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,  # it would read .netrc and the proxies again on every request
            )
        return self._session

    def _proxy(self, url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        if not self._proxies:
            return None, None
        found = self._proxy_of.get(url)
        if found is None:
            import aiohttp
            from yarl import URL

            found = None, None
            parts = urlsplit(url)
            raw = self._proxies.get(parts.scheme) or self._proxies.get("all")
            host = parts.hostname or ""
            if raw and not urllib.request.proxy_bypass(host):
                proxy = URL(raw if "://" in raw else f"http://{raw}")
                found = proxy.with_user(None), aiohttp.BasicAuth.from_url(proxy)
            if len(self._proxy_of) >= 256:  # a provider has a handful of endpoints
                self._proxy_of.clear()
            self._proxy_of[url] = found
        return found

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        data: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request, redirects not followed; the response's body is left to the caller."""
        session = self._open()
        proxy, proxy_auth = self._proxy(url)
        if data is not None:
            headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        self._in_flight += 1
        try:
            async with session.request(
                method,
                url,
                headers=headers,
                data=None if data is None else urlencode(data).encode("ascii"),
                allow_redirects=False,
                proxy=proxy,
                proxy_auth=proxy_auth,
            ) as response:
                yield response
        finally:
            self._in_flight -= 1
            if self._closed and not self._in_flight:
                await self._close_session()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def is_closed(self) -> bool:
        """Closed, and its session too (``aclose()`` with nothing left in flight)."""
        return self._closed and self._session is None

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def aclose(self) -> None:
        self._closed = True
        if not self._in_flight:
            await self._close_session()


@dataclass(frozen=True)
class Reply:
    """One provider answer: the body is empty for statuses that need none (5xx, 408, 429).

    ``headers`` is case-insensitive, and a field sent on several lines reads as their values
    joined by ", " (RFC 9110 5.3), whichever HTTP stack received it."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport:
    """Sends the provider requests of one :class:`~consent_flow.oidc.OAuthClient`.

    ``http`` is one ``httpx.AsyncClient`` for every request, :class:`HttpClients` that lend each
    request a client of its own, or one :class:`ProviderSession` for all.
    """

    def __init__(self, http: httpx.AsyncClient | HttpClients | ProviderSession) -> None:
        self._http = http

    def _client(self) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        if isinstance(self._http, HttpClients):
            return self._http.lease()
        assert isinstance(self._http, httpx.AsyncClient)
        return contextlib.nullcontext(self._http)

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
        HTTP library's exception is not chained (its request holds the credentials)."""
        if isinstance(self._http, ProviderSession):
            return await self._aiohttp(self._http, method, url, what, headers, data)
        try:
            async with (
                self._client() as http,
                http.stream(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    timeout=_bounded(self._http.timeout),
                    follow_redirects=False,
                ) as response,
            ):
                status = response.status_code
                if status >= 500 or status in TRANSIENT_STATUSES:
                    return Reply(status, response.headers, b"")
                _check_declared(response.headers, what)
                return Reply(status, response.headers, await _read_limited(response, what))
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(f"{what} timed out ({type(exc).__name__})") from None
        except httpx.DecodingError:
            raise ProviderResponseError(f"{what} sent a body that cannot be decoded") from None
        except httpx.RequestError as exc:
            raise ProviderUnavailable(f"{what} unreachable ({type(exc).__name__})") from None

    @staticmethod
    async def _aiohttp(
        http: ProviderSession,
        method: str,
        url: str,
        what: str,
        headers: Mapping[str, str],
        data: Mapping[str, str] | None,
    ) -> Reply:
        import aiohttp
        from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError

        try:
            async with http.stream(method, url, headers=headers, data=data) as response:
                status = response.status
                fields = _joined(response.headers)
                if status >= 500 or status in TRANSIENT_STATUSES:
                    return Reply(status, fields, b"")
                _check_declared(fields, what)
                return Reply(status, fields, await _read_limited_aiohttp(response, what))
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise ProviderUnavailable(f"{what} timed out ({type(exc).__name__})") from None
        except aiohttp.ClientPayloadError as exc:
            if isinstance(exc.__cause__, ContentEncodingError):
                raise ProviderResponseError(f"{what} sent a body that cannot be decoded") from None
            raise ProviderUnavailable(f"{what} unreachable ({type(exc).__name__})") from None
        except (aiohttp.ClientError, HttpProcessingError) as exc:
            raise ProviderUnavailable(f"{what} unreachable ({type(exc).__name__})") from None


def _bounded(t: httpx.Timeout) -> httpx.Timeout:
    """``t`` with :data:`DEFAULT_TIMEOUT_SECONDS` for every phase it leaves unbounded."""
    d = DEFAULT_TIMEOUT_SECONDS

    def pick(value: float | None) -> float:
        return d if value is None else value

    return httpx.Timeout(
        connect=pick(t.connect), read=pick(t.read), write=pick(t.write), pool=pick(t.pool)
    )


def _joined(headers: CIMultiDictProxy[str]) -> Mapping[str, str]:
    """aiohttp's headers read as httpx's do: a repeated field's values joined by ", "."""
    if len({name.lower() for name in headers}) == len(headers):
        return headers
    from multidict import CIMultiDict

    joined: CIMultiDict[str] = CIMultiDict()
    for name in headers:
        if name not in joined:
            joined[name] = ", ".join(headers.getall(name))
    return joined


def _too_large(what: str) -> ProviderResponseError:
    return ProviderResponseError(f"{what} response is larger than {MAX_RESPONSE_BYTES} bytes")


def _check_declared(headers: Mapping[str, str], what: str) -> None:
    declared = headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise _too_large(what)


async def _read_limited(response: httpx.Response, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _too_large(what)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_limited_aiohttp(response: aiohttp.ClientResponse, what: str) -> bytes:
    # The stream holds the decompressed body; aiohttp inflates it a bounded piece at a time.
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _too_large(what)
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
