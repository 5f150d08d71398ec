"""``cg3d BIDS_DIR OUTPUT_DIR LEVEL``: start-up checks in the order that fails fastest, then the workflow.

Order (bids_app_conventions.md §1.5): arguments (64/17) -> paths (64/73) -> device (69) ->
locks (75, :mod:`cg3d_bids.locks`) -> BIDS validation (16) -> discovery and filters (18/66) ->
weights (66) -> dataset-level files -> workflow -> outputs. The dataset-level files
(``dataset_description.json``, ``README.md``, ``.bidsignore``) are written before any other
output, so an interrupted run never leaves a folder that fails the BIDS validator; a failing run
removes an output folder that it created and left without outputs. SIGTERM/SIGINT/SIGHUP stop
the run and its workers and exit 143/130/129 (:mod:`cg3d_bids.signals`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import __version__, locks, logging_setup, signals, timings
from ..cache import WorkCache
from ..errors import (
    EXIT_DATAERR,
    EXIT_FAILURE,
    BatchTooSmallError,
    CantCreateError,
    Cg3dError,
    DeviceUnavailableError,
    NoInputError,
    UsageError,
)
from ..settings import Settings
from .parser import parse_args, settings_from_args

LOGGER = logging.getLogger("cg3d")

__all__ = ["main", "run", "resolve_run_info"]


def main(argv: Sequence[str] | None = None) -> int:
    """``cg3d BIDS_DIR OUTPUT_DIR LEVEL [options]``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.bids_exec_spec:  # BEP027: works with or without the positionals
        from ..boutiques import descriptor_text

        print(descriptor_text())
        return 0
    _setup_logging(args.verbose)
    try:
        with signals.stop_on_signals():
            return run(settings_from_args(args, argv))
    except Cg3dError as exc:
        LOGGER.error("%s", exc.render(), exc_info=True, extra=logging_setup.FILE_ONLY)
        print(f"cg3d: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        name = exc.signame if isinstance(exc, signals.Interrupted) else "SIGINT"
        print(f"cg3d: interrupted ({name}); rerun the same command to resume from the work directory",
              file=sys.stderr)
        return getattr(exc, "exit_code", 130)


def _setup_logging(verbose: int) -> None:
    logging_setup.configure(verbose)


# --------------------------------------------------------------------------------------------
def check_paths(settings: Settings) -> bool:
    """Output and work folders: not the input, not inside it (except derivatives/), writable.

    Returns whether the output folder already existed.
    """
    bids = settings.inputs.bids_dir.resolve()
    out = settings.inputs.output_dir.resolve()
    if out == bids:
        raise UsageError("The selected output folder is the same as the input BIDS folder.",
                         path=out, fix=f"choose another output folder (suggestion: {bids}/derivatives/cg3d)")
    if out.is_relative_to(bids) and not out.is_relative_to(bids / "derivatives"):
        raise UsageError("The selected output folder is inside the input BIDS dataset (outside derivatives/).",
                         path=out, fix=f"write outside the dataset or under {bids}/derivatives/cg3d")
    work = settings.execution.work_dir.resolve()
    if work.is_relative_to(bids):
        raise UsageError("The selected working directory is a subdirectory of the input BIDS folder.",
                         path=work, fix="use -w/--work-dir outside the dataset (inputs are never written)")
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
        raise CantCreateError(f"cannot create the {label} folder: {probe} is a file", path=path,
                              fix=f"choose a {label} folder that is not under a file")
    try:  # a real write: permissions, read-only mounts and root squash all show up here
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".cg3d-write-test-"):
            pass
    except OSError as exc:
        raise CantCreateError(f"cannot create or write the {label} folder ({exc.strerror})",
                              path=path, fix=hint) from exc


def check_device(settings: Settings) -> None:
    """Fail at once when CUDA is requested and not visible (never fall back silently)."""
    device = settings.execution.device
    if not device.startswith("cuda"):
        return
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA init before forking
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        raise DeviceUnavailableError(
            f"--device {device} was requested but no such CUDA GPU is visible.",
            fix="run the container with GPUs (docker run --gpus all ..., apptainer run --nv ...), "
            "or pass --device cpu (much slower with real encoders)",
        )


def resolve_run_info(settings: Settings, run_id: str | None = None) -> Settings:
    """Fix the run's facts once: run id, command line, the weights and their sha256, the
    effective precision and layers (every later step reads these, never re-resolves them)."""
    from ..core.models import encoder_info, resolve_precision, resolve_weights

    method, execution = settings.method, settings.execution
    weights = resolve_weights(method.encoder, weights=method.weights, allow_download=method.allow_download)
    info = encoder_info(method.encoder)
    return settings.replace(run={
        "run_id": run_id or time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8],
        "command": " ".join(["cg3d", *sys.argv[1:]]),
        "weights_sha256": weights.sha256, "weights_source": weights.source,
        "is_test_encoder": bool(info.get("is_test")), "timm_name": info.get("timm_name"),
        "precision": resolve_precision(execution.precision, execution.device),
        "layers": tuple(method.layers or info["default_layers"]),
    })


# --------------------------------------------------------------------------------------------
def run(settings: Settings) -> int:
    """The whole run after argument parsing. Raises Cg3dError on failure."""
    from .reference import check_reference_options

    check_reference_options(settings)
    output_existed = check_paths(settings)
    check_device(settings)
    execution = settings.execution
    if execution.use_plugin:
        read_plugin_file(execution.use_plugin)  # a bad plugin file fails now, not after discovery
    try:
        with locks.hold(settings):
            return _run_locked(settings)
    except BaseException:
        _remove_if_empty(settings.inputs.output_dir, output_existed)
        raise


def _run_locked(settings: Settings) -> int:
    """The run, holding the output folder (and work dir) locks."""
    execution = settings.execution
    if execution.clean_workdir and execution.work_dir.exists():
        locks.clear_folder(execution.work_dir)
    execution.work_dir.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]
    cache = WorkCache(execution.work_dir, run_id)
    cache.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = _add_file_log(cache.run_dir / "cg3d.log")
    started, cpu0 = time.time(), time.process_time()
    LOGGER.info("cg3d %s, run %s: %s level on %s", __version__, run_id, settings.inputs.analysis_level,
                settings.inputs.bids_dir)
    try:
        status = _run(settings, cache)
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    timings.record(cache.run_dir / "timings", "total", timings.ALL, 0, started, time.time(),
                   time.process_time() - cpu0 + _children_cpu())
    _finalise_logs(Settings.load(cache.run_dir / "settings.toml"), cache)
    return status


def _children_cpu() -> float:
    """CPU seconds of the worker processes that have ended (nipype MultiProc workers)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(settings: Settings, cache: WorkCache) -> int:
    from ..bids.discovery import discover_images

    bank = None
    if settings.inputs.reference is not None:  # a saved cohort replaces the batch (docs/reference.md)
        from .reference import open_reference

        settings, bank = open_reference(settings)
    inputs = settings.inputs
    with timings.measure(cache.run_dir / "timings", "discover"):
        if not inputs.skip_bids_validation:
            from ..bids.validation import validate_bids_input

            for warning in validate_bids_input(inputs.bids_dir, participant_labels=inputs.participant_label):
                LOGGER.warning("%s", warning)
        common = dict(
            modalities=tuple(inputs.modality), bids_filters=inputs.bids_filters, derivatives=inputs.derivatives,
            mask_source=inputs.mask_source, mask_desc=inputs.mask_desc,
            database_dir=inputs.bids_database_dir or (settings.execution.work_dir / "bids_db"),
        )
        selected = discover_images(inputs.bids_dir, participant_labels=inputs.participant_label,
                                   session_labels=inputs.session_label, reset_database=inputs.reset_bids_db,
                                   **common)
        for warning in selected.warnings:
            LOGGER.warning("%s", warning)
        cohort = discover_images(inputs.bids_dir, **common) if ((inputs.participant_label or inputs.session_label)
                                                                and bank is None) else selected
    images = {mod: recs for mod, recs in selected.images.items() if recs}
    if not images:
        raise NoInputError(
            f"no {' or '.join(inputs.modality)} images found", path=inputs.bids_dir,
            fix="check --modality and the filters, and that anat/ holds *_T1w/*_T2w/*_FLAIR.nii[.gz]",
        )
    print(selected.summary(), file=sys.stderr)
    batches = _plan_batches(settings, images) if inputs.analysis_level == "group" else None
    settings = resolve_run_info(settings, cache.run_id)
    if bank is not None:
        from .reference import bind_reference

        settings = bind_reference(settings, bank)
    from ..atomic import write_text

    settings_file = write_text(cache.run_dir / "settings.toml", settings.to_toml())
    plan = ", ".join(f"{mod}: {len(recs)} image(s)" for mod, recs in images.items())
    LOGGER.info("plan: %s level, %s; encoder %s on %s (%s)", inputs.analysis_level, plan,
                settings.method.encoder, settings.execution.device, settings.run.weights_source)
    if inputs.analysis_level == "group" and settings.execution.stage in ("score", "graph", "rescore"):
        _run_scoring_step(settings, cache, images, cohort.images, batches)
        LOGGER.info("group step %s done (%s); the next step reads the work directory %s", settings.execution.stage,
                    settings.execution.shard or "all shards", settings.execution.work_dir)
        return 0
    if inputs.analysis_level == "group" and settings.execution.stage == "outputs":
        _run_scoring_step(settings, cache, images, cohort.images, batches)
    stored = {rec.bids_name: cache.store(rec) for recs in cohort.images.values() for rec in recs}
    stored.update({rec.bids_name: cache.store(rec) for recs in images.values() for rec in recs})
    selected_paths = {mod: [(r.bids_name, stored[r.bids_name]) for r in recs] for mod, recs in images.items()}
    _write_dataset_files(settings)  # first: an interrupted run leaves a folder that validates
    cohort_paths = {mod: [(r.bids_name, stored[r.bids_name]) for r in (cohort.images.get(mod) or recs)]
                    for mod, recs in images.items()}
    subjects = sorted({rec.subject for recs in images.values() for rec in recs})
    _run_workflow(settings, settings_file, cache, selected_paths, cohort_paths, subjects, batches)
    chosen = {rec.bids_name for recs in images.values() for rec in recs}
    skipped = sorted(name for name in cache.skipped() if name in chosen)
    if inputs.analysis_level != "group" and bank is None:
        if skipped:
            LOGGER.error("%d image(s) skipped as bad data: %s (the group level lists them as skipped)",
                         len(skipped), ", ".join(skipped))
            return EXIT_FAILURE
        LOGGER.info("participant level done: tokens cached in %s; run the group level next",
                    settings.execution.work_dir)
        return 0
    if settings.execution.save_reference is not None:
        from .reference import finish_saved_reference

        finish_saved_reference(settings, cache, list(images))
    if inputs.analysis_level == "group":
        from ..bids.stale import check_subject_reports

        check_subject_reports(inputs.output_dir, remove=settings.execution.remove_stale_outputs)
    failed = _failed_images(cache, images)
    if failed:
        LOGGER.error("%d image(s) failed or were skipped: %s (see the status and error columns of "
                     "group_*.tsv, and logs/)", len(failed), ", ".join(failed))
        return EXIT_FAILURE
    LOGGER.info("done: outputs in %s", inputs.output_dir)
    return 0


def _run_scoring_step(settings: Settings, cache: WorkCache, images: dict[str, list], cohort: dict[str, list],
                      batches: dict[str, list[tuple[int, list[str]]]]) -> None:
    """One step of sharded group scoring (``--stage score|graph|rescore|outputs``), in this process:
    the images' cached preparation and tokens (computed when missing), then the step for every batch."""
    from .. import stages
    from ..interfaces.stage import run_stage
    from ..stages.shards import shard_count

    ctx = stages.StageContext(settings, cache)
    step, shard = settings.execution.stage, settings.execution.shard
    for modality, recs in images.items():
        prepared = {rec.bids_name: run_stage(stages.prepare, ctx, image=rec)
                    for rec in (cohort.get(modality) or recs)}
        landmarks = run_stage(stages.landmarks, ctx, prepared=list(prepared.values()), modality=modality)
        tokens = run_stage(stages.tokenize, ctx, prepared=[prepared[r.bids_name] for r in recs], landmarks=landmarks)
        for batch, order in batches[modality]:
            common = dict(tokens=tokens, order=order, modality=modality, batch=batch)
            if step == "score":
                run_stage(stages.score_shard, ctx, **common, shard=shard)
            elif step == "rescore":
                run_stage(stages.rescore_shard, ctx, **common, shard=shard)
            elif step == "graph":
                run_stage(stages.graph, ctx, **common, shards=shard_count(ctx, "rows", **common))
            else:
                run_stage(stages.assemble, ctx, **common, shards=shard_count(ctx, "final", **common))


def _plan_batches(settings: Settings, images: dict[str, list]) -> dict[str, list[tuple[int, list[str]]]]:
    """Per modality, the scoring batches ``(number, names)`` (``--batch-size``; the assignment is
    kept in the work dir so that an image keeps its chunk), each large enough for K >= 1."""
    from ..batches import assign_batches, assignment_path, batches_of, load_assignment, save_assignment
    with collector_paused():  # the first import of torch
        from ..core.scoring import minimum_batch_size

    method, execution = settings.method, settings.execution
    need = minimum_batch_size(method.fraction)
    plan = {}
    for modality, recs in images.items():
        names = [r.bids_name for r in recs]
        path = assignment_path(execution.work_dir, modality, method.batch_size, method.random_seed)
        previous = {} if execution.reassign_batches else load_assignment(path)
        assignment = assign_batches(names, method.batch_size, method.random_seed, previous)
        if method.batch_size:
            save_assignment(path, assignment)
        plan[modality] = batches_of(assignment, names)
        small = min(len(members) for _, members in plan[modality])
        if small < need:
            where = (f"{modality}: {len(names)} image(s)" if len(plan[modality]) == 1 else
                     f"{modality}: a batch of {small} image(s) (--batch-size {method.batch_size} over {len(names)})")
            raise BatchTooSmallError(
                f"{where} is below the minimum batch: mutual scoring averages K = floor({method.fraction} "
                f"* (B - 1)) nearest images, so a batch needs {need} images at this fraction",
                path=settings.inputs.bids_dir,
                fix=(f"raise --batch-size (at least {need}; the paper keeps accuracy from B = 30)" if method.batch_size
                     else f"score at least {need} {modality} images together (drop the participant filter "
                     f"or add subjects), raise --fraction, or leave {modality} out with --modality"),
            )
        if small < 15:
            LOGGER.warning("%s: batch of %d images; accuracy drops below B = 15 (paper Table 5)", modality, small)
        if len(plan[modality]) > 1:
            LOGGER.info("%s: %d scoring batches of %s images", modality, len(plan[modality]),
                        ", ".join(str(len(m)) for _, m in plan[modality]))
    return plan


def _run_workflow(settings: Settings, settings_file: Path, cache: WorkCache, selected, cohort,
                  subjects: list[str], batches=None) -> None:
    from nipype import config as nipype_config

    from .. import workers
    from ..resources import available_cpus, default_threads
    from ..workflows.base import init_cg3d_wf

    execution = settings.execution
    cpus = available_cpus()
    nprocs = execution.nprocs or cpus
    omp = execution.omp_nthreads or default_threads(nprocs, cpus)
    os.environ["OMP_NUM_THREADS"] = str(omp)
    use_gpu = execution.device.startswith("cuda")
    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(cache.run_dir / "crash"), "crashfile_format": "txt",
            "stop_on_first_crash": "true", "remove_unnecessary_outputs": "false",
            "hash_method": "timestamp", "create_report": "false",
            # MultiProc polls its workers every 2 s by default: seconds lost per node on small runs
            "poll_sleep_duration": "0.2",
        },
        "monitoring": {"enabled": "false"},
    })
    # nipype's node folders are per run: concurrent participant calls sharing the work dir never
    # step on each other's (the content-keyed work cache beside them is shared and safe).
    nipype_dir = cache.run_dir / "nipype"
    if settings.inputs.reference is not None:
        from ..workflows.reference import init_reference_wf

        wf = init_reference_wf(settings_file=settings_file, selected=selected, subjects=subjects, use_gpu=use_gpu,
                               n_chunks=nprocs, base_dir=nipype_dir)
    else:
        wf = init_cg3d_wf(settings_file=settings_file, analysis_level=settings.inputs.analysis_level,
                          selected=selected, cohort=cohort, subjects=subjects, batches=batches, use_gpu=use_gpu,
                          n_chunks=nprocs, base_dir=nipype_dir, score_threads=max(omp, min(cpus, nprocs * omp)))
    if settings.execution.save_reference is not None:
        from ..workflows.reference import connect_save_reference

        connect_save_reference(wf, settings_file, list(selected), batches)
    plugin, plugin_args = _plugin(settings, nprocs, use_gpu)
    if plugin == "MultiProc" and plugin_args.get("mp_context") != "spawn":
        _preload()  # forked workers inherit what the main process has imported, once for all
    # nipype's MultiProc runs a full gc.collect() before each submission: with the imported
    # modules frozen out of the collector's reach that costs milliseconds, not ~0.4 s each
    gc.freeze()
    t0 = time.monotonic()
    try:
        wf.run(plugin=workers.runner(plugin, plugin_args), plugin_args=plugin_args)
    except Exception as exc:
        _raise_recorded_error(settings, cache, exc)
    finally:
        gc.unfreeze()
    LOGGER.info("workflow finished in %.1f s", time.monotonic() - t0)
    shutil.rmtree(nipype_dir, ignore_errors=True)  # kept after a failure, for debugging


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The garbage collector off for the block (restored after). Importing torch, timm and
    matplotlib creates ~0.5 M long-lived objects, and the full collections that their creation
    triggers (6-7 of them) free nothing: 0.5-0.8 core-s per run."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _preload() -> None:
    """Import the stages' heavy modules (torch, timm, scipy, matplotlib) before nipype forks its
    workers: each worker would otherwise import them again (seconds of CPU per worker)."""
    with collector_paused():
        import matplotlib.backends.backend_agg  # noqa: F401  (the figures' raster layers and PNGs)
        import matplotlib.backends.backend_svg  # noqa: F401  (the figures' SVGs)
        import scipy.ndimage  # noqa: F401
        import timm.models.vision_transformer  # noqa: F401
        import torch  # noqa: F401

        from .. import stages  # noqa: F401
        from ..core.models import encoders  # noqa: F401
        from ..reports import figures, subject  # noqa: F401


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


def _plugin(settings: Settings, nprocs: int, use_gpu: bool) -> tuple[str, dict[str, Any]]:
    execution = settings.execution
    if execution.use_plugin:
        return read_plugin_file(execution.use_plugin)
    if nprocs == 1:
        return "Linear", {}
    args: dict[str, Any] = {"n_procs": nprocs, "raise_insufficient": False}
    if execution.mem_gb:
        args["memory_gb"] = execution.mem_gb
    if use_gpu:
        args["n_gpu_procs"] = 1
        args["mp_context"] = "spawn"  # CUDA cannot be used in forked workers
    return "MultiProc", args


def _raise_recorded_error(settings: Settings, cache: WorkCache, exc: Exception) -> None:
    """Turn a nipype failure into the first recorded cg3d error (by time), with its exit code."""
    failure = cache.first_failure()
    if failure is None:
        raise Cg3dError(f"the workflow failed: {exc}", fix=f"see the crash files in {cache.run_dir / 'crash'}")
    LOGGER.error("%s failed:\n%s", failure.context, failure.traceback, extra=logging_setup.FILE_ONLY)
    message = failure.message
    if failure.exit_code == EXIT_DATAERR and not settings.execution.skip_bad_images:
        message += "\n  or: rerun with --skip-bad-images to score the other images and list this one as skipped"
    error = Cg3dError(message)
    error.exit_code = failure.exit_code
    raise error


def _failed_images(cache: WorkCache, images: dict[str, list]) -> list[str]:
    from .. import records as rec

    failed = []
    for modality, recs in images.items():
        for image in recs:
            path = cache.run_dir / "results" / modality / f"{image.bids_name}.json"
            if not path.exists() or not rec.load(path, rec.ImageResult).ok:
                failed.append(image.bids_name)
    return failed


def _write_dataset_files(settings: Settings) -> None:
    from ..bids.derivatives import write_bidsignore, write_dataset_description, write_readme

    write_dataset_description(settings.inputs.output_dir, bids_dir=settings.inputs.bids_dir, version=__version__,
                              derivatives=settings.inputs.derivatives)
    write_bidsignore(settings.inputs.output_dir)
    write_readme(settings.inputs.output_dir, test_encoder=settings.run.is_test_encoder)


def _finalise_logs(settings: Settings, cache: WorkCache) -> None:
    """``logs/``: the run's settings, log, timings and (group level) the citation text."""
    from ..atomic import write_text
    from .citation import citation_markdown

    logs = settings.inputs.output_dir / "logs"
    run_id = settings.run.run_id
    write_text(logs / f"config-{run_id}.toml", settings.to_toml())
    log = cache.run_dir / "cg3d.log"
    if log.exists():
        write_text(logs / f"cg3d-{run_id}.log", log.read_text())
    rows = timings.collect(cache.run_dir / "timings")
    timings.write_tsv(logs / f"timings-{run_id}.tsv", rows)
    if settings.inputs.analysis_level == "group":
        write_text(logs / "CITATION.md", citation_markdown(settings))
        from ..reports.group import group_report_path, insert_timings

        for modality in settings.inputs.modality:
            report = group_report_path(settings.inputs.output_dir, modality)
            if report.exists():
                insert_timings(report, modality, rows, run_id)


def _add_file_log(path: Path) -> logging.FileHandler:
    return logging_setup.add_file(path)


def _remove_if_empty(path: Path, existed: bool) -> None:
    """Remove an output folder this run created and left with nothing but the dataset-level files."""
    from ..bids.derivatives import remove_if_without_outputs

    if not existed:
        remove_if_without_outputs(path)
