"""Python driver for the local OpenID provider in ``examples/provider`` (oidc-provider 9).

The project's integration tests, benchmarks and demo put ``examples/provider`` on ``sys.path``
and import this module::

    from local_provider import LocalProvider, approve, npm_ci, pkce_pair

    npm_ci()  # no-op when node_modules is already installed
    with LocalProvider.start() as op:
        verifier, challenge = pkce_pair()
        url = op.authorization_url(state="s", nonce="n", code_challenge=challenge)
        callback = await approve(url, "alice")  # http://127.0.0.1:8080/oauth/callback?code=...

Only the standard library and httpx are used. ``server.mjs`` documents the provider itself.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx

__all__ = [
    "DEFAULT_CLIENT",
    "PROVIDER_DIR",
    "LocalProvider",
    "approve",
    "approve_sync",
    "callback_params",
    "node_modules_ready",
    "npm_ci",
    "pkce_pair",
]

PROVIDER_DIR = Path(__file__).resolve().parent

#: The client that server.mjs registers when no ``clients`` are given.
DEFAULT_CLIENT: dict[str, Any] = {
    "client_id": "consent-flow-demo",
    "client_secret": "demo-secret",
    "redirect_uris": ["http://127.0.0.1:8080/oauth/callback"],
    "token_endpoint_auth_method": "client_secret_basic",
}

_NPM_CI_HINT = "run: npm ci --prefix examples/provider"
# oidc-provider 9 supports the current LTS lines and warns "Unsupported runtime" on anything
# older; Node 20.18 is the oldest it still runs on (package.json's engines).
NODE_REQUIREMENT = "Node.js 22 LTS or later (20.18+ still runs, with oidc-provider's warning)"
# Variables server.mjs reads: never inherit them from the caller's environment by accident.
_SERVER_ENV = (
    "PORT",
    "HOST",
    "ISSUER",
    "RESOURCE",
    "CLIENTS",
    "ACCESS_TOKEN_TTL",
    "REFRESH_TOKEN_TTL",
    "ROTATE_REFRESH_TOKEN",
    "REFRESH_EXPIRES_IN",
    "NO_REVOCATION",
    "GRANT_ONLY",
    "TEST_CONTROLS",
    "EXIT_WITH_STDIN",
)


# ---------------------------------------------------------------------------------------------
# Installation


def _pinned_version() -> str:
    package = json.loads((PROVIDER_DIR / "package.json").read_text(encoding="utf-8"))
    return str(package["dependencies"]["oidc-provider"])


def node_modules_ready() -> bool:
    """Whether ``node_modules`` holds the pinned oidc-provider version."""
    installed = PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json"
    try:
        version = json.loads(installed.read_text(encoding="utf-8"))["version"]
        return bool(version == _pinned_version())
    except (OSError, ValueError, KeyError):
        return False


def npm_ci(*, force: bool = False, timeout: float = 300.0) -> None:
    """Install ``examples/provider/node_modules`` from the lock file, unless already there."""
    if not force and node_modules_ready():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm not found on PATH: install {NODE_REQUIREMENT}, with npm")
    command = [npm, "ci", "--prefix", str(PROVIDER_DIR), "--no-audit", "--no-fund"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )


# ---------------------------------------------------------------------------------------------
# The provider process


def _stop_process(
    process: subprocess.Popen[str], readers: Sequence[threading.Thread], timeout: float = 5.0
) -> None:
    """Terminate, wait, kill on timeout; then close the pipes. Safe to call twice."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for reader in readers:
        reader.join(timeout=timeout)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class LocalProvider:
    """A running ``node server.mjs``. Create it with :meth:`start`; stop it with :meth:`stop`
    or by using it as a context manager."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        readers: Sequence[threading.Thread],
        output: collections.deque[str],
        *,
        clients: list[dict[str, Any]],
        test_controls: bool,
        resource: str | None,
    ) -> None:
        self._process = process
        self._output = output
        self._clients = clients
        self._test_controls = test_controls
        self._resource = resource
        self._issuer = ""
        self._metadata: dict[str, Any] = {}
        # Kills the node process even if stop() is never called (garbage collection, exit).
        self._finalizer = weakref.finalize(self, _stop_process, process, list(readers))

    @classmethod
    def start(
        cls,
        *,
        port: int | None = None,
        clients: Sequence[Mapping[str, Any]] | None = None,
        access_token_ttl: int = 3600,
        refresh_token_ttl: int | None = None,
        rotate_refresh_token: bool = True,
        test_controls: bool = True,
        resource: str | None = None,
        refresh_expires_in: bool = False,
        no_revocation: bool = False,
        grant_only: Sequence[str] = (),
        startup_timeout: float = 15.0,
    ) -> LocalProvider:
        """Spawn the provider and wait until it serves its discovery document.

        ``port=None`` lets the provider pick a free port itself (no race). ``clients`` defaults to
        :data:`DEFAULT_CLIENT`; see server.mjs for the fields. ``resource`` is the one accepted
        resource indicator (default ``<issuer>/api``). ``refresh_expires_in``: token responses
        say how long their refresh token has left (``REFRESH_EXPIRES_IN=1``). ``no_revocation``:
        no revocation endpoint (``NO_REVOCATION=1``). ``grant_only``: consent grants only the
        requested scopes among these (``GRANT_ONLY``; one login can still choose its own).
        """
        node = shutil.which("node")
        if node is None:
            raise RuntimeError(
                f"node not found on PATH: install {NODE_REQUIREMENT}, then {_NPM_CI_HINT}"
            )
        if not node_modules_ready():
            raise RuntimeError(
                f"the pinned oidc-provider is not installed in {PROVIDER_DIR / 'node_modules'}: "
                f"{_NPM_CI_HINT}"
            )

        client_list = [dict(c) for c in clients] if clients is not None else [dict(DEFAULT_CLIENT)]
        env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV}
        env.update(
            PORT=str(port or 0),
            CLIENTS=json.dumps(client_list),
            ACCESS_TOKEN_TTL=str(access_token_ttl),
            ROTATE_REFRESH_TOKEN="1" if rotate_refresh_token else "0",
            TEST_CONTROLS="1" if test_controls else "0",
            REFRESH_EXPIRES_IN="1" if refresh_expires_in else "0",
            NO_REVOCATION="1" if no_revocation else "0",
            GRANT_ONLY=" ".join(grant_only),
            # The provider exits when our end of its stdin closes: no orphan if Python dies.
            EXIT_WITH_STDIN="1",
        )
        if refresh_token_ttl is not None:
            env["REFRESH_TOKEN_TTL"] = str(refresh_token_ttl)
        if resource is not None:
            env["RESOURCE"] = resource

        process = subprocess.Popen(
            [node, "server.mjs"],
            cwd=PROVIDER_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )

        ready = threading.Event()
        issuer: list[str] = []
        output: collections.deque[str] = collections.deque(maxlen=200)

        def read_stdout() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                if not ready.is_set() and line.startswith("READY "):
                    issuer.append(line.split(" ", 1)[1].strip())
                    ready.set()
                else:
                    output.append(line.rstrip("\n"))
            ready.set()  # EOF: the process ended; start() notices through poll()

        def read_stderr() -> None:
            # Drained continuously so that the provider never blocks on a full pipe.
            assert process.stderr is not None
            for line in process.stderr:
                output.append(line.rstrip("\n"))

        readers = [
            threading.Thread(target=read_stdout, name="local-provider-stdout", daemon=True),
            threading.Thread(target=read_stderr, name="local-provider-stderr", daemon=True),
        ]
        for reader in readers:
            reader.start()

        provider = cls(
            process,
            readers,
            output,
            clients=client_list,
            test_controls=test_controls,
            resource=resource,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            if not ready.wait(startup_timeout) or not issuer:
                raise RuntimeError(provider._failure("did not print READY"))
            provider._issuer = issuer[0]
            provider._metadata = provider._fetch_discovery(deadline)
        except BaseException:
            provider.stop()
            raise
        return provider

    def _fetch_discovery(self, deadline: float) -> dict[str, Any]:
        while True:
            try:
                response = httpx.get(self.discovery_url, timeout=5.0)
                response.raise_for_status()
                metadata: dict[str, Any] = response.json()
                return metadata
            except httpx.HTTPError as error:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    what = f"serves no discovery document ({error})"
                    raise RuntimeError(self._failure(what)) from error
                time.sleep(0.05)

    def _failure(self, what: str) -> str:
        time.sleep(0.1)  # let the readers collect the last lines of a crash
        code = self._process.poll()
        state = f"exited with code {code}" if code is not None else "still running"
        log = "\n".join(self._output) or "(no output)"
        return f"local OpenID provider {what}; it {state}. Output:\n{log}"

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Terminate the provider (SIGTERM), wait for it, kill it if it hangs."""
        self._finalizer()

    @property
    def running(self) -> bool:
        return self._finalizer.alive and self._process.poll() is None

    def __enter__(self) -> LocalProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalProvider {self._issuer or '?'} {state}>"

    # -- facts ----------------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def port(self) -> int:
        port = urlsplit(self._issuer).port
        assert port is not None
        return port

    @property
    def discovery_url(self) -> str:
        return f"{self._issuer}/.well-known/openid-configuration"

    @property
    def metadata(self) -> dict[str, Any]:
        """The discovery document, as served at start-up."""
        return self._metadata

    @property
    def resource(self) -> str:
        """The resource indicator (RFC 8707) that the provider accepts."""
        return self._resource or f"{self._issuer}/api"

    @property
    def clients(self) -> list[dict[str, Any]]:
        """The registered clients (a copy)."""
        return [dict(c) for c in self._clients]

    @property
    def output(self) -> list[str]:
        """The provider's last lines of stdout/stderr, for diagnostics."""
        return list(self._output)

    def authorization_url(
        self,
        *,
        code_challenge: str,
        state: str,
        nonce: str | None = None,
        scope: str = "openid offline_access",
        client_id: str | None = None,
        redirect_uri: str | None = None,
        prompt: str | None = "consent",
        resource: str | None = None,
        **extra: str,
    ) -> str:
        """An authorization code request (PKCE S256) for a registered client; the first client
        and its first redirect URI by default. ``prompt=consent`` is the default because the
        provider drops ``offline_access`` without it."""
        client = next((c for c in self._clients if client_id in (None, c["client_id"])), None)
        if client is None:
            raise ValueError(f"unknown client_id {client_id!r}")
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": redirect_uri or client["redirect_uris"][0],
            "scope": scope,
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
            **({"nonce": nonce} if nonce is not None else {}),
            **({"prompt": prompt} if prompt else {}),
            **({"resource": resource} if resource else {}),
            **extra,
        }
        return f"{self._metadata['authorization_endpoint']}?{urlencode(params)}"

    # -- test controls (TEST_CONTROLS=1) ---------------------------------------------------------

    def _control(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        if not self._test_controls:
            raise RuntimeError("the provider was started with test_controls=False")
        response = httpx.request(method, f"{self._issuer}/__test/{path}", json=body, timeout=10.0)
        if response.is_error:
            raise RuntimeError(f"/__test/{path} answered {response.status_code}: {response.text}")
        return response.json()

    def fault(
        self,
        *,
        count: int = 1,
        token_status: int | None = None,
        retry_after: int | None = None,
        token_error: str | None = None,
        token_error_description: str | None = None,
        token_delay_ms: int | None = None,
        token_drop_response: bool | None = None,
        id_token: str | None = None,
    ) -> dict[str, Any]:
        """Replace the token endpoint's fault set; each named fault applies to the next
        ``count`` token requests (for ``id_token``: token responses carrying an ID token).

        ``token_status``: answer that status without reaching the provider, body
        ``{"error": token_error or "temporarily_unavailable"}`` (plus ``error_description:
        token_error_description`` when given), ``Retry-After: retry_after``.
        ``token_delay_ms``: delay the requests. ``token_drop_response``: let the provider
        handle them, then cut the connection before the answer (a lost response).
        ``id_token``: one of ``bad_signature``,
        ``alg_none``, ``wrong_issuer``, ``wrong_audience``, ``wrong_nonce``, ``no_nonce``,
        ``expired``, ``iat_future``, ``no_sub``, ``other_key``, ``wrong_azp``.
        Returns the faults now armed.
        """
        body: dict[str, Any] = {"count": count}
        for key, value in (
            ("token_status", token_status),
            ("retry_after", retry_after),
            ("token_error", token_error),
            ("token_error_description", token_error_description),
            ("token_delay_ms", token_delay_ms),
            ("token_drop_response", token_drop_response),
            ("id_token", id_token),
        ):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = self._control("POST", "fault", body)
        return result

    def clear_faults(self) -> None:
        self._control("POST", "fault", {})

    def stats(self) -> dict[str, Any]:
        """Counters from the provider's events: token_requests, refresh_requests,
        refresh_reuse_detected, grants_revoked, grant_errors ({"error: detail": n}), ..."""
        result: dict[str, Any] = self._control("GET", "stats")
        return result

    def reset_stats(self) -> None:
        self._control("POST", "stats/reset")

    def revoke_grants(self, account: str, *, client_id: str | None = None) -> int:
        """Revoke every grant (and its tokens) of ``account``; returns how many."""
        body = {"account": account, **({"client_id": client_id} if client_id else {})}
        return int(self._control("POST", "revoke-grant", body)["revoked"])

    def introspect(self, token: str) -> dict[str, Any]:
        """Look an access or refresh token up in the provider's storage (the test control, no
        client authentication): ``{"active": bool, "token_type", "client_id", "sub", ...}``."""
        result: dict[str, Any] = self._control("POST", "introspect", {"token": token})
        return result


# ---------------------------------------------------------------------------------------------
# Headless login and consent


def pkce_pair() -> tuple[str, str]:
    """A PKCE ``(code_verifier, code_challenge)`` pair for S256."""
    verifier = secrets.token_urlsafe(48)  # 64 characters; 43..128 are allowed
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def callback_params(url: str) -> dict[str, str]:
    """The query parameters of a redirect back to the client (code, state, iss, error, ...)."""
    return dict(parse_qsl(urlsplit(url).query))


class _Forms(HTMLParser):
    """Collects ``<form id=... action=...>`` elements and the text of ``#error``."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, str] = {}
        self.error: list[str] = []
        self._in_error = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form" and attributes.get("id"):
            self.forms[attributes["id"] or ""] = attributes.get("action") or ""
        if self._in_error:
            self._in_error += 1
        elif attributes.get("id") == "error":
            self._in_error = 1

    def handle_endtag(self, tag: str) -> None:
        if self._in_error:
            self._in_error -= 1

    def handle_data(self, data: str) -> None:
        if self._in_error:
            self.error.append(data)


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    parts = httpx.URL(str(url))
    return parts.scheme, parts.host, parts.port


class _ApproveFlow:
    """The steps of a headless login and consent, free of I/O (shared by the sync and async
    drivers). Keeps its own cookie jar: the provider's ``_interaction`` cookie is scoped to
    ``/interaction/<uid>`` and ``_interaction_resume`` to ``/auth/<uid>``."""

    MAX_STEPS = 20

    def __init__(
        self,
        authorization_url: str,
        login: str,
        deny: bool,
        build_request: Callable[..., httpx.Request],
        grant_only: Sequence[str] = (),
    ) -> None:
        if not login:
            raise ValueError("login must not be empty")
        self._login = login
        self._deny = deny
        self._grant_only = " ".join(grant_only)
        self._build = build_request
        self._origin = _origin(authorization_url)
        self._jar = httpx.Cookies()
        self._steps = 0
        self.first = self._request("GET", authorization_url)

    def _request(self, method: str, url: str, data: dict[str, str] | None = None) -> httpx.Request:
        self._steps += 1
        if self._steps > self.MAX_STEPS:
            raise RuntimeError(f"no redirect to the client after {self.MAX_STEPS} steps")
        request = self._build(method, url, data=data)
        # Only this flow's cookies, never those of a shared client.
        request.headers.pop("cookie", None)
        self._jar.set_cookie_header(request)
        return request

    def advance(self, response: httpx.Response) -> httpx.Request | str:
        """The next request, or the final redirect URL (to the client) as a string."""
        self._jar.extract_cookies(response)
        here = str(response.request.url)
        if response.is_redirect:
            location = urljoin(here, response.headers["location"])
            if _origin(location) != self._origin:
                return location  # the client's redirect URI: not requested
            return self._request("GET", location)

        parser = _Forms()
        if "html" in response.headers.get("content-type", ""):
            parser.feed(response.text)
        if response.status_code == 200:
            if "login-form" in parser.forms:
                action = parser.forms["login-form"]
                return self._request("POST", urljoin(here, action), {"login": self._login})
            form = "deny-form" if self._deny else "approve-form"
            if form in parser.forms:
                data = (
                    {"grant_only": self._grant_only} if self._grant_only and not self._deny else {}
                )
                return self._request("POST", urljoin(here, parser.forms[form]), data)
        detail = " ".join("".join(parser.error).split()) or response.text[:500]
        raise RuntimeError(
            f"unexpected answer from the provider: {response.status_code} at {here}: {detail}"
        )


def _forget_cookies(client: httpx.Client | httpx.AsyncClient, response: httpx.Response) -> None:
    """httpx stores every response's cookies in the client's jar; keep a caller's shared client
    free of the provider's session cookies (each approve() call is a fresh user)."""
    received = httpx.Cookies()
    received.extract_cookies(response)
    for cookie in received.jar:
        with contextlib.suppress(KeyError):
            client.cookies.jar.clear(cookie.domain, cookie.path, cookie.name)


async def approve(
    authorization_url: str,
    login: str = "alice",
    *,
    deny: bool = False,
    client: httpx.AsyncClient | None = None,
    grant_only: Sequence[str] = (),
) -> str:
    """Log ``login`` in and approve (or, with ``deny=True``, deny) the authorization request,
    as a fresh browser would. Returns the final redirect URL to the client's redirect URI
    (``code``/``state``/``iss``, or ``error=access_denied``) without requesting it.
    ``grant_only``: approve only the requested scopes among these (the rest is refused).

    ``client`` is only used for transport; cookies are kept per call.
    """
    own = client is None
    http = client if client is not None else httpx.AsyncClient(timeout=10.0)
    try:
        flow = _ApproveFlow(authorization_url, login, deny, http.build_request, grant_only)
        step: httpx.Request | str = flow.first
        while not isinstance(step, str):
            response = await http.send(step, follow_redirects=False)
            if not own:
                _forget_cookies(http, response)
            step = flow.advance(response)
        return step
    finally:
        if own:
            await http.aclose()


def approve_sync(
    authorization_url: str,
    login: str = "alice",
    *,
    deny: bool = False,
    client: httpx.Client | None = None,
    grant_only: Sequence[str] = (),
) -> str:
    """The synchronous twin of :func:`approve`."""
    own = client is None
    http = client if client is not None else httpx.Client(timeout=10.0)
    try:
        flow = _ApproveFlow(authorization_url, login, deny, http.build_request, grant_only)
        step: httpx.Request | str = flow.first
        while not isinstance(step, str):
            response = http.send(step, follow_redirects=False)
            if not own:
                _forget_cookies(http, response)
            step = flow.advance(response)
        return step
    finally:
        if own:
            http.close()
