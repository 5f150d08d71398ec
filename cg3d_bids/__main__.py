"""``python -m cg3d_bids`` runs the ``cg3d`` command."""

from .cli.main import console

if __name__ == "__main__":
    console()
