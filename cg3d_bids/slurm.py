"""``cg3d slurm-script``: write one bash script that submits the whole cg3d pipeline to SLURM.

SLURM does the scheduling; cg3d only writes the script. Run on a login node, the script submits
five steps with ``sbatch --parsable``, each waiting for the one before (``--dependency=afterok``):

1. ``participant``: a job array, one subject per task (``--participant-label``; the labels are in a
   file next to the script, task *i* reads line *i*), on GPU nodes;
2. ``score``: a job array of *n* shards (``group --stage score --shard i/n``), GPU;
3. ``graph``: one CPU job (``group --stage graph``);
4. ``rescore``: a job array of *n* shards (``group --stage rescore --shard i/n``), GPU;
5. ``outputs``: one CPU job (``group --stage outputs``).

Before submitting anything the script checks every step with ``sbatch --test-only`` (partition,
account, GPUs, memory), so a typo in a resource request fails at once with nothing queued. Cohorts
larger than ``max_array_size`` (SLURM's ``MaxArraySize``, 1001 by default) get several participant
arrays, sharing the concurrency limit; the score step waits for all of them.

Each task's script is passed to ``sbatch`` on its standard input (a quoted heredoc holding the
fully rendered, shell-quoted command): the file is self-contained, and SLURM keeps its own copy of
every task script, so a requeued task reruns exactly what was submitted even if the file is
regenerated meanwhile. Each task

* derives ``--nprocs``/``--omp-nthreads`` from ``SLURM_CPUS_PER_TASK`` (``nprocs`` is the stage's
  setting, or all CPUs; threads = CPUs // nprocs, at least 1: :func:`cg3d_bids.resources.default_threads`);
* runs ``apptainer run [--nv] --cleanenv -B ... IMAGE ...`` when a container image is given
  (``--nv`` only for steps that request GPUs; the BIDS folder is bound read-only, the output and work
  folders read-write, at the same paths), else the ``cg3d`` executable; no SLURM client is needed in
  the image;
* requeues itself with ``scontrol requeue`` (array tasks as ``<array job>_<task>``) on a transient
  failure, while ``SLURM_RESTART_COUNT`` < ``max_retries``: cg3d exiting 75 (GPU out of memory,
  temporary failure), cg3d killed by SIGHUP/SIGINT/SIGKILL/SIGTERM/SIGUSR1/SIGUSR2/SIGXCPU (what
  schedulers, admins and the OOM killer send), or the task receiving SIGUSR1, which every step
  asks for ``requeue_warning_s`` seconds before its time limit (``--signal=B:USR1@...``; sent at
  preemption too where ``PreemptParameters=send_user_signal``). A requeued task is pending again,
  so the steps after it keep waiting. ``scancel`` (SIGTERM to the task) is never turned into a
  requeue;
* fails on any other error (and when the retries are used up): ``--kill-on-invalid-dep=yes`` then
  cancels the steps after it. To resume, fix the cause and run the script again: every stage skips
  the work already cached in the work directory.

Every stage call is resumable and idempotent, so requeuing and rerunning are safe.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from . import __version__
from .errors import EXIT_TEMPFAIL, Cg3dError, NoInputError, NoMatchError, UsageError
from .settings import MODALITIES

STAGES = ("participant", "score", "graph", "rescore", "outputs")
ARRAY_STAGES = ("participant", "score", "rescore")
GPU_STAGES = ("participant", "score", "rescore")
#: Signals after which a killed cg3d is retried: hangup, interrupt, kill (also the OOM killer),
#: USR1/USR2, terminate, CPU time limit. Crashes (SEGV, ABRT, BUS, FPE, ILL) fail the task.
TRANSIENT_SIGNALS = (1, 2, 9, 10, 12, 15, 24)
#: Options that the script sets itself and that may therefore not be passed through.
RESERVED_OPTIONS = (
    "-w", "--work-dir", "--participant-label", "--participant_label", "--stage", "--shard",
    "--nprocs", "--nthreads", "--n_cpus", "--n-cpus", "--omp-nthreads", "--modality",
    "--modalities", "-m",
)
_LABEL_RE = re.compile(r"[0-9A-Za-z]+")
_MEM_RE = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE)
_TIME_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_NAME_RE = re.compile(r"[A-Za-z0-9._+-]+")


# ------------------------------------------------------------------------------------------------
# the plan
@dataclass(frozen=True)
class StageResources:
    """What one task of a step asks SLURM for.

    ``gpus`` is a count of ``--gres=gpu[:gpu_type]:N`` (0 = a CPU job); ``mem`` and ``time`` use
    sbatch's syntax (``16G``; ``HH:MM:SS``, ``D-HH:MM`` ...); ``nprocs`` is the number of cg3d
    processes (``--nprocs``) per task, None meaning one per CPU.
    """

    cpus: int = 4
    mem: str = "16G"
    time: str = "04:00:00"
    gpus: int = 0
    gpu_type: str | None = None
    partition: str | None = None
    nprocs: int | None = None

    def check(self, stage: str) -> None:
        """Raise UsageError naming ``stage`` and the fix when a value is not valid."""
        where = f"resources of the {stage} step"
        if self.cpus < 1:
            raise UsageError(f"{where}: cpus must be >= 1 (got {self.cpus})", fix=f"e.g. --resource {stage}.cpus=4")
        if self.gpus < 0:
            raise UsageError(f"{where}: gpus must be >= 0 (got {self.gpus})", fix=f"e.g. --resource {stage}.gpus=1")
        if self.nprocs is not None and self.nprocs < 1:
            raise UsageError(f"{where}: nprocs must be >= 1 (got {self.nprocs})",
                             fix=f"e.g. --resource {stage}.nprocs=1 (or leave it unset: one per CPU)")
        if not _MEM_RE.fullmatch(self.mem):
            raise UsageError(f"{where}: memory {self.mem!r} is not an sbatch --mem value",
                             fix=f"write a number of MB or one with a unit, e.g. --resource {stage}.mem=16G")
        time_seconds(self.time, where)
        for name in ("partition", "gpu_type"):
            value = getattr(self, name)
            if value is not None and not _NAME_RE.fullmatch(value):
                raise UsageError(f"{where}: {name} {value!r} is not a SLURM name",
                                 fix="use letters, digits and . _ + - only")


def default_resources() -> dict[str, StageResources]:
    """Defaults per step: GPU for participant, score and rescore; CPU only for graph and outputs.

    ============  =====  ====  ====  ========  ======  =====================================
    step          GPUs   CPUs  mem   time      nprocs  why
    ============  =====  ====  ====  ========  ======  =====================================
    participant   1      4     16G   02:00:00  4       one subject: preprocessing + encoder
    score         1      8     64G   08:00:00  1       one process, threads on every CPU
    graph         0      4     32G   02:00:00  1       CPU graph clustering
    rescore       1      8     64G   08:00:00  1       like score
    outputs       0      8     32G   04:00:00  8       maps and reports, one image per process
    ============  =====  ====  ====  ========  ======  =====================================
    """
    return {
        "participant": StageResources(cpus=4, mem="16G", time="02:00:00", gpus=1),
        "score": StageResources(cpus=8, mem="64G", time="08:00:00", gpus=1, nprocs=1),
        "graph": StageResources(cpus=4, mem="32G", time="02:00:00", gpus=0, nprocs=1),
        "rescore": StageResources(cpus=8, mem="64G", time="08:00:00", gpus=1, nprocs=1),
        "outputs": StageResources(cpus=8, mem="32G", time="04:00:00", gpus=0),
    }


@dataclass(frozen=True)
class SlurmPlan:
    """Everything :func:`render_script` needs; validated on construction (UsageError, exit 64).

    ``subjects_file`` holds ``subjects``, one per line (written by :func:`write_files`);
    ``group_labels`` also passes that file as ``--participant-label`` to the group stages (when
    the user selected participants). ``container`` None runs ``cg3d_executable`` instead of
    ``apptainer run``. ``modalities`` (empty: cg3d's default) becomes ``--modality ...`` and
    ``passthrough`` is appended verbatim (quoted), in every cg3d call.
    """

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    subjects: tuple[str, ...]
    subjects_file: Path
    log_dir: Path
    n_shards: int = 1
    resources: Mapping[str, StageResources] = field(default_factory=default_resources)
    array_limit: int | None = 50
    max_array_size: int = 1000
    account: str | None = None
    container: Path | None = None
    binds: tuple[str, ...] = ()
    apptainer: str = "apptainer"
    cg3d_executable: str = "cg3d"
    max_retries: int = 3
    requeue_warning_s: int = 120
    modalities: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()
    group_labels: bool = False
    sbatch_args: tuple[str, ...] = ()
    job_name: str = "cg3d"

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", MappingProxyType(dict(self.resources)))
        for name in ("subjects", "modalities", "binds", "passthrough", "sbatch_args"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_plan(self)

    def stage(self, name: str) -> StageResources:
        """The resources of step ``name``."""
        return self.resources[name]

    def participant_chunks(self) -> list[tuple[int, int]]:
        """(offset, size) of each participant array: subjects offset+1 .. offset+size."""
        n, size = len(self.subjects), self.max_array_size
        return [(start, min(size, n - start)) for start in range(0, n, size)]


def _check_plan(plan: SlurmPlan) -> None:
    for name in ("bids_dir", "output_dir", "work_dir", "subjects_file", "log_dir"):
        _check_absolute(getattr(plan, name), name)
    if plan.container is not None:
        _check_absolute(plan.container, "container")
    if not plan.subjects:
        raise NoInputError("no subjects to process", path=plan.bids_dir,
                           fix="check the dataset, --participant-label and --modality")
    bad = [s for s in plan.subjects if not _LABEL_RE.fullmatch(s)]
    if bad:
        raise UsageError(f"invalid participant label(s) {', '.join(map(repr, bad))}: BIDS labels are letters "
                         "and digits only", fix="give labels as in the folder names sub-<label>, without 'sub-'")
    if len(set(plan.subjects)) != len(plan.subjects):
        raise UsageError("a participant label is listed twice", fix="list each subject once")
    _check_counts(plan)
    missing = [s for s in STAGES if s not in plan.resources]
    if missing:
        raise UsageError(f"no resources for the step(s) {', '.join(missing)}",
                         fix="start from default_resources() and replace what differs")
    for stage in STAGES:
        plan.stage(stage).check(stage)
    check_passthrough(plan.passthrough)
    unknown = [m for m in plan.modalities if m not in MODALITIES]
    if unknown:
        raise UsageError(f"unknown modality {', '.join(unknown)}", fix=f"use {', '.join(MODALITIES)}")
    if not _NAME_RE.fullmatch(plan.job_name):
        raise UsageError(f"job name {plan.job_name!r} is not a SLURM name", fix="use letters, digits and . _ + -")
    if any("\n" in a or "\0" in a for a in (*plan.binds, *plan.sbatch_args)):
        raise UsageError("a --bind or --sbatch-arg value holds a line break", fix="remove it")


def _check_counts(plan: SlurmPlan) -> None:
    checks = [
        ("shards", plan.n_shards, 1, plan.max_array_size, "--shards 4"),
        ("max-array-size", plan.max_array_size, 1, None, "--max-array-size 1000"),
        ("max-retries", plan.max_retries, 0, None, "--max-retries 3"),
        ("requeue warning", plan.requeue_warning_s, 0, None, "120 (seconds)"),
    ]
    if plan.array_limit is not None:
        checks.append(("array-limit", plan.array_limit, 1, None, "--array-limit 50 (0 = no limit)"))
    for name, value, low, high, example in checks:
        if value < low or (high is not None and value > high):
            bound = f">= {low}" + (f" and <= {high} (the cluster's largest job array)" if high else "")
            raise UsageError(f"{name} must be {bound}; got {value}", fix=f"e.g. {example}")


def _check_absolute(path: Path, name: str) -> None:
    if not Path(path).is_absolute():
        raise UsageError(f"{name} must be an absolute path: jobs start in another folder on the compute "
                         f"nodes (got {str(path)!r})", fix=f"pass {Path(path).absolute()}")


def check_passthrough(args: Sequence[str]) -> None:
    """Refuse options the script sets itself (work dir, labels, stage, shard, threads, modality)."""
    for arg in args:
        if any(_is_option(arg, opt) for opt in RESERVED_OPTIONS):
            raise UsageError(
                f"{arg.split('=', 1)[0]} may not follow '--': cg3d slurm-script sets it for every call",
                fix="give -w, --participant-label and --modality to slurm-script itself (before '--'); the "
                "script sets --stage, --shard, --nprocs and --omp-nthreads (use --resource STAGE.cpus=N and "
                "STAGE.nprocs=N)",
            )


def _is_option(arg: str, option: str) -> bool:
    if option.startswith("--"):
        return arg == option or arg.startswith(option + "=")
    return arg == option or (arg.startswith(option) and not arg.startswith("--") and len(arg) > 2)


def time_seconds(value: str, where: str = "time") -> int | None:
    """Seconds of an sbatch ``--time`` value; None for UNLIMITED/INFINITE. UsageError if invalid."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME_RE.fullmatch(value)
    if not match:
        raise UsageError(f"{where}: time {value!r} is not an sbatch --time value",
                         fix="write MM, HH:MM:SS, D-HH or D-HH:MM:SS, e.g. 04:00:00")
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        parts = [int(a), int(b or 0), int(c or 0)]
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


# ------------------------------------------------------------------------------------------------
# rendering
def render_script(plan: SlurmPlan) -> str:
    """The submission script for ``plan`` (pure: the same plan always gives the same text)."""
    parts = [_header(plan), _preamble(plan), _preflight(plan), _submissions(plan), _footer(plan)]
    return "\n".join(parts)


def _header(plan: SlurmPlan) -> str:
    n = len(plan.subjects)
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by cg3d {__version__} (cg3d slurm-script): the cg3d pipeline as a chain of SLURM jobs.",
        "# Run it on a login node:  bash THIS_SCRIPT",
        f"#   BIDS {plan.bids_dir}",
        f"#   OUT  {plan.output_dir}",
        f"#   WORK {plan.work_dir}",
        f"#   {n} subject(s), listed in {plan.subjects_file}; {plan.n_shards} score/rescore shard(s)",
        "#   " + ("container " + str(plan.container) if plan.container else "executable " + plan.cg3d_executable),
        "# Steps, each waiting for the one before (afterok):",
    ]
    for stage in STAGES:
        res = plan.stage(stage)
        count = f"array of {n}" if stage == "participant" else (
            f"array of {plan.n_shards}" if stage in ARRAY_STAGES else "one job")
        gpu = f"{res.gpus} GPU(s)" if res.gpus else "no GPU"
        lines.append(f"#   {stage:<12} {count:<14} {gpu:<10} {res.cpus} CPUs {res.mem} {res.time}")
    lines += [
        f"# A task that fails with exit {EXIT_TEMPFAIL} (GPU out of memory, temporary failure), is killed by a",
        f"# signal, or nears its time limit requeues itself (at most {plan.max_retries} times); the steps after",
        "# it keep waiting. Any other failure cancels the steps after it: fix the cause (see the logs) and",
        "# run this script again; work already done is skipped.",
        f"# Logs: {plan.log_dir}",
        "",
    ]
    return "\n".join(lines)


def _preamble(plan: SlurmPlan) -> str:
    q = shlex.quote
    n = len(plan.subjects)
    return f"""set -euo pipefail
SUBJECTS={q(str(plan.subjects_file))}
LOG_DIR={q(str(plan.log_dir))}
JOBS=()

fail() {{  # fail MESSAGE: print it and what was already submitted, then stop
  echo "cg3d-slurm: error: $1" >&2
  if [ ${{#JOBS[@]}} -gt 0 ]; then
    echo "cg3d-slurm: already submitted: ${{JOBS[*]}}; cancel them with: scancel ${{JOBS[*]}}" >&2
  fi
  exit 1
}}
command -v sbatch >/dev/null || fail "sbatch not found: run this script on a SLURM login node"
[ -f "$SUBJECTS" ] || fail "the subjects file $SUBJECTS is missing: generate the script again"
[ "$(grep -c . "$SUBJECTS")" -eq {n} ] \\
  || fail "$SUBJECTS no longer lists {n} subjects: generate the script again"
mkdir -p -- "$LOG_DIR" {q(str(plan.output_dir))} {q(str(plan.work_dir))}

check() {{  # check STEP SBATCH_OPTIONS...: would SLURM accept this step? (nothing is queued)
  local step=$1 out
  shift
  out=$(sbatch --test-only "$@" --wrap=true 2>&1) \\
    || fail "SLURM would refuse the $step step (nothing was submitted): $out"
}}

submit() {{  # submit VAR STEP SBATCH_OPTIONS... < TASK_SCRIPT: sets VAR to the job id
  local var=$1 step=$2 out
  shift 2
  out=$(sbatch --parsable "$@") || fail "sbatch failed for the $step step (its message is above)"
  out=${{out%%;*}}
  [[ $out =~ ^[0-9]+$ ]] || fail "sbatch gave no job id for the $step step: $out"
  printf -v "$var" %s "$out"
  JOBS+=("$out")
  echo "cg3d-slurm: submitted $step job $out"
}}
"""


def _preflight(plan: SlurmPlan) -> str:
    """Each step's sbatch options as a bash array, then ``check`` of every step."""
    lines = ["# sbatch options of each step (the participant array size and the dependencies are added below)."]
    for stage in STAGES:
        options = _sbatch_options(plan, stage)
        lines.append(f"OPTS_{stage.upper()}=(\n" + "".join(f"  {shlex.quote(o)}\n" for o in options) + ")")
    lines.append("# Check every step before submitting any.")
    for stage in STAGES:
        array = [_array_option(plan, plan.participant_chunks()[0][1], len(plan.participant_chunks()))] \
            if stage == "participant" else []
        lines.append(" ".join(["check", stage, f'"${{OPTS_{stage.upper()}[@]}}"', *map(shlex.quote, array)]))
    return "\n".join(lines) + "\n"


def _submissions(plan: SlurmPlan) -> str:
    blocks = []
    chunks = plan.participant_chunks()
    job_vars = []
    for k, (offset, size) in enumerate(chunks, start=1):
        job_vars.append(f"JOB_PARTICIPANT_{k}")
        array = shlex.quote(_array_option(plan, size, len(chunks)))
        head = f'submit {job_vars[-1]} participant "${{OPTS_PARTICIPANT[@]}}" {array}'
        blocks.append(_submit_block(head, _task_script(plan, "participant", offset)))
    for stage in STAGES[1:]:
        dependency = '"--dependency=afterok:' + ":".join(f"${v}" for v in job_vars) + '"'
        job_vars = [f"JOB_{stage.upper()}"]
        head = f'submit {job_vars[0]} {stage} "${{OPTS_{stage.upper()}[@]}}" {dependency} --kill-on-invalid-dep=yes'
        blocks.append(_submit_block(head, _task_script(plan, stage, 0)))
    return "\n".join(blocks)


def _footer(plan: SlurmPlan) -> str:
    return (
        'echo "cg3d-slurm: ${#JOBS[@]} jobs submitted: ${JOBS[*]}"\n'
        'echo "cg3d-slurm: follow them with: squeue -j $(IFS=,; echo "${JOBS[*]}")"\n'
        f'echo "cg3d-slurm: logs in {_dq(str(plan.log_dir))}; outputs in {_dq(str(plan.output_dir))}"\n'
    )


def _submit_block(head: str, task: str) -> str:
    delimiter = _delimiter(task)
    return f"{head} <<'{delimiter}'\n{task}{delimiter}\n"


def _delimiter(text: str) -> str:
    """A heredoc delimiter that is not a line of ``text``."""
    lines = set(text.splitlines())
    delimiter, k = "CG3D_TASK", 0
    while delimiter in lines:
        k += 1
        delimiter = f"CG3D_TASK_{k}"
    return delimiter


def _sbatch_options(plan: SlurmPlan, stage: str) -> list[str]:
    """sbatch options of ``stage`` but its array size and dependency."""
    res = plan.stage(stage)
    name = f"{plan.job_name}-{stage}-" + ("%A_%a.log" if stage in ARRAY_STAGES else "%j.log")
    log = f"{_log_pattern(plan.log_dir)}/{name}"
    options = [f"--job-name={plan.job_name}-{stage}"]
    if stage in ("score", "rescore"):
        options.append(_array_option(plan, plan.n_shards, 1, throttle=False))
    if res.partition:
        options.append(f"--partition={res.partition}")
    if plan.account:
        options.append(f"--account={plan.account}")
    if res.gpus:
        options.append(f"--gres=gpu:{res.gpu_type + ':' if res.gpu_type else ''}{res.gpus}")
    options += [f"--cpus-per-task={res.cpus}", f"--mem={res.mem}", f"--time={res.time}"]
    seconds = time_seconds(res.time)
    if plan.requeue_warning_s and (seconds is None or seconds > 2 * plan.requeue_warning_s):
        options.append(f"--signal=B:USR1@{plan.requeue_warning_s}")
    options += ["--requeue", "--open-mode=append", f"--chdir={plan.work_dir}", f"--output={log}"]
    return options + list(plan.sbatch_args)


def _array_option(plan: SlurmPlan, size: int, n_arrays: int, throttle: bool = True) -> str:
    return f"--array=1-{size}" + (_throttle(plan, size, n_arrays) if throttle else "")


def _throttle(plan: SlurmPlan, size: int, n_arrays: int) -> str:
    """``%N``: the array concurrency limit, shared by ``n_arrays`` arrays running side by side."""
    if plan.array_limit is None:
        return ""
    limit = max(1, -(-plan.array_limit // n_arrays))
    return f"%{limit}" if limit < size else ""


def _log_pattern(path: Path) -> str:
    """A folder for sbatch ``--output``: '%' would start a file-name pattern there."""
    return str(path).replace("%", "%%")


def _dq(text: str) -> str:
    """``text`` inside a double-quoted bash string."""
    return re.sub(r'([\\"$`])', r"\\\1", text)


# ------------------------------------------------------------------------------------------------
# the task script (runs on a compute node)
def _task_script(plan: SlurmPlan, stage: str, offset: int) -> str:
    res = plan.stage(stage)
    nprocs = str(res.nprocs) if res.nprocs else "$cpus"
    lines = [
        "#!/bin/bash",
        f"# cg3d {stage} task (generated by cg3d slurm-script)",
        "set -uo pipefail",
        *_stage_setup(plan, stage, offset),
        f"cpus=${{SLURM_CPUS_PER_TASK:-{res.cpus}}}",
        f"nprocs={nprocs}",
        '[ "$nprocs" -le "$cpus" ] || nprocs=$cpus',
        "threads=$(( cpus / nprocs ))",
        '[ "$threads" -ge 1 ] || threads=1',
        "export OMP_NUM_THREADS=$threads",
    ]
    if plan.container is not None and res.gpus:
        lines.append('[ -z "${CUDA_VISIBLE_DEVICES:-}" ] || '
                     'export APPTAINERENV_CUDA_VISIBLE_DEVICES="$CUDA_VISIBLE_DEVICES"')
    lines.append("cmd=(" + " ".join(_command(plan, stage)) + ")")
    return "\n".join(lines) + "\n" + _runner(plan)


def _stage_setup(plan: SlurmPlan, stage: str, offset: int) -> list[str]:
    q = shlex.quote
    if stage == "participant":
        return [
            f"line=$(( {offset} + SLURM_ARRAY_TASK_ID ))",
            f'label=$(sed -n "${{line}}p" {q(str(plan.subjects_file))})',
            'if ! [[ $label =~ ^[0-9A-Za-z]+$ ]]; then',
            f'  echo "cg3d-slurm: line $line of {_dq(str(plan.subjects_file))} is not a subject label'
            ' ($label): was the file changed after the script was written? Generate it again." >&2',
            "  exit 1",
            "fi",
        ]
    if stage in ARRAY_STAGES:
        return [f'shard="$SLURM_ARRAY_TASK_ID/{plan.n_shards}"']
    return []


def _command(plan: SlurmPlan, stage: str) -> list[str]:
    """The command words, shell-quoted; ``$label``, ``$shard``, ``$nprocs``, ``$threads`` expand in the task."""
    q = shlex.quote
    if plan.container is not None:
        prefix = [q(plan.apptainer), "run"] + (["--nv"] if plan.stage(stage).gpus else []) + ["--cleanenv"]
        for bind in _binds(plan):
            prefix += ["-B", q(bind)]
        prefix.append(q(str(plan.container)))
    else:
        prefix = [q(plan.cg3d_executable)]
    level = "participant" if stage == "participant" else "group"
    words = prefix + [q(str(plan.bids_dir)), q(str(plan.output_dir)), level, "-w", q(str(plan.work_dir))]
    if stage == "participant":
        words += ["--participant-label", '"$label"']
    else:
        words += ["--stage", stage] + (["--shard", '"$shard"'] if stage in ARRAY_STAGES else [])
        if plan.group_labels:
            words += ["--participant-label", q(str(plan.subjects_file))]
    words += ["--nprocs", '"$nprocs"', "--omp-nthreads", '"$threads"']
    if plan.modalities:
        words += ["--modality", *plan.modalities]
    return words + [q(a) for a in plan.passthrough]


def _binds(plan: SlurmPlan) -> list[str]:
    """The input read-only, the output and work folders (and the subjects file's folder when the
    group stages read it) at the same paths, then the user's binds; no duplicates."""
    binds = [f"{plan.bids_dir}:{plan.bids_dir}:ro", str(plan.output_dir), str(plan.work_dir)]
    folder = plan.subjects_file.parent
    if plan.group_labels and not any(p == folder or p in folder.parents for p in (plan.output_dir, plan.work_dir)):
        binds.append(f"{folder}:{folder}:ro")
    return list(dict.fromkeys(binds + list(plan.binds)))


def _runner(plan: SlurmPlan) -> str:
    """Run ``cmd``; requeue this task on a transient failure, else fail with cg3d's exit code."""
    signals = "|".join(str(s) for s in TRANSIENT_SIGNALS)
    return f"""task=${{SLURM_ARRAY_JOB_ID:+${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}}}
task=${{task:-$SLURM_JOB_ID}}
restarts=${{SLURM_RESTART_COUNT:-0}}
max_retries={plan.max_retries}
echo "cg3d-slurm: task $task on $(hostname), attempt $(( restarts + 1 )), $cpus CPUs: ${{cmd[*]@Q}}"
warned=0
child=
trap 'warned=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' USR1
"${{cmd[@]}}" &
child=$!
wait "$child"; rc=$?
if [ "$warned" = 1 ]; then  # SIGUSR1 interrupted the wait: let cg3d end, then take its exit status
  while kill -0 "$child" 2>/dev/null; do wait "$child" && break; sleep 0.1; done
  wait "$child"; rc=$?
fi
[ "$rc" -eq 0 ] && exit 0
reason=
if [ "$warned" = 1 ]; then
  reason="the time limit (or a preemption) is near"
elif [ "$rc" -eq {EXIT_TEMPFAIL} ]; then
  reason="cg3d exited {EXIT_TEMPFAIL} (GPU out of memory or another temporary failure)"
elif [ "$rc" -gt 128 ]; then
  case $(( rc - 128 )) in {signals}) reason="cg3d was killed by SIG$(kill -l $(( rc - 128 )))";; esac
fi
if [ -n "$reason" ]; then
  if [ "$restarts" -lt "$max_retries" ]; then
    echo "cg3d-slurm: $reason: requeuing task $task (retry $(( restarts + 1 )) of $max_retries);" \
      "the steps after it wait" >&2
    scontrol requeue "$task" && exit "$rc"
    echo "cg3d-slurm: scontrol requeue $task failed" >&2
  else
    echo "cg3d-slurm: $reason, and all $max_retries retries are used" >&2
  fi
fi
echo "cg3d-slurm: task $task failed (exit $rc); the steps after it are cancelled." \
  "Fix the cause (this log), then run the script again: finished work is skipped." >&2
exit "$rc"
"""


# ------------------------------------------------------------------------------------------------
# subjects and files
def discover_subjects(bids_dir: Path, modalities: Sequence[str],
                      labels: Sequence[str] | None = None) -> tuple[str, ...]:
    """Sorted labels of the subjects with an image ``anat/*_<modality>.nii[.gz]`` (sessions too).

    ``labels`` (with or without ``sub-``, or label files) restrict the result; a label without such
    an image is a NoMatchError (exit 18). No image at all is a NoInputError (exit 66).
    """
    from .bids.discovery import check_bids_dir, parse_labels

    root = check_bids_dir(bids_dir)
    wanted = parse_labels(list(labels)) if labels else None
    found = sorted(p.name[4:] for p in root.glob("sub-*") if _LABEL_RE.fullmatch(p.name[4:])
                   and _has_image(p, modalities))
    if wanted is not None:
        missing = [label for label in wanted if label not in found]
        if missing:
            raise NoMatchError(
                f"participant(s) {', '.join(missing)} have no {' or '.join(modalities)} image in {root}",
                fix=f"check the labels (folders sub-<label>/[ses-*/]anat/) and --modality; found: "
                f"{', '.join(found[:10]) or 'none'}{' ...' if len(found) > 10 else ''}",
            )
        found = wanted
    if not found:
        raise NoInputError(f"no {' or '.join(modalities)} images in the dataset (looked for "
                           f"sub-*/[ses-*/]anat/*_<modality>.nii[.gz])", path=root,
                           fix="check the dataset path and --modality (T1w, T2w, FLAIR)")
    return tuple(found)


def _has_image(subject_dir: Path, modalities: Sequence[str]) -> bool:
    name = re.compile(re.escape(subject_dir.name) + r"(_[A-Za-z0-9]+-[A-Za-z0-9]+)*_("
                      + "|".join(map(re.escape, modalities)) + r")\.nii(\.gz)?")
    anat_dirs = [subject_dir / "anat", *sorted(subject_dir.glob("ses-*/anat"))]
    return any(name.fullmatch(p.name) for anat in anat_dirs if anat.is_dir() for p in anat.iterdir())


def write_files(plan: SlurmPlan, script_path: Path) -> Path:
    """Write the subjects file and the script (atomically, executable); return the script path."""
    _write_atomic(plan.subjects_file, "".join(f"{s}\n" for s in plan.subjects), 0o644)
    _write_atomic(script_path, render_script(plan), 0o755)
    return script_path


def _write_atomic(dest: Path, text: str, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------
# command line
class _Parser(argparse.ArgumentParser):
    """Usage errors become UsageError (exit 64) with a fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fix = "see cg3d slurm-script --help"
        if "unrecognized arguments" in message:
            fix = ("options for cg3d itself go after '--', e.g. cg3d slurm-script BIDS OUT -w WORK -- "
                   "--batch-size 6 --device cuda")
        raise UsageError(f"cg3d slurm-script: {message}", fix=fix)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``cg3d slurm-script`` (argv after ``slurm-script``, up to ``--``)."""
    p = _Parser(
        prog="cg3d slurm-script",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a bash script that submits the cg3d pipeline to SLURM as a chain of jobs: "
        "participant array -> score shards -> graph -> rescore shards -> outputs. Options after '--' "
        "are passed to every cg3d call.",
        epilog="example:\n  cg3d slurm-script /data/bids /data/out -w /scratch/work --shards 4 \\\n"
        "      --container /images/cg3d.sif --gpu-partition gpu -- --batch-size 6\n"
        "  bash /scratch/work/slurm/cg3d_slurm.sh",
    )
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset (absolute path)")
    p.add_argument("output_dir", type=Path, help="the output derivatives folder (absolute path)")
    p.add_argument("-w", "--work-dir", dest="work_dir", type=Path, required=True,
                   help="work folder shared by every job (absolute path, on a shared file system)")
    p.add_argument("--shards", type=int, default=1, help="score/rescore shards (array tasks) (default: 1)")
    p.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+",
                   metavar="LABEL", help="subjects to process (default: every subject with an image); the "
                   "group stages are then restricted to them too")
    p.add_argument("--modality", "--modalities", "-m", dest="modality", nargs="+", choices=MODALITIES,
                   help="modalities (default: cg3d's, T1w T2w); also passed to every cg3d call")
    g = p.add_argument_group("how to run cg3d")
    g.add_argument("--container", type=Path, metavar="SIF", help="run `apptainer run IMAGE` (default: the "
                   "cg3d executable); BIDS (read-only), OUT and WORK are bound at the same paths")
    g.add_argument("--bind", "-B", dest="binds", action="append", default=[], metavar="SPEC",
                   help="extra apptainer bind, e.g. /data/derivatives:/data/derivatives:ro (repeatable)")
    g.add_argument("--apptainer", default="apptainer", help="apptainer or singularity command (default: apptainer)")
    g.add_argument("--cg3d-executable", dest="cg3d_executable", metavar="PATH",
                   help="cg3d to run without a container (default: the cg3d found on PATH)")
    g = p.add_argument_group("SLURM resources")
    g.add_argument("--partition", help="partition of every step (default: the cluster's default)")
    g.add_argument("--gpu-partition", dest="gpu_partition", help="partition of the steps that use GPUs")
    g.add_argument("--account", help="sbatch --account")
    g.add_argument("--gpus", type=int, metavar="N", help="GPUs of each GPU step (participant, score, rescore) "
                   "(default: 1; 0 = CPU only, then also pass '-- --device cpu')")
    g.add_argument("--resource", dest="resources", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="per-step resource, KEY one of cpus, mem, time, gpus, gpu_type, partition, nprocs; "
                   "e.g. --resource score.mem=128G (repeatable; wins over the options above)")
    g.add_argument("--array-limit", dest="array_limit", type=int, default=50,
                   help="participant tasks running at once (default: 50; 0 = no limit)")
    g.add_argument("--max-array-size", dest="max_array_size", type=int, default=1000,
                   help="largest job array the cluster accepts (MaxArraySize - 1) (default: 1000)")
    g.add_argument("--max-retries", dest="max_retries", type=int, default=3,
                   help="requeues of a task after a temporary failure (default: 3)")
    g.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="ARG",
                   help="extra sbatch option for every step, e.g. --sbatch-arg=--qos=long (repeatable)")
    g.add_argument("--job-name", dest="job_name", default="cg3d", help="job name prefix (default: cg3d)")
    p.add_argument("-o", "--output", type=Path, metavar="SCRIPT",
                   help="where to write the script (default: WORK/slurm/cg3d_slurm.sh); the subjects file "
                   "(SCRIPT without .sh + .subjects.txt) and logs/ go next to it")
    return p


def main(argv: Sequence[str]) -> int:
    """``cg3d slurm-script ARGS [-- CG3D_OPTIONS]``: write the script, print how to submit it."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        args = build_parser().parse_args(argv[:split])
        plan, script = plan_from_args(args, tuple(argv[split + 1:]))
        write_files(plan, script)
    except Cg3dError as exc:
        print(f"cg3d slurm-script: error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    _print_summary(plan, script)
    return 0


def plan_from_args(args: argparse.Namespace, passthrough: tuple[str, ...]) -> tuple[SlurmPlan, Path]:
    """The plan and the script path for parsed ``args``."""
    for name in ("bids_dir", "output_dir", "work_dir"):
        _check_absolute(getattr(args, name), name.replace("_", " "))
    check_passthrough(passthrough)
    modalities = tuple(args.modality or ("T1w", "T2w"))
    subjects = discover_subjects(args.bids_dir, modalities, args.participant_label)
    script = (args.output or args.work_dir / "slurm" / "cg3d_slurm.sh").expanduser().absolute()
    plan = SlurmPlan(
        bids_dir=args.bids_dir, output_dir=args.output_dir, work_dir=args.work_dir, subjects=subjects,
        subjects_file=script.with_name(script.name.removesuffix(".sh") + ".subjects.txt"),
        log_dir=script.parent / "logs", n_shards=args.shards, resources=resources_from_args(args),
        array_limit=args.array_limit or None, max_array_size=args.max_array_size, account=args.account,
        container=_container(args.container), binds=tuple(args.binds), apptainer=args.apptainer,
        cg3d_executable=_executable(args), max_retries=args.max_retries, modalities=tuple(args.modality or ()),
        passthrough=passthrough,
        group_labels=bool(args.participant_label), sbatch_args=tuple(args.sbatch_args), job_name=args.job_name,
    )
    return plan, script


def resources_from_args(args: argparse.Namespace) -> dict[str, StageResources]:
    """Defaults, then --gpus, --partition, --gpu-partition, then each --resource (last wins)."""
    resources = default_resources()
    for stage in STAGES:
        res = resources[stage]
        if args.gpus is not None and stage in GPU_STAGES:
            res = replace(res, gpus=args.gpus)
        if args.partition:
            res = replace(res, partition=args.partition)
        if args.gpu_partition and res.gpus:
            res = replace(res, partition=args.gpu_partition)
        resources[stage] = res
    for spec in args.resources:
        stage, key, value = _parse_resource(spec)
        resources[stage] = replace(resources[stage], **{key: value})  # type: ignore[arg-type]
    return resources


def _parse_resource(spec: str) -> tuple[str, str, int | str | None]:
    example = "e.g. --resource score.mem=64G or --resource participant.gpus=0"
    target, sep, value = spec.partition("=")
    stage, dot, key = target.partition(".")
    if not sep or not dot or stage not in STAGES:
        raise UsageError(f"--resource {spec!r} is not STAGE.KEY=VALUE with STAGE one of {', '.join(STAGES)}",
                         fix=example)
    ints, texts = ("cpus", "gpus", "nprocs"), ("mem", "time", "gpu_type", "partition")
    if key in ints:
        if not re.fullmatch(r"-?\d+", value):
            raise UsageError(f"--resource {spec!r}: {key} must be a whole number", fix=example)
        return stage, key, int(value)
    if key in texts:
        return stage, key, (value or None) if key in ("gpu_type", "partition") else value
    raise UsageError(f"--resource {spec!r}: unknown key {key!r}", fix=f"use one of {', '.join(ints + texts)}")


def _container(path: Path | None) -> Path | None:
    if path is None:
        return None
    image = path.expanduser().absolute()
    if not image.is_file():
        raise NoInputError("the container image does not exist", path=image,
                           fix="build it (apptainer build cg3d.sif Singularity.def) or pass its path")
    return image


def _executable(args: argparse.Namespace) -> str:
    if args.container is not None:
        return args.cg3d_executable or "cg3d"
    if args.cg3d_executable:
        return str(Path(args.cg3d_executable).expanduser().absolute()) if "/" in args.cg3d_executable \
            else _which(args.cg3d_executable)
    if os.environ.get("CG3D_CONTAINER_TYPE"):
        raise UsageError("cg3d slurm-script runs inside the container, whose cg3d the compute nodes cannot run",
                         fix="pass --container /path/to/cg3d.sif (the image's path on the cluster)")
    return _which("cg3d")


def _which(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise UsageError(f"{name!r} is not on PATH", fix="pass --cg3d-executable /path/to/cg3d or --container cg3d.sif")
    return str(Path(found).absolute())


def _print_summary(plan: SlurmPlan, script: Path) -> None:
    if not any(plan.stage(s).gpus for s in STAGES) and "--device" not in " ".join(plan.passthrough):
        print("cg3d slurm-script: note: no step requests a GPU, but cg3d uses --device cuda by default; "
              "add '-- --device cpu' unless the nodes have GPUs", file=sys.stderr)
    print(f"wrote {script}\n  {len(plan.subjects)} subject(s) in {plan.subjects_file}, {plan.n_shards} shard(s), "
          f"logs in {plan.log_dir}\nsubmit it from a login node with:\n  bash {shlex.quote(str(script))}")
