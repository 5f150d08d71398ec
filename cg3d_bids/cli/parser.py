"""Command-line parser of ``cg3d`` (BIDS-Apps positionals, nipreps-style options).

Every option states its default and where the default comes from. Usage errors exit 64 and an
unknown analysis level exits 17 (BEP027), never argparse's 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .. import __version__
from ..errors import EXIT_UNKNOWN_LEVEL, EXIT_USAGE

LEVELS = ("participant", "group")
MODALITIES = ("T1w", "T2w", "FLAIR")
LABEL_RE = re.compile(r"[0-9a-zA-Z]+")


class Cg3dArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that exits 64 (EX_USAGE) on usage errors, as BEP027 recommends."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's line breaks; append ``(default: X)`` where the help text does not
    already state the default and there is one to state (not for flags or unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default is argparse.SUPPRESS
                or default == {}
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))  # noqa: SLF001
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 1")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from exc
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} must be in (0, 1]")
    return number


def _probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from exc
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} must be in (0, 1)")
    return number


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file does not exist: {path}")
    return path


def _existing_dir(value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"Path does not exist: <{path}>")
    return path


def _mem_gb(value: str) -> float:
    """Memory as ``16G``, ``16000M`` or a plain number of MB (fMRIPrep's ``_to_gb``)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([GgMmTt]?)[Bb]?\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read memory size {value!r} (use e.g. 16G or 16000M)")
    number, unit = float(match.group(1)), match.group(2).upper() or "M"
    return {"M": number / 1000.0, "G": number, "T": number * 1000.0}[unit]


def _derivative(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (name = folder name), as fMRIPrep's ``--derivatives``."""
    name, sep, path = value.partition("=")
    if not sep:
        path, name = name, Path(name).name
    if not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise argparse.ArgumentTypeError(f"bad derivatives name in {value!r}; use NAME=PATH")
    return name, Path(path).expanduser().absolute()


class _ToDict(argparse.Action):
    """Collect ``NAME=PATH`` values into a dict; a repeated name is an error."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        result = dict(getattr(namespace, self.dest) or {})
        for name, path in values:
            if name in result:
                parser.error(f"derivatives name {name!r} given twice ({option_string})")
            result[name] = path
        setattr(namespace, self.dest, result)


def build_parser() -> Cg3dArgumentParser:
    """The ``cg3d`` parser (main BIDS-App entry point)."""
    parser = Cg3dArgumentParser(
        prog="cg3d",
        formatter_class=_HelpFormatter,
        description=(
            f"cg3d {__version__}: training-free zero-shot anomaly detection in 3D brain MRI "
            "(CoDeGraph3D) as a BIDS-App.\n\n"
            "  cg3d /bids /out group            score every T1w and T2w image of the dataset\n"
            "  cg3d /bids /out participant --participant-label 01   preprocess + tokens of one subject\n"
            "  cg3d demo OUTDIR                 run on the bundled demo dataset\n"
            "  cg3d evaluate OUTDIR --ground-truth DERIV   metrics against lesion masks\n\n"
            "Defaults marked [paper] come from the CoDeGraph3D paper, [MuSc] from MuSc's official "
            "code, [method.md] from cg3d's method specification (docs/method.md)."
        ),
        epilog="Exit codes follow BEP027: 0 ok, 1 failure, 16 invalid BIDS, 17 unknown level, 18 "
        "filters matched nothing, 64 usage, 65 bad data, 66 missing input, 69 GPU unavailable, "
        "73 cannot create output, 74 I/O error, 75 temporary failure (GPU out of memory).",
    )
    parser.add_argument("bids_dir", type=_existing_dir, help="the input BIDS dataset (read only)")
    parser.add_argument(
        "output_dir", type=lambda s: Path(s).expanduser().absolute(),
        help="the output derivatives dataset (suggestion: <bids_dir>/derivatives/cg3d)",
    )
    parser.add_argument(
        "analysis_level",
        help="participant: preprocessing and 3D tokens of the selected subjects, cached in the work "
        "dir (safe to run in parallel); group: whatever is still missing, then batch scoring and all "
        "outputs",
    )
    parser.add_argument("--version", action="version", version=f"cg3d v{__version__}")
    parser.add_argument(
        "--bids-exec-spec", action="store_true",
        help="print the Boutiques descriptor (BEP027) and exit (no positionals needed)",
    )

    g = parser.add_argument_group("Selecting the data")
    g.add_argument(
        "--participant-label", "--participant_label", dest="participant_label", nargs="+",
        metavar="LABEL",
        help="subjects to process, with or without 'sub-', or a file with one label per line "
        "(default: all subjects)",
    )
    g.add_argument(
        "--session-label", "--session_label", "--session-id", dest="session_label", nargs="+",
        metavar="LABEL",
        help="sessions to process, with or without 'ses-', or a file (default: all sessions; "
        "images without a session are kept)",
    )
    g.add_argument(
        "--bids-filter-file", "--bids_filter_file", dest="bids_filter_file", type=_existing_file,
        metavar="FILE",
        help='JSON of pybids filters per modality, e.g. {"t2w": {"acquisition": "axial"}}; null '
        'means "entity absent", "*" means "any value" (as in fMRIPrep)',
    )
    g.add_argument(
        "--modality", "--modalities", "-m", dest="modality", nargs="+", choices=MODALITIES,
        default=["T1w", "T2w"],
        help="modalities to score; each modality is one scoring batch [paper: T1w and T2w]",
    )
    g.add_argument(
        "-d", "--derivatives", dest="derivatives", nargs="+", type=_derivative, action=_ToDict,
        metavar="NAME=PATH", default={},
        help="derivatives datasets in which brain masks are searched (e.g. smriprep=/data/deriv/smriprep)",
    )
    g.add_argument(
        "--mask-source", dest="mask_source", choices=("derivatives", "nonzero", "skullstrip"),
        default="derivatives",
        help="where brain masks come from: 'derivatives' (desc-<mask-desc>_mask from -d), 'nonzero' "
        "(inputs already skull-stripped), 'skullstrip' (deepbet, CPU, offline)",
    )
    g.add_argument(
        "--mask-desc", dest="mask_desc", default="brain",
        help="desc entity of the brain masks in the derivatives [fMRIPrep/sMRIPrep naming]",
    )
    g.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", "--skip_bids_validator",
        dest="skip_bids_validation", action="store_true",
        help="do not validate the input dataset with bids-validator",
    )
    g.add_argument(
        "--bids-database-dir", dest="bids_database_dir", type=Path, metavar="PATH",
        help="reuse or create a pybids SQLite index here (default: <work-dir>/bids_db)",
    )
    g.add_argument(
        "--reset-bids-db", "--reset_bids_db", dest="reset_bids_db", action="store_true",
        help="re-index the input dataset even when an index of the same tree exists (the index is "
        "keyed by the sub-/ses-/anat folders' names and modification times)",
    )

    g = parser.add_argument_group("Method (defaults reproduce the CoDeGraph3D paper)")
    g.add_argument(
        "--encoder", default="dinov2_vitl14",
        help="frozen 2D ViT: dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14, "
        "clip_vitl14, or test-tiny-vit (random weights, for tests only) [paper: DINOv2-L/14]",
    )
    g.add_argument(
        "--weights", type=_existing_file, metavar="FILE",
        help="encoder weights (.safetensors or .pth, timm or original layout); default: the "
        "weights baked into the container ($CG3D_WEIGHTS_DIR), then the Hugging Face hub cache",
    )
    g.add_argument(
        "--allow-download", dest="allow_download", action="store_true",
        help="allow downloading encoder weights from the Hugging Face hub (default: offline)",
    )
    g.add_argument(
        "--cube-size", dest="cube_size", type=_positive_int, default=224,
        help="cube edge H in voxels, a multiple of the patch size 14 [paper: 224]",
    )
    g.add_argument(
        "--fov-mm", dest="fov_mm", type=float, default=156.0,
        help="cube field of view in mm, centred on the brain mask [paper: 156 mm crop]",
    )
    g.add_argument(
        "--layers", type=_positive_int, nargs="+",
        help="1-based ViT blocks whose tokens are scored [paper: 6 12 18 24 for ViT-L; 3 6 9 12 "
        "for 12-block models]",
    )
    g.add_argument(
        "--projection-dim", dest="projection_dim", type=_positive_int, default=128,
        help="random projection size k per axis; tokens have 3k dims [paper: 128]",
    )
    g.add_argument(
        "--random-seed", "--seed", dest="random_seed", type=int, default=0,
        help="seed of the random projection and of community detection [method.md]",
    )
    g.add_argument(
        "--fraction", "--interval-fraction", dest="fraction", type=_fraction, default=0.3,
        help="MuSc's K = floor(fraction * (B - 1)) nearest images averaged [MuSc code: 0.3]",
    )
    g.add_argument(
        "--no-codegraph", dest="codegraph", action="store_false",
        help="plain MuSc scoring, without the consistent-anomaly (CoDeGraph) stage [paper: on]",
    )
    g.add_argument(
        "--codegraph-pvalue", dest="codegraph_pvalue", type=_probability,
        help="tail probability below which a token's neighbour burnout is suspicious "
        "(default: CodeGraphSettings, see docs/method.md)",
    )
    g.add_argument(
        "--codegraph-resolution", dest="codegraph_resolution", type=float,
        help="Leiden CPM resolution gamma (default: CodeGraphSettings)",
    )
    g.add_argument(
        "--threshold", type=_probability, default=0.5,
        help="probseg threshold of the binary anomaly mask [method.md §5]",
    )

    g = parser.add_argument_group("Performance")
    g.add_argument(
        "--device", default="cuda",
        help="cuda, cuda:N or cpu; with cuda and no GPU visible cg3d stops at once (exit 69) "
        "[a GPU is the intended hardware]",
    )
    g.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="encoder precision: auto = bf16 autocast on GPU, fp32 on CPU (bf16 on a CPU with bf16 "
        "instructions encodes about 2x faster: benchmarks/bench_encoder.py); distances are always fp32",
    )
    g.add_argument(
        "--slice-batch", dest="slice_batch", type=_positive_int, default=128,
        help="slices per encoder forward pass (lower it if the GPU runs out of memory)",
    )
    g.add_argument(
        "--score-chunk-mb", dest="score_chunk_mb", type=_positive_int, default=256,
        help="memory for one block of pairwise distances during scoring, in MB",
    )
    g.add_argument(
        "--nprocs", "--nthreads", "--n_cpus", "--n-cpus", dest="nprocs", type=_positive_int,
        help="processes for nipype MultiProc (default: all CPUs)",
    )
    g.add_argument(
        "--omp-nthreads", dest="omp_nthreads", type=_positive_int,
        help="threads per process (torch, BLAS) (default: CPUs / nprocs)",
    )
    g.add_argument(
        "--mem", "--mem-mb", "--mem_mb", dest="mem_gb", type=_mem_gb, metavar="MEM",
        help="memory limit for nipype: 16G, 16000M or a number of MB (default: unlimited)",
    )
    g.add_argument(
        "--use-plugin", dest="use_plugin", type=_existing_file, metavar="FILE",
        help="nipype plugin YAML, e.g. {plugin: SLURM, plugin_args: {...}} (default: MultiProc)",
    )

    g = parser.add_argument_group("Work directory, configuration and logging")
    g.add_argument(
        "-w", "--work-dir", dest="work_dir", type=lambda s: Path(s).expanduser().absolute(),
        default="work",
        help="intermediate results (preprocessing statistics, tokens, scores); a rerun resumes from "
        "it; relative to the current folder [fMRIPrep]",
    )
    g.add_argument(
        "--clean-workdir", dest="clean_workdir", action="store_true",
        help="remove the work directory first (not with concurrent runs)",
    )
    g.add_argument(
        "--config-file", dest="config_file", type=_existing_file, metavar="FILE",
        help="a logs/config-*.toml of a previous run; options given on the command line win",
    )
    g.add_argument(
        "--stop-on-first-crash", dest="stop_on_first_crash", action="store_true",
        help="stop at the first image whose outputs cannot be written instead of reporting it "
        "and going on (bad input data always stops the run, unless --skip-bad-images)",
    )
    g.add_argument(
        "--skip-bad-images", dest="skip_bad_images", action="store_true",
        help="leave images whose data cannot be used (corrupt, truncated, 4D, NaN/Inf, empty or "
        "unmappable mask) out of the batch instead of stopping with exit 65: they are listed as "
        "'skipped' with the reason in group_<mod>.tsv and the reports, the others are scored, and "
        "the exit code is 1",
    )
    g.add_argument("--notrack", action="store_true", help="accepted for nipreps compatibility; cg3d sends nothing")
    g.add_argument(
        "-v", "--verbose", dest="verbose", action="count", default=0,
        help="more log output (-vv for debug)",
    )
    return parser


def normalise_labels(values: list[str] | None, prefix: str) -> list[str] | None:
    """Strip ``sub-``/``ses-`` (``str.removeprefix``), read label files, validate, dedup, sort."""
    if not values:
        return None
    labels: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            items = path.read_text().split()
        else:
            items = value.replace(",", " ").split()
        labels.extend(item.removeprefix(prefix) for item in items)
    bad = [label for label in labels if not LABEL_RE.fullmatch(label)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"invalid {prefix.rstrip('-')} label(s) {bad}: BIDS labels are letters and digits only "
            f"([0-9a-zA-Z]+)"
        )
    return sorted(set(labels))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; exit 64 on usage errors and 17 on an unknown level."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.analysis_level not in LEVELS:
        parser.print_usage(sys.stderr)
        parser.exit(
            EXIT_UNKNOWN_LEVEL,
            f"cg3d: error: unknown analysis level {args.analysis_level!r}; choose from "
            f"{', '.join(LEVELS)}\n",
        )
    try:
        args.participant_label = normalise_labels(args.participant_label, "sub-")
        args.session_label = normalise_labels(args.session_label, "ses-")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not (args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device)):
        parser.error(f"--device {args.device!r}: use cuda, cuda:N or cpu")
    if args.cube_size % 14:
        parser.error(f"--cube-size {args.cube_size} is not a multiple of the patch size 14 (e.g. 112, 224)")
    return args
