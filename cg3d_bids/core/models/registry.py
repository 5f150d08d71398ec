"""The encoder registry: user-facing names -> timm architectures, dims and default layers.

See :mod:`cg3d_bids.core.models.encoders` for the table and how encoders are built. This module
has no dependencies beyond the standard library, so both the encoders and the weight resolution
(:mod:`.weights`) import it without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import UsageError

__all__ = [
    "DEFAULT_ENCODER", "ENCODERS", "EncoderSpec", "PRECISIONS", "TEST_ENCODER", "TEST_ENCODERS",
    "TEST_ENCODER_NOPREFIX", "TEST_SEED", "all_encoder_names", "encoder_info", "get_spec", "list_encoders",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry."""

    name: str                              #: user-facing name, e.g. ``dinov2_vitl14``
    timm_name: str                         #: timm model name with pretrained tag ("" for test)
    patch_size: int
    embed_dim: int
    depth: int
    default_layers: tuple[int, ...]        #: 1-based block numbers
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    is_test: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)  #: extra timm.create_model kwargs
    hf_hub_id: str | None = None           #: hub repository; default ``timm/<timm_name>``
    torch_hub_file: str | None = None      #: facebookresearch torch.hub checkpoint file name
    description: str = ""


def _dinov2(name: str, size: str, dim: int, depth: int, layers: tuple[int, ...], desc: str) -> EncoderSpec:
    return EncoderSpec(
        name, f"vit_{size}_patch14_dinov2.lvd142m", 14, dim, depth, layers,
        torch_hub_file=f"{name}_pretrain.pth", description=desc,
    )


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        _dinov2("dinov2_vits14", "small", 384, 12, (3, 6, 9, 12), "DINOv2 ViT-S/14"),
        _dinov2("dinov2_vitb14", "base", 768, 12, (3, 6, 9, 12), "DINOv2 ViT-B/14"),
        _dinov2("dinov2_vitl14", "large", 1024, 24, (6, 12, 18, 24), "DINOv2 ViT-L/14 (paper default)"),
        _dinov2("dinov2_vitg14", "giant", 1536, 40, (10, 20, 30, 40), "DINOv2 ViT-g/14"),
        EncoderSpec(
            "clip_vitl14", "vit_large_patch14_clip_224.openai", 14, 1024, 24, (6, 12, 18, 24),
            mean=CLIP_MEAN, std=CLIP_STD, description="OpenAI CLIP ViT-L/14 image tower (pre-norm)",
        ),
    )
}
DEFAULT_ENCODER = "dinov2_vitl14"

_TINY = dict(patch_size=14, embed_dim=96, depth=4, num_heads=3, init_values=1.0, num_classes=0)
TEST_ENCODER = "test-tiny-vit"
TEST_ENCODER_NOPREFIX = "test-tiny-vit-noprefix"
TEST_ENCODERS: dict[str, EncoderSpec] = {
    TEST_ENCODER: EncoderSpec(
        TEST_ENCODER, "", 14, 96, 4, (1, 2, 3, 4), is_test=True,
        model_kwargs=dict(_TINY, class_token=True, reg_tokens=4, no_embed_class=True),
        description="random ViT (class + 4 register tokens), for tests only",
    ),
    TEST_ENCODER_NOPREFIX: EncoderSpec(
        TEST_ENCODER_NOPREFIX, "", 14, 96, 4, (1, 2, 3, 4), is_test=True,
        model_kwargs=dict(_TINY, class_token=False, reg_tokens=0, global_pool="avg"),
        description="random ViT without prefix tokens, for tests only",
    ),
}
TEST_SEED = 0


def list_encoders() -> list[str]:
    """Names of the real (pretrained) encoders; :data:`TEST_ENCODER` is separate."""
    return list(ENCODERS)


def get_spec(name: str) -> EncoderSpec:
    """The registry entry of ``name`` (:class:`UsageError` listing the choices if unknown)."""
    spec = ENCODERS.get(name) or TEST_ENCODERS.get(name)
    if spec is None:
        raise UsageError(
            f"unknown encoder {name!r}",
            fix=f"choose one of {', '.join(list(ENCODERS) + [TEST_ENCODER])}",
        )
    return spec


def encoder_info(name: str) -> dict[str, Any]:
    """Registry facts of ``name`` without building it (for provenance)."""
    spec = get_spec(name)
    info = asdict(spec)
    info["default_layers"] = list(spec.default_layers)
    info["timm_name"] = spec.timm_name or None
    return info


def all_encoder_names() -> list[str]:
    """Every name ``--encoder`` accepts: the real encoders, then the random test encoder."""
    return [*ENCODERS, TEST_ENCODER]
