"""``python -m cg3d_bids`` runs the ``cg3d`` command."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
