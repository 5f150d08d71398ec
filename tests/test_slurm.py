"""cg3d slurm-script: the rendered submission script, its task scripts, and a real SLURM cluster.

Three layers:

* ``render_script`` and the CLI, checked as text and with ``bash -n``;
* the rendered script run with a fake ``sbatch`` (records options and task scripts) and the task
  scripts run locally with a fake ``scontrol`` and a fake ``cg3d``: dependency chain, quoting,
  threads, requeue decisions, without a cluster;
* ``@pytest.mark.slurm``: the script against a real SLURM (``.ci/with_slurm.sh pytest -m slurm``),
  with a fake cg3d that records every call. :func:`run_slurm_script` (fixture) submits a script and
  waits for all its jobs; a real-cg3d test can reuse it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from cg3d_bids.errors import EXIT_NO_MATCH, EXIT_NOINPUT, EXIT_USAGE, Cg3dError, UsageError
from cg3d_bids.slurm import (
    ARRAY_STAGES,
    STAGES,
    SlurmPlan,
    StageResources,
    default_resources,
    discover_subjects,
    main,
    render_script,
    time_seconds,
    write_files,
)

ODD = "/tmp/odd dir/it's a \"test\" $HOME `x` 100%"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


# ------------------------------------------------------------------------------------------------
# helpers: plans, fake programs
def make_plan(base: Path, **changes) -> SlurmPlan:
    values = dict(
        bids_dir=base / "bids", output_dir=base / "out", work_dir=base / "work",
        subjects=("01", "02", "03"), subjects_file=base / "slurm" / "cg3d_slurm.subjects.txt",
        log_dir=base / "slurm" / "logs", n_shards=2, cg3d_executable=str(base / "bin" / "cg3d"),
        passthrough=("--batch-size", "6"),
    )
    values.update(changes)
    return SlurmPlan(**values)


def small_resources(partition_gpu: str | None = "gpu", gpus: int = 1) -> dict[str, StageResources]:
    """CI-sized requests: participant 1 CPU, score/rescore 2 CPUs x 1 process, outputs 2 processes."""
    gpu = dict(gpus=gpus, partition=partition_gpu)
    common = dict(mem="200M", time="00:10:00")
    return {
        "participant": StageResources(cpus=1, **common, **gpu),
        "score": StageResources(cpus=2, nprocs=1, **common, **gpu),
        "graph": StageResources(cpus=1, nprocs=1, **common),
        "rescore": StageResources(cpus=2, nprocs=1, **common, **gpu),
        "outputs": StageResources(cpus=2, **common),
    }


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


FAKE_CG3D = r'''#!{python} -S
"""Fake cg3d: records its call, then exits as the rules say."""
import json, os, sys, time, signal
CALLS = {calls!r}
RULES = {rules!r}
ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
       "SLURM_CPUS_PER_TASK", "SLURM_JOB_PARTITION", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
       "SLURM_JOB_NAME")
args = sys.argv[1:]
record = {{"args": args, "env": {{k: os.environ.get(k) for k in ENV}}, "cwd": os.getcwd(),
          "start": time.time(), "pid": os.getpid()}}
rc, kill_with = 0, None
for i, rule in enumerate(RULES):
    if all(tok in args for tok in rule["when"]):
        marker = os.path.join(CALLS, f"rule-{{i}}.done")
        if rule.get("once") and os.path.exists(marker):
            continue
        open(marker, "a").close()
        rc, kill_with = rule.get("exit", 0), rule.get("signal")
        if rule.get("sleep"):
            open(os.path.join(CALLS, f"rule-{{i}}.sleeping"), "w").write(str(os.getpid()))
            time.sleep(rule["sleep"])
        break
record["rc"] = rc if kill_with is None else -kill_with
record["end"] = time.time()
os.makedirs(CALLS, exist_ok=True)
with open(os.path.join(CALLS, f"{{time.time_ns()}}-{{os.getpid()}}.json"), "w") as fh:
    json.dump(record, fh)
if kill_with is not None:
    os.kill(os.getpid(), kill_with)
sys.exit(rc)
'''

FAKE_APPTAINER = r'''#!{python} -S
"""Fake apptainer: records its options, then runs the fake cg3d with the arguments after the image."""
import json, os, sys, time
CALLS, CG3D = {calls!r}, {cg3d!r}
args = sys.argv[1:]
assert args[0] == "run", args
i, opts = 1, []
while args[i].startswith("-"):
    opts.append(args[i])
    i += 2 if args[i] == "-B" else 1
    if args[i - 1] == "-B":
        opts.append(args[i - 1])
image, rest = args[i], args[i + 1:]
binds = [args[j + 1] for j in range(1, i) if args[j] == "-B"]
env = {{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "APPTAINERENV_CUDA_VISIBLE_DEVICES")}}
os.makedirs(CALLS, exist_ok=True)
with open(os.path.join(CALLS, f"apptainer-{{time.time_ns()}}-{{os.getpid()}}.json"), "w") as fh:
    json.dump({{"flags": [a for a in args[1:i] if a.startswith("--")], "binds": binds, "image": image,
               "args": rest, "env": env}}, fh)
os.execv(CG3D, [CG3D] + rest)
'''

FAKE_SBATCH = r'''#!/bin/bash
# Fake sbatch: --test-only says yes (no for the job name REFUSE); else records the options
# (NUL-separated) and the task script, and prints "ID;cluster" like sbatch --parsable on a federation.
LOG={log}
name=
for a in "$@"; do case $a in --job-name=*) name=${{a#--job-name=}};; esac; done
for a in "$@"; do
  if [ "$a" = --test-only ]; then
    if [ "$name" = {refuse} ]; then echo "sbatch: error: invalid partition specified: nope" >&2; exit 1; fi
    echo "sbatch: Job 7 to start at now" >&2; exit 0
  fi
done
mkdir -p "$LOG"
n=$(( $(ls "$LOG" | grep -c '\.args$') + 1 ))
if [ "$n" = {fail_at} ]; then echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1; fi
printf '%s\0' "$@" > "$LOG/$n.args"
cat > "$LOG/$n.sh"
echo "$(( 100 + n ));ci"
'''

FAKE_SCONTROL = r'''#!/bin/bash
echo "$*" >> {log}
exit {rc}
'''


def fake_cg3d(base: Path, rules: list[dict] | None = None) -> tuple[Path, Path]:
    calls = base / "calls"
    calls.mkdir(parents=True, exist_ok=True)
    exe = write_executable(base / "bin" / "cg3d", FAKE_CG3D.format(python=sys.executable, calls=str(calls),
                                                                    rules=rules or []))
    return exe, calls


def fake_apptainer(base: Path, cg3d: Path, calls: Path) -> Path:
    return write_executable(base / "bin" / "apptainer",
                            FAKE_APPTAINER.format(python=sys.executable, calls=str(calls), cg3d=str(cg3d)))


def read_calls(calls: Path, prefix: str = "") -> list[dict]:
    files = sorted(p for p in calls.glob("*.json") if p.name.startswith(prefix) and (prefix or p.name[0].isdigit()))
    return [json.loads(p.read_text()) for p in files]


def stage_of(args: list[str]) -> str:
    return "participant" if "participant" in args else args[args.index("--stage") + 1]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@dataclass
class Submission:
    id: int
    args: list[str]
    script: str

    @property
    def stage(self) -> str:
        return option_value(self.args, "--job-name").rsplit("-", 1)[1]


def option_value(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return values[-1] if values else None


def run_with_fake_sbatch(plan: SlurmPlan, tmp: Path, *, refuse: str = "", fail_at: int = 0
                         ) -> tuple[subprocess.CompletedProcess, list[Submission]]:
    """Write the plan's files, run its script with a fake sbatch; return the result and submissions."""
    log = tmp / "sbatch-log"
    bindir = tmp / "fakebin"
    write_executable(bindir / "sbatch", FAKE_SBATCH.format(log=shlex.quote(str(log)), refuse=shlex.quote(refuse),
                                                           fail_at=fail_at))
    script = write_files(plan, plan.subjects_file.parent / "cg3d_slurm.sh")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    n = len(list(log.glob("*.args"))) if log.exists() else 0
    subs = [Submission(100 + k, (log / f"{k}.args").read_text().split("\0")[:-1], (log / f"{k}.sh").read_text())
            for k in range(1, n + 1)]
    return proc, subs


def task_scripts(plan: SlurmPlan) -> dict[str, str]:
    """The task script of each step, as the heredocs of the rendered script hold them (the
    subjects file is written too: participant tasks read it)."""
    write_files(plan, plan.subjects_file.parent / "cg3d_slurm.sh")
    text = render_script(plan)
    found = re.findall(r"^submit \S+ (\w+) .*?<<'(CG3D_TASK\w*)'\n(.*?)^\2$", text, re.MULTILINE | re.DOTALL)
    return {stage: body for stage, _, body in found}


def run_task(script: str, tmp: Path, env: dict[str, str], *, scontrol_rc: int = 0,
             on_start: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, list[str], str]:
    """Run one task script as SLURM would (bash, SLURM_* variables), with a fake scontrol."""
    scontrol_log = tmp / "scontrol.log"
    write_executable(tmp / "fakebin" / "scontrol", FAKE_SCONTROL.format(log=shlex.quote(str(scontrol_log)),
                                                                        rc=scontrol_rc))
    path = write_executable(tmp / "task.sh", script)
    full_env = {**os.environ, "PATH": f"{tmp / 'fakebin'}:{os.environ['PATH']}", **env}
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        if name not in env:
            full_env.pop(name, None)
    proc = subprocess.Popen(["bash", str(path)], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if on_start:
        on_start(proc)
    out, err = proc.communicate(timeout=60)
    requeues = scontrol_log.read_text().splitlines() if scontrol_log.exists() else []
    scontrol_log.unlink(missing_ok=True)
    return proc.returncode, requeues, out + err


def make_bids(root: Path, subjects: dict[str, list[str]]) -> Path:
    """A tiny BIDS tree: dataset_description.json and empty image files (names only matter here)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for sub, files in subjects.items():
        for rel in files:
            path = root / f"sub-{sub}" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return root


# ------------------------------------------------------------------------------------------------
# render_script as text
def test_script_is_valid_bash_and_deterministic(tmp_path):
    for plan in (make_plan(tmp_path), make_plan(tmp_path, container=tmp_path / "cg3d.sif")):
        text = render_script(plan)
        assert text == render_script(plan)
        proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert text.startswith("#!/usr/bin/env bash\n")


def test_odd_paths_and_arguments_are_valid_bash(tmp_path):
    base = Path(ODD)
    plan = make_plan(base, passthrough=("--x", "a b", "it's", '"q"', "$(touch /tmp/pwned)", "line\nCG3D_TASK\n"),
                     container=base / "img.sif", binds=(f"{ODD}/masks:/m:ro",))
    proc = subprocess.run(["bash", "-n"], input=render_script(plan), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "CG3D_TASK_1" in render_script(plan)  # the heredoc delimiter avoided the argument's line


def test_time_values():
    assert time_seconds("90") == 5400
    assert time_seconds("10:30") == 630
    assert time_seconds("02:00:00") == 7200
    assert time_seconds("1-00") == 86400
    assert time_seconds("1-02:03:04") == 93784
    assert time_seconds("UNLIMITED") is None
    with pytest.raises(UsageError, match="not an sbatch --time"):
        time_seconds("2h")


@pytest.mark.parametrize(("changes", "message"), [
    (dict(n_shards=0), "shards must be >= 1"),
    (dict(n_shards=1001), "shards must be >= 1 and <= 1000"),
    (dict(bids_dir=Path("bids")), "bids_dir must be an absolute path"),
    (dict(work_dir=Path("rel/work")), "work_dir must be an absolute path"),
    (dict(container=Path("cg3d.sif")), "container must be an absolute path"),
    (dict(subjects=("01", "sub-02")), "invalid participant label"),
    (dict(subjects=("01", "01")), "listed twice"),
    (dict(max_retries=-1), "max-retries must be >= 0"),
    (dict(array_limit=0), "array-limit must be >= 1"),
    (dict(passthrough=("--nprocs", "4")), "--nprocs may not follow '--'"),
    (dict(passthrough=("--work-dir=/x",)), "--work-dir may not follow '--'"),
    (dict(passthrough=("-w/x",)), "-w/x may not follow '--'"),
    (dict(passthrough=("--shard", "1/2")), "--shard may not follow"),
    (dict(modalities=("T3w",)), "unknown modality T3w"),
    (dict(job_name="my job"), "not a SLURM name"),
])
def test_plan_validation(tmp_path, changes, message):
    with pytest.raises(UsageError) as info:
        make_plan(tmp_path, **changes)
    assert message in str(info.value)
    assert info.value.exit_code == EXIT_USAGE and info.value.fix


@pytest.mark.parametrize(("stage_changes", "message"), [
    (dict(cpus=0), "cpus must be >= 1"),
    (dict(gpus=-1), "gpus must be >= 0"),
    (dict(mem="lots"), "not an sbatch --mem"),
    (dict(time="4 hours"), "not an sbatch --time"),
    (dict(partition="gpu;rm"), "not a SLURM name"),
    (dict(nprocs=0), "nprocs must be >= 1"),
])
def test_stage_resource_validation(tmp_path, stage_changes, message):
    resources = default_resources()
    resources["graph"] = replace(resources["graph"], **stage_changes)
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        make_plan(tmp_path, resources=resources)
    assert "graph" in str(info.value)


def test_no_subjects_is_missing_input(tmp_path):
    with pytest.raises(Cg3dError) as info:
        make_plan(tmp_path, subjects=())
    assert info.value.exit_code == EXIT_NOINPUT


def test_participant_chunks_share_the_concurrency_limit(tmp_path):
    subjects = tuple(f"{i:04d}" for i in range(2500))
    plan = make_plan(tmp_path, subjects=subjects, max_array_size=1000, array_limit=50)
    assert plan.participant_chunks() == [(0, 1000), (1000, 1000), (2000, 500)]
    text = render_script(plan)
    assert re.findall(r"submit JOB_PARTICIPANT_\d participant \S+ (--array=\S+)", text) == [
        "--array=1-1000%17", "--array=1-1000%17", "--array=1-500%17"]
    assert re.findall(r"line=\$\(\( (\d+) \+ SLURM_ARRAY_TASK_ID \)\)", text) == ["0", "1000", "2000"]
    assert '"--dependency=afterok:$JOB_PARTICIPANT_1:$JOB_PARTICIPANT_2:$JOB_PARTICIPANT_3"' in text


# ------------------------------------------------------------------------------------------------
# the script with a fake sbatch
def test_chain_order_dependencies_and_resources(tmp_path):
    resources = small_resources(partition_gpu="gpu")
    plan = make_plan(tmp_path, resources=resources, account="lab", sbatch_args=("--qos=long",), array_limit=2)
    proc, subs = run_with_fake_sbatch(plan, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [s.stage for s in subs] == list(STAGES)
    ids = {s.stage: s.id for s in subs}
    assert re.findall(r"submitted (\w+) job (\d+)", proc.stdout) == [(s, str(ids[s])) for s in STAGES]
    assert option_value(subs[0].args, "--dependency") is None
    for previous, sub in itertools.pairwise(subs):
        assert option_value(sub.args, "--dependency") == f"afterok:{previous.id}"  # ";ci" cluster suffix stripped
        assert "--kill-on-invalid-dep=yes" in sub.args
    for sub in subs:
        res = resources[sub.stage]
        args = sub.args
        assert "--parsable" in args and "--requeue" in args and "--open-mode=append" in args
        assert option_value(args, "--cpus-per-task") == str(res.cpus)
        assert option_value(args, "--mem") == res.mem and option_value(args, "--time") == res.time
        assert option_value(args, "--gres") == ("gpu:1" if res.gpus else None)
        assert option_value(args, "--partition") == res.partition
        assert option_value(args, "--account") == "lab" and "--qos=long" in args
        assert option_value(args, "--signal") == "B:USR1@120"
        assert option_value(args, "--chdir") == str(plan.work_dir)
    assert option_value(subs[0].args, "--array") == "1-3%2"
    assert option_value(subs[1].args, "--array") == "1-2"
    assert option_value(subs[2].args, "--array") is None
    assert {s.stage: s.script for s in subs} == task_scripts(plan)  # stdin = the heredocs, verbatim
    assert option_value(subs[0].args, "--output") == f"{plan.log_dir}/cg3d-participant-%A_%a.log"
    assert option_value(subs[2].args, "--output") == f"{plan.log_dir}/cg3d-graph-%j.log"
    assert plan.subjects_file.read_text() == "01\n02\n03\n"
    assert plan.log_dir.is_dir() and plan.output_dir.is_dir() and plan.work_dir.is_dir()


def test_refused_step_submits_nothing(tmp_path):
    proc, subs = run_with_fake_sbatch(make_plan(tmp_path), tmp_path, refuse="cg3d-rescore")
    assert proc.returncode != 0 and subs == []
    assert "SLURM would refuse the rescore step (nothing was submitted)" in proc.stderr
    assert "invalid partition" in proc.stderr


def test_failed_submission_stops_and_names_what_to_cancel(tmp_path):
    proc, subs = run_with_fake_sbatch(make_plan(tmp_path), tmp_path, fail_at=3)
    assert proc.returncode != 0
    assert [s.stage for s in subs] == ["participant", "score"]
    assert "sbatch failed for the graph step" in proc.stderr
    assert "scancel 101 102" in proc.stderr


def test_changed_subjects_file_is_refused(tmp_path):
    plan = make_plan(tmp_path)
    script = write_files(plan, tmp_path / "slurm" / "cg3d_slurm.sh")
    plan.subjects_file.write_text("01\n02\n")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{_sbatch_dir(tmp_path)}:{os.environ['PATH']}"})
    assert proc.returncode != 0 and "no longer lists 3 subjects" in proc.stderr


def _sbatch_dir(tmp: Path) -> Path:
    write_executable(tmp / "fakebin" / "sbatch", "#!/bin/sh\nexit 0\n")
    return tmp / "fakebin"


def test_task_commands_threads_and_quoting(tmp_path):
    """Each task script, run locally, calls cg3d with the documented arguments, verbatim."""
    odd_args = ("--batch-size", "6", "a b", "it's", '"q"', "$HOME", "`id`", "x\nCG3D_TASK\ny", "--device", "cpu")
    base = tmp_path / "odd dir $x 'q' 5%"
    exe, calls = fake_cg3d(base)
    plan = make_plan(base, resources=small_resources(), cg3d_executable=str(exe), passthrough=odd_args,
                     modalities=("T1w",), n_shards=3, subjects=("01", "02", "A7"))
    tasks = task_scripts(plan)
    common = ["--modality", "T1w", *odd_args]
    head = [str(plan.bids_dir), str(plan.output_dir)]
    work = ["-w", str(plan.work_dir)]
    cases = [
        ("participant", {"SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3", "SLURM_CPUS_PER_TASK": "6"},
         [*head, "participant", *work, "--participant-label", "A7", "--nprocs", "6", "--omp-nthreads", "1"]),
        ("score", {"SLURM_ARRAY_JOB_ID": "6", "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "6"},
         [*head, "group", *work, "--stage", "score", "--shard", "2/3", "--nprocs", "1", "--omp-nthreads", "6"]),
        ("graph", {"SLURM_CPUS_PER_TASK": "3"},
         [*head, "group", *work, "--stage", "graph", "--nprocs", "1", "--omp-nthreads", "3"]),
        ("rescore", {"SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "3", "SLURM_CPUS_PER_TASK": "4"},
         [*head, "group", *work, "--stage", "rescore", "--shard", "3/3", "--nprocs", "1", "--omp-nthreads", "4"]),
        ("outputs", {}, [*head, "group", *work, "--stage", "outputs", "--nprocs", "2", "--omp-nthreads", "1"]),
    ]
    for stage, env, expected in cases:
        env = {"SLURM_JOB_ID": "99", **env}
        rc, requeues, out = run_task(tasks[stage], tmp_path, env)
        assert rc == 0 and requeues == [], out
        call = read_calls(calls)[-1]
        assert call["args"] == expected + common, stage
        threads = expected[expected.index("--omp-nthreads") + 1]
        assert call["env"]["OMP_NUM_THREADS"] == threads
        assert not (Path.home() / "pwned").exists()


def test_group_stages_get_the_selected_labels(tmp_path):
    exe, calls = fake_cg3d(tmp_path)
    plan = make_plan(tmp_path, cg3d_executable=str(exe), group_labels=True)
    tasks = task_scripts(plan)
    run_task(tasks["graph"], tmp_path, {"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "1"})
    args = read_calls(calls)[-1]["args"]
    assert option(args, "--participant-label") == str(plan.subjects_file)
    run_task(tasks["participant"], tmp_path, {"SLURM_JOB_ID": "2", "SLURM_ARRAY_JOB_ID": "2",
                                              "SLURM_ARRAY_TASK_ID": "1"})
    assert option(read_calls(calls)[-1]["args"], "--participant-label") == "01"


def test_participant_task_refuses_a_line_that_is_not_a_label(tmp_path):
    exe, calls = fake_cg3d(tmp_path)
    plan = make_plan(tmp_path, cg3d_executable=str(exe))
    tasks = task_scripts(plan)
    rc, requeues, out = run_task(tasks["participant"], tmp_path, {"SLURM_JOB_ID": "1", "SLURM_ARRAY_JOB_ID": "1",
                                                                  "SLURM_ARRAY_TASK_ID": "4"})
    assert rc == 1 and requeues == [] and "line 4" in out and "Generate it again" in out
    assert read_calls(calls) == []


def test_container_mode(tmp_path):
    exe, calls = fake_cg3d(tmp_path)
    apptainer = fake_apptainer(tmp_path, exe, calls)
    image = write_executable(tmp_path / "cg3d.sif", "")
    plan = make_plan(tmp_path, resources=small_resources(), container=image, apptainer=str(apptainer),
                     binds=("/opt/masks:/opt/masks:ro",), group_labels=True,
                     subjects_file=tmp_path / "elsewhere" / "s.txt")
    tasks = task_scripts(plan)
    for stage in STAGES:
        env = {"SLURM_JOB_ID": "4", "SLURM_CPUS_PER_TASK": "2", "CUDA_VISIBLE_DEVICES": "1",
               **({"SLURM_ARRAY_JOB_ID": "4", "SLURM_ARRAY_TASK_ID": "1"} if stage in ARRAY_STAGES else {})}
        rc, _, out = run_task(tasks[stage], tmp_path, env)
        assert rc == 0, out
        app = read_calls(calls, "apptainer")[-1]
        gpu = stage in ("participant", "score", "rescore")
        assert app["flags"] == (["--nv", "--cleanenv"] if gpu else ["--cleanenv"]), stage
        assert app["image"] == str(image)
        assert app["binds"] == [f"{plan.bids_dir}:{plan.bids_dir}:ro", str(plan.output_dir), str(plan.work_dir),
                                f"{plan.subjects_file.parent}:{plan.subjects_file.parent}:ro",
                                "/opt/masks:/opt/masks:ro"]
        assert app["env"]["APPTAINERENV_CUDA_VISIBLE_DEVICES"] == ("1" if gpu else None)
        assert app["args"] == read_calls(calls)[-1]["args"] and app["args"][0] == str(plan.bids_dir)
    assert str(exe) not in "".join(tasks.values())  # the executable is not used in container mode


# ------------------------------------------------------------------------------------------------
# requeue decisions (task scripts run locally, fake scontrol)
ARRAY_ENV = {"SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "2"}


@pytest.mark.parametrize(("rule", "restarts", "requeued", "rc"), [
    ({"exit": 75}, "0", True, 75),
    ({"exit": 75}, "1", True, 75),
    ({"exit": 75}, "2", False, 75),                     # retries (2) used up
    ({"exit": 1}, "0", False, 1),                       # a real error
    ({"exit": 65}, "0", False, 65),
    ({"signal": int(signal.SIGKILL)}, "0", True, 137),       # OOM killer, admin
    ({"signal": int(signal.SIGTERM)}, "0", True, 143),
    ({"signal": int(signal.SIGSEGV)}, "0", False, 139),      # a crash is not transient
])
def test_requeue_decision(tmp_path, rule, restarts, requeued, rc):
    exe, calls = fake_cg3d(tmp_path, [{"when": ["score"], **rule}])
    plan = make_plan(tmp_path, cg3d_executable=str(exe), max_retries=2)
    task = task_scripts(plan)["score"]
    got_rc, requeues, out = run_task(task, tmp_path, {**ARRAY_ENV, "SLURM_RESTART_COUNT": restarts})
    assert got_rc == rc
    assert requeues == (["requeue 40_2"] if requeued else []), out
    if requeued:
        assert "requeuing task 40_2" in out
    else:
        assert "failed (exit" in out and "run the script again" in out


def test_requeue_of_a_plain_job_uses_its_job_id(tmp_path):
    exe, _ = fake_cg3d(tmp_path, [{"when": ["graph"], "exit": 75}])
    task = task_scripts(make_plan(tmp_path, cg3d_executable=str(exe)))["graph"]
    rc, requeues, _ = run_task(task, tmp_path, {"SLURM_JOB_ID": "77"})
    assert (rc, requeues) == (75, ["requeue 77"])


def test_failed_requeue_fails_the_task(tmp_path):
    exe, _ = fake_cg3d(tmp_path, [{"when": ["graph"], "exit": 75}])
    task = task_scripts(make_plan(tmp_path, cg3d_executable=str(exe)))["graph"]
    rc, requeues, out = run_task(task, tmp_path, {"SLURM_JOB_ID": "77"}, scontrol_rc=1)
    assert rc == 75 and requeues == ["requeue 77"] and "scontrol requeue 77 failed" in out


def test_time_limit_warning_requeues(tmp_path):
    """SIGUSR1 to the task (sbatch --signal=B:USR1@120) stops cg3d and requeues the task."""
    exe, calls = fake_cg3d(tmp_path, [{"when": ["rescore"], "sleep": 30}])
    task = task_scripts(make_plan(tmp_path, cg3d_executable=str(exe)))["rescore"]

    def warn(proc: subprocess.Popen) -> None:
        sleeping = calls / "rule-0.sleeping"
        for _ in range(200):
            if sleeping.exists():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)  # a second warning while cg3d is stopping changes nothing

    t0 = time.monotonic()
    rc, requeues, out = run_task(task, tmp_path, ARRAY_ENV, on_start=warn)
    assert time.monotonic() - t0 < 20  # cg3d was stopped, not waited for
    assert rc == 143 and requeues == ["requeue 40_2"], out
    assert "time limit (or a preemption) is near" in out


def test_sigterm_to_the_task_is_not_a_requeue(tmp_path):
    """scancel sends SIGTERM to the whole task: it must end it, never requeue it."""
    exe, calls = fake_cg3d(tmp_path, [{"when": ["rescore"], "sleep": 30}])
    task = task_scripts(make_plan(tmp_path, cg3d_executable=str(exe)))["rescore"]

    def cancel(proc: subprocess.Popen) -> None:
        for _ in range(200):
            if (calls / "rule-0.sleeping").exists():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        os.kill(int((calls / "rule-0.sleeping").read_text()), signal.SIGTERM)

    rc, requeues, _ = run_task(task, tmp_path, ARRAY_ENV, on_start=cancel)
    assert rc == -signal.SIGTERM and requeues == []


# ------------------------------------------------------------------------------------------------
# CLI
def test_discover_subjects(tmp_path):
    bids = make_bids(tmp_path / "bids", {
        "01": ["anat/sub-01_T1w.nii.gz"],
        "02": ["ses-a/anat/sub-02_ses-a_acq-x_T2w.nii"],
        "03": ["anat/sub-03_FLAIR.nii.gz", "func/sub-03_task-x_bold.nii.gz"],
        "04": ["anat/sub-04_T1w.json"],
        "05": ["anat/sub-05_desc-fooT1w.nii.gz"],
    })
    assert discover_subjects(bids, ("T1w", "T2w")) == ("01", "02")
    assert discover_subjects(bids, ("FLAIR",)) == ("03",)
    assert discover_subjects(bids, ("T1w", "T2w"), ["sub-02"]) == ("02",)
    with pytest.raises(Cg3dError) as info:
        discover_subjects(bids, ("T1w",), ["02"])
    assert info.value.exit_code == EXIT_NO_MATCH and "02" in str(info.value)
    with pytest.raises(Cg3dError) as info:
        discover_subjects(tmp_path / "nope", ("T1w",))
    assert info.value.exit_code == EXIT_NOINPUT


def test_main_writes_an_executable_script(tmp_path, capsys):
    bids = make_bids(tmp_path / "bids", {f"{i:02d}": [f"anat/sub-{i:02d}_T1w.nii.gz"] for i in (3, 1, 2)})
    exe, _ = fake_cg3d(tmp_path)
    argv = [str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "work"), "--shards", "3",
            "--cg3d-executable", str(exe), "--gpus", "0", "--partition", "cpu", "--resource", "score.mem=1G",
            "--resource", "outputs.nprocs=2", "--modality", "T1w", "--", "--batch-size", "6", "--device", "cpu"]
    assert main(argv) == 0
    script = tmp_path / "work" / "slurm" / "cg3d_slurm.sh"
    assert "bash " + str(script) in capsys.readouterr().out
    assert script.stat().st_mode & stat.S_IXUSR
    assert (script.parent / "cg3d_slurm.subjects.txt").read_text() == "01\n02\n03\n"
    text = script.read_text()
    assert "--gres" not in text and text.count("--partition=cpu") == 5
    assert re.search(r"OPTS_SCORE=\(\n(  \S+\n)*  --mem=1G\n", text)
    assert "--modality T1w --batch-size 6 --device cpu)" in text
    assert [p.name for p in script.parent.iterdir() if p.name.startswith(".tmp")] == []
    first = text
    assert main(argv) == 0 and script.read_text() == first  # deterministic


@pytest.mark.parametrize(("extra", "code", "message"), [
    (["--batch-size", "6"], EXIT_USAGE, "options for cg3d itself go after '--'"),
    (["--", "--participant-label", "01"], EXIT_USAGE, "--participant-label may not follow '--'"),
    (["--", "--modality", "T2w"], EXIT_USAGE, "--modality may not follow"),
    (["--shards", "0"], EXIT_USAGE, "shards must be >= 1"),
    (["--resource", "score.ram=1G"], EXIT_USAGE, "unknown key 'ram'"),
    (["--resource", "scoring.mem=1G"], EXIT_USAGE, "STAGE.KEY=VALUE"),
    (["--resource", "score.cpus=four"], EXIT_USAGE, "whole number"),
    (["--participant-label", "09"], EXIT_NO_MATCH, "09"),
    (["--participant-label", "0_1"], EXIT_USAGE, "invalid participant label"),
    (["--container", "/nonexistent/cg3d.sif"], EXIT_NOINPUT, "container image does not exist"),
])
def test_main_errors(tmp_path, capsys, extra, code, message):
    bids = make_bids(tmp_path / "bids", {"01": ["anat/sub-01_T1w.nii.gz"]})
    exe, _ = fake_cg3d(tmp_path)
    argv = [str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "work"), "--cg3d-executable", str(exe)]
    if extra and extra[0] == "--":
        argv += extra
    else:
        argv = argv[:4] + extra + argv[4:]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "fix:" in err
    assert not (tmp_path / "work" / "slurm" / "cg3d_slurm.sh").exists()


def test_main_requires_absolute_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_bids(tmp_path / "bids", {"01": ["anat/sub-01_T1w.nii.gz"]})
    assert main(["bids", str(tmp_path / "out"), "-w", str(tmp_path / "w")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "bids dir must be an absolute path" in err and f"pass {tmp_path / 'bids'}" in err


def test_main_inside_the_container_needs_the_image(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CG3D_CONTAINER_TYPE", "apptainer")
    bids = make_bids(tmp_path / "bids", {"01": ["anat/sub-01_T1w.nii.gz"]})
    assert main([str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "w")]) == EXIT_USAGE
    assert "--container" in capsys.readouterr().err


# ================================================================================================
# against a real SLURM cluster (.ci/with_slurm.sh)
@dataclass
class JobTask:
    """One job or array task as SLURM reports it at the end."""

    job_id: str
    array_task: str | None
    state: str
    exit_code: str
    restarts: int
    reason: str


@dataclass
class SlurmRun:
    """What :func:`run_slurm_script` returns: the submission output and every job's final state."""

    returncode: int
    stdout: str
    stderr: str
    jobs: dict[str, list[str]] = field(default_factory=dict)  # stage -> job ids, in submission order
    states: dict[str, list[JobTask]] = field(default_factory=dict)  # stage -> jobs / array tasks
    seconds: float = 0.0

    def all(self, stage: str) -> set[str]:
        return {t.state for t in self.states.get(stage, [])}


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The SLURM_CONF of a running cluster; skips (with the reason) where there is none."""
    if os.environ.get("CG3D_SLURM_SKIP"):
        pytest.skip(f"no SLURM cluster: {os.environ['CG3D_SLURM_SKIP']}")
    if not os.environ.get("SLURM_CONF") or not shutil.which("sbatch"):
        pytest.skip("no SLURM cluster: run these tests under .ci/with_slurm.sh (pytest -m slurm)")
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"SLURM_CONF is set but sinfo fails: {proc.stderr}")
    return os.environ["SLURM_CONF"]


def _job_tasks(job_id: str) -> list[JobTask]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    tasks = []
    for line in proc.stdout.splitlines():
        def get(key: str, line: str = line) -> str:
            match = re.search(rf"(?:^|\s){key}=(\S*)", line)
            return match.group(1) if match else ""
        tasks.append(JobTask(get("JobId"), get("ArrayTaskId") or None, get("JobState"), get("ExitCode"),
                             int(get("Restarts") or 0), get("Reason")))
    return tasks


def wait_for_jobs(job_ids: dict[str, list[str]], timeout: float) -> dict[str, list[JobTask]]:
    """Poll ``scontrol show job`` until every job and array task has ended; their final states."""
    deadline = time.monotonic() + timeout
    while True:
        states = {stage: [t for j in ids for t in _job_tasks(j)] for stage, ids in job_ids.items()}
        if all(t.state in TERMINAL for ts in states.values() for t in ts):  # a never-started array: one line
            return states
        if time.monotonic() > deadline:
            queue = subprocess.run(["squeue", "-l"], capture_output=True, text=True).stdout
            pytest.fail(f"jobs still not finished after {timeout} s:\n{states}\n{queue}")
        time.sleep(0.5)


@pytest.fixture
def run_slurm_script(slurm_cluster) -> Callable[..., SlurmRun]:
    """Run a generated submission script on the cluster and wait for all its jobs.

    ``run(script, timeout=120)`` returns a :class:`SlurmRun`: the script's exit code and output,
    the job ids per step, and each job's / array task's final state (``COMPLETED``, ``FAILED``,
    ``CANCELLED`` ...) with restarts and exit codes. Jobs still queued at the end are cancelled.
    """
    submitted: list[str] = []

    def run(script: Path, timeout: float = 120) -> SlurmRun:
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        jobs: dict[str, list[str]] = {}
        for stage, job in re.findall(r"cg3d-slurm: submitted (\w+) job (\d+)", proc.stdout):
            jobs.setdefault(stage, []).append(job)
            submitted.append(job)
        states = wait_for_jobs(jobs, timeout) if jobs else {}
        return SlurmRun(proc.returncode, proc.stdout, proc.stderr, jobs, states, time.monotonic() - t0)

    yield run
    if submitted:
        subprocess.run(["scancel", *submitted], capture_output=True)


def _logs(plan: SlurmPlan) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(plan.log_dir.glob("*.log")))


@pytest.mark.slurm
def test_cluster_chain_with_requeue(tmp_path, run_slurm_script):
    """12 subjects, 3 shards, --batch-size 6: every step runs once per task, in order, with the
    right arguments, threads, GPUs and array indices; a task failing with exit 75 is requeued."""
    subjects = tuple(f"{i:02d}" for i in range(1, 13))
    exe, calls = fake_cg3d(tmp_path, [{"when": ["--participant-label", "03"], "exit": 75, "once": True}])
    plan = make_plan(tmp_path, subjects=subjects, n_shards=3, resources=small_resources(), cg3d_executable=str(exe),
                     passthrough=("--batch-size", "6", "--note", "two words"), max_retries=2, job_name="cg3dA")
    result = run_slurm_script(write_files(plan, tmp_path / "slurm" / "cg3d_slurm.sh"))
    assert result.returncode == 0, result.stderr
    logs = _logs(plan)
    for stage in STAGES:
        assert result.all(stage) == {"COMPLETED"}, (stage, result.states, logs)
    requeued = [t for t in result.states["participant"] if t.restarts]
    assert [(t.array_task, t.restarts) for t in requeued] == [("3", 1)], logs
    assert "exited 75" in logs and "requeuing task" in logs

    calls_by_stage: dict[str, list[dict]] = {}
    for call in read_calls(calls):
        calls_by_stage.setdefault(stage_of(call["args"]), []).append(call)
    # participant: one call per subject (two for 03), task i = line i of the subjects file
    part = calls_by_stage["participant"]
    assert sorted(option(c["args"], "--participant-label") for c in part) == sorted([*subjects, "03"])
    for c in part:
        assert subjects[int(c["env"]["SLURM_ARRAY_TASK_ID"]) - 1] == option(c["args"], "--participant-label")
        assert c["env"]["SLURM_ARRAY_JOB_ID"] == result.jobs["participant"][0]
    failed = [c for c in part if c["rc"] == 75]
    assert len(failed) == 1 and option(failed[0]["args"], "--participant-label") == "03"
    assert failed[0]["env"]["SLURM_RESTART_COUNT"] in (None, "0")
    retry = [c for c in part if c["rc"] == 0 and option(c["args"], "--participant-label") == "03"]
    assert len(retry) == 1 and retry[0]["env"]["SLURM_RESTART_COUNT"] == "1"
    # shards: i/3 in array task i
    for stage in ("score", "rescore"):
        shards = sorted((c["env"]["SLURM_ARRAY_TASK_ID"], option(c["args"], "--shard")) for c in calls_by_stage[stage])
        assert shards == [("1", "1/3"), ("2", "2/3"), ("3", "3/3")]
    assert len(calls_by_stage["graph"]) == 1 and len(calls_by_stage["outputs"]) == 1
    # arguments, threads, GPUs, partitions
    expected_threads = {"participant": ("1", "1"), "score": ("1", "2"), "graph": ("1", "1"), "rescore": ("1", "2"),
                        "outputs": ("2", "1")}
    for stage, stage_calls in calls_by_stage.items():
        for c in stage_calls:
            args = c["args"]
            assert args[:2] == [str(plan.bids_dir), str(plan.output_dir)] and option(args, "-w") == str(plan.work_dir)
            assert args[-4:] == ["--batch-size", "6", "--note", "two words"]
            assert (option(args, "--nprocs"), option(args, "--omp-nthreads")) == expected_threads[stage]
            assert c["env"]["SLURM_CPUS_PER_TASK"] == str(plan.stage(stage).cpus)
            gpu = stage in ("participant", "score", "rescore")
            assert c["env"]["SLURM_JOB_PARTITION"] == ("gpu" if gpu else "cpu")
            assert (c["env"]["CUDA_VISIBLE_DEVICES"] is not None) == gpu
            assert c["cwd"] == str(plan.work_dir)
    # dependency order: each step starts after every successful task of the step before ended
    for before, after in itertools.pairwise(STAGES):
        done = max(c["end"] for c in calls_by_stage[before] if c["rc"] == 0)
        assert min(c["start"] for c in calls_by_stage[after]) >= done, (before, after)
    print(f"\n[slurm] 12-subject chain with one requeue: {result.seconds:.1f} s")


@pytest.mark.slurm
def test_cluster_hard_failure_cancels_the_rest(tmp_path, run_slurm_script):
    """A shard failing with exit 1 is not retried; graph, rescore and outputs never run (container mode)."""
    exe, calls = fake_cg3d(tmp_path, [{"when": ["--shard", "2/2"], "exit": 1}])
    apptainer = fake_apptainer(tmp_path, exe, calls)
    plan = make_plan(tmp_path, subjects=("01", "02", "03", "04"), n_shards=2, resources=small_resources(),
                     container=write_executable(tmp_path / "cg3d.sif", ""), apptainer=str(apptainer),
                     job_name="cg3dB")
    result = run_slurm_script(write_files(plan, tmp_path / "slurm" / "cg3d_slurm.sh"))
    assert result.returncode == 0, result.stderr
    logs = _logs(plan)
    assert result.all("participant") == {"COMPLETED"}, logs
    score = {t.array_task: t for t in result.states["score"]}
    assert score["1"].state == "COMPLETED" and score["2"].state == "FAILED" and score["2"].restarts == 0, logs
    for stage in ("graph", "rescore", "outputs"):
        assert result.all(stage) == {"CANCELLED"}, (stage, result.states)
    ran = {stage_of(c["args"]) for c in read_calls(calls)}
    assert ran == {"participant", "score"}
    assert "failed (exit 1)" in logs and "run the script again" in logs
    apps = read_calls(calls, "apptainer")
    assert len(apps) == 4 + 2 and all(a["flags"] == ["--nv", "--cleanenv"] for a in apps)
    assert all(a["env"]["APPTAINERENV_CUDA_VISIBLE_DEVICES"] == a["env"]["CUDA_VISIBLE_DEVICES"] for a in apps)
    print(f"\n[slurm] hard failure chain: {result.seconds:.1f} s")


@pytest.mark.slurm
def test_cluster_refuses_a_bad_request_before_submitting(tmp_path, run_slurm_script):
    exe, calls = fake_cg3d(tmp_path)
    resources = small_resources()
    resources["outputs"] = replace(resources["outputs"], partition="nosuchpartition")
    plan = make_plan(tmp_path, resources=resources, cg3d_executable=str(exe), job_name="cg3dC")
    result = run_slurm_script(write_files(plan, tmp_path / "slurm" / "cg3d_slurm.sh"))
    assert result.returncode != 0 and result.jobs == {}
    assert "SLURM would refuse the outputs step (nothing was submitted)" in result.stderr
    queued = subprocess.run(["squeue", "-h", "-n", "cg3dC-participant"], capture_output=True, text=True).stdout
    assert queued.strip() == ""


@pytest.mark.slurm
def test_real_cg3d_chain_equals_one_process(tmp_path, run_slurm_script, capsys):
    """The real cg3d through `cg3d slurm-script` (12 subjects, 3 shards, --batch-size 6, CPU only):
    every job completes and the outputs equal one `cg3d ... group` call, voxel for voxel."""
    import csv

    import nibabel as nib
    import numpy as np

    from bids_fixtures import make_bids_dataset
    from cg3d_bids.cli.main import main as cg3d_main

    subjects = [f"{i:02d}" for i in range(1, 13)]
    paths = make_bids_dataset(tmp_path / "bids", subjects=subjects, modalities=("T1w",), with_masks=True,
                              lesion_subjects=["04", "09"], seed=21)
    options = ["--device", "cpu", "--encoder", "test-tiny-vit", "--cube-size", "56", "--projection-dim", "16",
               "--skip-bids-validation", "-d", f"masks={paths['masks_dir']}", "--batch-size", "6"]
    bids = tmp_path / "bids"
    assert cg3d_main([str(bids), str(tmp_path / "one"), "group", "-w", str(tmp_path / "work_one"), "--modality",
                      "T1w", "--nprocs", "1", "--omp-nthreads", "1", *options]) == 0

    exe = write_executable(tmp_path / "bin" / "cg3d", f'#!/bin/sh\nexec "{sys.executable}" -m cg3d_bids "$@"\n')
    resources = [f"--resource={stage}.{key}" for stage in STAGES
                 for key in ("cpus=1", "mem=3G", "time=00:20:00")]
    script = tmp_path / "slurm" / "cg3d_slurm.sh"
    code = cg3d_main(["slurm-script", str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "work"),
                      "--shards", "3", "--modality", "T1w", "--gpus", "0", "--job-name", "cg3dReal",
                      "--cg3d-executable", str(exe), "-o", str(script), *resources, "--", *options])
    assert code == 0, capsys.readouterr().err
    result = run_slurm_script(script, timeout=900)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((script.parent / "logs").glob("*")))
    assert result.returncode == 0, result.stderr
    for stage in STAGES:
        assert result.all(stage) == {"COMPLETED"}, (stage, result.states, logs)
    assert len(result.states["participant"]) == 12 and len(result.states["score"]) == 3

    shard_files = sorted((tmp_path / "work" / "shards").rglob("rows-L*-*of3.npz"))
    assert len({p.parent for p in shard_files}) == 2  # two batches of six
    one = sorted((tmp_path / "one").rglob("*.nii.gz"))
    assert len(one) >= 3 * len(subjects)
    for ref in one:
        got = tmp_path / "out" / ref.relative_to(tmp_path / "one")
        assert np.array_equal(np.asarray(nib.load(got).dataobj), np.asarray(nib.load(ref).dataobj)), ref.name

    def rows(path):
        with open(path, newline="") as fh:
            return [{k: v for k, v in r.items() if k != "run_id"} for r in csv.DictReader(fh, delimiter="\t")]

    assert rows(tmp_path / "out" / "group_T1w.tsv") == rows(tmp_path / "one" / "group_T1w.tsv")
    print(f"\n[slurm] real cg3d, 12 subjects, 3 shards, 2 batches: {result.seconds:.1f} s")
