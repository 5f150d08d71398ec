"""``python -m cg3d_bids.boutiques`` prints the descriptor (to rewrite descriptor.json)."""

from . import descriptor_text

print(descriptor_text(), end="")
