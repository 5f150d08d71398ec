"""The stages of a cg3d run as plain functions on files; nipype nodes call them.

Each stage reads its inputs from disk, writes its result atomically into the work directory
under a content key (input file hashes + every setting that changes the result) and returns
the path. A stage whose result exists is skipped, so a rerun resumes and a changed setting
recomputes. None of these functions touches the input dataset.

Stages (per modality batch):
1. ``prepare_image``: load, brain mask, cube; intensity percentiles of the brain (tiny JSON).
2. ``compute_landmarks``: Nyul landmarks learned from every image of the modality.
3. ``tokenize_images``: standardised cube -> 3D patch tokens (the expensive, GPU stage).
4. ``score_batch``: mutual scoring (+ consistent-anomaly stage) per layer, layers averaged.
5. ``write_image_outputs``: maps on the native grid, probseg, masks, sidecars, per-image summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import write_json, write_nifti, write_npz
from ..config import SCORE_SETTINGS, TOKEN_SETTINGS, RunConfig

LOGGER = logging.getLogger("cg3d")

from ..core.preprocessing.nyul import PERCENTILES as NYUL_PERCENTILES  # 1, 10, ..., 90, 99 [method.md §1.4]


# ------------------------------------------------------------------------------------------------
# hashing and cache paths
def file_sha256(path: str | os.PathLike, _cache: dict[tuple, str] = {}) -> str:  # noqa: B006
    """SHA-256 of a file's content, memoised on (path, size, mtime)."""
    stat = os.stat(path)
    token = (str(path), stat.st_size, stat.st_mtime_ns)
    if token not in _cache:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _cache[token] = digest.hexdigest()
    return _cache[token]


def _short_hash(*items: Any) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_key(record: dict[str, Any], cfg: RunConfig) -> str:
    """Content key of an image and its mask under the preprocessing settings."""
    mask_hash = file_sha256(record["mask_path"]) if record.get("mask_path") else record["mask_source"]
    return _short_hash(
        file_sha256(record["image_path"]), mask_hash, cfg.cube_size, cfg.fov_mm,
        cfg.mask_source, __version__,
    )


def _stage_dir(cfg: RunConfig, stage: str, modality: str) -> Path:
    path = Path(cfg.work_dir) / stage / modality
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------
# 1. prepare
def load_inputs(record: dict[str, Any], cfg: RunConfig):
    """Native image, canonical (RAS) image and brain mask on the canonical grid."""
    from ..core.preprocessing import load_image_pair, load_mask_for_image, nonzero_mask

    native, canonical = load_image_pair(record["image_path"])
    if cfg.mask_source == "derivatives":
        mask = load_mask_for_image(record["mask_path"], canonical)
    elif cfg.mask_source == "nonzero":
        mask = nonzero_mask(canonical)
    else:
        mask = _skullstrip_cached(record, canonical, cfg)
    return native, canonical, mask


def _skullstrip_cached(record: dict[str, Any], canonical, cfg: RunConfig) -> np.ndarray:
    """deepbet mask on the canonical grid, cached in the work dir by image content."""
    import nibabel as nib

    from ..core.preprocessing import skullstrip

    cache = _stage_dir(cfg, "skullstrip", record["modality"]) / (
        f"{record['bids_name']}_{file_sha256(record['image_path'])[:16]}.nii.gz"
    )
    if cache.exists():
        return np.asarray(nib.load(cache).dataobj) > 0
    mask = np.asarray(skullstrip(canonical), dtype=bool)
    write_nifti(cache, nib.Nifti1Image(mask.astype(np.uint8), canonical.affine))
    return mask


def result_path(record: dict[str, Any], cfg: RunConfig) -> Path:
    """The per-image result JSON (``status`` ok/skipped/failed) that the group stage reads."""
    return _stage_dir(cfg, "results", record["modality"]) / f"{record['bids_name']}.json"


def prepare_or_skip(record: dict[str, Any], cfg: RunConfig) -> str:
    """:func:`prepare_image`; with ``cfg.skip_bad_images``, an image whose data cannot be used
    (:class:`InputDataError`: corrupt, 4D, NaN/Inf, empty or unmappable mask) is left out of the
    batch instead of stopping the run: its result is written as ``skipped`` with the reason and
    returned in place of the prep file (``"status": "skipped"`` tells later stages to leave it
    out); a per-run copy lets a ``participant`` call report its own skipped images."""
    from ..errors import InputDataError

    try:
        return prepare_image(record, cfg)
    except InputDataError as exc:
        if not cfg.skip_bad_images:
            raise
        message = exc.render()
        LOGGER.warning("skipping %s (--skip-bad-images): %s", record["bids_name"], message)
        skipped = {"bids_name": record["bids_name"], "status": "skipped", "error": message}
        write_json(Path(cfg.work_dir) / "skipped" / str(cfg.run_id) / f"{record['bids_name']}.json", skipped)
        out = result_path(record, cfg)
        write_json(out, skipped)
        return str(out)


def prepare_image(record: dict[str, Any], cfg: RunConfig) -> str:
    """Brain-intensity percentiles of the image's cube (cached JSON); returns its path."""
    from ..core.preprocessing import make_cube
    from ..core.preprocessing.nyul import image_landmarks

    key = input_key(record, cfg)
    out = _stage_dir(cfg, "prep", record["modality"]) / f"{record['bids_name']}_{key}.json"
    if out.exists():
        return str(out)
    _native, canonical, mask = load_inputs(record, cfg)
    cube = make_cube(canonical, mask, size=cfg.cube_size, fov_mm=cfg.fov_mm)
    brain = cube.data[cube.mask]
    if brain.size == 0:
        from ..errors import InputDataError

        raise InputDataError(
            "the brain mask is empty inside the cube", path=record["image_path"],
            fix="check the brain mask (or use --mask-source nonzero / skullstrip)",
        )
    write_json(out, {
        "bids_name": record["bids_name"],
        "key": key,
        "percentiles": image_landmarks(brain, NYUL_PERCENTILES).tolist(),
        "outside_fraction": float(cube.outside_fraction),
        "brain_voxels_cube": int(cube.mask.sum()),
    })
    return str(out)


# ------------------------------------------------------------------------------------------------
# 2. landmarks
def compute_landmarks(prep_paths: list[str], modality: str, cfg: RunConfig) -> str:
    """Nyul standard landmarks learned from every prepared image of the modality."""
    from ..core.preprocessing.nyul import landmarks_from_percentiles

    preps = [json.loads(Path(p).read_text()) for p in sorted(prep_paths)]
    preps = [p for p in preps if p.get("status") != "skipped"]
    if not preps:
        from ..errors import NoInputError

        raise NoInputError(f"no usable {modality} image: every one was skipped as bad data",
                           fix="see the warnings above and group_<mod>.tsv; fix or replace the images")
    key = _short_hash([p["key"] for p in preps], NYUL_PERCENTILES)
    out = _stage_dir(cfg, "landmarks", modality) / f"landmarks_{key}.json"
    if not out.exists():
        landmarks = landmarks_from_percentiles(
            np.array([p["percentiles"] for p in preps]), names=[p["bids_name"] for p in preps]
        )
        write_json(out, {
            "key": key, "percentiles": list(NYUL_PERCENTILES), "landmarks": landmarks.tolist(),
            "n_images": len(preps), "images": [p["bids_name"] for p in preps],
        })
    return str(out)


# ------------------------------------------------------------------------------------------------
# 3. tokens
def token_key(record: dict[str, Any], landmarks_path: str, cfg: RunConfig) -> str:
    landmarks_key = json.loads(Path(landmarks_path).read_text())["key"]
    return cfg.key(TOKEN_SETTINGS, input_key(record, cfg), landmarks_key)


def token_path(record: dict[str, Any], landmarks_path: str, cfg: RunConfig) -> Path:
    return _stage_dir(cfg, "tokens", record["modality"]) / (
        f"{record['bids_name']}_{token_key(record, landmarks_path, cfg)}.npz"
    )


def tokenize_images(records: list[dict[str, Any]], landmarks_path: str, cfg: RunConfig) -> list[str]:
    """Tokens of each image (cached); the encoder is built once for all missing images."""
    from ..core.tokens import tokenize_volume

    landmarks = json.loads(Path(landmarks_path).read_text())
    usable = set(landmarks["images"])  # images skipped as bad data are not in it
    paths = [token_path(rec, landmarks_path, cfg) if rec["bids_name"] in usable else None for rec in records]
    todo = [(rec, path) for rec, path in zip(records, paths) if path is not None and not path.exists()]
    if todo:
        _limit_threads()
        encoder = build_encoder(cfg)
        start = time.monotonic()
        cubes = _prefetched_cubes([rec for rec, _ in todo], landmarks, cfg)
        for done, ((rec, path), (cube, volume)) in enumerate(zip(todo, cubes), 1):
            t0 = time.monotonic()
            tok = tokenize_volume(
                volume, cube.mask, encoder, projection_dim=cfg.projection_dim,
                seed=cfg.random_seed, device=_torch_device(cfg), slice_batch=cfg.slice_batch,
            )
            write_npz(
                path, tokens=tok.tokens, valid=tok.valid, grid=np.int64(tok.grid),
                layers=np.asarray(tok.layers), cube_affine=cube.affine,
                cube_mask=np.packbits(cube.mask), cube_size=np.int64(cfg.cube_size),
            )
            elapsed = time.monotonic() - start
            eta = elapsed / done * (len(todo) - done)
            LOGGER.info(
                "[tokens %s %d/%d] %s in %.1f s (elapsed %.0f s, about %.0f s left)",
                rec["modality"], done, len(todo), rec["bids_name"], time.monotonic() - t0, elapsed, eta,
            )
    return [str(p) if p is not None else "" for p in paths]  # "": skipped image


def standardised_cube(record: dict[str, Any], landmarks: dict[str, Any], cfg: RunConfig):
    """The image's cube and its Nyul-standardised intensities (what the encoder sees)."""
    from ..core.preprocessing import make_cube
    from ..core.preprocessing.nyul import standardise

    _native, canonical, mask = load_inputs(record, cfg)
    cube = make_cube(canonical, mask, size=cfg.cube_size, fov_mm=cfg.fov_mm, warn_outside=False)
    volume = standardise(
        cube.data, cube.mask, np.asarray(landmarks["landmarks"]), landmarks["percentiles"],
        source=record["image_path"],
    )
    return cube, volume


def _prefetched_cubes(records: list[dict[str, Any]], landmarks: dict[str, Any], cfg: RunConfig):
    """Yield :func:`standardised_cube` of each record in order, preparing the next one in a
    background thread while the caller encodes the current one (loading and resampling release
    the GIL for much of their time; at most two cubes are held). Errors surface in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cg3d-cube") as pool:
        pending = pool.submit(standardised_cube, records[0], landmarks, cfg) if records else None
        for index in range(len(records)):
            result = pending.result()
            pending = (pool.submit(standardised_cube, records[index + 1], landmarks, cfg)
                       if index + 1 < len(records) else None)
            yield result


def build_encoder(cfg: RunConfig):
    """The configured encoder on the configured device."""
    from ..core.models import create_encoder

    return create_encoder(
        cfg.encoder, weights=cfg.weights, img_size=cfg.cube_size, layers=cfg.layers,
        device=_torch_device(cfg), precision=cfg.precision, allow_download=cfg.allow_download,
    )


def _limit_threads() -> None:
    """One torch thread pool sized by OMP_NUM_THREADS (set by the command line per worker)."""
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def _torch_device(cfg: RunConfig) -> str:
    return cfg.device


def load_tokens(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


# ------------------------------------------------------------------------------------------------
# 4. scores
def score_batch(token_paths: list[str], modality: str, cfg: RunConfig) -> str:
    """Scores of every token of every image, per layer then averaged; cached npz."""
    from ..core.scoring import CodeGraphSettings, codegraph_scores, mutual_scores

    token_paths = [p for p in token_paths if p]  # "": image skipped as bad data
    names = [Path(p).name for p in token_paths]
    key = cfg.key(SCORE_SETTINGS, names)
    out = _stage_dir(cfg, "scores", modality) / f"scores_{key}.npz"
    if out.exists():
        return str(out)
    _limit_threads()
    loaded = [load_tokens(p) for p in token_paths]
    tokens = np.stack([item["tokens"] for item in loaded], axis=1)  # (L, B, N, C)
    valid = np.stack([item["valid"] for item in loaded])  # (B, N)
    n_layers = tokens.shape[0]
    per_layer = np.zeros((n_layers,) + valid.shape, dtype=np.float32)
    communities: list[list[int]] = []
    suspicious = np.zeros(valid.shape, dtype=np.int32)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    settings = None
    if cfg.codegraph:
        overrides = {}
        if cfg.codegraph_pvalue is not None:
            overrides["pvalue"] = cfg.codegraph_pvalue
        if cfg.codegraph_resolution is not None:
            overrides["resolution"] = cfg.codegraph_resolution
        settings = CodeGraphSettings(seed=cfg.random_seed, **overrides)
    for layer in range(n_layers):
        tl = time.monotonic()
        if cfg.codegraph:
            scores, details = codegraph_scores(
                tokens[layer], valid, fraction=cfg.fraction, settings=settings,
                device=cfg.device, return_details=True,
            )
            suspicious += np.asarray(details.suspicious, dtype=np.int32)
            for community in details.communities:
                if sorted(community) not in communities:
                    communities.append(sorted(community))
        else:
            scores = mutual_scores(tokens[layer], valid, fraction=cfg.fraction, device=cfg.device)
        per_layer[layer] = np.asarray(scores, dtype=np.float32)
        LOGGER.info(
            "[scores %s] layer %d/%d: %d images in %.1f s", modality, layer + 1, n_layers,
            valid.shape[0], time.monotonic() - tl,
        )
    timings["scoring_s"] = time.monotonic() - t0
    mean = per_layer.mean(axis=0)
    brain_scores = mean[valid]
    median = float(np.median(brain_scores))
    mad = float(np.median(np.abs(brain_scores - median)) * 1.4826)
    write_npz(
        out, scores=mean, per_layer=per_layer, valid=valid, median=np.float64(median),
        scale=np.float64(max(mad, 1e-12)), suspicious=suspicious,
        communities=np.array(json.dumps(communities)), names=np.array(names),
        timings=np.array(json.dumps(timings)),
    )
    return str(out)


# ------------------------------------------------------------------------------------------------
# 5. per-image outputs
def probseg_transform(raw: np.ndarray, median: float, scale: float, z_center: float) -> np.ndarray:
    """Monotone map of raw scores to [0, 1]: logistic of the batch robust z-score minus z_center."""
    z = (raw - median) / scale
    return (1.0 / (1.0 + np.exp(-(z - z_center)))).astype(np.float32)


def canonical_to_native(data: np.ndarray, native) -> np.ndarray:
    """Undo ``nib.as_closest_canonical`` on an array (flips and axis permutations only)."""
    import nibabel as nib

    native_ornt = nib.orientations.io_orientation(native.affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ras, native_ornt)
    return nib.orientations.apply_orientation(data, transform)


def write_image_outputs(
    record: dict[str, Any], token_file: str, score_file: str, cfg: RunConfig,
    provenance: dict[str, Any],
) -> str:
    """Write probseg, anomaly mask and brain mask (+ sidecars) on the native grid.

    Returns the path of a JSON summary in the work dir that the group stage reads. An image
    skipped as bad data (``token_file == ""``) writes nothing; its ``skipped`` result stands.
    """
    from ..bids.derivatives import anomaly_mask_sidecar, brain_mask_sidecar, probseg_sidecar
    from ..bids.naming import output_paths
    from ..core.maps import subject_summary, token_map_to_cube
    from ..core.preprocessing import cube_to_native

    out = result_path(record, cfg)
    if not token_file:
        if not out.exists():
            write_json(out, {"bids_name": record["bids_name"], "status": "skipped", "error": "no tokens"})
        return str(out)
    scores = load_tokens(score_file)
    index = [str(name) for name in scores["names"]].index(Path(token_file).name)
    tokens = load_tokens(token_file)
    native, _canonical, mask_canonical = load_inputs(record, cfg)
    size = int(tokens["cube_size"])
    cube_mask = np.unpackbits(tokens["cube_mask"])[: size**3].reshape((size,) * 3).astype(bool)
    token_scores = np.where(scores["valid"][index], scores["scores"][index], 0.0)
    cube_map = token_map_to_cube(token_scores, int(tokens["grid"]), size, cube_mask)
    mask_native = canonical_to_native(mask_canonical, native).astype(bool)
    raw = cube_to_native(cube_map, tokens["cube_affine"], native, mask_native)
    raw = np.where(mask_native, raw, 0.0).astype(np.float32)
    probseg = np.where(
        mask_native,
        probseg_transform(raw, float(scores["median"]), float(scores["scale"]), cfg.z_center),
        0.0,
    ).astype(np.float32)
    anomaly = (probseg > cfg.threshold) & mask_native

    paths = output_paths(record, Path(cfg.output_dir))
    header = native.header.copy()
    header.set_xyzt_units("mm")
    _write_map(paths["probseg"], probseg, native, header, np.float32)
    _write_map(paths["anomaly_mask"], anomaly.astype(np.uint8), native, header, np.uint8)
    _write_map(paths["brain_mask"], mask_native.astype(np.uint8), native, header, np.uint8)
    transform = {
        "ScoreTransform": "logistic((raw - BatchMedian) / BatchScale - ZCenter)",
        "BatchMedian": float(scores["median"]), "BatchScale": float(scores["scale"]),
        "ZCenter": cfg.z_center,
    }
    write_json(paths["probseg_json"], probseg_sidecar(record, transform=transform, model=provenance))
    write_json(paths["anomaly_mask_json"], anomaly_mask_sidecar(record, threshold=cfg.threshold, model=provenance))
    write_json(paths["brain_mask_json"], brain_mask_sidecar(record, model=provenance))

    voxel_volume = float(np.prod(native.header.get_zooms()[:3]))
    summary = subject_summary(raw, mask_native, voxel_volume, anomaly_mask=anomaly, affine=native.affine)
    summary.update({
        "bids_name": record["bids_name"], "status": "ok",
        "outputs": {name: str(path) for name, path in paths.items()},
        "outside_fraction": None,
    })
    write_json(out, summary)
    return str(out)


def _write_map(path: Path, data: np.ndarray, native, header, dtype) -> None:
    import nibabel as nib

    hdr = header.copy()
    hdr.set_data_dtype(dtype)
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    image = nib.Nifti1Image(data.astype(dtype), native.affine, hdr)
    write_nifti(path, image)
