"""Atomic file writing: a reader never sees a half-written output.

Every output is written to a temporary file in the destination folder and moved into place with
:func:`os.replace`, which is atomic on POSIX file systems. A run killed mid-way leaves at most a
``.tmp-*`` file behind, never a truncated output under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success move it onto ``dest``.

    ``suffix`` defaults to the destination's full suffix (e.g. ``.nii.gz``) so that libraries that
    choose a format from the file name (nibabel) write the right one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(dest: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_json(dest: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


#: gzip level of written ``.nii.gz`` files: ISA-L's level 1 compresses a float map ~10x faster than
#: zlib's level 1 (nibabel's default) to about the same size; any gzip reader inflates it.
NIFTI_GZIP_LEVEL = 1


def write_nifti(dest: str | os.PathLike, image: Any) -> Path:
    """Save a nibabel image atomically (format chosen from ``dest``'s suffix). A single-file NIfTI
    to ``.nii.gz`` is compressed with ISA-L (``isal.igzip``, fixed mtime: the same image gives the
    same bytes)."""
    import nibabel as nib

    dest = Path(dest)
    with atomic_path(dest) as tmp:
        if dest.name.endswith(".nii.gz") and isinstance(image, nib.Nifti1Image):
            tmp.write_bytes(_gzip(image.to_bytes()))
        else:
            nib.save(image, str(tmp))
    return dest


def gzip_codec() -> tuple[Any, tuple[type[Exception], ...]]:
    """The gzip module to use and the extra errors its ``decompress`` raises on a damaged stream:
    ISA-L's ``isal.igzip`` (the same format and checks of length and CRC-32, about 2x zlib's speed
    to inflate, ~10x to deflate at level 1) when it is installed, else the standard library's
    ``gzip`` (a platform without ISA-L wheels)."""
    try:
        from isal import igzip
        from isal.isal_zlib import error
    except ImportError:
        import gzip

        return gzip, ()
    return igzip, (error,)


def _gzip(data: bytes) -> bytes:
    codec, _ = gzip_codec()
    return codec.compress(data, compresslevel=NIFTI_GZIP_LEVEL, mtime=0)


def write_npz(dest: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Save arrays into an uncompressed ``.npz`` atomically."""
    with atomic_path(dest, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return Path(dest)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")
