"""Frozen 2D ViT encoders (timm) and their weights; see :mod:`cg3d_bids.core.models.encoders`.

The names are resolved on first use (PEP 562), so that reading the encoder registry
(:mod:`.registry`, e.g. for the command line's choices) does not import torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import all_encoder_names as all_encoder_names  # re-exported

_ENCODERS = (
    "DEFAULT_ENCODER", "ENCODERS", "PRECISIONS", "TEST_ENCODER", "TEST_ENCODER_NOPREFIX", "TEST_ENCODERS",
    "EncoderSpec", "SliceEncoder", "create_encoder", "encoder_info", "get_spec", "list_encoders",
    "resolve_precision", "resolve_weights",
)
_WEIGHTS = ("RANDOM_INIT_SOURCE", "WeightsInfo", "hf_cache_dir")

__all__ = sorted([*_ENCODERS, *_WEIGHTS, "all_encoder_names"])


def __getattr__(name: str) -> Any:
    if name in _ENCODERS or name in _WEIGHTS:
        module = importlib.import_module(f".{'encoders' if name in _ENCODERS else 'weights'}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
