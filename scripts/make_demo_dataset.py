#!/usr/bin/env python
"""Rebuild the bundled demo BIDS dataset ``cg3d_bids/data/demo`` from the 4 mm ``tiny`` fixtures.

Usage: ``python scripts/make_demo_dataset.py [--tiny /work/shared/data/tiny] [--dest cg3d_bids/data/demo]``

Deterministic: NIfTI files are copied from ``tiny/`` with one header change (spatial units set to
mm, ``xyzt_units = 2``; the fixtures say "unknown", which the BIDS validator warns about) and
re-gzipped with ``mtime = 0``; every text file is generated from the tables below and the licence
files of the source folders next to ``tiny/``. The destination is deleted and rewritten.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

BIDS_VERSION = "1.10.0"
NAME = "cg3d demo: 7 subjects at 4 mm (MS, glioma, healthy)"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Subject:
    label: str         # BIDS label (alphanumeric)
    folder: str        # folder in tiny/
    condition: str     # participants.tsv condition
    age: str
    sex: str
    source_folder: str  # full-resolution folder next to tiny/
    source: str        # human-readable source
    licence: str       # licence of the images
    licence_files: tuple[str, ...]  # paths relative to the data root


SUBJECTS = (
    Subject("glioma6692", "glioma_TCGA-FG-6692", "glioma", "n/a", "n/a", "brainles_tcga_lgg",
            "TCGA-LGG subject TCGA-FG-6692 (The Cancer Imaging Archive), preprocessed by "
            "BraTS-Toolkit/BrainLes (github:BrainLesion/tutorials @ a2d3fff); lesion = majority-vote "
            "fusion of 5 BraTS algorithms (algorithm output, not a manual segmentation)",
            "images: TCIA TCGA-LGG, CC BY 3.0; preprocessing repository: Apache-2.0",
            ("brainles_tcga_lgg/LICENSE-Apache-2.0.txt",)),
    Subject("glioma7294", "glioma_TCGA-DU-7294", "glioma", "n/a", "n/a", "brainles_tcga_lgg",
            "TCGA-LGG subject TCGA-DU-7294 (The Cancer Imaging Archive), preprocessed by "
            "BraTS-Toolkit/BrainLes (github:BrainLesion/tutorials @ a2d3fff); lesion = majority-vote "
            "fusion of 5 BraTS algorithms (algorithm output, not a manual segmentation)",
            "images: TCIA TCGA-LGG, CC BY 3.0; preprocessing repository: Apache-2.0",
            ("brainles_tcga_lgg/LICENSE-Apache-2.0.txt",)),
    Subject("healthychris", "healthy_chris", "healthy", "n/a", "n/a", "niivue_demo",
            "chris_t1 from the NiiVue repository (github:niivue/niivue @ 9255c43), healthy adult "
            "(C. Rorden); skull-stripped with deepbet 1.0.2",
            "BSD-2-Clause (NiiVue repository)", ("niivue_demo/LICENSE-BSD-2-Clause.txt",)),
    Subject("healthyixi012", "healthy_IXI012", "healthy", "n/a", "n/a", "ixi_small_t1",
            "IXI012-HH-1211 of the IXI dataset (Imperial College London, brain-development.org), "
            "2 mm copy from github:CBICA/NiChart_Project @ 1a04acb; skull-stripped with deepbet 1.0.2",
            "CC BY-SA 3.0 (IXI; derivatives shared under the same licence)",
            ("ixi_small_t1/LICENSE-IXI.txt",)),
    Subject("healthymni152", "healthy_MNI152NLin6Asym", "healthy", "n/a", "n/a", "healthy_templates",
            "FSL MNI152NLin6Asym 1 mm T1w template (a population average, not an individual) from "
            "the nimare 0.22.1 wheel (TemplateFlow), skull-stripped with its brain mask",
            "MNI/ICBM template notice (McConnell Brain Imaging Centre)",
            ("healthy_templates/LICENSE-MNI-NOTICE.txt",)),
    Subject("ms07", "ms_patient07", "multiple_sclerosis", "53", "F", "open_ms_data",
            "patient 07 of the Ljubljana MS database (Lesjak et al., Neuroinformatics 2017, "
            "doi:10.1007/s12021-017-9348-7) via github:muschellij2/open_ms_data @ 6570490, MNI space; "
            "lesion = multi-rater consensus (near lesion-free at 4 mm)",
            "CC-BY (cite Lesjak et al. 2017)", ("open_ms_data/LICENSE.txt",)),
    Subject("ms26", "ms_patient26", "multiple_sclerosis", "40", "F", "open_ms_data",
            "patient 26 of the Ljubljana MS database (Lesjak et al., Neuroinformatics 2017, "
            "doi:10.1007/s12021-017-9348-7) via github:muschellij2/open_ms_data @ 6570490, MNI space; "
            "lesion = multi-rater consensus",
            "CC-BY (cite Lesjak et al. 2017)", ("open_ms_data/LICENSE.txt",)),
)
MODALITIES = ("T1w", "T2w", "FLAIR")

README = """\
# cg3d demo dataset

Seven real brain MRI subjects at 4 mm isotropic, small enough (< 1 MB) to run `cg3d demo` on a CPU.
Built by `scripts/make_demo_dataset.py` of the cg3d repository from its 4 mm test fixtures.

- T1w for all 7 subjects (2 multiple sclerosis, 2 lower-grade glioma, 3 healthy, one of which is
  the MNI152 template, a population average); T2w and FLAIR for the 4 patients.
- Subjects come from different public datasets, scanners and spaces (native, MNI, SRI-24): grids
  differ on purpose. Patient-level results on this mix are confounded by domain.
- **The images are already skull-stripped** (background 0). Brain masks are in
  `derivatives/masks` (`desc-brain_mask`, on each subject's image grid, shared by its contrasts);
  lesion masks of the patients in `derivatives/lesions` (`label-lesion_mask`; the glioma ones are
  an algorithm fusion, not manual ground truth).
- Processing of the fixtures: resampled to 4 mm in the source voxel orientation (linear), brain
  mask = resampled mask >= 0.5, lesion = resampled lesion >= 0.25 within the brain; intensities
  clipped at 0 and scaled so that the 99.5th brain percentile is 3000, int16.
- Licences differ per subject (CC-BY, CC BY 3.0, CC BY-SA 3.0, BSD-2-Clause, MNI notice): see
  `LICENSES.md`, which also lists each subject's source. `participants.tsv` says which is which.

Not for clinical use. Ages/sexes are given only where the source publishes them.
"""

DERIVATIVE_README = """\
# cg3d demo {what}

Derivative dataset of the cg3d demo dataset (`../..`), built by `scripts/make_demo_dataset.py`.

Files: `{pattern}`: {detail}.
Values are 0/1 (uint8), 4 mm isotropic, same affine as the raw images.
Licences follow the subject (see `../../LICENSES.md`); sources are described in `../../README`.
"""


def dataset_description() -> dict:
    return {
        "Name": NAME,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "mixed, per subject: see LICENSES.md",
        "Authors": ["cg3d developers (assembly)"],
        "Acknowledgements": "Data from the Ljubljana MS database (Lesjak et al. 2017), TCIA TCGA-LGG, "
                            "the IXI dataset, NiiVue and the MNI/ICBM templates; see LICENSES.md.",
        "ReferencesAndLinks": ["https://doi.org/10.1007/s12021-017-9348-7",
                               "https://brain-development.org/ixi-dataset/",
                               "https://www.cancerimagingarchive.net/collection/tcga-lgg/"],
        "GeneratedBy": [{"Name": "cg3d make_demo_dataset.py",
                         "Description": "4 mm copies of public skull-stripped MRI (see README)"}],
        "SourceDatasets": [
            {"URL": "https://github.com/muschellij2/open_ms_data", "DOI": "doi:10.1007/s12021-017-9348-7"},
            {"URL": "https://github.com/BrainLesion/tutorials"},
            {"URL": "https://github.com/niivue/niivue"},
            {"URL": "https://github.com/CBICA/NiChart_Project"},
            {"URL": "https://www.templateflow.org/ (MNI152NLin6Asym, via the nimare wheel)"},
        ],
    }


def derivative_description(name: str, description: str) -> dict:
    return {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "License": "mixed, per subject: see ../../LICENSES.md",
        "GeneratedBy": [{"Name": "cg3d make_demo_dataset.py", "Description": description}],
        "SourceDatasets": [{"URL": "../.."}],
    }


PARTICIPANTS_JSON = {
    "participant_id": {"Description": "BIDS subject label"},
    "condition": {
        "Description": "diagnosis of the subject",
        "Levels": {
            "healthy": "no known brain disease (healthymni152 is a population-average template)",
            "multiple_sclerosis": "multiple sclerosis (white-matter lesions)",
            "glioma": "lower-grade glioma (TCGA-LGG)",
        },
    },
    "age": {"Description": "age at scan where the source publishes it", "Units": "year"},
    "sex": {"Description": "sex where the source publishes it", "Levels": {"F": "female", "M": "male"}},
    "source": {"Description": "public dataset the images come from (details in LICENSES.md)"},
}


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def copy_nifti(src: Path, dest: Path) -> None:
    """Copy a .nii.gz, setting the spatial units to mm (header byte 123) and gzip mtime to 0."""
    raw = bytearray(gzip.decompress(src.read_bytes()))
    if int.from_bytes(raw[:4], "little") != 348:
        raise ValueError(f"{src}: not a little-endian NIfTI-1 file")
    raw[123] = (raw[123] & 0xF8) | 2  # NIFTI_UNITS_MM, time units kept
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.compress(bytes(raw), compresslevel=9, mtime=0))


def participants_tsv() -> str:
    rows = ["participant_id\tcondition\tage\tsex\tsource"]
    rows += [f"sub-{s.label}\t{s.condition}\t{s.age}\t{s.sex}\t{s.source_folder}" for s in SUBJECTS]
    return "\n".join(rows) + "\n"


def licenses_md(data_root: Path) -> str:
    lines = ["# Licences and sources of the demo data", "",
             "The images are 4 mm derivatives of public data; each keeps the licence of its source.",
             "The cg3d software licence (Apache-2.0) does not apply to these files.", "",
             "| subject | source | licence |", "|---|---|---|"]
    lines += [f"| sub-{s.label} | {s.source} | {s.licence} |" for s in SUBJECTS]
    lines += ["", "Derivatives (`derivatives/masks`, `derivatives/lesions`) inherit the licence of the "
              "subject they belong to.", ""]
    seen: list[str] = []
    for subject in SUBJECTS:
        for rel in subject.licence_files:
            if rel in seen:
                continue
            seen.append(rel)
            users = ", ".join(f"sub-{s.label}" for s in SUBJECTS if rel in s.licence_files)
            text = (data_root / rel).read_text(encoding="utf-8").strip()
            lines += [f"## `{rel}` (applies to {users})", "", "```text", text, "```", ""]
    return "\n".join(lines)


def build(tiny: Path, dest: Path) -> Path:
    """Write the demo dataset from ``tiny`` into ``dest`` (deleted first)."""
    tiny, dest = Path(tiny), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    write_json(dest / "dataset_description.json", dataset_description())
    write_text(dest / "README", README)
    write_text(dest / "participants.tsv", participants_tsv())
    write_json(dest / "participants.json", PARTICIPANTS_JSON)
    write_text(dest / "LICENSES.md", licenses_md(tiny.parent))
    write_text(dest / ".bidsignore", "LICENSES.md\n")
    masks = dest / "derivatives" / "masks"
    lesions = dest / "derivatives" / "lesions"
    write_json(masks / "dataset_description.json", derivative_description(
        "cg3d demo brain masks", "brain masks of the source datasets resampled to 4 mm (>= 0.5)"))
    write_text(masks / "README", DERIVATIVE_README.format(
        what="brain masks", pattern="sub-<label>/anat/sub-<label>_desc-brain_mask.nii.gz",
        detail="one per subject (all 7), on the grid of the subject's images (its T1w, T2w and FLAIR "
               "share one grid); resampled source brain mask >= 0.5"))
    write_text(lesions / "README", DERIVATIVE_README.format(
        what="lesion masks", pattern="sub-<label>/anat/sub-<label>_label-lesion_mask.nii.gz",
        detail="one per patient (ms07, ms26, glioma6692, glioma7294), on the subject's image grid; "
               "resampled source lesion mask >= 0.25 within the brain mask. MS: multi-rater "
               "consensus; glioma: algorithm fusion (not manual). Ground truth for `cg3d evaluate`"))
    write_json(lesions / "dataset_description.json", derivative_description(
        "cg3d demo lesion masks", "lesion masks of the source datasets resampled to 4 mm (>= 0.25), "
                                  "within the brain; ground truth for `cg3d evaluate`"))
    for s in SUBJECTS:
        src = tiny / s.folder
        sub = f"sub-{s.label}"
        for modality in MODALITIES:
            if (src / f"{modality}.nii.gz").exists():
                copy_nifti(src / f"{modality}.nii.gz", dest / sub / "anat" / f"{sub}_{modality}.nii.gz")
        copy_nifti(src / "brainmask.nii.gz", masks / sub / "anat" / f"{sub}_desc-brain_mask.nii.gz")
        write_json(masks / sub / "anat" / f"{sub}_desc-brain_mask.json", {"Type": "Brain"})
        if (src / "lesion.nii.gz").exists():
            copy_nifti(src / "lesion.nii.gz", lesions / sub / "anat" / f"{sub}_label-lesion_mask.nii.gz")
            write_json(lesions / sub / "anat" / f"{sub}_label-lesion_mask.json", {"Type": "Lesion"})
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=Path, default=Path("/work/shared/data/tiny"))
    parser.add_argument("--dest", type=Path, default=REPO / "cg3d_bids" / "data" / "demo")
    args = parser.parse_args(argv)
    out = build(args.tiny, args.dest)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
