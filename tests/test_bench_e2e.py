"""benchmarks/bench_e2e.py: the cohort builder (real data, deterministic, valid BIDS, masks on the
image grid, distinct variants), the timings reader and tables, nvidia-smi parsing, the H200 checks,
the process-tree measurement and the random weights cg3d must accept. No speed is measured here."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_e2e", REPO / "benchmarks" / "bench_e2e.py")
be = importlib.util.module_from_spec(_spec)
sys.modules["bench_e2e"] = be  # dataclasses look their module up while the class is built
_spec.loader.exec_module(be)

DATA = be.DEFAULT_DATA
needs_data = pytest.mark.skipif(not (DATA / "manifest.tsv").is_file(), reason=f"no shared data in {DATA}")
HEADER = "\t".join(be.TIMINGS_HEADER)


# ------------------------------------------------------------------------------------------------
# sources and cohort
@needs_data
def test_sources_are_the_1mm_skullstripped_t1w_volumes_with_a_mask_on_their_grid():
    sources = be.select_sources(DATA)
    assert [s.name for s in sources] == [
        "brainles_tcga_lgg/TCGA-DU-7294/T1w.nii.gz", "brainles_tcga_lgg/TCGA-FG-6692/T1w.nii.gz",
        "brats2023_examples/BraTS-GLI-00001-000/T1w.nii.gz", "brats2023_examples/BraTS-MET-00110-000/T1w.nii.gz",
        "healthy_templates/Colin27_ch2_T1w.nii.gz", "healthy_templates/MNI152NLin6Asym_1mm_T1w.nii.gz",
        "healthy_templates/MNI152_2009a_sym_1mm_T1w.nii.gz",
        "open_ms_data/patient07/T1w.nii.gz", "open_ms_data/patient26/T1w.nii.gz",
    ]  # not T1wPost, not chris (0.88 mm), IXI (2 mm) or the niivue template (no mask on its grid)
    assert all(s.mask.parent == s.image.parent and s.mask.name.endswith("brainmask.nii.gz") for s in sources)
    assert len(be.select_sources(DATA, "4x4x4")) == 7  # the tiny/ fixtures


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> tuple[be.CohortSpec, Path]:
    if not (DATA / "manifest.tsv").is_file():
        pytest.skip(f"no shared data in {DATA}")
    spec = be.CohortSpec(n=9, seed=3, sources=tuple(be.select_sources(DATA, "4x4x4")), max_shift=2)
    dest = tmp_path_factory.mktemp("cohort")
    be.build_cohort(spec, dest, procs=2)
    return spec, dest


@pytest.mark.slow
def test_cohort_is_byte_identical_for_the_same_seed_and_differs_for_another(tiny_cohort, tmp_path):
    spec, dest = tiny_cohort
    again = be.build_cohort(spec, tmp_path / "again", procs=1).parent
    assert _digests(again) == _digests(dest)
    files = list(dest.rglob("*.nii.gz"))
    assert len(files) == 18 and all(f.read_bytes()[4:8] == bytes(4) for f in files)  # no gzip time stamp
    assert be.cohort_matches(spec, dest) and not be.cohort_matches(be.CohortSpec(9, 4, spec.sources, 2), dest)
    other = be.CohortSpec(n=9, seed=4, sources=spec.sources, max_shift=2)
    changed = _digests(be.build_cohort(other, tmp_path / "other", procs=1).parent)
    images = [k for k in changed if k.endswith("_T1w.nii.gz")]
    assert len(images) == 9 and all(changed[k] != _digests(dest)[k] for k in images)


def test_cohort_layout_and_participants(tiny_cohort):
    spec, dest = tiny_cohort
    paths = be.cohort_paths(dest)
    labels = [f"sub-{i:03d}" for i in range(1, 10)]
    assert sorted(p.name for p in paths["bids"].glob("sub-*")) == labels
    for label in labels:
        assert (paths["bids"] / label / "anat" / f"{label}_T1w.nii.gz").is_file()
        assert (paths["masks"] / label / "anat" / f"{label}_desc-brain_mask.nii.gz").is_file()
    rows = [line.split("\t") for line in (paths["bids"] / "participants.tsv").read_text().splitlines()]
    assert rows[0] == ["participant_id", "source", "flips", "shift", "scale", "noise_sd"]
    sources = [row[1] for row in rows[1:]]
    assert sources[:7] == [s.name for s in spec.sources] and sources[7:] == sources[:2]  # used in turn
    assert all(0.8 <= float(row[4]) <= 1.25 and 10 <= float(row[5]) <= 30 for row in rows[1:])
    assert all(max(abs(int(v)) for v in row[3].split(",")) <= 2 for row in rows[1:])


def test_masks_are_on_the_image_grid_and_variants_differ(tiny_cohort):
    _spec, dest = tiny_cohort
    paths = be.cohort_paths(dest)
    images = sorted(paths["bids"].glob("sub-*/anat/*_T1w.nii.gz"))
    digests = set()
    for path in images:
        label = path.name.split("_")[0]
        image = nib.load(path)
        mask = nib.load(paths["masks"] / label / "anat" / f"{label}_desc-brain_mask.nii.gz")
        assert image.shape == mask.shape and np.allclose(image.affine, mask.affine)
        assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
        brain = np.asarray(mask.dataobj)
        assert set(np.unique(brain)) == {0, 1} and brain.sum() > 1000
        digests.add(hashlib.sha256(np.asarray(image.dataobj).tobytes()).hexdigest())
    assert len(digests) == len(images) == 9  # subjects 1 and 8 share a source, yet differ


@pytest.mark.slow
def test_cohort_is_valid_bids(tiny_cohort):
    from cg3d_bids.bids.validation import find_validator, issues_by_severity, run_validator

    if find_validator() is None:
        pytest.skip("bids-validator-deno is not installed")
    _spec, dest = tiny_cohort
    paths = be.cohort_paths(dest)
    for root in (paths["bids"], paths["masks"]):
        errors = issues_by_severity(run_validator(root, timeout=300), "error")
        assert errors == [], (root, errors)


@pytest.mark.slow
def test_cg3d_finds_every_image_and_its_mask(tiny_cohort, tmp_path):
    from cg3d_bids.bids.discovery import discover_images

    _spec, dest = tiny_cohort
    paths = be.cohort_paths(dest)
    found = discover_images(paths["bids"], modalities=("T1w",), derivatives={"masks": paths["masks"]},
                            database_dir=tmp_path / "db")
    records = found.images["T1w"]
    assert len(records) == 9
    assert all(r.mask_path == paths["masks"] / f"sub-{r.subject}/anat/sub-{r.subject}_desc-brain_mask.nii.gz"
               for r in records)


# ------------------------------------------------------------------------------------------------
# variants
def test_shift_array_moves_by_whole_voxels_and_fills_zeros():
    data = np.arange(1, 5 * 6 * 7 + 1, dtype=np.float32).reshape(5, 6, 7)
    out = be.shift_array(data, (2, -1, 0))
    assert np.array_equal(out[2:, :-1, :], data[:-2, 1:, :])
    assert not out[:2].any() and not out[:, -1].any()
    assert be.shift_array(data, (9, 0, 0)).sum() == 0


def test_flips_keep_the_anatomy_in_world_space():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 8)).astype(np.float32) * 100
    brain = np.ones(data.shape, bool)
    affine = np.array([[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.2, -72], [0, 0, 0, 1]])
    variant = be.Variant(flips=(True, False, True), shift=(0, 0, 0), scale=1.0, noise_sd=0.0)
    image, mask, new_affine = be.apply_variant(data, brain, affine, variant, rng)
    assert not np.array_equal(image, np.rint(data))  # stored in another order...
    before = nib.as_closest_canonical(nib.Nifti1Image(np.rint(data).astype(np.int16), affine))
    after = nib.as_closest_canonical(nib.Nifti1Image(image, new_affine))
    assert np.array_equal(before.get_fdata(), after.get_fdata())  # ...same anatomy where it was
    assert np.allclose(before.affine, after.affine)


def test_noise_and_scale_only_where_expected():
    rng = np.random.default_rng(1)
    data = np.full((8, 8, 8), 500.0, np.float32)
    brain = np.zeros(data.shape, bool)
    brain[2:6, 2:6, 2:6] = True
    variant = be.Variant(flips=(False, False, False), shift=(0, 0, 0), scale=1.2, noise_sd=0.02)
    image, mask, _ = be.apply_variant(data, brain, np.eye(4), variant, rng)
    assert np.all(image[~brain] == 600)
    inside = image[brain].astype(float) - 600
    assert 10 < inside.std() < 30 and abs(inside.mean()) < 10  # sd 0.02 * 1000


def test_subject_variants_depend_on_seed_and_index_only():
    a = be.draw_variant(be.subject_rng(0, 5), 4)
    assert a == be.draw_variant(be.subject_rng(0, 5), 4)
    assert a != be.draw_variant(be.subject_rng(0, 6), 4) and a != be.draw_variant(be.subject_rng(1, 5), 4)


# ------------------------------------------------------------------------------------------------
# timings TSV and tables
def _tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def _example_rows() -> list[str]:
    return [
        "discover\tall\t10\t2.0\t2.5\t100.0\t102.0",
        "prepare\tT1w\t10\t20.0\t38.0\t102.0\t122.0",
        "landmarks\tT1w\t10\t1.0\t1.0\t122.0\t123.0",
        "tokenize\tT1w\t10\t50.0\t90.0\t123.0\t173.0",
        "encode\tT1w\t10\t30.0\t58.0\t125.0\t170.0",
        "score\tT1w\t10\t5.0\t9.0\t173.0\t178.0",
        "outputs\tT1w\t10\t10.0\t19.0\t178.0\t188.0",
        "reports\tall\t10\t12.0\t22.0\t188.0\t200.0",
        "total\tall\t10\t100.0\t181.5\t100.0\t200.0",
    ]


def test_read_timings_parses_rows(tmp_path):
    rows = be.read_timings(_tsv(tmp_path / "t.tsv", _example_rows()))
    assert len(rows) == 9
    assert rows[4] == be.StageTiming("encode", "T1w", 10, 30.0, 58.0, 125.0, 170.0)


@pytest.mark.parametrize("text, message", [
    ("stage\tmodality\timages\twall_s\tcpu_s\n", "header must be"),
    (HEADER + "\nprepare\tT1w\t10\t1.0\t2.0\t3.0\n", "line 2: 6 fields"),
    (HEADER + "\nprepare\tT1w\tten\t1.0\t2.0\t3.0\t4.0\n", "line 2"),
    (HEADER + "\nprepare\tT1w\t10\t1.0\t2.0\t3.0\t4.0\n", "no 'total' row"),
    ("", "empty file"),
])
def test_read_timings_rejects_malformed_files(tmp_path, text, message):
    (tmp_path / "t.tsv").write_text(text)
    with pytest.raises(ValueError, match=message):
        be.read_timings(tmp_path / "t.tsv")


def test_find_timings_takes_the_newest_run(tmp_path):
    assert be.find_timings(tmp_path) is None
    (tmp_path / "logs").mkdir()
    for run_id in ("20260101-100000_aaaa", "20260102-090000_bbbb"):
        _tsv(tmp_path / "logs" / f"timings-{run_id}.tsv", _example_rows())
    assert be.find_timings(tmp_path).name == "timings-20260102-090000_bbbb.tsv"


def _cells(table: str, first: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {first}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_stage_table_values_shares_and_order(tmp_path):
    rows = be.read_timings(_tsv(tmp_path / "t.tsv", list(reversed(_example_rows()))))
    measured = be.Measured(0, 110.0, 200.0, 99.0, 209.0)
    table = be.stage_table(rows, 10, measured)
    assert _cells(table, "tokenize") == ["tokenize", "T1w", "10", "50.0", "90.0", "9.00", "50.0 %", "49.6 %"]
    assert _cells(table, "  encode (inside tokenize)")[3:6] == ["30.0", "58.0", "5.80"]
    assert _cells(table, "total")[3:] == ["100.0", "181.5", "18.15", "100.0 %", "100.0 %"]
    assert _cells(table, "process tree")[3:] == ["110.0", "200.0", "20.00", "110.0 %", "110.2 %"]
    order = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert order == ["discover", "prepare", "landmarks", "tokenize", "encode (inside tokenize)", "score",
                     "outputs", "reports", "total", "process tree (measured)"]
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned columns


def test_core_s_per_volume_uses_the_stage_images_or_the_cohort(tmp_path):
    lines = ["score\tT1w\t4\t1.0\t8.0\t0\t1", "landmarks\tall\t0\t1.0\t6.0\t0\t1", "total\tall\t0\t2.0\t14.0\t0\t2"]
    rows = be.read_timings(_tsv(tmp_path / "t.tsv", lines))
    table = be.stage_table(rows, 3, None)
    assert _cells(table, "score")[5] == "2.00" and _cells(table, "landmarks")[5] == "2.00"
    assert "process tree" not in table


def _args(tmp_path: Path, *extra: str):
    return be.parse_args(["--n", "10", "--out-dir", str(tmp_path), *extra])


def test_report_without_timings_shows_the_measured_totals_and_a_note(tmp_path):
    measured = be.Measured(0, 175.0, 210.0, 1000.0, 1175.0)
    text = be.report(_args(tmp_path), measured, tmp_path / "out")
    assert "timings-<run_id>.tsv is missing" in text
    assert _cells(text, "cg3d group (measured)")[1:] == ["10", "175.0", "210.0", "21.00", "17.50"]
    assert "encoder test-tiny-vit, device cpu" in text


def test_report_with_timings_and_h200_targets(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    _tsv(out / "logs" / "timings-20260101-100000_aaaa.tsv", _example_rows())
    smi = tmp_path / "smi.csv"
    lines = ["timestamp, utilization.gpu [%], memory.used [MiB]"]
    for second in range(95, 210):
        util = 90 if 123 <= second <= 173 else 5
        stamp = datetime.fromtimestamp(second).strftime("%Y/%m/%d %H:%M:%S.000")
        lines.append(f"{stamp}, {util} %, {4000 + second} MiB")
    smi.write_text("\n".join(lines) + "\n")
    measured = be.Measured(0, 101.0, 190.0, 99.5, 200.5)
    text = be.report(_args(tmp_path, "--smi-log", str(smi), "--targets", "h200"), measured, out)
    assert _cells(text, "tokenize")[3] == "50.0"
    assert _cells(text, "total wall s")[1:4] == ["101.00", "< 60", "FAIL"]
    assert _cells(text, "tokenize s / volume")[1:4] == ["5.00", "< 0.3", "FAIL"]
    assert _cells(text, "GPU busy %")[1:4] == ["90.00", ">= 80", "PASS"]
    assert _cells(text, "peak VRAM GB")[1:4] == [f"{(4000 + 200) * 2**20 / 1e9:.2f}", "< 10", "PASS"]
    assert "Outside the stages (start-up, imports, exit): 1.0 s wall, 8.5 core-s" in text
    # 190 core-s minus encode 58 and score 9 = 123; the stages (not encode, not total) sum to 181.5
    assert "Everything except encode and score: 123.0 core-s, **12.30 per volume**" in text
    assert "Of it, 8.5 core-s (0.85 per volume) are in no stage" in text


# ------------------------------------------------------------------------------------------------
# nvidia-smi, progress lines, H200 checks
def test_read_smi_log_skips_header_and_unavailable_values(tmp_path):
    path = tmp_path / "smi.csv"
    path.write_text("timestamp, utilization.gpu [%], memory.used [MiB]\n"
                    "2026/11/17 10:00:00.250, 87 %, 1234 MiB\n"
                    "2026/11/17 10:00:00.750, [N/A], 1300 MiB\n"
                    "garbage line\n"
                    "2026/11/17 10:00:01.250, 13 %, 900 MiB\n")
    samples = be.read_smi_log(path)
    t0 = datetime(2026, 11, 17, 10, 0, 0, 250000).timestamp()
    assert samples == [be.GpuSample(t0, 87.0, 1234.0), be.GpuSample(t0 + 1.0, 13.0, 900.0)]
    assert be.gpu_window(samples, t0, t0 + 1.0) == {"samples": 2.0, "util_mean": 50.0, "util_median": 50.0,
                                                      "peak_mem_mib": 1234.0}
    assert be.gpu_window(samples, t0 + 2, t0 + 3) is None


def test_progress_lines_give_a_tokenize_window_when_there_is_no_tsv(tmp_path):
    start = datetime(2026, 11, 30, 21, 32, 0).timestamp()
    log = tmp_path / "out.log"
    log.write_text("21:32:37 cg3d INFO: [tokens T1w 1/3] sub-001_T1w in 0.8 s (elapsed 7 s, about 15 s left)\n"
                   "261130-21:32:38,000 nipype.workflow INFO:\n"
                   "21:32:41 cg3d INFO: [tokens T1w 1/3] sub-002_T1w in 0.9 s (elapsed 10 s, about 21 s left)\n"
                   "21:32:57 cg3d INFO: [scores T1w] layer 1/4: 6 images in 0.0 s\n"
                   "21:34:18 cg3d INFO: [reports 1/3] sub-001 in 51.6 s (elapsed 52 s, about 103 s left)\n")
    progress = be.read_progress(log, start)
    assert [(p.tag, p.items) for p in progress] == [("tokens", 2), ("reports", 1)]
    assert progress[0].item_s == pytest.approx(1.7) and progress[0].last - progress[0].first == 4
    window = be.tokenize_window(None, progress, be.Measured(0, 200.0, 300.0, start, start + 200))
    assert window.start == pytest.approx(start + 37 - 0.8) and window.end == start + 41 and window.images == 2
    assert "tokens" in be.progress_table(progress)


def test_clock_times_after_midnight_belong_to_the_next_day():
    start = datetime(2026, 11, 30, 23, 59, 50).timestamp()
    assert be._clock_to_unix("00:00:05", start) == pytest.approx(start + 15)
    assert be._clock_to_unix("23:59:55", start) == pytest.approx(start + 5)


def test_h200_checks_pass_fail_and_missing():
    measured = be.Measured(0, 42.0, 300.0, 0.0, 42.0)
    samples = [be.GpuSample(t, 95.0 if 10 <= t <= 30 else 0.0, 8000.0) for t in range(0, 43)]
    window = be.Window(10.0, 30.0, 100, "timings TSV")
    verdicts = [c.passed for c in be.h200_checks(measured, window, samples)]
    assert verdicts == [True, True, True, True]
    slow = be.Measured(0, 42.0, 300.0, 0.0, 42.0, timed_out=True)
    checks = be.h200_checks(slow, be.Window(0.0, 42.0, 0, "no timings: whole run"), None)
    assert [c.passed for c in checks] == [False, None, None, None]
    assert "timed out" in checks[0].note
    assert "FAIL" in be.checks_table(checks) and "n/a" in be.checks_table(checks)


# ------------------------------------------------------------------------------------------------
# running and measuring
def test_command_line_of_the_group_run(tmp_path):
    cmd = be.cg3d_command(tmp_path / "bids", tmp_path / "masks", tmp_path / "out", tmp_path / "work",
                          encoder="dinov2_vitl14", cube=224, device="cuda", nprocs=16,
                          weights=tmp_path / "w.safetensors")
    text = " ".join(cmd[1:])
    t = tmp_path
    assert text.startswith(f"-m cg3d_bids {t}/bids {t}/out group --modality T1w -d masks={t}/masks")
    for part in ("-w", "--encoder dinov2_vitl14", "--cube-size 224", "--device cuda", "--nprocs 16",
                 "--skip-bids-validation", f"--weights {tmp_path}/w.safetensors"):
        assert part in text
    env = be.child_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


BUSY_GRANDCHILD = """
import subprocess, sys
code = "import time\\nwhile time.process_time() < 0.4: pass"
subprocess.run([sys.executable, "-c", code], check=True)
print("done")
"""


@pytest.mark.slow
def test_run_measured_counts_the_cpu_of_grandchildren(tmp_path):
    measured = be.run_measured([sys.executable, "-c", BUSY_GRANDCHILD], tmp_path / "log.txt", echo="none")
    assert measured.returncode == 0 and not measured.timed_out
    assert measured.cpu_s >= 0.4 and measured.wall_s >= 0.4
    assert "done" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_run_measured_stops_the_whole_process_group_at_the_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(60)")
    measured = be.run_measured([sys.executable, "-c", code], tmp_path / "log.txt", timeout=2.0, echo="none")
    assert measured.timed_out and measured.returncode != 0 and measured.wall_s < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild survived the timeout")


def test_echo_filter_hides_nipype_lines_only():
    assert be.echoed("21:32:37 cg3d INFO: [tokens T1w 1/3] sub-001_T1w in 0.8 s\n", "cg3d")
    assert be.echoed("cg3d: error: no weights\n", "cg3d")
    assert not be.echoed("261130-21:28:54,315 nipype.workflow INFO:\n", "cg3d")
    assert not be.echoed("21:28:54 nipype.workflow INFO: [Node] Setting-up\n", "cg3d")
    assert not be.echoed("\t [Node] Setting-up\n", "cg3d")
    assert be.echoed("\t [Node] Setting-up\n", "all") and not be.echoed("anything\n", "none")


@pytest.mark.slow
def test_random_weights_of_the_real_architecture_are_accepted_by_cg3d(tmp_path):
    from cg3d_bids.core.models import create_encoder
    from cg3d_bids.core.models.weights import resolve_spec_weights
    from cg3d_bids.core.models.encoders import get_spec

    path = be.make_random_weights("dinov2_vits14", 28, tmp_path / "vits14-28.safetensors")
    info = resolve_spec_weights(get_spec("dinov2_vits14"), path)
    assert info.kind == "file" and info.sha256
    encoder = create_encoder("dinov2_vits14", weights=path, img_size=28, device="cpu")
    feats = encoder.forward_slices(np.zeros((2, 28, 28), np.float32) + 0.5)
    assert tuple(feats.shape) == (4, 2, 2, 2, 384)
    blocks = encoder.model.blocks
    assert float(blocks[0].ls1.gamma.mean()) == 1.0  # LayerScale 1.0: the blocks really differ
    again = be.make_random_weights("dinov2_vits14", 28, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()  # seeded


def test_parse_args_defaults():
    args = be.parse_args([])
    assert (args.n, args.cube, args.encoder, args.device, args.seed) == (10, 224, "test-tiny-vit", "cpu", 0)
    assert be.parse_args(["--device", "cuda"]).encoder == "dinov2_vitl14"
    with pytest.raises(SystemExit):
        be.parse_args(["--reuse"])


@needs_data
def test_build_only_then_reuse_from_the_command_line(tmp_path, capsys):
    common = ["--n", "5", "--voxel-mm", "4x4x4", "--out-dir", str(tmp_path), "--nprocs", "1"]
    assert be.main(["--build-only", *common]) == 0
    built = _digests(tmp_path / "cohort")
    assert len([k for k in built if k.endswith(".nii.gz")]) == 10
    assert be.main(["--build-only", "--reuse", *common]) == 0
    assert "reusing the cohort" in capsys.readouterr().err
    assert _digests(tmp_path / "cohort") == built
    assert be.main(["--build-only", "--reuse", "--seed", "1", *common]) == 0
    assert "no cohort with these settings" in capsys.readouterr().err
    assert _digests(tmp_path / "cohort") != built


def test_report_names_the_machine_speed(tmp_path):
    measured = be.Measured(0, 110.0, 200.0, 99.0, 209.0, speed=(151.4, 139.6))
    text = be.report(_args(tmp_path), measured, tmp_path / "out")
    assert "matmul on" in text and "151 GFLOP/s before the run, 140 after" in text
    assert "Machine:" not in be.report(_args(tmp_path), be.Measured(0, 110.0, 200.0, 99.0, 209.0),
                                       tmp_path / "out")


@pytest.mark.slow  # three child processes that import torch (~8 s)
def test_cpu_speed_probe_runs_and_is_not_counted_in_the_run(tmp_path):
    speed = be.cpu_speed(1, size=256)
    assert speed is not None and speed > 0.1
    measured = be.run_measured([sys.executable, "-c", "pass"], tmp_path / "log.txt", speed_threads=1)
    assert measured.speed is not None and all(s > 0.1 for s in measured.speed)
    assert measured.cpu_s < 1.5  # a bare interpreter, not the two probes (each imports torch)
