"""Grounded attributes in the evaluation: stated / completed / unknown, and accuracy by evidence source,
against hand counts on six rows (see the table above GOLD)."""

import json
from pathlib import Path

import pytest

from mmllm.evaluate import main

SCHEMA = r"""
name: tiny
taxonomy: ["Toys > Building", "Toys > Electronic"]
attributes:
  piece_count:
    type: integer
    minimum: 1
    maximum: 100000
    evidence:
      table: ["Number of Pieces"]
      text: [{name: n_pieces, pattern: '(?P<value>[0-9]+)\s*pieces'}]
  batteries_required:
    type: boolean
    evidence:
      table: ["Batteries Required"]
      text: [{name: no_batteries, pattern: 'batteries not required', value: false}]
"""

# id, title, description, seller table, gold (piece_count, batteries_required); situations from the listing:
#   g1 pieces in title, batteries in description: extraction, extraction
#   g2 batteries in table:                         completion, extraction
#   g3 pieces in table:                            extraction, unknown
#   g4 nothing stated:                             unknown,    completion
#   g5 title says 50 pieces, gold says 48:         completion (the gold's 48 is not stated), unknown
#   g6 category only:                              unknown,    unknown
GOLD = [("g1", "Castle 500 pieces", "Batteries not required.", {}, (500, False)),
        ("g2", "Robot", "", {"Batteries Required": "Yes"}, (30, True)),
        ("g3", "Puzzle", "", {"Number of Pieces": "1000"}, (1000, None)),
        ("g4", "Doll", "", {}, (None, False)),
        ("g5", "Blocks 50 pieces", "", {}, (48, None)),
        ("g6", "Ball", "", {}, (None, None))]
# predicted (value, source) per attribute; g6's record predates evidence (no "evidence" key)
PRED = {"g1": {"piece_count": (500, "title"), "batteries_required": (False, "description")},  # right, right
        "g2": {"piece_count": (25, "model"), "batteries_required": (True, "table")},  # wrong, right
        "g3": {"piece_count": (1000, "table"), "batteries_required": (True, "model")},  # right, invented
        "g4": {"piece_count": (12, "model"), "batteries_required": (None, None)},  # invented, abstained
        "g5": {"piece_count": (50, "title"), "batteries_required": (None, None)},  # wrong, abstained
        "g6": {"piece_count": (3, None), "batteries_required": (False, None)}}  # invented, invented


def write(tmp_path: Path, *, schema: str = SCHEMA, evidence: bool = True) -> list[str]:
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({
        "id": i, "title": title, "description": description, "attributes": table,
        "label": {"category": "Toys > Building", "attributes": dict(zip(("piece_count", "batteries_required"), values))}})
        + "\n" for i, title, description, table, values in GOLD))
    records = []
    for i, attrs in PRED.items():
        record = {"id": i, "category": "Toys > Building", "status": "ok",
                  "attributes": {k: value for k, (value, _) in attrs.items()}}
        if evidence and i != "g6":
            record["evidence"] = {k: {"source": source, "confidence": 0.9} for k, (value, source) in attrs.items()
                                  if value is not None}
        records.append(record)
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in records))
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(schema)
    return ["--pred", str(pred), "--gold", str(gold), "--schema", str(schema_path), "--report", str(tmp_path / "report"),
            "--bootstrap", "20"]


def scores(rows, answered, correct, accuracy, precision, recall, f1, **invented):
    return {"rows": rows, "answered": answered, "correct": correct, "accuracy": pytest.approx(accuracy),
            "precision": pytest.approx(precision), "recall": pytest.approx(recall), "f1": pytest.approx(f1), **invented}


def by_source(answered, correct, wrong, invented, precision):
    return {"answered": answered, "correct": correct, "wrong": wrong, "invented": invented, "precision": precision}


def test_situations_and_sources_by_hand(tmp_path, capsys):
    assert main(write(tmp_path)) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"]
    situations = metrics["attribute_situations"]
    assert situations["per_attribute"]["piece_count"] == {
        "extraction": scores(2, 2, 2, 1.0, 1.0, 1.0, 1.0),  # g1 g3 right
        "completion": scores(2, 2, 0, 0.0, 0.0, 0.0, 0.0),  # g2 25 vs 30; g5 50 as its title says, vs 48
        "unknown": scores(2, 2, 0, 0.0, 0.0, None, None, invented=1.0)}  # g4, g6 invented
    assert situations["per_attribute"]["batteries_required"] == {
        "extraction": scores(2, 2, 2, 1.0, 1.0, 1.0, 1.0),  # g1 description, g2 table
        "completion": scores(1, 0, 0, 0.0, None, 0.0, None),  # g4 abstained on a known value
        "unknown": scores(3, 2, 0, 1 / 3, 0.0, None, None, invented=pytest.approx(2 / 3))}  # g5 abstained
    assert situations["total"] == {"extraction": scores(4, 4, 4, 1.0, 1.0, 1.0, 1.0),
                                   "completion": scores(3, 2, 0, 0.0, 0.0, 0.0, 0.0),
                                   "unknown": scores(5, 4, 0, 0.2, 0.0, None, None, invented=0.8)}

    sources = metrics["attribute_sources"]
    assert sources["total"] == {"table": by_source(2, 2, 0, 0, 1.0), "title": by_source(2, 1, 1, 0, 0.5),
                                "description": by_source(1, 1, 0, 0, 1.0), "context": by_source(0, 0, 0, 0, None),
                                "model": by_source(3, 0, 1, 2, 0.0),
                                "unknown": by_source(2, 0, 0, 2, 0.0)}
    assert sources["per_attribute"] == {
        "piece_count": {"table": by_source(1, 1, 0, 0, 1.0), "title": by_source(2, 1, 1, 0, 0.5),
                        "model": by_source(2, 0, 1, 1, 0.0), "unknown": by_source(1, 0, 0, 1, 0.0)},
        "batteries_required": {"table": by_source(1, 1, 0, 0, 1.0), "description": by_source(1, 1, 0, 0, 1.0),
                               "model": by_source(1, 0, 0, 1, 0.0), "unknown": by_source(1, 0, 0, 1, 0.0)}}
    # the headline attribute score is the old one: 4 right of 10 answered and 7 gold values
    assert metrics["attribute_micro_f1"] == pytest.approx(2 * 0.4 * (4 / 7) / (0.4 + 4 / 7))

    report = tmp_path / "report"
    text = (report / "report.md").read_text()
    assert "## Attributes: stated, completed, unknown" in text and "## Attributes by evidence source" in text
    assert "| piece_count | unknown | 2 | 2 | 0 | 0.000 | 0.000 | – | – | 1.000 |" in text
    assert "| **all** | extraction | 4 | 4 | 4 | 1.000 | 1.000 | 1.000 | 1.000 | – |" in text
    assert "| title | 2 | 1 | 1 | 0 | 0.500 |" in text
    assert "![attribute_situations](attribute_situations.png)" in text
    assert (report / "attribute_situations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "unknown" in out.split("attribute_micro_f1")[1] and "0.800" in out


def test_schema_without_evidence_skips_the_situations(tmp_path):
    plain = "\n".join(line for line in SCHEMA.splitlines() if "evidence" not in line and "text:" not in line
                      and "table:" not in line)
    assert main(write(tmp_path, schema=plain)) == 0
    report = tmp_path / "report"
    metrics = json.loads((report / "metrics.json").read_text())["metrics"]
    assert metrics["attribute_situations"] is None
    assert metrics["attribute_sources"]["total"]["model"] == {"answered": 3, "correct": 0, "wrong": 1, "invented": 2,
                                                              "precision": 0.0}
    text = (report / "report.md").read_text()
    assert "## Attributes: stated, completed, unknown\n\nSkipped: needs a schema" in text
    assert not (report / "attribute_situations.png").exists()


def test_records_without_evidence_count_as_source_unknown(tmp_path):
    args = write(tmp_path, evidence=False)
    pred = Path(args[1])
    records = [json.loads(line) for line in pred.read_text().splitlines()]
    records[0]["evidence"] = "garbled"  # not an object: unknown too, and no reason to reject the answer
    records[1]["evidence"] = {"piece_count": {"confidence": 0.5}, "batteries_required": {"source": "oracle"}}
    pred.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(args) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"]
    total = metrics["attribute_sources"]["total"]
    assert total["unknown"] == {"answered": 10, "correct": 4, "wrong": 2, "invented": 4, "precision": 0.4}
    assert all(total[s]["answered"] == 0 and total[s]["precision"] is None for s in ("table", "title", "description", "model"))
    assert metrics["json_valid_rate"] == 1.0 and metrics["attribute_situations"]["total"]["extraction"]["correct"] == 4
