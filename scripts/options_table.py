#!/usr/bin/env python3
"""Print the Markdown table of every ``cg3d`` option, its default and its source (for README.md)."""

from __future__ import annotations

import argparse

from cg3d_bids.cli.parser import build_parser


def options_table() -> str:
    rows = ["| option | default | what it does (and where the default comes from) |", "| --- | --- | --- |"]
    for action in build_parser()._actions:  # noqa: SLF001
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{opt}`" for opt in action.option_strings)
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or default == {}:
            default_text = "—"
        elif isinstance(default, list):
            default_text = " ".join(map(str, default))
        else:
            default_text = str(default)
        rows.append(f"| {names} | {default_text} | {(action.help or '').replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table())
