"""``cg3d`` entry point: start-up checks in the order that fails fastest, then the workflow.

Order (bids_app_conventions.md §1.5): arguments (64/17) -> paths (64/73) -> device (69) ->
BIDS validation (16) -> discovery and filters (18/66) -> weights (66) -> workflow -> outputs.
Nothing is written to the output folder before the workflow has produced its results, and a
failing run removes an output folder that it created and left empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import RunConfig, load_config_file
from ..errors import (
    EXIT_DATAERR,
    EXIT_FAILURE,
    CantCreateError,
    Cg3dError,
    DeviceUnavailableError,
    NoInputError,
    TempFailError,
    UsageError,
)
from .parser import build_parser, parse_args

LOGGER = logging.getLogger("cg3d")


def main(argv: list[str] | None = None) -> int:
    """Run ``cg3d``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "evaluate":
        from .evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    if "--bids-exec-spec" in argv:  # BEP027: works with or without the positionals
        from ..boutiques import descriptor_text

        print(descriptor_text())
        return 0
    args = parse_args(argv)
    _setup_logging(args.verbose)
    try:
        cfg = build_config(args, argv)
        return run(cfg)
    except Cg3dError as exc:
        LOGGER.error("%s", exc.render())
        print(f"cg3d: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cg3d: interrupted; rerun the same command to resume from the work directory", file=sys.stderr)
        return 130


def _setup_logging(verbose: int) -> None:
    level = max(logging.INFO - 5 * verbose, logging.DEBUG) if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    logging.getLogger("nipype.workflow").setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    logging.getLogger("nipype.interface").setLevel(logging.WARNING)
    logging.getLogger("nipype.utils").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
def explicit_options(argv: list[str]) -> set[str]:
    """Names of the options given on the command line (to let them override --config-file)."""
    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        action.default = argparse.SUPPRESS
    try:
        namespace, _ = parser.parse_known_args(argv)
    except SystemExit:
        return set()
    return set(vars(namespace))


def build_config(args: argparse.Namespace, argv: list[str]) -> RunConfig:
    """RunConfig from the arguments, over a --config-file when one is given."""
    cfg = RunConfig.from_namespace(args)
    if args.config_file:
        saved = load_config_file(args.config_file)
        given = explicit_options(argv) | {"bids_dir", "output_dir", "analysis_level"}
        fields = {f.name: f for f in dataclasses.fields(RunConfig)}
        for name, value in saved.items():
            if name in fields and name not in given and name not in {"run_id", "version", "weights_sha256",
                                                                      "weights_source"}:
                setattr(cfg, name, _restore(name, value))
    if args.bids_filter_file:
        try:
            cfg.bids_filters = json.loads(Path(args.bids_filter_file).read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--bids-filter-file is not valid JSON: {exc}", path=args.bids_filter_file,
                             fix='write a JSON object such as {"t2w": {"acquisition": "axial"}}') from exc
        if not isinstance(cfg.bids_filters, dict):
            raise UsageError("--bids-filter-file must hold a JSON object", path=args.bids_filter_file,
                             fix='e.g. {"t1w": {"reconstruction": null}}')
    cfg.run_id = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    return cfg


def _restore(name: str, value: Any) -> Any:
    if name in {"bids_dir", "output_dir", "work_dir", "weights", "bids_database_dir", "use_plugin"} and value:
        return Path(value)
    if name == "derivatives":
        return {k: Path(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
def check_paths(cfg: RunConfig) -> bool:
    """Output and work folders: not the input, not inside it (except derivatives/), writable.

    Returns whether the output folder already existed.
    """
    bids = cfg.bids_dir.resolve()
    out = cfg.output_dir.resolve()
    if out == bids:
        raise UsageError(
            "The selected output folder is the same as the input BIDS folder.",
            path=out, fix=f"choose another output folder (suggestion: {bids}/derivatives/cg3d)",
        )
    if out.is_relative_to(bids) and not out.is_relative_to(bids / "derivatives"):
        raise UsageError(
            "The selected output folder is inside the input BIDS dataset (outside derivatives/).",
            path=out, fix=f"write outside the dataset or under {bids}/derivatives/cg3d",
        )
    work = cfg.work_dir.resolve()
    if work.is_relative_to(bids):
        raise UsageError(
            "The selected working directory is a subdirectory of the input BIDS folder.",
            path=work, fix="use -w/--work-dir outside the dataset (inputs are never written)",
        )
    existed = out.exists()
    for label, path in (("output", out), ("work", work)):
        _check_writable(label, path)
    return existed


def _check_writable(label: str, path: Path) -> None:
    hint = ("check permissions; in a container mount it writable (docker: -v HOST:PATH and "
            "-u $(id -u):$(id -g); apptainer: -B HOST:PATH)")
    if path.exists() and not path.is_dir():
        raise CantCreateError(f"the {label} folder is a file", path=path, fix="choose a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CantCreateError(f"cannot create the {label} folder: {probe} is a file", path=path, fix=hint)
    try:  # a real write: permissions, read-only mounts and root squash all show up here
        import tempfile

        with tempfile.NamedTemporaryFile(dir=probe, prefix=".cg3d-write-test-"):
            pass
    except OSError as exc:
        raise CantCreateError(f"cannot create or write the {label} folder ({exc.strerror})",
                              path=path, fix=hint) from exc


def check_device(cfg: RunConfig) -> None:
    """Fail at once when CUDA is requested and not visible (never fall back silently)."""
    if not cfg.device.startswith("cuda"):
        return
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA init before forking
    import torch

    index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        raise DeviceUnavailableError(
            f"--device {cfg.device} was requested but no such CUDA GPU is visible.",
            fix="run the container with GPUs (docker run --gpus all ..., apptainer run --nv ...), "
            "or pass --device cpu (much slower with real encoders)",
        )


# --------------------------------------------------------------------------------------------
def run(cfg: RunConfig) -> int:
    """The whole run after argument parsing. Raises Cg3dError on failure."""
    output_existed = check_paths(cfg)
    check_device(cfg)
    if cfg.use_plugin:
        read_plugin_file(cfg.use_plugin)  # a bad plugin file fails now, not after discovery
    if cfg.clean_workdir and cfg.work_dir.exists():
        shutil.rmtree(cfg.work_dir)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    log_file = _add_file_log(cfg)
    LOGGER.info("cg3d %s, run %s: %s level on %s", __version__, cfg.run_id, cfg.analysis_level, cfg.bids_dir)
    try:
        status = _run(cfg)
    except BaseException:
        _remove_if_empty(cfg.output_dir, output_existed)
        raise
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    if cfg.analysis_level == "group":
        _finalise_logs(cfg)
    return status


def _run(cfg: RunConfig) -> int:
    from ..bids.discovery import discover_images

    if not cfg.skip_bids_validation:
        from ..bids.validation import validate_bids_input

        for warning in validate_bids_input(cfg.bids_dir, participant_labels=cfg.participant_label):
            LOGGER.warning("%s", warning)
    common = dict(
        modalities=tuple(cfg.modality), bids_filters=cfg.bids_filters, derivatives=cfg.derivatives,
        mask_source=cfg.mask_source, mask_desc=cfg.mask_desc,
        database_dir=cfg.bids_database_dir or (cfg.work_dir / "bids_db"),
    )
    selected = discover_images(cfg.bids_dir, participant_labels=cfg.participant_label,
                               session_labels=cfg.session_label, reset_database=cfg.reset_bids_db, **common)
    for warning in selected.warnings:
        LOGGER.warning("%s", warning)
    if cfg.participant_label or cfg.session_label:
        cohort = discover_images(cfg.bids_dir, **common)
    else:
        cohort = selected
    images = {mod: recs for mod, recs in selected.images.items() if recs}
    if not images:
        raise NoInputError(
            f"no {' or '.join(cfg.modality)} images found", path=cfg.bids_dir,
            fix="check --modality and the filters, and that anat/ holds *_T1w/*_T2w/*_FLAIR.nii[.gz]",
        )
    print(selected.summary(), file=sys.stderr)
    if cfg.analysis_level == "group":
        _check_batch_sizes(cfg, images)
    _resolve_weights(cfg)
    provenance = _provenance(cfg)
    plan = ", ".join(f"{mod}: {len(recs)} image(s)" for mod, recs in images.items())
    LOGGER.info("plan: %s level, %s; encoder %s on %s (%s)", cfg.analysis_level, plan, cfg.encoder,
                cfg.device, provenance["weights_source"])
    config_file = cfg.work_dir / "runs" / f"config-{cfg.run_id}.json"
    from ..atomic import write_json

    write_json(config_file, cfg.to_dict())
    records = {mod: [_record_dict(r) for r in recs] for mod, recs in images.items()}
    cohort_records = {mod: [_record_dict(r) for r in cohort.images.get(mod, [])] or records[mod]
                      for mod in records}
    _run_workflow(cfg, config_file, records, cohort_records, provenance)
    if cfg.analysis_level != "group":
        chosen = {rec["bids_name"] for recs in records.values() for rec in recs}
        skipped = sorted(p.stem for p in (cfg.work_dir / "skipped" / str(cfg.run_id)).glob("*.json")
                         if p.stem in chosen)
        if skipped:
            LOGGER.error("%d image(s) skipped as bad data: %s (the group level lists them as skipped)",
                         len(skipped), ", ".join(skipped))
            return EXIT_FAILURE
        LOGGER.info("participant level done: tokens cached in %s; run the group level next", cfg.work_dir)
        return 0
    _write_dataset_files(cfg)
    failed = _failed_images(cfg, records)
    if failed:
        LOGGER.error("%d image(s) failed or were skipped: %s (see the status and error columns of "
                     "group_*.tsv, and logs/)", len(failed), ", ".join(failed))
        return EXIT_FAILURE
    LOGGER.info("done: outputs in %s", cfg.output_dir)
    return 0


def _check_batch_sizes(cfg: RunConfig, images: dict[str, list]) -> None:
    from ..errors import BatchTooSmallError

    for modality, recs in images.items():
        b = len(recs)
        k = int(cfg.fraction * (b - 1))
        if k < 1:
            need = next(n for n in range(2, 10_000) if int(cfg.fraction * (n - 1)) >= 1)
            raise BatchTooSmallError(
                f"{modality}: {b} image(s) is below the minimum batch: mutual scoring averages "
                f"K = floor({cfg.fraction} * (B - 1)) = {k} nearest images",
                path=cfg.bids_dir,
                fix=f"score at least {need} {modality} images together (drop the participant filter or "
                f"add subjects), raise --fraction, or leave {modality} out with --modality",
            )
        if b < 15:
            LOGGER.warning("%s: batch of %d images; accuracy drops below B = 15 (paper Table 5)", modality, b)


def _resolve_weights(cfg: RunConfig) -> None:
    from ..core.models import resolve_weights

    info = resolve_weights(cfg.encoder, weights=cfg.weights, allow_download=cfg.allow_download)
    cfg.weights_sha256 = info.sha256
    cfg.weights_source = info.source


def _provenance(cfg: RunConfig) -> dict[str, Any]:
    from ..core.models import encoder_info

    info = encoder_info(cfg.encoder)
    layers = list(cfg.layers or info["default_layers"])
    return {
        "version": __version__, "encoder": cfg.encoder, "timm_name": info.get("timm_name"),
        "weights_sha256": cfg.weights_sha256, "weights_source": cfg.weights_source,
        "is_test_encoder": bool(info.get("is_test")), "seed": cfg.random_seed,
        "cube_size": cfg.cube_size, "fov_mm": cfg.fov_mm, "layers": layers,
        "fraction": cfg.fraction, "projection_dim": cfg.projection_dim,
        "codegraph": cfg.codegraph, "codegraph_pvalue": cfg.codegraph_pvalue,
        "codegraph_resolution": cfg.codegraph_resolution, "device": cfg.device,
        "precision": cfg.precision_effective, "threshold": cfg.threshold, "z_center": cfg.z_center,
        "config_hash": cfg.key(tuple(sorted(cfg.method_dict()))), "run_id": cfg.run_id,
        "command": " ".join(["cg3d"] + sys.argv[1:]),
    }


def _record_dict(record: Any) -> dict[str, Any]:
    data = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def _run_workflow(cfg: RunConfig, config_file: Path, records, cohort_records, provenance) -> None:
    from nipype import config as nipype_config

    from ..workflows.base import init_cg3d_wf

    nprocs = cfg.nprocs or os.cpu_count() or 1
    omp = cfg.omp_nthreads or max(1, (os.cpu_count() or 1) // nprocs)
    os.environ["OMP_NUM_THREADS"] = str(omp)
    use_gpu = cfg.device.startswith("cuda")
    crash_dir = cfg.work_dir / "crash" / cfg.run_id
    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(crash_dir), "crashfile_format": "txt",
            "stop_on_first_crash": "true", "remove_unnecessary_outputs": "false",
            "hash_method": "content", "create_report": "false",
            # MultiProc polls its workers every 2 s by default: seconds lost per node on small runs
            "poll_sleep_duration": "0.2",
        },
        "monitoring": {"enabled": "false"},
    })
    # nipype's own node folders are per run: concurrent participant calls sharing the work dir
    # must not step on each other's (cg3d's content-keyed caches live beside, shared and safe).
    nipype_dir = cfg.work_dir / "nipype" / cfg.run_id
    wf = init_cg3d_wf(
        config_file=config_file, analysis_level=cfg.analysis_level, selected=records,
        cohort=cohort_records, provenance=provenance, use_gpu=use_gpu, n_token_chunks=nprocs,
        base_dir=nipype_dir,
    )
    plugin, plugin_args = _plugin(cfg, nprocs, use_gpu)
    t0 = time.monotonic()
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:
        _raise_recorded_error(cfg, exc)
    LOGGER.info("workflow finished in %.1f s", time.monotonic() - t0)
    shutil.rmtree(nipype_dir, ignore_errors=True)  # kept after a failure, for debugging


def read_plugin_file(path: Path) -> tuple[str, dict[str, Any]]:
    """``--use-plugin``: a nipype plugin YAML (``plugin: SLURM`` and ``plugin_args: {...}``)."""
    import yaml
    from nipype.pipeline import plugins

    example = "plugin: MultiProc\nplugin_args: {n_procs: 8, memory_gb: 32}"
    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--use-plugin is not valid YAML: {exc}", path=path, fix=f"write e.g.\n{example}") from exc
    plugin_args = (spec.get("plugin_args") or {}) if isinstance(spec, dict) else None
    if not isinstance(plugin_args, dict):
        raise UsageError("--use-plugin must hold a mapping with 'plugin' and 'plugin_args'", path=path,
                         fix=f"write e.g.\n{example}")
    name = str(spec.get("plugin", "MultiProc"))
    if not hasattr(plugins, f"{name}Plugin"):
        known = sorted(n[: -len("Plugin")] for n in dir(plugins) if n.endswith("Plugin") and n != "Plugin")
        raise UsageError(f"--use-plugin names an unknown nipype plugin {name!r}", path=path,
                         fix=f"use one of {', '.join(known)}")
    return name, dict(plugin_args)


def _plugin(cfg: RunConfig, nprocs: int, use_gpu: bool) -> tuple[str, dict[str, Any]]:
    if cfg.use_plugin:
        return read_plugin_file(cfg.use_plugin)
    if nprocs == 1:
        return "Linear", {}
    args: dict[str, Any] = {"n_procs": nprocs, "raise_insufficient": False}
    if cfg.mem_gb:
        args["memory_gb"] = cfg.mem_gb
    if use_gpu:
        args["n_gpu_procs"] = 1
        args["mp_context"] = "spawn"  # CUDA cannot be used in forked workers
    return "MultiProc", args


def _raise_recorded_error(cfg: RunConfig, exc: Exception) -> None:
    """Turn a nipype failure into the first recorded cg3d error (with its exit code)."""
    from ..errors import Cg3dError as Base

    errors = sorted((cfg.work_dir / "errors" / cfg.run_id).glob("*.json"))
    if errors:
        info = json.loads(errors[0].read_text())
        message = info["message"]
        exit_code = int(info.get("exit_code", EXIT_FAILURE))
        if exit_code == EXIT_DATAERR and not cfg.skip_bad_images:
            message += "\n  or: rerun with --skip-bad-images to score the other images and list this one as skipped"
        error = Base(message)
        error.exit_code = exit_code
        if "OutOfMemoryError" in info.get("type", "") or "out of memory" in info["message"]:
            raise TempFailError("the GPU ran out of memory: " + info["message"],
                                fix="lower --slice-batch (e.g. 32) or --score-chunk-mb")
        raise error
    raise Base(f"the workflow failed: {exc}", fix=f"see the crash files in {cfg.work_dir / 'crash' / cfg.run_id}")


def _failed_images(cfg: RunConfig, records) -> list[str]:
    failed = []
    for modality, recs in records.items():
        for rec in recs:
            path = cfg.work_dir / "results" / modality / f"{rec['bids_name']}.json"
            if not path.exists() or json.loads(path.read_text()).get("status") != "ok":
                failed.append(rec["bids_name"])
    return failed


def _write_dataset_files(cfg: RunConfig) -> None:
    from ..bids.derivatives import write_bidsignore, write_dataset_description, write_readme

    write_dataset_description(cfg.output_dir, bids_dir=cfg.bids_dir, version=__version__,
                              derivatives=cfg.derivatives)
    write_bidsignore(cfg.output_dir)
    write_readme(cfg.output_dir)


def _finalise_logs(cfg: RunConfig) -> None:
    from ..atomic import write_text

    logs = cfg.output_dir / "logs"
    write_text(logs / f"config-{cfg.run_id}.toml", cfg.to_toml())
    source = cfg.work_dir / "runs" / f"cg3d-{cfg.run_id}.log"
    if source.exists():
        write_text(logs / f"cg3d-{cfg.run_id}.log", source.read_text())
    from .citation import citation_markdown

    write_text(logs / "CITATION.md", citation_markdown(cfg))


def _add_file_log(cfg: RunConfig) -> logging.FileHandler:
    path = cfg.work_dir / "runs" / f"cg3d-{cfg.run_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _remove_if_empty(path: Path, existed: bool) -> None:
    if not existed and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
