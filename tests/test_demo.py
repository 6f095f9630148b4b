"""The demo's handlers without a browser: form -> listing, errors as messages, display of any record, batch tab.

The predictors here are stand-ins with the label interface (``encode`` / ``predict_encoded``, or the
generative ``generate_scored`` / ``record``); tests/test_demo_browser.py drives the real app with a
tiny model in Chromium.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from helpers import TOYS_SCHEMA, require_gradio

require_gradio()  # before mmllm.demo, which imports gradio

from mmllm.demo import DEFAULT_EXAMPLES, Demo, InputError, Limits, build_app, guarded, load_examples
from mmllm.models.generative import GenerativePredictor
from mmllm.schema import LabelSchema

SCHEMA = LabelSchema.from_yaml(TOYS_SCHEMA)
CATEGORY = SCHEMA.categories[0]


class ScoresPredictor:
    """Like the classifier / fusion predictors: scores, modality weights, and a key the demo has no widget for."""

    schema = SCHEMA
    max_images = 2
    batch_size = 2
    takes = frozenset()

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[tuple[str, int]] = []  # (title, pictures) per encoded listing

    def encode(self, listings, images):
        self.seen += [(listing.title, len(pictures)) for listing, pictures in zip(listings, images)]
        return {"rows": len(listings)}

    def predict_encoded(self, enc, raw=False):
        if self.fail:
            raise RuntimeError("CUDA out of memory (pretend)")
        answer = SCHEMA.validate({"category": CATEGORY, "attributes": {"piece_count": 32}}).value
        return [{**answer, "status": "ok", "confidence": 0.7,
                 "top_k": [{"category": CATEGORY, "score": 0.7}, {"category": SCHEMA.categories[1], "score": 0.2}],
                 "modality_weights": {"text": 0.625, "image": 0.375}, "calibrated": True}] * enc["rows"]


class TextPredictor(GenerativePredictor):
    """The real generative record logic over canned answer texts."""

    def __init__(self, text: str) -> None:
        super().__init__(model=None, processor=None, schema=SCHEMA, template=None, max_images=2)
        self.text = text

    def encode(self, listings, images):
        return {"rows": len(listings)}

    def generate_scored(self, enc):
        return [(self.text, None)] * enc["rows"]  # no token scores: no confidence


def png(path: Path, size=(48, 32), colour="red") -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture
def demo(tmp_path) -> Demo:
    return Demo(ScoresPredictor(), Limits(max_image_bytes=50_000, max_image_pixels=1_000_000, max_dump_bytes=20_000,
                                          max_dump_rows=6),
                load_examples(DEFAULT_EXAMPLES), DEFAULT_EXAMPLES.parent, DEFAULT_EXAMPLES.parent)


# ---------------------------------------------------------------------- the form
def test_a_prediction_with_scores_shows_top_k_weights_the_two_tables_and_other_keys(demo, tmp_path):
    images = [(png(tmp_path / f"p{i}.png"), None) for i in range(3)]
    view = demo.predict(images, "  Wooden   chess set ", "32 pieces", [["Pieces", "32"], ["", ""], ["Colours", '["black", "white"]']])
    assert view.status.startswith(f"**ok**: the answer validates against schema '{SCHEMA.name}'")
    assert "reads the first 2 of the 3 images" in view.status
    assert demo.predictor.seen == [("Wooden chess set", 2)]  # the catalog's own title cleaning; max_images applied
    assert view.category == {CATEGORY: 0.7, SCHEMA.categories[1]: 0.2}
    assert view.modality_weights == {"text": 0.625, "image": 0.375}
    assert view.extras == {"calibrated": True}
    # no evidence in the record (no grounding): the model's own answers, null included
    assert ["piece_count", "32", "model", "", "", ""] in view.attributes
    assert ["material", "-", "model", "", "", ""] in view.attributes
    assert view.highlights == [("Wooden chess set", None), ("\n\n", None), ("32 pieces", None)]
    assert view.seller == [["Pieces", "32"], ["Colours", '["black", "white"]']]  # a JSON list cell stays a list
    assert view.record["id"] == "demo" and view.raw is None and view.similar is None
    assert SCHEMA.validate({"category": view.record["category"], "attributes": view.record["attributes"]}).ok


def test_a_generative_prediction_shows_the_raw_text_and_the_category_alone():
    text = json.dumps({"category": CATEGORY, "attributes": {"piece_count": 6}})
    view = Demo(TextPredictor(text)).predict(None, "Blocks", "", None)
    assert view.raw == text and view.category == CATEGORY and view.modality_weights is None
    assert view.record["attributes"]["piece_count"] == 6 and "raw" not in view.record


def test_an_invalid_answer_says_why_and_keeps_the_raw_text():
    view = Demo(TextPredictor('{"category": "Toys > Nope", "attributes": {}}')).predict(None, "Blocks", "", None)
    assert view.status.startswith("**invalid**") and "not in the taxonomy" in view.status
    assert view.raw.startswith('{"category": "Toys > Nope"') and view.category is None


def test_a_model_failure_is_the_listings_answer_not_a_crash():
    view = Demo(ScoresPredictor(fail=True)).predict(None, "Blocks", "", None)
    assert view.status.startswith("**error**") and "RuntimeError: CUDA out of memory (pretend)" in view.status
    assert view.record["stage"] == "model"


@pytest.mark.parametrize("case, expected", [
    ("nothing", "Give the listing a title or at least one image"),
    ("not an image", "not_an_image.png): not a recognised image"),
    ("too many bytes", "big.bmp) is 117 KB; the limit is 48.8 KB"),
    ("too many pixels", "over the limit of 1,000,000"),
    ("nameless attribute", "Attribute table row 2: the value 'wood' has no attribute name"),
    ("repeated attribute", "Attribute table row 2: 'Brand' appears twice"),
    ("long title", "title: 1,001 characters, limit 1,000"),
])
def test_bad_input_is_a_clear_message(demo, tmp_path, case, expected):
    title, images, table = "A toy", [], [["Brand", "Acme"]]
    if case == "nothing":
        title = "   "
    elif case == "not an image":
        (tmp_path / "not_an_image.png").write_text("hello, I am text")
        images = [(str(tmp_path / "not_an_image.png"), None)]
    elif case == "too many bytes":
        big = tmp_path / "big.bmp"
        Image.new("RGB", (200, 200)).save(big)  # 120 KB, over the 50 KB limit
        images = [str(big)]
    elif case == "too many pixels":
        images = [png(tmp_path / "wide.png", size=(2000, 600))]
    elif case == "nameless attribute":
        table = [["Brand", "Acme"], ["", "wood"]]
    elif case == "repeated attribute":
        table = [["Brand", "Acme"], ["Brand", "Other"]]
    elif case == "long title":
        title = "x" * 1001
    with pytest.raises(InputError, match=re.escape(expected)):
        demo.predict(images, title, "", table)
    assert demo.predictor.seen == []  # refused before the model


def test_an_image_alone_is_enough(tmp_path):
    demo = Demo(ScoresPredictor())
    view = demo.predict([png(tmp_path / "only.png")], "", "", None)
    assert view.status.startswith("**ok**") and demo.predictor.seen == [("(no title given)", 1)]


def test_guarded_handlers_answer_with_a_message_never_a_traceback():
    def broken(_):
        raise KeyError("boom")

    def refused(_):
        raise InputError("Upload a .jsonl or .csv dump first.")

    on_error = lambda message: (message, None)
    assert guarded(refused, on_error)(None) == ("**Error:** Upload a .jsonl or .csv dump first.", None)
    message, _ = guarded(broken, on_error)(None)
    assert message.startswith("**Error:** something went wrong (KeyError: 'boom')") and "Traceback" not in message


# ---------------------------------------------------------------------- examples
def test_examples_fill_the_form_with_paths_inside_the_examples_folder(demo):
    assert len(demo.examples) == 9
    paths, title, description, table = demo.example(0)
    assert title.startswith("Inflatable Rainbow Beach Ball") and description and ["Brand", "SunnyPlay"] in table
    assert [Path(p).relative_to(DEFAULT_EXAMPLES.parent.resolve()) for p in paths] == [Path("images/beach_ball.png")]


def test_an_example_image_outside_the_examples_folder_is_not_served(tmp_path):
    folder = tmp_path / "examples"
    folder.mkdir()
    png(folder / "ok.png")
    png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", folder / "link.png")
    rows = [{"id": "e1", "title": "Car", "images": ["ok.png", "../secret.png", str(tmp_path / "secret.png"), "link.png"]}]
    (folder / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo = Demo(ScoresPredictor(), examples=load_examples(folder / "catalog.jsonl"), examples_root=folder)
    paths, *_ = demo.example(0)
    assert paths == [str((folder / "ok.png").resolve())]


# ---------------------------------------------------------------------- batch tab
def dump_of(tmp_path: Path, lines: list[str], name: str = "dump.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_batch_labels_every_row_and_names_the_broken_line(demo, tmp_path):
    rows = [json.loads(line) for line in DEFAULT_EXAMPLES.read_text().splitlines()[:4]]
    lines = [json.dumps(r) for r in rows[:2]] + ['{"id": "broken", "title": '] + [json.dumps(r) for r in rows[2:]]
    calls = []
    view = demo.label_dump(dump_of(tmp_path, lines), lambda value, **kw: calls.append(value))
    out = [json.loads(line) for line in view.out_path.read_text().splitlines()]
    assert len(out) == 5 and [r["line"] for r in sorted(out, key=lambda r: r["line"])] == [1, 2, 3, 4, 5]
    bad = next(r for r in out if r["line"] == 3)
    assert bad["status"] == "error" and bad["stage"] == "read" and "not valid JSON" in bad["error"]
    assert all(r["status"] == "ok" and r["source"] == "dump.jsonl" for r in out if r["line"] != 3)
    assert {r["id"] for r in out if r["status"] == "ok"} == {r["id"] for r in rows}
    assert view.status.startswith("**5 rows**: 4 ok, 0 invalid, 1 failed (read 1)")
    assert calls[-1] == (5, 5) and view.preview[2][:3] == [3, "broken", "error"]
    assert view.preview[0][4] == "piece_count=32 (model)" and view.preview[2][4] == ""  # attributes (source)
    assert sum(n for _, n in demo.predictor.seen) == sum(len(r["images"]) for r in rows)  # images resolved in the examples folder


def test_batch_reads_csv_and_reports_a_missing_image_per_row(demo, tmp_path):
    text = 'id,title,images\nc1,Kite,images/kite.png\nc2,Ghost,images/missing.png\n'
    (tmp_path / "dump.csv").write_text(text)
    view = demo.label_dump(str(tmp_path / "dump.csv"))
    out = {r["id"]: r for r in map(json.loads, view.out_path.read_text().splitlines())}
    assert out["c1"]["status"] == "ok"
    assert out["c2"]["stage"] == "image" and "missing.png" in out["c2"]["error"]


@pytest.mark.parametrize("case, expected", [
    ("none", "Upload a .jsonl or .csv dump first"),
    ("parquet", "dump.parquet: the batch tab takes .jsonl"),
    ("too big", "dump.jsonl is 27.1 KB; the batch tab takes at most 19.5 KB"),
    ("too many rows", "has 7 rows; the batch tab labels at most 6"),
    ("empty", "dump.jsonl has no rows"),
])
def test_batch_refuses_what_it_cannot_take(demo, tmp_path, case, expected):
    one = json.dumps({"id": "x", "title": "Toy"})
    path = {"none": lambda: None,
            "parquet": lambda: dump_of(tmp_path, [one], "dump.parquet"),
            "too big": lambda: dump_of(tmp_path, [json.dumps({"id": "x", "title": "T" * 900})] * 30),
            "too many rows": lambda: dump_of(tmp_path, [json.dumps({"id": f"r{i}", "title": "Toy"}) for i in range(7)]),
            "empty": lambda: dump_of(tmp_path, [])}[case]()
    with pytest.raises(InputError, match=re.escape(expected)):
        demo.label_dump(path)


# ---------------------------------------------------------------------- the app
def test_the_app_builds_with_any_predictor_and_the_command_routes_to_it(capsys):
    app = build_app(ScoresPredictor())
    assert app.mmllm_demo.predictor.schema is SCHEMA
    from mmllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0 and "--index" in capsys.readouterr().out


@pytest.mark.slow
def test_with_an_index_the_most_similar_listings_come_with_their_titles(tmp_path, tiny_checkpoint, capsys):
    from mmllm.demo import SimilarListings, main
    from mmllm.label import load_predictor
    from mmllm.search import main as search

    model, schema = str(tiny_checkpoint("qwen2_vl")), str(TOYS_SCHEMA)
    index = tmp_path / "index"
    assert search(["index", "--model", model, "--catalog", str(DEFAULT_EXAMPLES), "--schema", schema,
                   "--out", str(index), "--quiet"]) == 0
    predictor = load_predictor(model=model, schema=schema, template=None, constrained=True, max_new_tokens=64,
                               batch_size=4, min_pixels=None, max_pixels=None)
    similar = SimilarListings.load(index, predictor, model, k=3)
    assert similar.bundle.model is predictor.model  # the same weights are not loaded twice
    demo = Demo(predictor, examples=load_examples(DEFAULT_EXAMPLES), examples_root=DEFAULT_EXAMPLES.parent,
                similar=similar)
    paths, title, description, table = demo.example(2)  # the red car, two pictures
    view = demo.predict(paths, title, description, table)
    assert view.status.startswith("**ok**") and len(view.similar) == 3
    titles = {json.loads(line)["title"] for line in DEFAULT_EXAMPLES.read_text().splitlines()}
    for image, caption in view.similar:
        assert image.size[0] <= 256 and caption.rsplit(" (", 1)[0] in titles
    assert view.similar[0][1].startswith(title)  # the listing itself is its own nearest neighbour

    assert main(["--model", model, "--schema", schema, "--index", str(tmp_path / "nowhere")]) == 2
    assert "not a search index" in capsys.readouterr().err


def test_the_similar_listings_of_a_moved_model_and_a_repeated_id(tmp_path, tiny_checkpoint):
    """The demo refused an index whose model folder had moved even when --model named it (paths compared, not
    files), and showed the photo of an id's last row where the index had kept its first."""
    import shutil

    from PIL import Image

    from mmllm.demo import SimilarListings
    from mmllm.search import load_model, main as search

    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "img" / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "img" / "blue.png")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "p1", "title": "Red chess set", "images": ["img/red.png"]},
        {"id": "p2", "title": "Card game"},
        {"id": "p1", "title": "Blue kite", "images": ["img/blue.png"]}]))  # a repeat: the index skips it
    shutil.copytree(tiny_checkpoint("qwen2_vl"), tmp_path / "model_old")
    assert search(["index", "--model", str(tmp_path / "model_old"), "--catalog", str(catalog), "--schema",
                   str(TOYS_SCHEMA), "--out", str(tmp_path / "ix"), "--quiet"]) == 0
    shutil.move(tmp_path / "model_old", tmp_path / "model_new")  # the same files, elsewhere
    predictor = load_model(str(tmp_path / "model_new"), schema=str(TOYS_SCHEMA), template=None)
    similar = SimilarListings.load(tmp_path / "ix", predictor, str(tmp_path / "model_new"))
    assert similar.bundle.model is predictor.model  # the moved folder is the index's model: not loaded again
    assert {k: v[0] for k, v in similar.thumbnails.items()} == {"p1": "img/red.png"}  # the first row's photo


def test_the_form_counts_images_before_decoding_and_decodes_only_what_is_read(tmp_path, monkeypatch):
    import mmllm.demo as demo_module

    demo = Demo(ScoresPredictor())  # reads 2 images
    decoded = []
    real = demo_module.load_image
    monkeypatch.setattr(demo_module, "load_image", lambda ref, policy: decoded.append(ref) or real(ref, policy))
    many = [png(tmp_path / f"{i}.png") for i in range(33)]
    with pytest.raises(InputError, match="33 images; the limit is 32"):
        demo.form_listing(many, "Blocks", "", None)
    assert decoded == []
    view = demo.predict(many[:6], "Blocks", "", None)
    assert decoded == ["0.png", "1.png"] and demo.predictor.seen[-1] == ("Blocks", 2)
    assert "this model reads the first 2 of the 6 images" in view.status


def test_the_batch_tab_keeps_the_demos_image_limits(tmp_path):
    demo = Demo(ScoresPredictor(), Limits(max_image_bytes=50_000, max_image_pixels=1_000_000), image_root=tmp_path)
    png(tmp_path / "wide.png", size=(2000, 600))  # 1.2 MP: over this demo's 1 MP, under the command line's 40 MP
    view = demo.label_dump(dump_of(tmp_path, [json.dumps({"id": "w", "title": "Wide kite", "images": ["wide.png"]})]))
    record = json.loads(view.out_path.read_text())
    assert record["stage"] == "image" and "over the limit of 1,000,000" in record["error"]


def test_a_similar_listing_count_below_one_is_refused_at_start(capsys):
    from mmllm.demo import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "-k", "0"])
    assert exit_info.value.code == 2 and "argument -k: must be at least 1, got 0" in capsys.readouterr().err
