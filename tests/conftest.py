"""Shared test fixtures. The whole suite runs offline: nothing may reach the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any test module imports transformers, so every from_pretrained stays local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A function `get(arch="qwen2_vl") -> Path` to a tiny random checkpoint (seed 0), built once per session.

    The folder is shared by every test in the session: copy it before changing anything in it.
    """
    from mmllm.tiny import build_tiny_checkpoint

    built: dict[str, Path] = {}

    def get(arch: str = "qwen2_vl") -> Path:
        if arch not in built:
            built[arch] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, seed=0)
        return built[arch]

    return get
