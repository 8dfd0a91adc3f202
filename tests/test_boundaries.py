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
    "aiohttp",
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


def module_imports(path: Path) -> set[str]:
    """The consent_flow modules ``path`` imports when it is imported: module level, outside
    ``if TYPE_CHECKING:`` (imports inside functions run later and cannot make a cycle)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If):
                if getattr(node.test, "id", None) != "TYPE_CHECKING":
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "consent_flow"
            ):
                found.add(str(node.module))
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("consent_flow"))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def package_modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("consent_flow", *path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


# Who may not import whom: adapters know nothing of the engine or delivery, the engine nothing
# of delivery.
DELIVERY = ("consent_flow.web", "consent_flow.client", "consent_flow.cli", "consent_flow.mcp")
LAYER_RULES = {
    "consent_flow.store": ("consent_flow.engine", "consent_flow.importer", *DELIVERY),
    "consent_flow.queue": ("consent_flow.engine", "consent_flow.importer", *DELIVERY),
    "consent_flow.oidc": ("consent_flow.engine", "consent_flow.store", "consent_flow.queue"),
    "consent_flow.engine": ("consent_flow.importer", *DELIVERY),
}


def test_each_layer_imports_only_its_own_and_the_layers_below() -> None:
    modules = package_modules()
    broken = []
    for name, path in modules.items():
        for layer, forbidden in LAYER_RULES.items():
            if name == layer or name.startswith(layer + "."):
                imported = {m for m in module_imports(path) if m in modules}
                broken += [f"{name} -> {m}" for m in imported if m.startswith(forbidden)]
    assert not broken


def test_the_package_has_no_import_cycle() -> None:
    modules = package_modules()
    # `from package import submodule` depends on the submodule, not on the package's own
    # __init__ importing it back.
    graph = {
        name: {
            m
            for m in module_imports(path)
            if m in modules and m != name and not (name.startswith(m + ".") and m != "consent_flow")
        }
        for name, path in modules.items()
    }
    graph = {n: {m for m in deps if m != "consent_flow"} for n, deps in graph.items()}
    done: set[str] = set()

    def walk(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError(" -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            walk(dep, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])
