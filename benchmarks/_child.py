"""Run one measurement of a benchmark script in a fresh Python process (its own peak memory, no
warm caches) and read back the JSON it prints on its last ``RESULT `` line."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_child(script: str, child: str, options: list[str], **extra: Any) -> dict:
    """``python script --child child *options --key value ...``; its result, or SystemExit with its stderr."""
    cmd = [sys.executable, script, "--child", child, *options]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {child} failed:\n{out.stderr[-3000:]}")
    line = [row for row in out.stdout.splitlines() if row.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
