"""Redis scripts, kept as ``.lua`` files in ``store/lua`` and shipped as package data."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any

from redis.commands.core import AsyncScript

__all__ = ["lua", "queue_script"]


@cache
def lua(name: str) -> str:
    """The text of ``consent_flow/store/lua/<name>.lua``."""
    return files("consent_flow.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def queue_script(pipe: Any, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
    """Queue ``script`` on the pipeline ``pipe`` by its SHA alone.

    A script handed to a pipeline the redis-py way (``script(client=pipe)``) makes every
    ``execute`` ask the server first whether it has the script: one more round trip per batch
    claim and per commit group. By SHA, a server without the script (a new primary, a flushed
    cache) answers NoScriptError in its place having run nothing: the caller loads it and asks
    again.

    Sent as the command itself (what ``pipe.evalsha`` sends): redis-py refuses ``evalsha`` on
    a Redis Cluster's pipeline, which routes the command by its keys like any other.
    """
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
