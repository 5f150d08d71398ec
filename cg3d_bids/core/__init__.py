"""The numerical core of cg3d: plain functions and dataclasses on numpy arrays and torch tensors.

- :mod:`.preprocessing`: load and validate NIfTI images and brain masks, the isotropic cube,
  Nyul standardisation, optional skull stripping;
- :mod:`.models`: the frozen 2D ViT encoders (timm) and their weights;
- :mod:`.tokens` / :mod:`.projection`: 3D patch tokens of a cube;
- :mod:`.scoring`: MuSc mutual scoring and the consistent-anomaly (CoDeGraph) stage;
- :mod:`.maps`: token scores to voxel maps, the probseg transform, subject summaries;
- :mod:`.metrics`: evaluation metrics against lesion masks.

Nothing here imports pybids, nipype or any other part of ``cg3d_bids`` but :mod:`cg3d_bids.errors`,
:mod:`cg3d_bids.atomic` and :mod:`cg3d_bids.hashing` (tests/test_layers.py checks it).
"""
