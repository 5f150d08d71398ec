"""Frozen 2D ViT encoders (timm) and their weights; see :mod:`cg3d_bids.core.models.encoders`."""

from .encoders import (
    DEFAULT_ENCODER,
    ENCODERS,
    PRECISIONS,
    TEST_ENCODER,
    TEST_ENCODER_NOPREFIX,
    TEST_ENCODERS,
    EncoderSpec,
    SliceEncoder,
    create_encoder,
    encoder_info,
    get_spec,
    list_encoders,
    resolve_precision,
    resolve_weights,
)
from .registry import all_encoder_names
from .weights import RANDOM_INIT_SOURCE, WeightsInfo, hf_cache_dir

__all__ = [
    "DEFAULT_ENCODER", "ENCODERS", "PRECISIONS", "RANDOM_INIT_SOURCE", "TEST_ENCODER",
    "TEST_ENCODERS", "TEST_ENCODER_NOPREFIX", "EncoderSpec", "SliceEncoder", "WeightsInfo",
    "all_encoder_names", "create_encoder", "encoder_info", "get_spec", "hf_cache_dir", "list_encoders",
    "resolve_precision", "resolve_weights",
]
