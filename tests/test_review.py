"""The review loop's files (mmllm.labelling.review): flags, the queue, the corrections a person saves
(append-only, resumable, never twice), and the session the demo's review tab steps through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmllm.catalog import load_listings
from mmllm.labelling.output import OutputError
from mmllm.labelling.review import (Corrections, CorrectionError, ReviewSession, check_queue_path, default_queue_path,
                                    flag, write_queue)

from listings import small_schema, toy_row, write_catalog


def record(i: int, confidence: float | None, *, status: str = "ok", **extra) -> dict:
    out = {"id": f"item-{i}", "category": "Games > Chess", "attributes": {"piece_count": 10 + i, "material": None},
           "status": status, "confidence": confidence, "source": "catalog.jsonl", "line": i + 1, **extra}
    return out


def write_labels(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_flags_name_their_reason():
    assert flag(record(0, 0.9), 0.5) == {"review": False}
    assert flag(record(0, 0.2), 0.5) == {"review": True, "review_reason": "confidence 0.2 < 0.5"}
    assert flag(record(0, None), 0.5) == {"review": True, "review_reason": "no confidence"}
    assert flag(record(0, 0.99, status="invalid"), 0.5) == {"review": True, "review_reason": "invalid answer"}


def test_queue_is_the_flagged_rows_least_confident_first_and_never_a_users_file(tmp_path):
    rows = [record(0, 0.7, review=True), record(1, 0.95, review=False), record(2, None, review=True),
            record(3, 0.1, review=True)]
    out = write_labels(tmp_path / "labels.jsonl", rows)
    queue = default_queue_path(out)
    assert queue.name == "labels.review.jsonl"
    assert write_queue(out, queue) == 3
    assert [json.loads(line)["id"] for line in queue.read_text().splitlines()] == ["item-2", "item-3", "item-0"]
    check_queue_path(queue, resume=True)  # our own queue, on --resume: rewritten freely
    # another run's queue (two shards given one --review-out): the second replaced the first's 170 rows
    with pytest.raises(OutputError, match="holds the review queue of another run \\(3 rows\\)"):
        check_queue_path(queue)
    other = write_labels(tmp_path / "shard1.jsonl", [record(7, 0.2, review=True)])
    with pytest.raises(OutputError, match="holds rows of another run \\(id 'item-2' is not flagged in"):
        write_queue(other, queue)  # at the end too: the runs may have started together
    assert [json.loads(line)["id"] for line in queue.read_text().splitlines()] == ["item-2", "item-3", "item-0"]
    # the same rows answered by another model (the same dump): its ids alone passed, and the queue was replaced
    rival = write_labels(tmp_path / "rival.jsonl", [record(i, 0.3, review=True) for i in range(4)])
    with pytest.raises(OutputError, match="holds rows of another run \\(id 'item-2' is not flagged in .*rival.jsonl, or "
                                          ".*rival.jsonl answers it otherwise\\)"):
        write_queue(rival, queue)
    assert [json.loads(line)["id"] for line in queue.read_text().splitlines()] == ["item-2", "item-3", "item-0"]
    # a dump that repeats an id: its second row is an error record of that id, after the flagged one; the run's
    # own queue is still its own (it was refused on --resume as another run's)
    repeated = {"id": "item-0", "status": "error", "stage": "read", "error": "duplicate id", "source": "catalog.jsonl",
                "line": 9}
    write_labels(out, [*rows, repeated])
    assert write_queue(out, queue) == 3
    link = tmp_path / "link.review.jsonl"
    link.symlink_to(tmp_path / "elsewhere" / "queue.jsonl")  # dangling: the run made its target, then replaced the link
    with pytest.raises(OutputError, match="is a symbolic link \\(to .*elsewhere/queue.jsonl\\); give the queue's own"):
        check_queue_path(link)
    assert not (tmp_path / "elsewhere").exists()
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"my": "data"}\n')
    with pytest.raises(OutputError, match="not a review queue written by `mmllm label`"):
        check_queue_path(mine)


def test_corrections_are_appended_validated_and_never_decided_twice(tmp_path):
    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    listings = load_listings(catalog)
    path = tmp_path / "d" / "catalog.corrections.jsonl"
    store = Corrections(path, small_schema(), inputs=[catalog])
    row = store.save(listings[0], {"category": "Outdoor > Kites", "attributes": {"piece_count": 12}}, "corrected",
                     record(0, 0.3), reviewer="ana")
    assert row["label"] == {"category": "Outdoor > Kites", "attributes": {"piece_count": 12, "material": None}}
    assert row["review"]["decision"] == "corrected" and row["review"]["predicted"]["category"] == "Games > Chess"
    with pytest.raises(CorrectionError, match="already corrected"):
        store.save(listings[0], {"category": "Games > Chess", "attributes": {}}, "accepted", record(0, 0.3))
    with pytest.raises(CorrectionError, match=r"row 'item-1'.*category"):
        store.save(listings[1], {"category": "Nowhere > Else", "attributes": {}}, "corrected", record(1, 0.3))
    with pytest.raises(OutputError, match="is held by another process \\(a review session, or a `mmllm label` run"):
        Corrections(path, small_schema())
    store.close()
    # a catalog like any other: the reviewed row, with its gold label, reads back as training data
    again = load_listings(path)
    assert [(r.id, r.label["category"]) for r in again] == [("item-0", "Outdoor > Kites")]
    assert again[0].images == listings[0].images and again[0].title == listings[0].title


def test_a_torn_last_line_is_cut_and_decided_rows_are_remembered(tmp_path):
    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    listings = load_listings(catalog)
    path = tmp_path / "d" / "catalog.corrections.jsonl"
    store = Corrections(path, small_schema())
    store.save(listings[0], {"category": "Games > Chess", "attributes": {}}, "accepted", record(0, 0.3))
    store.close()
    with open(path, "a") as f:
        f.write('{"id": "item-1", "title": "half a li')  # killed mid-write
    store = Corrections(path, small_schema())
    assert store.decided == {"item-0": "accepted"}
    store.save(listings[1], {"category": "Vehicles > Cars", "attributes": {}}, "corrected", record(1, 0.2))
    store.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["item-0", "item-1"]
    # a whole catalog row (no review) at the end without its newline: refused like any row not ours, never cut
    hand = path.read_text() + json.dumps({"id": "item-9", "title": "hand-labelled toy",
                                          "label": {"category": "Games > Chess"}})
    path.write_text(hand)
    with pytest.raises(OutputError, match="line 3 is not a reviewed row"):
        Corrections(path, small_schema())
    assert path.read_text() == hand


def test_a_file_that_is_not_ours_is_refused_and_inputs_are_never_written(tmp_path):
    catalog = write_catalog(tmp_path / "d", 2, toy_row())
    with pytest.raises(OutputError, match="would write over the input"):
        Corrections(catalog, small_schema(), inputs=[catalog])
    other = tmp_path / "notes.jsonl"
    other.write_text('{"id": "x"}\n')
    with pytest.raises(OutputError, match="line 1 is not a reviewed row"):
        Corrections(other, small_schema())
    assert other.read_text() == '{"id": "x"}\n'


def test_session_steps_through_the_queue_and_resumes_after_a_reload(tmp_path):
    catalog = write_catalog(tmp_path / "d", 5, toy_row())
    labels = write_labels(tmp_path / "labels.jsonl", [
        record(0, 0.9, review=False), record(1, 0.4, review=True), record(2, 0.1, review=True),
        record(3, None, status="invalid", review=True), {"id": "item-4", "status": "error", "stage": "image",
                                                          "error": "x", "source": "catalog.jsonl", "line": 5}])
    session = ReviewSession.open(labels, [catalog], small_schema())
    assert session.corrections.path == tmp_path / "d" / "catalog.corrections.jsonl"
    assert [r["id"] for r in session.queue] == ["item-3", "item-2", "item-1"]
    first = session.next_item()
    assert (first.listing.id, first.position) == ("item-3", 0)
    with pytest.raises(CorrectionError, match="no valid answer to accept"):
        session.accept("item-3")
    session.correct("item-3", {"category": "Vehicles > Cars", "attributes": {"piece_count": 13}})
    assert session.next_item().listing.id == "item-2"
    assert session.next_item(skipped=["item-2"]).listing.id == "item-1"
    session.close()
    # a reload (a new session on the same files) starts where the reviewer stopped
    session = ReviewSession.open(labels, [catalog], small_schema())
    assert session.decided == 1 and session.next_item().listing.id == "item-2"
    session.accept("item-1")  # out of order (picked from the list): the queue still offers item-2 first
    assert session.next_item().listing.id == "item-2" and session.decided == 2
    with pytest.raises(CorrectionError, match="'item-0' is not in the review queue"):
        session.item("item-0")
    session.accept("item-2")
    assert session.next_item() is None and session.decided == 3
    session.close()
    rows = [json.loads(line) for line in session.corrections.path.read_text().splitlines()]
    assert [(r["id"], r["review"]["decision"], r["label"]["category"]) for r in rows] == [
        ("item-3", "corrected", "Vehicles > Cars"), ("item-1", "accepted", "Games > Chess"),
        ("item-2", "accepted", "Games > Chess")]


def test_a_queue_that_repeats_an_id_counts_its_records_decided(tmp_path):
    """A dump that repeats an id gives the queue two records of it: "Queue done: 2 of 3 rows decided" said the
    desk once every row was decided, counting ids against a total of records."""
    catalog = write_catalog(tmp_path / "d", 2, toy_row())
    listings = {r.id: r for r in load_listings(catalog)}
    queue = [record(0, 0.1, review=True), record(0, 0.2, review=True), record(1, 0.3, review=True)]
    store = Corrections(tmp_path / "c.jsonl", small_schema())
    session = ReviewSession(small_schema(), queue, listings, store)
    session.accept("item-0")
    assert session.decided == 2 and session.next_item().listing.id == "item-1"
    session.accept("item-1")
    assert session.next_item() is None and session.decided == len(session.queue) == 3
    session.close()


def test_session_without_flags_reviews_every_answer_and_names_missing_rows(tmp_path):
    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    labels = write_labels(tmp_path / "labels.jsonl", [record(0, 0.9), record(1, 0.4), record(2, 0.6)])
    session = ReviewSession.open(labels, [catalog], small_schema(), corrections=tmp_path / "c.jsonl")
    assert [r["id"] for r in session.queue] == ["item-1", "item-2", "item-0"]
    session.close()
    elsewhere = write_catalog(tmp_path / "e", 1, toy_row(), name="more.jsonl")
    with pytest.raises(OutputError, match="the dumps lie in 2 folders"):
        ReviewSession.open(labels, [catalog, elsewhere], small_schema(), corrections=tmp_path / "c3.jsonl")
    stranger = write_labels(tmp_path / "other.jsonl", [record(7, 0.2)])
    with pytest.raises(OutputError, match="1 queued row.*not in catalog.jsonl.*'item-7'"):
        ReviewSession.open(stranger, [catalog], small_schema(), corrections=tmp_path / "c2.jsonl")


@pytest.mark.slow
def test_corrections_retrain_a_model_that_fixes_them_and_keeps_dev(tmp_path):
    """The loop end to end: label a dump, review its queue (accept where the model was right, correct the
    rest), put the corrections file in data.train, retrain: the corrected rows come out right and the dev
    accuracy does not drop."""
    from mmllm.cli import main as mmllm
    from mmllm.review_tab import ReviewDesk

    from helpers import ROOT

    train = write_catalog(tmp_path / "train", 24, toy_row())
    dev = write_catalog(tmp_path / "dev", 8, toy_row(), start=24)
    schema_path = train.parent / "schema.yaml"

    def gadget(folder, i):  # words the training rows never use: the first model can only guess
        return {"id": f"g{i}", "title": f"Zorblax gadget {i} with sprocket", "description": "A curious thing.",
                "attributes": {"Pieces": str(3 + i)}, "images": []}

    dump = write_catalog(tmp_path / "shop", 6, gadget, name="dump.jsonl")

    def finetune(out, *train_files):
        listed = ",".join(str(f) for f in train_files)
        assert mmllm(["finetune", "--config", str(ROOT / "finetune" / "fusion_minilm_cpu.yaml"),
                      f"data.train=[{listed}]", f"data.dev={dev}", f"data.schema={schema_path}",
                      "fusion.max_text_tokens=32", "fusion.hidden=16", "fusion.attr_buckets=64",
                      "train.save_every=0", f"train.output_dir={out}"]) == 0

    def label(model, catalog, out):
        assert mmllm(["label", str(catalog), "--model", str(model), "--out", str(out), "--quiet",
                      "--review-below", "1"]) == 0
        return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    def accuracy(records, catalog):
        gold = {r.id: r.label["category"] for r in load_listings(catalog)}
        return sum(records[i]["category"] == c for i, c in gold.items()) / len(gold)

    finetune(tmp_path / "first", train)
    first = label(tmp_path / "first", dump, tmp_path / "first.jsonl")
    first_dev = accuracy(label(tmp_path / "first", dev, tmp_path / "first_dev.jsonl"), dev)
    # the reviewer's truth: every gadget is a kite-like outdoor toy (the category the model chose least)
    predicted = [r["category"] for r in first.values()]
    truth = min(small_schema().categories, key=predicted.count)
    session = ReviewSession.open(tmp_path / "first.jsonl", [dump], small_schema())
    desk = ReviewDesk(session, reviewer="test")
    corrected = 0
    while (view := desk.current()).row_id is not None:
        if first[view.row_id]["category"] == truth:
            desk.accept(view.row_id)
        else:
            desk.correct(view.row_id, [truth, *view.editors[1:]])
            corrected += 1
    session.close()
    assert corrected >= 5 and len(session.corrections.decided) == 6

    finetune(tmp_path / "second", train, session.corrections.path)
    second = label(tmp_path / "second", dump, tmp_path / "second.jsonl")
    assert all(r["category"] == truth for r in second.values()), {i: r["category"] for i, r in second.items()}
    second_dev = accuracy(label(tmp_path / "second", dev, tmp_path / "second_dev.jsonl"), dev)
    assert second_dev >= first_dev


def test_the_review_desk_shows_a_row_and_turns_its_editors_into_a_label(tmp_path):
    from mmllm.review_tab import NULL, ReviewDesk

    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    labels = write_labels(tmp_path / "labels.jsonl", [
        record(0, 0.3, review=True, review_reason="confidence 0.3 < 0.5",
               top_k=[{"category": "Games > Chess", "score": 0.3}, {"category": "Outdoor > Kites", "score": 0.25}]),
        record(1, 0.9, review=False)])
    desk = ReviewDesk(ReviewSession.open(labels, [catalog], small_schema()), reviewer="ana")
    view = desk.current()
    assert view.row_id == "item-0" and "Row **1** of 1" in view.progress and "confidence 0.3 < 0.5" in view.progress
    assert view.title == "Red toy number 0" and view.seller == [["Pieces", "10"]]
    assert view.category == {"Games > Chess": 0.3, "Outdoor > Kites": 0.25}
    assert [row[:3] for row in view.attributes] == [["piece_count", "10", "model"], ["material", "-", "model"]]
    assert view.editors == ["Games > Chess", 10, []]  # category, piece_count (integer), material (list)
    assert len(view.pictures) == 1 and view.pictures[0][1] == "img/0.png"
    # editors -> label: empty means not stated; an integer box refuses a fraction; a category is required
    assert desk.label_from(["Outdoor > Kites", 12.0, ["wood"]]) == {
        "category": "Outdoor > Kites", "attributes": {"piece_count": 12, "material": ["wood"]}}
    assert desk.label_from(["Outdoor > Kites", None, []])["attributes"] == {"piece_count": None, "material": None}
    with pytest.raises(CorrectionError, match="piece_count: 2.5 is not a whole number"):
        desk.label_from(["Outdoor > Kites", 2.5, []])
    with pytest.raises(CorrectionError, match="Pick a category"):
        desk.label_from([NULL, 3, []])
    view, message = desk.correct("item-0", ["Outdoor > Kites", 12, ["wood"]])
    assert message == "Saved: **item-0** corrected to Outdoor > Kites." and view.row_id is None
    assert "**Queue done**: 1 of 1 rows decided" in view.progress
    desk.session.close()


def test_a_users_one_line_file_is_refused_and_a_whole_last_row_is_kept(tmp_path):
    """The last line without its newline: cut only when it can be a row cut short by a kill."""
    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    listings = load_listings(catalog)
    mine = tmp_path / "settings.json"
    mine.write_text('{"my": "precious data", "n": 42}')  # as json.dump writes it
    with pytest.raises(OutputError, match="line 1 is not a reviewed row"):
        Corrections(mine, small_schema())
    assert mine.read_text() == '{"my": "precious data", "n": 42}'
    path = tmp_path / "d" / "c.jsonl"
    store = Corrections(path, small_schema())
    store.save(listings[0], {"category": "Games > Chess", "attributes": {}}, "accepted", record(0, 0.3))
    store.close()
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # a hand edit dropped the final newline
    store = Corrections(path, small_schema())
    assert store.decided == {"item-0": "accepted"}
    store.save(listings[1], {"category": "Vehicles > Cars", "attributes": {}}, "corrected", record(1, 0.2))
    store.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["item-0", "item-1"]


def test_the_session_shows_the_row_that_was_labelled_and_refuses_another_dump(tmp_path):
    catalog = write_catalog(tmp_path / "d", 3, toy_row(0))
    with open(catalog, "a") as f:  # the dump repeats item-0's id; `mmllm label` labelled line 1, line 4 is a read error
        f.write(json.dumps({"id": "item-0", "title": "Garden hose"}) + "\n")
    labels = write_labels(tmp_path / "labels.jsonl", [record(0, 0.2), record(1, 0.4)])
    session = ReviewSession.open(labels, [catalog], small_schema())
    assert session.item("item-0").listing.line == 1 and session.item("item-0").listing.title != "Garden hose"
    assert session.notes == []  # the corrections sit beside the dump, and these rows have no photo
    session.close()
    dev = write_catalog(tmp_path / "d", 3, toy_row(0), name="dev.jsonl")  # the same ids, other listings
    with pytest.raises(OutputError, match="labels.jsonl was labelled from 'catalog.jsonl'.*not from dev.jsonl"):
        ReviewSession.open(labels, [dev], small_schema(), corrections=tmp_path / "d" / "c2.jsonl")
    with pytest.raises(OutputError, match="is a folder"):
        ReviewSession.open(tmp_path / "d", [catalog], small_schema(), corrections=tmp_path / "d" / "c3.jsonl")


def test_corrections_kept_away_from_the_photos_say_how_to_train_on_them(tmp_path):
    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    labels = write_labels(tmp_path / "labels.jsonl", [record(0, 0.2)])
    session = ReviewSession.open(labels, [catalog], small_schema(), corrections=tmp_path / "reviewed" / "round1.jsonl")
    assert session.notes == [f"the corrections keep the rows' image paths, which resolve in {catalog.parent.resolve()}: "
                             f"to train on round1.jsonl with its photos, set data.image_root={catalog.parent.resolve()} "
                             "in the recipe"]
    session.close()


def test_accepting_a_row_with_a_withheld_attribute_saves_its_category_only(tmp_path):
    """A withheld value shows as null, but no one checked it: accepting must not teach "not stated"."""
    from mmllm.catalog import attributes_labelled
    from mmllm.review_tab import ReviewDesk

    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    held = {"material": {"value": ["wood"], "confidence": 0.2, "source": "model"}}
    labels = write_labels(tmp_path / "labels.jsonl", [record(0, 0.2, review=True, withheld=held),
                                                      record(1, 0.3, review=True)])
    desk = ReviewDesk(ReviewSession.open(labels, [catalog], small_schema()), reviewer="ana")
    view, message = desk.accept("item-0")
    assert message == ("Saved: **item-0** accepted as predicted, for its category only: material withheld by the "
                       "model (correct the row to label its attributes).")
    view, message = desk.accept(view.row_id)
    assert message == "Saved: **item-1** accepted as predicted."
    desk.session.close()
    rows = [json.loads(line) for line in desk.session.corrections.path.read_text().splitlines()]
    assert rows[0]["label"] == {"category": "Games > Chess"}
    assert rows[0]["review"]["attributes_unreviewed"] == ["material"]
    assert rows[1]["label"] == {"category": "Games > Chess", "attributes": {"piece_count": 11, "material": None}}
    assert "attributes_unreviewed" not in rows[1]["review"]
    # read back as training data: the first row's attributes are unknown (left out of every attribute fit),
    # the second's null material is a "not stated" the reviewer accepted
    again = load_listings(desk.session.corrections.path)
    assert [attributes_labelled(r.label) for r in again] == [False, True]


def test_a_correction_of_the_category_alone_keeps_withheld_attributes_unreviewed(tmp_path):
    """Fixing only the category leaves a withheld attribute at its editor's starting null: no one
    checked it, so the row is gold for its category only; changing an attribute labels them all."""
    from mmllm.catalog import attributes_labelled
    from mmllm.review_tab import ReviewDesk

    catalog = write_catalog(tmp_path / "d", 3, toy_row())
    held = {"material": {"value": ["wood"], "confidence": 0.2, "source": "model"}}
    labels = write_labels(tmp_path / "labels.jsonl", [record(0, 0.2, review=True, withheld=held),
                                                      record(1, 0.3, review=True, withheld=held),
                                                      record(2, 0.4, review=True)])
    desk = ReviewDesk(ReviewSession.open(labels, [catalog], small_schema()), reviewer="ana")
    view = desk.current()
    view, message = desk.correct(view.row_id, ["Outdoor > Kites", *view.editors[1:]])  # the category alone
    assert message == ("Saved: **item-0** corrected to Outdoor > Kites, for its category only: material withheld "
                       "by the model and left as they were (change an attribute to label them all).")
    view, message = desk.correct(view.row_id, ["Outdoor > Kites", 14, []])  # an attribute changed: all reviewed
    assert message == "Saved: **item-1** corrected to Outdoor > Kites."
    view, message = desk.correct(view.row_id, ["Outdoor > Kites", *view.editors[1:]])  # nothing withheld
    assert message == "Saved: **item-2** corrected to Outdoor > Kites."
    desk.session.close()
    rows = [json.loads(line) for line in desk.session.corrections.path.read_text().splitlines()]
    assert rows[0]["label"] == {"category": "Outdoor > Kites"}
    assert rows[0]["review"]["attributes_unreviewed"] == ["material"]
    assert rows[1]["label"] == {"category": "Outdoor > Kites", "attributes": {"piece_count": 14, "material": None}}
    assert rows[2]["label"] == {"category": "Outdoor > Kites", "attributes": {"piece_count": 12, "material": None}}
    assert [attributes_labelled(r.label) for r in load_listings(desk.session.corrections.path)] == [False, True, True]
