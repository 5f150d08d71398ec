"""Subject and group HTML reports (issue #4): files, links, size, table order, escaping, evaluation.

The synthetic outputs are built once per test session (:func:`build_reports`, also used by
``test_reports_browser.py``): 30^3 ellipsoid "brains" with a bright blob, an anomaly map peaking on
the blob, its binary mask and the brain mask, for 4 subjects (one with two sessions and two
modalities, one failed image). As in the pipeline, scores are raw (the subject score and the
components' peaks are raw scores, the probseg map is their logistic transform).
"""

from __future__ import annotations

import atexit
import functools
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nibabel as nib
import numpy as np
import pytest

from cg3d_bids.reports import (
    EVALUATION_END,
    EVALUATION_START,
    ImageResult,
    Provenance,
    insert_evaluation_section,
    write_group_report,
    write_subject_report,
)
from cg3d_bids.reports import figures
from cg3d_bids.reports.data import image_anchor

N = 30
MAX_BYTES = 5_000_000
#: Batch statistics of the synthetic raw scores: probseg = logistic((raw - MEDIAN) / SCALE - Z_CENTER)
MEDIAN, SCALE, Z_CENTER = 1.0, 0.1, 3.0
RAW_THRESHOLD = MEDIAN + SCALE * Z_CENTER      # raw score at probseg 0.5


# ------------------------------------------------------------------------------------------------
# synthetic data
def _volumes(seed: int, blob: tuple[float, float, float] | None, strength: float):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, N)] * 3, indexing="ij"))
    brain = (g[0] / 0.8) ** 2 + (g[1] / 0.9) ** 2 + (g[2] / 0.75) ** 2 < 1
    image = np.where(brain, 100 + 15 * np.cos(5 * g[0]) + rng.normal(0, 3, brain.shape), 0).astype(np.float32)
    prob = np.full(brain.shape, 0.05, np.float32)
    if blob is not None:
        d2 = sum((g[i] - blob[i]) ** 2 for i in range(3))
        image[d2 < 0.04] += 60
        prob = np.maximum(prob, strength * np.exp(-d2 / 0.03)).astype(np.float32)
    prob = np.where(brain, prob, 0).astype(np.float32)
    return image, prob, brain


def _raw(prob: np.ndarray) -> np.ndarray:
    """Raw scores whose probseg transform is ``prob``."""
    p = np.clip(prob.astype(np.float64), 1e-6, 1 - 1e-6)
    return MEDIAN + SCALE * (Z_CENTER + np.log(p / (1 - p)))


def _write_image(bids: Path, out: Path, subject: str, session: str | None, modality: str, *,
                 seed: int, blob, strength: float, threshold: float = 0.5, n_images: int = 5) -> ImageResult:
    ses_part = f"_ses-{session}" if session else ""
    ses_dir = f"ses-{session}/" if session else ""
    prefix = f"sub-{subject}{ses_part}"
    bids_name = f"{prefix}_{modality}"
    affine = np.diag([1.2, 1.0, 1.1, 1.0])
    affine[:3, 3] = [-18.0, -15.0, -16.0]
    image, prob, brain = _volumes(seed, blob, strength)
    anat_in = bids / f"sub-{subject}" / ses_dir / "anat"
    anat_out = out / f"sub-{subject}" / ses_dir / "anat"
    anat_in.mkdir(parents=True, exist_ok=True)
    anat_out.mkdir(parents=True, exist_ok=True)
    paths = {
        "image": anat_in / f"{bids_name}.nii.gz",
        "probseg": anat_out / f"{prefix}_label-anomaly_desc-{modality}_probseg.nii.gz",
        "amask": anat_out / f"{prefix}_label-anomaly_desc-{modality}_mask.nii.gz",
        "brain": anat_out / f"{prefix}_label-brain_desc-{modality}_mask.nii.gz",
    }
    amask = (prob > threshold) & brain
    for key, data in (("image", image), ("probseg", prob), ("amask", amask.astype(np.uint8)),
                      ("brain", brain.astype(np.uint8))):
        nib.save(nib.Nifti1Image(data, affine), paths[key])
    voxel = float(abs(np.linalg.det(affine[:3, :3])))
    raw = _raw(prob)
    components = []
    if amask.any():
        ijk = np.argwhere(amask).mean(0)
        components.append({"centroid_mm": nib.affines.apply_affine(affine, ijk).tolist(),
                           "volume_mm3": float(amask.sum() * voxel), "peak": float(raw[amask].max())})
        components.append({"centroid_mm": [1.0, 2.0, 3.0], "volume_mm3": 2.2, "peak": 1.3042})
    return ImageResult(
        bids_name=bids_name, subject=subject, session=session, modality=modality,
        entities={"subject": subject, "session": session, "suffix": modality},
        image_path=paths["image"], probseg_path=paths["probseg"], anomaly_mask_path=paths["amask"],
        brain_mask_path=paths["brain"], score=float(raw[brain].max()), rank=0, percentile=math.nan,
        n_images=n_images, flagged=bool(amask.any()),
        anomalous_volume_mm3=float(amask.sum() * voxel), components=components,
    )


def _rank(results: list[ImageResult]) -> list[ImageResult]:
    ok = [r for r in results if r.ok]
    scores = np.array([r.score for r in ok])
    order = np.argsort(-scores, kind="stable")
    ranked = {}
    for rank, i in enumerate(order, start=1):
        ranked[ok[i].bids_name] = replace(ok[i], rank=rank, n_images=len(results),
                                          percentile=100.0 * float(np.mean(scores <= scores[i])))
    return [ranked.get(r.bids_name, replace(r, n_images=len(results))) for r in results]


@dataclass
class Built:
    root: Path
    batch: dict
    out: Path
    results: dict[str, list[ImageResult]]      # by modality
    subject_reports: dict[str, Path]
    group_reports: dict[str, Path]
    communities: list[dict]
    provenance: Provenance


PROVENANCE = {
    "version": "0.1.0", "encoder": "dinov2_vitl14", "timm_name": "vit_large_patch14_dinov2.lvd142m",
    "weights_sha256": "ab" * 32, "weights_source": "hub cache", "is_test_encoder": False, "seed": 0,
    "cube_size": 224, "fov_mm": 156.0, "layers": [6, 12, 18, 24], "fraction": 0.3, "projection_dim": 128,
    "codegraph": True, "codegraph_pvalue": None, "codegraph_resolution": None, "device": "cuda",
    "precision": "bf16", "threshold": 0.5, "z_center": 3.0, "config_hash": "0123456789abcdef",
    "run_id": "20261128-120000_test", "command": "cg3d /data /out group --participant-label 01",
}


@functools.cache
def build_reports() -> Built:
    """Synthetic outputs and all reports, built once per test process (shared with the browser tests)."""
    root = Path(tempfile.mkdtemp(prefix="cg3d-reports-test-"))
    atexit.register(shutil.rmtree, root, True)
    bids, out = root / "bids", root / "out"
    t2 = [
        _write_image(bids, out, "01", "01", "T2w", seed=1, blob=(0.3, -0.2, 0.1), strength=0.95),
        _write_image(bids, out, "01", "02", "T2w", seed=2, blob=(0.3, -0.2, 0.1), strength=0.85),
        _write_image(bids, out, "02", None, "T2w", seed=3, blob=(-0.3, 0.3, -0.1), strength=0.7),
        _write_image(bids, out, "04", None, "T2w", seed=4, blob=None, strength=0.0),
    ]
    failed = replace(t2[-1], bids_name="sub-03_T2w", subject="03", image_path=bids / "sub-03/anat/sub-03_T2w.nii.gz",
                     probseg_path=out / "missing.nii.gz", anomaly_mask_path=out / "missing.nii.gz",
                     brain_mask_path=out / "missing.nii.gz", score=math.nan, flagged=False,
                     anomalous_volume_mm3=0.0, components=[], status="failed",
                     error="ValueError: image is 4D (64, 64, 30, 2); expected 3D")
    t2 = _rank(t2 + [failed])
    t1 = _rank([
        _write_image(bids, out, "01", "01", "T1w", seed=5, blob=None, strength=0.0),
        _write_image(bids, out, "02", None, "T1w", seed=6, blob=None, strength=0.0),
    ])
    prov = Provenance.from_dict(PROVENANCE)
    communities = [{"id": 1, "members": ["sub-01_ses-01_T2w", "sub-01_ses-02_T2w"], "n_suspicious": [12, 9]}]
    batch = {"B": 5, "K": 1, "fraction": 0.3, "cube_size": 224, "layers": [6, 12, 18, 24], "device": "cuda",
             "threshold": 0.5, "median": MEDIAN, "scale": SCALE,
             "runtime_s": {"preprocess": 3.2, "tokens": 41.0, "scoring": 7.5, "outputs": 2.0}}
    groups = {
        "T2w": write_group_report(out, "T2w", t2, batch, communities, prov),
        "T1w": write_group_report(out, "T1w", t1, dict(batch, B=2, K=0), [], prov),
    }
    subjects: dict[str, list[ImageResult]] = {}
    for r in t2 + t1:
        subjects.setdefault(r.subject, []).append(r)
    reports = {}
    for subject, items in sorted(subjects.items()):
        fmt = "png" if subject == "04" else "svg"   # both figure formats are exercised
        reports[subject] = write_subject_report(out, subject, items, prov, figure_format=fmt)
    return Built(root, batch, out, {"T2w": t2, "T1w": t1}, reports, groups, communities, prov)


@pytest.fixture(scope="module")
def built() -> Built:
    return build_reports()


# ------------------------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.ids: set[str] = set()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append((tag, attrs[key]))


def parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _folder_bytes(html: Path, subject: str) -> int:
    return html.stat().st_size + sum(p.stat().st_size for p in (html.parent / f"sub-{subject}" / "figures").glob("*"))


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_subject_report_files_written(built):
    assert set(built.subject_reports) == {"01", "02", "03", "04"}
    for subject, html in built.subject_reports.items():
        assert html == built.out / f"sub-{subject}.html" and html.is_file()
    figs = built.out / "sub-01" / "figures"
    names = sorted(p.name for p in figs.iterdir())
    assert names == sorted([
        "sub-01_ses-01_label-anomaly_desc-T2w_probseg.svg", "sub-01_ses-01_label-brain_desc-T2w_mask.svg",
        "sub-01_ses-02_label-anomaly_desc-T2w_probseg.svg", "sub-01_ses-02_label-brain_desc-T2w_mask.svg",
        "sub-01_ses-01_label-anomaly_desc-T1w_probseg.svg", "sub-01_ses-01_label-brain_desc-T1w_mask.svg",
    ])
    assert sorted(p.name for p in (built.out / "sub-04" / "figures").iterdir()) == [
        "sub-04_label-anomaly_desc-T2w_probseg.png", "sub-04_label-brain_desc-T2w_mask.png"]
    assert not (built.out / "sub-03" / "figures").exists()          # failed image: no figures
    assert not list(built.out.rglob(".tmp-*"))                      # atomic writes left nothing behind
    for group in built.group_reports.values():
        assert group.is_file()


@pytest.mark.slow
def test_relative_links_resolve(built):
    pages = list(built.subject_reports.values()) + list(built.group_reports.values())
    checked = 0
    for page in pages:
        for tag, link in parse(page).links:
            parts = urlsplit(link)
            assert parts.scheme in ("", "file"), f"{page.name}: external link {link}"
            if not parts.path:          # same-page anchor
                assert parts.fragment in parse(page).ids, f"{page.name}: dangling #{parts.fragment}"
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file(), f"{page.name}: {tag} -> {link} does not exist"
            if parts.fragment:
                assert parts.fragment in parse(target).ids, f"{page.name}: {link} has no anchor"
            checked += 1
    assert checked > 20


def test_subject_report_size_under_5mb(built):
    for subject, html in built.subject_reports.items():
        assert _folder_bytes(html, subject) < MAX_BYTES
    svg = (built.out / "sub-01" / "figures" / "sub-01_ses-01_label-anomaly_desc-T2w_probseg.svg").read_text()
    assert "<image" in svg, "image layers should be rasterised inside the SVG"
    assert len(svg) < 600_000


def test_subject_report_content(built):
    text = built.subject_reports["01"].read_text()
    ids = parse(built.subject_reports["01"]).ids
    for r in built.results["T2w"][:2] + built.results["T1w"][:1]:
        assert image_anchor(r.bids_name) in ids
    assert {"ses-01", "ses-02", "summary", "provenance", "methods"} <= ids
    # sessions as sections, in order, the T1w and T2w of ses-01 inside the first one
    assert text.index('id="ses-01"') < text.index('id="img-sub-01_ses-01_T1w"') < text.index('id="ses-02"')
    assert "rank in batch" in text and "anomalous volume" in text and "Brain-mask check" in text
    assert "ab" * 32 in text                                    # weights sha256
    assert "test-encoder-banner" not in text
    r = next(r for r in built.results["T2w"] if r.bids_name == "sub-01_ses-01_T2w")
    assert f"{r.rank} <small>of {r.n_images}</small>" in text
    assert "2.2" in text                                        # the small component's volume


def test_failed_image_section(built):
    text = built.subject_reports["03"].read_text()
    assert 'id="img-sub-03_T2w"' in text and 'id="errors"' in text
    assert "image is 4D (64, 64, 30, 2); expected 3D" in text
    assert "<img" not in text


def test_group_table_rows_and_order(built):
    html = built.group_reports["T2w"]
    text = html.read_text()
    assert 'class="sortable" id="group-table"' in text and "<script>" in text
    names = re.findall(r'<tr class="[^"]*" data-bids-name="([^"]+)"', text)
    results = {r.bids_name: r for r in built.results["T2w"]}
    assert sorted(names) == sorted(results)                     # one row per image, failed included
    flags = [results[n].flagged for n in names]
    assert flags == sorted(flags, reverse=True)                 # flagged first
    assert results[names[-1]].status == "failed"                # failed last
    flagged_scores = [results[n].score for n in names if results[n].flagged]
    assert flagged_scores == sorted(flagged_scores, reverse=True)
    for name in names:
        r = results[name]
        assert f'href="sub-{r.subject}.html#{image_anchor(name)}"' in text
    assert text.count('<tr class="is-flagged') == sum(flags)


def test_group_distribution_and_batch(built):
    text = built.group_reports["T2w"].read_text()
    ok = [r for r in built.results["T2w"] if r.ok]
    assert text.count("<title>sub-") == len(ok)                 # one hoverable point per scored image
    assert "mask threshold: raw 1.3 = probseg 0.5" in text and 'id="cg3d-threshold"' in text
    assert "mask threshold (raw score)" in text and "batch median of the raw scores" in text
    assert 'id="runtime-table"' in text and "41.0 s" in text
    assert "filled in here when the run finishes" in text
    assert "batch size B" in text
    for ref in ("Le-Gia", "MuSc", "CoDeGraph", "DINOv2", "Nipype", "PyBIDS", "Nyúl"):
        assert ref in text
    assert text.count(EVALUATION_START) == 1 and text.count(EVALUATION_END) == 1


def test_communities_listed(built):
    text = built.group_reports["T2w"].read_text()
    section = text[text.index('id="communities"'):text.index('id="batch"')]
    for member, count in zip(built.communities[0]["members"], built.communities[0]["n_suspicious"]):
        assert f'href="sub-01.html#{image_anchor(member)}"' in section
        assert f"({count} suspicious tokens)" in section
    empty = built.group_reports["T1w"].read_text()
    assert "No groups of images were linked" in empty


def test_self_contained(built):
    for page in list(built.subject_reports.values()) + list(built.group_reports.values()):
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=", text)
        assert not re.search(r"<link[^>]+stylesheet", text)
        assert not re.search(r'(src|href)="(https?:)?//', text)
        assert "@import" not in text and "url(http" not in text


def test_test_encoder_banner(built, tmp_path):
    prov = replace(built.provenance, is_test_encoder=True, encoder="test-tiny-vit")
    t1 = built.results["T1w"]
    group = write_group_report(tmp_path, "T1w", t1, {"B": 2, "threshold": 0.5}, [], prov)
    failed_only = [replace(t1[1], status="failed", error="boom")]
    subject = write_subject_report(tmp_path, "02", failed_only, prov)
    for page in (group, subject):
        text = page.read_text()
        assert 'id="test-encoder-banner"' in text and "THESE NUMBERS MEAN NOTHING" in text
    assert 'id="test-encoder-banner"' not in built.group_reports["T1w"].read_text()


@pytest.mark.slow
def test_html_escapes_user_strings(built, tmp_path):
    evil = "<script>alert('x')</script>"
    prov = replace(built.provenance, command=f"cg3d {evil}", extra={"note": "<b>bold</b>"})
    r = replace(built.results["T1w"][1], status="failed", error=f"bad file {evil}",
                entities={"acquisition": "<i>x</i>"})
    subject = write_subject_report(tmp_path, "02", [r], prov).read_text()
    group = write_group_report(tmp_path, "T1w", [r], {"B": 1, "note": evil},
                               [{"id": 1, "members": ["<img src=x onerror=alert(1)>"], "n_suspicious": [3]}],
                               prov).read_text()
    for text in (subject, group):
        assert evil not in text and "<b>bold</b>" not in text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text
    assert "<i>x</i>" not in subject and "acq-&lt;i&gt;x&lt;/i&gt;" in subject
    assert "<img src=x" not in group and "&lt;img src=x onerror=alert(1)&gt;" in group
    with pytest.raises(ValueError):
        write_subject_report(tmp_path, "../01", [], prov)
    with pytest.raises(ValueError):
        write_subject_report(tmp_path, "01", [r], prov)       # r belongs to sub-02


def test_evaluation_insertion_idempotent(built, tmp_path):
    report = tmp_path / "group_T2w.html"
    shutil.copy(built.group_reports["T2w"], report)
    original = report.read_text()
    fragment = ('<section id="evaluation-T2w"><h2>Evaluation</h2>'
                '<table><tr><td>AUROC</td><td>0.91</td></tr></table></section>')
    insert_evaluation_section(report, fragment)
    once = report.read_text()
    assert fragment in once and "Not evaluated" not in once
    assert once.count(EVALUATION_START) == 1 and once.count(EVALUATION_END) == 1
    assert once.index(EVALUATION_START) < once.index(fragment) < once.index(EVALUATION_END)
    assert once.replace(fragment, "").count("</html>") == 1
    insert_evaluation_section(report, fragment)
    assert report.read_text() == once                           # idempotent
    insert_evaluation_section(report, "<p>AUROC 0.95</p>")
    twice = report.read_text()
    assert "<p>AUROC 0.95</p>" in twice and fragment not in twice
    assert twice.count(EVALUATION_START) == 1
    # everything outside the markers is untouched
    head, tail = original.split(EVALUATION_START)[0], original.split(EVALUATION_END)[1]
    assert twice.startswith(head) and twice.endswith(tail)
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError):
        insert_evaluation_section(report, f"<p>{EVALUATION_END}</p>")
    # a page without markers gets them before </main>
    bare = tmp_path / "bare.html"
    bare.write_text("<html><body><main><p>x</p></main></body></html>")
    insert_evaluation_section(bare, "<p>m</p>")
    insert_evaluation_section(bare, "<p>m</p>")
    text = bare.read_text()
    assert text.count(EVALUATION_START) == 1 and text.index("<p>m</p>") < text.index("</main>")


def test_figure_failure_keeps_report(built, tmp_path):
    r = replace(built.results["T1w"][1], probseg_path=tmp_path / "gone.nii.gz")
    text = write_subject_report(tmp_path, "02", [r], built.provenance).read_text()
    assert "The anomaly figure could not be drawn" in text and "gone.nii.gz" in text
    assert "Brain-mask check" in text
    assert (tmp_path / "sub-02" / "figures" / "sub-02_label-brain_desc-T1w_mask.svg").is_file()


@pytest.mark.slow
def test_size_budget_redraws_figures(built, tmp_path):
    r = built.results["T2w"][2]                                 # sub-02's T2w, drawn at the default dpi
    figs = built.out / "sub-02" / "figures"
    size = sum((figs / f"sub-02_label-{what}_desc-T2w_{suffix}.svg").stat().st_size
               for what, suffix in (("anomaly", "probseg"), ("brain", "mask"))) + 20_000
    second = write_subject_report(tmp_path / "b", "02", [r], built.provenance, max_bytes=int(size * 0.6))
    # drawn again at a lower resolution (30^3 test images: fixed SVG overhead dominates the size)
    assert _folder_bytes(second, "02") < size * 0.95
    assert "<img" in second.read_text()


def test_provenance_from_dict():
    prov = Provenance.from_dict({**PROVENANCE, "random_seed": 7, "seed": None, "new_key": "v"})
    assert prov.layers == [6, 12, 18, 24] and prov.extra == {"new_key": "v"}
    rows = dict(prov.rows())
    assert rows["weights sha256"] == "ab" * 32 and rows["new_key"] == "v"
    assert Provenance.from_dict({"random_seed": 7}).seed == 7
    assert Provenance.from_dict(None).is_test_encoder is False


def test_cut_coordinates_include_peak(built):
    r = built.results["T2w"][0]
    prob, brain = nib.load(r.probseg_path), nib.load(r.brain_mask_path)
    peak, value = figures.peak_coordinates(prob, brain)
    data = np.asarray(prob.dataobj)
    assert value == pytest.approx(float(data.max()))
    ijk = np.unravel_index(int(np.argmax(data)), data.shape)
    assert np.allclose(peak, nib.affines.apply_affine(prob.affine, ijk))
    cuts = figures.cut_coordinates(brain, 7, peak)
    for axis, mode in enumerate("xyz"):
        assert round(peak[axis], 2) in cuts[mode] and 4 <= len(cuts[mode]) <= 7
        assert cuts[mode] == sorted(cuts[mode])
    offsets = figures.swarm_offsets([0.1, 0.1, 0.1, 0.9], bin_width=0.05)
    assert sorted(offsets[:3].tolist()) == [-1.0, 0.0, 1.0] and offsets[3] == 0.0


def test_image_labels_and_order(built):
    base = built.results["T2w"][0]
    runs = [replace(base, bids_name=f"sub-01_ses-01_acq-hi_run-{k}_T2w",
                    entities={"subject": "01", "session": "01", "acquisition": "hi", "run": k, "suffix": "T2w"})
            for k in (10, 2)]
    assert runs[0].label == "T2w · acq-hi · run-10" and runs[0].source_prefix == "sub-01_ses-01_acq-hi_run-10"
    assert [r.bids_name for r in sorted(runs, key=ImageResult.sort_key)] == [
        "sub-01_ses-01_acq-hi_run-2_T2w", "sub-01_ses-01_acq-hi_run-10_T2w"]
    assert image_anchor("sub-01_ses-01 x<y>_T2w") == "img-sub-01_ses-01-x-y-_T2w"


# ------------------------------------------------------------------------------------------------
# scores: raw units on the group plot, "peak" named everywhere
def _plot_points(text: str) -> tuple[dict[str, float], float | None]:
    """x of each image's point (by name, from its hover title) and of the threshold line."""
    from test_reports_figures import _positions

    svg = text[text.index("<svg"):text.index("</svg>")]
    points, line = _positions(svg)
    names = dict(re.findall(r'<g id="cg3d-pt-(\d+)"><title>([^:<]+):', svg))
    return {names[str(i)]: x for i, x in points.items()}, line


def test_group_threshold_line_is_in_raw_units(built):
    text = built.group_reports["T2w"].read_text()
    points, line = _plot_points(text)
    results = {r.bids_name: r for r in built.results["T2w"] if r.ok}
    assert set(points) == set(results) and line is not None
    assert any(r.flagged for r in results.values()) and not all(r.flagged for r in results.values())
    for name, x in points.items():
        r = results[name]
        assert r.flagged == (r.score > RAW_THRESHOLD)
        assert (x > line) if r.flagged else (x < line), name
    assert f"({RAW_THRESHOLD:.3f}, i.e. probseg 0.50)" in text


def test_group_plot_without_batch_statistics_has_no_line(built, tmp_path):
    batch = {k: v for k, v in built.batch.items() if k not in ("median", "scale")}
    text = write_group_report(tmp_path, "T2w", built.results["T2w"], batch, [], built.provenance).read_text()
    assert _plot_points(text)[1] is None and 'id="cg3d-threshold"' not in text
    assert "no threshold line" in text and "mask threshold (raw score)" not in text


def _visible_text(html: str) -> str:
    html = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_peak_is_always_named(built):
    """Every "peak" in the subject report and its figures is "peak probseg" or "peak raw score"."""
    html = built.subject_reports["01"].read_text()
    figs = sorted((built.out / "sub-01" / "figures").glob("*probseg.svg"))
    texts = [_visible_text(html)] + [_visible_text(p.read_text()) for p in figs]
    n = 0
    for text in texts:
        for m in re.finditer(r"\bpeak\b", text, flags=re.I):
            assert text[m.end():].startswith((" probseg", " raw score")), text[m.start() - 40:m.end() + 40]
            n += 1
    assert n >= 8
    r = next(r for r in built.results["T2w"] if r.bids_name == "sub-01_ses-01_T2w")
    prob, brain = nib.load(r.probseg_path), nib.load(r.brain_mask_path)
    peak_probseg = float(np.asarray(prob.dataobj)[np.asarray(brain.dataobj) > 0].max())
    assert f"peak probseg {peak_probseg:.2f} at" in figs[[p.name.startswith("sub-01_ses-01_label-anomaly_desc-T2w")
                                                          for p in figs].index(True)].read_text()
    assert f"(probseg {peak_probseg:.3f} at" in html
    assert "peak raw score</th>" in html
    assert f'data-value="{r.components[0]["peak"]}">{r.components[0]["peak"]:.3f}</td>' in html
    assert r.components[0]["peak"] > RAW_THRESHOLD and r.score == pytest.approx(r.components[0]["peak"])


def test_caption_gives_the_world_cut_coordinates(built):
    html = built.subject_reports["02"].read_text()
    r = next(r for r in built.results["T2w"] if r.subject == "02")
    peak, _ = figures.peak_coordinates(nib.load(r.probseg_path), nib.load(r.brain_mask_path))
    cuts = figures.cut_coordinates(nib.load(r.brain_mask_path), 7, peak)
    listed = "; ".join(f"{mode} = " + ", ".join(str(round(c, 1)) for c in cuts[mode]) for mode in "xyz")
    assert f"coordinates {listed} mm" in re.sub(r"\s+", " ", html)
    assert "neurological view" in html


@pytest.mark.slow
def test_subject_report_from_in_memory_volumes(built, tmp_path):
    """Arrays handed over as nibabel images give the same figures as the files (which may be gone)."""
    r = next(r for r in built.results["T2w"] if r.bids_name == "sub-01_ses-01_T2w")
    given = {}
    for layer, path in (("image", r.image_path), ("probseg", r.probseg_path),
                        ("anomaly_mask", r.anomaly_mask_path), ("brain_mask", r.brain_mask_path)):
        img = nib.load(path)
        given[layer] = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    gone = tmp_path / "gone.nii.gz"
    moved = replace(r, image_path=gone, probseg_path=gone, anomaly_mask_path=gone, brain_mask_path=gone)
    write_subject_report(tmp_path, "01", [moved], built.provenance, volumes={r.bids_name: given})
    for name in figures_names(r):
        assert (tmp_path / "sub-01" / "figures" / name).read_bytes() == \
            (built.out / "sub-01" / "figures" / name).read_bytes()


def figures_names(r: ImageResult) -> tuple[str, str]:
    from cg3d_bids.reports.subject import figure_names

    return figure_names(r)


@pytest.mark.slow
def test_group_report_warns_when_a_flag_contradicts_the_threshold(built, tmp_path, caplog):
    results = list(built.results["T2w"])
    i = next(k for k, r in enumerate(results) if r.ok and not r.flagged)
    results[i] = replace(results[i], flagged=True)           # flagged, yet left of the raw threshold
    with caplog.at_level("WARNING", logger="cg3d.reports"):
        write_group_report(tmp_path, "T2w", results, built.batch, [], built.provenance)
    assert results[i].bids_name in caplog.text and "disagree" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cg3d.reports"):
        write_group_report(tmp_path, "T2w", built.results["T2w"], built.batch, [], built.provenance)
    assert "disagree" not in caplog.text


def test_group_report_timings_are_filled_in_at_the_end(built):
    """The Batch card's timings block is replaced by the run's table (idempotently)."""
    from cg3d_bids.reports.group import insert_timings
    from cg3d_bids.timings import TimingRow

    report = built.group_reports["T2w"]
    rows = [TimingRow("prepare", "T2w", 4, 2.0, 3.5, 0.0, 2.0), TimingRow("score", "T1w", 4, 9.0, 9.0, 2.0, 11.0),
            TimingRow("total", "all", 0, 20.0, 30.0, 0.0, 20.0)]
    insert_timings(report, "T2w", rows, "run-42")
    text = report.read_text()
    assert "filled in here when the run finishes" not in text
    block = text[text.index("cg3d:timings:start"):text.index("cg3d:timings:end")]
    assert "timings-run-42.tsv" in block and ">prepare<" in block and ">total<" in block
    assert ">score<" not in block, "rows of another modality are left out"
    assert "1.8" in block  # CPU / wall of prepare (3.5 / 2.0)
    before = report.read_text()
    insert_timings(report, "T2w", rows, "run-42")
    assert report.read_text() == before
