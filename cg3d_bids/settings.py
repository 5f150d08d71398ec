"""The one settings object of a cg3d run, in sections, with one TOML codec.

:class:`Settings` is frozen and has four sections:

- :class:`InputSettings`: which data (the BIDS-App positionals, labels, filters, masks);
- :class:`MethodSettings`: everything that changes a result (encoder, cube, layers, scoring);
- :class:`ExecutionSettings`: how it is computed (device, processes, memory, work folder);
- :class:`RunInfo`: facts fixed when the run starts (run id, weights sha256, effective
  precision and layers, the command line).

Every setting is declared once, here, with its command-line flags, help text, the source of its
default (``[paper]``, ``[MuSc code]``, ``[method.md]``, ...) and the cache level it changes
(:class:`Affects`). The argument parser (:mod:`cg3d_bids.cli.parser`), the README options table
(``scripts/options_table.py``), the Boutiques descriptor (:mod:`cg3d_bids.boutiques`), the cache
keys (:meth:`Settings.key`), the provenance in sidecars and reports and the citation text are all
generated from these declarations; tests check that they agree.

The TOML codec (:meth:`Settings.to_toml` / :meth:`Settings.from_toml`) writes one table per
section; values that are None are left out (TOML has no null) and come back as the default.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .hashing import short_hash
from .typed import decode

__all__ = [
    "Affects", "ExecutionSettings", "InputSettings", "MethodSettings", "Option", "RunInfo",
    "SECTIONS", "Settings", "iter_options",
]


class Affects(enum.IntEnum):
    """The first cached result a setting changes (every later one changes too)."""

    NOTHING = 0     #: how results are computed, not what they are
    CUBE = 1        #: the prepared cube (and everything after it)
    TOKENS = 2      #: tokens (and scores, outputs)
    SCORES = 3      #: scores (and outputs)
    OUTPUTS = 4     #: only the written maps, masks and tables


@dataclass(frozen=True)
class Option:
    """How one setting appears on the command line, in the docs and in the Boutiques descriptor."""

    flags: tuple[str, ...]            #: option strings; empty for positionals
    help: str                         #: what it does; the default's source in [brackets]
    group: str                        #: heading in ``--help``
    bosh_id: str                      #: Boutiques input id (BEP027 ids where defined)
    bosh_name: str                    #: Boutiques input name
    kind: str = "value"               #: value | flag | no-flag (store_false) | count | positional
    parse: Callable[[str], Any] | None = None  #: argparse ``type``
    nargs: str | None = None          #: argparse ``nargs``
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    affects: Affects = Affects.NOTHING
    bosh_type: str | None = None      #: String | Number | Flag | File (default: from the value type)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    integer: bool = False
    default_text: str | None = None   #: how the default reads in help/README when not the value


def setting(default: Any = None, *, factory: Callable[[], Any] | None = None, **option: Any) -> Any:
    """A dataclass field carrying its :class:`Option` (``option`` keywords) as metadata."""
    meta = {"option": Option(**option)} if option else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------
# value parsers (argparse ``type=``); they raise ArgumentTypeError, which argparse turns into exit 64
def _type_error(message: str) -> Exception:
    import argparse

    return argparse.ArgumentTypeError(message)


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise _type_error(f"{value!r} is not an integer") from exc
    if number < 1:
        raise _type_error(f"{value!r} must be >= 1")
    return number


def cube_size(value: str) -> int:
    number = positive_int(value)
    if number % 14:
        raise _type_error(f"{number} is not a multiple of the patch size 14 (e.g. 112, 224)")
    return number


def fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise _type_error(f"{value!r} is not a number") from exc
    if not 0.0 < number <= 1.0:
        raise _type_error(f"{value!r} must be in (0, 1]")
    return number


def probability(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise _type_error(f"{value!r} is not a number") from exc
    if not 0.0 < number < 1.0:
        raise _type_error(f"{value!r} must be in (0, 1)")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise _type_error(f"{value!r} is not a number") from exc
    if not number > 0:
        raise _type_error(f"{value!r} must be > 0")
    return number


def seconds(value: str) -> float:
    """A duration in seconds, >= 0 (``inf`` allowed)."""
    try:
        number = float(value)
    except ValueError as exc:
        raise _type_error(f"{value!r} is not a number of seconds") from exc
    if not number >= 0:
        raise _type_error(f"{value!r} must be >= 0")
    return number


def existing_file(value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise _type_error(f"file does not exist: {path}")
    return path


def existing_dir(value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.exists():
        raise _type_error(f"Path does not exist: <{path}>")
    return path


def absolute_path(value: str) -> Path:
    return Path(value).expanduser().absolute()


def device(value: str) -> str:
    import re

    if not (value == "cpu" or re.fullmatch(r"cuda(:\d+)?", value)):
        raise _type_error(f"{value!r}: use cuda, cuda:N or cpu")
    return value


def memory_gb(value: str) -> float:
    """Memory as ``16G``, ``16000M`` or a plain number of MB (fMRIPrep's ``_to_gb``)."""
    import re

    match = re.fullmatch(r"\s*([0-9.]+)\s*([GgMmTt]?)[Bb]?\s*", value)
    if not match:
        raise _type_error(f"cannot read memory size {value!r} (use e.g. 16G or 16000M)")
    number, unit = float(match.group(1)), match.group(2).upper() or "M"
    return {"M": number / 1000.0, "G": number, "T": number * 1000.0}[unit]


def derivative(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (name = folder name), as fMRIPrep's ``--derivatives``."""
    import re

    name, sep, path = value.partition("=")
    if not sep:
        path, name = name, Path(name).name
    if not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise _type_error(f"bad derivatives name in {value!r}; use NAME=PATH")
    return name, Path(path).expanduser().absolute()


def _encoder_names() -> tuple[str, ...]:
    from .core.models.registry import all_encoder_names

    return tuple(all_encoder_names())


# ------------------------------------------------------------------------------------------------
SELECT = "Selecting the data"
METHOD = "Method (defaults reproduce the CoDeGraph3D paper)"
PERFORMANCE = "Performance"
WORKFLOW = "Work directory, configuration and logging"
MODALITIES = ("T1w", "T2w", "FLAIR")
MASK_SOURCES = ("derivatives", "nonzero", "skullstrip")
LEVELS = ("participant", "group")


@dataclass(frozen=True)
class InputSettings:
    """Which data: the BIDS-App positionals, the selection of subjects/sessions/files and masks."""

    bids_dir: Path = setting(
        Path("."), flags=(), kind="positional", parse=existing_dir, group=SELECT,
        help="the input BIDS dataset (read only)", bosh_id="InputDataset", bosh_name="Input BIDS dataset",
    )
    output_dir: Path = setting(
        Path("."), flags=(), kind="positional", parse=absolute_path, group=SELECT,
        help="the output derivatives dataset (suggestion: <bids_dir>/derivatives/cg3d)",
        bosh_id="OutputLocation", bosh_name="Output derivatives folder",
    )
    analysis_level: str = setting(
        "group", flags=(), kind="positional", group=SELECT,
        help="participant: preprocessing and 3D tokens of the selected subjects, cached in the work "
        "dir (safe to run in parallel); group: whatever is still missing, then batch scoring and all "
        "outputs", bosh_id="AnalysisLevel", bosh_name="Analysis level", choices=LEVELS,
    )
    participant_label: tuple[str, ...] | None = setting(
        flags=("--participant-label", "--participant_label"), nargs="+", metavar="LABEL", group=SELECT,
        help="subjects to process, with or without 'sub-', or a file with one label per line ('#' "
        "starts a comment) (default: all subjects)", bosh_id="SubjectLabel", bosh_name="Participant labels",
    )
    session_label: tuple[str, ...] | None = setting(
        flags=("--session-label", "--session_label", "--session-id"), nargs="+", metavar="LABEL",
        group=SELECT, help="sessions to process, with or without 'ses-', or a file (default: all "
        "sessions; images without a session are kept)", bosh_id="SessionLabel", bosh_name="Session labels",
    )
    bids_filter_file: Path | None = setting(
        flags=("--bids-filter-file", "--bids_filter_file"), parse=existing_file, metavar="FILE",
        group=SELECT, help='JSON of pybids filters per modality, e.g. {"t2w": {"acquisition": "axial"}}; '
        'null means "entity absent", "*" means "any value" (as in fMRIPrep)',
        bosh_id="BidsFilterFile", bosh_name="BIDS filter file", bosh_type="File",
    )
    #: the content of ``bids_filter_file`` (read once, when the run starts; JSON text in TOML,
    #: where its nulls, "entity absent", have no spelling)
    bids_filters: dict[str, Any] | None = None
    modality: tuple[str, ...] = setting(
        ("T1w", "T2w"), flags=("--modality", "--modalities", "-m"), nargs="+", choices=MODALITIES,
        group=SELECT, help="modalities to score; images are only compared with images of the same "
        "modality (one batch each, or --batch-size chunks) [paper: T1w and T2w]",
        bosh_id="Modality", bosh_name="Modalities",
    )
    derivatives: dict[str, Path] = setting(
        factory=dict, flags=("-d", "--derivatives"), nargs="+", parse=derivative, metavar="NAME=PATH",
        group=SELECT, help="derivatives datasets in which brain masks are searched (e.g. "
        "smriprep=/data/deriv/smriprep)", bosh_id="Derivatives", bosh_name="Mask derivatives",
    )
    mask_source: str = setting(
        "derivatives", flags=("--mask-source",), choices=MASK_SOURCES, group=SELECT, affects=Affects.CUBE,
        help="where brain masks come from: 'derivatives' (desc-<mask-desc>_mask from -d), 'nonzero' "
        "(inputs already skull-stripped), 'skullstrip' (deepbet, CPU, offline)",
        bosh_id="MaskSource", bosh_name="Brain mask source",
    )
    mask_desc: str = setting(
        "brain", flags=("--mask-desc",), group=SELECT,
        help="desc entity of the brain masks in the derivatives [fMRIPrep/sMRIPrep naming]",
        bosh_id="MaskDesc", bosh_name="Brain mask desc entity",
    )
    skip_bids_validation: bool = setting(
        False, flags=("--skip-bids-validation", "--skip_bids_validation", "--skip_bids_validator"),
        kind="flag", group=SELECT, help="do not validate the input dataset with bids-validator",
        bosh_id="SkipBidsValidation", bosh_name="Skip BIDS validation",
    )
    bids_database_dir: Path | None = setting(
        flags=("--bids-database-dir",), parse=absolute_path, metavar="PATH", group=SELECT,
        help="reuse or create a pybids SQLite index here (default: <work-dir>/bids_db)",
        bosh_id="BidsDatabaseDir", bosh_name="pybids database folder",
    )
    reset_bids_db: bool = setting(
        False, flags=("--reset-bids-db", "--reset_bids_db"), kind="flag", group=SELECT,
        help="re-index the input dataset even when an index of the same tree exists (the index is "
        "keyed by the sub-/ses-/anat folders' names and modification times)",
        bosh_id="ResetBidsDb", bosh_name="Reset the pybids index",
    )
    reference: Path | None = setting(
        flags=("--reference",), parse=absolute_path, metavar="BANK", group=SELECT,
        help="participant level: score each selected image against a saved reference cohort (a bank "
        "written by group --save-reference) instead of a batch, so that one new scan is scored now; it "
        "is prepared with the bank's Nyul landmarks and token settings, and probseg is calibrated with "
        "the bank's statistics (docs/reference.md)", bosh_id="Reference", bosh_name="Reference cohort (bank)",
    )


@dataclass(frozen=True)
class MethodSettings:
    """Everything that changes a result. Defaults reproduce the CoDeGraph3D paper."""

    encoder: str = setting(
        "dinov2_vitl14", flags=("--encoder",), choices=_encoder_names(), group=METHOD,
        affects=Affects.TOKENS,
        help="frozen 2D ViT; test-tiny-vit has random weights and is for tests only [paper: DINOv2-L/14]",
        bosh_id="Encoder", bosh_name="Encoder",
    )
    weights: Path | None = setting(
        flags=("--weights",), parse=existing_file, metavar="FILE", group=METHOD,
        help="encoder weights (.safetensors or .pth, timm or original layout) (default: the weights "
        "baked into the container ($CG3D_WEIGHTS_DIR), then the Hugging Face hub cache)",
        bosh_id="Weights", bosh_name="Encoder weights file", bosh_type="File",
    )
    allow_download: bool = setting(
        False, flags=("--allow-download",), kind="flag", group=METHOD,
        help="allow downloading encoder weights from the Hugging Face hub (default: offline)",
        bosh_id="AllowDownload", bosh_name="Allow weight download",
    )
    cube_size: int = setting(
        224, flags=("--cube-size",), parse=cube_size, group=METHOD, affects=Affects.CUBE,
        help="cube edge H in voxels, a multiple of the patch size 14 [paper: 224]",
        bosh_id="CubeSize", bosh_name="Cube size", integer=True, minimum=14,
    )
    fov_mm: float = setting(
        156.0, flags=("--fov-mm",), parse=positive_float, group=METHOD, affects=Affects.CUBE,
        help="cube field of view in mm, centred on the brain mask [paper: 156 mm crop]",
        bosh_id="FovMm", bosh_name="Cube field of view (mm)", minimum=0, exclusive_minimum=True,
    )
    layers: tuple[int, ...] | None = setting(
        flags=("--layers",), parse=positive_int, nargs="+", group=METHOD, affects=Affects.TOKENS,
        help="1-based ViT blocks whose tokens are scored (default: the encoder's [paper: 6 12 18 24 "
        "for ViT-L; 3 6 9 12 for 12-block models])", bosh_id="Layers", bosh_name="ViT layers",
        integer=True, minimum=1,
    )
    projection_dim: int = setting(
        128, flags=("--projection-dim",), parse=positive_int, group=METHOD, affects=Affects.TOKENS,
        help="random projection size k per axis; tokens have 3k dims [paper: 128]",
        bosh_id="ProjectionDim", bosh_name="Projection size", integer=True, minimum=1,
    )
    random_seed: int = setting(
        0, flags=("--random-seed", "--seed"), parse=int, group=METHOD, affects=Affects.TOKENS,
        help="seed of the random projection and of community detection [method.md]",
        bosh_id="RandomSeed", bosh_name="Random seed", integer=True,
    )
    fraction: float = setting(
        0.3, flags=("--fraction", "--interval-fraction"), parse=fraction, group=METHOD,
        affects=Affects.SCORES,
        help="MuSc's K = floor(fraction * (B - 1)) nearest images averaged [MuSc code: 0.3]",
        bosh_id="Fraction", bosh_name="MuSc interval fraction", minimum=0, maximum=1, exclusive_minimum=True,
    )
    codegraph: bool = setting(
        True, flags=("--no-codegraph",), kind="no-flag", group=METHOD, affects=Affects.SCORES,
        help="plain MuSc scoring, without the consistent-anomaly (CoDeGraph) stage [paper: the stage is on]",
        bosh_id="NoCodegraph", bosh_name="Disable CoDeGraph", default_text="off (the stage runs)",
    )
    codegraph_pvalue: float | None = setting(
        flags=("--codegraph-pvalue",), parse=probability, group=METHOD, affects=Affects.SCORES,
        help="tail probability below which a token's neighbour burnout is suspicious (default: "
        "CodeGraphSettings.pvalue, 1e-3, see docs/method.md §4)", bosh_id="CodegraphPvalue",
        bosh_name="CoDeGraph p-value", minimum=0, maximum=1, exclusive_minimum=True, exclusive_maximum=True,
    )
    codegraph_resolution: float | None = setting(
        flags=("--codegraph-resolution",), parse=positive_float, group=METHOD, affects=Affects.SCORES,
        help="Leiden CPM resolution gamma (default: CodeGraphSettings.resolution, 0.5, see "
        "docs/method.md §4)", bosh_id="CodegraphResolution", bosh_name="CoDeGraph resolution",
        minimum=0, exclusive_minimum=True,
    )
    threshold: float = setting(
        0.5, flags=("--threshold",), parse=probability, group=METHOD, affects=Affects.OUTPUTS,
        help="probseg threshold of the binary anomaly mask [method.md §5]",
        bosh_id="Threshold", bosh_name="Mask threshold", minimum=0, maximum=1, exclusive_minimum=True,
        exclusive_maximum=True,
    )
    batch_size: int | None = setting(
        flags=("--batch-size",), parse=positive_int, group=METHOD, affects=Affects.SCORES, metavar="B",
        help="score each modality in random non-overlapping chunks of at most B images (seeded by "
        "--random-seed; an image keeps its chunk when images are added) [paper Table 5: B >= 30 keeps "
        "accuracy] (default: one batch of every image; when scoring it would not fit in memory the run "
        "stops before scoring with exit 75, naming a batch size or shard count that fits)",
        bosh_id="BatchSize", bosh_name="Scoring batch size", integer=True, minimum=1,
    )
    #: probseg = logistic(z - z_center), z = robust z-score of the raw map against the batch's
    #: brain-token scores (median, 1.4826 MAD): 0.5 at three robust SDs above the batch [method.md §5]
    z_center: float = 3.0


@dataclass(frozen=True)
class ExecutionSettings:
    """How results are computed: none of these changes a result."""

    device: str = setting(
        "cuda", flags=("--device",), parse=device, group=PERFORMANCE,
        help="cuda, cuda:N or cpu; with cuda and no GPU visible cg3d stops at once (exit 69) "
        "[a GPU is the intended hardware]", bosh_id="Device", bosh_name="Device",
    )
    precision: str = setting(
        "auto", flags=("--precision",), choices=("auto", "fp32", "bf16"), group=PERFORMANCE,
        affects=Affects.TOKENS,
        help="encoder precision: auto = bf16 autocast on a GPU that supports it, fp32 elsewhere (bf16 "
        "on a CPU with bf16 instructions encodes about 2x faster: benchmarks/bench_encoder.py); "
        "distances are always fp32", bosh_id="Precision", bosh_name="Encoder precision",
    )
    slice_batch: int = setting(
        128, flags=("--slice-batch",), parse=positive_int, group=PERFORMANCE,
        help="slices per encoder forward pass (lower it if the GPU runs out of memory)",
        bosh_id="SliceBatch", bosh_name="Slice batch", integer=True, minimum=1,
    )
    score_chunk_mb: int = setting(
        256, flags=("--score-chunk-mb",), parse=positive_int, group=PERFORMANCE,
        help="memory of the pairwise-distance tiles of scoring, all threads together, in MB (give every "
        "shard of a batch the same value: the tile shape decides the last bits of the scores)",
        bosh_id="ScoreChunkMb", bosh_name="Scoring block memory (MB)", integer=True, minimum=1,
    )
    nprocs: int | None = setting(
        flags=("--nprocs", "--nthreads", "--n_cpus", "--n-cpus"), parse=positive_int, group=PERFORMANCE,
        help="processes for nipype MultiProc (default: the CPUs this process may use)",
        bosh_id="Nprocs", bosh_name="Processes", integer=True, minimum=1,
    )
    omp_nthreads: int | None = setting(
        flags=("--omp-nthreads",), parse=positive_int, group=PERFORMANCE,
        help="threads per process (torch, BLAS) (default: usable CPUs / nprocs)",
        bosh_id="OmpNthreads", bosh_name="Threads per process", integer=True, minimum=1,
    )
    mem_gb: float | None = setting(
        flags=("--mem", "--mem-mb", "--mem_mb"), parse=memory_gb, metavar="MEM", group=PERFORMANCE,
        help="memory limit of the run: 16G, 16000M or a number of MB; nipype's scheduler and the memory "
        "check before scoring keep within it (default: what the cgroup, SLURM and the machine allow)",
        bosh_id="Mem", bosh_name="Memory limit", bosh_type="String",
    )
    stage: str = setting(
        "all", flags=("--stage",), choices=("all", "score", "graph", "rescore", "outputs"), group=PERFORMANCE,
        help="group level in resumable steps for a cluster (each a separate call on a shared work dir): "
        "score --shard i/n, graph, rescore --shard i/n, outputs; 'all' runs them in one process (cg3d "
        "slurm-script writes the job chain)", bosh_id="Stage", bosh_name="Group step",
    )
    shard: str | None = setting(
        flags=("--shard",), metavar="I/N", group=PERFORMANCE,
        help="with --stage score or rescore: compute the rows of the i-th of n slices of each batch's "
        "images (1-based); n shards give byte-identical outputs to one", bosh_id="Shard", bosh_name="Shard",
    )
    use_plugin: Path | None = setting(
        flags=("--use-plugin",), parse=existing_file, metavar="FILE", group=PERFORMANCE,
        help="nipype plugin YAML, e.g. {plugin: SLURM, plugin_args: {...}} (default: MultiProc)",
        bosh_id="UsePlugin", bosh_name="nipype plugin file", bosh_type="File",
    )
    work_dir: Path = setting(
        Path("work"), flags=("-w", "--work-dir"), parse=absolute_path, group=WORKFLOW,
        help="intermediate results (preprocessing statistics, tokens, scores); a rerun resumes from "
        "it; relative to the current folder [fMRIPrep]", bosh_id="WorkDir", bosh_name="Work directory",
    )
    clean_workdir: bool = setting(
        False, flags=("--clean-workdir",), kind="flag", group=WORKFLOW,
        help="remove the work directory first (not with concurrent runs)",
        bosh_id="CleanWorkdir", bosh_name="Clean work directory",
    )
    stop_on_first_crash: bool = setting(
        False, flags=("--stop-on-first-crash",), kind="flag", group=WORKFLOW,
        help="stop at the first image whose outputs cannot be written instead of reporting it and "
        "going on (bad input data always stops the run, unless --skip-bad-images)",
        bosh_id="StopOnFirstCrash", bosh_name="Stop on first crash",
    )
    skip_bad_images: bool = setting(
        False, flags=("--skip-bad-images",), kind="flag", group=WORKFLOW,
        help="leave images whose data cannot be used (corrupt, truncated, 4D, NaN/Inf, constant, empty or "
        "unmappable mask) out of the batch instead of stopping with exit 65: they are listed as "
        "'skipped' with the reason in group_<mod>.tsv and the reports, the others are scored, and "
        "the exit code is 1", bosh_id="SkipBadImages", bosh_name="Skip bad images",
    )
    reassign_batches: bool = setting(
        False, flags=("--reassign-batches",), kind="flag", group=WORKFLOW,
        help="deal the images into --batch-size chunks anew instead of keeping every image in the chunk "
        "an earlier run put it in (kept in the work directory)",
        bosh_id="ReassignBatches", bosh_name="Reassign scoring batches",
    )
    notrack: bool = setting(
        False, flags=("--notrack",), kind="flag", group=WORKFLOW,
        help="accepted for nipreps compatibility; cg3d sends nothing", bosh_id="Notrack", bosh_name="No tracking",
    )
    verbose: int = setting(
        0, flags=("-v", "--verbose"), kind="count", group=WORKFLOW, help="more log output (-vv for debug)",
        bosh_id="Verbose", bosh_name="Verbose", default_text="—",
    )
    save_reference: Path | None = setting(
        flags=("--save-reference",), parse=absolute_path, metavar="BANK", group=WORKFLOW,
        help="group level: also save the scored batch as a reference cohort in the folder BANK (valid "
        "tokens, Nyul landmarks, token settings, score statistics; an existing bank there is replaced) "
        "to score new scans against it later with participant --reference (docs/reference.md)",
        bosh_id="SaveReference", bosh_name="Save a reference cohort (bank)",
    )
    lock_wait: float = setting(
        0.0, flags=("--lock-wait",), parse=seconds, metavar="SECONDS", group=WORKFLOW,
        help="when another cg3d run holds the output folder (or, for the group level, the work dir), "
        "wait up to this many seconds for it ('inf': as long as it takes) instead of stopping at once "
        "with exit 75 and a message naming it (default: 0, stop at once)",
        bosh_id="LockWait", bosh_name="Wait for a busy output folder (s)", minimum=0,
    )
    remove_stale_outputs: bool = setting(
        False, flags=("--remove-stale-outputs",), kind="flag", group=WORKFLOW,
        help="group level: delete the outputs (maps, sidecars, figures, subject reports) of images "
        "that are not part of this run's batch, e.g. left by an earlier run on a larger cohort "
        "(default: keep them, warn, and list them as 'stale' in group_<mod>.tsv)",
        bosh_id="RemoveStaleOutputs", bosh_name="Remove stale outputs",
    )


@dataclass(frozen=True)
class RunInfo:
    """Facts fixed when the run starts (none of them is a command-line option)."""

    run_id: str = ""
    version: str = __version__
    command: str = ""
    #: encoder weights actually used (sha256 of the file; None for the random test encoder)
    weights_sha256: str | None = None
    weights_source: str | None = None
    is_test_encoder: bool = False
    timm_name: str | None = None
    #: ``--precision`` resolved once for the device (``auto`` -> bf16 on a bf16-capable GPU, else fp32)
    precision: str = ""
    #: ``--layers`` resolved once (the encoder's defaults when not given)
    layers: tuple[int, ...] = ()
    #: ``--reference``: checksum of the bank (``sha256:<hex>``) and its images per modality
    reference_checksum: str | None = None
    reference_sizes: dict[str, int] = field(default_factory=dict)


SECTIONS: dict[str, type] = {
    "inputs": InputSettings, "method": MethodSettings, "execution": ExecutionSettings, "run": RunInfo,
}


@dataclass(frozen=True)
class Settings:
    """All settings of one run (see the module docstring)."""

    inputs: InputSettings = field(default_factory=InputSettings)
    method: MethodSettings = field(default_factory=MethodSettings)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    run: RunInfo = field(default_factory=RunInfo)

    # -- convenience ---------------------------------------------------------------------------
    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with fields of sections replaced: ``settings.replace(run={"run_id": "x"})``."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed)

    @property
    def codegraph_settings(self):
        """The :class:`~cg3d_bids.core.scoring.CodeGraphSettings` of this run (None when disabled)."""
        from .core.scoring import CodeGraphSettings

        if not self.method.codegraph:
            return None
        overrides: dict[str, Any] = {"seed": self.method.random_seed}
        if self.method.codegraph_pvalue is not None:
            overrides["pvalue"] = self.method.codegraph_pvalue
        if self.method.codegraph_resolution is not None:
            overrides["resolution"] = self.method.codegraph_resolution
        return CodeGraphSettings(**overrides)

    # -- cache keys ------------------------------------------------------------------------------
    def key_values(self, level: Affects) -> dict[str, Any]:
        """Every setting that changes results up to ``level`` (effective values: run info wins)."""
        values: dict[str, Any] = {}
        for section, spec in iter_options(self):
            if spec.affects != Affects.NOTHING and spec.affects <= level:
                values[spec.name] = getattr(getattr(self, section), spec.name)
        if level >= Affects.TOKENS:  # effective values, resolved once when the run starts
            values["precision"] = self.run.precision
            values["layers"] = list(self.run.layers)
            values["weights_sha256"] = self.run.weights_sha256
        values["cg3d_version"] = self.run.version
        return values

    def key(self, level: Affects, *extra: Any) -> str:
        """Short stable hash of :meth:`key_values` and ``extra`` (upstream keys, file hashes)."""
        return short_hash(self.key_values(level), *extra)

    # -- provenance ------------------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """Method settings and run facts, flat, for sidecars, tables, reports and citations.

        The same computation gives the same provenance: nothing here depends on paths, the run
        id or the command line except the keys listed in :data:`RUN_SPECIFIC`.
        """
        method = {f.name: _plain(getattr(self.method, f.name)) for f in dataclasses.fields(self.method)}
        method["layers"] = list(self.run.layers) or method["layers"]
        codegraph = self.codegraph_settings
        reference = {} if self.inputs.reference is None else {
            "reference_bank": str(self.inputs.reference), "reference_checksum": self.run.reference_checksum,
            "reference_images": dict(self.run.reference_sizes),
        }
        return {
            "version": self.run.version, "encoder": self.method.encoder, "timm_name": self.run.timm_name,
            "weights_sha256": self.run.weights_sha256, "weights_source": self.run.weights_source,
            "is_test_encoder": self.run.is_test_encoder, "seed": self.method.random_seed,
            "cube_size": method["cube_size"], "fov_mm": method["fov_mm"], "layers": method["layers"],
            "fraction": method["fraction"], "projection_dim": method["projection_dim"],
            "codegraph": method["codegraph"],
            "codegraph_pvalue": codegraph.pvalue if codegraph else None,
            "codegraph_resolution": codegraph.resolution if codegraph else None,
            "device": self.execution.device, "precision": self.run.precision,
            "threshold": method["threshold"], "z_center": method["z_center"],
            "config_hash": self.key(Affects.OUTPUTS), "run_id": self.run.run_id, "command": self.run.command,
            **reference,
        }

    # -- TOML codec ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: plain value}}``, None values left out."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            values = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
            for key in JSON_FIELDS & set(values):
                if values[key] is not None:
                    values[key] = json.dumps(values[key], sort_keys=True)
            out[name] = {k: v for k, v in values.items() if v is not None}
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> Settings:
        """Inverse of :meth:`to_dict`; unknown sections or keys are a :class:`ValueError`."""
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown settings section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = dict(data.get(name, {}))
            hints = typing.get_type_hints(section_cls)
            names = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - names
            if bad:
                raise ValueError(f"unknown setting(s) {sorted(bad)} in section [{name}]")
            for key in JSON_FIELDS & set(values):
                values[key] = json.loads(values[key]) if isinstance(values[key], str) else values[key]
            sections[name] = section_cls(**{k: decode(hints[k], v) for k, v in values.items()})
        return cls(**sections)

    @classmethod
    def from_toml(cls, text: str) -> Settings:
        return cls.from_dict(tomllib.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Settings:
        return cls.from_toml(Path(path).read_text(encoding="utf-8"))


#: Fields stored as JSON text in TOML (they hold nulls).
JSON_FIELDS = frozenset({"bids_filters"})
#: Provenance keys that differ between runs of the same computation.
RUN_SPECIFIC = frozenset({"run_id", "command", "weights_source"})


@dataclass(frozen=True)
class OptionSpec:
    """A declared setting: its field name, type, default and :class:`Option`."""

    name: str
    section: str
    type: Any
    default: Any
    option: Option

    @property
    def affects(self) -> Affects:
        return self.option.affects


def iter_options(settings: Settings | None = None) -> Iterator[tuple[str, OptionSpec]]:
    """``(section, spec)`` of every setting that has an :class:`Option`, in declaration order."""
    for section, section_cls in SECTIONS.items():
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            option = f.metadata.get("option")
            if option is None:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            yield section, OptionSpec(f.name, section, hints[f.name], default, option)


# ------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
