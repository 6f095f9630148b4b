"""The demo's review tab in headless Chromium: accept, correct with the schema's pickers, reload mid-queue.

The queue is real: `mmllm label --review-below 1` with a tiny random Qwen2-VL (zero-shot, constrained,
so every record carries its category path probability) over four drawn listings. Decisions land in the
corrections file at once; a reload starts at the first row not yet decided. Needs what
tests/test_demo_browser.py needs (Chromium, playwright); the screenshot goes to
benchmarks/results/review_screenshot.png (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import ROOT, TOYS_SCHEMA
from test_demo_browser import TIMEOUT_MS, expect, wait_for_text

SCREENSHOTS = os.environ.get("MMLLM_SCREENSHOTS")  # a folder to keep a copy of the screenshot in (opt-in)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]


@pytest.fixture(scope="module")
def queue(browser, tmp_path_factory, tiny_checkpoint):
    """Four drawn listings labelled with every row flagged for review; the queue, least confident first."""
    from mmllm.label import main as label

    work = tmp_path_factory.mktemp("review")
    rows = [json.loads(line) for line in (ROOT / "examples" / "drawn" / "catalog.jsonl").read_text().splitlines()[:4]]
    (work / "images").mkdir()
    for row in rows:
        for ref in row.get("images", []):
            shutil.copyfile(ROOT / "examples" / "drawn" / ref, work / ref)
    dump = work / "dump.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / "labels.jsonl"
    assert label([str(dump), "--model", str(tiny_checkpoint("qwen2_vl")), "--schema", str(TOYS_SCHEMA),
                  "--out", str(out), "--quiet", "--review-below", "1", "--max-new-tokens", "64"]) == 0
    queued = [json.loads(line) for line in (work / "labels.review.jsonl").read_text().splitlines()]
    assert len(queued) == 4 and [r["confidence"] for r in queued] == sorted(r["confidence"] for r in queued)
    return dump, out, queued, {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def server(queue, tiny_checkpoint):
    from mmllm.demo import build_app, launch
    from mmllm.label import load_predictor
    from mmllm.labelling.review import ReviewSession
    from mmllm.review_tab import ReviewDesk

    dump, out, _, _ = queue
    predictor = load_predictor(model=str(tiny_checkpoint("qwen2_vl")), schema=str(TOYS_SCHEMA), constrained=True,
                               max_new_tokens=64)
    session = ReviewSession.open(out, [dump], predictor.schema)
    app = build_app(predictor, review=ReviewDesk(session, reviewer="browser-test"))
    url = launch(app, block=False)  # gradio binds the first free port from 7860 itself
    yield url, session.corrections.path
    app.close()
    session.close()


def open_review(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_role("tab", name="Review").click()
    expect(page.locator("#review-accept")).to_be_visible(timeout=TIMEOUT_MS)
    return context, page


def decisions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_accept_correct_and_a_reload_mid_queue(browser, server, queue, tmp_path):
    url, corrections = server
    _, _, queued, rows = queue
    context, page = open_review(browser, url)
    try:
        # the least confident row first, with its listing and the prediction to check
        wait_for_text(page, "#review-progress", "Row 1 of 4")
        first = queued[0]
        expect(page.locator("#review-title textarea")).to_have_value(rows[first["id"]]["title"], timeout=TIMEOUT_MS)
        expect(page.locator("#review-category")).to_contain_text(first["category"], use_inner_text=True,
                                                                timeout=TIMEOUT_MS)
        expect(page.locator("#review-attributes")).to_contain_text("min_age_years", timeout=TIMEOUT_MS)
        expect(page.locator("#review-photos img").first).to_be_visible(timeout=TIMEOUT_MS)

        # accept: the prediction becomes the gold label, saved before the next row shows
        page.click("#review-accept")
        wait_for_text(page, "#review-status", "accepted as predicted")
        wait_for_text(page, "#review-progress", "Row 2 of 4")
        saved = decisions(corrections)
        assert [(d["id"], d["review"]["decision"], d["label"]["category"]) for d in saved] == [
            (first["id"], "accepted", first["category"])]
        assert saved[0]["review"]["reviewer"] == "browser-test" and saved[0]["title"] == rows[first["id"]]["title"]

        # correct: a category picked from the taxonomy by typing part of its path, a number in its box
        second = queued[1]
        target = next(c for c in ("Jigsaws & Puzzles > Jigsaws", "Games > Board Games") if c != second["category"])
        picker = page.locator("#review-edit-category input")
        picker.click()
        picker.fill("")  # the predicted category is in the box: clear it, then type as a person does
        picker.press_sequentially(target.split(" > ")[1][:5])
        page.get_by_role("option", name=target, exact=True).click()
        expect(picker).to_have_value(target, timeout=TIMEOUT_MS)
        pieces = page.locator("#review-edit-piece_count input")
        pieces.fill("894")
        expect(pieces).to_have_value("894", timeout=TIMEOUT_MS)
        page.click("#review-correct")
        wait_for_text(page, "#review-status", f"corrected to {target}")
        wait_for_text(page, "#review-progress", "Row 3 of 4")
        saved = decisions(corrections)
        assert [(d["id"], d["review"]["decision"]) for d in saved] == [(first["id"], "accepted"), (second["id"], "corrected")]
        assert saved[1]["label"]["category"] == target and saved[1]["label"]["attributes"]["piece_count"] == 894
        assert saved[1]["review"]["predicted"]["category"] == second["category"]
        shot = tmp_path / "review_screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000  # a page was drawn
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(SCREENSHOTS) / shot.name)
    finally:
        context.close()

    # a reload (a new page) starts at the first row not yet decided; nothing is saved twice
    context, page = open_review(browser, url)
    try:
        progress = wait_for_text(page, "#review-progress", "Row 3 of 4")
        assert "2 decided" in progress and queued[2]["id"] in progress
        page.click("#review-skip")
        wait_for_text(page, "#review-progress", "Row 4 of 4")
        page.click("#review-accept")
        wait_for_text(page, "#review-progress", "Queue done")
        assert [d["id"] for d in decisions(corrections)] == [queued[0]["id"], queued[1]["id"], queued[3]["id"]]
    finally:
        context.close()


def test_a_label_outside_the_schema_is_not_saved(browser, server, queue):
    """An integer editor given a fraction: the status says what to fix and the file is unchanged."""
    url, corrections = server
    context, page = open_review(browser, url)
    try:
        # the row the other test skipped is back (skips last one page); run alone, the first row shows
        wait_for_text(page, "#review-progress", " of 4 in the queue")
        before = decisions(corrections)
        pieces = page.locator("#review-edit-piece_count input")
        pieces.fill("2.5")
        page.click("#review-correct")
        status = wait_for_text(page, "#review-status", "Not saved", fail_on=None)
        assert "piece_count: 2.5 is not a whole number" in status
        assert decisions(corrections) == before
        pieces.fill("")
        age = page.locator("#review-edit-min_age_years input")
        age.fill("50")  # outside the schema's bounds: the schema's own message names the field
        page.click("#review-correct")
        status = wait_for_text(page, "#review-status", "min_age_years: 50", fail_on=None)
        assert "is outside [0, 21]" in status and decisions(corrections) == before
    finally:
        context.close()
