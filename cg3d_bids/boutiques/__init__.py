"""The Boutiques descriptor of ``cg3d`` (BIDS Apps execution spec, BEP027).

``descriptor.json`` describes every option of :func:`cg3d_bids.cli.parser.build_parser` with the
BEP027 argument IDs (``InputDataset``, ``OutputLocation``, ``AnalysisLevel``, ``SubjectLabel``, ...);
``invocation.json`` is an example invocation. ``cg3d --bids-exec-spec`` prints the descriptor.
tests/test_containers.py keeps the descriptor and the parser from drifting apart.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

DESCRIPTOR = "descriptor.json"
INVOCATION = "invocation.json"


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def descriptor_text() -> str:
    """The packaged Boutiques descriptor, as JSON text."""
    return _read(DESCRIPTOR)


def descriptor() -> dict[str, Any]:
    """The packaged Boutiques descriptor, parsed."""
    return json.loads(descriptor_text())


def invocation_text() -> str:
    """The packaged example invocation, as JSON text."""
    return _read(INVOCATION)
