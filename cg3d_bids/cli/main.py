"""The ``cg3d`` command: the BIDS-App (``cg3d BIDS_DIR OUTPUT_DIR LEVEL``) and its subcommands.

``cg3d COMMAND ...`` runs a subcommand when the first argument names one (listed in ``cg3d
--help``, each with its own argparse parser and ``--help``); anything else is the BIDS-App call.
A BIDS folder literally named like a command is given as ``./demo``.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import slurm
from . import demo, evaluate, reference, run
from .parser import COMMANDS

__all__ = ["console", "main"]

#: subcommand -> its ``main(argv) -> int`` (argv after the command name)
HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "demo": demo.main,
    "evaluate": evaluate.main,
    "slurm-script": slurm.main,
    "reference": reference.main,
}
assert set(HANDLERS) == set(COMMANDS), "every subcommand is listed in cg3d --help"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cg3d``; returns the exit code."""
    # nipype would ask the network for its latest version (etelemetry) at the first interface: a
    # stall on offline HPC nodes and a call home nobody asked for (the container sets it too)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HANDLERS:
        return HANDLERS[argv[0]](argv[1:])
    return run.main(argv)


def console() -> NoReturn:
    """The ``cg3d`` program: :func:`main`, then exit.

    Before exiting, every object is frozen out of the garbage collector's reach (``gc.freeze``):
    the interpreter's teardown would otherwise run full collections over the ~0.5 M objects that
    torch, timm and matplotlib create, 1.5-2 core-s for nothing at the end of every run.
    """
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    console()
