"""The stage functions on their own (no nipype): each typed function, its cache and its failures.

A tiny BIDS dataset (6 subjects, 4 mm, masks), the random test encoder and a 28^3 cube keep each
stage call well under a second.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids import records as rec
from cg3d_bids import stages
from cg3d_bids.bids.discovery import discover_images
from cg3d_bids.cli.run import resolve_run_info
from cg3d_bids.errors import InputDataError, NoInputError, TempFailError
from cg3d_bids.interfaces.stage import run_stage
from cg3d_bids.settings import Settings
from cg3d_bids.stages import StageContext

pytestmark = pytest.mark.slow  # one tiny dataset through every stage (about 10 s)

SUBJECTS = ["01", "02", "03", "04", "05", "06"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    paths = make_bids_dataset(root / "bids", subjects=SUBJECTS, modalities=("T1w",), with_masks=True,
                              lesion_subjects=["03"], seed=4)
    images = discover_images(paths["bids_dir"], modalities=("T1w",), derivatives={"masks": paths["masks_dir"]})
    return {"root": root, "paths": paths, "images": images["T1w"]}


def context(dataset, tmp_path, **execution) -> StageContext:
    settings = Settings().replace(
        inputs={"bids_dir": dataset["paths"]["bids_dir"], "output_dir": tmp_path / "out", "modality": ("T1w",)},
        method={"encoder": "test-tiny-vit", "cube_size": 28, "projection_dim": 8},
        execution={"device": "cpu", "work_dir": tmp_path / "work", **execution},
    )
    return StageContext.from_settings(resolve_run_info(settings, run_id="test-run"))


def test_prepare_is_cached_by_content(dataset, tmp_path, monkeypatch):
    ctx = context(dataset, tmp_path)
    first = stages.prepare(ctx, dataset["images"][0])
    assert first.usable and first.cube_size == 28 and first.cube_mask().shape == (28, 28, 28)
    assert list(first.percentiles) == sorted(first.percentiles) and first.brain_voxels_cube == first.cube_mask().sum()
    import cg3d_bids.core.preprocessing as preprocessing

    monkeypatch.setattr(preprocessing, "make_cube", lambda *a, **k: pytest.fail("recomputed a cached image"))
    again = stages.prepare(ctx, dataset["images"][0])
    assert again.key == first.key and np.array_equal(again.cube_mask(), first.cube_mask())


def _constant_copy(dataset, tmp_path) -> rec.ImageRecord:
    image = dataset["images"][1]
    source = nib.load(image.path)
    path = tmp_path / "constant_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.full(source.shape, 7.0, np.float32), source.affine), path)
    return dataclasses.replace(image, path=path, bids_name="sub-02_T1w")


def test_a_constant_image_is_bad_data_and_skippable(dataset, tmp_path):
    image = _constant_copy(dataset, tmp_path)
    with pytest.raises(InputDataError, match="constant"):
        stages.prepare(context(dataset, tmp_path), image)
    ctx = context(dataset, tmp_path, skip_bad_images=True)
    skipped = stages.prepare(ctx, image)
    assert skipped.status == "skipped" and "constant" in skipped.error
    assert ctx.cache.skipped() == {"sub-02_T1w": skipped.error}
    assert not ctx.cache.prep_path(image, skipped.key).exists(), "a skipped image is never cached"


def test_landmarks_leave_skipped_images_out(dataset, tmp_path):
    ctx = context(dataset, tmp_path)
    prepared = [stages.prepare(ctx, image) for image in dataset["images"][:3]]
    skipped = dataclasses.replace(prepared[0], status="skipped", error="x")
    landmarks = stages.landmarks(ctx, [skipped, *prepared[1:]], "T1w")
    assert landmarks.images == ("sub-02_T1w", "sub-03_T1w") and landmarks.landmarks[0] == 0.0
    assert landmarks.landmarks[-1] == pytest.approx(1.0)
    with pytest.raises(NoInputError, match="every one was skipped"):
        stages.landmarks(ctx, [skipped], "T1w")


@pytest.fixture(scope="module")
def scored(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scored")
    ctx = context(dataset, tmp)
    prepared = [stages.prepare(ctx, image) for image in dataset["images"]]
    landmarks = stages.landmarks(ctx, prepared, "T1w")
    refs = stages.tokenize(ctx, prepared[::-1], landmarks)  # any order in, batch order out of score
    order = [p.name for p in prepared]
    return {"ctx": ctx, "prepared": prepared, "landmarks": landmarks, "refs": refs, "order": order,
            "scores": stages.score(ctx, refs, order, "T1w")}


@pytest.mark.slow
def test_tokens_and_scores(scored):
    tokens = scored["refs"][0].load()
    assert tokens.tokens.shape == (4, 8, 24) and tokens.valid.any() and tokens.is_test
    scores = scored["scores"]
    assert scores.names == tuple(scored["order"]) and scores.scores.shape == (6, 8) and scores.grid == 2
    assert np.all(scores.scores[~scores.valid] == 0) and scores.scale > 0


def test_score_passes_the_block_memory_setting(scored, monkeypatch):
    import cg3d_bids.core.scoring as scoring

    seen = {}
    real = scoring.codegraph_scores

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "codegraph_scores", spy)
    ctx = scored["ctx"]
    ctx = StageContext.from_settings(ctx.settings.replace(execution={"score_chunk_mb": 7}, method={"fraction": 0.4}))
    stages.score(ctx, scored["refs"], scored["order"], "T1w")
    assert seen["block_mb"] == 7


def test_outputs_write_maps_or_record_the_failure(scored, monkeypatch):
    ctx, prepared = scored["ctx"], scored["prepared"][2]
    ref = [stages.Ref(ctx.cache.store(scored["scores"]), rec.BatchScores)]
    result = stages.outputs(ctx, prepared, ref)
    assert result.ok and result.score_max > 0 and result.outside_fraction == prepared.outside_fraction
    assert result.batch == 1
    probseg = ctx.settings.inputs.output_dir / "sub-03" / "anat" / "sub-03_label-anomaly_desc-T1w_probseg.nii.gz"
    assert nib.load(probseg).shape == nib.load(prepared.image.path).shape
    import cg3d_bids.core.maps as maps

    monkeypatch.setattr(maps, "subject_summary", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    failed = stages.outputs(ctx, prepared, ref)
    assert failed.status == "failed" and "disk full" in failed.error
    strict = StageContext.from_settings(ctx.settings.replace(execution={"stop_on_first_crash": True}))
    with pytest.raises(OSError, match="disk full"):
        stages.outputs(strict, prepared, ref)
    skipped = dataclasses.replace(prepared, status="skipped", error="bad")
    assert stages.outputs(ctx, skipped, ref).status == "skipped"


def test_run_stage_times_calls_and_records_failures(scored, monkeypatch):
    ctx = scored["ctx"]
    run_stage(stages.landmarks, ctx, prepared=scored["prepared"], modality="T1w")
    from cg3d_bids import timings

    rows = {(r.stage, r.modality): r for r in timings.collect(ctx.timings_dir)}
    assert rows[("landmarks", "T1w")].images == 6

    class FakeOOM(MemoryError):
        pass

    def boom(ctx, prepared, modality):
        raise FakeOOM("cannot allocate")

    boom.stage_name = "landmarks"
    with pytest.raises(TempFailError, match="ran out of memory"):
        run_stage(boom, ctx, prepared=scored["prepared"], modality="T1w")
    failure = ctx.cache.first_failure()
    assert failure.exit_code == 75 and failure.context == "landmarks-T1w"


def test_figures_are_drawn_with_the_maps_and_reused_by_the_report(scored, monkeypatch):
    ctx, prepared = scored["ctx"], scored["prepared"][4]
    ref = [stages.Ref(ctx.cache.store(scored["scores"]), rec.BatchScores)]
    result = stages.outputs(ctx, prepared, ref)
    out = ctx.settings.inputs.output_dir
    assert result.figures is not None and result.figures.anomaly and result.figures.mask
    assert (out / result.figures.anomaly).exists() and (out / result.figures.mask).exists()
    from cg3d_bids.reports import figures, write_subject_report
    from cg3d_bids.reports.data import report_image

    monkeypatch.setattr(figures, "load_volume", lambda *a, **k: pytest.fail("the report read an image again"))
    html = write_subject_report(out, result.image.subject, [report_image(result, out, 6)],
                                ctx.settings.provenance()).read_text()
    assert result.figures.anomaly.split("/")[-1] in html and "figure failed" not in html.lower()


def test_tokens_are_written_in_the_background_and_a_failed_write_stops_the_stage(dataset, tmp_path, monkeypatch):
    """Every token record is stored (cube files removed) although the writes run beside the
    encoder; a write that fails stops the stage with its error instead of being lost."""
    ctx = context(dataset, tmp_path)
    prepared = [stages.prepare(ctx, image) for image in dataset["images"][:3]]
    landmarks = stages.landmarks(ctx, prepared, "T1w")
    refs = stages.tokenize(ctx, prepared, landmarks)
    assert [r.load().bids_name for r in refs] == [p.name for p in prepared]
    assert not any(ctx.cache.cube_path(p.image, p.key).exists() for p in prepared)

    other = context(dataset, tmp_path / "again")
    prepared = [stages.prepare(other, image) for image in dataset["images"][:3]]
    real, calls = other.cache.store, []

    def store(record):
        calls.append(record.bids_name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(record)

    monkeypatch.setattr(other.cache, "store", store)
    with pytest.raises(OSError, match="No space left"):
        stages.tokenize(other, prepared, landmarks)
    assert calls[:2] == [p.name for p in prepared[:2]]
