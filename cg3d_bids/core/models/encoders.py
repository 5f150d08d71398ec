"""Frozen 2D ViT encoders (timm) that turn cube slices into patch features (method.md §2).

Registry (user-facing name -> timm model; layers are 1-based block numbers):

=================  ====================================  =====  ====  ======================
name               timm model                            D      depth default layers
=================  ====================================  =====  ====  ======================
dinov2_vits14      vit_small_patch14_dinov2.lvd142m      384    12    3, 6, 9, 12
dinov2_vitb14      vit_base_patch14_dinov2.lvd142m       768    12    3, 6, 9, 12
dinov2_vitl14      vit_large_patch14_dinov2.lvd142m      1024   24    6, 12, 18, 24 (paper)
dinov2_vitg14      vit_giant_patch14_dinov2.lvd142m      1536   40    10, 20, 30, 40
clip_vitl14        vit_large_patch14_clip_224.openai     1024   24    6, 12, 18, 24
test-tiny-vit      (random init, tests only)             96     4     1, 2, 3, 4
=================  ====================================  =====  ====  ======================

ViT-G has 40 blocks; its default takes every 10th block, the same quarters of the depth as
6/12/18/24 of 24. All models run at the cube size (``img_size``, a multiple of 14; grid
``img_size // 14``); timm resamples the position embeddings of the checkpoint to it. Every
requested block comes from one forward pass (``forward_intermediates``), raw block outputs
(no final norm), patch tokens only (class/register tokens dropped).

``test-tiny-vit`` (and ``test-tiny-vit-noprefix``, without class/register tokens) is a 4-block,
width-96 ViT with LayerScale 1.0 and a fixed seed: deterministic, fast, and with blocks that
really differ (timm's DINOv2 LayerScale init of 1e-5 makes random blocks near-identity). Its
results mean nothing; everything made with it carries ``is_test=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...errors import DeviceUnavailableError, UsageError, WeightsUnavailableError
from .registry import (
    DEFAULT_ENCODER,
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRECISIONS,
    TEST_ENCODER,
    TEST_ENCODER_NOPREFIX,
    TEST_ENCODERS,
    TEST_SEED,
    EncoderSpec,
    encoder_info,
    get_spec,
    list_encoders,
)
from .weights import WeightsInfo, resolve_spec_weights

__all__ = [
    "DEFAULT_ENCODER", "ENCODERS", "EncoderSpec", "PRECISIONS", "SliceEncoder", "TEST_ENCODER",
    "TEST_ENCODERS", "TEST_ENCODER_NOPREFIX", "create_encoder", "encoder_info", "get_spec",
    "list_encoders", "resolve_precision", "resolve_weights",
]

def resolve_weights(
    name: str, weights: str | os.PathLike | None = None, allow_download: bool | None = None
) -> WeightsInfo:
    """Locate the weights of encoder ``name`` (see :mod:`cg3d_bids.core.models.weights`)."""
    return resolve_spec_weights(get_spec(name), weights, allow_download)


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA (when the GPU supports it), ``fp32`` elsewhere."""
    aliases = {"float32": "fp32", "bfloat16": "bf16"}
    value = aliases.get(precision, precision)
    if value not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}", fix=f"use one of {', '.join(PRECISIONS)}")
    if value != "auto":
        return value
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _check_layers(layers: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    values = [int(v) for v in layers]
    if not values or len(set(values)) != len(values) or any(v < 1 or v > depth for v in values):
        raise UsageError(
            f"layers {list(layers)} are invalid for {name} ({depth} blocks)",
            fix=f"give distinct 1-based block numbers between 1 and {depth}",
        )
    return tuple(sorted(values))


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {device!r}", fix="use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {device} requested but CUDA is not available",
                fix="use --device cpu, or run with a GPU (docker --gpus all / apptainer --nv)",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {device} requested but only {torch.cuda.device_count()} GPU(s) are visible",
                fix="pick an existing GPU index",
            )
    return dev


class SliceEncoder(nn.Module):
    """A frozen timm ViT that maps grey slices to the patch tokens of chosen blocks.

    Attributes: ``name``, ``timm_name``, ``patch_size``, ``embed_dim``, ``depth``, ``layers``
    (1-based), ``img_size``, ``grid``, ``mean``, ``std``, ``precision`` (fp32/bf16, effective),
    ``weights_sha256``, ``weights_source``, ``is_test``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        layers: Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        weights: WeightsInfo | None = None,
        precision: str = "fp32",
        timm_name: str = "",
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.timm_name = timm_name
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.img_size = int(model.patch_embed.img_size[0])
        self.grid = self.img_size // self.patch_size
        self.embed_dim = int(model.embed_dim)
        self.depth = len(model.blocks)
        self.layers = _check_layers(layers, self.depth, name)
        self.indices = [layer - 1 for layer in self.layers]  # timm is 0-based
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.weights_sha256 = weights.sha256 if weights else None
        self.weights_source = weights.source if weights else "unknown"
        self.weights_path = weights.path if weights else None
        self.is_test = bool(weights.is_test) if weights else False
        self.precision = precision
        # fused attention: torch SDPA (timm's default unless TIMM_FUSED_ATTN=0; force it on)
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True

    def train(self, mode: bool = True) -> SliceEncoder:
        """Always stays in eval mode (frozen encoder)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def extra_repr(self) -> str:
        return (f"name={self.name}, img_size={self.img_size}, layers={self.layers}, "
                f"precision={self.precision}, weights={self.weights_source}")

    def forward_slices(self, slices: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """``(S, H, H)`` float in [0, 1] -> ``(L, S, G, G, D)`` float32 patch features.

        Row/column of the patch grid are the slice's first/second array axis. ``precision``
        overrides the encoder's (``fp32``/``bf16``/``auto``).
        """
        x = torch.as_tensor(slices)
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"{self.name}: expected slices of shape (S, {self.img_size}, {self.img_size}), "
                f"got {tuple(x.shape)}"
            )
        mode = resolve_precision(precision, self.device) if precision else self.precision
        dev = self.device
        with torch.inference_mode():
            x = x.to(device=dev, dtype=torch.float32)
            x = (x[:, None] - self._mean) / self._std  # grey -> 3 channels, encoder's mean/std
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
                feats = self.model.forward_intermediates(
                    x, indices=self.indices, intermediates_only=True, output_fmt="NLC", norm=False,
                    stop_early=True,  # blocks after the last requested one are not run
                )
            out = torch.stack([f.float() for f in feats])  # (L, S, T, D)
        g = self.grid
        if out.shape[2] != g * g:  # forward_intermediates drops prefix tokens; guard it
            raise RuntimeError(f"{self.name}: {out.shape[2]} tokens per slice, expected {g * g} patch tokens")
        return out.reshape(len(self.indices), x.shape[0], g, g, self.embed_dim)

    forward = forward_slices


def _build_test_model(spec: EncoderSpec, img_size: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEST_SEED)
        return VisionTransformer(img_size=img_size, **spec.model_kwargs)


def _load_file_into(model: nn.Module, path: Path) -> None:
    """Load a timm- or original-layout checkpoint into a model built without pretrained weights."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(load_state_dict(str(path)), model)
    model.load_state_dict(state, strict=True)


def create_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    weights: str | os.PathLike | None = None,
    img_size: int = 224,
    layers: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    allow_download: bool | None = None,
) -> SliceEncoder:
    """Build encoder ``name`` with real weights (offline first), in eval mode on ``device``.

    ``img_size`` is the cube size H (a multiple of the patch size). ``layers`` are 1-based
    (default: the registry's). ``precision``: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32`` or
    ``bf16`` (autocast). Missing weights raise :class:`WeightsUnavailableError`; a test encoder
    is the only one built from random weights.
    """
    spec = get_spec(name)
    img_size = int(img_size)
    if img_size < spec.patch_size or img_size % spec.patch_size:
        raise UsageError(
            f"cube size {img_size} is not a multiple of {name}'s patch size {spec.patch_size}",
            fix=f"use a cube size such as {max(1, round(img_size / spec.patch_size)) * spec.patch_size} "
            f"(224 in the paper)",
        )
    layers = _check_layers(layers if layers is not None else spec.default_layers, spec.depth, name)
    dev = _check_device(device)
    mode = resolve_precision(precision, dev)
    info = resolve_spec_weights(spec, weights, allow_download)
    try:
        if spec.is_test:
            model = _build_test_model(spec, img_size)
            if info.path is not None:
                _load_file_into(model, info.path)
        else:
            import timm

            assert info.path is not None  # resolve_spec_weights never returns random init here
            model = timm.create_model(
                spec.timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(info.path)),
                img_size=img_size, **spec.model_kwargs,
            )
    except WeightsUnavailableError:
        raise
    except Exception as exc:
        raise WeightsUnavailableError(
            f"could not load the weights of encoder {name} ({spec.timm_name or 'test ViT'}): "
            f"{type(exc).__name__}: {str(exc)[:500]}",
            path=info.path,
            fix=f"give the checkpoint of {spec.description or name} (timm or original layout) with --weights",
        ) from exc
    encoder = SliceEncoder(
        model, name=name, layers=layers, mean=spec.mean, std=spec.std, weights=info,
        precision=mode, timm_name=spec.timm_name,
    )
    return encoder.to(dev)
