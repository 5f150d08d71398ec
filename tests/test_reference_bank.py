"""Saved reference cohorts: the documented format, atomic writing, validation on load, settings checks
and ``cg3d reference info`` (synthetic records; no encoder, no nipype)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cg3d_bids import records as rec
from cg3d_bids.cli.main import main
from cg3d_bids.errors import BatchTooSmallError, CantCreateError, InputDataError, NoInputError, UsageError
from cg3d_bids.reference import (
    FORMAT_VERSION,
    MANIFEST,
    TOKEN_SETTINGS,
    check_bank_destination,
    check_compatible,
    finish_bank,
    load_bank,
    staging_dir,
    write_modality,
)
from cg3d_bids.settings import Settings

LAYERS = (1, 3)
GRID, DIM = 3, 12
SETTINGS = {"encoder": "test-tiny-vit", "weights_sha256": None, "cube_size": 56, "fov_mm": 156.0, "layers": [1, 3],
            "projection_dim": 4, "random_seed": 0, "precision": "fp32", "token_format": 1}


def _records(tmp: Path, n: int, seed: int = 0):
    """Token files, BatchScores, Landmarks and ImageResults of a scored batch of ``n`` images."""
    rng = np.random.default_rng(seed)
    names = [f"sub-{i:02d}_T1w" for i in range(1, n + 1)]
    valid = rng.random((n, GRID**3)) > 0.3
    files, results, sha = {}, {}, {}
    for i, name in enumerate(names):
        image_file = tmp / "raw" / f"{name}.nii.gz"
        image_file.parent.mkdir(parents=True, exist_ok=True)
        image_file.write_bytes(f"image {i}".encode())
        tokens = rng.normal(size=(len(LAYERS), GRID**3, DIM)).astype(np.float32)
        item = rec.ImageTokens(bids_name=name, modality="T1w", key="k", grid=GRID, layers=LAYERS, tokens=tokens,
                               valid=valid[i])
        files[name] = rec.save(item, tmp / "tokens" / f"{name}.npz")
        record = rec.ImageRecord(subject=f"{i + 1:02d}", session=None, modality="T1w", path=image_file,
                                 relpath=f"sub-{i + 1:02d}/anat/{name}.nii.gz", entities={"sub": f"{i + 1:02d}"},
                                 bids_name=name)
        results[name] = rec.ImageResult(image=record, status="ok", score_max=float(i + 1))
        sha[name] = hashlib.sha256(image_file.read_bytes()).hexdigest()
    batch = rec.BatchScores(modality="T1w", key="s", names=tuple(names), grid=GRID, k=1,
                            scores=np.zeros((n, GRID**3), np.float32), per_layer=np.zeros((2, n, GRID**3), np.float32),
                            valid=valid, suspicious=np.zeros((n, GRID**3), np.int32), median=0.25, scale=0.125)
    landmarks = rec.Landmarks(modality="T1w", key="lmkey", percentiles=(1.0, 50.0, 99.0), landmarks=(0.0, 50.0, 100.0),
                              images=tuple(names))
    return batch, files, landmarks, results, sha


def make_bank(tmp: Path, n: int = 6, *, fraction: float = 0.3, dest: str = "bank") -> Path:
    batch, files, landmarks, results, sha = _records(tmp, n)
    path = tmp / dest
    staging = staging_dir(path, "run1")
    entry = write_modality(staging, "T1w", batch, files, landmarks, results, sha, fraction=fraction, codegraph=False)
    finish_bank(path, staging, SETTINGS, {"T1w": entry}, {"cg3d_version": "test", "run_id": "run1"})
    return path


def test_bank_round_trip_and_format(tmp_path):
    path = make_bank(tmp_path)
    batch, files, landmarks, _results, _sha = _records(tmp_path, 6)
    bank = load_bank(path)
    entry = bank.modality("T1w")
    assert bank.format_version == FORMAT_VERSION and bank.sizes() == {"T1w": 6}
    assert entry.names == batch.names and entry.layers == LAYERS and (entry.grid, entry.dim) == (GRID, DIM)
    assert entry.stats["median"] == 0.25 and entry.stats["scale"] == 0.125 and entry.stats["k"] == 1
    assert [i.score_max for i in entry.images] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert entry.landmarks_record() == landmarks
    np.testing.assert_array_equal(entry.valid(), batch.valid)
    for i, name in enumerate(batch.names):  # the valid tokens of every layer, image by image
        item = rec.load(files[name], rec.ImageTokens)
        for m in range(len(LAYERS)):
            np.testing.assert_array_equal(entry.references(m)[i], item.tokens[m][item.valid])
    assert not list(tmp_path.glob(".bank.partial-*")), "the staging folder is moved into place"


def test_bank_is_readable_with_numpy_and_json_alone(tmp_path):
    """What docs/reference.md promises: no cg3d needed to read (and verify) a bank."""
    path = make_bank(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    text = json.dumps(manifest["content"], sort_keys=True, separators=(",", ":"))
    assert manifest["checksum"] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    t1w = manifest["content"]["modalities"]["T1w"]
    valid = np.load(path / t1w["files"]["valid"]["path"])
    for spec in t1w["files"]["tokens"]:
        assert hashlib.sha256((path / spec["path"]).read_bytes()).hexdigest() == spec["sha256"]
        tokens = np.load(path / spec["path"])
        counts = [image["count"] for image in t1w["images"]]
        assert tokens.shape == (sum(counts), t1w["dim"]) and counts == valid.sum(axis=1).tolist()
    assert set(manifest["content"]["settings"]) == set(TOKEN_SETTINGS)


def test_saving_the_same_batch_twice_gives_the_same_checksum_and_replaces_the_bank(tmp_path):
    first = load_bank(make_bank(tmp_path)).checksum
    (tmp_path / "bank" / "T1w" / "stray.txt").write_text("from the old bank")
    second = load_bank(make_bank(tmp_path)).checksum
    assert first == second
    assert not (tmp_path / "bank" / "T1w" / "stray.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bank")] == []


def test_damaged_banks_are_refused_with_the_file_named(tmp_path):
    path = make_bank(tmp_path)
    layer = path / "T1w" / "tokens_layer-03.npy"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(InputDataError, match="sha256 differs") as info:
        load_bank(path)
    assert info.value.exit_code == 65 and str(layer) in info.value.render()
    load_bank(path, verify=False)  # shapes and counts still agree: only the hash finds it

    path = make_bank(tmp_path, dest="bank2")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["content"]["modalities"]["T1w"]["stats"]["median"] = 0.0
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputDataError, match="checksum"):
        load_bank(path, verify=False)

    path = make_bank(tmp_path, dest="bank3")
    (path / "T1w" / "valid.npy").unlink()
    with pytest.raises(InputDataError, match="missing"):
        load_bank(path, verify=False)


def test_newer_formats_missing_and_foreign_folders(tmp_path):
    path = make_bank(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputDataError, match="upgrade cg3d"):
        load_bank(path)
    with pytest.raises(NoInputError, match="does not exist") as info:
        load_bank(tmp_path / "nowhere")
    assert info.value.exit_code == 66 and "--save-reference" in info.value.render()
    (tmp_path / "folder").mkdir()
    with pytest.raises(NoInputError, match="reference.json is missing"):
        load_bank(tmp_path / "folder")
    (tmp_path / "folder" / MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(InputDataError, match="not a cg3d reference manifest"):
        load_bank(tmp_path / "folder")


def test_a_bank_too_small_for_k_is_refused(tmp_path):
    """K = floor(fraction * B_ref) must be >= 1: 3 images at fraction 0.3 cannot be scored against."""
    with pytest.raises(BatchTooSmallError, match="K = floor") as info:
        make_bank(tmp_path, n=3, fraction=0.3)
    assert "at least 4" in info.value.render()
    assert not (tmp_path / "bank").exists(), "nothing is moved into place"
    bank = load_bank(make_bank(tmp_path, n=3, fraction=0.5, dest="ok"))
    bank.check_size(0.5)
    with pytest.raises(BatchTooSmallError, match="raise --fraction"):
        bank.check_size(0.3)


def test_settings_that_differ_from_the_bank_name_both_values(tmp_path):
    bank = load_bank(make_bank(tmp_path))
    ours = Settings().replace(method={"encoder": "test-tiny-vit", "cube_size": 56, "projection_dim": 4},
                              run={"weights_sha256": None, "precision": "fp32", "layers": (1, 3)})
    check_compatible(bank, ours)  # identical: no error
    with pytest.raises(UsageError) as info:
        check_compatible(bank, ours.replace(method={"cube_size": 112, "random_seed": 3},
                                            run={"precision": "bf16", "weights_sha256": "ab" * 32}))
    text = info.value.render()
    assert "--cube-size: bank 56, this run 112" in text and "--random-seed: bank 0, this run 3" in text
    assert "bank fp32, this run bf16" in text and "bank none (random test encoder), this run abab" in text
    assert "cg3d reference info" in text and info.value.exit_code == 64


def test_bank_destination_checks(tmp_path):
    check_bank_destination(tmp_path / "new" / "bank")  # may be created
    (tmp_path / "file").write_text("x")
    with pytest.raises(CantCreateError, match="names a file"):
        check_bank_destination(tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.txt").write_text("x")
    with pytest.raises(CantCreateError, match="not a cg3d bank"):
        check_bank_destination(tmp_path / "busy")
    with pytest.raises(UsageError, match="inside the input BIDS dataset"):
        check_bank_destination(tmp_path / "bids" / "bank", tmp_path / "bids")
    check_bank_destination(make_bank(tmp_path))  # an existing bank may be replaced


def test_reference_info_command(tmp_path, capsys):
    path = make_bank(tmp_path)
    assert main(["reference", "info", str(path)]) == 0
    out = capsys.readouterr().out
    bank = load_bank(path)
    assert bank.checksum in out and "T1w: 6 images" in out and "cube_size: 56" in out and "verified" in out
    assert main(["reference", "info", str(path / MANIFEST), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["checksum"] == bank.checksum and facts["modalities"]["T1w"]["images"] == 6
    assert facts["settings"]["cube_size"] == 56 and facts["made"]["run_id"] == "run1"
    assert main(["reference", "info", str(tmp_path / "missing")]) == 66
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["reference"])
    assert info.value.code == 64
