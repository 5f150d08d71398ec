"""The Boutiques descriptor of ``cg3d`` (BIDS Apps execution spec, BEP027), generated from the settings.

Every input of :func:`build_descriptor` comes from the :class:`~cg3d_bids.settings.Option` of one
setting (id, name, type, flag, default, choices, bounds), in the parser's order; only the
BIDS-App positionals' descriptions, ``--help``, ``--version``, ``--bids-exec-spec`` and
``--config-file`` (which are not settings) are written here. ``descriptor.json`` is the packaged
copy (``python -m cg3d_bids.boutiques > cg3d_bids/boutiques/descriptor.json`` rewrites it; a
test checks it is current), ``invocation.json`` an example invocation, and
``cg3d --bids-exec-spec`` prints the descriptor.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from .. import __version__
from ..settings import OptionSpec, iter_options

DESCRIPTOR = "descriptor.json"
INVOCATION = "invocation.json"

#: Boutiques group ids of the settings' option groups (``--help`` headings).
GROUP_IDS = {
    "Selecting the data": "data_selection",
    "Method (defaults reproduce the CoDeGraph3D paper)": "method",
    "Performance": "performance",
    "Work directory, configuration and logging": "workflow",
}

POSITIONAL_DESCRIPTIONS = {
    "InputDataset": "The input BIDS dataset (read only). cg3d accepts exactly one dataset (BIDS-Apps 1.0 "
    "positional bids_dir); brain-mask derivatives are given with Derivatives.",
    "OutputLocation": "The output BIDS-Derivatives dataset (created if missing; suggestion: "
    "<bids_dir>/derivatives/cg3d). Parallel participant-level runs may share it.",
    "AnalysisLevel": "participant (BEP027 'subject'): preprocessing and 3D tokens of the selected subjects, "
    "cached in the work directory, safe to run in parallel. group (BEP027 'dataset'): computes whatever is "
    "still missing, then batch scoring and every output. Any other value exits 17.",
}

ERROR_CODES = [
    (1, "FAILURE: unspecified failure, or at least one image failed (reports are still written)."),
    (16, "The input dataset failed BIDS validation (use --skip-bids-validation to go on)."),
    (17, "Unknown analysis level (use participant or group)."),
    (18, "Entity filters (--participant-label, --session-label, --bids-filter-file) selected no files."),
    (64, "USAGE: the command was used incorrectly (bad flag or value; argparse's 2 is never used)."),
    (65, "DATAERR: unreadable, corrupt, non-3D or non-finite image, or an unusable brain mask."),
    (66, "NOINPUT: input missing (no dataset, no images of a modality, batch too small, no brain mask, "
         "encoder weights not found offline)."),
    (69, "UNAVAILABLE: --device cuda requested but no CUDA GPU is visible (docker run --gpus all, apptainer "
         "run --nv, or --device cpu)."),
    (73, "CANTCREAT: the output or work folder cannot be created or written (docker: -u $(id -u):$(id -g) "
         "and a writable -v mount; apptainer: -B)."),
    (74, "IOERR: read or write failure during the run (disk full, stale network file system)."),
    (75, "TEMPFAIL: CUDA out of memory or a busy GPU; lower --slice-batch / --score-chunk-mb and rerun "
         "(the work directory resumes). Also: the output folder (or, for group runs, the work directory) is "
         "in use by another cg3d run, named in the message; wait for it or pass --lock-wait SECONDS."),
    (129, "Stopped by SIGHUP (128 + 1): workers stopped; rerun the same command to resume."),
    (130, "Stopped by SIGINT (128 + 2, Ctrl-C): workers stopped; rerun the same command to resume."),
    (143, "Stopped by SIGTERM (128 + 15; SLURM time limit or scancel): workers stopped; rerun the same "
          "command to resume."),
]

OUTPUT_FILES = [
    ("OutputDataset", "Output derivatives dataset", "The BIDS-Derivatives dataset (dataset_description.json, "
     "README.md, .bidsignore, maps, tables, reports, logs).", "[OUTPUT_LOCATION]", False, False),
    ("DatasetDescription", "dataset_description.json", "Derivative dataset description (GeneratedBy cg3d).",
     "[OUTPUT_LOCATION]/dataset_description.json", False, True),
    ("GroupTables", "Group tables", "One row per requested image of a modality: subject score (maximum of the "
     "raw map) and summaries (group_<modality>.tsv + data dictionary .json).", "[OUTPUT_LOCATION]/group_*.tsv",
     True, True),
    ("ProbsegMaps", "Anomaly probability maps", "sub-<l>[_ses-<l>]_label-anomaly_desc-<modality>_probseg.nii.gz, "
     "values in [0, 1], on the native grid of each input.",
     "[OUTPUT_LOCATION]/sub-*/anat/*_label-anomaly_desc-*_probseg.nii.gz", True, True),
    ("ProbsegMapsSessions", "Anomaly probability maps (sessions)", "As ProbsegMaps, for datasets with sessions.",
     "[OUTPUT_LOCATION]/sub-*/ses-*/anat/*_label-anomaly_desc-*_probseg.nii.gz", True, True),
    ("AnomalyMasks", "Binary anomaly masks", "sub-<l>[_ses-<l>]_label-anomaly_desc-<modality>_mask.nii.gz "
     "(probseg > Threshold).", "[OUTPUT_LOCATION]/sub-*/anat/*_label-anomaly_desc-*_mask.nii.gz", True, True),
    ("Reports", "HTML reports", "sub-<l>.html and group_<modality>.html.", "[OUTPUT_LOCATION]/*.html", True, True),
    ("Logs", "Logs", "Run configuration (config-<run>.toml), log, per-stage timings (timings-<run>.tsv) and "
     "CITATION.md.", "[OUTPUT_LOCATION]/logs", False, True),
]


def value_key(bosh_id: str) -> str:
    """``SubjectLabel`` -> ``[SUBJECT_LABEL]``."""
    return "[" + re.sub(r"(?<!^)(?=[A-Z])", "_", bosh_id).upper() + "]"


def _description(spec: OptionSpec) -> str:
    opt = spec.option
    text = opt.help
    if "default" not in opt.help and opt.kind in ("value",) and spec.default not in (None, {}, ()):
        shown = " ".join(map(str, spec.default)) if isinstance(spec.default, tuple) else spec.default
        text += f" (default: {shown})"
    text += "."
    aliases = [f for f in opt.flags if f != _main_flag(spec)]
    if aliases:
        text += (" Aliases: " if len(aliases) > 1 else " Alias: ") + ", ".join(aliases) + "."
    return text


def _main_flag(spec: OptionSpec) -> str:
    return next((f for f in spec.option.flags if f.startswith("--")), spec.option.flags[0])


def _input(spec: OptionSpec) -> dict[str, Any]:
    opt = spec.option
    if opt.kind in ("flag", "no-flag", "count"):
        kind = "Flag"
    elif opt.bosh_type:
        kind = opt.bosh_type
    elif opt.integer or spec.type in (int, float, int | None, float | None) or opt.minimum is not None:
        kind = "Number"
    else:
        kind = "String"
    item: dict[str, Any] = {"id": opt.bosh_id, "name": opt.bosh_name, "type": kind,
                            "description": _description(spec), "value-key": value_key(opt.bosh_id)}
    if opt.kind == "positional":
        item["optional"] = False
        item["description"] = POSITIONAL_DESCRIPTIONS[opt.bosh_id]
        if opt.bosh_id == "InputDataset":
            item.update({"type": "File", "list": True, "min-list-entries": 1, "max-list-entries": 1})
    else:
        item["command-line-flag"] = _main_flag(spec)
        item["optional"] = True
        if opt.nargs in ("+", "*"):
            item["list"] = True
    if opt.choices:
        item["value-choices"] = list(opt.choices)
    if kind == "Number":
        if opt.integer:
            item["integer"] = True
        for key, value in (("minimum", opt.minimum), ("maximum", opt.maximum)):
            if value is not None:
                item[key] = value
        if opt.exclusive_minimum:
            item["exclusive-minimum"] = True
        if opt.exclusive_maximum:
            item["exclusive-maximum"] = True
    return item


def _flag(bosh_id: str, name: str, flag: str, description: str, kind: str = "Flag") -> dict[str, Any]:
    return {"id": bosh_id, "name": name, "type": kind, "description": description, "value-key": value_key(bosh_id),
            "command-line-flag": flag, "optional": True}


def build_descriptor() -> dict[str, Any]:
    """The descriptor, generated from the settings (see the module docstring)."""
    specs = [spec for _section, spec in iter_options()]
    inputs = [_input(s) for s in specs if s.option.kind == "positional"]
    inputs += [
        _flag("Help", "Help", "--help", "Print the usage and every option with its default, then exit."),
        _flag("ToolVersion", "Version", "--version", "Print the version of cg3d and exit."),
        _flag("BidsExecSpec", "Print this descriptor", "--bids-exec-spec",
              "Print this Boutiques descriptor (BEP027) and exit (no positionals needed)."),
    ]
    groups: dict[str, list[str]] = {}
    for spec in specs:
        if spec.option.kind == "positional":
            continue
        inputs.append(_input(spec))
        groups.setdefault(spec.option.group, []).append(spec.option.bosh_id)
        if spec.name == "work_dir":
            inputs.append(_flag("ConfigFile", "Configuration file", "--config-file", "A logs/config-*.toml of a "
                                "previous run; options given on the command line win.", kind="File"))
            groups[spec.option.group].append("ConfigFile")
    return {
        "name": "cg3d",
        "tool-version": __version__,
        "description": "Training-free zero-shot anomaly detection in 3D brain MRI (CoDeGraph3D) as a GPU "
        "BIDS-App: a frozen 2D foundation model (DINOv2) encodes every slice along three axes, slice features "
        "are pooled into 3D patch tokens, and each token is scored against its nearest look-alikes in the "
        "other images of the batch (MuSc mutual scoring with CoDeGraph). Outputs a BIDS-Derivatives dataset: "
        "per-image anomaly probseg maps and masks, group tables and HTML reports.",
        "author": "cg3d developers",
        "url": "https://github.com/cg3d/cg3d",
        "descriptor-url": "https://github.com/cg3d/cg3d/blob/main/cg3d_bids/boutiques/descriptor.json",
        "schema-version": "0.5",
        "command-line": "cg3d " + " ".join(item["value-key"] for item in inputs),
        "container-image": {"type": "docker", "image": f"cg3d/cg3d:{__version__}", "index": "docker.io",
                            "entrypoint": True, "container-opts": ["--gpus", "all"]},
        "inputs": inputs,
        "groups": [{"id": GROUP_IDS[title], "name": title, "members": members} for title, members in groups.items()],
        "output-files": [
            {"id": i, "name": n, "description": d, "path-template": t, **({"list": True} if lst else {}),
             "optional": opt}
            for i, n, d, t, lst, opt in OUTPUT_FILES
        ],
        "error-codes": [{"code": code, "description": text} for code, text in ERROR_CODES],
        "suggested-resources": {"cpu-cores": 8, "ram": 32, "disk-space": 20, "nodes": 1,
                                "walltime-estimate": 14400, "gpu": 1},
        "tags": {"domain": ["neuroinformatics", "mri", "anomaly-detection", "bids-app"], "gpu": True},
        "custom": {
            "BIDSAppSpecVersion": "0.1.0.dev", "BIDSApplicationVersion": "0.1.0.dev",
            "OutputDataSpecification": ["BIDS-Derivatives 1.10"],
            "cg3d:container": "read-only root file system, any uid; bind the input read-only and the output "
            "(and -w work dir) writable",
            "cg3d:suggested-resources": "rough estimates, not measurements, for about 100 images at 224^3 with "
            "DINOv2-L/14 on one GPU; walltime-estimate in seconds, ram and disk-space in GB",
        },
    }


def descriptor_text() -> str:
    """The descriptor as JSON text (what ``cg3d --bids-exec-spec`` prints and descriptor.json holds)."""
    return json.dumps(build_descriptor(), indent=4) + "\n"


def descriptor() -> dict[str, Any]:
    """The packaged descriptor, parsed."""
    return json.loads(resources.files(__name__).joinpath(DESCRIPTOR).read_text(encoding="utf-8"))


def invocation_text() -> str:
    """The packaged example invocation, as JSON text."""
    return resources.files(__name__).joinpath(INVOCATION).read_text(encoding="utf-8")
