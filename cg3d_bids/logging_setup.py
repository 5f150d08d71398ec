"""One clean console: cg3d's own messages one line each on stderr, everything in the run's log file.

At the default level the console shows cg3d's records (INFO and up), one line per record (line
breaks folded, tracebacks left out); nipype's records (its node chatter and crash tracebacks)
and Python warnings that cg3d already reports in its own words go to the log file only
(``work/runs/<run_id>/cg3d.log``, copied to ``OUT/logs/``). ``-v`` adds nipype's warnings and
errors to the console, ``-vv`` everything at debug level. A record logged with
``extra=FILE_ONLY`` (e.g. a traceback already summarised on the console) skips the console.

nipype installs its own stdout handler on the ``nipype`` logger when it is first imported (and
only when that logger has no handler): :func:`configure` puts a ``NullHandler`` there first and
removes a stream handler nipype already added, so nipype's records reach the log file through
the root logger and never stdout.

Worker processes (nipype MultiProc) forked from the main process inherit these handlers;
spawned ones (CUDA runs) call :func:`configure_worker` from their initializer.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path

__all__ = ["FILE_ONLY", "configure", "configure_worker", "log_file", "verbosity"]

#: ``logger.error(..., extra=FILE_ONLY)``: the record goes to the log file, not the console.
FILE_ONLY = {"cg3d_console": False}
FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
DATEFMT = "%H:%M:%S"
#: Loggers whose records stay off the console at the default level.
QUIET_LOGGERS = ("nipype", "concurrent.futures", "filelock")
#: Warning classes that cg3d reports in its own words (logged to the file only).
FILE_ONLY_WARNINGS = ("SmallBatchWarning",)

_MARK = "_cg3d_handler"
_state = {"verbose": 0}


class ConsoleFilter(logging.Filter):
    """Which records reach the console (see the module docstring)."""

    def __init__(self, verbose: int = 0):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "cg3d_console", True) is False:
            return False
        if record.name.split(".")[0] in QUIET_LOGGERS or record.name == "concurrent.futures":
            if self.verbose >= 2:
                return True
            return self.verbose >= 1 and record.levelno >= logging.WARNING
        return True


class ConsoleFormatter(logging.Formatter):
    """One line per record: line breaks folded into ``" | "``, no traceback (it is in the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        record = copy.copy(record)
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        text = super().format(record)
        return " | ".join(line.strip() for line in text.splitlines() if line.strip())


class StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is when a record comes (test captures,
    redirections made after the set-up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """``warnings.warn`` as one log record of ``py.warnings`` (file only for FILE_ONLY_WARNINGS)."""
    extra = FILE_ONLY if category.__name__ in FILE_ONLY_WARNINGS else None
    logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno,
                                             extra=extra)


def _quiet_nipype_stdout() -> None:
    """No nipype stream handler: its records go through the root logger's handlers only."""
    nipype = logging.getLogger("nipype")
    for handler in list(nipype.handlers):
        if type(handler) is logging.StreamHandler:
            nipype.removeHandler(handler)
    if not any(isinstance(h, logging.NullHandler) for h in nipype.handlers):
        nipype.addHandler(logging.NullHandler())
    nipype.propagate = True


def configure(verbose: int = 0) -> None:
    """Console logging of a cg3d command (replaces earlier handlers of this module)."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False) and not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    console = StderrHandler()
    console.setFormatter(ConsoleFormatter(FORMAT, datefmt=DATEFMT))
    console.addFilter(ConsoleFilter(verbose))
    setattr(console, _MARK, True)
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    _quiet_nipype_stdout()
    warnings.showwarning = _showwarning


def add_file(path: str | Path) -> logging.FileHandler:
    """Log every record (nipype's and tracebacks included) to ``path`` as well."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    setattr(handler, _MARK, True)
    logging.getLogger().addHandler(handler)
    return handler


def verbosity() -> int:
    """The ``-v`` count given to :func:`configure`."""
    return int(_state["verbose"])


def log_file() -> Path | None:
    """The run's log file (the first file handler of the root logger), if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def configure_worker(verbose: int, path: str | None) -> None:
    """In a worker process: the main process's handlers, unless inherited (fork) already."""
    root = logging.getLogger()
    if any(getattr(h, _MARK, False) for h in root.handlers):
        _quiet_nipype_stdout()
        return
    configure(verbose)
    if path:
        add_file(path)
