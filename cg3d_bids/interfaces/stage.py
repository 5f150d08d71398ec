"""One generic nipype interface for every stage (:mod:`cg3d_bids.stages`).

:func:`stage_interface` reads a stage function's signature: the first parameter is the
:class:`~cg3d_bids.stages.StageContext` (the node gets the run's settings TOML as ``settings_file``);
every other parameter becomes an input trait named after it: a record or a ``Ref`` to one is a
``File`` (the stored record), a ``list`` of them a list of files (nested lists from map nodes are
flattened), ``str``/``list[str]`` stay plain. The return value becomes ``out_file`` (one record)
or ``out_files`` (a list of records, refs or paths); records are stored in the work cache.

Every stage call goes through one guard: it is timed (:mod:`cg3d_bids.timings`); a failure is
recorded in the run's ``errors/`` (the command line turns the first one into the exit code) after
translating out-of-memory errors (by exception type) into :class:`~cg3d_bids.errors.TempFailError`
(exit 75), then re-raised so that nipype stops.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .. import records as rec
from .. import timings
from .. import stages
from ..errors import TempFailError
from ..settings import Settings
from ..stages.context import Ref, StageContext

__all__ = [
    "ComputeLandmarks", "PrepareImage", "ScoreBatch", "TokenizeImages", "WriteGroupOutputs",
    "WriteImageOutputs", "WriteSubjectReports", "run_stage", "stage_interface",
    "ReferenceGroup", "ReferenceLandmarks", "ReferenceScore", "ReferenceTokenize", "SaveReference",
]

_SETTINGS: dict[tuple[str, int], Settings] = {}


def load_settings(path: str | Path) -> Settings:
    """The run's settings from its TOML file (read once per process)."""
    path = Path(path)
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _SETTINGS:
        _SETTINGS[key] = Settings.load(path)
    return _SETTINGS[key]


# ------------------------------------------------------------------------------------------------
# what a parameter is
def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, rec.Record)


def _ref_type(hint: Any) -> type[rec.Record] | None:
    if typing.get_origin(hint) is Ref:
        (cls,) = typing.get_args(hint)
        return cls
    return None


def _item(hint: Any) -> Any:
    """``X`` of ``list[X]``, else None."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else None


def _is_file_like(hint: Any) -> bool:
    return _is_record(hint) or _ref_type(hint) is not None or hint is Path


def _input_trait(name: str, hint: Any):
    if _is_file_like(hint):
        return File(exists=True, mandatory=True, desc=f"{name}: a stored {getattr(hint, '__name__', hint)}")
    item = _item(hint)
    if item is not None and _is_file_like(item):
        return traits.List(traits.Any(), mandatory=True, desc=f"{name}: stored records (nested lists flattened)")
    if hint is str:
        return traits.Str(mandatory=True, desc=name)
    if hint is int:
        return traits.Int(mandatory=True, desc=name)
    if item is str:
        return traits.List(traits.Str(), mandatory=True, desc=name)
    raise TypeError(f"stage parameter {name!r}: unsupported type {hint!r}")


def _flatten(values: Any) -> list[str]:
    out: list[str] = []
    for value in values if isinstance(values, (list, tuple)) else [values]:
        if isinstance(value, (list, tuple)):
            out.extend(_flatten(value))
        elif value not in (None, ""):
            out.append(str(value))
    return out


def _decode(hint: Any, value: Any) -> Any:
    if _is_record(hint):
        return rec.load(value, hint)
    ref = _ref_type(hint)
    if ref is not None:
        return Ref(Path(value), ref)
    item = _item(hint)
    if item is not None and _is_file_like(item):
        return [_decode(item, path) for path in _flatten(value)]
    if item is str:
        return [str(v) for v in value]
    return value


def _encode(ctx: StageContext, value: Any) -> str:
    if isinstance(value, Ref):
        return str(value.path)
    if isinstance(value, rec.Record):
        return str(ctx.cache.store(value))
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a stage returned {type(value).__name__}; expected a record, a Ref or a Path")


# ------------------------------------------------------------------------------------------------
def _modality(args: list[Any]) -> str:
    for value in args:
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, rec.ImageRecord):
                return item.modality
            if isinstance(item, rec.PreparedImage):
                return item.image.modality
            if isinstance(item, rec.ImageResult):
                return item.image.modality
    return timings.ALL


def _images(args: list[Any]) -> int:
    """Images (or subjects) a stage call works on: its longest list input, else 1."""
    return max([len(value) for value in args if isinstance(value, list)] + [1])


def _context(name: str, args: list[Any], modality: str) -> str:
    """Name of a stage call in error records: the stage and its image (or modality)."""
    for value in args:
        if isinstance(value, rec.ImageRecord):
            return f"{name}-{value.bids_name}"
        if isinstance(value, rec.PreparedImage):
            return f"{name}-{value.image.bids_name}"
    return f"{name}-{modality}"


def _translate(exc: BaseException) -> BaseException:
    """Out of memory, recognised by type, as exit 75 with the fix; everything else unchanged."""
    torch = sys.modules.get("torch")
    cuda_oom = torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
    if cuda_oom or isinstance(exc, MemoryError):
        where = "the GPU" if cuda_oom else "the machine"
        return TempFailError(f"{where} ran out of memory: {exc}",
                             fix="lower --slice-batch (e.g. 32) or --score-chunk-mb, or give the job more "
                             "memory; the work directory resumes")
    return exc


@contextlib.contextmanager
def _guard(ctx: StageContext, context: str) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        translated = _translate(exc)
        ctx.cache.record_failure(context, translated)
        if translated is exc:
            raise
        raise translated from exc


def run_stage(func: Callable, ctx: StageContext, **inputs: Any) -> Any:
    """Call stage ``func`` with keyword ``inputs`` as a node does: timed, failures recorded."""
    name = getattr(func, "stage_name", func.__name__)
    values = list(inputs.values())
    modality = inputs["modality"] if isinstance(inputs.get("modality"), str) else _modality(values)
    timing = getattr(func, "timing_name", name)
    with _guard(ctx, _context(name, values, modality)), timings.measure(ctx.timings_dir, timing, modality,
                                                                        _images(values)):
        return func(ctx, **inputs)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """The node's torch thread count: ``n``, or (``n`` 0) the process's ``OMP_NUM_THREADS``; both
    restored afterwards (MultiProc workers run many nodes one after another).

    ``OMP_NUM_THREADS`` is also what the stages' ``limit_threads`` reads. Setting torch's count
    here, for every node, matters in a worker forked from a process that already ran
    multi-threaded torch code (cg3d called from Python, as the tests do): the worker inherits
    that thread count, and GNU OpenMP hangs in a forked child's first multi-threaded region when
    the parent had a thread team (measured: a trilinear ``interpolate``). One thread never
    starts a team. torch is left alone when no stage has imported it yet: it reads
    ``OMP_NUM_THREADS`` when it starts.
    """
    before_env = os.environ.get("OMP_NUM_THREADS")
    if n > 0:
        os.environ["OMP_NUM_THREADS"] = str(n)
    try:  # a list ("4,2": nested levels) gives its first level; anything else, no setting
        count = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0] or 0)
    except ValueError:
        count = 0
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else 0
    if torch is not None and count > 0 and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_env
        if torch is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
def stage_interface(func: Callable, name: str) -> type[SimpleInterface]:
    """A nipype interface class ``name`` running stage ``func`` (see the module docstring).

    The class and its specs are created in this module's namespace under ``name`` (nipype's
    MultiProc pickles them by reference).
    """
    hints = typing.get_type_hints(func)
    params = list(inspect.signature(func).parameters)[1:]
    inputs = {"settings_file": File(exists=True, mandatory=True, desc="the run's settings (TOML)"),
              "use_gpu": traits.Bool(False, usedefault=True, desc="nipype MultiProc GPU slot (CUDA only)"),
              "threads": traits.Int(0, usedefault=True, desc="torch/BLAS threads of this node (0: the "
                                    "process's OMP_NUM_THREADS)")}
    inputs.update({p: _input_trait(p, hints[p]) for p in params})
    returns = hints["return"]
    many = _item(returns) is not None
    outputs = {"out_files": traits.List(File())} if many else {"out_file": File()}

    module = sys.modules[__name__]
    in_spec = type(f"{name}InputSpec", (BaseInterfaceInputSpec,), inputs)
    out_spec = type(f"{name}OutputSpec", (TraitedSpec,), outputs)

    def _run_interface(self, runtime):
        ctx = StageContext.from_settings(load_settings(self.inputs.settings_file))
        with _threads(self.inputs.threads):
            result = run_stage(func, ctx, **{p: _decode(hints[p], getattr(self.inputs, p)) for p in params})
        if many:
            self._results["out_files"] = [_encode(ctx, item) for item in result]
        else:
            self._results["out_file"] = _encode(ctx, result)
        return runtime

    interface = type(name, (SimpleInterface,), {
        "input_spec": in_spec, "output_spec": out_spec, "_run_interface": _run_interface,
        "__doc__": f"Stage ``{getattr(func, 'stage_name', func.__name__)}``: {inspect.getdoc(func) or ''}",
    })
    for cls in (in_spec, out_spec, interface):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    return interface



# ------------------------------------------------------------------------------------------------
# the interfaces of cg3d's stages (module attributes: MultiProc pickles them by reference)
PrepareImage = stage_interface(stages.prepare, "PrepareImage")
ComputeLandmarks = stage_interface(stages.landmarks, "ComputeLandmarks")
TokenizeImages = stage_interface(stages.tokenize, "TokenizeImages")
ScoreBatch = stage_interface(stages.score, "ScoreBatch")
WriteImageOutputs = stage_interface(stages.outputs, "WriteImageOutputs")
WriteGroupOutputs = stage_interface(stages.group, "WriteGroupOutputs")
WriteSubjectReports = stage_interface(stages.subject_reports, "WriteSubjectReports")
# saved reference cohorts (cg3d_bids.stages.reference; wired by cg3d_bids.workflows.reference)
SaveReference = stage_interface(stages.save_reference, "SaveReference")
ReferenceLandmarks = stage_interface(stages.reference_landmarks, "ReferenceLandmarks")
ReferenceTokenize = stage_interface(stages.reference_tokenize, "ReferenceTokenize")
ReferenceScore = stage_interface(stages.reference_score, "ReferenceScore")
ReferenceGroup = stage_interface(stages.reference_group, "ReferenceGroup")
