"""The ``cg3d`` BIDS-App parser, generated from the settings declarations (:mod:`cg3d_bids.settings`).

Every option, its flags, help text, default and choices come from the :class:`~cg3d_bids.settings.Option`
of one setting; only ``--version``, ``--bids-exec-spec`` and ``--config-file`` (which are not
settings) are declared here. Usage errors exit 64 and an unknown analysis level exits 17
(BEP027), never argparse's 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_UNKNOWN_LEVEL, EXIT_USAGE, UsageError
from ..settings import (
    LEVELS,
    SECTIONS,
    ExecutionSettings,
    InputSettings,
    MethodSettings,
    OptionSpec,
    Settings,
    existing_file,
    iter_options,
)

#: Subcommands shown in ``cg3d --help`` (name -> one line); :mod:`cg3d_bids.cli.main` runs them.
COMMANDS: dict[str, str] = {
    "demo": "run on the bundled demo dataset (CPU, small configuration)",
    "evaluate": "metrics of an output folder against lesion masks",
    "slurm-script": "write a dependency-chained sbatch script for a cluster",
    "reference": "inspect a saved reference cohort: cg3d reference info BANK",
}


class Cg3dArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that exits 64 (EX_USAGE) on usage errors, as BEP027 recommends."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's line breaks; append ``(default: X)`` where the help text does not
    state the default already and there is a value to state (not for flags, counters or unset
    options; a zero is a value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        quiet = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._CountAction,  # noqa: SLF001
                 argparse._VersionAction, argparse._HelpAction)  # noqa: SLF001
        if ("default" in text or default is None or default is argparse.SUPPRESS or default == {}
                or isinstance(action, quiet) or not action.option_strings or action.required):
            return text
        return f"{text} (default: {default_text(default)})"


def default_text(value: Any) -> str:
    """A default as users type it: lists space-separated, paths as given."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


class _ToDict(argparse.Action):
    """Collect ``NAME=PATH`` values into a dict; a repeated name is an error."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        result = dict(getattr(namespace, self.dest) or {})
        for name, path in values:
            if name in result:
                parser.error(f"derivatives name {name!r} given twice ({option_string})")
            result[name] = path
        setattr(namespace, self.dest, result)


def _add(container: Any, spec: OptionSpec) -> None:
    """One setting as an argparse argument."""
    opt = spec.option
    default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
    if opt.kind == "positional":
        kwargs: dict[str, Any] = {"help": opt.help, "nargs": "?"}  # checked in parse_args (exit 17/64)
        if opt.parse:
            kwargs["type"] = opt.parse
        container.add_argument(spec.name, **kwargs)
        return
    kwargs = {"dest": spec.name, "help": opt.help}
    if opt.kind == "flag":
        kwargs.update(action="store_true")
    elif opt.kind == "no-flag":
        kwargs.update(action="store_false")
    elif opt.kind == "count":
        kwargs.update(action="count", default=default)
    else:
        kwargs["default"] = default
        for name in ("nargs", "choices", "metavar"):
            if getattr(opt, name) is not None:
                kwargs[name] = list(getattr(opt, name)) if name == "choices" else getattr(opt, name)
        if opt.parse:
            kwargs["type"] = opt.parse
        if spec.name == "derivatives":
            kwargs["action"] = _ToDict
    container.add_argument(*opt.flags, **kwargs)


def build_parser() -> Cg3dArgumentParser:
    """The ``cg3d BIDS_DIR OUTPUT_DIR LEVEL`` parser."""
    commands = "".join(f"  cg3d {name} ...{' ' * max(1, 14 - len(name))}{text}\n" for name, text in COMMANDS.items())
    parser = Cg3dArgumentParser(
        prog="cg3d",
        formatter_class=HelpFormatter,
        usage="%(prog)s [-h] BIDS_DIR OUTPUT_DIR {participant,group} [options]\n"
        "       %(prog)s COMMAND [options]   (COMMAND: " + ", ".join(COMMANDS) + ")",
        description=(
            f"cg3d {__version__}: training-free zero-shot anomaly detection in 3D brain MRI "
            "(CoDeGraph3D) as a BIDS-App.\n\n"
            "  cg3d /bids /out group            score every T1w and T2w image of the dataset\n"
            "  cg3d /bids /out participant --participant-label 01   preprocess + tokens of one subject\n\n"
            f"commands (each has its own --help):\n{commands}\n"
            "Defaults marked [paper] come from the CoDeGraph3D paper, [MuSc code] from MuSc's official "
            "code, [method.md] from cg3d's method specification (docs/method.md)."
        ),
        epilog="Exit codes follow BEP027: 0 ok, 1 failure, 16 invalid BIDS, 17 unknown level, 18 "
        "filters matched nothing, 64 usage, 65 bad data, 66 missing input, 69 GPU unavailable, "
        "73 cannot create output, 74 I/O error, 75 temporary failure (GPU out of memory, or the output folder is "
        "in use by another run), 129/130/143 stopped by SIGHUP/SIGINT/SIGTERM (rerun to resume).",
    )
    specs = [spec for _section, spec in iter_options()]
    for spec in specs:
        if spec.option.kind == "positional":
            _add(parser, spec)
    parser.add_argument("--version", action="version", version=f"cg3d v{__version__}")
    parser.add_argument("--bids-exec-spec", action="store_true",
                        help="print the Boutiques descriptor (BEP027) and exit (no positionals needed)")
    groups: dict[str, Any] = {}
    for spec in specs:
        if spec.option.kind == "positional":
            continue
        group = groups.get(spec.option.group)
        if group is None:
            group = groups[spec.option.group] = parser.add_argument_group(spec.option.group)
        _add(group, spec)
        if spec.name == "work_dir":
            group.add_argument("--config-file", dest="config_file", type=existing_file, metavar="FILE",
                               help="a logs/config-*.toml of a previous run; options given on the "
                               "command line win")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; exit 64 on usage errors and 17 on an unknown level."""
    from ..bids.discovery import parse_labels

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bids_exec_spec:
        return args
    missing = [name for name in ("bids_dir", "output_dir", "analysis_level") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.analysis_level not in LEVELS:
        parser.print_usage(sys.stderr)
        parser.exit(EXIT_UNKNOWN_LEVEL, f"cg3d: error: unknown analysis level {args.analysis_level!r}; "
                    f"choose from {', '.join(LEVELS)}\n")
    if args.stage != "all" and args.analysis_level != "group":
        parser.error(f"--stage {args.stage} is a step of the group level (cg3d BIDS OUT group --stage ...)")
    if args.stage in ("score", "rescore") and not args.shard:
        parser.error(f"--stage {args.stage} needs --shard i/n (e.g. --shard 1/1 for one process)")
    if args.shard and args.stage not in ("score", "rescore"):
        parser.error("--shard goes with --stage score or --stage rescore")
    if args.shard:
        from ..stages.shards import parse_shard

        try:
            parse_shard(args.shard)
        except UsageError as exc:
            parser.error(exc.render())
    try:
        args.participant_label = parse_labels(args.participant_label, "sub-")
        args.session_label = parse_labels(args.session_label, "ses-")
    except UsageError as exc:
        parser.error(exc.render())
    return args


# ------------------------------------------------------------------------------------------------
def explicit_options(argv: Sequence[str]) -> set[str]:
    """Names (dests) of the options given on the command line (they override ``--config-file``)."""
    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        action.default = argparse.SUPPRESS
    try:
        namespace, _ = parser.parse_known_args(list(argv))
    except SystemExit:
        return set()
    return set(vars(namespace))


def settings_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Settings:
    """The run's :class:`Settings` from parsed arguments, over ``--config-file`` when given.

    Options given on the command line (and the positionals) win over the file; run facts
    (:class:`~cg3d_bids.settings.RunInfo`) are never taken from the file.
    """
    values = {name: {} for name in SECTIONS if name != "run"}
    for section, spec in iter_options():
        value = getattr(args, spec.name)
        if isinstance(value, list):
            value = tuple(value)
        values[section][spec.name] = value
    if args.config_file:
        try:
            saved = Settings.load(args.config_file)
        except (ValueError, OSError) as exc:
            raise UsageError(f"--config-file cannot be read: {exc}", path=args.config_file,
                             fix="give a logs/config-<run>.toml written by cg3d") from exc
        given = explicit_options(argv) | {"bids_dir", "output_dir", "analysis_level"}
        for section in values:
            for f in dataclasses.fields(getattr(saved, section)):
                if f.name not in given and f.name in values[section]:
                    values[section][f.name] = getattr(getattr(saved, section), f.name)
        if "bids_filter_file" not in given and saved.inputs.bids_filters is not None:
            values["inputs"]["bids_filters"] = saved.inputs.bids_filters
    inputs = values["inputs"]
    if inputs.get("bids_filter_file") and "bids_filters" not in inputs:
        inputs["bids_filters"] = read_filter_file(Path(inputs["bids_filter_file"]))
    return Settings(inputs=InputSettings(**inputs), method=MethodSettings(**values["method"]),
                    execution=ExecutionSettings(**values["execution"]))


def read_filter_file(path: Path) -> dict[str, Any]:
    """The JSON object of ``--bids-filter-file``."""
    try:
        filters = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--bids-filter-file is not valid JSON: {exc}", path=path,
                         fix='write a JSON object such as {"t2w": {"acquisition": "axial"}}') from exc
    if not isinstance(filters, dict):
        raise UsageError("--bids-filter-file must hold a JSON object", path=path,
                         fix='e.g. {"t1w": {"reconstruction": null}}')
    return filters
