"""Redis connections: from ``CONSENT_REDIS_URL``, or an embedded ``redis-server`` for a first run.

The embedded server listens on a Unix socket in the data folder and keeps an append-only file
there, so every command finds the same one (``status`` beside a running ``up``) and nothing is
lost between runs. A command that had to start it stops it again when it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from arq.connections import RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._errors import ConsentError
from ._settings import Settings

__all__ = ["EmbeddedRedis", "arq_redis_settings", "embedded_redis"]

START_TIMEOUT = 10.0
# Each command is retried this often, backing off up to the cap, to ride out a Redis restart. The
# client applies the same retries to connecting, inside each command attempt: the two multiply,
# so with Redis away a command gives up after about 5 x 1.5 s (8 retries capped at 2 s took 82 s,
# longer than a worker should take to notice an outage).
RETRIES = 4
RETRY_BACKOFF_CAP = 1.0


def arq_redis_settings(url: str, *, startup_retries: int = 20) -> RedisSettings:
    """arq's settings for a URL, with reconnects that ride out a Redis restart.

    ``startup_retries`` (one a second) is how long the first connection may wait for Redis:
    long for workers started beside it, short for a command line that should answer.
    """
    parts = urlsplit(url)
    if parts.scheme == "redis+sentinel":
        # redis+sentinel://host:26379,host2:26379/mymaster
        hosts = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.partition(":")
            hosts.append((host, int(port or 26379)))
        query = parse_qs(parts.query)
        rs = RedisSettings(
            host=hosts,
            sentinel=True,
            sentinel_master=parts.path.strip("/") or "mymaster",
            password=unquote(parts.password) if parts.password else None,
            database=int(query.get("db", ["0"])[0]),
        )
    else:
        rs = RedisSettings.from_dsn(url)
    rs.conn_retries = startup_retries
    rs.conn_retry_delay = 1
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError, ConnectionError]
    rs.retry = Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP, base=0.05), retries=RETRIES)
    return rs


class EmbeddedRedis:
    """A private ``redis-server`` in a data folder, reachable on a Unix socket."""

    def __init__(self, data_dir: Path, *, binary: str | None = None) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "redis.sock"
        self.binary = binary or shutil.which("redis-server")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def start(self) -> bool:
        """Start the server unless one already answers. Returns True if this call started it."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.data_dir / ".start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.ping():
                return False
            if self.binary is None:
                raise ConsentError(
                    "CONSENT_REDIS_URL is not set and no redis-server binary was found for the "
                    "embedded Redis: install redis-server or set CONSENT_REDIS_URL"
                )
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
            self.process = subprocess.Popen(  # noqa: S603 - our own binary and arguments
                [
                    self.binary,
                    "--port",
                    "0",
                    "--unixsocket",
                    str(self.socket),
                    "--unixsocketperm",
                    "700",
                    "--dir",
                    str(self.data_dir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                    "--logfile",
                    str(self.data_dir / "redis.log"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
            )
            try:
                deadline = time.monotonic() + START_TIMEOUT
                while not self.ping():
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise ConsentError(
                            "the embedded redis-server did not start "
                            f"(see {self.data_dir}/redis.log)"
                        )
                    time.sleep(0.02)
            except BaseException:
                # Interrupted or failed while starting: never leave a server behind.
                self.process.kill()
                self.process.wait()
                self.process = None
                raise
            return True

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
            client.shutdown(nosave=False)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@contextlib.contextmanager
def embedded_redis(settings: Settings) -> Iterator[str]:
    """The Redis URL to use: the configured one, or an embedded server's for this command."""
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(settings.data_dir)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()  # only stops a server this command started
