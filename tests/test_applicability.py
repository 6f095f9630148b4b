"""Attribute applicability: whether a listing has a value for an attribute at all, from its words
(a bag of words fitted on the training rows) or from the model (its heads' "not stated" class), and
how the grounding layer uses it to tell a stated value the catalog records from one it does not."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mmllm.applicability import APPLICABILITY_FILE, APPLICABILITY_WEIGHTS, Applicability, fit_applicability
from mmllm.bag_of_words import TfidfConfig
from mmllm.catalog import Listing
from mmllm.grounding import GroundingConfig, fit_grounder
from mmllm.models.heads import HeadSpec, NOT_STATED, prediction_record
from mmllm.schema import LabelSchema

SCHEMA = {
    "taxonomy": ["Toys > Jigsaws", "Toys > Crafts"],
    "attributes": {
        "pieces": {"type": "integer", "minimum": 1, "maximum": 5000,
                   "evidence": {"text": [{"name": "n_pieces", "pattern": "(?P<value>[0-9]+) pieces"}]}},
    },
}
ANIMALS = ["tiger", "horse", "owl", "whale", "fox", "panda", "eagle", "otter"]
COLOURS = ["red", "blue", "green", "pink", "gold", "silver", "black", "white"]


def _rows(n: int, seed: int) -> list[Listing]:
    """Jigsaws and craft kits, every title saying "N pieces". The catalog records a piece count for
    jigsaws (the gold is the title's N) and none for craft kits (gold null): the evidence alone, the
    same pattern in the same place, cannot tell them apart; what kind of product it is can."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pieces = rng.choice([100, 250, 500, 1000])
        if i % 2 == 0:
            title = f"{rng.choice(ANIMALS).title()} jigsaw puzzle, {pieces} pieces"
            category, gold = "Toys > Jigsaws", pieces
        else:
            title = f"{rng.choice(COLOURS).title()} craft beads kit, {pieces} pieces"
            category, gold = "Toys > Crafts", None
        label = {"category": category, "attributes": {"pieces": gold}}
        rows.append(Listing(f"s{seed}-{i}", title, "", {}, label=label))
    return rows


def _records(rows: list[Listing], applies: bool) -> list[dict]:
    """A model that never answers a piece count (its argmax is "not stated"); with ``applies`` its
    heads say how likely a value is at all: high for jigsaws, low for craft kits."""
    out = []
    for row in rows:
        record = {"category": row.label["category"], "status": "ok", "attributes": {"pieces": None},
                  "attribute_confidence": {"pieces": 0.6}}
        if applies:
            record["attribute_applies"] = {"pieces": 0.45 if "jigsaw" in row.title else 0.05}
        out.append(record)
    return out


def _published(grounder, rows: list[Listing], records: list[dict]) -> tuple[int, int, int]:
    """(jigsaws answered right, craft kits answered at all, jigsaws)."""
    out = [grounder.ground(r, rec) for r, rec in zip(rows, records)]
    right = sum(o["attributes"]["pieces"] == r.label["attributes"]["pieces"] for r, o in zip(rows, out)
                if "jigsaw" in r.title)
    crafts = sum(o["attributes"]["pieces"] is not None for r, o in zip(rows, out) if "jigsaw" not in r.title)
    return right, crafts, sum("jigsaw" in r.title for r in rows)


@pytest.mark.parametrize("source", ["words", "model"])
def test_the_kind_of_product_decides_whether_a_stated_count_is_published(source):
    schema = LabelSchema.from_dict(SCHEMA)
    train, dev, test = _rows(200, 1), _rows(120, 2), _rows(100, 3)
    with_model = source == "model"
    cfg = GroundingConfig(precision=0.9, applicability=source == "words")
    grounder, _ = fit_grounder(schema, train, dev, _records(dev, with_model), cfg)
    right, crafts, jigsaws = _published(grounder, test, _records(test, with_model))
    assert (right, crafts) == (jigsaws, 0)  # every jigsaw's count, no craft kit's
    ev = grounder.ground(test[0], _records(test[:1], with_model)[0])["evidence"]["pieces"]
    assert (ev["source"], ev["key"]) == ("title", "n_pieces") and test[0].title[slice(*ev["span"])].endswith("pieces")

    # neither signal: half of the stated counts are right, the 0.9 target publishes none of them
    blind, _ = fit_grounder(schema, train, dev, _records(dev, False), GroundingConfig(precision=0.9,
                                                                                       applicability=False))
    assert _published(blind, test, _records(test, False))[:2] == (0, 0)


def test_out_of_fold_probabilities_never_see_their_own_row():
    """A word that occurs in one positive row only is in no other fold: that row's out-of-fold probability
    knows nothing of it, while the fit on every row does."""
    rows = [Listing(f"r{i}", f"plain toy number {i % 7}") for i in range(60)]
    rows.append(Listing("odd", "plain toy zebracorn zebracorn"))
    rows.append(Listing("odd2", "plain toy zebracorn"))
    gold = [i % 3 == 0 for i in range(60)] + [True, True]
    model, oof = fit_applicability(rows, {"a": gold}, TfidfConfig(min_df=2), c=10.0, folds=5)
    full = model.predict(rows)["a"]
    assert full[-1] > 0.6 and full[-2] > 0.6  # in-sample, the rare word decides
    assert len(oof["a"]) == len(rows) and all(0 < p < 1 for p in oof["a"])
    # out of fold, each of the two rows gets from "zebracorn" only what the other row taught (or nothing)
    assert oof["a"][-1] < full[-1] and oof["a"][-2] < full[-2]


def test_an_attribute_with_too_few_rows_on_one_side_is_left_out():
    rows = [Listing(f"r{i}", f"toy {i}") for i in range(30)]
    model, oof = fit_applicability(rows, {"rare": [i < 3 for i in range(30)], "ok": [i % 2 == 0 for i in range(30)]},
                                   TfidfConfig(min_df=1), min_rows=5)
    assert set(model.weights) == set(oof) == {"ok"}


def test_the_model_round_trips_through_its_two_files(tmp_path):
    rows = _rows(80, 5)
    gold = {"pieces": [r.label["attributes"]["pieces"] is not None for r in rows]}
    model, _ = fit_applicability(rows, gold, TfidfConfig())
    model.save(tmp_path)
    again = Applicability.load(tmp_path)
    assert again.predict(rows)["pieces"] == pytest.approx(model.predict(rows)["pieces"], abs=1e-6)
    meta = json.loads((tmp_path / APPLICABILITY_FILE).read_text())
    meta["attributes"] = ["pieces", "extra"]  # weights for one attribute, names for two
    (tmp_path / APPLICABILITY_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{APPLICABILITY_FILE}: not an applicability model: weights"):
        Applicability.load(tmp_path)
    (tmp_path / APPLICABILITY_WEIGHTS).unlink()
    with pytest.raises(ValueError, match="not an applicability model"):
        Applicability.load(tmp_path)


def test_heads_that_abstain_say_how_likely_a_value_is():
    """``attribute_applies`` = 1 - P(not stated), for the heads trained on gold nulls only."""
    schema = LabelSchema.from_dict({"taxonomy": ["Toys > Jigsaws"],
                                    "attributes": {"pieces": {"type": "integer", "minimum": 1, "maximum": 5000},
                                                   "boxed": {"type": "boolean"}}})
    specs = [HeadSpec("category", "softmax", ["Toys > Jigsaws"]),
             HeadSpec("pieces", "softmax", [NOT_STATED, "100", "500"], values=[None, 100, 500], abstains=True),
             HeadSpec("boxed", "softmax", [NOT_STATED, "False", "True"], values=[None, False, True], abstains=False)]
    probs = {"category": torch.tensor([[1.0]]), "pieces": torch.tensor([[0.7, 0.2, 0.1]]),
             "boxed": torch.tensor([[0.1, 0.3, 0.6]])}
    record = prediction_record(specs, probs, 0, schema)
    assert record["attributes"]["pieces"] is None
    assert record["attribute_applies"] == {"pieces": pytest.approx(0.3)}


def test_a_grounder_saves_and_reloads_its_applicability_model(tmp_path):
    """The three files are written, the reloaded grounder grounds every row the same, and a damaged
    weights file is an error naming it."""
    from mmllm.grounding import GROUNDING_FILES, Grounder

    schema = LabelSchema.from_dict(SCHEMA)
    train, dev, test = _rows(200, 1), _rows(120, 2), _rows(40, 3)
    grounder, _ = fit_grounder(schema, train, dev, _records(dev, False), GroundingConfig(precision=0.9))
    assert grounder.applicability is not None and "pieces" in grounder.applicability.weights
    grounder.save(tmp_path)
    assert all((tmp_path / name).is_file() for name in GROUNDING_FILES)
    again = Grounder.load(tmp_path, schema)
    records = _records(test, False)
    assert [again.ground(r, rec) for r, rec in zip(test, records)] == [grounder.ground(r, rec)
                                                                       for r, rec in zip(test, records)]
    (tmp_path / APPLICABILITY_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=APPLICABILITY_WEIGHTS):
        Grounder.load(tmp_path, schema)
