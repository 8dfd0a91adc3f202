"""The pure core stays pure, and only the storage codec knows how a record lies in Redis."""

from __future__ import annotations

import ast
from pathlib import Path

import consent_flow
from consent_flow.store import codec

PACKAGE = Path(consent_flow.__file__).parent
CORE = PACKAGE / "core"
# What the core may not import: I/O libraries, and every layer around it.
FORBIDDEN = (
    "redis",
    "httpx",
    "arq",
    "cryptography",
    "consent_flow.store",
    "consent_flow.queue",
    "consent_flow.engine",
    "consent_flow.web",
    "consent_flow.oidc",
)
# The codec's storage names that are not also the everyday words the rest of the code uses for
# other things (state, since, reason, actor, scopes, inflight are attribute names too).
STORAGE_NAMES = {
    name
    for attribute, name in codec.FIELDS.items()
    if name != attribute and name not in ("since", "reason", "actor", "scopes")
} | {codec.VERSION, *codec.SEALED_KEYS.values()}
# The same words meaning something else where they appear.
OTHER_MEANINGS = {
    ("oidc", "sub"),  # ID token claims
    ("oidc", "exp"),
    ("mcp.py", "sub"),  # the MCP caller's token claims
    ("spool.py", "v"),  # the spool file's own format version
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_imports_no_io_library_and_no_outer_layer():
    assert list(CORE.glob("*.py"))
    found = {
        (path.name, name)
        for path in CORE.glob("*.py")
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not found


def test_only_the_codec_names_the_record_fields():
    assert {"v", "exp", "sess", "sid", "tok", "rvk"} <= STORAGE_NAMES
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == Path(codec.__file__):
            continue
        where = path.relative_to(PACKAGE).parts
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Constant) and node.value in STORAGE_NAMES):
                continue
            if (where[0], node.value) in OTHER_MEANINGS or (where[-1], node.value) in (
                OTHER_MEANINGS
            ):
                continue
            found.append(f"{'/'.join(where)}:{node.lineno}: {node.value!r}")
    assert not found
