"""The demo BIDS dataset shipped inside the package (``cg3d_bids/data/demo``, < 1 MB).

Seven real subjects at 4 mm (2 MS, 2 glioma, 3 healthy; T1w for all, T2w/FLAIR for the patients),
brain masks in ``derivatives/masks`` and lesion masks in ``derivatives/lesions``. Licences differ
per subject: see the dataset's ``LICENSES.md``. Rebuilt by ``scripts/make_demo_dataset.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import CantCreateError, NoInputError

#: ``Name`` in the demo's ``dataset_description.json`` (identifies an earlier copy).
DEMO_NAME_PREFIX = "cg3d demo"
#: Written into every copy: setuptools' ``data/**/*`` glob skips dot files in wheels.
BIDSIGNORE = "LICENSES.md\n"


def demo_dataset_path() -> Path:
    """Folder of the bundled demo dataset (read-only: copy it with :func:`copy_demo_dataset`)."""
    path = Path(__file__).resolve().parent / "data" / "demo"
    if not (path / "dataset_description.json").is_file():
        raise NoInputError("the bundled demo dataset is missing from this installation", path=path,
                           fix="reinstall cg3d-bids (pip install --force-reinstall cg3d-bids)")
    return path


def _is_demo_copy(dest: Path) -> bool:
    description = dest / "dataset_description.json"
    try:
        return json.loads(description.read_text(encoding="utf-8"))["Name"].startswith(DEMO_NAME_PREFIX)
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def copy_demo_dataset(dest: str | os.PathLike) -> Path:
    """Copy the demo dataset to ``dest`` (created; an earlier demo copy there is refreshed).

    Files are copied without their permission bits, so the copy is writable even when the
    installation is read-only. Raises :class:`CantCreateError` when ``dest`` is a non-empty folder
    that is not a demo copy (never overwrites other data), or cannot be written.
    """
    source = demo_dataset_path()
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not _is_demo_copy(dest))):
        raise CantCreateError("the destination for the demo dataset exists and is not an earlier demo copy",
                              path=dest, fix="choose a new or empty folder")
    try:
        shutil.copytree(source, dest, dirs_exist_ok=True, copy_function=shutil.copyfile,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (dest / ".bidsignore").write_text(BIDSIGNORE, encoding="utf-8")
    except OSError as exc:
        raise CantCreateError(f"cannot copy the demo dataset ({exc})", path=dest,
                              fix="choose a writable folder") from exc
    return dest
