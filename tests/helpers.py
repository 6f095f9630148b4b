"""Paths into the checkout, a benchmark script as a module, and predictions of a model folder reloaded in
a fresh process.

Test modules import these as ``from helpers import ROOT, TOYS_SCHEMA, benchmark_module, reload_in_fresh_process,
require_gradio``
(pytest puts ``tests/`` on ``sys.path``); fixtures live in ``conftest.py``, data in ``listings.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TOYS_SCHEMA = ROOT / "examples" / "toys_schema.yaml"


def benchmark_module(name: str):
    """``benchmarks/NAME.py`` loaded as a module (the folder is not a package), for its functions."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Loads the folder the way the tests do in-process (listings.load_model_dir), so the two sides differ
# only in the process: argv = folder, catalog, image root, row limit ("" for all), options as JSON.
_RELOAD = """
import json, sys
from pathlib import Path
from mmllm.catalog import load_listings
from mmllm.images import ImagePolicy
from listings import load_model_dir
folder, catalog, image_root, limit, options = sys.argv[1:]
rows = load_listings(catalog)[:int(limit) if limit else None]
predictor = load_model_dir(folder, **json.loads(options))
print(json.dumps(predictor.predict(rows, ImagePolicy(root=Path(image_root)))))
"""


def reload_in_fresh_process(model_dir: Path, catalog: Path, *, image_root: Path | None = None, limit: int | None = None,
                            timeout: float = 300, **options: object) -> list[dict]:
    """The records ``model_dir`` predicts for the listings of ``catalog``, loaded and run in a new Python process.

    Nothing of the test process (imported modules, weights in memory) can stand in for a file the
    folder lacks. Images resolve in ``image_root`` (default: the catalog's folder); ``limit`` keeps
    the first rows; ``options`` go to the loader (``device="cpu"``). Returns what ``predict`` gave,
    through JSON, so compare it with ``json.loads(json.dumps(here))``.
    """
    root = Path(image_root) if image_root is not None else Path(catalog).parent.resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(model_dir), str(catalog), str(root), "" if limit is None else str(limit),
         json.dumps(options)],
        capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def require(module: str, extra: str):
    """``import module``, or skip the calling test when the extra that brings it is not installed
    (outside CI only: `make test` installs every extra, so a missing one is a failure there)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            raise
        pytest.skip(f"the {extra!r} extra is not installed: pip install -e '.[{extra}]'")


def require_gradio():
    """The ``gradio`` module, or skip the calling test module when the demo extra is not installed
    (outside CI only: CI installs the extra, so a missing gradio is a failure there)."""
    import pytest

    try:
        import gradio
    except ImportError:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            raise
        pytest.skip("the demo extra is not installed: pip install -e '.[demo]'", allow_module_level=True)
    return gradio
