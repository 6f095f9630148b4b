"""The human review loop: which labelled rows a person checks, in which order, and what they decide.

No model labels a whole catalog right. A team publishes what it can trust and sends the rest to
people, and what the people decide becomes training data:

- **Flags** (:func:`flag`): ``mmllm label --review-below T`` (or ``--review-target-accuracy A``,
  turned into T by the model folder's ``calibration.json``, :mod:`mmllm.confidence`) marks every
  record ``review: true`` whose category confidence is below T, has none, or is invalid, with the
  reason in ``review_reason``.
- **The queue** (:func:`write_queue`): the flagged records of a labels file, least confident first,
  rewritten whole (write a temporary file, then rename) at the end of every run, resumed or not.
- **Corrections** (:class:`Corrections`): each decision - the model's label accepted, or a label
  corrected with the schema's own pickers - is one catalog row with its gold ``label`` (and a
  ``review`` record of who decided what against which prediction), appended and flushed at once.
  The file is append-only and locked while open; reopening it skips the rows already decided, so a
  reload or a crash loses nothing and decides nothing twice. It is a catalog like any other: put it
  in any recipe's ``data.train`` (image paths stay relative to the dump's folder, so it is written
  there by default).
- **The session** (:class:`ReviewSession`): a labels file, its dump(s) and the corrections file,
  for the demo's review tab (:mod:`mmllm.demo`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mmllm.catalog import CatalogReader, Listing, attributes_labelled
from mmllm.file_lock import Held, hold
from mmllm.labelling.output import OutputError, check_paths, scan_records, starts_a_record
from mmllm.schema import LabelSchema

QUEUE_SUFFIX = ".review.jsonl"
CORRECTIONS_SUFFIX = ".corrections.jsonl"
DECISIONS = ("accepted", "corrected")


# ---------------------------------------------------------------------- flags and the queue
def flag(record: dict[str, Any], threshold: float) -> dict[str, Any]:
    """``{"review": bool[, "review_reason": str]}`` for one label record (errors are not reviewed:
    they have no prediction to check and are in ``--errors``)."""
    if record.get("status") == "invalid":
        return {"review": True, "review_reason": "invalid answer"}
    confidence = record.get("confidence")
    if confidence is None:
        return {"review": True, "review_reason": "no confidence"}
    if confidence < threshold:
        return {"review": True, "review_reason": f"confidence {confidence:.3g} < {threshold:.6g}"}
    return {"review": False}


def withheld_attributes(record: dict[str, Any]) -> list[str]:
    """The attributes a record leaves null because its value was withheld (too unsure to publish)."""
    withheld = record.get("withheld") if isinstance(record.get("withheld"), dict) else {}
    attributes = record.get("attributes") if isinstance(record.get("attributes"), dict) else {}
    return sorted(name for name in withheld if attributes.get(name) is None)


def queue_order(record: dict[str, Any]) -> tuple[float, str, int]:
    """Least confident first (no confidence: first of all); then by file and line, for a stable order."""
    confidence = record.get("confidence")
    return (-math.inf if confidence is None else float(confidence), str(record.get("source")), record.get("line") or 0)


def default_queue_path(out: Path) -> Path:
    return out.with_name(out.name + QUEUE_SUFFIX) if not out.name.endswith(".jsonl") else \
        out.with_name(out.name[: -len(".jsonl")] + QUEUE_SUFFIX)


def check_queue_path(queue: Path, resume: bool = False) -> None:
    """A queue path may be new, empty, or (``--resume``) a queue this module wrote; anything else is the user's
    file, or another run's queue (two shards given one ``--review-out``: the second replaced the first's rows).
    Its folder is made now, so that a run never ends without the queue it promised."""
    if queue.is_symlink():  # the queue is replaced whole: the link would go, its target left empty
        raise OutputError(f"--review-out {queue} is a symbolic link (to {os.readlink(queue)}); give the queue's own "
                          "path")
    if queue.is_dir():
        raise OutputError(f"--review-out {queue} is a folder; give a file path")
    queue.parent.mkdir(parents=True, exist_ok=True)
    if not queue.exists() or queue.stat().st_size == 0:
        return
    rows, ours = 0, True

    def count(record: dict[str, Any]) -> None:
        nonlocal rows, ours
        rows += 1
        ours = ours and record.get("review") is True

    try:
        scan_records(queue, "--review-out", count)  # one line at a time: a queue may hold millions of rows
    except OutputError:
        ours = False
    if not rows or not ours:  # (a queue is never torn: it is replaced whole)
        raise OutputError(f"--review-out {queue} exists and is not a review queue written by `mmllm label`; "
                          "choose another path")
    if not resume:  # a new --out's queue: the file there is another run's
        raise OutputError(f"--review-out {queue} holds the review queue of another run ({rows:,} rows); "
                          "give each run its own --review-out, or --resume the run it belongs to")


def write_queue(out: Path, queue: Path) -> int:
    """The flagged records of ``out``, least confident first, as ``queue``; returns how many. Reads ``out`` one
    line at a time, keeping the flagged records only. An existing queue holding a row ``out`` does not have, or
    answers otherwise (another model or setting over the same dump), is another run's and is not replaced (the
    records in ``out`` carry their review flags: nothing is lost)."""
    flagged: list[dict[str, Any]] = []
    answers: dict[str, int] = {}  # id -> a digest of its flagged record: another run's queue may share the ids

    def keep(record: dict[str, Any]) -> None:
        if record.get("review") is True:  # (an error record, a repeated id's among them, is never flagged)
            flagged.append(record)
            answers[str(record.get("id"))] = _digest(record)

    scan_records(out, "--out", keep)
    if queue.exists() and queue.stat().st_size:
        foreign: list[Any] = []
        scan_records(queue, "--review-out",
                     lambda r: None if answers.get(str(r.get("id"))) == _digest(r) else foreign.append(r.get("id")))
        if foreign:
            raise OutputError(f"--review-out {queue} holds rows of another run (id {foreign[0]!r} is not flagged in "
                              f"{out}, or {out} answers it otherwise): not replaced; write this run's queue with `mmllm "
                              f"label ... --out {out} --resume --review-out OTHER`")
    flagged.sort(key=queue_order)
    tmp = queue.with_name(f"{queue.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in flagged:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, queue)  # a kill leaves the old queue or the new one
    return len(flagged)


def _digest(record: dict[str, Any]) -> int:
    return hash(json.dumps(record, sort_keys=True, ensure_ascii=False))


# ---------------------------------------------------------------------- corrections
def _whole_json(raw: bytes) -> bool:
    """Whether a line is one whole JSON value (a write cut short is not)."""
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


class CorrectionError(ValueError):
    """A decision that cannot be saved (a label outside the schema, a row decided already)."""


class Corrections:
    """The append-only file of reviewed rows (catalog rows with a gold ``label``), locked while open."""

    def __init__(self, path: Path, schema: LabelSchema, *, inputs: Sequence[Path] = ()) -> None:
        self.path, self.schema = Path(path), schema
        check_paths(inputs, {"corrections file": self.path})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.decided: dict[str, str] = {}  # id -> decision
        self._lock = threading.Lock()
        try:
            self._fd = hold(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        except Held:
            raise OutputError(f"corrections file {self.path} is held by another process (a review session, or a "
                              "`mmllm label` run writing it as its review queue); close it first, or choose another "
                              "file") from None
        self._read_back()

    def _read_back(self) -> None:
        whole, ended = 0, True
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):  # the last line: a row a kill cut short, a whole row (a hand edit
                    ended = False             # dropped its newline), or a file that is not ours
                    if self._decision(raw) is None:
                        if starts_a_record(raw) and not _whole_json(raw):
                            break  # torn mid-write: cut below (a whole line that is no reviewed row is refused)
                        self._refuse(number)
                try:
                    row = json.loads(raw)
                    self.decided[str(row["id"])] = row["review"]["decision"]
                except (ValueError, KeyError, TypeError):
                    self._refuse(number)
                whole += len(raw)
        if os.fstat(self._fd).st_size != whole:
            os.ftruncate(self._fd, whole)
        elif not ended:  # a whole row without its newline: kept, and the next one starts on a line of its own
            os.write(self._fd, b"\n")

    @staticmethod
    def _decision(raw: bytes) -> str | None:
        try:
            row = json.loads(raw)
            return str(row["review"]["decision"]) if isinstance(row, dict) and row.get("id") is not None else None
        except (ValueError, KeyError, TypeError):
            return None

    def _refuse(self, number: int) -> None:
        os.close(self._fd)
        self._fd = None
        raise OutputError(f"corrections file {self.path} line {number} is not a reviewed row: it is not "
                          "a file `mmllm demo` wrote; choose another path") from None

    def save(self, listing: Listing, label: dict[str, Any], decision: str, prediction: dict[str, Any],
             reviewer: str = "", unreviewed: Sequence[str] = ()) -> dict[str, Any]:
        """Append the reviewed row; refuses a label the schema rejects or a row decided already.

        A label without ``attributes`` (or with ``null``) is saved as a gold label for the category only
        (:func:`mmllm.catalog.attributes_labelled`); ``unreviewed`` names the attributes no one checked."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        result = self.schema.validate(label)
        if not result.ok:
            raise CorrectionError(f"row {listing.id!r}: the label does not fit schema '{self.schema.name}': {result.reason()}")
        gold = result.value if attributes_labelled(label) else {"category": result.value["category"]}
        review = {"decision": decision, "reviewer": reviewer, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "predicted": {k: prediction.get(k) for k in ("category", "attributes", "confidence")},
                  "labels_source": prediction.get("source"), "labels_line": prediction.get("line")}
        if unreviewed:
            review["attributes_unreviewed"] = list(unreviewed)
        row = {"id": listing.id, "title": listing.title, "description": listing.description,
               "attributes": listing.attributes, "images": list(listing.images), "label": gold, "review": review}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if listing.id in self.decided:
                raise CorrectionError(f"row {listing.id!r} was already {self.decided[listing.id]} in {self.path.name}")
            start = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)  # saved at once: a browser reload or a crash keeps it
            except OSError as exc:
                os.ftruncate(self._fd, start)
                raise CorrectionError(f"writing {self.path} failed: {exc.strerror or exc}") from exc
            self.decided[listing.id] = decision
        return row

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------- a review session
@dataclass
class ReviewItem:
    listing: Listing
    record: dict[str, Any]
    position: int  # 0-based place in the queue


@dataclass
class ReviewSession:
    """The rows to review (a labels file's flagged records, least confident first; all its ok and
    invalid records when none is flagged), their listings from the dump(s), and the corrections."""

    schema: LabelSchema
    queue: list[dict[str, Any]]
    listings: dict[str, Listing]
    corrections: Corrections
    roots: dict[str, Path] = field(default_factory=dict)  # dump file name -> its folder (images resolve there)
    notes: list[str] = field(default_factory=list)  # what the person starting the desk should know

    @classmethod
    def open(cls, labels: Path, dumps: Sequence[Path], schema: LabelSchema, corrections: Path | None = None) -> "ReviewSession":
        labels, dumps = Path(labels), [Path(d) for d in dumps]
        folders = {d.resolve().parent for d in dumps}
        if len(folders) > 1:  # the corrections keep each row's image paths, which resolve in one folder
            raise OutputError(f"the dumps lie in {len(folders)} folders; review one folder's dumps at a time (the "
                              "corrections file keeps their image paths, which resolve in its own folder)")
        if labels.is_dir():
            raise OutputError(f"labels file {labels} is a folder; give the labels JSONL `mmllm label --out` wrote")
        # read one line at a time, keeping the queue only: the flagged records where the run flagged rows,
        # else every answer (100,000 records for a queue of 2,000 took 370 MB read whole)
        flagged: list[dict[str, Any]] = []
        plain: list[dict[str, Any]] = []
        marked = False

        def keep(record: dict[str, Any]) -> None:
            nonlocal marked
            if record.get("status") not in ("ok", "invalid") or record.get("id") is None:
                return
            if "review" in record and not marked:
                marked = True
                plain.clear()
            if record.get("review") is True:
                flagged.append(record)
            elif not marked:
                plain.append(record)

        scan_records(labels, "labels file", keep)
        queue = sorted(flagged if marked else plain, key=queue_order)
        names = {d.name for d in dumps}
        foreign = [r for r in queue if r.get("source") is not None and r["source"] not in names]
        if foreign:
            raise OutputError(f"{labels.name} was labelled from {foreign[0]['source']!r} (first: id {foreign[0]['id']!r}), "
                              f"not from {', '.join(sorted(names))}; give the dump(s) it was labelled from")
        listings = _labelled_listings(queue, dumps)
        missing = [r["id"] for r in queue if str(r["id"]) not in listings]
        if missing:
            raise OutputError(f"{len(missing)} queued row(s) are not in {', '.join(d.name for d in dumps)} "
                              f"(first: {missing[0]!r}); give the dump(s) {labels.name} was labelled from")
        path = Path(corrections) if corrections else dumps[0].with_name(dumps[0].name.split(".")[0] + CORRECTIONS_SUFFIX)
        store = Corrections(path, schema, inputs=[labels, *dumps])
        session = cls(schema, queue, listings, store, {d.name: d.resolve().parent for d in dumps})
        folder = dumps[0].resolve().parent
        if path.resolve().parent != folder and any(item.images for item in listings.values()):
            session.notes.append(f"the corrections keep the rows' image paths, which resolve in {folder}: to train on "
                                 f"{path.name} with its photos, set data.image_root={folder} in the recipe")
        return session

    def __post_init__(self) -> None:
        # each click costs the same at the queue's end as at its start: an index by id, and a cursor before
        # which every row is decided (decisions are only ever added); scanning the queue from its first row on
        # every click took 117 ms a click after 55,000 decisions
        self._position: dict[str, int] = {}
        self._records = Counter(str(record["id"]) for record in self.queue)  # a dump's repeated id: two records
        for position, record in enumerate(self.queue):
            self._position.setdefault(str(record["id"]), position)
        self._cursor = 0

    def next_item(self, skipped: Iterable[str] = ()) -> ReviewItem | None:
        """The first queued row neither decided nor skipped in this browser session."""
        skip, decided = set(skipped), self.corrections.decided
        while self._cursor < len(self.queue) and str(self.queue[self._cursor]["id"]) in decided:
            self._cursor += 1
        for position in range(self._cursor, len(self.queue)):
            key = str(self.queue[position]["id"])
            if key not in decided and key not in skip:
                return ReviewItem(self.listings[key], self.queue[position], position)
        return None

    def item(self, row_id: str) -> ReviewItem:
        position = self._position.get(row_id)
        if position is None:
            raise CorrectionError(f"row {row_id!r} is not in the review queue")
        return ReviewItem(self.listings[row_id], self.queue[position], position)

    def accept(self, row_id: str, reviewer: str = "") -> dict[str, Any]:
        """The prediction as it stands becomes the row's gold label.

        An attribute the model withheld (its value too unsure to publish, shown as null) is not a
        "not stated" anyone checked: a row with one is saved as gold for its category only, the
        withheld names in ``review.attributes_unreviewed`` (correct the row to label its attributes)."""
        item = self.item(row_id)
        label = {"category": item.record.get("category"), "attributes": item.record.get("attributes") or {}}
        if item.record.get("status") != "ok" or not label["category"]:
            raise CorrectionError(f"row {row_id!r}: the model gave no valid answer to accept; correct it instead")
        unreviewed = withheld_attributes(item.record)
        if unreviewed:
            label["attributes"] = None
        return self.corrections.save(item.listing, label, "accepted", item.record, reviewer, unreviewed)

    def correct(self, row_id: str, label: dict[str, Any], reviewer: str = "") -> dict[str, Any]:
        """The reviewer's label becomes the row's gold.

        A correction that leaves every attribute as the model published it (the category fixed, say)
        while the model withheld some is saved, as :meth:`accept` saves such a row, for its category
        only with the withheld names in ``review.attributes_unreviewed``: their null is the editors'
        starting value, not a "not stated" anyone checked. Change an attribute to label them all."""
        item = self.item(row_id)
        unreviewed = withheld_attributes(item.record)
        published = item.record.get("attributes") if isinstance(item.record.get("attributes"), dict) else {}
        given = label.get("attributes") if isinstance(label.get("attributes"), dict) else {}
        untouched = all(given.get(k) == published.get(k) for k in {*given, *published})
        if unreviewed and untouched:
            label = {"category": label.get("category"), "attributes": None}
            return self.corrections.save(item.listing, label, "corrected", item.record, reviewer, unreviewed)
        return self.corrections.save(item.listing, label, "corrected", item.record, reviewer)

    @property
    def decided(self) -> int:
        """Queued records whose row is decided (counted as the queue's total counts them)."""
        return sum(self._records[key] for key in self.corrections.decided.keys() & self._records.keys())

    def close(self) -> None:
        self.corrections.close()


def _labelled_listings(queue: Sequence[dict[str, Any]], dumps: Sequence[Path]) -> dict[str, Listing]:
    """Each queued record's listing, by id: the row at the record's file and line (the one `mmllm label`
    labelled, even where a dump repeats its id), else the only row with its id (a record without a place)."""
    places = {(str(r.get("source")), r.get("line")): str(r["id"]) for r in queue}
    wanted = {str(r["id"]) for r in queue}
    at_place: dict[str, Listing] = {}
    by_id: dict[str, list[Listing]] = {}
    for dump in dumps:
        for row in CatalogReader(dump, check_duplicates=False):
            if not isinstance(row, Listing) or row.id not in wanted:
                continue
            if places.get((row.source, row.line)) == row.id:
                at_place[row.id] = row
            by_id.setdefault(row.id, []).append(row)
    return {**{i: rows[0] for i, rows in by_id.items() if len(rows) == 1}, **at_place}
