"""``cg3d evaluate OUTPUT_DIR --ground-truth DERIV``: the command line over :mod:`cg3d_bids.evaluation`.

Only argument parsing lives here; what is evaluated and how (matching rule, which images count,
metrics, voxel weighting, outputs) is documented in :mod:`cg3d_bids.evaluation`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ..settings import MODALITIES
from ..core.metrics import DEFAULT_N_BINS, DEFAULT_SIZE_EDGES
from ..errors import EXIT_USAGE, Cg3dError, UsageError
from ..evaluation import (
    DEFAULT_GT_PATTERN,
    DEFAULT_VOXEL_WEIGHTING,
    MATCHING_RULE,
    VOXEL_WEIGHTINGS,
    EvaluationSettings,
    markdown_summary,
    run_evaluation,
)

DESCRIPTION = """\
Evaluate cg3d anomaly maps against lesion masks: patient AUROC/AP; voxel AUROC, AP, Dice-max and
IoU over the pooled brain voxels (one threshold for the batch); lesion-wise TPR by lesion size.
Writes eval_<mod>.tsv and eval_<mod>.json into OUTPUT_DIR (or --eval-dir), adds eval_* to its
.bidsignore and an evaluation section to group_<mod>.html."""

EPILOG = textwrap.fill(f"Matching rule: {MATCHING_RULE}.", 98, break_on_hyphens=False) + """

Exit codes: 0 ok, 18 no ground truth matched, 64 usage, 65 bad data, 66 no cg3d outputs or a
missing input."""


class EvaluateArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that exits 64 (EX_USAGE, as BEP027 recommends) on usage errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends ``(default: X)`` once, only for options that
    have a real default (not for required options, flags, counters or unset options, and not when
    the help text already states the default); never breaks lines at hyphens (option names)."""

    _NO_DEFAULT = (argparse._StoreTrueAction, argparse._StoreFalseAction,  # noqa: SLF001
                   argparse._StoreConstAction, argparse._CountAction,  # noqa: SLF001
                   argparse._HelpAction, argparse._VersionAction)  # noqa: SLF001

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or isinstance(action, self._NO_DEFAULT)
                or default is None or default is argparse.SUPPRESS or "default" in text):
            return text
        shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) \
            if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _path(value: str) -> Path:
    return Path(value).expanduser().absolute()


def build_parser() -> EvaluateArgumentParser:
    """Parser of ``cg3d evaluate`` (usage errors exit 64)."""
    parser = EvaluateArgumentParser(prog="cg3d evaluate", formatter_class=HelpFormatter,
                                    description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("output_dir", type=_path, metavar="OUTPUT_DIR",
                        help="output folder of a finished 'cg3d BIDS OUTPUT_DIR group' run")
    parser.add_argument("--ground-truth", "--ground_truth", dest="ground_truth", required=True, type=_path,
                        metavar="PATH", help="BIDS derivatives folder with the lesion masks (required)")
    parser.add_argument("--gt-pattern", "--gt_pattern", dest="gt_pattern", default=DEFAULT_GT_PATTERN,
                        metavar="PATTERN", help="end of the lesion-mask names: <entities>_<PATTERN>.nii[.gz]")
    parser.add_argument("--healthy-without-mask", "--healthy_without_mask", dest="healthy_without_mask",
                        action="store_true",
                        help="count images without a lesion mask (and without a --patient-labels entry) "
                        "as healthy; without this flag they are excluded from all metrics")
    parser.add_argument("--patient-labels", "--patient_labels", dest="patient_labels", metavar="TSV",
                        type=_path,
                        help="TSV with participant_id [session_id] or bids_name, and lesion (1/0): "
                        "patient-level labels for images without a lesion mask")
    parser.add_argument("--modality", "--modalities", "-m", dest="modality", nargs="+", choices=MODALITIES,
                        help="modalities to evaluate (default: every modality found)")
    parser.add_argument("--participant-label", "--participant_label", dest="participant_label",
                        nargs="+", metavar="LABEL",
                        help="evaluate only these subjects, with or without 'sub-' (default: all; the maps "
                        "still come from the whole batch)")
    parser.add_argument("--n-bins", "--n_bins", dest="n_bins", type=int, default=DEFAULT_N_BINS, metavar="N",
                        help="histogram bins over [0, 1] for the voxel metrics (>= 2)")
    parser.add_argument("--size-edges", "--size_edges", dest="size_edges", type=float, nargs="+",
                        default=list(DEFAULT_SIZE_EDGES), metavar="MM3",
                        help="lesion volume bin edges for the lesion-wise TPR, in mm^3 [paper §4.2]")
    parser.add_argument("--voxel-weighting", "--voxel_weighting", dest="voxel_weighting",
                        choices=VOXEL_WEIGHTINGS, default=DEFAULT_VOXEL_WEIGHTING,
                        help="how the pooled voxel metrics weigh each voxel: 'volume' = by its volume in "
                        "mm^3, as if every image were on one common grid [the paper's setting]; 'count' = "
                        "each voxel once, so finer images weigh more")
    parser.add_argument("--eval-dir", "--eval_dir", dest="eval_dir", type=_path, metavar="DIR",
                        help="write eval_<mod>.tsv/.json here instead of OUTPUT_DIR (then neither the group "
                        "report nor .bidsignore is touched), e.g. for a subset of subjects")
    parser.add_argument("--no-report", "--no_report", dest="report", action="store_false",
                        help="do not add the evaluation section to group_<mod>.html")
    parser.add_argument("--lock-wait", "--lock_wait", dest="lock_wait", type=_seconds, default=0.0,
                        metavar="SECONDS",
                        help="when a cg3d run holds OUTPUT_DIR, wait up to this many seconds for it ('inf': as "
                        "long as it takes) instead of stopping at once with exit 75 and a message naming it")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-vv: debug messages in the log")
    return parser


def _seconds(value: str) -> float:
    from ..settings import seconds

    return seconds(value)


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    """The :class:`EvaluationSettings` of parsed arguments (UsageError on bad values)."""
    return EvaluationSettings(
        gt_pattern=args.gt_pattern, healthy_without_mask=args.healthy_without_mask,
        patient_labels=args.patient_labels, modalities=tuple(args.modality or ()),
        participants=tuple(args.participant_label or ()), n_bins=args.n_bins,
        size_edges=tuple(args.size_edges), voxel_weighting=args.voxel_weighting,
        update_report=args.report, eval_dir=args.eval_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cg3d evaluate``; returns the exit code (usage errors exit 64 through argparse)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = settings_from_args(args)
    except UsageError as exc:
        parser.error(exc.message)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        with _output_lock(args.output_dir, writes=settings.eval_dir is None, wait_s=args.lock_wait):
            results = run_evaluation(args.output_dir, args.ground_truth, settings)
    except Cg3dError as exc:
        print(f"cg3d evaluate: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    for result in results:
        print(markdown_summary(result))
    return 0


def _output_lock(output_dir: Path, *, writes: bool, wait_s: float):
    """The output folder's lock (:mod:`cg3d_bids.locks`): exclusive when the evaluation writes its
    tables and report section there, shared when it only reads it (``--eval-dir``). A missing
    folder is left to the evaluation's own error; a read-only one (an archived run) is read
    without a lock, since no run can be writing it through this mount."""
    import contextlib
    import os

    from ..locks import EXCLUSIVE, SHARED, FolderLock

    if not Path(output_dir).is_dir() or not os.access(output_dir, os.W_OK):
        return contextlib.nullcontext()
    return FolderLock(output_dir, EXCLUSIVE if writes else SHARED, label="output folder", wait_s=wait_s)


if __name__ == "__main__":
    sys.exit(main())
