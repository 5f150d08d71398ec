"""Plain JSON/TOML values back as the annotated types of a dataclass field.

One decoder for the records (:mod:`cg3d_bids.records`) and the settings
(:mod:`cg3d_bids.settings`): optional values, paths, tuples, dicts, nested dataclasses, and
integers stored for float fields. Anything else is returned as it is.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["decode"]


def decode(hint: Any, value: Any) -> Any:
    """``value`` (as read from JSON or TOML) as type ``hint``."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return decode(args[0], value) if len(args) == 1 else value
    if hint is Path:
        return Path(value)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{k: decode(hints[k], v) for k, v in value.items()})
    if origin is tuple:
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(decode(item, v) for v in value)
    if origin is dict:
        _key, item = typing.get_args(hint)
        return {str(k): decode(item, v) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
