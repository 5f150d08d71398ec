"""The effective configuration of one run: settings, their cache keys and their TOML record.

``RunConfig`` holds every setting that changes a result (method settings) apart from the ones
that only change how it is computed (execution settings). Cache keys hash the former, so a
changed method setting recomputes and an unchanged one resumes. ``logs/config-<run_id>.toml``
records both; ``--config-file`` reloads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__

#: Settings whose change must recompute tokens (and everything after them).
TOKEN_SETTINGS = (
    "encoder", "weights_sha256", "cube_size", "fov_mm", "layers", "projection_dim",
    "random_seed", "precision_effective", "mask_source", "mask_desc",
)
#: Settings whose change must recompute scores and outputs (in addition to tokens).
SCORE_SETTINGS = ("fraction", "codegraph", "codegraph_pvalue", "codegraph_resolution", "random_seed")
#: Settings that only change the binarised outputs.
OUTPUT_SETTINGS = ("threshold", "z_center")


@dataclass
class RunConfig:
    """All settings of a run. Defaults and their sources are in the CLI help and README."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    # data selection
    participant_label: list[str] | None = None
    session_label: list[str] | None = None
    bids_filters: dict[str, Any] | None = None
    modality: list[str] = field(default_factory=lambda: ["T1w", "T2w"])
    derivatives: dict[str, Path] = field(default_factory=dict)
    mask_source: str = "derivatives"
    mask_desc: str = "brain"
    skip_bids_validation: bool = False
    bids_database_dir: Path | None = None
    reset_bids_db: bool = False
    # method
    encoder: str = "dinov2_vitl14"
    weights: Path | None = None
    allow_download: bool = False
    cube_size: int = 224
    fov_mm: float = 156.0
    layers: list[int] | None = None
    projection_dim: int = 128
    random_seed: int = 0
    fraction: float = 0.3
    codegraph: bool = True
    codegraph_pvalue: float | None = None
    codegraph_resolution: float | None = None
    threshold: float = 0.5
    #: probseg = logistic(z - z_center), z = robust z-score of the raw map against the batch's
    #: brain-token scores (median, 1.4826 MAD). z_center = 3 puts probseg 0.5 at 3 robust SDs.
    z_center: float = 3.0
    # execution
    device: str = "cuda"
    precision: str = "auto"
    slice_batch: int = 128
    score_chunk_mb: int = 256
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    use_plugin: Path | None = None
    clean_workdir: bool = False
    stop_on_first_crash: bool = False
    skip_bad_images: bool = False
    verbose: int = 0
    # filled in at run time
    weights_sha256: str | None = None
    weights_source: str | None = None
    run_id: str = ""
    version: str = __version__

    @property
    def precision_effective(self) -> str:
        """The encoder precision actually used: ``auto`` is bf16 on CUDA and fp32 on CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.device.startswith("cuda") else "fp32"

    # ----------------------------------------------------------------------------------------
    def key(self, names: tuple[str, ...], *extra: Any) -> str:
        """A short stable hash of the named settings, cg3d's version and ``extra`` values."""
        payload = {name: _plain(getattr(self, name)) for name in names}
        payload["__version__"] = self.version
        payload["__extra__"] = [_plain(item) for item in extra]
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def method_dict(self) -> dict[str, Any]:
        """The settings that change results, for provenance and sidecars."""
        names = sorted(set(TOKEN_SETTINGS + SCORE_SETTINGS + OUTPUT_SETTINGS))
        return {name: _plain(getattr(self, name)) for name in names}

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {key: value for key, value in data.items() if value is not None}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps({"cg3d": self.to_dict()})

    @classmethod
    def from_namespace(cls, args: Any) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        return cls(**values)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read the ``[cg3d]`` table of a ``config-*.toml`` written by an earlier run."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return dict(data.get("cg3d", data))


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
