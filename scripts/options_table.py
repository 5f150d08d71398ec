#!/usr/bin/env python3
"""Print the Markdown table of every ``cg3d`` option, its default and its source (for README.md).

Generated from the settings declarations (:mod:`cg3d_bids.settings`), like the parser and the
Boutiques descriptor; tests/test_readme.py checks that README.md holds this exact table.
"""

from __future__ import annotations

from cg3d_bids.settings import iter_options


def default_text(spec) -> str:
    """The default as a user would type it: ``off`` for flags, ``—`` when unset, zeros shown."""
    opt = spec.option
    if opt.default_text is not None:
        return opt.default_text
    if opt.kind == "flag":
        return "off"
    value = spec.default
    if value is None or value == {} or value == ():
        return "—"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def options_table() -> str:
    rows = ["| option | default | what it does (and where the default comes from) |", "| --- | --- | --- |",
            "| `-h`, `--help` | — | show the help and exit |",
            "| `--version` | — | show the version and exit |",
            "| `--bids-exec-spec` | — | print the Boutiques descriptor (BEP027) and exit (no positionals needed) |"]
    for _section, spec in iter_options():
        opt = spec.option
        if opt.kind == "positional":
            continue
        names = ", ".join(f"`{flag}`" for flag in opt.flags)
        rows.append(f"| {names} | {default_text(spec)} | {opt.help.replace('|', '/')} |")
        if spec.name == "work_dir":
            rows.append("| `--config-file` | — | a logs/config-*.toml of a previous run; options given on the "
                        "command line win |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table())
