"""The demo in a real browser: headless Chromium (Debian's, through playwright) against the app
served in-process on a free local port, with a tiny random Qwen2-VL labelling zero-shot under the
toy schema with constrained decoding (so every answer validates; the labels themselves are noise).

Needs /usr/bin/chromium (`make test` installs it as root) and the `playwright` package; without them
the tests are skipped locally and FAIL under CI=true. The screenshot of a prediction goes to
benchmarks/results/demo_screenshot.png (git-ignored) and to the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "examples" / "toys_schema.yaml"
DRAWN = ROOT / "examples" / "drawn"
CHROMIUM = Path(os.environ.get("MMLLM_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT = ROOT / "benchmarks" / "results" / "demo_screenshot.png"
UPLOAD_LIMIT = 2 * 2**20  # images; dumps get half of it
TIMEOUT_MS = 60_000  # one constrained answer of the tiny model takes about 2 s on 2 cores

pytestmark = [
    pytest.mark.slow,
    # gradio's queue calls pandas options that pandas 3 deprecates; nothing here to fix
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
]


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
def server(browser, tiny_checkpoint):
    """The app on a free port of 127.0.0.1 with a tiny model; closed after the module."""
    from demo.app import Limits, build_app, launch
    from mmllm.label import load_predictor

    predictor = load_predictor(model=str(tiny_checkpoint("qwen2_vl")), schema=str(SCHEMA_FILE), template=None,
                               constrained=True, max_new_tokens=64, batch_size=4, min_pixels=None, max_pixels=None)
    limits = Limits(max_image_bytes=UPLOAD_LIMIT, max_dump_bytes=UPLOAD_LIMIT // 2, max_dump_rows=20)
    app = build_app(predictor, limits=limits)
    url = launch(app, port=_free_port(), limits=limits, block=False)
    assert url.startswith("http://127.0.0.1:")
    yield url
    app.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#submit")
    yield page
    context.close()


def schema_check(record: dict) -> None:
    """The answer part of a record fits the schema: the JSON Schema and the schema module agree."""
    import jsonschema

    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_yaml(SCHEMA_FILE)
    answer = {"category": record["category"], "attributes": record["attributes"]}
    jsonschema.validate(answer, schema.json_schema())
    assert schema.validate(answer).ok


def wait_for_text(page, selector: str, text: str, fail_on: str | None = "Error:") -> str:
    """The element's text once it holds ``text``; an error message there fails at once, with the message."""
    page.wait_for_function("([sel, texts]) => texts.some(t => t && (document.querySelector(sel)?.innerText || '').includes(t))",
                           arg=[selector, [text, fail_on]])
    shown = page.locator(selector).inner_text()
    assert text in shown, f"{selector} says: {shown}"
    return shown


def upload(page, selector: str, path: Path) -> None:
    """Set the file and wait until gradio has it: its name shows while uploading, the served file after."""
    page.locator(f"{selector} input[type=file]").set_input_files(str(path))
    page.wait_for_selector(f"{selector} [src*='/gradio_api/file='], {selector} [href*='/gradio_api/file=']")


def test_a_typed_listing_with_a_drawn_image_gets_a_schema_valid_prediction(page, tmp_path):
    page.locator("#title textarea").fill("Soft Brown Teddy Bear 30cm Plush Toy")
    page.locator("#description textarea").fill("Cuddly plush bear with a satin ribbon. Suitable from birth.")
    for row, (name, value) in enumerate([("Material", "Polyester plush"), ("Age", "0 months +")]):
        for column, text in enumerate((name, value)):
            page.locator(f'#table [data-testid="cell-{row}-{column}"]').dblclick()
            page.keyboard.type(text)
            page.keyboard.press("Enter")
    upload(page, "#images", DRAWN / "images" / "teddy.png")
    page.click("#submit")

    status = wait_for_text(page, "#status", "validates against schema 'toys'")
    assert "Error" not in status
    record = json.loads(page.locator("#prediction-json .cm-content").inner_text())
    assert record["id"] == "demo" and record["status"] == "ok"
    schema_check(record)
    assert record["category"] in page.locator("#category").inner_text()
    seller = page.locator("#seller").inner_text()
    assert "Polyester plush" in seller and "0 months +" in seller
    assert "min_age_years" in page.locator("#predicted").inner_text()
    assert page.locator("#raw textarea").input_value().startswith('{"category"')  # the generative path's own text

    shot = tmp_path / "demo_screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    print(f"screenshot: {SCREENSHOT} (also {shot})")


def test_an_example_listing_is_one_click_away(page):
    page.get_by_text("Friction Powered Red Toy Car - Push and Go").click()
    page.wait_for_function("document.querySelector('#title textarea').value.startsWith('Friction Powered')")
    page.wait_for_selector("#images img")
    assert "ZoomZoom" in page.locator("#table").inner_text()


def test_the_batch_tab_round_trips_a_five_row_dump(page, tmp_path):
    rows = [json.loads(line) for line in (DRAWN / "catalog.jsonl").read_text().splitlines()[:5]]
    dump = tmp_path / "five.jsonl"
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.get_by_role("tab", name="Batch").click()
    upload(page, "#dump", dump)
    page.click("#batch-submit")

    status = wait_for_text(page, "#batch-status", " invalid, ")  # the final line, not the progress
    assert "5 ok, 0 invalid, 0 failed" in status
    with page.expect_download() as download:
        page.locator("#batch-out a").first.click()
    labelled = tmp_path / "labelled.jsonl"
    download.value.save_as(labelled)
    out = [json.loads(line) for line in labelled.read_text().splitlines()]
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    assert sorted(r["line"] for r in out) == [1, 2, 3, 4, 5] and {r["source"] for r in out} == {"five.jsonl"}
    for record in out:
        assert record["status"] == "ok"
        schema_check(record)


def test_a_bad_upload_is_answered_with_a_message(page, tmp_path):
    fake = tmp_path / "not_an_image.png"
    fake.write_text("this is a text file with a .png name")
    page.locator("#title textarea").fill("Mystery toy")
    upload(page, "#images", fake)
    page.click("#submit")

    status = wait_for_text(page, "#status", "not a recognised image", fail_on=None)
    assert status.strip().startswith("Error:") and "not_an_image.png" in status
    assert "Traceback" not in page.content()
    assert not page.locator("#prediction-json").inner_text().strip().startswith("{")  # no stale prediction


def test_an_upload_over_the_size_limit_is_refused_with_a_message(page, tmp_path):
    too_big = tmp_path / "too_big.png"
    too_big.write_bytes(os.urandom(UPLOAD_LIMIT + 1))  # gradio's max_file_size refuses it before the app sees it
    page.locator("#images input[type=file]").set_input_files(str(too_big))
    page.get_by_text("exceed the maximum allowed size").wait_for()
