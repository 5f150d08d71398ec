"""BIDS side of cg3d: input discovery (pybids), output names, derivatives metadata, group tables,
and BIDS validation. The numerical core never imports this package."""

from .discovery import DiscoveryResult, ImageRecord, discover_images, parse_labels
from .naming import output_paths

__all__ = ["DiscoveryResult", "ImageRecord", "discover_images", "output_paths", "parse_labels"]
