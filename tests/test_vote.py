"""The vote on each attribute head (mmllm/models/fusion/vote.py): the weighted mean, the grid over the
simplex, the held-out choice, the hash split, and the neighbours' vote on attribute heads (anchor.py)."""

from __future__ import annotations

import pytest
import torch

from mmllm.models.fusion.anchor import Anchor, AnchorConfig
from mmllm.models.fusion.vote import VoteConfig, choose, fit_weights, holdout_split, log_loss, mix, simplex


def test_mix_is_the_weighted_mean_and_a_zero_weight_drops_a_member():
    a, b = torch.tensor([[0.8, 0.2]]), torch.tensor([[0.2, 0.8]])
    assert torch.allclose(mix({"heads": a, "lexicon": b}), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(mix({"heads": a, "lexicon": b}, {"heads": 0.25, "lexicon": 0.75}), torch.tensor([[0.35, 0.65]]))
    assert torch.allclose(mix({"heads": a, "lexicon": b}, {"heads": 0.0, "lexicon": 1.0}), b)
    # weights for members that are not there (a head the lexical member could not fit) renormalize over the rest
    assert torch.allclose(mix({"heads": a}, {"heads": 0.3, "lexicon": 0.7}), a)
    # all the present members weighted 0: the plain mean rather than a division by zero
    assert torch.allclose(mix({"heads": a, "lexicon": b}, {"neighbours": 1.0}), torch.tensor([[0.5, 0.5]]))


def test_simplex_grid_covers_every_point_once():
    points = simplex(["heads", "lexicon", "neighbours"], 0.5)
    assert len(points) == 6  # (2 + 2 choose 2)
    assert all(abs(sum(p.values()) - 1) < 1e-9 for p in points)
    assert {tuple(p.values()) for p in points} == {(0, 0, 1), (0, 0.5, 0.5), (0, 1, 0), (0.5, 0, 0.5), (0.5, 0.5, 0),
                                                   (1, 0, 0)}
    assert len(simplex(["heads", "lexicon", "neighbours"], 0.1)) == 66
    assert len(simplex(["heads", "lexicon"], 0.25)) == 5


def test_fit_weights_finds_the_member_that_knows_and_the_mix_when_both_know_half():
    target = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    right = torch.nn.functional.one_hot(target, 2).float() * 0.9 + 0.05
    wrong = 1 - right
    flat = torch.full((8, 2), 0.5)
    assert fit_weights({"heads": wrong, "lexicon": right, "neighbours": flat}, target, 0.1) == {
        "heads": 0.0, "lexicon": 1.0, "neighbours": 0.0}
    # each member right on its own half, sure of itself: the log-loss wants both
    first = torch.where(torch.arange(8)[:, None] < 4, right, flat)
    second = torch.where(torch.arange(8)[:, None] >= 4, right, flat)
    weights = fit_weights({"heads": first, "lexicon": second}, target, 0.1)
    assert weights == {"heads": 0.5, "lexicon": 0.5}
    # by hand: the log-loss of the chosen mixture is what log_loss says
    assert log_loss(mix({"heads": first, "lexicon": second}, weights), target) == pytest.approx(
        -torch.log(torch.tensor(0.5 * 0.95 + 0.5 * 0.5)).item(), abs=1e-6)


def test_within_one_standard_error_the_weights_stay_nearest_equal():
    """Two members of about the same skill, each sure on different rows: on these 200 rows the log-loss
    prefers one of them a little, by less than the standard error of the paired difference, so
    ``within_one_se`` keeps equal weights where ``best`` leans on that member; a member that is clearly
    better is chosen by both rules."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (200,), generator=g)
    onehot = torch.nn.functional.one_hot(target, 2).float()

    def member(sure: torch.Tensor) -> torch.Tensor:  # 0.9 on the right class where sure, else 0.6
        p = torch.where(sure, 0.9, 0.6)[:, None]
        return onehot * p + (1 - onehot) * (1 - p)

    a, b = member(torch.rand(200, generator=g) < 0.55), member(torch.rand(200, generator=g) < 0.45)
    members = {"heads": a, "lexicon": b}
    best = fit_weights(members, target, 0.1, "best")
    kept = fit_weights(members, target, 0.1, "within_one_se")
    assert best != {"heads": 0.5, "lexicon": 0.5} and kept == {"heads": 0.5, "lexicon": 0.5}
    # by hand: equal weights are within one paired standard error of the best point's log-loss
    lost = [-torch.log(mix(members, w)[torch.arange(200), target]) for w in (best, kept)]
    gap = lost[1] - lost[0]
    assert 0 < float(gap.mean()) <= float(gap.std() / 200 ** 0.5)
    clear = member(torch.ones(200, dtype=torch.bool))  # sure and right on every row
    assert fit_weights({"heads": a, "lexicon": clear}, target, 0.1, "within_one_se") == {"heads": 0.0, "lexicon": 1.0}


def test_choose_skips_heads_with_too_few_stated_rows_and_reports_both_scores():
    target = torch.tensor([0, 1] * 30 + [-100] * 10)
    right = torch.nn.functional.one_hot(target.clamp_min(0), 2).float() * 0.8 + 0.1
    members = {"price_band": {"heads": 1 - right, "lexicon": right},
               "brand": {"heads": right[:20], "lexicon": right[:20]}}
    fit = choose(members, {"price_band": target, "brand": target[:20]}, VoteConfig(min_rows=40))
    assert set(fit.weights) == {"price_band"}  # brand: 20 stated rows < 40, equal weights
    assert fit.weights["price_band"] == {"heads": 0.0, "lexicon": 1.0}
    score = fit.scores["price_band"]
    assert score["rows"] == 60 and score["accuracy"] == 1.0 and score["accuracy_equal"] == 0.5
    assert score["log_loss"] == pytest.approx(-torch.log(torch.tensor(0.9)).item(), abs=1e-4)


def test_holdout_split_is_a_hash_of_the_id_not_of_the_order():
    ids = [f"row-{i}" for i in range(2000)]
    kept, held = holdout_split(ids, 0.25)
    assert sorted(kept + held) == list(range(2000)) and 400 < len(held) < 600
    held_ids = {ids[i] for i in held}
    reversed_ids = ids[::-1]
    _, held_again = holdout_split(reversed_ids, 0.25)
    assert {reversed_ids[i] for i in held_again} == held_ids


def test_vote_config_is_checked():
    with pytest.raises(ValueError, match="vote.members must include heads"):
        VoteConfig(members=["lexicon"])
    with pytest.raises(ValueError, match="vote.members"):
        VoteConfig(members=["heads", "names"])
    with pytest.raises(ValueError, match="vote.holdout"):
        VoteConfig(holdout=1.0)
    with pytest.raises(ValueError, match="vote.step"):
        VoteConfig(step=0.3)
    from mmllm.finetune import load_recipe_config

    from helpers import ROOT

    cfg = load_recipe_config(ROOT / "finetune/fusion_minilm_cpu.yaml", ["vote.weights=equal", "vote.holdout=0.2"])
    assert cfg.vote.weights == "equal" and cfg.vote.holdout == 0.2
    with pytest.raises(ValueError, match="vote.min_rows"):
        load_recipe_config(ROOT / "finetune/fusion_minilm_cpu.yaml", ["vote.min_rows=0"])
    assert load_recipe_config(ROOT / "finetune/fusion_minilm_cpu.yaml", []).vote.select == "within_one_se"
    assert load_recipe_config(ROOT / "finetune/fusion_minilm_cpu.yaml", ["vote.select=best"]).vote.select == "best"
    with pytest.raises(ValueError, match="vote.select"):
        load_recipe_config(ROOT / "finetune/fusion_minilm_cpu.yaml", ["vote.select=median"])


def test_neighbours_vote_on_attribute_heads_and_a_held_out_row_never_sees_itself():
    cfg = AnchorConfig(epochs=1, neighbours=2, neighbour_temperature=0.05)
    anchor = Anchor(cfg, classes=2, dim=2, memory_rows=4, views=["text"], attribute_classes={"band": 3})
    anchor.memory.copy_(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]))
    anchor.memory_labels.copy_(torch.tensor([0, 0, 1, 1]))
    anchor.memory_targets[:, 0] = torch.tensor([2, 1, -100, 0])  # row 2 has no value: it does not vote
    query = torch.tensor([[1.0, 0.0]])  # memory row 0 itself
    idx, weights = anchor.nearest(query)
    assert idx.tolist() == [[0, 1]]
    assert weights[0].tolist() == pytest.approx([1.0, float(torch.exp(torch.tensor(-0.2 / 0.05)))], rel=1e-5)
    votes = anchor.attribute_votes((idx, weights))["band"][0]
    w1 = float(torch.exp(torch.tensor(-0.2 / 0.05)))
    assert votes.tolist() == pytest.approx([0.0, w1 / (1 + w1), 1 / (1 + w1)], rel=1e-5)
    # held out: row 0 may not vote for itself; its neighbours are rows 1 and 2, and row 2 has no value
    idx, weights = anchor.nearest(query, exclude=torch.tensor([[True, False, False, False]]))
    assert idx.tolist() == [[1, 2]]
    assert anchor.attribute_votes((idx, weights))["band"][0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    # no neighbour with a value at all: a uniform vote, not a division by zero
    idx, weights = anchor.nearest(query, exclude=torch.tensor([[True, True, False, True]]))
    assert anchor.attribute_votes((idx, weights))["band"][0].tolist() == pytest.approx([1 / 3] * 3)
    # the settings a loaded model rebuilds the buffers from
    assert anchor.settings()["attribute_classes"] == {"band": 3}


@pytest.mark.slow
def test_the_side_fit_reads_only_the_rows_that_label_the_attributes(tmp_path, capsys):
    """A large catalog labelled for the category only (the 10k title-level rows beside a shop's 691) must
    not enter the vote's side fit: those rows are neither scored nor teach an attribute, and on 8,861 rows
    they made the fit 29 s instead of 3. The held-out rows and the rows fitted on are the labelled ones, the
    same split as without the category-only rows. With ``lexicon.category: false`` the lexical member
    fits the attribute heads only (the costly category regression left out) and the model still labels."""
    import gzip
    import json
    import re
    from pathlib import Path

    from mmllm.finetune import finetune, load_recipe_config

    from helpers import ROOT

    labelled = (ROOT / "examples/amazon_uk_toys/train.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    with gzip.open(ROOT / "examples/amazon_uk_toys_10k/listings.jsonl.gz", "rt", encoding="utf-8") as f:
        title_level = [line for line, _ in zip(f, range(30))]
    assert all("attributes" not in (json.loads(line).get("label") or {}) for line in title_level)
    both = tmp_path / "train.jsonl"
    both.write_text("\n".join(labelled + [line.strip() for line in title_level]) + "\n", encoding="utf-8")

    def vote_line(train: str, *extra: str) -> str:
        settings = [f"data.train={train}", "data.max_dev_rows=12", "train.epochs=1", "train.batch_size=16",
                    "fusion.max_text_tokens=32", "eval.loss_rows=12", "anchor.epochs=0", "grounding.enabled=false",
                    "lexicon.enabled=true", "vote.min_rows=3", f"train.output_dir={tmp_path / (Path(train).stem + '-model')}",
                    *extra]
        finetune(load_recipe_config(ROOT / "finetune/fusion_minilm_cpu.yaml", settings))
        printed = capsys.readouterr().out
        assert ("category C=" in printed) == ("lexicon.category=false" not in extra)
        return next(line for line in printed.splitlines() if line.startswith("vote: choosing"))

    mixed = vote_line(str(both))
    counts = re.search(r"on (\d+) held-out training rows \(the heads trained on the other (\d+); 30 rows labelled "
                       r"for the category only left out\)", mixed)
    assert counts, mixed
    assert int(counts[1]) + int(counts[2]) == 60
    alone = tmp_path / "alone.jsonl"
    alone.write_text("\n".join(labelled) + "\n", encoding="utf-8")
    assert vote_line(str(alone), "lexicon.category=false") == mixed.split(";")[0] + ")"  # the same split and fit
    model = tmp_path / "alone-model"
    saved = json.loads((model / "fusion.json").read_text())["lexicon"]
    assert "category" not in saved and {"min_age_years", "batteries_included"} <= set(saved)
    from mmllm import model_dir
    from mmllm.catalog import iter_catalog
    from mmllm.images import ImagePolicy

    rows = list(iter_catalog(str(ROOT / "examples/amazon_uk_toys/dev.jsonl")))[:4]
    answers = model_dir.load(model, device="cpu").predict(rows, ImagePolicy(root=ROOT / "examples/amazon_uk_toys"))
    assert [a["status"] for a in answers] == ["ok"] * 4 and all(0 < a["confidence"] <= 1 for a in answers)
