"""cg3d: training-free zero-shot anomaly detection in 3D brain MRI, as a BIDS-App.

The numerical core (:mod:`cg3d_bids.core.tokens`, :mod:`cg3d_bids.core.scoring`, :mod:`cg3d_bids.core.maps`,
:mod:`cg3d_bids.core.models`) works on plain arrays and knows nothing of BIDS or nipype; the BIDS-App
(:mod:`cg3d_bids.cli`, :mod:`cg3d_bids.bids`, :mod:`cg3d_bids.workflows`) wraps it.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
