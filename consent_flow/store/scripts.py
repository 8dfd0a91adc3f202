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


def queue_script(
    pipe: Any,
    script: AsyncScript,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    whole: bool = False,
) -> None:
    """Queue ``script`` on the pipeline ``pipe`` by its SHA alone, or ``whole`` (EVAL).

    A script handed to a pipeline the redis-py way (``script(client=pipe)``) makes every
    ``execute`` ask the server first whether it has the script: one more round trip per batch
    claim and per commit group. By SHA, a server without the script (a new primary, a flushed
    cache, a cluster node a slot just moved to) answers NoScriptError in its place having run
    nothing: the caller queues it again whole, which runs wherever its keys are served and
    leaves it cached there. (Loading it first with SCRIPT LOAD did not always do: on a cluster
    that goes to the primaries the client lists, and a resharding under load once met NOSCRIPT
    again after it.)

    Sent as the command itself (what ``pipe.evalsha`` sends): redis-py refuses ``evalsha`` on
    a Redis Cluster's pipeline, which routes the command by its keys like any other.
    """
    if whole:
        pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)
    else:
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
