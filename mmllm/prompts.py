"""Prompts: a listing and the label schema as ONE chat conversation.

A template is a versioned YAML file in ``prompts/`` (``listing_v1.yaml``): a system text, a user
text with ``$placeholders`` and a budget. :func:`build_messages` renders a listing into the
chat messages the Qwen-VL processors take (images first, then the text), and
:func:`target_text` gives the assistant answer: the schema's canonical JSON of the label.

The budget cuts what can be long (title, description, seller table) with a visible marker; the
images and the target are never cut, so a long listing costs prompt text, never supervision.
"""

from __future__ import annotations

import re
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmllm.catalog import Listing
from mmllm.config import load_yaml
from mmllm.schema import SEPARATOR, LabelSchema

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
DEFAULT_TEMPLATE = "listing_v1"
TEMPLATE_FILE = "prompt_template.yaml"  # its name inside a model folder
PLACEHOLDERS = {"title", "description", "table", "categories", "attributes"}


@dataclass(frozen=True)
class PromptBudget:
    """How much of a listing's text goes into the prompt (characters / rows)."""

    title_chars: int = 300
    description_chars: int = 1500
    table_rows: int = 30
    table_value_chars: int = 120
    schema: str = "full"  # full | attributes | none

    def __post_init__(self) -> None:
        if self.schema not in ("full", "attributes", "none"):
            raise ValueError(f"budget.schema must be full, attributes or none, got {self.schema!r}")
        for name in ("title_chars", "description_chars", "table_rows", "table_value_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"budget.{name} must be at least 1")


@dataclass(frozen=True)
class PromptTemplate:
    version: str
    system: str
    user: str
    budget: PromptBudget = field(default_factory=PromptBudget)
    path: Path | None = None

    @classmethod
    def load(cls, name_or_path: str | Path) -> "PromptTemplate":
        """A template by version name (``listing_v1``, from ``prompts/``) or by file path."""
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = PROMPTS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"prompt template {name_or_path!r} not found (shipped: {known})")
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
        unknown = set(data) - {"version", "system", "user", "budget"}
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
        for key in ("version", "system", "user"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise ValueError(f"{path}: '{key}' must be a non-empty string")
        for key in ("system", "user"):
            used = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(data[key])} - {None}
            if used - PLACEHOLDERS:
                raise ValueError(f"{path}: {key}: unknown placeholder(s) {sorted(used - PLACEHOLDERS)}; "
                                 f"known: {sorted(PLACEHOLDERS)}")
        try:
            budget = PromptBudget(**(data.get("budget") or {}))
        except TypeError as exc:
            raise ValueError(f"{path}: budget: {exc}") from None
        return cls(data["version"], data["system"].strip(), data["user"].strip(), budget, path)

    def save_to(self, folder: str | Path) -> Path:
        """Copy the template file into a model folder (labelling reads it from there)."""
        if self.path is None:
            raise ValueError("this template was not loaded from a file")
        out = Path(folder) / TEMPLATE_FILE
        shutil.copyfile(self.path, out)
        return out


def build_messages(
    listing: Listing,
    schema: LabelSchema,
    template: PromptTemplate,
    *,
    n_images: int | None = None,
    answer: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for one listing; ``n_images`` image entries go before the user text.

    Both texts take the placeholders: a template that puts the schema (``$categories``,
    ``$attributes``) in the system text and the listing in the user text renders the same first
    tokens for every row, which labelling encodes once (``listing_v2``, :mod:`mmllm.models.prefix_cache`).
    ``answer`` adds the assistant turn (training); without it the conversation ends at the
    user turn and the caller asks for a generation prompt.
    """
    n_images = len(listing.images) if n_images is None else n_images
    fields = render_fields(listing, schema, template.budget)
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": string.Template(template.user).substitute(fields)})
    messages = [
        {"role": "system", "content": [{"type": "text", "text": string.Template(template.system).substitute(fields)}]},
        {"role": "user", "content": content},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def target_text(listing: Listing, schema: LabelSchema) -> str:
    """The assistant answer for a labelled listing: canonical JSON (never cut)."""
    if listing.label is None:
        raise ValueError(f"{listing.source} line {listing.line} (id {listing.id!r}): no label to train on")
    try:
        return schema.canonical_json(listing.label)
    except ValueError as exc:
        raise ValueError(f"{listing.source} line {listing.line} (id {listing.id!r}): {exc}") from None


def render_fields(listing: Listing, schema: LabelSchema, budget: PromptBudget) -> dict[str, str]:
    """The placeholder values, each cut to its budget."""
    return {
        "title": _cut(_plain(listing.title), budget.title_chars),
        "description": _cut(_plain(listing.description), budget.description_chars) or "(none)",
        "table": render_table(listing.attributes, budget),
        "categories": render_categories(schema) if budget.schema == "full" else "(any category you learned)",
        "attributes": render_attributes(schema) if budget.schema != "none" else "(the attributes you learned)",
    }


def render_table(attributes: dict[str, Any], budget: PromptBudget) -> str:
    if not attributes:
        return "(none)"
    rows = []
    for name, value in list(attributes.items())[: budget.table_rows]:
        text = ", ".join(map(_cell, value)) if isinstance(value, list) else _cell(value)
        # the name on one line and within the budget too: a newline in it made a row of its own
        rows.append(f"- {_cut(_cell(name), budget.table_value_chars)}: {_cut(text, budget.table_value_chars)}")
    if len(attributes) > budget.table_rows:
        rows.append(f"(+{len(attributes) - budget.table_rows} more rows)")
    return "\n".join(rows)


def render_categories(schema: LabelSchema) -> str:
    """The taxonomy grouped by its top level: ``Games > Chess | Card Games`` costs fewer tokens. A top level
    that is a category itself as well as a parent (``Games`` and ``Games > Board``) gets a line of its own,
    or the model would never be shown it as an answer."""
    groups: dict[str, list[str]] = {}
    for path in schema.categories:
        head, _, rest = path.partition(SEPARATOR)
        groups.setdefault(head, []).append(rest)
    lines = []
    for head, rests in groups.items():
        leaves = [r for r in rests if r]
        if "" in rests and leaves:
            lines.append(f"- {head}")
        lines.append(f"- {head}" + (f" > {' | '.join(leaves)}" if leaves else ""))
    return "\n".join(lines)


def render_attributes(schema: LabelSchema) -> str:
    lines = []
    for a in schema.attributes:
        kind = f"one of {', '.join(a.values)}" if a.type == "enum" else (
            f"list of {', '.join(a.values)}" if a.type == "list" else a.type)
        lines.append(f"- {a.name} ({kind}): {a.description}")
    return "\n".join(lines)


_CONTROL = re.compile(r"<\|")  # what opens the chat template's control tokens (<|im_end|>, <|im_start|>, ...)


def _plain(text: str) -> str:
    """A seller's text as plain text: "<|im_end|>" written in a description would be tokenized as the real
    control token, closing the user turn and opening a made-up answer; "< |im_end|>" is words."""
    return _CONTROL.sub("< |", text)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _plain(" ".join(str(value).split()))


def _cut(text: str, limit: int) -> str:
    """Cut at a word boundary, with a marker so the model can tell text was dropped."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    if text[limit] == " ":  # the limit falls between two words: the words before it fit whole
        return text[:limit] + " [...]"
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut + " [...]"
