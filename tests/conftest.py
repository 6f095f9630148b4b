"""Shared test fixtures. The whole suite runs offline: nothing may reach the Hugging Face hub, and
nothing is written to the user's own cache. Shared constants and data writers: helpers.py, listings.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before any test module imports transformers, so every from_pretrained stays local.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray's head would post usage stats a minute into a session
# matplotlib's font cache and config go to a folder of the session's, not under the user's home
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mmllm-tests-mpl-"))


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


@pytest.fixture(autouse=True)
def mmllm_cache(tmp_path_factory, monkeypatch) -> Path:
    """``MMLLM_CACHE`` for every test: one temporary folder per session, so ``tiny:ARCH`` model names
    (finetune/tiny_cpu*.yaml) build their checkpoint once, there, and never under ~/.cache/mmllm.

    Child processes a test starts inherit it through the environment.
    """
    cache = tmp_path_factory.getbasetemp() / "mmllm-cache"
    monkeypatch.setenv("MMLLM_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------- the demo's browser tests
CHROMIUM = Path(os.environ.get("MMLLM_CHROMIUM", "/usr/bin/chromium"))


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium; `make test` installs it when run as root)"
    for module in ("playwright", "gradio", "jsonschema"):
        try:
            __import__(module)
        except ImportError:
            return f"the {module} package is missing (pip install -e '.[dev,demo]')"
    return None


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium through playwright, for the demo's browser tests; without it (or the
    packages) they are skipped locally and FAIL under CI=true."""
    reason = _missing()
    if reason:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"the demo's browser test must run in CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # executable_path: Debian's chromium; `playwright install` would download a browser
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def padded_catalog(tmp_path_factory):
    """Six listings, every other one with a picture, titles of different lengths: batches are padded.
    ``(path, listings)``."""
    from mmllm.catalog import load_listings

    from listings import toy_row, write_catalog

    path = write_catalog(tmp_path_factory.mktemp("cat"), n=6, row=toy_row(text_only_every=2))
    return path, load_listings(path)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """``loaded(arch, attention=None)``: a tiny checkpoint's model (float32, eval) and processor, loaded once
    per test module (with ``attention``: that attention kernel)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mmllm.models.generative import load_processor

    built = {}

    def get(arch: str, attention: str | None = None):
        if (arch, attention) not in built:
            folder = tiny_checkpoint(arch)
            extra = {"attn_implementation": attention} if attention else {}
            built[arch, attention] = (AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32,
                                                                                  **extra).eval(),
                                      load_processor(folder))
        return built[arch, attention]

    return get
