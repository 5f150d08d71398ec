"""Sharded group scoring end to end: ``--stage score|graph|rescore --shard i/n`` then
``--stage outputs`` writes the same outputs, bit for bit, as one ``group`` call.

This is the contract the SLURM chain (``cg3d slurm-script``) relies on: the score and re-score
shards of a batch run as separate processes (array tasks) that share only the work directory.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fixtures import make_bids_dataset
from cg3d_bids.cli.main import main

pytestmark = pytest.mark.slow

SUBJECTS = [f"{i:02d}" for i in range(1, 11)]
FAST = ["--device", "cpu", "--encoder", "test-tiny-vit", "--cube-size", "56", "--nprocs", "1",
        "--skip-bids-validation", "--projection-dim", "16", "--modality", "T1w"]
#: Columns that name the run rather than its results.
RUN_COLUMNS = {"run_id"}


def cg3d(bids: Path, out: Path, work: Path, *extra: str, level: str = "group") -> None:
    assert main([str(bids), str(out), level, "-w", str(work), *FAST, *extra]) == 0, extra


def table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in RUN_COLUMNS}
                for row in csv.DictReader(fh, delimiter="\t")]


def voxel_outputs(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(nib.load(p).dataobj)
            for p in sorted(out.rglob("*.nii.gz"))}


@pytest.mark.parametrize("n_shards, batch", [(3, None), (2, "5")])
def test_sharded_steps_equal_one_group_call(tmp_path, n_shards, batch):
    paths = make_bids_dataset(tmp_path / "bids", subjects=SUBJECTS, modalities=("T1w",),
                              with_masks=True, lesion_subjects=["03", "07"], seed=11)
    common = ["-d", f"masks={paths['masks_dir']}", *(["--batch-size", batch] if batch else [])]
    bids = tmp_path / "bids"
    cg3d(bids, tmp_path / "one", tmp_path / "work_one", *common)

    out, work = tmp_path / "sharded", tmp_path / "work_sharded"
    cg3d(bids, out, work, *common, level="participant")
    for i in range(1, n_shards + 1):
        cg3d(bids, out, work, *common, "--stage", "score", "--shard", f"{i}/{n_shards}")
    assert not (out / "group_T1w.tsv").exists()
    cg3d(bids, out, work, *common, "--stage", "graph")
    for i in range(n_shards, 0, -1):  # any order
        cg3d(bids, out, work, *common, "--stage", "rescore", "--shard", f"{i}/{n_shards}")
    cg3d(bids, out, work, *common, "--stage", "outputs")

    rows_files = sorted((work / "shards").rglob("rows-L*-*of*.npz"))
    n_batches = 2 if batch else 1
    assert len({p.parent for p in rows_files}) == n_batches
    assert {p.name.rsplit("-", 1)[1] for p in rows_files} == {f"{i}of{n_shards}.npz"
                                                               for i in range(1, n_shards + 1)}
    one, sharded = voxel_outputs(tmp_path / "one"), voxel_outputs(out)
    assert sorted(one) == sorted(sharded) and len(one) >= 3 * len(SUBJECTS)
    for name, data in one.items():
        assert data.dtype == sharded[name].dtype
        assert np.array_equal(data, sharded[name]), name
    rows_one, rows_sharded = table(tmp_path / "one" / "group_T1w.tsv"), table(out / "group_T1w.tsv")
    assert rows_one == rows_sharded
    assert {r["status"] for r in rows_one} == {"ok"}
    if batch:
        assert sorted({r["batch"] for r in rows_one}) == ["1", "2"]


def test_shard_steps_say_what_is_missing(tmp_path, capsys):
    paths = make_bids_dataset(tmp_path / "bids", subjects=SUBJECTS[:6], modalities=("T1w",), seed=12)
    common = ["-d", f"masks={paths['masks_dir']}"]
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    cg3d(bids, out, work, *common, "--stage", "score", "--shard", "1/2")
    capsys.readouterr()
    code = main([str(bids), str(out), "group", "-w", str(work), *FAST, *common, "--stage", "graph"])
    err = capsys.readouterr().err
    assert code != 0
    assert "no complete set of score shards" in err and "--stage score --shard i/n" in err
