"""The HTML the web routes serve: Jinja2 templates with autoescaping, and their stylesheets.

Templates live in ``templates/`` and stylesheets in ``static/``, both package data. A page
inlines its stylesheet from the file rather than linking to it: the routes are mounted into
other applications (``consent_routes``, ``ops_routes``) at paths this package does not choose,
so a link to a stylesheet route could miss, collide with the host's own ``/static``, or need
the operators' guard in front of it. The Content-Security-Policy names each stylesheet by its
SHA-256 hash, so no other inline style (and no script at all) runs.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from consent_flow.core.records import iso

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

__all__ = ["SECURITY_HEADERS", "Moment", "age", "moment", "render"]

STYLESHEETS = ("callback.css", "ops.css")


def _stylesheet(name: str) -> str:
    return (resources.files("consent_flow.web") / "static" / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


_STYLES = {name: _stylesheet(name) for name in STYLESHEETS}

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src "
    + " ".join(_csp_hash(text) for text in _STYLES.values())
    + "; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


@dataclass(frozen=True, slots=True)
class Moment:
    """A time as a page shows it: RFC 3339 for machines, readable, and how far from now."""

    iso: str
    shown: str
    age: str


def age(at: float, now: float) -> str:
    """How far ``at`` is from ``now``, either way: "5 min ago", "in 4 min", "now"."""
    seconds = abs(now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            return f"in {amount}" if at > now else f"{amount} ago"
    return "now"


def moment(at: float | None, now: float) -> Moment | None:
    stamp = iso(at)
    if at is None or stamp is None:
        return None
    return Moment(iso=stamp, shown=stamp.replace("T", " "), age=age(at, now))


def dash(value: Any) -> Any:
    """A missing value shows as a dash."""
    return "—" if value is None or value == "" else value


@functools.cache
def _templates() -> Jinja2Templates:
    # Built at the first page, not at import: the CLI and MCP servers import this package for
    # much else and need no template engine for it.
    import jinja2
    from markupsafe import Markup
    from starlette.templating import Jinja2Templates

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("consent_flow.web", "templates"),
        autoescape=True,  # every value is text unless a template says otherwise
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the page, never shows empty
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["dash"] = dash
    env.globals["moment"] = moment
    # The stylesheets are this package's own files, never user data: inlined as they are, so
    # the text the browser hashes is the text the policy names.
    env.globals["stylesheet"] = {name: Markup(text) for name, text in _STYLES.items()}  # noqa: S704
    return Jinja2Templates(env=env)


def render(
    request: Request,
    name: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """Template ``name`` as an HTML response with the security headers."""
    return _templates().TemplateResponse(
        request,
        name,
        dict(context),
        status_code=status,
        headers={**SECURITY_HEADERS, **(headers or {})},
    )
