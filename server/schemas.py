"""Where the shipped schemas live: ``schemas/`` in a source checkout, ``server/_schemas`` when installed."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parent.parent / "schemas"


def schemas_dir() -> Traversable:
    if (_SOURCE_TREE / "migrations").is_dir():
        return _SOURCE_TREE
    return resources.files("server._schemas")
