"""What every recipe shares: the data config, the inputs checked before anything is built, the
start of a run (accelerator, seed, output folder) and its end (summary, final evaluation record).

A recipe's config is a dataclass with a ``data`` (:class:`DataConfig`) and a ``train``
(:class:`~mmllm.training.TrainConfig`) section; :func:`setup` does the part of a run that does not
depend on the model kind and returns it as a :class:`Setup`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from mmllm.catalog import CatalogError, Listing, RowError, attributes_labelled, iter_catalog
from mmllm.config import help_field
from mmllm.class_prior import category_counts
from mmllm.confidence import CALIBRATION_FILE, Calibration, Platt, risk_coverage
from mmllm.file_lock import Held, hold
from mmllm.grounding import GROUNDING_FILE, GroundingConfig, fit_grounder
from mmllm.host_memory import reuse_step_buffers
from mmllm.images import ImagePolicy
from mmllm.model_dir import CARD_FILE, METRICS_FILE, finish, is_model_dir, trained_field_counts, untrained_attributes
from mmllm.predictor import predict_in_batches
from mmllm.progress import Progress
from mmllm.prompts import PromptTemplate, target_text
from mmllm.schema import LabelSchema, SchemaError
from mmllm.training import LoopResult, TrainConfig, latest_checkpoint

log = logging.getLogger("mmllm.finetune")


@dataclass
class DataConfig:
    """Where the listings, the label schema and the prompt template come from."""

    train: str | list[str] | None = help_field("examples/amazon_uk_toys/train.jsonl",
                                               "labelled catalog(s) to train on (any catalog format): a path, a glob "
                                               "or a list of them, read in order")
    dev: str | None = help_field("examples/amazon_uk_toys/dev.jsonl", "labelled catalog for evaluation; null = none")
    schema: str = help_field("examples/toys_schema.yaml", "label schema YAML (taxonomy + attributes)")
    template: str = help_field("listing_v1", "prompt template: a version in prompts/ or a YAML path")
    image_root: str | None = help_field(None, "folder image paths resolve in (default: each catalog's folder)")
    max_train_rows: int | None = help_field(None, "use only the first N training rows (smoke runs)")
    max_dev_rows: int | None = help_field(None, "use only the first N dev rows")

    def __post_init__(self) -> None:
        if self.train is None or not [t for t in ([self.train] if isinstance(self.train, str) else self.train)
                                      if str(t).strip()]:
            raise ValueError("data.train is not set: give the labelled catalog to train on (data.train=PATH, "
                             "or data.train=[A, B] for several)")
        for name in ("max_train_rows", "max_dev_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1 (or null for all rows), got {getattr(self, name)}")


class RecipeConfig(Protocol):
    """The sections every recipe's config has."""

    data: DataConfig
    train: TrainConfig


class InputError(ValueError):
    """A training input is unusable; the message names the config key and the file (exit status 2)."""


# ---------------------------------------------------------------------- the start of a run
@dataclass
class Setup:
    """A run's checked inputs, its accelerator and its output folder: what every recipe starts from."""

    accelerator: Any
    schema: LabelSchema
    template: PromptTemplate
    train_rows: list[Listing]
    dev_rows: list[Listing]
    trained: dict[str, int]  # training rows with a known gold value, per field (the meta file's trained_fields)
    train_policy: ImagePolicy
    dev_policy: ImagePolicy
    out_dir: Path
    resume: bool = False  # go on from the folder's latest checkpoint (train.resume, unless the run there never saved one)

    @property
    def category_counts(self) -> dict[str, int]:
        """Training rows per category of the schema (the meta file's ``category_counts``)."""
        return category_counts([r.label for r in self.train_rows], self.schema.categories)

    @property
    def untrained(self) -> tuple[str, ...]:
        """Attributes no training row states: answered null, in evaluation as in the saved folder."""
        return untrained_attributes(self.trained)


def setup(cfg: RecipeConfig) -> Setup:
    """Check the inputs (raising :class:`InputError` before anything is built or written), then start
    the accelerator, seed every generator and create the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    schema, template, train_rows, dev_rows = load_inputs(cfg)
    trained = trained_field_counts(schema, [r.label for r in train_rows])
    untrained = untrained_attributes(trained)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.train.mixed_precision))
    set_seed(cfg.train.seed)
    out_dir, resume = _prepare_output_dir(Path(cfg.train.output_dir), cfg.train.resume, accelerator)
    only = sum(not attributes_labelled(r.label) for r in train_rows)
    say(accelerator, f"{len(train_rows)} training rows"
                     + (f" ({only} labelled for the category only: left out of every attribute fit)" if only else "")
                     + f", {len(dev_rows)} dev rows; "
                     f"{_describe_launch(accelerator.distributed_type.name, accelerator.num_processes)}")
    if untrained:
        say(accelerator, f"no training row states {', '.join(untrained)}: the model will answer null for "
                         f"{'it' if len(untrained) == 1 else 'them'}")
    policy = ImagePolicy(root=Path(cfg.data.image_root).resolve() if cfg.data.image_root else None)
    return Setup(accelerator, schema, template, train_rows, dev_rows, trained,
                 policy_for(train_sources(cfg.data.train), policy), policy_for(cfg.data.dev, policy), out_dir, resume)


def load_inputs(cfg: RecipeConfig) -> tuple[LabelSchema, PromptTemplate, list[Listing], list[Listing]]:
    """Schema, template, training and dev rows, and a check of the output folder: everything that
    can fail on the user's inputs, done before a model is built or anything is written."""
    sources = train_sources(cfg.data.train)
    if not cfg.data.image_root:  # rows know their catalog by file name: two folders' "train.jsonl" would mix up images
        folders: dict[str, Path] = {}
        for source in sources:
            folder = folders.setdefault(Path(source).name, Path(source).resolve().parent)
            if folder != Path(source).resolve().parent:
                raise InputError(f"data.train: two catalogs are named {Path(source).name} ({folder} and "
                                 f"{Path(source).resolve().parent}); rename one, or set data.image_root")
    if cfg.data.dev and not Path(cfg.data.dev).exists():
        raise InputError(f"data.dev: {cfg.data.dev} does not exist; give a labelled catalog (data.dev=PATH)")
    try:
        schema = LabelSchema.from_yaml(cfg.data.schema)
    except SchemaError as exc:
        raise InputError(f"data.schema: {exc}") from None
    try:
        template = PromptTemplate.load(cfg.data.template)
    except (OSError, ValueError) as exc:
        raise InputError(f"data.template: {exc}") from None
    _check_output_dir(Path(cfg.train.output_dir), cfg.train.resume)
    train_rows = load_training_rows(sources, schema, cfg.data.max_train_rows, key="data.train")
    dev_rows = load_training_rows(cfg.data.dev, schema, cfg.data.max_dev_rows, key="data.dev") if cfg.data.dev else []
    return schema, template, train_rows, dev_rows


def train_sources(train: str | list[str] | None, key: str = "data.train") -> list[str]:
    """``data.train`` as the list of catalog files it names: paths and globs (each glob sorted), in order.

    Raises :class:`InputError` for a path that does not exist, a glob that matches nothing or a file named twice.
    """
    import glob

    items = [train] if isinstance(train, str) else list(train or [])
    sources: list[str] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if glob.has_magic(item):
            matched = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise InputError(f"{key}: the pattern {item} matches no file")
            sources.extend(matched)
        elif not Path(item).exists():
            raise InputError(f"{key}: {item} does not exist; give a labelled catalog ({key}=PATH)")
        else:
            sources.append(item)
    if not sources:
        raise InputError(f"{key} is not set: give the labelled catalog to train on ({key}=PATH)")
    seen = [str(Path(s).resolve()) for s in sources]
    twice = sorted({s for s in seen if seen.count(s) > 1})
    if twice:
        raise InputError(f"{key}: {twice[0]} is named twice; its rows would count double")
    return sources


def load_training_rows(source: str | list[str], schema: LabelSchema, limit: int | None,
                       key: str = "data.train") -> list[Listing]:
    """Labelled listings whose label fits the schema, from one catalog or several; bad rows are reported
    (each, and counted by cause: a category outside the taxonomy counted per category) and skipped.

    Raises :class:`InputError` naming ``key`` when a catalog cannot be read or no row is usable.
    """
    rows: list[Listing] = []
    skipped: list[str] = []
    outside: Counter[str] = Counter()  # categories not in the schema: reported with counts, never relabelled
    sources = [source] if isinstance(source, str) else list(source)
    for path in sources:
        try:
            for row in iter_catalog(path):
                if limit is not None and len(rows) >= limit:
                    break
                if isinstance(row, RowError):
                    skipped.append(str(row))
                    continue
                try:
                    target_text(row, schema)
                except ValueError as exc:
                    skipped.append(str(exc))
                    category = (row.label or {}).get("category")
                    if isinstance(category, str) and schema.canonical_category(category) is None:
                        outside[category.strip()] += 1
                    continue
                rows.append(row)
        except CatalogError as exc:
            raise InputError(f"{key}: {exc}") from None
    where = sources[0] if len(sources) == 1 else f"{len(sources)} catalogs ({', '.join(sources)})"
    if not rows and not skipped:
        raise InputError(f"{key}: {where} holds no rows")
    if not rows:
        raise InputError(f"{key}: {where} has no usable labelled rows ({len(skipped)} skipped; first: {skipped[0]}); "
                         "check it with `mmllm catalog validate --schema`")
    for line in skipped[:20]:
        log.warning("skipped: %s", line)
    if len(skipped) > 20:
        log.warning("... and %d more skipped rows (run `mmllm catalog validate --schema`)", len(skipped) - 20)
    if outside:
        shown = ", ".join(f"'{c}' ({n})" for c, n in outside.most_common(10))
        log.warning("%s: %d of %d labelled rows have a category outside schema '%s' and are %s: %s%s",
                    key, sum(outside.values()), len(rows) + len(skipped), schema.name,
                    "not trained on" if key == "data.train" else "left out", shown,
                    f" and {len(outside) - 10} more categories" if len(outside) > 10 else "")
    return rows


def policy_for(source: str | list[str] | None, policy: ImagePolicy) -> ImagePolicy:
    """Images resolve in data.image_root, or else in the folder of the catalog file each row came from."""
    if policy.root is not None or source is None:
        return policy
    sources = [source] if isinstance(source, str) else list(source)
    if len(sources) == 1:
        return replace(policy, root=Path(sources[0]).resolve().parent)
    return replace(policy, source_roots=tuple((Path(s).name, Path(s).resolve().parent) for s in sources))


LOCK_FILE = "training.lock"  # held (flock) by the run training into the folder; left there by one that stopped
# what a run writes in its folder before its first checkpoint: the lock, its log, the fusion recipe's feature
# cache (by default inside it) and side fit, checkpoint folders not finished yet
_FILES_BEFORE_FIRST_CHECKPOINT = {LOCK_FILE, METRICS_FILE}
_FOLDERS_BEFORE_FIRST_CHECKPOINT = {"feature_cache", "checkpoints", "vote_holdout"}
_held: dict[Path, int] = {}  # folder -> this process's lock on it


def _left_before_first_checkpoint(out_dir: Path) -> bool:
    """``out_dir`` is a folder (not a model folder, no finished checkpoint) every entry of which is one a run writes
    before its first checkpoint (by name and kind); an empty folder too."""
    if not out_dir.is_dir() or is_model_dir(out_dir) or latest_checkpoint(out_dir / "checkpoints") is not None:
        return False
    for entry in out_dir.iterdir():
        if entry.name in _FILES_BEFORE_FIRST_CHECKPOINT:
            if not entry.is_file():
                return False
        elif entry.name not in _FOLDERS_BEFORE_FIRST_CHECKPOINT or not entry.is_dir():
            return False
    checkpoints = out_dir / "checkpoints"
    return not checkpoints.is_dir() or all(p.name.startswith((".tmp-step-", "step-")) for p in checkpoints.iterdir())


def never_saved(out_dir: Path) -> bool:
    """``out_dir`` is a folder a run of mmllm started (its ``training.lock``) and left before its first
    checkpoint (stopped while it read, encoded, tuned or took its first steps), holding nothing else: nothing
    to resume and nothing of the user's, so a run starts again there (with ``train.resume`` or without), its
    cached features read again."""
    return (out_dir / LOCK_FILE).is_file() and _left_before_first_checkpoint(out_dir)


def _check_output_dir(out_dir: Path, resume: bool) -> None:
    """A new run needs an empty (or new) folder, or one a run left before its first checkpoint; a resumed one
    a finished checkpoint in it (or such a folder: it starts again). Read only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"train.output_dir: {out_dir} is a file, not a folder; pass another train.output_dir")
    if never_saved(out_dir):
        return
    # what a run leaves, but no lock says mmllm started it (an older mmllm, another tool): the user decides
    if _left_before_first_checkpoint(out_dir) and any(out_dir.iterdir()):
        raise InputError(f"train.output_dir: {out_dir} holds what a run leaves before its first checkpoint (nothing "
                         f"to resume), but no {LOCK_FILE} says mmllm started it: delete {out_dir} to start again, or "
                         "pass another train.output_dir")
    if resume:
        if latest_checkpoint(out_dir / "checkpoints") is None:
            raise InputError(f"train.output_dir: train.resume=true but {out_dir / 'checkpoints'} holds no finished "
                             "checkpoint; drop train.resume to start a new run")
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"train.output_dir: {out_dir} is not empty; pass train.resume=true to continue it, "
                         "or another train.output_dir")


def _prepare_output_dir(out_dir: Path, resume: bool, accelerator: Any) -> tuple[Path, bool]:
    """The folder, checked, created and locked for this run; and whether to resume from its latest checkpoint
    (not where a run stopped before its first: that one starts again, its log and torn checkpoints removed).
    Every process reads the folder before the main one changes it."""
    again = never_saved(out_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _check_output_dir(out_dir, resume)  # checked before anything was built; checked again just before writing
        out_dir.mkdir(parents=True, exist_ok=True)
        _lock(out_dir)
        if again:
            say(accelerator, f"{out_dir}: the run there stopped before its first checkpoint; starting it again"
                             + (" (its cached features are read again)" if (out_dir / "feature_cache").is_dir() else ""))
            (out_dir / METRICS_FILE).unlink(missing_ok=True)
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return out_dir, resume and not again


def _lock(out_dir: Path) -> None:
    """Hold ``training.lock`` for the run: a second run into the folder (the same command started twice, a resume
    while the run goes on) is refused instead of mixing the two runs' files."""
    try:  # (finetune() lets go of it however the run ends: `release`)
        _held[out_dir.resolve()] = hold(out_dir / LOCK_FILE)
    except Held:
        raise InputError(f"train.output_dir: another run is training into {out_dir} (it holds {LOCK_FILE}); wait "
                         "for it to end, or pass another train.output_dir") from None


def _unlock(out_dir: Path) -> None:
    """The run wrote its folder whole: its lock goes (a finished model folder needs none)."""
    (out_dir / LOCK_FILE).unlink(missing_ok=True)
    release(out_dir)


def release(out_dir: Path) -> None:
    """This process's lock on a training folder, let go however its run ended (a run that failed in a notebook
    kept it until the kernel ended); the file stays, saying mmllm started the folder."""
    fd = _held.pop(Path(out_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def _mixed_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _describe_launch(distributed_type: str, processes: int) -> str:
    return "single process" if processes == 1 else f"{distributed_type} x {processes} process(es)"


# ---------------------------------------------------------------------- the end of a run
def run_summary(result: LoopResult, accelerator: Any) -> dict[str, Any]:
    """What a run did (also stored in the model folder); says how to continue a stopped run."""
    if result.interrupted:
        say(accelerator, f"stopped at step {result.steps}; continue with train.resume=true")
    return {"steps": result.steps, "interrupted": result.interrupted, "wall_s": round(result.wall_s, 2),
            "distributed_type": accelerator.distributed_type.name, "num_processes": accelerator.num_processes}


def record_final(accelerator: Any, out_dir: Path, summary: dict[str, Any], final: dict[str, Any]) -> None:
    """The final evaluation: into the summary, onto the console and into metrics.jsonl."""
    summary.update(final)
    say(accelerator, "final evaluation: " + ", ".join(f"{k}={v}" for k, v in final.items()))
    if accelerator.is_main_process:
        with open(out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": summary["steps"], "final": True, **final}) + "\n")


def say(accelerator: Any, text: str) -> None:
    """Print on the main process only (one line per run, not one per process)."""
    if accelerator.is_main_process:
        print(text, flush=True)


def fit_after_training(s: Setup, cfg: GroundingConfig, predictor: Any, *, platt: bool = False) -> None:
    """What every recipe fits on the trained model's dev answers, predicted once: the confidence
    calibration (``calibration.json``: a Platt map for a generative model, ``platt``; the heads'
    temperature is already in their weights) and then the grounded-attribute choice (``grounding.json``)."""
    if not s.accelerator.is_main_process:
        return
    rows = s.dev_rows[: cfg.dev_rows] if cfg.dev_rows else s.dev_rows
    records: list[dict[str, Any]] = []
    if rows:
        reuse_step_buffers()  # labelling now, not training: a decoding step's blocks are reused (host_memory)
        with Progress("dev predictions (calibration, grounding)", total_rows=len(rows), unit="listings") as progress:
            for start in range(0, len(rows), 64):
                chunk = rows[start:start + 64]
                records += predict_in_batches(predictor, chunk, s.dev_policy)
                progress.update(len(chunk))
        records = fit_calibration(s, predictor, rows, records, platt=platt)
    fit_grounding(s, cfg, rows, records)
    finish(s.out_dir)  # the last file is written: labelling may read the folder
    _unlock(s.out_dir)


def fit_calibration(s: Setup, predictor: Any, rows: list[Listing], records: list[dict[str, Any]], *,
                    platt: bool) -> list[dict[str, Any]]:
    """``calibration.json`` from the dev answers; with ``platt`` the maps are fitted, handed to the
    predictor (``predictor.calibration``) and applied to ``records``, which are returned."""
    # the gold as the schema spells it (training targets and `mmllm evaluate` forgive case and spacing)
    gold_categories = [s.schema.canonical_category(str(row.label.get("category") or "")) for row in rows]
    correct = [r.get("category") is not None and r.get("category") == gold for gold, r in zip(gold_categories, records)]
    attribute_scores, attribute_correct = [], []
    if platt:
        for row, record in zip(rows, records):
            if not attributes_labelled(row.label):
                continue  # labelled for the category only: its attributes are unknown
            gold = (s.schema.validate(row.label).value or {}).get("attributes", {})
            for name, score in (record.get("attribute_confidence") or {}).items():
                if (record.get("attributes") or {}).get(name) is not None:
                    attribute_scores.append(score)
                    attribute_correct.append(record["attributes"][name] == gold.get(name))
        category = Platt.fit([r["confidence"] for r in records if r.get("confidence") is not None],
                             [c for r, c in zip(records, correct) if r.get("confidence") is not None])
        calibration = Calibration("platt", category, Platt.fit(attribute_scores, attribute_correct))
        predictor.calibration = calibration
        records = [calibration.apply(r) for r in records]
    else:
        calibration = Calibration("temperature")
    calibration.curve = risk_coverage([r.get("confidence") for r in records], correct)
    calibration.save(s.out_dir)
    points = ", ".join(f"{c:.0%}: {calibration.curve.accuracy_at(c):.3f}" for c in (0.5, 0.8, 1.0))
    say(s.accelerator, f"calibration ({CALIBRATION_FILE}, {calibration.method}): dev accuracy at coverage {points}")
    return records


def fit_grounding(s: Setup, cfg: GroundingConfig, rows: list[Listing], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit the grounded-attribute choice (:mod:`mmllm.grounding`) for the trained model: stage A on
    the training rows, stage B and the answer thresholds on the model's predictions for the dev rows.
    Writes ``grounding.json`` into the model folder (the per-attribute report is in it too) and adds
    the thresholds to the model card; returns the report."""
    if not cfg.enabled:
        return {}
    if not any(a.evidence is not None for a in s.schema.attributes) and not rows:
        say(s.accelerator, "grounding: the schema declares no evidence and there are no dev rows; skipped")
        return {}
    grounder, report = fit_grounder(s.schema, s.train_rows, rows, records, cfg, s.untrained)
    grounder.save(s.out_dir)
    lines = [f"{'attribute':<22} {'threshold':>9} {'dev answered':>12} {'dev precision':>13} {'model answers':>13} "
             f"{'applies C':>9}"]
    for name, r in report.items():
        c = r.get("applicability_c")
        lines.append(f"{name:<22} {r['threshold']:>9.3f} {r['dev_answered']:>12} "
                     f"{'-' if r['dev_precision'] is None else format(r['dev_precision'], '.3f'):>13} "
                     f"{'learned' if r['combined'] else 'no':>13} {'-' if c is None else format(c, 'g'):>9}")
    say(s.accelerator, f"grounding ({GROUNDING_FILE}): target precision {cfg.precision}\n" + "\n".join(lines))
    if (s.out_dir / CARD_FILE).is_file():
        with open(s.out_dir / CARD_FILE, "a", encoding="utf-8") as f:
            f.write(f"\n## Grounded attributes\n\n`{GROUNDING_FILE}` publishes a value only when the learned choice "
                    f"between what the listing states, the model's answer and null is sure enough for a precision of "
                    f"{cfg.precision} on the dev rows (`mmllm label --ungrounded`: the model's own answers).\n\n"
                    "```\n" + "\n".join(lines) + "\n```\n")
    return report
