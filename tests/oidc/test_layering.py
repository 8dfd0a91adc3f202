"""The OpenID client is an adapter: it imports nothing from the engine, store or queue layers,
and its modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import consent_flow
import consent_flow.oidc

OIDC = Path(consent_flow.oidc.__file__).parent
# The exception tree and the settings: the only parts of consent_flow the OpenID client needs.
ALLOWED_FROM_CONSENT_FLOW = {"consent_flow.errors", "consent_flow.settings"}


def runtime_imports(path: Path, *, module_level: bool) -> set[str]:
    """Absolute names of the consent_flow modules ``path`` imports when it runs: imports under
    ``if TYPE_CHECKING:`` are for the type checker only; with ``module_level``, only those that
    run when the module is imported (the ones that can make a cycle)."""
    package = "consent_flow.oidc"
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                if node.module is None:
                    found.update(f"{base}.{alias.name}" for alias in node.names)
                else:
                    found.add(f"{base}.{node.module}" if base else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(ast.parse(path.read_text()).body)
    return {name for name in found if name.split(".")[0] == "consent_flow"}


def oidc_modules() -> dict[str, Path]:
    return {f"consent_flow.oidc.{p.stem}": p for p in OIDC.glob("*.py") if p.stem != "__init__"}


def test_the_oidc_package_imports_only_the_errors_and_settings_of_consent_flow() -> None:
    for name, path in {**oidc_modules(), "consent_flow.oidc": OIDC / "__init__.py"}.items():
        outside = {
            m
            for m in runtime_imports(path, module_level=False)
            if not m.startswith("consent_flow.oidc")
        }
        assert outside <= ALLOWED_FROM_CONSENT_FLOW, f"{name} imports {outside}"


def test_the_oidc_modules_import_each_other_without_a_cycle() -> None:
    modules = oidc_modules()
    graph = {
        name: {m for m in runtime_imports(path, module_level=True) if m in modules}
        for name, path in modules.items()
    }
    done: set[str] = set()

    def walk(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dependency in graph[name]:
            walk(dependency, (*path, name))
        done.add(name)

    for name in graph:
        walk(name, ())
    assert graph["consent_flow.oidc.transport"] == set()  # the bottom layer
