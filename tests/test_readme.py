"""README.md: its Python examples run, and every command-line option is documented in it."""

from __future__ import annotations

import pytest

import importlib.util
import re
from pathlib import Path

from cg3d_bids.cli.parser import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own documentation


def test_every_option_documented_with_default():
    text = README.read_text()
    for action in build_parser()._actions:  # noqa: SLF001
        for option in action.option_strings:
            assert f"`{option}`" in text, option


def test_options_table_is_current():
    """The README's table is ``scripts/options_table.py``'s output: defaults cannot drift."""
    spec = importlib.util.spec_from_file_location("options_table", README.parent / "scripts" / "options_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.options_table() in README.read_text(), "rerun: python scripts/options_table.py"


def test_setup_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install torch==2.14.1 torchvision==0.29.1" in text
    assert "torch==2.14.1 torchvision==0.29.1" in ci and '.[test,skullstrip]' in ci
    assert "python -m pytest" in text and "cg3d demo" in text
