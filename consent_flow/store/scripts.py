"""Redis scripts, kept as ``.lua`` files in ``store/lua`` and shipped as package data."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["lua"]


@cache
def lua(name: str) -> str:
    """The text of ``consent_flow/store/lua/<name>.lua``."""
    return files("consent_flow.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
