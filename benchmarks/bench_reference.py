#!/usr/bin/env python3
"""Reference banks: time to save one (``group --save-reference``) and to score one new scan against it.

Synthetic tokens at the paper's scale (cube 224: N = 16^3 = 4096 tokens, C = 3 x 128 = 384 dims,
4 layers, ~2,000 valid brain tokens per image). Saving reads each image's token file once and
fills one memory-mapped ``.npy`` per layer (:func:`cg3d_bids.reference.write_modality`), then
hashes every file (:func:`cg3d_bids.reference.finish_bank`). Scoring is the ``reference_score``
stage's work for one image: every layer against every bank image, read from the memory-mapped
bank (:func:`cg3d_bids.core.scoring.reference.reference_scores`), plus the bank's verification
on load. Examples::

    python benchmarks/bench_reference.py --bank-sizes 15 30 --threads 1
    python benchmarks/bench_reference.py --bank-sizes 100 --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cg3d_bids import records as rec  # noqa: E402
from cg3d_bids.core.scoring.reference import ReferenceQuery, reference_scores  # noqa: E402
from cg3d_bids.reference import finish_bank, load_bank, staging_dir, write_modality  # noqa: E402

SETTINGS = {"encoder": "dinov2_vitl14", "weights_sha256": "0" * 64, "cube_size": 224, "fov_mm": 156.0,
            "layers": [6, 12, 18, 24], "projection_dim": 128, "random_seed": 0, "precision": "bf16",
            "token_format": 1}


def _image(rng: np.random.Generator, grid: int, dim: int, layers: int, valid_tokens: int):
    valid = np.zeros(grid**3, dtype=bool)
    valid[rng.choice(grid**3, size=valid_tokens, replace=False)] = True
    tokens = rng.normal(size=(layers, grid**3, dim)).astype(np.float32)
    return tokens, valid


def bench(size: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    rng = np.random.default_rng(size)
    names = [f"sub-{i:03d}_T1w" for i in range(size)]
    files, results, sha, valid_rows = {}, {}, {}, []
    for name in names:
        tokens, valid = _image(rng, args.grid, args.dim, args.layers, args.valid_tokens)
        files[name] = rec.save(rec.ImageTokens(bids_name=name, modality="T1w", key="k", grid=args.grid,
                                               layers=tuple(range(1, args.layers + 1)), tokens=tokens, valid=valid),
                               root / "tokens" / f"{name}.npz")
        valid_rows.append(valid)
        sha[name] = hashlib.sha256(name.encode()).hexdigest()
    valid = np.stack(valid_rows)
    batch = rec.BatchScores(modality="T1w", key="s", names=tuple(names), grid=args.grid, k=1,
                            scores=np.zeros(valid.shape, np.float32), per_layer=np.zeros((1, *valid.shape), np.float32),
                            valid=valid, suspicious=np.zeros(valid.shape, np.int32), median=0.5, scale=0.1)
    landmarks = rec.Landmarks(modality="T1w", key="l", percentiles=(1.0, 99.0), landmarks=(0.0, 100.0),
                              images=tuple(names))
    bank_path = root / f"bank-{size}"
    t0 = time.perf_counter()
    staging = staging_dir(bank_path, "bench")
    entry = write_modality(staging, "T1w", batch, files, landmarks, results, sha, fraction=0.3, codegraph=False)
    finish_bank(bank_path, staging, SETTINGS, {"T1w": entry}, {"cg3d_version": "bench"})
    save_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    bank = load_bank(bank_path, verify=True)
    load_s = time.perf_counter() - t0
    modality = bank.modality("T1w")
    tokens, valid_new = _image(rng, args.grid, args.dim, args.layers, args.valid_tokens)
    t0 = time.perf_counter()
    for layer in range(args.layers):
        reference_scores([ReferenceQuery(tokens[layer], valid_new)], modality.references(layer), 0.3,
                         device=args.device, block_mb=args.block_mb)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    score_s = time.perf_counter() - t0
    bytes_ = sum(p.stat().st_size for p in bank_path.rglob("*") if p.is_file())
    return {"size": size, "bank_mb": bytes_ / 1e6, "save_s": save_s, "load_verify_s": load_s, "score_s": score_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[15, 30])
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--valid-tokens", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-mb", type=float, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"grid {args.grid}^3, C = {args.dim}, {args.layers} layers, {args.valid_tokens} valid tokens per image, "
          f"{args.device}, {torch.get_num_threads()} torch threads")
    print("| bank images | bank MB | save s | load + verify s | score one scan s |\n| --- | --- | --- | --- | --- |")
    for size in args.bank_sizes:
        with tempfile.TemporaryDirectory(prefix="cg3d-bench-reference-") as tmp:
            row = bench(size, args, Path(tmp))
        print(f"| {row['size']} | {row['bank_mb']:.0f} | {row['save_s']:.1f} | {row['load_verify_s']:.1f} | "
              f"{row['score_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
