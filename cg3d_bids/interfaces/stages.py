"""nipype interfaces around :mod:`cg3d_bids.workflows.stages`.

Each interface receives the run configuration as a JSON file and image records as JSON text, calls
one stage and returns the path it wrote. A :class:`~cg3d_bids.errors.Cg3dError` raised inside a
worker process is also written to ``<work>/errors/`` so that the command line can exit with the
error's own code and message (nipype only reports that a node crashed).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


def load_config(path: str):
    """RunConfig from the JSON written by the command line."""
    from ..config import RunConfig

    data = json.loads(Path(path).read_text())
    for key in ("bids_dir", "output_dir", "work_dir", "weights", "bids_database_dir", "use_plugin"):
        if data.get(key) is not None:
            data[key] = Path(data[key])
    data["derivatives"] = {k: Path(v) for k, v in data.get("derivatives", {}).items()}
    return RunConfig(**data)


def record_error(config_file: str, exc: BaseException, context: str) -> None:
    """Write a failing stage's error where the command line finds it."""
    from ..atomic import write_json
    from ..errors import Cg3dError

    cfg = load_config(config_file)
    errors = Path(cfg.work_dir) / "errors" / cfg.run_id
    payload = {
        "context": context,
        "type": type(exc).__name__,
        "message": exc.render() if isinstance(exc, Cg3dError) else str(exc),
        "exit_code": getattr(exc, "exit_code", 1),
        "traceback": traceback.format_exc(),
    }
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in context)
    write_json(errors / f"{safe}.json", payload)


class _ConfigInputSpec(BaseInterfaceInputSpec):
    config_file = File(exists=True, mandatory=True, desc="run configuration (JSON)")


class _PrepareInputSpec(_ConfigInputSpec):
    record = traits.Str(mandatory=True, desc="image record (JSON)")


class _PathOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="path written by the stage")


class PrepareImage(SimpleInterface):
    """Load and check one image and its mask; brain percentiles of its cube."""

    input_spec = _PrepareInputSpec
    output_spec = _PathOutputSpec

    def _run_interface(self, runtime):
        from ..workflows.stages import prepare_or_skip

        record = json.loads(self.inputs.record)
        try:
            self._results["out_file"] = prepare_or_skip(record, load_config(self.inputs.config_file))
        except Exception as exc:
            record_error(self.inputs.config_file, exc, f"prepare-{record['bids_name']}")
            raise
        return runtime


class _LandmarksInputSpec(_ConfigInputSpec):
    prep_files = traits.List(traits.Str, mandatory=True)
    modality = traits.Str(mandatory=True)


class ComputeLandmarks(SimpleInterface):
    """Nyul landmarks from every prepared image of the modality."""

    input_spec = _LandmarksInputSpec
    output_spec = _PathOutputSpec

    def _run_interface(self, runtime):
        from ..workflows.stages import compute_landmarks

        try:
            self._results["out_file"] = compute_landmarks(
                list(self.inputs.prep_files), self.inputs.modality, load_config(self.inputs.config_file)
            )
        except Exception as exc:
            record_error(self.inputs.config_file, exc, f"landmarks-{self.inputs.modality}")
            raise
        return runtime


class _TokenizeInputSpec(_ConfigInputSpec):
    records = traits.Str(mandatory=True, desc="JSON list of image records")
    landmarks_file = traits.Str(mandatory=True)
    use_gpu = traits.Bool(False, usedefault=True, desc="nipype MultiProc GPU slot (CUDA only)")


class _TokenizeOutputSpec(TraitedSpec):
    token_files = traits.List(traits.Str)


class TokenizeImages(SimpleInterface):
    """3D patch tokens of a chunk of images, the encoder built once per chunk."""

    input_spec = _TokenizeInputSpec
    output_spec = _TokenizeOutputSpec

    def _run_interface(self, runtime):
        from ..workflows.stages import tokenize_images

        records = json.loads(self.inputs.records)
        try:
            self._results["token_files"] = tokenize_images(
                records, self.inputs.landmarks_file, load_config(self.inputs.config_file)
            )
        except Exception as exc:
            record_error(self.inputs.config_file, exc, f"tokens-{records[0]['bids_name']}")
            raise
        return runtime


class _ScoreInputSpec(_ConfigInputSpec):
    token_files = traits.List(traits.Str, mandatory=True)
    modality = traits.Str(mandatory=True)
    use_gpu = traits.Bool(False, usedefault=True)


class ScoreBatch(SimpleInterface):
    """Mutual scoring (+ consistent-anomaly stage) of a whole modality batch."""

    input_spec = _ScoreInputSpec
    output_spec = _PathOutputSpec

    def _run_interface(self, runtime):
        from ..workflows.stages import score_batch

        try:
            self._results["out_file"] = score_batch(
                list(self.inputs.token_files), self.inputs.modality, load_config(self.inputs.config_file)
            )
        except Exception as exc:
            record_error(self.inputs.config_file, exc, f"scores-{self.inputs.modality}")
            raise
        return runtime


class _OutputsInputSpec(_ConfigInputSpec):
    record = traits.Str(mandatory=True)
    token_file = traits.Str(mandatory=True, desc='token file ("" for an image skipped as bad data)')
    score_file = traits.Str(mandatory=True)
    provenance = traits.Str(mandatory=True, desc="provenance (JSON)")


class WriteImageOutputs(SimpleInterface):
    """Native-grid probseg, masks and sidecars of one image. A failure is recorded, not raised."""

    input_spec = _OutputsInputSpec
    output_spec = _PathOutputSpec

    def _run_interface(self, runtime):
        from ..atomic import write_json
        from ..workflows.stages import write_image_outputs

        record = json.loads(self.inputs.record)
        cfg = load_config(self.inputs.config_file)
        try:
            self._results["out_file"] = write_image_outputs(
                record, self.inputs.token_file, self.inputs.score_file, cfg,
                json.loads(self.inputs.provenance),
            )
        except Exception as exc:
            if cfg.stop_on_first_crash:
                record_error(self.inputs.config_file, exc, f"outputs-{record['bids_name']}")
                raise
            out = Path(cfg.work_dir) / "results" / record["modality"] / f"{record['bids_name']}.json"
            write_json(out, {
                "bids_name": record["bids_name"], "status": "failed",
                "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
            })
            self._results["out_file"] = str(out)
        return runtime
