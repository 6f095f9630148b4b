"""The demo's review tab: a person steps through the review queue and accepts or corrects each label.

    mmllm demo --model MODEL --review labels.jsonl --review-dump dump.jsonl [--corrections C] [--reviewer NAME]

Each row shows its photos, title, description and seller table, the predicted category with its
top-k, and the attributes with their evidence and confidence (:mod:`mmllm.record_view`). The editors
are the schema's own: the category is picked from the taxonomy (type to search the paths), an enum
or boolean from its values, a number within its bounds, a list from its allowed items. **Accept**
saves the prediction as the gold label (for the category only where the model withheld an attribute:
no one checked that value), **Save correction** saves the edited one, **Skip** moves on
without a decision. Every decision is appended to the corrections file at once
(:class:`mmllm.labelling.review.Corrections`), so a browser reload shows the first row not yet
decided and nothing is lost or decided twice. The corrections file is a catalog: put it in a
recipe's ``data.train``.

:class:`ReviewDesk` holds the behaviour without Gradio (the unit tests call it);
:func:`build_review_tab` lays it out inside the demo's ``gr.Blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from mmllm.images import ImageError, ImagePolicy, load_image
from mmllm.labelling.review import CorrectionError, ReviewItem, ReviewSession
from mmllm.record_view import ATTRIBUTE_HEADERS, attribute_rows, category_view, seller_rows
from mmllm.schema import AttributeSpec

NULL = "(not stated)"  # the editors' choice for null


@dataclass
class ReviewView:
    """What the tab shows for one queued row (``row_id`` None: the queue is done)."""

    progress: str
    row_id: str | None
    pictures: list[tuple[Image.Image, str]] = field(default_factory=list)
    title: str = ""
    description: str = ""
    seller: list[list[Any]] = field(default_factory=list)
    category: Any = None
    attributes: list[list[str]] = field(default_factory=list)
    editors: list[Any] = field(default_factory=list)  # the category, then one value per schema attribute


class ReviewDesk:
    """The review tab's behaviour over a :class:`ReviewSession`."""

    def __init__(self, session: ReviewSession, reviewer: str = "", max_pictures: int = 4) -> None:
        self.session, self.reviewer, self.max_pictures = session, reviewer, max_pictures
        self.specs: list[AttributeSpec] = list(session.schema.attributes)

    def current(self, skipped: Sequence[str] = ()) -> ReviewView:
        """The first queued row neither decided (in the corrections file) nor skipped in this browser."""
        item = self.session.next_item(skipped)
        return self.view(item, skipped)

    def accept(self, row_id: str | None, skipped: Sequence[str] = ()) -> tuple[ReviewView, str]:
        if not row_id:
            return self.current(skipped), "The queue is done: nothing to accept."
        row = self.session.accept(row_id, self.reviewer)
        unreviewed = row["review"].get("attributes_unreviewed")
        if unreviewed:
            return self.current(skipped), (f"Saved: **{row_id}** accepted as predicted, for its category only: "
                                           f"{', '.join(unreviewed)} withheld by the model (correct the row to "
                                           "label its attributes).")
        return self.current(skipped), f"Saved: **{row_id}** accepted as predicted."

    def correct(self, row_id: str | None, values: Sequence[Any], skipped: Sequence[str] = ()) -> tuple[ReviewView, str]:
        if not row_id:
            return self.current(skipped), "The queue is done: nothing to correct."
        label = self.label_from(values)
        row = self.session.correct(row_id, label, self.reviewer)
        unreviewed = row["review"].get("attributes_unreviewed")
        if unreviewed:
            return self.current(skipped), (f"Saved: **{row_id}** corrected to {label['category']}, for its category "
                                           f"only: {', '.join(unreviewed)} withheld by the model and left as they "
                                           "were (change an attribute to label them all).")
        return self.current(skipped), f"Saved: **{row_id}** corrected to {label['category']}."

    def skip(self, row_id: str | None, skipped: Sequence[str] = ()) -> tuple[ReviewView, list[str], str]:
        skipped = [*skipped, row_id] if row_id else list(skipped)
        return self.current(skipped), skipped, f"Skipped **{row_id}** (no decision saved)." if row_id else ""

    # ---------------------------------------------------------------- editors
    def label_from(self, values: Sequence[Any]) -> dict[str, Any]:
        """The editors' values -> a label (the schema validates it when it is saved)."""
        category, *attribute_values = values
        if not category or category == NULL:
            raise CorrectionError("Pick a category from the taxonomy.")
        attributes = {spec.name: _from_editor(spec, value) for spec, value in zip(self.specs, attribute_values)}
        return {"category": category, "attributes": attributes}

    def view(self, item: ReviewItem | None, skipped: Sequence[str] = ()) -> ReviewView:
        session = self.session
        total, decided = len(session.queue), session.decided
        if item is None:
            left = f"; {len(skipped)} skipped in this browser (reload to see them again)" if skipped else ""
            return ReviewView(f"**Queue done**: {decided} of {total} rows decided{left}. Corrections: "
                              f"`{session.corrections.path}`", None,
                              editors=[None] + [_to_editor(s, None) for s in self.specs])
        record, listing = item.record, item.listing
        reason = record.get("review_reason") or (f"confidence {record['confidence']:.3g}"
                                                 if record.get("confidence") is not None else "no confidence")
        progress = (f"Row **{item.position + 1}** of {total} in the queue · {decided} decided · "
                    f"`{listing.id}` · {reason}")
        attributes = record.get("attributes") if isinstance(record.get("attributes"), dict) else {}
        editors = [record.get("category") if record.get("status") == "ok" else None]
        editors += [_to_editor(spec, attributes.get(spec.name)) for spec in self.specs]
        return ReviewView(progress, listing.id, self._pictures(listing), listing.title, listing.description,
                          seller_rows(listing.attributes), category_view(record), attribute_rows(record), editors)

    def _pictures(self, listing: Any) -> list[tuple[Image.Image, str]]:
        policy = ImagePolicy(root=self.session.roots.get(listing.source))
        pictures = []
        for ref in listing.images[: self.max_pictures]:
            try:
                pictures.append((load_image(ref, policy), ref))
            except ImageError as exc:  # a broken photo is named, the row is still reviewable
                pictures.append((Image.new("RGB", (160, 120), (235, 235, 235)), f"{ref}: {exc.detail}"))
        return pictures


def _to_editor(spec: AttributeSpec, value: Any) -> Any:
    if spec.type in ("enum", "string"):
        return NULL if value is None and spec.type == "enum" else ("" if value is None else value)
    if spec.type == "boolean":
        return NULL if value is None else ("true" if value else "false")
    if spec.type == "list":
        return list(value or [])
    return value  # integer / number: None is an empty box


def _from_editor(spec: AttributeSpec, value: Any) -> Any:
    if value is None or value == NULL or value == "" or value == []:
        return None
    if spec.type == "boolean":
        return value == "true"
    if spec.type == "integer":
        number = float(value)
        if not number.is_integer():
            raise CorrectionError(f"{spec.name}: {value} is not a whole number.")
        return int(number)
    if spec.type == "number":
        return float(value)
    return value


# ---------------------------------------------------------------------- the Gradio tab
def build_review_tab(desk: ReviewDesk | None, app: Any) -> None:
    """The tab's components and events, inside the caller's ``gr.Blocks`` (``app``) and ``gr.Tab``."""
    import gradio as gr

    if desk is None:
        gr.Markdown("Start the demo with `--review LABELS.jsonl --review-dump DUMP.jsonl` (a labels file from "
                    "`mmllm label ... --review-below T`, or any labels file, and the dump it labelled) to review "
                    "its queue here.", elem_id="review-help")
        return
    schema = desk.session.schema
    skipped = gr.State([])
    row_id = gr.State(None)
    progress = gr.Markdown(elem_id="review-progress")
    with gr.Row():
        with gr.Column(scale=5):
            pictures = gr.Gallery(label="Photos", columns=3, height=220, interactive=False, elem_id="review-photos")
            title = gr.Textbox(label="Title", interactive=False, elem_id="review-title")
            description = gr.Textbox(label="Description", lines=4, interactive=False, elem_id="review-description")
            seller = gr.Dataframe(headers=["seller's attribute", "value"], interactive=False,
                                  label="Seller's values", elem_id="review-seller")
        with gr.Column(scale=6):
            category = gr.Label(label="Predicted category (top-k)", num_top_classes=5, elem_id="review-category")
            attributes = gr.Dataframe(headers=ATTRIBUTE_HEADERS, interactive=False, wrap=True,
                                      label="Predicted attributes, with their evidence (- = null)",
                                      elem_id="review-attributes")
            editors = [gr.Dropdown(choices=list(schema.categories), label="Category (type to search the paths)",
                                   filterable=True, allow_custom_value=False, elem_id="review-edit-category")]
            editors += [_editor(gr, spec) for spec in desk.specs]
            with gr.Row():
                accept = gr.Button("Accept", variant="primary", elem_id="review-accept")
                correct = gr.Button("Save correction", elem_id="review-correct")
                skip = gr.Button("Skip", elem_id="review-skip")
            status = gr.Markdown(elem_id="review-status")

    shown = [progress, row_id, pictures, title, description, seller, category, attributes, *editors]

    def values(view: ReviewView) -> list[Any]:
        return [view.progress, view.row_id, view.pictures or None, view.title, view.description, view.seller or None,
                view.category, view.attributes or None, *view.editors]

    def guarded(fn):
        def run(*args: Any) -> list[Any]:
            try:
                return fn(*args)
            except (CorrectionError, ValueError) as exc:  # the view stays, the message says what to fix
                return [gr.update()] * (len(shown) + 1) + [f"**Not saved:** {exc}"]
        return run

    def on_load(skip_list: list[str]) -> list[Any]:
        return [*values(desk.current(skip_list)), skip_list, ""]

    def on_accept(current: str | None, skip_list: list[str]) -> list[Any]:
        view, message = desk.accept(current, skip_list)
        return [*values(view), skip_list, message]

    def on_correct(current: str | None, skip_list: list[str], *edited: Any) -> list[Any]:
        view, message = desk.correct(current, edited, skip_list)
        return [*values(view), skip_list, message]

    def on_skip(current: str | None, skip_list: list[str]) -> list[Any]:
        view, skip_list, message = desk.skip(current, skip_list)
        return [*values(view), skip_list, message]

    outputs = [*shown, skipped, status]
    # concurrency_limit=1: one decision at a time, in the order they were clicked
    accept.click(guarded(on_accept), [row_id, skipped], outputs, concurrency_limit=1)
    correct.click(guarded(on_correct), [row_id, skipped, *editors], outputs, concurrency_limit=1)
    skip.click(guarded(on_skip), [row_id, skipped], outputs, concurrency_limit=1)
    app.load(on_load, [skipped], outputs)  # a reload starts at the first row not yet decided


def _editor(gr: Any, spec: AttributeSpec) -> Any:
    """A typed editor limited to what the schema allows for ``spec``."""
    label = f"{spec.name} ({spec.type})"
    elem_id = f"review-edit-{spec.name}"
    if spec.type == "enum":
        return gr.Dropdown(choices=[NULL, *spec.values], label=label, elem_id=elem_id)
    if spec.type == "boolean":
        return gr.Radio(choices=[NULL, "true", "false"], label=label, elem_id=elem_id)
    if spec.type == "list":
        return gr.Dropdown(choices=list(spec.values), multiselect=True, max_choices=spec.max_items, label=label,
                           elem_id=elem_id)
    if spec.type in ("integer", "number"):
        bounds = " to ".join(str(b) for b in (spec.minimum, spec.maximum) if b is not None)
        # bounds and whole numbers are checked on save (the schema's message in the status line), not by the
        # widget, whose own refusal would be a toast that names no field
        return gr.Number(label=f"{label}{f', {bounds}' if bounds else ''}; empty = not stated", elem_id=elem_id)
    return gr.Textbox(label=f"{label}; empty = not stated", max_length=spec.max_length, elem_id=elem_id)
