#!/usr/bin/env python3
"""Encoder throughput: slices/s and seconds per volume, plus one full ``tokenize_volume`` per config.

Random weights (speed does not depend on them): models are built with ``pretrained=False`` and
LayerScale ``init_values=1.0``. Prints a Markdown table. Examples::

    python benchmarks/bench_encoder.py --quick --models dinov2_vits14 --sizes 112 224
    python benchmarks/bench_encoder.py --device cuda --batch 128 --models dinov2_vitl14 --sizes 224

On a shared CPU use ``--threads 1``: with more torch threads than free cores OpenMP threads spin
against each other (on a busy 2-core machine ViT-S/112 fell from 23 to 7 slices/s at 2 threads).

One volume is ``3 * H`` slices (three axes); ``tokenize_volume`` skips black slices, so its time
on the synthetic ellipsoid "brain" (about 10 % black slices) is a little below that estimate.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cg3d_bids.core.models.encoders import SliceEncoder, get_spec, resolve_precision  # noqa: E402
from cg3d_bids.core.tokens import tokenize_volume  # noqa: E402

SHORT = {"s": "dinov2_vits14", "b": "dinov2_vitb14", "l": "dinov2_vitl14", "g": "dinov2_vitg14",
         "clip": "clip_vitl14"}


def random_encoder(name: str, size: int, precision: str, device: str) -> SliceEncoder:
    import timm

    spec = get_spec(name)
    torch.manual_seed(0)
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=size, init_values=1.0,
                              **spec.model_kwargs)
    enc = SliceEncoder(model, name=name, layers=spec.default_layers, mean=spec.mean, std=spec.std,
                       precision=resolve_precision(precision, device), timm_name=spec.timm_name)
    return enc.to(device)


def synthetic_cube(size: int) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' with smooth texture, background 0."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    mask = (x / 0.85) ** 2 + (y / 0.92) ** 2 + (z / 0.8) ** 2 <= 1.0
    cube = 0.5 + 0.2 * np.sin(9 * x) * np.cos(7 * y) * np.sin(5 * z + 0.3)
    return np.where(mask, cube, 0).astype(np.float32), mask


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def slices_per_second(enc: SliceEncoder, batch: int, min_time: float, device: str) -> float:
    x = torch.rand(batch, enc.img_size, enc.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    enc.forward_slices(x)  # warm-up
    sync(device)
    n, start = 0, time.perf_counter()
    while True:
        enc.forward_slices(x)
        sync(device)
        n += batch
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and n >= 2 * batch:
            return n / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"],
                        help="registry names (or s, b, l, g, clip)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 112], help="cube sizes H")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--min-time", type=float, default=5.0, help="seconds of timing per config")
    parser.add_argument("--quick", action="store_true", help="1 s of timing per config")
    parser.add_argument("--no-tokenize", dest="tokenize", action="store_false",
                        help="skip the full tokenize_volume timing")
    parser.add_argument("--skip-slower-than", type=float, default=None, metavar="SLICES_PER_S",
                        help="skip tokenize_volume when the encoder runs below this many slices/s")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = 1.0 if args.quick else args.min_time
    models = [SHORT.get(m, m) for m in args.models]
    dev = args.device
    if dev.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(dev))
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    import timm

    print(f"device: {dev} ({name}); torch {torch.__version__}, timm {timm.__version__}, "
          f"batch {args.batch}, random weights\n")
    header = "| model | H | grid | precision | slices/s | s/volume (3H slices) | tokenize_volume s |"
    if dev.startswith("cuda"):
        header += " peak GPU MB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for model in models:
        for size in args.sizes:
            for precision in args.precisions:
                if dev.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                enc = random_encoder(model, size, precision, dev)
                rate = slices_per_second(enc, args.batch, min_time, dev)
                tok_s = "skipped"
                if args.tokenize and (args.skip_slower_than is None or rate >= args.skip_slower_than):
                    cube, mask = synthetic_cube(size)
                    sync(dev)
                    start = time.perf_counter()
                    tokenize_volume(cube, mask, enc, slice_batch=args.batch, device=dev)
                    sync(dev)
                    tok_s = f"{time.perf_counter() - start:.1f}"
                row = (f"| {model} | {size} | {size // 14} | {precision} | {rate:.1f} | "
                       f"{3 * size / rate:.1f} | {tok_s} |")
                if dev.startswith("cuda"):
                    row += f" {torch.cuda.max_memory_allocated() / 2**20:.0f} |"
                print(row, flush=True)
                del enc
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
