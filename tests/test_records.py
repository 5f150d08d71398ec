"""The typed stage records and their one codec (JSON or npz, type and schema checked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cg3d_bids import records as rec
from cg3d_bids.core.maps import Component


def image(name: str = "sub-01_ses-a_T1w") -> rec.ImageRecord:
    return rec.ImageRecord(subject="01", session="a", modality="T1w", path=Path(f"/bids/{name}.nii.gz"),
                           relpath=f"sub-01/ses-a/anat/{name}.nii.gz", entities={"sub": "01", "ses": "a"},
                           bids_name=name, mask_path=Path("/masks/m.nii.gz"), mask_source="derivatives:masks",
                           mask_relpath="sub-01/ses-a/anat/m.nii.gz")


def examples() -> list[rec.Record]:
    rng = np.random.default_rng(0)
    mask = rng.random((14, 14, 14)) > 0.5
    prepared = rec.PreparedImage(image=image(), key="k1", percentiles=(1.0, 2.0, 3.0), cube_size=14,
                                 cube_affine=np.eye(4), cube_mask_bits=np.packbits(mask), outside_fraction=0.01,
                                 brain_voxels_cube=int(mask.sum()))
    component = Component(label=1, n_voxels=3, volume_mm3=3.0, centroid_voxel=(1.0, 2.0, 3.0),
                          centroid_mm=(4.0, 5.0, 6.0), peak=1.5, peak_voxel=(1, 2, 3), peak_mm=None)
    result = rec.ImageResult(image=image(), status="ok", score_max=1.5, components=(component,), rank=1)
    return [
        image(),
        prepared,
        rec.PreparedImage(image=image("sub-02_T1w"), key="k2", status="skipped", error="bad"),
        rec.Landmarks(modality="T1w", key="l", percentiles=(1.0, 99.0), landmarks=(0.0, 1.0), images=("a", "b")),
        rec.ImageTokens(bids_name="a", modality="T1w", key="t", grid=2, layers=(1, 2),
                        tokens=rng.normal(size=(2, 8, 6)).astype(np.float32), valid=np.ones(8, bool),
                        info={"encoder": "x", "seconds": 1.0}),
        rec.BatchScores(modality="T1w", key="s", names=("a", "b"), grid=2, k=1, batch=2,
                        scores=np.ones((2, 8), np.float32),
                        per_layer=np.ones((1, 2, 8), np.float32), valid=np.ones((2, 8), bool),
                        suspicious=np.zeros((2, 8), np.int32), median=0.5, scale=0.1,
                        communities=(rec.Community(("a", "b"), (3, 4)),), timings={"scoring_s": 1.0}),
        result,
        rec.GroupSummary(modality="T1w", results=(result,), batches=(
            rec.BatchFacts(batch=1, names=("sub-01_ses-a_T1w", "b"), k=1, median=0.5, scale=0.1,
                           communities=(rec.Community(("b",), (2,)),)),)),
    ]


def _equal(a, b) -> bool:
    import dataclasses

    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if not (isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("record", examples(), ids=lambda r: type(r).__name__)
def test_every_record_round_trips(tmp_path, record):
    suffix = ".npz" if record.has_arrays else ".json"
    path = rec.save(record, tmp_path / f"x{suffix}")
    back = rec.load(path, type(record))
    assert type(back) is type(record) and _equal(back, record)


def test_masks_and_nested_types_come_back(tmp_path):
    prepared = examples()[1]
    back = rec.load(rec.save(prepared, tmp_path / "p.npz"))
    assert isinstance(back.image.path, Path) and back.image.entities == {"sub": "01", "ses": "a"}
    assert back.cube_mask().shape == (14, 14, 14) and np.array_equal(back.cube_mask(), prepared.cube_mask())
    result = rec.load(rec.save(examples()[6], tmp_path / "r.json"))
    assert isinstance(result.components[0], Component) and result.components[0].peak_voxel == (1, 2, 3)


def test_wrong_type_suffix_and_schema_are_refused(tmp_path):
    path = rec.save(image(), tmp_path / "i.json")
    with pytest.raises(ValueError, match="expected Landmarks"):
        rec.load(path, rec.Landmarks)
    with pytest.raises(ValueError, match="as .npz"):
        rec.save(examples()[1], tmp_path / "p.json")
    with pytest.raises(ValueError, match="as .json"):
        rec.save(image(), tmp_path / "i.npz")
    data = json.loads(path.read_text())
    data["schema"] = rec.SCHEMA + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="remove the work directory"):
        rec.load(path)


def test_load_fields_reads_no_arrays(tmp_path):
    tokens = examples()[4]
    path = rec.save(tokens, tmp_path / "t.npz")
    assert rec.load_fields(path, ("bids_name", "key")) == {"bids_name": "a", "key": "t"}


def test_batch_scores_index_names_the_batch():
    scores = examples()[5]
    assert scores.index("b") == 1
    with pytest.raises(KeyError, match="not in the T1w scoring batch"):
        scores.index("zz")


def test_skipped_prepared_image_has_no_cube():
    with pytest.raises(ValueError, match="skipped"):
        examples()[2].cube_mask()
