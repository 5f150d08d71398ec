"""Errors that end a run with a BIDS-App (BEP027) exit code and an actionable message.

Every error names what went wrong, the file concerned (when there is one) and the fix.
"""

from __future__ import annotations

from os import PathLike

EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_BIDS_INVALID = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_DATAERR = 65
EXIT_NOINPUT = 66
EXIT_UNAVAILABLE = 69
EXIT_CANTCREAT = 73
EXIT_IOERR = 74
EXIT_TEMPFAIL = 75
#: Stopped by a signal: 128 + signal number, the shell convention (cg3d_bids.signals).
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Cg3dError(Exception):
    """Base error: carries an exit code, an optional file and a fix."""

    exit_code: int = EXIT_FAILURE

    def __init__(self, message: str, *, path: str | PathLike | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = [self.message]
        if self.path:
            parts.append(f"  file: {self.path}")
        if self.fix:
            parts.append(f"  fix: {self.fix}")
        return "\n".join(parts)


class UsageError(Cg3dError):
    """A bad flag or value (what argparse would exit 2 for)."""

    exit_code = EXIT_USAGE


class UnknownLevelError(Cg3dError):
    exit_code = EXIT_UNKNOWN_LEVEL


class NoMatchError(Cg3dError):
    """Participant/session/filters selected nothing."""

    exit_code = EXIT_NO_MATCH


class InputDataError(Cg3dError):
    """Unreadable/corrupt/non-3D image, NaN/Inf, empty or unmappable mask."""

    exit_code = EXIT_DATAERR


class NoInputError(Cg3dError):
    """Missing dataset, no images of a modality, missing weights."""

    exit_code = EXIT_NOINPUT


class BatchTooSmallError(Cg3dError):
    """Fewer images than mutual scoring needs (K = floor(f (B - 1)) must be >= 1)."""

    exit_code = EXIT_NOINPUT


class BidsValidationError(Cg3dError):
    exit_code = EXIT_BIDS_INVALID


class DeviceUnavailableError(Cg3dError):
    """CUDA requested but not visible."""

    exit_code = EXIT_UNAVAILABLE


class CantCreateError(Cg3dError):
    """Output or work directory not creatable/writable, or inside the input dataset."""

    exit_code = EXIT_CANTCREAT


class TempFailError(Cg3dError):
    """CUDA out of memory or similar transient failure (also: the output folder is in use)."""

    exit_code = EXIT_TEMPFAIL


class WeightsUnavailableError(NoInputError):
    """Encoder weights not found offline."""
