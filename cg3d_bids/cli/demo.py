"""``cg3d demo OUTDIR``: copy the bundled demo dataset and run the group level on it.

The demo dataset (4 mm T1w/T2w/FLAIR of 7 subjects made from public data, licences in its
``LICENSES.md``) is small enough for a CPU. Its configuration: cube 112^3, DINOv2 ViT-S/14,
T1w (the only modality with 7 images; T2w/FLAIR have 4, below the minimum batch of 5).
``--test-encoder`` swaps in a tiny random ViT so the demo runs with no weights at all; the
numbers then mean nothing, and the outputs say so.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from . import run
from .parser import Cg3dArgumentParser, HelpFormatter

LOGGER = logging.getLogger("cg3d")


def build_parser() -> Cg3dArgumentParser:
    parser = Cg3dArgumentParser(
        prog="cg3d demo",
        description="Run cg3d on the bundled demo BIDS dataset (CPU, small configuration).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("outdir", type=lambda s: Path(s).expanduser().absolute(),
                        help="folder that receives bids/ (the demo dataset), derivatives/cg3d/ and work/")
    parser.add_argument("--test-encoder", action="store_true",
                        help="use the tiny random test encoder (no weights needed; results mean nothing)")
    parser.add_argument("--encoder", default="dinov2_vits14", help="encoder (ignored with --test-encoder)")
    parser.add_argument("--weights", metavar="FILE", help="encoder weights file (default: baked or cached weights)")
    parser.add_argument("--allow-download", action="store_true", help="download weights from the HF hub")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cube-size", type=int, default=112, help="cube edge in voxels")
    parser.add_argument("--nprocs", type=int, default=1, help="nipype processes")
    parser.add_argument("--no-codegraph", action="store_true", help="plain MuSc scoring")
    return parser


def main(argv: list[str]) -> int:
    """``cg3d demo OUTDIR [options]``; returns the exit code of the group run."""
    from ..demo_data import copy_demo_dataset

    args = build_parser().parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    bids = copy_demo_dataset(args.outdir / "bids")
    command = [
        str(bids), str(args.outdir / "derivatives" / "cg3d"), "group",
        "--modality", "T1w", "-d", f"masks={bids / 'derivatives' / 'masks'}",
        "--device", args.device, "--cube-size", str(args.cube_size),
        "-w", str(args.outdir / "work"), "--nprocs", str(args.nprocs),
    ]
    if args.test_encoder:
        print("=" * 78 + "\nWARNING: demo with the RANDOM test encoder (test-tiny-vit): the maps and "
              "scores\nmean NOTHING. They only show that the pipeline runs end to end.\n" + "=" * 78,
              file=sys.stderr)
        command += ["--encoder", "test-tiny-vit"]
    else:
        command += ["--encoder", args.encoder]
        if args.weights:
            command += ["--weights", args.weights]
        if args.allow_download:
            command += ["--allow-download"]
    if args.no_codegraph:
        command += ["--no-codegraph"]
    status = run.main(command)
    if status == 0:
        print(f"demo outputs: {args.outdir / 'derivatives' / 'cg3d'} (open group_T1w.html)", file=sys.stderr)
    return status
