"""The lexical member (mmllm/models/fusion/lexicon.py): TF-IDF by hand, logistic regression and the
squared-hinge SVM that match scikit-learn's objectives, C chosen by cross-validation on the training rows,
the SVM's temperature fitted on out-of-fold scores, and the batch path."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mmllm.catalog import Listing
from mmllm.bag_of_words import Vectorizer, fit_linear_svm, fit_logistic_regression, fit_temperature, listing_text
from mmllm.models.fusion.lexicon import LexiconConfig, fit_lexicon, load_lexicon, save_lexicon

BRANDS = ["hornby", "lego", "corgi"]


def _rows(n: int) -> list[Listing]:
    fillers = ["train set", "city bricks", "die cast bus", "gift box", "starter pack"]
    return [Listing(id=f"r{i}", title=f"{BRANDS[i % 3].title()} {fillers[i % 5]} number {i}") for i in range(n)]


def test_tfidf_by_hand():
    rows = [Listing(id="a", title="red car"), Listing(id="b", title="red red bus"), Listing(id="c", title="blue car")]
    vec = Vectorizer.fit(rows, LexiconConfig(enabled=True, min_df=2))
    assert set(vec.words) == {"red", "car"}  # in two rows or more: min_df 2
    assert set(vec.chars) == {" re", "red", "ed ", " red", "red ", " red ", " ca", "car", "ar ", " car", "car ",
                              " car "}
    ids, weights = vec.row(rows[1])
    got = dict(zip(ids, weights))
    # "red red bus": the words block holds red alone (tf 2, sublinear 1 + ln 2, idf ln(4/3) + 1): unit length
    assert got[vec.words["red"]] == pytest.approx(1.0)
    # the characters block: the six grams of " red " (tf 2 each, the same idf): each 1 / sqrt(6)
    assert [got[vec.chars[g]] for g in (" re", "red", "ed ", " red", "red ", " red ")] == pytest.approx(
        [1 / math.sqrt(6)] * 6)
    assert vec.idf[vec.words["red"]] == pytest.approx(math.log(4 / 3) + 1)
    car = dict(zip(*vec.row(Listing(id="d", title="car red"))))
    # two words with one idf each: ln(4/3) + 1 both, so 1 / sqrt(2) each after normalization
    assert car[vec.words["car"]] == pytest.approx(1 / math.sqrt(2)) == pytest.approx(car[vec.words["red"]])
    again = Vectorizer.from_dict(vec.to_dict())
    assert again.row(rows[1]) == (ids, weights)
    assert listing_text(Listing(id="c", title="Red", description="Bus stop", attributes={"Size": "L"}), 3) == (
        "red bus size l")


def test_regression_learns_the_words_and_cross_validation_picks_c():
    rows = _rows(60)
    vec = Vectorizer.fit(rows, LexiconConfig(enabled=True))
    y = torch.tensor([i % 3 for i in range(60)])
    cfg = LexiconConfig(enabled=True, c=[0.001, 10.0], folds=3)
    lexicon, chosen = fit_lexicon(vec.matrix(rows), {"target_brand": y, "target_none": torch.full((60,), -100)},
                                  [("brand", 3), ("none", 2)], cfg, seed=0, say=lambda text: None)
    assert chosen == {"brand": 10.0} and lexicon.names == ["brand"]  # a head without targets is left out
    test = [Listing(id="t", title=f"{b.title()} something new") for b in BRANDS]
    ids, weights = vec.batch(test)
    logits = lexicon(ids, weights)["brand"]
    assert logits.argmax(-1).tolist() == [0, 1, 2]
    # the batch path is the sparse product
    dense = vec.matrix(test).to_dense() @ lexicon.weight_brand + lexicon.bias_brand
    assert torch.allclose(logits, dense, atol=1e-5)
    # the objective is scikit-learn's: at the optimum the gradient of mean CE + ||W||^2 / (2 C N) vanishes
    w = lexicon.weight_brand.clone().requires_grad_(True)
    b = lexicon.bias_brand.clone().requires_grad_(True)
    x = vec.matrix(rows)
    loss = torch.nn.functional.cross_entropy(torch.sparse.mm(x, w) + b, y) + (w * w).sum() / (2 * 10.0 * 60)
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4


def test_an_abstaining_head_is_a_hurdle_whether_then_which(tmp_path):
    # 90 rows: every third row states no brand (class 0, its title says "unbranded"); the others name theirs
    rows = [Listing(id=f"h{i}", title=(f"{BRANDS[i % 3].title()} set number {i}" if i % 3 else f"unbranded set {i}"))
            for i in range(90)]
    vec = Vectorizer.fit(rows, LexiconConfig(enabled=True))
    y = torch.tensor([0 if i % 3 == 0 else 1 + i % 3 for i in range(90)])  # classes: <not stated>, hornby, lego, corgi
    x = vec.matrix(rows)
    cfg = LexiconConfig(enabled=True)
    lexicon, _ = fit_lexicon(x, {"target_brand": y}, [("brand", 4)], cfg, seed=0, say=lambda text: None,
                             abstaining={"brand"})
    assert lexicon.hurdle == ["brand"]
    probs = lexicon(*vec.batch(rows))["brand"].exp()
    assert torch.allclose(probs.sum(-1), torch.ones(90), atol=1e-5)
    assert (probs.argmax(-1) == y).all()
    # which value: exactly a regression over the values fitted on the rows that state one
    stated = [i for i in range(90) if i % 3]
    w, b = fit_logistic_regression(torch.index_select(x, 0, torch.tensor(stated)).coalesce(), y[stated] - 1, 3, 10.0, cfg.max_iter)
    expected = torch.softmax(x.to_dense() @ w + b, -1)
    assert torch.allclose(probs[:, 1:] / probs[:, 1:].sum(-1, keepdim=True), expected, atol=1e-4)
    # whether: a binary regression on every row (its probability of "not stated" is the sigmoid of column 0)
    gate_w, gate_b = fit_logistic_regression(x, (y > 0).long(), 2, 10.0, cfg.max_iter)
    gate = torch.softmax(x.to_dense() @ gate_w + gate_b, -1)[:, 0]
    assert torch.allclose(probs[:, 0], gate, atol=1e-4)
    # kept and read back as a hurdle; without the abstaining flag (or with hurdle: false) the plain regression
    save_lexicon(tmp_path / "fit", lexicon, vec, {"brand": 10.0})
    again, _, _ = load_lexicon(tmp_path / "fit")
    assert again.hurdle == ["brand"] and torch.allclose(again(*vec.batch(rows))["brand"].exp(), probs)
    plain, _ = fit_lexicon(x, {"target_brand": y}, [("brand", 4)], LexiconConfig(enabled=True, hurdle=False), seed=0,
                           say=lambda text: None, abstaining={"brand"})
    assert plain.hurdle == [] and plain.weight_brand.shape == lexicon.weight_brand.shape


def test_the_svm_reaches_the_squared_hinge_optimum_and_ranks_the_words():
    rows = _rows(60)
    vec = Vectorizer.fit(rows, LexiconConfig(enabled=True))
    x, y = vec.matrix(rows), torch.tensor([i % 3 for i in range(60)])
    w, b = fit_linear_svm(x, y, 3, 1.0, 200)
    # LinearSVC's objective per class (bias not penalized), scaled by 1 / (C N): at the optimum its gradient vanishes
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    sign = torch.where(torch.nn.functional.one_hot(y, 3) > 0, 1.0, -1.0)
    slack = (1 - sign * (torch.sparse.mm(x, w) + b)).clamp_min(0)
    ((slack ** 2).sum() / 60 + (w * w).sum() / (2 * 1.0 * 60)).backward()
    assert float(w.grad.abs().max()) < 1e-4 and float(b.grad.abs().max()) < 1e-4
    test = [Listing(id="t", title=f"{brand.title()} something new") for brand in BRANDS]
    assert (vec.matrix(test).to_dense() @ w + b).argmax(-1).tolist() == [0, 1, 2]


def test_the_fit_in_the_rows_span_is_the_fit_over_every_n_gram(monkeypatch):
    # fewer rows than n-grams: the fit runs over X Q (Q a basis of the rows' span) and must land where the
    # fit over all n-gram weights lands, for both losses; labels with noise, so neither fit is trivial
    import mmllm.bag_of_words as bow

    rows = _rows(60)
    vec = Vectorizer.fit(rows, LexiconConfig(enabled=True))
    x = vec.matrix(rows)
    y = torch.tensor([(i + (i % 7 == 0)) % 3 for i in range(60)])
    assert x.shape[0] < x.shape[1]
    grams = []
    real_gram, in_row_space = bow.row_gram, bow._in_row_space
    monkeypatch.setattr(bow, "row_gram", lambda m, *a: grams.append(m.shape) or real_gram(m, *a))

    def objective(w, b, svm):
        scores = torch.sparse.mm(x, w) + b
        if svm:
            sign = torch.where(torch.nn.functional.one_hot(y, 3) > 0, 1.0, -1.0)
            data = ((1 - sign * scores).clamp_min(0) ** 2).sum() / 60
        else:
            data = torch.nn.functional.cross_entropy(scores, y)
        return float(data + (w * w).sum() / (2 * 1.0 * 60))

    for fit, svm in ((fit_logistic_regression, False), (fit_linear_svm, True)):
        monkeypatch.setattr(bow, "_in_row_space", lambda *a: False)
        w0, b0 = fit(x, y, 3, 1.0, 300)
        monkeypatch.setattr(bow, "_in_row_space", lambda *a: True)
        w1, b1 = fit(x, y, 3, 1.0, 300)
        assert w1.shape == w0.shape and w1.dtype == w0.dtype == torch.float32
        assert objective(w1, b1, svm) == pytest.approx(objective(w0, b0, svm), rel=1e-5)
        s0, s1 = torch.sparse.mm(x, w0) + b0, torch.sparse.mm(x, w1) + b1
        assert float((torch.softmax(s0, -1) - torch.softmax(s1, -1)).abs().max()) < 1e-3
        assert float((w0 - w1).abs().max()) < 1e-2 * float(w0.abs().max())
    assert grams == [x.shape] * 2  # one X X^T per fit in the span
    # which fits go there: many n-grams x classes over few rows, not few classes over thousands of rows
    assert in_row_space(691, 30_858, 151, 100) and not in_row_space(2_840, 42_493, 4, 100)
    assert not in_row_space(5_000, 10 ** 6, 1_000, 100) and not in_row_space(500, 400, 50, 100)


def test_the_temperature_is_the_one_the_labels_were_drawn_at():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20_000, 4, generator=g) * 2
    y = torch.multinomial(torch.softmax(scores / 0.5, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(scores, y) == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(scores * 3, y) == pytest.approx(1.5, rel=0.05)
    # bounded, and scores that say nothing keep T = 1
    assert 0.01 <= fit_temperature(scores * 1e4, y) <= 100 and 0.01 <= fit_temperature(scores * 1e-4, y) <= 100
    assert fit_temperature(torch.zeros(10, 3), torch.arange(10) % 3) == 1.0


def test_a_squared_hinge_lexicon_is_the_svm_divided_by_its_out_of_fold_temperature(tmp_path):
    # 90 rows as in the hurdle test, with a few titles that name no brand on the value rows, so the folds err
    rows = [Listing(id=f"s{i}", title=(f"{BRANDS[i % 3].title()} set number {i}" if i % 3 and i % 7
                                       else f"plain set {i}")) for i in range(90)]
    vec = Vectorizer.fit(rows, LexiconConfig(enabled=True))
    x = vec.matrix(rows)
    y = torch.tensor([0 if i % 3 == 0 else 1 + i % 3 for i in range(90)])
    cfg = LexiconConfig(enabled=True, loss="squared_hinge", c=[1.0], folds=3)
    lexicon, chosen = fit_lexicon(x, {"target_brand": y}, [("brand", 4)], cfg, seed=0, say=lambda text: None,
                                  abstaining={"brand"})
    assert lexicon.hurdle == ["brand"] and chosen == {"brand": 1.0}
    # which value: the SVM on the rows that state one, its margins divided by the temperature of its 3-fold scores
    stated = [i for i in range(90) if i % 3]
    xs, ys = torch.index_select(x, 0, torch.tensor(stated)).coalesce(), y[stated] - 1
    order = list(range(len(stated)))
    random.Random(0).shuffle(order)
    folds = [order[f::3] for f in range(3)]
    scores = torch.zeros(len(stated), 3)
    for held in folds:
        fit_on = [i for part in folds if part is not held for i in part]
        w, b = fit_linear_svm(torch.index_select(xs, 0, torch.tensor(fit_on)).coalesce(), ys[fit_on], 3, 1.0,
                              cfg.max_iter)
        scores[held] = torch.index_select(xs, 0, torch.tensor(held)).coalesce().to_dense() @ w + b
    temperature = fit_temperature(scores, ys)
    assert 0.01 < temperature < 100
    w, b = fit_linear_svm(xs, ys, 3, 1.0, cfg.max_iter)
    assert torch.allclose(lexicon.weight_brand[:, 1:], w / temperature, atol=1e-4)
    assert torch.allclose(lexicon.bias_brand[1:], b / temperature, atol=1e-4)
    # whether: still the logistic gate, a probability by construction
    gate_w, gate_b = fit_logistic_regression(x, (y > 0).long(), 2, 1.0, cfg.max_iter)
    assert torch.allclose(lexicon.weight_brand[:, 0], gate_w[:, 0] - gate_w[:, 1], atol=1e-4)
    probs = lexicon(*vec.batch(rows))["brand"].exp()
    assert torch.allclose(probs.sum(-1), torch.ones(90), atol=1e-5)
    assert lexicon.settled == {"brand": (1.0, pytest.approx(temperature))}
    # a refit on part of the rows (the vote's side fit) takes the C and temperature it is given: no folds
    part = list(range(60))
    again, _ = fit_lexicon(torch.index_select(x, 0, torch.tensor(part)).coalesce(), {"target_brand": y[part]},
                           [("brand", 4)], cfg, seed=0, say=lambda text: None, abstaining={"brand"},
                           settled={"brand": (1.0, 0.25)})
    part_stated = [i for i in part if i % 3]
    w, b = fit_linear_svm(torch.index_select(x, 0, torch.tensor(part_stated)).coalesce(), y[part_stated] - 1, 3, 1.0,
                          cfg.max_iter)
    assert torch.allclose(again.weight_brand[:, 1:], w / 0.25, atol=1e-4) and again.settled == {"brand": (1.0, 0.25)}
    # kept with the fit in the shared cache (a fit cached before the temperature was kept reads as temperature 1)
    save_lexicon(tmp_path / "fit", lexicon, vec, chosen)
    assert load_lexicon(tmp_path / "fit")[0].settled == lexicon.settled
    meta = json.loads((tmp_path / "fit" / "chosen.json").read_text())
    del meta["settled"]
    (tmp_path / "fit" / "chosen.json").write_text(json.dumps(meta))
    assert load_lexicon(tmp_path / "fit")[0].settled == {"brand": (1.0, 1.0)}
    # a plain head (no hurdle) is the calibrated SVM over all its classes
    plain, _ = fit_lexicon(x, {"target_brand": y}, [("brand", 4)], cfg, seed=0, say=lambda text: None)
    assert plain.hurdle == [] and (plain(*vec.batch(rows))["brand"].argmax(-1) == y).float().mean() > 0.9


def test_an_svm_lexicon_chooses_c_by_out_of_fold_log_loss_each_at_its_own_temperature():
    # the default recipe's lexicon.c: [1, 10]; here a C so small that every margin is near zero against C = 1:
    # the out-of-fold scores of the tiny C, even at their best temperature, are the worse softmax
    rows = [Listing(id=f"k{i}", title=(f"{BRANDS[i % 3].title()} set number {i}" if i % 7 else f"plain set {i}"))
            for i in range(90)]
    vec = Vectorizer.fit(rows, LexiconConfig(enabled=True))
    x = vec.matrix(rows)
    y = torch.tensor([i % 3 for i in range(90)])
    found = {}
    for c in ([1e-4, 1.0], [1.0, 1e-4]):  # the order of the candidates does not matter
        cfg = LexiconConfig(enabled=True, loss="squared_hinge", c=c, folds=2)
        lexicon, chosen = fit_lexicon(x, {"target_brand": y}, [("brand", 3)], cfg, seed=0, say=lambda text: None)
        assert chosen == {"brand": 1.0}
        found[tuple(c)] = lexicon
    # the losses compared, by hand: the 2-fold margins of each C, each at the temperature best for it
    order = list(range(90))
    random.Random(0).shuffle(order)
    folds = [order[f::2] for f in range(2)]
    losses, temperatures = {}, {}
    for c in (1e-4, 1.0):
        scores = torch.zeros(90, 3)
        for held in folds:
            fit_on = [i for part in folds if part is not held for i in part]
            w, b = fit_linear_svm(torch.index_select(x, 0, torch.tensor(fit_on)).coalesce(), y[fit_on], 3, c, 100)
            scores[held] = torch.index_select(x, 0, torch.tensor(held)).coalesce().to_dense() @ w + b
        temperatures[c] = fit_temperature(scores, y)
        losses[c] = float(torch.nn.functional.cross_entropy(scores / temperatures[c], y))
    assert losses[1.0] < losses[1e-4]
    # the chosen fit is the SVM of all the rows at C = 1 divided by C = 1's own temperature, whichever order
    w, b = fit_linear_svm(x, y, 3, 1.0, 100)
    for lexicon in found.values():
        assert lexicon.settled == {"brand": (1.0, pytest.approx(temperatures[1.0]))}
        assert torch.allclose(lexicon.weight_brand, w / temperatures[1.0], atol=1e-4)
        assert torch.allclose(lexicon.bias_brand, b / temperatures[1.0], atol=1e-4)


def test_config_is_checked():
    with pytest.raises(ValueError, match="lexicon.c must be"):
        LexiconConfig(c=[])
    with pytest.raises(ValueError, match="lexicon.folds must be >= 2"):
        LexiconConfig(c=[1.0, 10.0], folds=1)
    with pytest.raises(ValueError, match="lexicon.loss must be logistic or squared_hinge"):
        LexiconConfig(loss="hinge")
    with pytest.raises(ValueError, match="lexicon.folds must be >= 2 with lexicon.loss: squared_hinge"):
        LexiconConfig(loss="squared_hinge", folds=1)
    with pytest.raises(ValueError, match="lexicon.max_chars must be >= 1"):
        LexiconConfig(max_chars=0)
