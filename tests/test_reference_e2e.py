"""End to end: ``group --save-reference BANK``, then ``participant --reference BANK`` on one new scan.

The bank is 5 subjects at fraction 0.4, so a new image is scored with K = floor(0.4 * 5) = 2,
where a batch of the bank alone has K = floor(0.4 * 4) = 1: a wrong K shows. The exactness test
rebuilds the new image's row of a plain MuSc group run over bank + that image with the bank's
landmarks from the group run's own cached records (not from the bank files), and checks that the
comparison fails for the image prepared with its own landmarks, for another K and for another
reference set.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from bids_fixtures import make_bids_dataset
from test_e2e import run_cg3d, tree_snapshot

from cg3d_bids import records as rec
from cg3d_bids.cache import WorkCache
from cg3d_bids.core.scoring import mutual_scores
from cg3d_bids.reference import load_bank
from cg3d_bids.settings import Settings
from cg3d_bids.stages.context import StageContext
from cg3d_bids.stages.prepare import prepare
from cg3d_bids.stages.tokenize import tokenize_images

pytestmark = pytest.mark.slow

BANK_SUBJECTS = ["01", "02", "03", "04", "05"]
NEW = "06"
FRACTION = "0.4"
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    paths = make_bids_dataset(root / "bids", subjects=[*BANK_SUBJECTS, NEW], modalities=("T1w",), with_masks=True,
                              lesion_subjects=[NEW], seed=3)
    masks = f"masks={paths['masks_dir']}"
    before = tree_snapshot(root / "bids")
    group = run_cg3d(root / "bids", root / "out", root / "work", "-d", masks, "--modality", "T1w", "--no-codegraph",
                     "--fraction", FRACTION, "--participant-label", *BANK_SUBJECTS,
                     "--save-reference", str(root / "bank"))
    # a fresh work dir: nothing of the group run is reused, the new image's tokens are computed anew
    reference = run_cg3d(root / "bids", root / "out-ref", root / "work-ref", "-d", masks, "--fraction", FRACTION,
                         "--participant-label", NEW, "03", "--reference", str(root / "bank"), level="participant")
    return {"root": root, "group": group, "reference": reference, "masks": masks, "before": before}


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (folder, pattern, found)
    return found[0]


def _group_records(root: Path):
    work = root / "work"
    settings = Settings.load(_one(work / "runs", "*/settings.toml"))
    landmarks = rec.load(_one(work / "landmarks" / "T1w", "*.json"), rec.Landmarks)
    batch = rec.load(_one(work / "scores" / "T1w", "*.npz"), rec.BatchScores)
    tokens = [rec.load(_one(work / "tokens" / "T1w", f"sub-{s}_T1w_*.npz"), rec.ImageTokens) for s in BANK_SUBJECTS]
    return settings, landmarks, batch, tokens


def _reference_scores(root: Path) -> rec.BatchScores:
    return rec.load(_one(root / "work-ref" / "scores" / "T1w", "*.npz"), rec.BatchScores)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["bids_name"]: row for row in csv.DictReader(fh, delimiter="\t")}


def test_runs_succeed_and_never_write_inputs(runs):
    assert runs["group"] == 0 and runs["reference"] == 0
    assert tree_snapshot(runs["root"] / "bids") == runs["before"]


def test_the_bank_holds_the_group_runs_tokens_landmarks_settings_and_statistics(runs):
    settings, landmarks, batch, tokens = _group_records(runs["root"])
    bank = load_bank(runs["root"] / "bank")
    entry = bank.modality("T1w")
    assert bank.sizes() == {"T1w": 5} and entry.names == batch.names
    assert entry.landmarks_record() == landmarks
    assert (entry.stats["median"], entry.stats["scale"]) == (batch.median, batch.scale)
    assert entry.stats["fraction"] == 0.4 and entry.stats["k"] == 1 and entry.stats["codegraph"] is False
    assert bank.settings["cube_size"] == 56 and bank.settings["projection_dim"] == 16
    assert bank.settings["layers"] == list(settings.run.layers) and bank.settings["precision"] == "fp32"
    table = _rows(runs["root"] / "out" / "group_T1w.tsv")
    assert [i.score_max for i in entry.images] == [float(table[n]["score_max"]) for n in entry.names]
    for i, item in enumerate(tokens):
        for layer in range(len(entry.layers)):
            np.testing.assert_array_equal(entry.references(layer)[i], item.tokens[layer][item.valid])


def test_new_image_scores_equal_its_row_of_a_group_run_over_bank_plus_it(runs, tmp_path):
    """The exactness test (per layer and averaged, 1e-5 relative), and three ways it fails."""
    root = runs["root"]
    settings, landmarks, _batch, bank_tokens = _group_records(root)
    image = rec.load(_one(root / "work-ref" / "runs", f"*/inputs/T1w/sub-{NEW}_T1w.json"), rec.ImageRecord)
    ctx = StageContext(settings.replace(execution={"work_dir": tmp_path / "w"}), WorkCache(tmp_path / "w", "test"))
    prepared = prepare(ctx, image)
    new = tokenize_images(ctx, [prepared], landmarks)[0].load()  # standardised with the BANK's landmarks

    def row(items, fraction):
        tokens = np.stack([item.tokens for item in items], axis=1)  # (L, B, N, C)
        valid = np.stack([item.valid for item in items])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.stack([mutual_scores(tokens[m], valid, fraction, query=[len(items) - 1])[0]
                             for m in range(tokens.shape[0])])

    expected = row([*bank_tokens, new], 0.4)  # K = floor(0.4 * 5) = 2
    got = _reference_scores(root)
    index = got.index(f"sub-{NEW}_T1w")
    np.testing.assert_allclose(got.per_layer[:, index], expected, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(got.scores[index], expected.mean(axis=0), rtol=RTOL, atol=1e-7)

    def differs(other: np.ndarray) -> bool:
        return not np.allclose(got.per_layer[:, index], other, rtol=RTOL, atol=1e-7)

    from cg3d_bids.core.preprocessing.nyul import landmarks_from_percentiles

    own = rec.Landmarks(modality="T1w", key="own", percentiles=landmarks.percentiles, images=(image.bids_name,),
                        landmarks=tuple(float(v) for v in landmarks_from_percentiles(np.array([prepared.percentiles]))))
    own_tokens = tokenize_images(ctx, [prepared], own)[0].load()
    assert differs(row([*bank_tokens, own_tokens], 0.4)), "prepared with its own landmarks must not pass"
    assert differs(row([*bank_tokens, new], 0.3)), "K = floor(0.3 * 5) = 1 must not pass"
    assert differs(row([*bank_tokens[1:], new], 0.5)), "K = 2 against four of the five references must not pass"


def test_a_bank_image_scored_against_the_bank_reproduces_its_group_run_scores(runs):
    """It is not compared with itself: its row equals the group run's (fresh work dir, tokens recomputed)."""
    _settings, _landmarks, batch, _tokens = _group_records(runs["root"])
    got = _reference_scores(runs["root"])
    name = "sub-03_T1w"
    np.testing.assert_allclose(got.per_layer[:, got.index(name)], batch.per_layer[:, batch.index(name)],
                               rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(got.scores[got.index(name)], batch.scores[batch.index(name)], rtol=RTOL, atol=1e-7)


def test_outputs_say_which_bank_and_how_the_subject_ranks_against_it(runs):
    root = runs["root"]
    out = root / "out-ref"
    bank = load_bank(root / "bank")
    entry = bank.modality("T1w")
    rows = _rows(out / "reference_T1w.tsv")
    assert set(rows) == {"sub-03_T1w", f"sub-{NEW}_T1w"}
    new = rows[f"sub-{NEW}_T1w"]
    assert (new["bank_images"], new["k"], new["reference_checksum"]) == ("5", "2", bank.checksum)
    assert (rows["sub-03_T1w"]["bank_images"], rows["sub-03_T1w"]["k"]) == ("4", "1")
    score = float(new["score_max"])
    bank_scores = [i.score_max for i in entry.images]
    assert int(new["rank"]) == 1 + sum(s > score for s in bank_scores)
    assert math.isclose(float(new["score_percentile"]), 100 * sum(s <= score for s in bank_scores) / 5)
    dictionary = json.loads((out / "reference_T1w.json").read_text())
    assert "bank" in dictionary["rank"]["Description"]
    assert dictionary["Provenance"]["reference_checksum"] == bank.checksum

    sidecar = json.loads((out / f"sub-{NEW}" / "anat" / f"sub-{NEW}_label-anomaly_desc-T1w_probseg.json").read_text())
    assert (sidecar["BatchMedian"], sidecar["BatchScale"]) == (entry.stats["median"], entry.stats["scale"])
    assert sidecar["ReferenceBank"]["Checksum"] == bank.checksum and sidecar["ReferenceBank"]["Images"] == 5
    assert sidecar["ReferenceBank"]["Rank"] == int(new["rank"])
    assert sidecar["Settings"]["reference_bank"] == str(root / "bank")
    assert sidecar["Settings"]["codegraph"] is False
    report = (out / f"sub-{NEW}.html").read_text()
    assert bank.checksum in report and "of 6" in report  # rank among the 5 bank images and this one
    assert "reference_*" in (out / ".bidsignore").read_text()
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"


def test_settings_that_differ_from_the_bank_stop_with_both_values(runs, capsys):
    root = runs["root"]
    status = run_cg3d(root / "bids", root / "out-x", root / "work-x", "-d", runs["masks"], "--fraction", FRACTION,
                      "--participant-label", NEW, "--reference", str(root / "bank"), "--projection-dim", "8",
                      "--cube-size", "112", level="participant")
    err = capsys.readouterr().err
    assert status == 64
    assert "--projection-dim: bank 16, this run 8" in err and "--cube-size: bank 56, this run 112" in err
    assert not (root / "out-x").exists()


def test_a_bank_too_small_for_the_fraction_is_refused(runs, capsys):
    root = runs["root"]
    status = run_cg3d(root / "bids", root / "out-y", root / "work-y", "-d", runs["masks"], "--fraction", "0.1",
                      "--participant-label", NEW, "--reference", str(root / "bank"), level="participant")
    err = capsys.readouterr().err
    assert status == 66 and "K = floor(0.1 * 5) = 0" in err and "at least 10" in err


@pytest.mark.parametrize(("level", "option", "message"), [
    ("group", "--reference", "participant-level option"),
    ("participant", "--save-reference", "group-level option"),
])
def test_options_at_the_wrong_level_are_usage_errors(runs, capsys, level, option, message):
    root = runs["root"]
    status = run_cg3d(root / "bids", root / "out-z", root / "work-z", option, str(root / "bank"), level=level)
    assert status == 64 and message in capsys.readouterr().err


def test_a_modality_the_bank_lacks_is_named(runs, capsys):
    root = runs["root"]
    status = run_cg3d(root / "bids", root / "out-t2", root / "work-t2", "--modality", "T2w", "--reference",
                      str(root / "bank"), level="participant")
    assert status == 64 and "has no T2w images (it has T1w)" in capsys.readouterr().err
