"""cg3d: training-free zero-shot anomaly detection in 3D brain MRI, as a BIDS-App.

The numerical core (:mod:`cg3d_bids.tokens`, :mod:`cg3d_bids.scoring`, :mod:`cg3d_bids.maps`,
:mod:`cg3d_bids.models`) works on plain arrays and knows nothing of BIDS or nipype; the BIDS-App
(:mod:`cg3d_bids.cli`, :mod:`cg3d_bids.bids`, :mod:`cg3d_bids.workflows`) wraps it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
