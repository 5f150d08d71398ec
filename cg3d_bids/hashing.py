"""Content hashes: the one ``file_sha256`` of cg3d, and short stable hashes of JSON-able values.

Both the encoder weights (provenance) and the work cache (keys of cached intermediates) hash
files with :func:`file_sha256`; cache keys of settings and upstream keys come from
:func:`short_hash`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["file_sha256", "short_hash"]

_CACHE: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Streaming sha256 of a file's content, memoised per (real path, mtime, size) for the process."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _LOCK:
        _CACHE[key] = value
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def short_hash(*items: Any, length: int = 16) -> str:
    """First ``length`` hex digits of the sha256 of ``items`` as key-sorted JSON (paths as text)."""
    text = json.dumps(_plain(list(items)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
