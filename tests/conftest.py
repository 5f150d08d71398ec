"""Test session set-up: never touch the network (the brief's rule for every test)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads the variable once, at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
