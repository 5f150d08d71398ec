"""Saved reference cohorts on the command line: the BIDS-App hooks and ``cg3d reference info BANK``.

Hooks called by :mod:`cg3d_bids.cli.run` (in this order):

- :func:`check_reference_options`: ``--reference`` only at the participant level, ``--save-reference``
  only at the group level, and a bank destination that can be written (exit 64/73, before anything);
- :func:`open_reference`: load and verify the bank (exit 65/66), keep the modalities it has, turn
  the consistent-anomaly stage off (a bank is scored against, not re-batched);
- :func:`bind_reference`: once the run's effective settings are known, check them against the
  bank's (exit 64 naming both values) and its size against ``--fraction``, and record the bank in
  the run's facts (its checksum and size appear in every sidecar, table and report);
- :func:`finish_saved_reference`: after a ``group --save-reference`` workflow, write the manifest
  and move the bank into place.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..cache import WorkCache
from ..errors import Cg3dError, UsageError
from ..reference import (
    ReferenceBank,
    bank_summary_lines,
    check_bank_destination,
    check_compatible,
    finish_bank,
    load_bank,
    staging_dir,
    token_settings,
)
from ..settings import Settings
from .parser import Cg3dArgumentParser, HelpFormatter

LOGGER = logging.getLogger("cg3d")

__all__ = ["bind_reference", "check_reference_options", "finish_saved_reference", "main", "open_reference"]


# ------------------------------------------------------------------------------------------------
# BIDS-App hooks
def check_reference_options(settings: Settings) -> None:
    """Usage checks of ``--reference`` / ``--save-reference`` (before any path is touched)."""
    level = settings.inputs.analysis_level
    if settings.inputs.reference is not None and level != "participant":
        raise UsageError("--reference scores images one by one against a saved bank: it is a participant-level "
                         "option", fix="run `cg3d BIDS OUT participant --reference BANK [--participant-label ...]`")
    bank = settings.execution.save_reference
    if bank is not None:
        if level != "group":
            raise UsageError("--save-reference saves the batch a group run scores: it is a group-level option",
                             fix="run `cg3d BIDS OUT group --save-reference BANK`")
        check_bank_destination(bank, settings.inputs.bids_dir)


def open_reference(settings: Settings) -> tuple[Settings, ReferenceBank]:
    """Load and verify ``--reference``; the run keeps the modalities the bank has, and scores
    with plain MuSc against it."""
    path = settings.inputs.reference
    assert path is not None
    start = time.monotonic()
    bank = load_bank(path, verify=True)
    LOGGER.info("reference bank %s (%s): %s; verified in %.1f s", bank.path, bank.checksum,
                ", ".join(f"{mod} {n} images" for mod, n in bank.sizes().items()), time.monotonic() - start)
    wanted = tuple(settings.inputs.modality)
    kept = tuple(mod for mod in wanted if mod in bank.modalities)
    if not kept:
        raise UsageError(f"the reference bank has no {' or '.join(wanted)} images (it has "
                         f"{', '.join(bank.modalities)})", path=bank.path,
                         fix=f"use --modality {' '.join(bank.modalities)}, or a bank made from these modalities")
    for mod in wanted:
        if mod not in kept:
            LOGGER.warning("the reference bank has no %s images: %s images are not scored", mod, mod)
    if settings.method.codegraph:
        LOGGER.info("reference scoring is plain MuSc against the bank (the consistent-anomaly stage needs a "
                    "batch): --no-codegraph implied")
    return settings.replace(inputs={"modality": kept}, method={"codegraph": False}), bank


def bind_reference(settings: Settings, bank: ReferenceBank) -> Settings:
    """Check the run's resolved settings against the bank and record the bank in the run facts."""
    check_compatible(bank, settings)
    fraction = settings.method.fraction
    bank.check_size(fraction)
    sizes = {mod: n for mod, n in bank.sizes().items() if mod in settings.inputs.modality}
    for mod, n in sizes.items():
        stats = bank.modalities[mod].stats
        LOGGER.info("%s: each image is scored against the bank's %d images with K = floor(%s * %d) = %d (the bank "
                    "was scored at fraction %s, K = %s)", mod, n, fraction, n, bank.modalities[mod].k(fraction),
                    stats["fraction"], stats["k"])
        if n < 14:
            LOGGER.warning("%s: a bank of %d images is small; accuracy drops below batches of 15 (paper Table 5)",
                           mod, n)
    return settings.replace(run={"reference_checksum": bank.checksum, "reference_sizes": sizes})


def finish_saved_reference(settings: Settings, cache: WorkCache, modalities: Sequence[str]) -> ReferenceBank:
    """Write the bank's manifest from the run's ``save_reference`` entries and move it into place."""
    from .. import records as rec

    path = settings.execution.save_reference
    assert path is not None
    start = time.monotonic()
    entries = {}
    for mod in modalities:
        stored = cache.run_dir / "reference" / f"{mod}.json"
        if not stored.exists():
            raise Cg3dError(f"the {mod} part of the reference bank was not written", path=stored,
                            fix="see the log above; rerun the group command")
        entries[mod] = rec.load(stored, rec.ReferenceEntry).entry
    run = settings.run
    made = {"cg3d_version": run.version, "run_id": run.run_id, "command": run.command,
            "bids_dir": str(settings.inputs.bids_dir), "mask_source": settings.inputs.mask_source,
            "timm_name": run.timm_name, "is_test_encoder": run.is_test_encoder,
            "threshold": settings.method.threshold, "z_center": settings.method.z_center}
    bank = finish_bank(path, staging_dir(path, run.run_id), token_settings(settings), entries, made)
    size = sum(p.stat().st_size for p in bank.path.rglob("*") if p.is_file())
    LOGGER.info("reference bank saved in %s (%s, %.1f MB; %s) in %.1f s", bank.path, bank.checksum, size / 1e6,
                ", ".join(f"{m} {n} images" for m, n in bank.sizes().items()), time.monotonic() - start)
    return bank


# ------------------------------------------------------------------------------------------------
# cg3d reference info BANK
def build_parser() -> Cg3dArgumentParser:
    parser = Cg3dArgumentParser(
        prog="cg3d reference",
        description="Inspect a saved reference cohort (a bank written by `cg3d BIDS OUT group --save-reference "
        "BANK`, scored against by `cg3d BIDS OUT participant --reference BANK`).",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = commands.add_parser("info", help="size, modalities, settings, checksum and how the bank was made "
                               "(checks every file)", formatter_class=HelpFormatter)
    info.add_argument("bank", type=Path, metavar="BANK", help="the bank's folder (or its reference.json)")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.add_argument("--no-verify", action="store_true",
                      help="skip the files' sha256 check (the manifest, shapes and counts are still checked)")
    return parser


def main(argv: list[str]) -> int:
    """``cg3d reference info BANK [--json] [--no-verify]``; exit 0, or the error's exit code."""
    args = build_parser().parse_args(argv)
    try:
        bank = load_bank(args.bank, verify=not args.no_verify)
    except Cg3dError as exc:
        print(f"cg3d reference: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(bank.describe(), indent=2, sort_keys=True))
    else:
        print("\n".join(bank_summary_lines(bank)))
        print("  files verified (sha256)" if not args.no_verify else "  files not verified (--no-verify)")
    return 0
