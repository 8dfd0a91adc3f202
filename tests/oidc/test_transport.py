"""The provider transport: default timeouts, bounded reads, no redirects, clean failures; on
both HTTP stacks (httpx clients, one aiohttp session) against a real local server."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import ipaddress
import json
import ssl
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from consent_flow.errors import ProviderResponseError, ProviderUnavailable
from consent_flow.oidc import HttpClients, OAuthClient, ProviderSession
from consent_flow.oidc.tokens import error_for
from consent_flow.oidc.transport import MAX_RESPONSE_BYTES, Reply, Transport

from .fakes import (
    CODE,
    REFRESH,
    SETTINGS,
    VERIFIER,
    Clock,
    FakeProvider,
    expect,
)


async def test_unbounded_client_timeouts_get_a_default(
    provider: FakeProvider, clock: Clock
) -> None:
    unbounded = httpx.Timeout(None)
    transport = httpx.MockTransport(provider)
    async with httpx.AsyncClient(transport=transport, timeout=unbounded) as http:
        await OAuthClient(SETTINGS, http, clock=clock).exchange_code(CODE, code_verifier=VERIFIER)
    timeout = provider.requests["/token"][0].extensions["timeout"]
    assert all(isinstance(v, float) and v > 0 for v in timeout.values())


async def test_oversize_body_is_not_read_in_full(
    client: OAuthClient, provider: FakeProvider
) -> None:
    consumed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        for _ in range(1000):
            consumed += 1
            yield b"x" * 65536

    provider.token = lambda r: httpx.Response(200, content=body())
    await expect(ProviderResponseError, client.refresh(REFRESH), match="larger than")
    assert consumed <= MAX_RESPONSE_BYTES // 65536 + 2


# --- HttpClients ---------------------------------------------------------------------------------


def echo(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text=request.url.path)


async def test_concurrent_requests_get_clients_of_their_own_and_idle_ones_are_reused():
    clients = HttpClients(transport=httpx.MockTransport(echo), timeout=3.0)
    release, all_lent = asyncio.Event(), asyncio.Event()
    lent: list[httpx.AsyncClient] = []

    async def call() -> None:
        async with clients.lease() as client:
            lent.append(client)
            if len(lent) == 5:
                all_lent.set()
            await release.wait()
            assert (await client.get("http://provider.test/x")).text == "/x"

    tasks = [asyncio.create_task(call()) for _ in range(5)]
    await asyncio.wait_for(all_lent.wait(), 5)
    assert len({id(c) for c in lent}) == 5  # no two concurrent requests share a client
    release.set()
    await asyncio.gather(*tasks)
    assert clients.idle == 5
    async with clients.lease() as again:
        assert again in lent  # an idle client (and its kept-alive connection) is used again
        assert again.timeout == httpx.Timeout(3.0)
        assert again.follow_redirects is False
    await clients.aclose()
    assert clients.idle == 0
    assert all(c.is_closed for c in lent)


async def test_at_most_max_idle_are_kept_and_closing_reaches_lent_clients():
    clients = HttpClients(transport=httpx.MockTransport(echo), timeout=3.0, max_idle=2)
    async with clients.lease() as a, clients.lease() as b, clients.lease() as c:
        pass
    assert clients.idle == 2
    assert sum(x.is_closed for x in (a, b, c)) == 1
    async with clients.lease() as lent:
        await clients.aclose()  # while one is lent out
        assert not lent.is_closed
    assert lent.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        async with clients.lease():
            pass


# --- both HTTP stacks against a real local server ------------------------------------------------

Route = Callable[[asyncio.StreamWriter], Awaitable[None]]
TOKEN_FORM = {"grant_type": "refresh_token", "refresh_token": "rt-SECRET-7d1f0a"}
BASIC = {"Authorization": "Basic Y2xpZW50OmNsaWVudC1TRUNSRVQ=", "Accept": "application/json"}
CHUNK = 64 * 1024
HUGE = 64 * 1024 * 1024  # far past the limit and past what socket buffers hold


def head(status: int, *fields: tuple[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Server:
    """A real HTTP/1.1 server on a loopback port, each path answered by a scripted route that
    writes raw bytes: bodies of any size, encoding or pace, and broken ones."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, str, bytes]] = []  # method, target, body
        self.connections = 0
        self.finished: set[str] = set()  # paths whose whole answer went out
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def reply(self, path: str, status: int, body: bytes = b"", *fields: tuple[str, str]) -> None:
        async def route(w: asyncio.StreamWriter) -> None:
            w.write(head(status, ("Content-Length", str(len(body))), *fields) + body)

        self.routes[path] = route

    def stream(self, path: str, status: int, chunks: Iterable[bytes], *fields: tuple[str, str]):
        """Chunked, unless ``fields`` declare a Content-Length; written as the client reads."""
        chunked = not any(k.lower() == "content-length" for k, _ in fields)

        async def route(w: asyncio.StreamWriter) -> None:
            w.write(head(status, *fields, *([("Transfer-Encoding", "chunked")] * chunked)))
            for chunk in chunks:
                w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await w.drain()
            w.write(b"0\r\n\r\n" if chunked else b"")
            await w.drain()
            self.finished.add(path)

        self.routes[path] = route

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ")
                length = 0
                for line in request.decode().split("\r\n")[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                self.seen.append((method, target, await reader.readexactly(length)))
                await self.routes[urlsplit(target).path](writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as s:
        yield s


MakeTransport = Callable[..., Transport]


@pytest.fixture(params=["httpx", "aiohttp"])
async def make_transport(request: pytest.FixtureRequest) -> AsyncIterator[MakeTransport]:
    """Transports on httpx clients lent per request, or on one aiohttp session."""
    opened: list[HttpClients | ProviderSession] = []

    def make(timeout: float | httpx.Timeout = 5.0) -> Transport:
        http: HttpClients | ProviderSession
        if request.param == "httpx":
            http = HttpClients(timeout=timeout, follow_redirects=False)
        else:
            http = ProviderSession(timeout=timeout)
        opened.append(http)
        return Transport(http)

    try:
        yield make
    finally:
        for http in opened:
            await http.aclose()


async def post(transport: Transport, url: str) -> Reply:
    return await transport.request(
        "POST", url, what="token endpoint", headers=BASIC, data=TOKEN_FORM
    )


async def test_a_body_is_read_and_a_kept_alive_connection_used_again(
    server: Server, make_transport: MakeTransport
) -> None:
    server.reply("/token", 200, b'{"access_token": "a"}', ("Content-Type", "application/json"))
    transport = make_transport()
    for _ in range(3):
        reply = await post(transport, server.url("/token"))
        assert (reply.status, reply.body) == (200, b'{"access_token": "a"}')
        assert reply.headers["content-type"] == reply.headers["CONTENT-TYPE"] == "application/json"
    assert server.connections == 1
    method, _, body = server.seen[0]
    assert method == "POST"
    assert parse_qs(body.decode()) == {k: [v] for k, v in TOKEN_FORM.items()}


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
async def test_an_oversize_body_is_refused_without_being_read_in_full(
    server: Server, make_transport: MakeTransport, declared: bool
) -> None:
    fields = [("Content-Length", str(HUGE))] if declared else []
    server.stream("/token", 200, (b"x" * CHUNK for _ in range(HUGE // CHUNK)), *fields)
    with pytest.raises(ProviderResponseError, match="larger than"):
        await post(make_transport(), server.url("/token"))
    assert "/token" not in server.finished


async def test_a_compressed_body_counts_decompressed(
    server: Server, make_transport: MakeTransport
) -> None:
    small = json.dumps({"access_token": "a" * 1000}).encode()
    server.reply("/small", 200, gzip.compress(small), ("Content-Encoding", "gzip"))
    bomb = gzip.compress(b"\0" * HUGE)  # 64 MiB of zeros in about 64 KiB: declared small
    assert len(bomb) < MAX_RESPONSE_BYTES
    server.reply("/bomb", 200, bomb, ("Content-Encoding", "gzip"))
    transport = make_transport()
    assert (await post(transport, server.url("/small"))).body == small
    with pytest.raises(ProviderResponseError, match="larger than"):
        await post(transport, server.url("/bomb"))


async def test_a_body_that_cannot_be_decompressed_is_a_response_error(
    server: Server, make_transport: MakeTransport
) -> None:
    server.reply("/token", 200, b"not gzip at all", ("Content-Encoding", "gzip"))
    with pytest.raises(ProviderResponseError, match="cannot be decoded") as info:
        await post(make_transport(), server.url("/token"))
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("status", [302, 307, 308])
async def test_a_redirect_is_answered_not_followed(
    server: Server, make_transport: MakeTransport, status: int
) -> None:
    server.reply("/token", status, b"moved", ("Location", server.url("/elsewhere")))
    server.reply("/elsewhere", 200, b"{}")
    reply = await post(make_transport(), server.url("/token"))
    assert (reply.status, reply.body) == (status, b"moved")
    assert reply.headers["location"] == server.url("/elsewhere")
    assert [target for _, target, _ in server.seen] == ["/token"]  # the form went nowhere else


@pytest.mark.parametrize("status", [429, 408, 500, 503])
async def test_a_transient_status_answers_an_empty_body_and_keeps_retry_after(
    server: Server, make_transport: MakeTransport, status: int
) -> None:
    server.stream(
        "/token", status, (b"x" * CHUNK for _ in range(HUGE // CHUNK)), ("Retry-After", "7")
    )
    reply = await post(make_transport(), server.url("/token"))
    assert (reply.status, reply.body) == (status, b"")
    assert "/token" not in server.finished  # the body was not read
    error = error_for(reply, "token endpoint", now=0.0, oauth=True)
    assert isinstance(error, ProviderUnavailable)
    assert (error.status, error.retry_after) == (status, 7.0)


async def test_a_field_sent_on_several_lines_reads_joined(
    server: Server, make_transport: MakeTransport
) -> None:
    server.reply(
        "/userinfo",
        401,
        b"",
        ("WWW-Authenticate", 'Basic realm="op"'),
        ("www-authenticate", 'Bearer error="invalid_token"'),
    )
    reply = await make_transport().request(
        "GET", server.url("/userinfo"), what="userinfo endpoint", headers={}
    )
    assert reply.headers.get("WWW-Authenticate") == 'Basic realm="op", Bearer error="invalid_token"'


@pytest.mark.parametrize("stall", ["headers", "body"])
async def test_a_provider_that_stalls_times_out(
    server: Server, make_transport: MakeTransport, stall: str
) -> None:
    stop = asyncio.Event()

    async def route(w: asyncio.StreamWriter) -> None:
        if stall == "body":
            w.write(head(200, ("Content-Length", "100")) + b"{")
        await stop.wait()

    server.routes["/token"] = route
    transport = make_transport(httpx.Timeout(5.0, read=0.3))
    started = time.monotonic()
    try:
        with pytest.raises(ProviderUnavailable, match="token endpoint timed out") as info:
            await post(transport, server.url("/token"))
    finally:
        stop.set()
    assert time.monotonic() - started < 3
    assert info.value.__cause__ is None and info.value.__suppress_context__


async def test_a_refused_connection_is_unreachable_and_the_library_error_stays_out(
    make_transport: MakeTransport,
) -> None:
    url = f"http://127.0.0.1:{free_port()}/token?code=code-SECRET"
    with pytest.raises(ProviderUnavailable, match=r"token endpoint unreachable \(\w+\)$") as info:
        await post(make_transport(), url)
    error = info.value
    assert error.__cause__ is None and error.__suppress_context__
    shown = "".join(traceback.format_exception(error))
    assert "SECRET" not in shown and "127.0.0.1" not in shown


async def test_proxies_come_from_the_environment(
    server: Server, make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.reply("/token", 200, b"{}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("NO_PROXY", "direct.invalid")
    transport = make_transport(httpx.Timeout(5.0, connect=1.0))
    assert (await post(transport, "http://op.invalid/token")).status == 200
    assert [target for _, target, _ in server.seen] == ["http://op.invalid/token"]
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        await post(transport, "http://direct.invalid/token")  # not proxied: no such host


async def test_closing_the_session_lets_calls_in_flight_end(server: Server) -> None:
    asked, go = asyncio.Event(), asyncio.Event()

    async def route(w: asyncio.StreamWriter) -> None:
        asked.set()
        await go.wait()
        w.write(head(200, ("Content-Length", "2")) + b"{}")

    server.routes["/token"] = route
    session = ProviderSession(timeout=5.0)
    transport = Transport(session)
    call = asyncio.create_task(post(transport, server.url("/token")))
    await asyncio.wait_for(asked.wait(), 5)
    await session.aclose()
    assert session.in_flight == 1 and not session.is_closed
    go.set()
    assert (await call).body == b"{}"
    assert session.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        await post(transport, server.url("/token"))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consent-flow test provider")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_is_verified_against_the_ca_store_httpx_uses(
    make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch, tls_files: tuple[Path, Path]
) -> None:
    cert_file, key_file = tls_files
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    async with Server(tls=tls) as server:
        server.reply("/token", 200, b"{}")
        with pytest.raises(ProviderUnavailable, match="unreachable"):
            await post(make_transport(), server.url("/token"))  # not in certifi's store
        assert server.seen == []
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # httpx's way to name a CA file
        assert (await post(make_transport(), server.url("/token"))).status == 200
