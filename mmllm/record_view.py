"""How a label record is shown to a person: the category with its scores, one row per attribute with
its evidence and confidence, the title and description with the evidence spans marked, a one-line
summary. Pure functions of the record (and the listing's text), shared by the demo's tabs
(:mod:`mmllm.demo`, :mod:`mmllm.review_tab`); a record from another model kind or an older folder
shows what it has."""

from __future__ import annotations

import json
from typing import Any

from mmllm.evidence import TEXT_FIELDS  # the fields an evidence span points into

ATTRIBUTE_HEADERS = ["attribute", "value", "source", "evidence", "confidence", "note"]
SECTION_BREAK = "\n\n"  # between the title and the description in the highlighted text


def seller_rows(attributes: dict[str, Any]) -> list[list[Any]]:
    return [[name, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)]
            for name, value in attributes.items()]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def category_view(record: dict[str, Any]) -> dict[str, float] | str | None:
    """Scores when the model gives them (top-k, or one confidence), else the category alone."""
    if record.get("top_k"):
        return {item["category"]: float(item["score"]) for item in record["top_k"]}
    if record.get("category") and record.get("confidence") is not None:
        return {record["category"]: float(record["confidence"])}
    return record.get("category")


def attribute_rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per attribute (:data:`ATTRIBUTE_HEADERS`): the value, where it comes from, the text that
    says so, its confidence, and a note naming what was withheld, what lost and who agrees.

    A withheld value shows as null (``-``) with ``withheld: VALUE (CONFIDENCE)`` in its note, so a
    reviewer sees what was not published and why. A record without ``evidence`` (a folder fitted
    before grounding) is the model's own answer throughout: every row's source is ``model``."""
    attributes = record.get("attributes") if isinstance(record.get("attributes"), dict) else {}
    grounded = isinstance(record.get("evidence"), dict)
    evidence, withheld, conflicts, confidence = (_mapping(record.get(key)) for key in
                                                 ("evidence", "withheld", "conflicts", "attribute_confidence"))
    rows = []
    for name in [*attributes, *(n for n in withheld if n not in attributes)]:
        value = attributes.get(name)
        held = withheld.get(name) if value is None else None
        found = held if isinstance(held, dict) else evidence.get(name)
        notes = []
        if isinstance(held, dict):
            notes.append(f"withheld: {cell(held.get('value'))}{_parenthesized(held.get('confidence'))}")
        if isinstance(found, dict):
            source, text = evidence_source(found), _text(found.get("text"))
            score = found.get("confidence", confidence.get(name))
            notes += _agreeing(found)
        else:
            source, text, score = ("model" if value is not None or not grounded else ""), "", confidence.get(name)
        for other in conflicts.get(name) or []:
            if isinstance(other, dict):
                notes.append(f"{evidence_source(other)} said {cell(other.get('value'))}"
                             f"{_parenthesized(other.get('probability'))}")
        rows.append([name, cell(value), source, text, _score(score), "; ".join(notes)])
    return rows


def evidence_source(evidence: dict[str, Any]) -> str:
    """Where one value comes from, in words: ``table: Manufacturer recommended age``, ``title: n_pieces``,
    ``context: batteries_required=false`` or ``model``."""
    source = str(evidence.get("source") or "model")
    if source == "context":
        said = _mapping(evidence.get("from"))
        return f"context: {', '.join(f'{k}={cell(v)}' for k, v in said.items())}" if said else "context"
    key = evidence.get("key")
    return f"{source}: {key}" if key else source


def evidence_highlights(title: str, description: str, record: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The title, :data:`SECTION_BREAK` and the description as ``gr.HighlightedText`` segments, each
    evidence span labelled with its attribute (``piece_count``; ``piece_count (withheld)`` and
    ``piece_count (conflict)`` for values not published). Text covered by several spans ("ages 6-12"
    for two attributes) is labelled with all of them, joined by ", ". A span that is malformed or
    falls outside its text is ignored: the record may come from another version of the listing."""
    marks: dict[str, list[tuple[int, int, str]]] = {name: [] for name in TEXT_FIELDS}
    for label, found in _evidence_entries(record):
        for item in [found, *(found.get("also") if isinstance(found.get("also"), list) else [])]:
            where = _span(item)
            if where is not None:
                marks[where[0]].append((where[1], where[2], label))
    parts = [_segments(text, marks[name]) for name, text in zip(TEXT_FIELDS, (title or "", description or "")) if text]
    out: list[tuple[str, str | None]] = []
    for n, part in enumerate(parts):
        out += ([(SECTION_BREAK, None)] if n else []) + part
    return out


def attribute_summary(record: dict[str, Any]) -> str:
    """The batch preview's cell: each published value with its source, then the withheld attributes."""
    attributes = record.get("attributes") if isinstance(record.get("attributes"), dict) else {}
    evidence = _mapping(record.get("evidence"))
    shown = [f"{name}={cell(value)} ({_mapping(evidence.get(name)).get('source') or 'model'})"
             for name, value in attributes.items() if value is not None]
    withheld = list(_mapping(record.get("withheld")))
    return ", ".join(shown) + (f"; withheld: {', '.join(withheld)}" if withheld else "")


def _evidence_entries(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, evidence) of every value the record names: published, withheld, outvoted."""
    out = [(name, e) for name, e in _mapping(record.get("evidence")).items() if isinstance(e, dict)]
    out += [(f"{name} (withheld)", e) for name, e in _mapping(record.get("withheld")).items() if isinstance(e, dict)]
    for name, others in _mapping(record.get("conflicts")).items():
        out += [(f"{name} (conflict)", e) for e in (others if isinstance(others, list) else []) if isinstance(e, dict)]
    return out


def _span(evidence: Any) -> tuple[str, int, int] | None:
    """(field, start, end) of an evidence entry that points into the title or description, else None."""
    if not isinstance(evidence, dict) or evidence.get("source") not in TEXT_FIELDS:
        return None
    span = evidence.get("span")
    if not (isinstance(span, (list, tuple)) and len(span) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in span)):
        return None
    return evidence["source"], span[0], span[1]


def _segments(text: str, marks: list[tuple[int, int, str]]) -> list[tuple[str, str | None]]:
    """``text`` cut at every span boundary; each piece labelled with the spans covering it."""
    marks = [(start, end, label) for start, end, label in marks if 0 <= start < end <= len(text)]
    cuts = sorted({0, len(text), *(m[0] for m in marks), *(m[1] for m in marks)})
    out = []
    for start, end in zip(cuts, cuts[1:]):
        labels = dict.fromkeys(label for a, b, label in marks if a <= start and end <= b)  # ordered, no repeats
        out.append((text[start:end], ", ".join(labels) or None))
    return out


def _agreeing(evidence: dict[str, Any]) -> list[str]:
    """The note's part naming the other sources that state the same value."""
    notes = [f"also {evidence_source(other)}" for other in evidence.get("also") or [] if isinstance(other, dict)]
    model = evidence.get("model")
    if isinstance(model, dict) and model.get("agrees"):
        notes.append(f"model agrees{_parenthesized(model.get('probability'))}")
    applies = _mapping(evidence.get("applies"))
    said = [f"{who} {p:.2f}" for who, p in applies.items() if isinstance(p, (int, float)) and not isinstance(p, bool)]
    if said:  # how likely a listing like this one is to have a value at all
        notes.append("a value expected: " + ", ".join(said))
    return notes


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _score(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _parenthesized(value: Any) -> str:
    return f" ({_score(value)})" if _score(value) else ""
