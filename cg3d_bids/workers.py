"""nipype's MultiProc plugin with workers that die with cg3d and log like it.

nipype's :class:`~nipype.pipeline.plugins.MultiProcPlugin` runs nodes in a
``concurrent.futures.ProcessPoolExecutor`` whose workers are children of cg3d. Its initializer
only changes folder; this one (:func:`init_worker`) also

- gives the workers default stop-signal dispositions and makes them die with the main process
  (:func:`cg3d_bids.signals.die_with_parent`: ``PR_SET_PDEATHSIG`` on Linux), so that no worker
  outlives cg3d or writes after it, even when cg3d is SIGKILLed;
- sets up logging in spawned workers (CUDA runs) as in the main process
  (:func:`cg3d_bids.logging_setup.configure_worker`): one console, the run's log file.

:func:`runner` turns the plugin name and arguments of a run into what ``Workflow.run`` takes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from nipype.pipeline.plugins import multiproc

from . import logging_setup, signals

__all__ = ["MultiProcPlugin", "init_worker", "runner"]


def init_worker(cwd: str, parent: int, stop_signals: tuple[int, ...], verbose: int, log_file: str | None) -> None:
    """Initializer of every worker process (see the module docstring)."""
    signals.die_with_parent(parent, stop_signals)
    logging_setup.configure_worker(verbose, log_file)
    multiproc.process_initializer(cwd)


class MultiProcPlugin(multiproc.MultiProcPlugin):
    """nipype's MultiProc (same name, same arguments) with :func:`init_worker` in its workers."""

    def __init__(self, plugin_args: dict[str, Any] | None = None):
        super().__init__(plugin_args=plugin_args)
        self.pool.shutdown(wait=False)  # nipype's pool: no worker started yet
        log_file = logging_setup.log_file()
        self.pool = ProcessPoolExecutor(
            max_workers=self.processors, initializer=init_worker,
            initargs=(self._cwd, os.getpid(), signals.worker_signals(), logging_setup.verbosity(),
                      str(log_file) if log_file else None),
            mp_context=mp.get_context(self.plugin_args.get("mp_context")),
        )


def runner(plugin: str, plugin_args: dict[str, Any]) -> str | MultiProcPlugin:
    """``Workflow.run``'s ``plugin``: cg3d's :class:`MultiProcPlugin` for MultiProc, else the name."""
    if plugin == "MultiProc":
        return MultiProcPlugin(plugin_args=plugin_args)
    return plugin
