#!/usr/bin/env python3
"""End-to-end speed of ``cg3d ... group`` on an N-subject T1w cohort built from real 1 mm MRI.

The cohort is a valid BIDS dataset (``cohort/bids``) with a derivatives dataset of brain masks
(``cohort/bids/derivatives/masks``). Each subject is a seeded variant of one of the real
skull-stripped 1 mm T1w volumes of the data folder's ``manifest.tsv`` that have a brain mask on
their grid (role ``image_skullstripped``, a ``T1w`` name, voxel ``1x1x1``, exactly one
``brainmask`` of the same shape in the same folder); sources are used in turn. A variant:

* intensities normalised so that the source's brain 99th percentile is 1000, then scaled by a
  random factor in [0.8, 1.25] (log-uniform);
* shifted by a random whole number of voxels (at most ``--max-shift``) along each axis, zero
  filled, affine unchanged: the anatomy moves by a few mm in world space;
* flipped along random array axes **with the affine updated, so the anatomy is unchanged in world
  space** (only the storage order changes: LAS, RPI, ... instead of the source's);
* Gaussian noise (sd 1 to 3 % of 1000) added inside the brain mask; stored as int16.

Subject ``i`` depends only on the seed and ``i`` (not on N), and files are written with a fixed
gzip header, so a cohort is byte-identical for the same seed. ``participants.tsv`` lists each
subject's source and variant.

Then it runs ``python -m cg3d_bids BIDS OUT group --modality T1w -d masks=... --skip-bids-validation``
as a subprocess on fresh output and work folders, measures its wall time and the CPU time of its
whole process tree, and prints Markdown tables of the per-stage timings the run writes
(``OUT/logs/timings-<run_id>.tsv``). Examples::

    python benchmarks/bench_e2e.py --n 10 --cube 224 --encoder test-tiny-vit --device cpu --nprocs 2
    python benchmarks/bench_e2e.py --n 180 --encoder dinov2_vitl14 --device cuda --nprocs 16 \\
        --out-dir /tmp/bench --reuse          # random weights of the real architecture
    python benchmarks/bench_e2e.py --build-only --n 180 --out-dir /tmp/bench
    python benchmarks/bench_e2e.py --make-weights /tmp/vitl14.safetensors --encoder dinov2_vitl14

With a real encoder and no ``--weights`` it creates random weights of that architecture (timm,
``pretrained=False``, LayerScale ``init_values=1.0``, ``img_size`` = cube; speed does not depend on
the values). ``--smi-log`` (an ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used
--format=csv`` log) adds GPU utilisation during tokenize and peak VRAM; ``--targets h200`` checks
the H200 targets (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
BIDS_VERSION = "1.10.0"
REFERENCE = 1000.0          #: brain 99th percentile after normalisation
SCALE_RANGE = (0.8, 1.25)   #: intensity scale factor (log-uniform)
NOISE_RANGE = (0.01, 0.03)  #: noise sd as a fraction of REFERENCE
TEST_ENCODERS = ("test-tiny-vit", "test-tiny-vit-noprefix")
TIMINGS_HEADER = ("stage", "modality", "images", "wall_s", "cpu_s", "start_s", "end_s")
STAGE_ORDER = ("discover", "prepare", "landmarks", "tokenize", "encode", "score", "outputs", "reports")
NESTED = {"encode": "tokenize"}  #: stages measured inside another one (not added to the share)
H200_TARGETS = {"total_wall_s": 60.0, "tokenize_s_per_volume": 0.3, "gpu_busy_pct": 80.0, "peak_vram_gb": 10.0}


# ------------------------------------------------------------------------------------------------
# sources: the real volumes of the manifest
@dataclass(frozen=True)
class Source:
    """A real skull-stripped image and the brain mask on its grid."""

    name: str    #: manifest path of the image, e.g. ``open_ms_data/patient07/T1w.nii.gz``
    image: Path
    mask: Path


def read_manifest(data_dir: Path) -> list[dict[str, str]]:
    """Rows of ``data_dir/manifest.tsv`` (tab-separated, with a header)."""
    with open(data_dir / "manifest.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _is_contrast(name: str, contrast: str) -> bool:
    return name == contrast or name.endswith("_" + contrast)


def select_sources(data_dir: Path, voxel_mm: str = "1x1x1", contrast: str = "T1w") -> list[Source]:
    """Skull-stripped ``contrast`` images at ``voxel_mm`` with exactly one brain mask of the same
    shape in the same folder, sorted by path."""
    rows = read_manifest(data_dir)
    masks: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if row["role"] == "brainmask":
            masks.setdefault((str(Path(row["path"]).parent), row["shape"]), []).append(row["path"])
    sources = []
    for row in rows:
        if row["role"] != "image_skullstripped" or row["voxel_mm"] != voxel_mm:
            continue
        found = masks.get((str(Path(row["path"]).parent), row["shape"]), [])
        if _is_contrast(row["name"], contrast) and len(found) == 1:
            sources.append(Source(row["path"], data_dir / row["path"], data_dir / found[0]))
    return sorted(sources, key=lambda s: s.name)


@cache
def load_source(source: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image normalised to REFERENCE, float32; brain mask, bool; affine) of a source."""
    import nibabel as nib

    image, mask = nib.load(str(source.image)), nib.load(str(source.mask))
    if image.shape != mask.shape or not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise ValueError(f"{source.name}: the brain mask is not on the image grid")
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = np.asarray(mask.dataobj) > 0
    data *= np.float32(REFERENCE / np.percentile(data[brain], 99))
    return data, brain, image.affine


# ------------------------------------------------------------------------------------------------
# variants
@dataclass(frozen=True)
class Variant:
    """What one subject changes in its source."""

    flips: tuple[bool, bool, bool]
    shift: tuple[int, int, int]
    scale: float
    noise_sd: float  #: fraction of REFERENCE


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of subject ``index`` (independent of the cohort size)."""
    return np.random.default_rng([seed, index])


def draw_variant(rng: np.random.Generator, max_shift: int) -> Variant:
    """Random flips, shift, scale and noise level."""
    flips = tuple(bool(v) for v in rng.random(3) < 0.5)
    shift = tuple(int(v) for v in rng.integers(-max_shift, max_shift + 1, 3))
    scale = float(math.exp(rng.uniform(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1]))))
    return Variant(flips, shift, scale, float(rng.uniform(*NOISE_RANGE)))  # type: ignore[arg-type]


def shift_array(data: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """``data`` moved by whole voxels (``out[i + s] = data[i]``), zero filled."""
    out = np.zeros_like(data)
    dst, src = [], []
    for s, n in zip(shift, data.shape, strict=True):
        s = max(-n, min(n, int(s)))
        dst.append(slice(max(s, 0), n + min(s, 0)))
        src.append(slice(max(-s, 0), n - max(s, 0)))
    out[tuple(dst)] = data[tuple(src)]
    return out


def flip_affine(affine: np.ndarray, shape: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """Affine of the array flipped along ``flips`` that keeps every voxel's world position."""
    index_map = np.eye(4)
    for axis, flip in enumerate(flips):
        if flip:
            index_map[axis, axis] = -1.0
            index_map[axis, 3] = shape[axis] - 1
    return affine @ index_map


def apply_variant(
    data: np.ndarray, brain: np.ndarray, affine: np.ndarray, variant: Variant, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 image, uint8 mask, affine) of one subject."""
    image = shift_array(data, variant.shift) * np.float32(variant.scale)
    mask = shift_array(brain, variant.shift)
    noise = rng.standard_normal(int(mask.sum()), dtype=np.float32)
    image[mask] += np.float32(variant.noise_sd * REFERENCE) * noise
    axes = tuple(axis for axis, flip in enumerate(variant.flips) if flip)
    image, mask = np.flip(image, axes), np.flip(mask, axes)
    image = np.clip(np.rint(image), -32768, 32767).astype(np.int16)
    return image, mask.astype(np.uint8), flip_affine(affine, data.shape, variant.flips)


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray, level: int) -> bytes:
    """A .nii.gz file's bytes: scanner-coded q/sform, mm units, gzip header without a time stamp."""
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=level, mtime=0)


# ------------------------------------------------------------------------------------------------
# the cohort
@dataclass(frozen=True)
class CohortSpec:
    """Everything a cohort's content depends on."""

    n: int
    seed: int
    sources: tuple[Source, ...]
    max_shift: int = 4
    gzip_level: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "sources": [s.name for s in self.sources],
                "max_shift": self.max_shift, "gzip_level": self.gzip_level}


def subject_label(index: int, n: int) -> str:
    """``001``, ``002``, ... (at least three digits)."""
    return f"{index + 1:0{max(3, len(str(n)))}d}"


def cohort_paths(dest: Path) -> dict[str, Path]:
    bids = dest / "bids"
    return {"bids": bids, "masks": bids / "derivatives" / "masks", "spec": dest / "cohort.json"}


def build_subject(args: tuple[CohortSpec, int, str]) -> dict[str, str]:
    """Write subject ``index`` (image and mask); return its participants.tsv row."""
    spec, index, dest = args
    paths = cohort_paths(Path(dest))
    source = spec.sources[index % len(spec.sources)]
    rng = subject_rng(spec.seed, index)
    variant = draw_variant(rng, spec.max_shift)
    image, mask, affine = apply_variant(*load_source(source), variant, rng)
    label = f"sub-{subject_label(index, spec.n)}"
    for root, suffix, data in ((paths["bids"], "T1w", image), (paths["masks"], "desc-brain_mask", mask)):
        out = root / label / "anat" / f"{label}_{suffix}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(nifti_gz_bytes(data, affine, spec.gzip_level))
    return {"participant_id": label, "source": source.name,
            "flips": "".join("xyz"[a] for a in range(3) if variant.flips[a]) or "none",
            "shift": ",".join(str(v) for v in variant.shift),
            "scale": f"{variant.scale:.4f}", "noise_sd": f"{variant.noise_sd * REFERENCE:.2f}"}


PARTICIPANTS_JSON = {
    "participant_id": {"Description": "Participant identifier"},
    "source": {"Description": "real skull-stripped 1 mm T1w volume this subject is a variant of "
                              "(path in the data folder's manifest.tsv)"},
    "flips": {"Description": "array axes flipped, affine updated so the anatomy is unchanged in world space"},
    "shift": {"Description": "whole-voxel shift along the array axes (zero filled, affine unchanged)"},
    "scale": {"Description": "intensity scale factor after normalising the brain 99th percentile to 1000"},
    "noise_sd": {"Description": "sd of the Gaussian noise added inside the brain mask"},
}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_metadata(spec: CohortSpec, dest: Path, rows: list[dict[str, str]]) -> None:
    """dataset_description.json, README, participants.tsv/.json and the masks' description."""
    paths = cohort_paths(dest)
    _write_json(paths["bids"] / "dataset_description.json", {
        "Name": f"cg3d speed benchmark: {spec.n} T1w variants of real 1 mm MRI (seed {spec.seed})",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "License": "mixed: see the sources' licences",
        "Authors": ["cg3d benchmarks/bench_e2e.py"],
        "GeneratedBy": [{"Name": "cg3d benchmarks/bench_e2e.py",
                         "Description": "seeded variants (flip, shift, scale, noise) of public MRI"}],
    })
    (paths["bids"] / "README").write_text(
        "Speed-benchmark cohort written by cg3d's benchmarks/bench_e2e.py: each subject is a seeded "
        "variant of a real public skull-stripped T1w volume (participants.tsv lists which).\n")
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(row[c] for c in columns) for row in rows]
    (paths["bids"] / "participants.tsv").write_text("\n".join(lines) + "\n")
    _write_json(paths["bids"] / "participants.json", PARTICIPANTS_JSON)
    _write_json(paths["masks"] / "dataset_description.json", {
        "Name": "cg3d speed benchmark brain masks", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "cg3d benchmarks/bench_e2e.py",
                         "Description": "the sources' brain masks, shifted and flipped with their images"}],
        "SourceDatasets": [{"URL": "../.."}],
    })
    (paths["masks"] / "README").write_text("Brain masks of the benchmark cohort in ../.. (one per subject).\n")


def build_cohort(spec: CohortSpec, dest: Path, procs: int = 1) -> Path:
    """Write the cohort into ``dest`` (replacing one there); return the BIDS folder."""
    if not spec.sources:
        raise ValueError("no source volumes: check the data folder and its manifest.tsv")
    paths = cohort_paths(dest)
    shutil.rmtree(paths["bids"], ignore_errors=True)
    paths["spec"].unlink(missing_ok=True)
    jobs = [(spec, i, str(dest)) for i in range(spec.n)]
    if procs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(procs, spec.n)) as pool:
            rows = pool.map(build_subject, jobs, chunksize=1)
    else:
        rows = [build_subject(job) for job in jobs]
    write_metadata(spec, dest, rows)
    _write_json(paths["spec"], spec.to_json())  # written last: marks a complete cohort
    return paths["bids"]


def cohort_matches(spec: CohortSpec, dest: Path) -> bool:
    """Whether ``dest`` holds a complete cohort built from ``spec``."""
    path = cohort_paths(dest)["spec"]
    return path.is_file() and json.loads(path.read_text()) == spec.to_json()


# ------------------------------------------------------------------------------------------------
# encoder weights
def make_random_weights(encoder: str, cube: int, path: Path, seed: int = 0) -> Path:
    """Random weights of ``encoder``'s real architecture at ``img_size=cube``, as safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    from cg3d_bids.core.models.encoders import get_spec

    spec = get_spec(encoder)
    torch.manual_seed(seed)
    model = timm.create_model(spec.timm_name, pretrained=False, init_values=1.0, img_size=cube,
                              **spec.model_kwargs)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    save_file(state, str(tmp), metadata={"note": f"random init of {spec.timm_name}, for speed runs only"})
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------
# running cg3d
@dataclass(frozen=True)
class Measured:
    """What the benchmark measured around the cg3d process."""

    returncode: int
    wall_s: float
    cpu_s: float        #: user + system of the whole process tree (RUSAGE_CHILDREN delta)
    start: float        #: Unix time
    end: float
    timed_out: bool = False
    load: tuple[float, float] = (0.0, 0.0)  #: 1-min load average before and after (other work on the machine)
    speed: tuple[float, float] | None = None  #: fp32 matmul GFLOP/s before and after (:func:`cpu_speed`)


#: Size of the matmul that probes the machine's speed (fp32, square; ~0.1 s on 2 cores).
SPEED_PROBE_SIZE = 2048
SPEED_PROBE = """
import sys, time, torch
n, size = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(n)
a, b = torch.randn(size, size), torch.randn(size, size)
best = float("inf")
for _ in range(8):
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(2 * size**3 / best / 1e9)
"""


def cpu_speed(threads: int, size: int = SPEED_PROBE_SIZE) -> float | None:
    """Best-of-8 fp32 ``size^3`` matmul rate on ``threads`` CPU threads (GFLOP/s), in a child
    process; None if it cannot run. On a shared VM this rate moves by +-30 % from hour to hour,
    and the CPU stages move with it: compare runs at similar rates."""
    try:
        out = subprocess.run([sys.executable, "-c", SPEED_PROBE, str(threads), str(size)],
                             capture_output=True, text=True, timeout=120, env=child_env())
        return float(out.stdout.split()[-1]) if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def cpu_model() -> str:
    """The CPU's model name and its widest SIMD level (e.g. ``AMD EPYC, AVX2``): BLAS and the
    encoder's kernels, hence speed and the last bits of float results, depend on it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    simd = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    return f"{names[0] if names else 'unknown CPU'}, {simd}"


def cg3d_command(bids: Path, masks: Path, out: Path, work: Path, *, encoder: str, cube: int, device: str,
                 nprocs: int, weights: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The ``python -m cg3d_bids ... group`` command line."""
    cmd = [sys.executable, "-m", "cg3d_bids", str(bids), str(out), "group", "--modality", "T1w",
           "-d", f"masks={masks}", "-w", str(work), "--encoder", encoder, "--cube-size", str(cube),
           "--device", device, "--nprocs", str(nprocs), "--skip-bids-validation"]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    return cmd + list(extra)


def child_env() -> dict[str, str]:
    """This repository first on PYTHONPATH (the checkout under test, not an installed copy)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    parts = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


NIPYPE_LINE = re.compile(r"^(\s|\d{6}-\d\d:\d\d:\d\d,\d+ nipype|\d\d:\d\d:\d\d nipype\.)")


def echoed(line: str, echo: str) -> bool:
    """Whether to show a line of cg3d's output: ``all``, ``none``, or ``cg3d`` (all but nipype's)."""
    return echo == "all" or (echo == "cg3d" and not NIPYPE_LINE.match(line))


def _pump(stream: Any, log: Any, echo: str) -> None:
    for line in stream:
        log.write(line)
        if echoed(line, echo):
            sys.stderr.write("  | " + line)
    stream.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_measured(cmd: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
                 timeout: float | None = None, echo: str = "cg3d", speed_threads: int = 0) -> Measured:
    """Run ``cmd`` in its own process group; wall time and process-tree CPU time (and, with
    ``speed_threads``, the machine's matmul rate on that many threads before and after; the
    probes' own CPU time is not counted in the run's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    speed_before = cpu_speed(speed_threads) if speed_threads else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # after the probe: its CPU is not the run's
    load_before = os.getloadavg()[0]
    start, t0 = time.time(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, echo), daemon=True)
        pump.start()
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        pump.join(30)
    wall, end = time.perf_counter() - t0, time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load_after = os.getloadavg()[0]
    speed = None
    if speed_before is not None:
        speed_after = cpu_speed(speed_threads)
        speed = None if speed_after is None else (speed_before, speed_after)
    return Measured(proc.returncode, wall, cpu, start, end, timed_out, (load_before, load_after), speed)


# ------------------------------------------------------------------------------------------------
# the per-stage timings written by cg3d
@dataclass(frozen=True)
class StageTiming:
    """One row of ``logs/timings-<run_id>.tsv``."""

    stage: str
    modality: str
    images: int
    wall_s: float
    cpu_s: float
    start_s: float
    end_s: float


def read_timings(path: Path) -> list[StageTiming]:
    """Parse a timings TSV; ValueError naming the file and line when it is malformed."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or tuple(lines[0].split("\t")) != TIMINGS_HEADER:
        raise ValueError(f"{path}: header must be {'<tab>'.join(TIMINGS_HEADER)!r}, "
                         f"got {lines[0] if lines else 'an empty file'!r}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != len(TIMINGS_HEADER):
                raise ValueError(f"{len(fields)} fields, expected {len(TIMINGS_HEADER)}")
            rows.append(StageTiming(fields[0], fields[1], int(fields[2]), *(float(v) for v in fields[3:])))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from exc
    if not any(row.stage == "total" for row in rows):
        raise ValueError(f"{path}: no 'total' row")
    return rows


def find_timings(out_dir: Path) -> Path | None:
    """The newest ``logs/timings-*.tsv`` of an output folder (run ids start with the time)."""
    found = sorted((out_dir / "logs").glob("timings-*.tsv"))
    return found[-1] if found else None


def _order(row: StageTiming) -> tuple[int, str]:
    rank = STAGE_ORDER.index(row.stage) if row.stage in STAGE_ORDER else len(STAGE_ORDER)
    return (rank if row.stage != "total" else len(STAGE_ORDER) + 1, row.modality)


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]) -> str:
    """A Markdown table with padded columns."""
    rows = [list(r) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) if r else str(c).ljust(w)
                                 for c, w, r in zip(cells, widths, right, strict=True)) + " |"

    dashes = [("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)]
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def stage_table(timings: list[StageTiming], n_volumes: int, measured: Measured | None = None) -> str:
    """Per stage: wall s, core-s, core-s per volume, share of the total's wall and core-s."""
    total = next(row for row in timings if row.stage == "total")
    header = ("stage", "modality", "images", "wall s", "core-s", "core-s / volume", "wall share", "core-s share")
    rows = []
    for row in sorted(timings, key=_order):
        volumes = row.images or n_volumes
        name = f"  {row.stage} (inside {NESTED[row.stage]})" if row.stage in NESTED else row.stage
        rows.append((name, row.modality, str(row.images), _fmt(row.wall_s), _fmt(row.cpu_s),
                     _fmt(row.cpu_s / volumes, 2), _share(row.wall_s, total.wall_s),
                     _share(row.cpu_s, total.cpu_s)))
    if measured is not None:
        rows.append(("process tree (measured)", "all", str(n_volumes), _fmt(measured.wall_s),
                     _fmt(measured.cpu_s), _fmt(measured.cpu_s / n_volumes, 2),
                     _share(measured.wall_s, total.wall_s), _share(measured.cpu_s, total.cpu_s)))
    return markdown_table(header, rows, (False, False, True, True, True, True, True, True))


def cpu_budget_line(timings: list[StageTiming], measured: Measured, n_volumes: int) -> str:
    """The CPU target of issue 11 in one line: everything except the encoder's forward passes and
    scoring, per volume, and how much of it is in no stage (made once per run, whatever N)."""
    def cpu(stage: str) -> float:
        return sum(row.cpu_s for row in timings if row.stage == stage)

    rest = measured.cpu_s - cpu("encode") - cpu("score")
    staged = sum(row.cpu_s for row in timings if row.stage not in NESTED and row.stage != "total")
    once = measured.cpu_s - staged
    return (f"Everything except encode and score: {_fmt(rest)} core-s, **{_fmt(rest / n_volumes, 2)} per volume** "
            f"(target <= 3). Of it, {_fmt(once)} core-s ({_fmt(once / n_volumes, 2)} per volume) are in no stage: "
            "the imports made once before the workers fork (torch, timm, matplotlib, scipy), planning, "
            "scheduling and exit; per volume they shrink as N grows.")


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole > 0 else "-"


def measured_table(measured: Measured, n_volumes: int) -> str:
    """Total wall and process-tree CPU only (when the run wrote no timings)."""
    header = ("what", "volumes", "wall s", "core-s", "core-s / volume", "s / volume")
    row = ("cg3d group (measured)", str(n_volumes), _fmt(measured.wall_s), _fmt(measured.cpu_s),
           _fmt(measured.cpu_s / n_volumes, 2), _fmt(measured.wall_s / n_volumes, 2))
    return markdown_table(header, [row], (False, True, True, True, True, True))


# ------------------------------------------------------------------------------------------------
# progress lines of cg3d's output (a fallback when there is no timings TSV, e.g. a run stopped early)
PROGRESS_LINE = re.compile(r"^(?P<clock>\d\d:\d\d:\d\d) cg3d\S* \w+: \[(?P<tag>\w+)[^\]]*?\d+/\d+\] "
                           r"\S+ in (?P<secs>[\d.]+) s")


@dataclass(frozen=True)
class Progress:
    """The ``[tag k/n] item in X s`` lines of one tag."""

    tag: str
    items: int
    item_s: float        #: sum of the per-item seconds cg3d logged
    first: float         #: Unix time of the first line (1 s resolution)
    last: float
    first_item_s: float  #: seconds logged on the first line


def _clock_to_unix(clock: str, after: float) -> float:
    """``HH:MM:SS`` (local time) as Unix time, the first such moment from one second before ``after``."""
    day = datetime.fromtimestamp(after).date()
    stamp = datetime.combine(day, datetime.strptime(clock, "%H:%M:%S").time()).timestamp()
    return stamp + 86400 if stamp < after - 1 else stamp


def read_progress(path: Path, run_start: float) -> list[Progress]:
    """Per tag, the progress lines of cg3d's output log, in order of first appearance."""
    found: dict[str, list[tuple[float, float]]] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        match = PROGRESS_LINE.match(line)
        if match:
            when = _clock_to_unix(match["clock"], run_start)
            found.setdefault(match["tag"], []).append((when, float(match["secs"])))
    return [Progress(tag, len(items), sum(s for _, s in items), min(t for t, _ in items),
                     max(t for t, _ in items), items[0][1]) for tag, items in found.items()]


def progress_table(progress: Sequence[Progress]) -> str:
    """Per tag: items, logged seconds per item, span from the first to the last line."""
    rows = [(p.tag, str(p.items), _fmt(p.item_s), _fmt(p.item_s / p.items, 2), _fmt(p.last - p.first))
            for p in progress]
    return markdown_table(("progress lines", "items", "item s (sum)", "s / item", "first-to-last line s"), rows,
                          (False, True, True, True, True))


# ------------------------------------------------------------------------------------------------
# nvidia-smi samples
@dataclass(frozen=True)
class GpuSample:
    time: float      #: Unix time
    util_pct: float
    mem_mib: float


def _number(text: str) -> float | None:
    value = text.strip().split(" ")[0]
    try:
        return float(value)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def read_smi_log(path: Path) -> list[GpuSample]:
    """Samples of ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv``
    (time stamps in local time, as nvidia-smi writes them); header and unreadable lines skipped."""
    samples = []
    for line in Path(path).read_text(errors="replace").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or fields[0].startswith("timestamp"):
            continue
        try:
            stamp = datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        util, mem = _number(fields[1]), _number(fields[2])
        if util is not None and mem is not None:
            samples.append(GpuSample(stamp, util, mem))
    return samples


def gpu_window(samples: Sequence[GpuSample], start: float, end: float) -> dict[str, float] | None:
    """Mean and median utilisation and peak memory of the samples within [start, end]."""
    inside = [s for s in samples if start <= s.time <= end]
    if not inside:
        return None
    utils = np.array([s.util_pct for s in inside])
    return {"samples": float(len(inside)), "util_mean": float(utils.mean()),
            "util_median": float(np.median(utils)), "peak_mem_mib": max(s.mem_mib for s in inside)}


def stage_window(timings: Sequence[StageTiming], stage: str) -> tuple[float, float, int] | None:
    """(start, end, images) of a stage over all modalities."""
    rows = [row for row in timings if row.stage == stage]
    if not rows:
        return None
    return min(r.start_s for r in rows), max(r.end_s for r in rows), sum(r.images for r in rows)


# ------------------------------------------------------------------------------------------------
# targets
@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    target: str
    passed: bool | None
    note: str = ""


@dataclass(frozen=True)
class Window:
    """When the encoder ran, and over how many volumes."""

    start: float
    end: float
    images: int
    note: str


def tokenize_window(timings: Sequence[StageTiming] | None, progress: Sequence[Progress] | None,
                    measured: Measured) -> Window:
    """The tokenize stage from the timings TSV, else from cg3d's progress lines, else the whole run."""
    stage = stage_window(timings or [], "tokenize")
    if stage is not None:
        return Window(*stage, "timings TSV")
    tokens = next((p for p in progress or [] if p.tag == "tokens"), None)
    if tokens is not None:
        return Window(tokens.first - tokens.first_item_s, tokens.last, tokens.items,
                      "from cg3d's [tokens] lines (1 s clock)")
    return Window(measured.start, measured.end, 0, "no timings: whole run")


def _total_check(measured: Measured, target: float) -> Check:
    ok = measured.wall_s < target and measured.returncode == 0 and not measured.timed_out
    note = "timed out" if measured.timed_out else f"exit {measured.returncode}"
    return Check("total wall s (cg3d process)", measured.wall_s, f"< {target:g}", ok, note)


def _tokenize_check(window: Window, target: float) -> Check:
    if not window.images:
        return Check("tokenize s / volume", None, f"< {target:g}", None, window.note)
    per_volume = (window.end - window.start) / window.images
    return Check("tokenize s / volume", per_volume, f"< {target:g}", per_volume < target,
                 f"{window.note}, {window.images} volumes")


def _busy_check(window: Window, samples: Sequence[GpuSample] | None, target: float) -> Check:
    busy = gpu_window(samples, window.start, window.end) if samples else None
    if busy is None:
        return Check("GPU busy % during tokenize", None, f">= {target:g}", None, "no nvidia-smi samples in the window")
    note = f"{window.note}, {int(busy['samples'])} samples, median {busy['util_median']:.0f} %"
    return Check("GPU busy % during tokenize", busy["util_mean"], f">= {target:g}", busy["util_mean"] >= target, note)


def _vram_check(measured: Measured, samples: Sequence[GpuSample] | None, target: float) -> Check:
    run = gpu_window(samples, measured.start, measured.end) if samples else None
    if run is None:
        return Check("peak VRAM GB (memory.used)", None, f"< {target:g}", None, "no nvidia-smi samples")
    peak = run["peak_mem_mib"] * 2**20 / 1e9
    return Check("peak VRAM GB (memory.used)", peak, f"< {target:g}", peak < target,
                 "whole run, every process on the GPU")


def h200_checks(measured: Measured, window: Window, samples: Sequence[GpuSample] | None) -> list[Check]:
    """The H200 targets: total < 60 s, tokenize < 0.3 s/volume, GPU busy >= 80 %, VRAM < 10 GB."""
    t = H200_TARGETS
    return [_total_check(measured, t["total_wall_s"]), _tokenize_check(window, t["tokenize_s_per_volume"]),
            _busy_check(window, samples, t["gpu_busy_pct"]), _vram_check(measured, samples, t["peak_vram_gb"])]


def checks_table(checks: Sequence[Check]) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    rows = [(c.name, "-" if c.value is None else _fmt(c.value, 2), c.target, verdict[c.passed], c.note)
            for c in checks]
    return markdown_table(("check", "value", "target", "result", "note"), rows,
                          (False, True, False, False, False))


# ------------------------------------------------------------------------------------------------
# command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10, help="subjects (volumes) in the cohort (default 10)")
    p.add_argument("--cube", type=int, default=224, help="cube edge H (default 224)")
    p.add_argument("--encoder", default=None, help="test-tiny-vit (default on CPU) or a real architecture "
                   "(dinov2_vitl14, default on CUDA) with random weights")
    p.add_argument("--weights", type=Path, help="weights file (default for a real encoder: random weights, made once)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--nprocs", type=int, default=os.cpu_count() or 1, help="cg3d --nprocs (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"data folder with manifest.tsv ({DEFAULT_DATA})")
    p.add_argument("--voxel-mm", default="1x1x1", help="voxel size of the sources, as in the manifest")
    p.add_argument("--max-shift", type=int, default=4, help="largest shift in voxels (default 4)")
    p.add_argument("--gzip-level", type=int, default=1, help="gzip level of the cohort files (default 1)")
    p.add_argument("--build-procs", type=int, default=None, help="processes building the cohort (default --nprocs)")
    p.add_argument("--out-dir", type=Path, help="folder for cohort/, run/ and weights/ (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the cohort and the run's output and work folders")
    p.add_argument("--build-only", action="store_true", help="only build the cohort (kept) and stop")
    p.add_argument("--reuse", action="store_true", help="reuse the cohort in --out-dir when it was built with the "
                   "same settings (and keep it)")
    p.add_argument("--make-weights", type=Path, metavar="FILE", help="only write random weights of --encoder at "
                   "--cube to FILE and stop")
    p.add_argument("--timeout", type=float, help="stop cg3d after this many seconds (report what there is)")
    p.add_argument("--smi-log", type=Path, help="nvidia-smi CSV log sampled during the run")
    p.add_argument("--targets", choices=["h200"], help="check the targets of this machine (PASS/FAIL)")
    p.add_argument("--report", type=Path, help="also write the tables to this Markdown file")
    p.add_argument("--echo", choices=["cg3d", "all", "none"], default="cg3d",
                   help="cg3d output shown: cg3d's own lines (default), all (nipype too) or none")
    p.add_argument("--cg3d-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for cg3d (repeat; e.g. --cg3d-arg=--slice-batch=64)")
    args = p.parse_args(argv)
    if args.encoder is None:
        args.encoder = "dinov2_vitl14" if args.device.startswith("cuda") else "test-tiny-vit"
    if args.reuse and args.out_dir is None:
        p.error("--reuse needs --out-dir (the folder holding the cohort)")
    return args


def say(message: str) -> None:
    print(f"[bench_e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare_cohort(args: argparse.Namespace, dest: Path) -> CohortSpec:
    """Build the cohort, or reuse a matching one with --reuse."""
    sources = tuple(select_sources(args.data, args.voxel_mm))
    spec = CohortSpec(args.n, args.seed, sources, args.max_shift, args.gzip_level)
    if args.reuse and cohort_matches(spec, dest):
        say(f"reusing the cohort in {dest} ({args.n} subjects, seed {args.seed})")
        return spec
    if args.reuse:
        say(f"no cohort with these settings in {dest}: building it")
    say(f"building {args.n} subjects from {len(sources)} real volumes in {args.data} -> {dest}")
    t0 = time.perf_counter()
    build_cohort(spec, dest, args.build_procs or args.nprocs)
    size = sum(p.stat().st_size for p in dest.rglob("*.nii.gz")) / 1e6
    say(f"cohort built in {time.perf_counter() - t0:.1f} s ({size:.0f} MB)")
    return spec


def resolve_weights_file(args: argparse.Namespace, out_dir: Path) -> Path | None:
    """--weights, or random weights of a real encoder (made once in out_dir/weights)."""
    if args.weights is not None or args.encoder in TEST_ENCODERS:
        return args.weights
    path = out_dir / "weights" / f"{args.encoder}-{args.cube}-random.safetensors"
    if not path.is_file():
        say(f"creating random weights of {args.encoder} at {args.cube} -> {path}")
        make_random_weights(args.encoder, args.cube, path)
    return path


def report(args: argparse.Namespace, measured: Measured, out: Path, output_log: Path | None = None) -> str:
    """All tables of one run, as Markdown."""
    title = (f"## cg3d group: {args.n} T1w volumes, cube {args.cube}, encoder {args.encoder}, "
             f"device {args.device}, nprocs {args.nprocs}\n")
    status = (f"stopped after --timeout {args.timeout:g} s (the CPU time of killed workers is not counted)"
              if measured.timed_out else f"exit {measured.returncode}")
    parts = [title, f"cg3d {status}: {_fmt(measured.wall_s)} s wall, {_fmt(measured.cpu_s)} core-s "
             f"(process tree), {_fmt(measured.cpu_s / args.n, 2)} core-s per volume. Load average "
             f"{measured.load[0]:.1f} before, {measured.load[1]:.1f} after, on {os.cpu_count()} CPUs "
             "(above the CPU count, other work shared the machine: wall times are inflated).\n"]
    if measured.speed is not None:
        parts.append(f"Machine: {cpu_model()}; fp32 {SPEED_PROBE_SIZE}^3 matmul on {args.nprocs} threads: "
                     f"{measured.speed[0]:.0f} GFLOP/s before the run, {measured.speed[1]:.0f} after "
                     "(a shared VM's speed moves by +-30 % from hour to hour, and every stage with it: "
                     "compare runs made at similar rates).\n")
    path = find_timings(out)
    timings, progress = None, None
    if path is None:
        parts += [measured_table(measured, args.n) + "\n",
                  f"Note: the run wrote no per-stage timings ({out / 'logs'}/timings-<run_id>.tsv is missing): "
                  "only the total wall time and the process-tree CPU time measured here are shown.\n"]
        progress = read_progress(output_log, measured.start) if output_log and output_log.is_file() else []
        if progress:
            parts += ["Progress lines in cg3d's output (what cg3d logged per item):\n",
                      progress_table(progress) + "\n"]
    else:
        timings = read_timings(path)
        total = next(row for row in timings if row.stage == "total")
        parts += [f"Per stage (from {path.name}):\n", stage_table(timings, args.n, measured) + "\n",
                  f"Outside the stages (start-up, imports, exit): {_fmt(measured.wall_s - total.wall_s)} s wall, "
                  f"{_fmt(measured.cpu_s - total.cpu_s)} core-s.\n", cpu_budget_line(timings, measured, args.n) + "\n"]
    samples = read_smi_log(args.smi_log) if args.smi_log and args.smi_log.is_file() else None
    if args.targets == "h200":
        window = tokenize_window(timings, progress, measured)
        parts += ["### H200 targets\n", checks_table(h200_checks(measured, window, samples)) + "\n"]
    return "\n".join(parts)


def run_benchmark(args: argparse.Namespace, out_dir: Path) -> int:
    """Cohort, weights, one cg3d run, tables. Returns cg3d's exit code."""
    dest = out_dir / "cohort"
    prepare_cohort(args, dest)
    if args.build_only:
        return 0
    weights = resolve_weights_file(args, out_dir)
    paths, run_dir = cohort_paths(dest), out_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh output and work folders: nothing cached
    out = run_dir / "out"
    cmd = cg3d_command(paths["bids"], paths["masks"], out, run_dir / "work", encoder=args.encoder,
                       cube=args.cube, device=args.device, nprocs=args.nprocs, weights=weights,
                       extra=args.cg3d_arg)
    say("running: " + " ".join(cmd[1:]))
    measured = run_measured(cmd, run_dir / "cg3d-output.log", env=child_env(), timeout=args.timeout,
                            echo=args.echo, speed_threads=args.nprocs or os.cpu_count() or 1)
    say(f"cg3d finished: exit {measured.returncode}, {measured.wall_s:.1f} s wall")
    text = report(args, measured, out, run_dir / "cg3d-output.log")
    print(text, flush=True)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    return measured.returncode if not measured.timed_out else 124


def cleanup(args: argparse.Namespace, out_dir: Path, temporary: bool) -> None:
    """Remove what was made, except what --keep, --reuse or --build-only keep."""
    if args.keep or args.build_only:
        return
    shutil.rmtree(out_dir / "run", ignore_errors=True)
    if not args.reuse:
        shutil.rmtree(out_dir / "cohort", ignore_errors=True)
    if temporary:
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.make_weights:
        make_random_weights(args.encoder, args.cube, args.make_weights)
        say(f"wrote random {args.encoder} weights (img_size {args.cube}) to {args.make_weights}")
        return 0
    temporary = args.out_dir is None
    out_dir = Path(tempfile.mkdtemp(prefix="cg3d-bench-")) if temporary else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_benchmark(args, out_dir.resolve())
    finally:
        cleanup(args, out_dir, temporary)
        if args.keep or args.build_only or args.reuse:
            say(f"kept: {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
