"""benchmarks/versus_bag_of_words.py's baseline file: `make run` fits the bag of words in the background
while the recipe trains and the last step reads it; a file from other rows or labels is refused."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("versus", ROOT / "benchmarks" / "versus_bag_of_words.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_baseline_is_read_only_for_the_rows_labels_and_search_it_was_fitted_on(tmp_path):
    versus = _module()
    train = [{"id": "a", "title": "red kite", "label": {"category": "Kites"}},
             {"id": "b", "title": "1000 piece jigsaw", "label": {"category": "Jigsaws"}}]
    dev = [{"id": "c", "title": "delta kite", "label": {"category": "Kites"}}]
    fingerprint = versus.rows_fingerprint(train, dev, ["category"], True)
    path = tmp_path / "bow.json"
    path.write_text(json.dumps({"rows_sha256": fingerprint, "bag_of_words": {"category": {"accuracy": 1.0}},
                                "bag_of_words_published": {}}))
    assert versus.read_baseline(path, fingerprint) == ({"category": {"accuracy": 1.0}}, {})
    changed = [dict(dev[0], title="delta kite, 30 m line")]
    for other in (versus.rows_fingerprint(train, changed, ["category"], True),  # a dev row's text
                  versus.rows_fingerprint(train, dev, ["category", "brand"], True),  # the labels
                  versus.rows_fingerprint(train, dev, ["category"], False)):  # C searched by CV, not fixed
        assert other != fingerprint
        with pytest.raises(SystemExit, match="fitted on other rows, labels or C search"):
            versus.read_baseline(path, other)
    with pytest.raises(SystemExit, match=r"cannot read the bag-of-words baseline .*--skip-recipe"):
        versus.read_baseline(tmp_path / "missing.json", fingerprint)
