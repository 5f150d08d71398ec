"""Methods boilerplate written to ``logs/CITATION.md`` (CC0, like fMRIPrep's)."""

from __future__ import annotations

from .. import __version__
from ..settings import Settings

REFERENCES = {
    "cg3d3d": "Le-Gia T, Ahn J. Training-Free Zero-Shot Anomaly Detection in 3D Brain MRI with 2D "
    "Foundation Models. MIDL 2026 (under review).",
    "musc": "Li X, Huang Z, Xue F, Zhou Y. MuSc: Zero-shot industrial anomaly classification and "
    "segmentation with mutual scoring of the unlabeled images. ICLR 2024.",
    "codegraph": "Le Gia T, Ahn J. On the problem of consistent anomalies in zero-shot industrial "
    "anomaly detection. TMLR 2025.",
    "dinov2": "Oquab M, et al. DINOv2: Learning robust visual features without supervision. arXiv:2304.07193, 2023.",
    "nyul": "Nyúl LG, Udupa JK, Zhang X. New variants of a method of MRI scale standardization. "
    "IEEE TMI 19(2):143-150, 2000.",
    "nipype": "Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging data "
    "processing framework in Python. Front Neuroinform 5:13, 2011.",
    "pybids": "Yarkoni T, et al. PyBIDS: Python tools for BIDS datasets. JOSS 4(40):1294, 2019.",
}


def _encoder_sentence(settings: Settings) -> str:
    """What encoded the slices, truthfully (a random test encoder is never called DINOv2)."""
    method, run = settings.method, settings.run
    if run.is_test_encoder:
        return (f"a randomly initialised test vision transformer ({method.encoder}; no pretrained "
                "weights: THE RESULTS OF THIS RUN ARE MEANINGLESS and must not be reported)")
    family = "DINOv2 [dinov2]" if method.encoder.startswith("dinov2") else "CLIP" if method.encoder.startswith("clip") \
        else method.encoder
    return f"a frozen 2D vision transformer ({method.encoder}, weights sha256 {run.weights_sha256 or 'n/a'}; {family})"


def citation_markdown(settings: Settings) -> str:
    """Methods text describing this run's settings, with references."""
    method = settings.method
    codegraph = (
        "Consistent anomalies (similar lesions in several images) were handled by cg3d's "
        "reconstruction of CoDeGraph [codegraph]: tokens with an abrupt jump in their sorted "
        "cross-image distances were linked into an image graph, communities were found with Leiden "
        "(CPM objective), and suspicious tokens were excluded from each other's reference sets before "
        "re-scoring."
        if method.codegraph else "The consistent-anomaly stage was disabled (plain MuSc scoring)."
    )
    warning = ("> **Warning: this run used the random test encoder. The maps and scores mean nothing; "
               "do not use this text in a publication.**\n\n" if settings.run.is_test_encoder else "")
    text = f"""# Methods (cg3d {__version__})

{warning}Anomaly maps were computed with cg3d {__version__}, an implementation of CoDeGraph3D [cg3d3d], a
training-free zero-shot anomaly detection method for 3D brain MRI. Each image was reoriented to
RAS, cropped to a {method.fov_mm:g} mm cube centred on its brain mask and resampled to
{method.cube_size}^3 voxels; intensities were standardised with Nyúl's piecewise-linear method
[nyul] using landmarks learned from all images of the same modality. Every axial, coronal and
sagittal slice was encoded by {_encoder_sentence(settings)}; patch features of layers
{", ".join(map(str, settings.run.layers))} were averaged over blocks of 14
slices into 3D tokens, L2-normalised, randomly projected to {method.projection_dim} dimensions per
axis (seed {method.random_seed}) and concatenated. Tokens outside the brain mask were excluded.
Tokens were scored per layer with MuSc mutual scoring [musc] (mean of the
{method.fraction:g} x (B - 1) smallest nearest-token distances to the other images). {codegraph}
Layer maps were averaged, upsampled trilinearly and mapped back to each image's native grid.
The workflow ran on nipype [nipype]; inputs were queried with PyBIDS [pybids].

This text is released under the CC0 license; copy it into your manuscript.

## References
"""
    return text + "".join(f"- [{key}] {ref}\n" for key, ref in REFERENCES.items())
