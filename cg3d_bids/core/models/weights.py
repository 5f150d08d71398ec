"""Encoder weights: where they are found (offline first), and their sha256.

Resolution order for a registry encoder (first hit wins; nothing is downloaded unless allowed):

1. ``weights=FILE`` (``--weights``): a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file in timm's
   key layout or the original facebookresearch/dinov2 (or OpenAI CLIP) layout.
2. The baked weights folder ``$CG3D_WEIGHTS_DIR``: ``<encoder>.safetensors`` (what
   ``scripts/bake_weights.py`` writes in the container), else ``<encoder>.pth``.
3. The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``): ``timm/<timm name>`` ``model.safetensors`` (or
   ``pytorch_model.bin``), looked up on disk only.
4. The torch hub cache (``$TORCH_HOME/hub/checkpoints``): ``<encoder>_pretrain.pth``, the file
   ``torch.hub.load("facebookresearch/dinov2", ...)`` leaves there (DINOv2 only).
5. Only with ``allow_download=True`` or ``CG3D_ALLOW_DOWNLOAD=1``: download ``model.safetensors``
   from the hub into its cache (``HF_HUB_OFFLINE=1`` in the environment still forbids it).

Nothing found -> :class:`~cg3d_bids.errors.WeightsUnavailableError` saying how to provide them.
There is never a silent fallback to random weights. Unless downloads are allowed,
``HF_HUB_OFFLINE=1`` is set for the process (when the user has not set it), so that no library
call can stall on the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import WeightsUnavailableError
from ...hashing import file_sha256
from .registry import EncoderSpec


__all__ = [
    "WEIGHT_SUFFIXES", "WeightsInfo", "downloads_allowed", "file_sha256", "hf_cache_dir",
    "resolve_spec_weights", "RANDOM_INIT_SOURCE",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
RANDOM_INIT_SOURCE = "random-init (test encoder: results mean nothing)"
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")

_OFFLINE_SET_BY_US = False


@dataclass(frozen=True)
class WeightsInfo:
    """The weights an encoder is built from."""

    encoder: str
    path: Path | None        #: file actually loaded (symlinks resolved); None for random init
    sha256: str | None       #: sha256 of that file; None for random init
    source: str              #: ``<kind>:<path>``, or :data:`RANDOM_INIT_SOURCE`
    kind: str                #: file | baked | hf-cache | torch-hub-cache | hf-download | random-init
    is_test: bool = False    #: test encoder: results mean nothing



def downloads_allowed(allow_download: bool | None = None) -> bool:
    """Downloads are allowed by ``allow_download=True`` (``--allow-download``) or ``CG3D_ALLOW_DOWNLOAD=1``."""
    return bool(allow_download) or _env_true("CG3D_ALLOW_DOWNLOAD")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _set_hub_offline(offline: bool) -> None:
    """Force ``HF_HUB_OFFLINE`` for this process, unless the user set it themselves."""
    global _OFFLINE_SET_BY_US
    if offline:
        if "HF_HUB_OFFLINE" in os.environ:
            return
        os.environ["HF_HUB_OFFLINE"] = "1"
        _OFFLINE_SET_BY_US = True
        value = True
    else:
        if not _OFFLINE_SET_BY_US:
            return
        os.environ.pop("HF_HUB_OFFLINE", None)
        _OFFLINE_SET_BY_US = False
        value = False
    try:  # huggingface_hub reads the variable at import; keep its constant in step
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = value
    except Exception:  # pragma: no cover - huggingface_hub missing or changed
        pass


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _torch_hub_checkpoints() -> Path:
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "torch" / "hub" / "checkpoints"


def _hub_repo(spec: EncoderSpec) -> str:
    if spec.hf_hub_id:
        return spec.hf_hub_id
    return f"timm/{spec.timm_name}"


def _from_hub_cache(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    if not cache.is_dir():
        return None
    for filename in HUB_FILENAMES:
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache))
        except Exception:  # malformed cache folder: treat as a miss
            found = None
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    # a cache filled for a pinned revision has no refs/main: newest snapshot holding the file
    snapshots = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    for filename in HUB_FILENAMES:
        found = sorted(snapshots.glob(f"*/{filename}"), key=lambda p: p.stat().st_mtime if p.exists() else 0)
        found = [p for p in found if p.is_file()]
        if found:
            return found[-1]
    return None


def _info(spec: EncoderSpec, path: Path, kind: str) -> WeightsInfo:
    real = Path(os.path.realpath(path))
    return WeightsInfo(spec.name, real, file_sha256(real), f"{kind}:{path}", kind, spec.is_test)


def _howto(spec: EncoderSpec) -> str:
    repo = _hub_repo(spec)
    baked = os.environ.get("CG3D_WEIGHTS_DIR") or "$CG3D_WEIGHTS_DIR"
    return (
        f"give the weights file with --weights FILE (.safetensors or .pth, timm layout or the original "
        f"facebookresearch/dinov2 / OpenAI CLIP layout); or put {repo} in the Hugging Face hub cache "
        f"({hf_cache_dir()}; set HF_HOME or HF_HUB_CACHE to use another one), e.g. run "
        f"`hf download {repo} model.safetensors` on a machine with internet and copy the cache folder; "
        f"or allow downloading with --allow-download (CG3D_ALLOW_DOWNLOAD=1, and HF_HUB_OFFLINE unset); "
        f"or use the cg3d container image with baked weights ({baked}/{spec.name}.safetensors, built "
        f"with scripts/bake_weights.py). Random weights are never used in their place"
    )


def resolve_spec_weights(
    spec: EncoderSpec, weights: str | os.PathLike | None = None, allow_download: bool | None = None
) -> WeightsInfo:
    """Find the weights of ``spec`` (see the module docstring for the order)."""
    allow = downloads_allowed(allow_download)
    _set_hub_offline(not allow)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"weights file for encoder {spec.name} not found", path=path,
                fix="check the --weights path (a .safetensors or .pth file)",
            )
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise WeightsUnavailableError(
                f"weights file for encoder {spec.name} must end in {', '.join(WEIGHT_SUFFIXES)}", path=path,
                fix="give a .safetensors (preferred) or .pth checkpoint with --weights",
            )
        return _info(spec, path, "file")
    if spec.is_test:
        return WeightsInfo(spec.name, None, None, RANDOM_INIT_SOURCE, "random-init", True)

    looked: list[str] = []
    baked_dir = os.environ.get("CG3D_WEIGHTS_DIR")
    if baked_dir:
        for suffix in (".safetensors", ".pth"):
            candidate = Path(baked_dir).expanduser() / f"{spec.name}{suffix}"
            if candidate.is_file():
                return _info(spec, candidate, "baked")
        looked.append(f"baked folder $CG3D_WEIGHTS_DIR={baked_dir} (no {spec.name}.safetensors)")
    else:
        looked.append("baked folder ($CG3D_WEIGHTS_DIR not set)")

    repo = _hub_repo(spec)
    cached = _from_hub_cache(repo)
    if cached is not None:
        return _info(spec, cached, "hf-cache")
    looked.append(f"Hugging Face hub cache {hf_cache_dir()} (no {repo})")

    if spec.torch_hub_file:
        candidate = _torch_hub_checkpoints() / spec.torch_hub_file
        if candidate.is_file():
            return _info(spec, candidate, "torch-hub-cache")
        looked.append(f"torch hub cache {candidate.parent} (no {spec.torch_hub_file})")

    if allow:
        if _env_true("HF_HUB_OFFLINE"):
            raise WeightsUnavailableError(
                f"weights of encoder {spec.name} are not cached and downloads are allowed, but "
                "HF_HUB_OFFLINE=1 is set; looked in: " + "; ".join(looked),
                fix="unset HF_HUB_OFFLINE to download, or " + _howto(spec),
            )
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo, HUB_FILENAMES[0], cache_dir=str(hf_cache_dir())))
        except Exception as exc:
            raise WeightsUnavailableError(
                f"could not download the weights of encoder {spec.name} from {repo}: "
                f"{type(exc).__name__}: {exc}",
                fix=_howto(spec),
            ) from exc
        return _info(spec, path, "hf-download")

    raise WeightsUnavailableError(
        f"no weights for encoder {spec.name} (timm {spec.timm_name}) found offline; looked in: "
        + "; ".join(looked),
        fix=_howto(spec),
    )
