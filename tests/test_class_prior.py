"""mmllm.class_prior: the training shares a model answers under, and Bayes' rule to another catalog's."""

from __future__ import annotations

import json

import pytest
import torch

from mmllm.class_prior import ClassPrior, ClassPriorError, category_counts, target_shares

from listings import toy_row, write_catalog

CLASSES = ["a", "b", "c"]


def test_counts_list_every_class_in_order():
    labels = [{"category": "b"}, {"category": "b"}, None, {"category": "x"}, {"attributes": {}}]
    assert list(category_counts(labels, CLASSES).items()) == [("a", 0), ("b", 2), ("c", 0)]


def test_uniform_target_reweights_by_the_inverse_training_share():
    prior = ClassPrior.for_model("uniform", CLASSES, {"a": 7, "b": 1, "c": 1}, "m")  # shares 8/12, 2/12, 2/12
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4]])
    moved = prior.apply(p)
    expected = p / torch.tensor([8.0, 2.0, 2.0])
    assert torch.allclose(moved, expected / expected.sum(-1, keepdim=True))
    assert torch.allclose(moved.sum(-1), torch.ones(2))
    assert moved[0].argmax() != p[0].argmax()  # the common class no longer wins on half the evidence


def test_a_balanced_model_and_the_training_shares_themselves_change_nothing():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    balanced = ClassPrior.for_model("uniform", CLASSES, {"a": 7, "b": 1, "c": 1}, "m", correction=1.0)
    assert torch.allclose(balanced.apply(p), p)  # prior_correction 1 already answers under uniform shares


def test_the_target_catalog_is_counted_and_what_is_left_out_is_named(tmp_path):
    def row(folder, i):
        made = toy_row()(folder, i)
        category = ["Games > Chess", "Games > Chess", "Garden > Spades"][i] if i < 3 else None
        return {**made, "label": {**made["label"], "category": category}} if category else \
            {k: v for k, v in made.items() if k != "label"}

    path = write_catalog(tmp_path / "t", 4, row)
    with path.open("a") as f:
        f.write(json.dumps({"id": "broken", "title": 5}) + "\n")
    classes = ["Games > Chess", "Outdoor > Kites"]
    shares, note = target_shares(str(path), classes)
    assert shares == pytest.approx([3 / 4, 1 / 4])  # (2 + 1) / (2 + 2), (0 + 1) / (2 + 2)
    assert note.startswith("the gold category shares of 2 rows of catalog.jsonl")
    assert "1 bad rows (first:" in note and "broken" in note
    assert "1 without a gold category" in note
    assert "1 with a category outside the model's taxonomy (e.g. 'Garden > Spades', 1 rows, first id item-2)" in note


def test_unusable_priors_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ClassPriorError, match="no such file"):
        target_shares(str(tmp_path / "missing.jsonl"), CLASSES)
    with pytest.raises(ClassPriorError, match="records no training category counts.*retrain"):
        ClassPrior.for_model("uniform", CLASSES, None, "old-folder")
    with pytest.raises(ClassPriorError, match="lack 1 of its categories"):
        ClassPrior.for_model("uniform", CLASSES, {"a": 1, "b": 1}, "m")


def test_categories_count_as_training_spells_them_and_damaged_counts_are_refused(tmp_path):
    classes = ["Games > Chess", "Outdoor > Kites"]
    labels = [{"category": "games  >  CHESS"}, {"category": "Games > Chess"}, {"category": "outdoor>kites"}]
    assert category_counts(labels, classes) == {"Games > Chess": 2, "Outdoor > Kites": 1}
    catalog = tmp_path / "old.jsonl"
    catalog.write_text("".join(json.dumps({"id": f"r{i}", "title": "t", "label": {"category": c["category"]}}) + "\n"
                               for i, c in enumerate(labels)))
    shares, note = target_shares(str(catalog), classes)
    assert shares == [3 / 5, 2 / 5] and "outside" not in note
    for bad in (-1, "3", 2.5):
        with pytest.raises(ClassPriorError, match="not a count of rows; the folder is damaged"):
            ClassPrior.for_model("uniform", classes, {"Games > Chess": bad, "Outdoor > Kites": 1}, "M")
