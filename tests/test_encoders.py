"""Encoder registry, the tiny test encoder, and offline weights resolution (no network, seconds)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _synthetic import single_torch_thread  # noqa: F401 (autouse fixture)
from _synthetic import H, tiny_encoder
from cg3d_bids.errors import UsageError, WeightsUnavailableError
from cg3d_bids.hashing import file_sha256
from cg3d_bids.core.models import (
    ENCODERS,
    RANDOM_INIT_SOURCE,
    TEST_ENCODER,
    TEST_ENCODER_NOPREFIX,
    SliceEncoder,
    create_encoder,
    encoder_info,
    get_spec,
    list_encoders,
    resolve_precision,
    resolve_weights,
)
from cg3d_bids.core.models import encoders as encoders_mod
from cg3d_bids.core.models import weights as weights_mod

timm = pytest.importorskip("timm")

TIMM_NAMES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "clip_vitl14": "vit_large_patch14_clip_224.openai",
}


# ------------------------------------------------------------------------------------------------
# registry
def test_registry_names_timm_models_and_default_layers():
    assert list_encoders() == list(TIMM_NAMES)
    assert TEST_ENCODER == "test-tiny-vit" and TEST_ENCODER not in list_encoders()
    for name, timm_name in TIMM_NAMES.items():
        spec = get_spec(name)
        assert spec.timm_name == timm_name and spec.patch_size == 14 and not spec.is_test
        quarters = tuple(spec.depth * q // 4 for q in (1, 2, 3, 4))
        assert spec.default_layers == quarters, name
    assert get_spec("dinov2_vitl14").default_layers == (6, 12, 18, 24)
    assert get_spec("dinov2_vitb14").default_layers == (3, 6, 9, 12)
    assert get_spec("dinov2_vitg14").default_layers == (10, 20, 30, 40)
    assert get_spec("clip_vitl14").mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert get_spec("dinov2_vitl14").std == pytest.approx((0.229, 0.224, 0.225))
    info = encoder_info("dinov2_vitl14")
    assert info["default_layers"] == [6, 12, 18, 24] and info["timm_name"] == TIMM_NAMES["dinov2_vitl14"]
    assert encoder_info(TEST_ENCODER)["is_test"] is True and encoder_info(TEST_ENCODER)["timm_name"] is None
    with pytest.raises(UsageError, match="dinov2_vitl14"):
        get_spec("dinov2_vitl15")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_registry_matches_the_timm_architecture(name):
    """Dims, depth, patch, mean/std of each entry are timm's (model built on the meta device)."""
    spec = get_spec(name)
    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, pretrained=False, img_size=224, **spec.model_kwargs)
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size[0]) == (
        spec.embed_dim, spec.depth, spec.patch_size)
    assert tuple(model.pretrained_cfg["mean"]) == pytest.approx(spec.mean)
    assert tuple(model.pretrained_cfg["std"]) == pytest.approx(spec.std)
    assert model.patch_embed.grid_size == (16, 16)
    if name == "clip_vitl14":
        assert isinstance(model.norm_pre, torch.nn.LayerNorm)  # CLIP's pre-norm is kept


# ------------------------------------------------------------------------------------------------
# the tiny random test encoder
def test_tiny_encoder_shape_layers_differ_and_is_marked_test():
    enc = tiny_encoder()
    assert (enc.patch_size, enc.embed_dim, enc.depth, enc.layers, enc.grid) == (14, 96, 4, (1, 2, 3, 4), 4)
    assert enc.is_test and enc.weights_source == RANDOM_INIT_SOURCE and enc.weights_sha256 is None
    assert enc.model.num_prefix_tokens == 5  # class + 4 registers, dropped from the output
    gammas = [b.ls1.gamma for b in enc.model.blocks]
    assert all(torch.all(g == 1.0) for g in gammas)  # LayerScale 1.0, not DINOv2's 1e-5
    slices = torch.from_numpy(np.random.default_rng(0).random((5, H, H), dtype=np.float32))
    out = enc.forward_slices(slices)
    assert out.shape == (4, 5, 4, 4, 96) and out.dtype == torch.float32
    for a, b in zip(out[:-1], out[1:]):
        rel = float((b - a).norm() / a.norm())
        assert rel > 0.02, f"successive blocks nearly identical (relative change {rel:.1e})"
    # deterministic init: a fresh build gives the same features
    again = create_encoder(TEST_ENCODER, img_size=H)
    assert torch.equal(again.forward_slices(slices), out)
    # the patch grid follows the slice's array axes: a change in patch (row 1, col 3) moves it most
    bumped = slices.clone()
    bumped[:, 14:28, 42:56] = 1.0
    diff = (enc.forward_slices(bumped) - out)[-1].norm(dim=-1).mean(0)  # (G, G)
    assert divmod(int(diff.argmax()), 4) == (1, 3)


def test_tiny_encoder_without_prefix_tokens_and_layer_choice():
    enc = create_encoder(TEST_ENCODER_NOPREFIX, img_size=28, layers=[4, 2])
    assert enc.model.num_prefix_tokens == 0 and enc.layers == (2, 4) and enc.is_test
    out = enc.forward_slices(torch.rand(3, 28, 28))
    assert out.shape == (2, 3, 2, 2, 96)
    full = tiny_encoder(TEST_ENCODER_NOPREFIX, 28).forward_slices(torch.zeros(1, 28, 28))
    assert torch.equal(enc.forward_slices(torch.zeros(1, 28, 28)), full[[1, 3]])


def test_encoder_is_frozen_eval_and_uses_fused_attention():
    enc = tiny_encoder()
    enc.train()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    attns = [m for m in enc.model.modules() if hasattr(m, "fused_attn")]
    assert len(attns) == 4 and all(m.fused_attn for m in attns)
    with pytest.raises(ValueError, match="shape"):
        enc.forward_slices(torch.rand(2, H, H + 14))


def test_precision_settings():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bfloat16", "cpu") == "bf16"
    with pytest.raises(UsageError):
        resolve_precision("fp16", "cpu")
    enc = tiny_encoder()
    assert enc.precision == "fp32"
    x = torch.rand(2, H, H, generator=torch.Generator().manual_seed(1))
    a, b = enc.forward_slices(x), enc.forward_slices(x, precision="bf16")
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.999


def test_bad_layers_and_sizes_are_usage_errors():
    for layers in ([0], [5], [2, 2], []):
        with pytest.raises(UsageError, match="layers"):
            create_encoder(TEST_ENCODER, img_size=H, layers=layers)
    with pytest.raises(UsageError, match="multiple of"):
        create_encoder(TEST_ENCODER, img_size=50)
    with pytest.raises(UsageError, match="precision"):
        create_encoder(TEST_ENCODER, img_size=H, precision="half")


# ------------------------------------------------------------------------------------------------
# weights resolution
@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """No baked folder, empty hub/torch caches, downloads not allowed."""
    monkeypatch.setenv("CG3D_WEIGHTS_DIR", str(tmp_path / "baked"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CG3D_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights_mod, "_OFFLINE_SET_BY_US", False)  # the variable is the user's here
    (tmp_path / "baked").mkdir()
    return tmp_path


@pytest.fixture
def no_model_building(monkeypatch):
    calls = []

    def forbidden(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("timm.create_model must not be called without weights")

    monkeypatch.setattr(timm, "create_model", forbidden)
    return calls


def test_missing_weights_offline_fail_fast_with_an_actionable_message(isolated_env, no_model_building):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        create_encoder("dinov2_vitl14", img_size=224)
    assert time.monotonic() - start < 2.0
    text = str(info.value)
    for needle in ("--weights", "HF_HOME", "CG3D_WEIGHTS_DIR", "container", "--allow-download",
                   "timm/vit_large_patch14_dinov2.lvd142m", "never used"):
        assert needle in text, needle
    assert info.value.exit_code == 66
    assert no_model_building == []  # no random model was even built
    # downloads allowed but HF_HUB_OFFLINE=1: still instant, and says why
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        resolve_weights("clip_vitl14", allow_download=True)
    assert time.monotonic() - start < 2.0
    with pytest.raises(WeightsUnavailableError, match="not found"):
        resolve_weights("dinov2_vits14", weights=isolated_env / "missing.safetensors")
    bad = isolated_env / "weights.txt"
    bad.write_text("x")
    with pytest.raises(WeightsUnavailableError, match="must end in"):
        resolve_weights("dinov2_vits14", weights=bad)


def test_offline_mode_is_set_unless_downloads_are_allowed(isolated_env, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights_mod, "_OFFLINE_SET_BY_US", False)
    with pytest.raises(WeightsUnavailableError):
        resolve_weights("dinov2_vits14")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert not weights_mod.downloads_allowed() and weights_mod.downloads_allowed(True)
    monkeypatch.setenv("CG3D_ALLOW_DOWNLOAD", "1")
    assert weights_mod.downloads_allowed() and weights_mod.downloads_allowed(False)


# A real registry code path (timm DINOv2 model + its checkpoint filter) on a tiny architecture.
TINY_DINO = dataclasses.replace(
    get_spec("dinov2_vits14"), name="dinov2_tiny_test", embed_dim=96, depth=2, default_layers=(1, 2),
    model_kwargs=dict(embed_dim=96, depth=2, num_heads=3),
)


def _source_model(seed: int = 3):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(TINY_DINO.timm_name, pretrained=False, img_size=H, embed_dim=96, depth=2,
                                 num_heads=3, init_values=1.0).eval()


def _original_layout(state: dict) -> dict:
    """timm -> facebookresearch/dinov2 key layout (inverse of timm's ``_convert_dinov2``).

    For ViT-S/B/L the keys are the same plus ``mask_token`` (ViT-g also renames its SwiGLU
    ``mlp.fc1/fc2`` to ``mlp.w12/w3``; the tiny model has a plain MLP).
    """
    out = dict(state)
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


@pytest.fixture
def tiny_dino_registry(monkeypatch):
    monkeypatch.setitem(ENCODERS, TINY_DINO.name, TINY_DINO)
    return TINY_DINO


@pytest.mark.parametrize("layout", ["timm.safetensors", "timm.pth", "original.pth"])
def test_weights_file_round_trip(layout, tiny_dino_registry, isolated_env):
    from safetensors.torch import save_file

    source = _source_model()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    kind, suffix = layout.split(".")
    if kind == "original":
        state = _original_layout(state)
        assert "mask_token" in state
    path = isolated_env / f"weights.{suffix}"
    if suffix == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    enc = create_encoder(TINY_DINO.name, weights=path, img_size=H)
    assert not enc.is_test and enc.weights_source == f"file:{path}"
    assert enc.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    reference = SliceEncoder(source, name="reference", layers=(1, 2))
    x = torch.rand(3, H, H, generator=torch.Generator().manual_seed(0))
    assert torch.equal(enc.forward_slices(x), reference.forward_slices(x))


def test_original_checkpoint_at_another_resolution_is_resampled(tiny_dino_registry, isolated_env):
    """Like the real 518 px (37^2 + 1 position embeddings) DINOv2 files run at the cube size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        source = timm.create_model(TINY_DINO.timm_name, pretrained=False, img_size=98, embed_dim=96, depth=2,
                                   num_heads=3, init_values=1.0)
    state = _original_layout({k: v.contiguous() for k, v in source.state_dict().items()})
    assert state["pos_embed"].shape == (1, 7 * 7 + 1, 96)
    path = isolated_env / "orig98.pth"
    torch.save(state, path)
    enc = create_encoder(TINY_DINO.name, weights=path, img_size=H)
    assert enc.model.pos_embed.shape == (1, 4 * 4 + 1, 96)
    assert torch.equal(enc.model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert enc.forward_slices(torch.rand(2, H, H)).shape == (2, 2, 4, 4, 96)


def test_wrong_weights_file_is_an_error_not_random_weights(tiny_dino_registry, isolated_env):
    from safetensors.torch import save_file

    path = isolated_env / "other.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_encoder().model.state_dict().items()}, str(path))
    with pytest.raises(WeightsUnavailableError, match="could not load"):
        create_encoder(TINY_DINO.name, weights=path, img_size=H)


def test_weights_found_in_baked_dir_then_hub_cache_then_file_wins(tiny_dino_registry, isolated_env):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _source_model().state_dict().items()}
    # hub cache layout: models--timm--<name>/{refs/main, snapshots/<commit>/model.safetensors}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = isolated_env / "hf" / "hub" / f"models--timm--{TINY_DINO.timm_name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(state, str(snap / "model.safetensors"))
    info = resolve_weights(TINY_DINO.name)
    assert info.kind == "hf-cache" and info.path == (snap / "model.safetensors").resolve()
    (repo / "refs" / "main").unlink()  # a cache filled for a pinned revision only
    assert resolve_weights(TINY_DINO.name).path == info.path
    assert info.sha256 == hashlib.sha256((snap / "model.safetensors").read_bytes()).hexdigest()

    baked = isolated_env / "baked" / f"{TINY_DINO.name}.safetensors"
    save_file(state, str(baked), metadata={"baked": "yes"})
    info = resolve_weights(TINY_DINO.name)
    assert info.kind == "baked" and info.path == baked.resolve() and info.source == f"baked:{baked}"
    assert info.sha256 != resolve_weights(TINY_DINO.name, weights=snap / "model.safetensors").sha256
    enc = create_encoder(TINY_DINO.name, img_size=H)
    assert enc.weights_sha256 == info.sha256 and not enc.is_test

    explicit = isolated_env / "explicit.pth"
    torch.save(state, explicit)
    assert resolve_weights(TINY_DINO.name, weights=explicit).kind == "file"


def test_sha256_is_cached_per_path_mtime_and_size(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    first = file_sha256(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert file_sha256(path) == first and opened == []  # cached: not re-read
    path.write_bytes(b"abcd" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abcd" * 1000).hexdigest()


def test_test_encoder_accepts_a_weights_file(tmp_path):
    """A saved test-tiny-vit state dict loads back into the tiny architecture exactly."""
    from safetensors.torch import save_file

    src = tiny_encoder()
    path = tmp_path / "tiny.safetensors"
    state = {k: (v * 0.5).contiguous() for k, v in src.model.state_dict().items()}
    save_file(state, str(path))
    enc = create_encoder(TEST_ENCODER, weights=path, img_size=H)
    assert enc.is_test and enc.weights_source == f"file:{path}"
    loaded = enc.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_models_package_exports():
    import cg3d_bids.core.models as models

    for name in ("create_encoder", "list_encoders", "encoder_info", "resolve_weights", "TEST_ENCODER"):
        assert hasattr(models, name)
    assert encoders_mod.DEFAULT_ENCODER == "dinov2_vitl14"
    assert Path(weights_mod.hf_cache_dir()).name == "hub"
