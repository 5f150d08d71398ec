"""The work cache: record locations, compute-once, failures (first by time) and skipped images."""

from __future__ import annotations

import time

import pytest

from cg3d_bids import records as rec
from cg3d_bids.cache import WorkCache
from cg3d_bids.errors import InputDataError, TempFailError
from test_records import examples, image


def test_locations_of_each_record(tmp_path):
    cache = WorkCache(tmp_path, "run1")
    img, prepared, skipped, landmarks, tokens, scores, result, group = examples()
    assert cache.path_for(img) == tmp_path / "runs/run1/inputs/T1w/sub-01_ses-a_T1w.json"
    assert cache.path_for(prepared) == tmp_path / "prep/T1w/sub-01_ses-a_T1w_k1.npz"
    assert cache.path_for(skipped) == tmp_path / "runs/run1/prep/T1w/sub-02_T1w.json", "never cached"
    assert cache.path_for(landmarks) == tmp_path / "landmarks/T1w/landmarks_l.json"
    assert cache.path_for(tokens) == tmp_path / "tokens/T1w/a_t.npz"
    assert cache.path_for(scores) == tmp_path / "scores/T1w/scores_s.npz"
    assert cache.path_for(result) == tmp_path / "runs/run1/results/T1w/sub-01_ses-a_T1w.json"
    assert cache.path_for(group) == tmp_path / "runs/run1/group/T1w.json"
    with pytest.raises(TypeError):
        cache.path_for(object())  # type: ignore[arg-type]


def test_cached_computes_once_and_recovers_from_a_broken_file(tmp_path):
    cache = WorkCache(tmp_path, "r")
    calls = []
    landmarks = examples()[3]
    path = cache.landmarks_path("T1w", "l")

    def make():
        calls.append(1)
        return landmarks

    assert cache.cached(path, rec.Landmarks, make) == landmarks
    assert cache.cached(path, rec.Landmarks, make) == landmarks and len(calls) == 1
    path.write_text("{not json")
    assert cache.cached(path, rec.Landmarks, make) == landmarks and len(calls) == 2


def test_store_writes_keyed_records_once(tmp_path):
    cache = WorkCache(tmp_path, "r")
    landmarks = examples()[3]
    path = cache.store(landmarks)
    first = path.stat().st_mtime_ns
    time.sleep(0.01)
    cache.store(landmarks)
    assert path.stat().st_mtime_ns == first


def test_first_failure_is_the_earliest_not_the_first_by_name(tmp_path):
    cache = WorkCache(tmp_path, "r")
    cache.record_failure("zzz-first", InputDataError("bad image", path="/x.nii.gz", fix="replace it"))
    time.sleep(0.01)
    cache.record_failure("aaa-second", TempFailError("out of memory"))
    first = cache.first_failure()
    assert first.context == "zzz-first" and first.exit_code == 65 and "bad image" in first.message
    assert "InputDataError: bad image" in first.traceback
    assert WorkCache(tmp_path, "other").first_failure() is None


def test_skipped_images_are_per_run(tmp_path):
    cache = WorkCache(tmp_path, "r")
    cache.record_skipped(image(), "constant image")
    assert cache.skipped() == {"sub-01_ses-a_T1w": "constant image"}
    assert WorkCache(tmp_path, "r2").skipped() == {}
