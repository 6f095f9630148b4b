"""The model folder: what `mmllm finetune` writes and every other job reads - one front door.

A model folder holds the weights of one kind of model plus what is needed to use it alone::

    mmllm_model.json     meta: kind, base model, template, trained_fields, training summary
    label_schema.yaml    the schema the model was trained with (its answers follow it)
    prompt_template.yaml the prompt it was trained with (generative and classifier kinds)
    config.yaml          the resolved training config (rerun with --config)
    README.md            the model card, with training_curves.png and metrics.jsonl
    + the weights: a LoRA adapter (generative-lora), a full model (generative-merged),
      adapter + heads.safetensors (classifier), fusion.safetensors (fusion)

:func:`load` turns a folder of any kind - or a base checkpoint, for zero-shot labelling - into a
ready :class:`~mmllm.predictor.Predictor`; :func:`merge` folds a LoRA adapter into its base. Hub
ids and folders are taken as they are: test-only names such as ``tiny:qwen2_vl`` are resolved by
the command line (``resolve``), never here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from mmllm.class_prior import COUNTS_KEY
from mmllm.confidence import CALIBRATION_FILE, Calibration
from mmllm.grounding import GROUNDING_FILES, Grounder, GroundedPredictor
from mmllm.prompts import DEFAULT_TEMPLATE, TEMPLATE_FILE, PromptTemplate
from mmllm.schema import LabelSchema

log = logging.getLogger(__name__)

META_FILE = "mmllm_model.json"
SCHEMA_FILE = "label_schema.yaml"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
CURVES_FILE = "training_curves.png"
METRICS_FILE = "metrics.jsonl"
ADAPTER_FILE = "adapter_model.safetensors"
UNFINISHED_FILE = "training_unfinished.txt"  # present while a recipe writes the folder: labelling refuses it
KINDS = ("generative-lora", "generative-merged", "classifier", "fusion")


def _as_is(ref: str) -> str:
    return ref


# ---------------------------------------------------------------------- meta
def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def write_meta(folder: Path, **fields: Any) -> None:
    from mmllm import __version__

    meta = {"format": 1, "mmllm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: str | Path, *, finished: bool = True) -> dict[str, Any]:
    """The folder's meta file, checked; ``finished``: refuse a folder its recipe is still writing (or stopped
    writing: ``training_unfinished.txt``), as everything that uses a model does."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not an mmllm model folder (no {META_FILE}); pass a model dir from `mmllm finetune`")
    if finished and (Path(folder) / UNFINISHED_FILE).exists():
        raise ValueError(f"{folder}: training stopped before it finished writing this folder (no calibration or "
                         "grounding yet); rerun its training command with train.resume=true to finish it")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc}); the folder is damaged: retrain or copy it again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}; the folder is damaged")
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{folder}: unknown model kind {meta.get('kind')!r} (known: {', '.join(KINDS)})")
    for key, kind in (("base_model", str), ("model", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"{path}: {key} is {type(meta[key]).__name__}, expected {kind.__name__}; the folder is damaged")
    if meta["kind"] != "fusion" and not isinstance(meta.get("base_model"), str):
        raise ValueError(f"{path}: no base_model; the folder is damaged: retrain or copy it again")
    return meta


def looks_like_path(ref: str | Path) -> bool:
    """A model reference that names a folder rather than a hub id (``owner/name``): it starts with ``/``,
    ``./``, ``../`` or ``~``, or has more than one ``/``."""
    text = str(ref)
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1


def check_weights(path: Path) -> Path:
    """``path`` if it is a readable safetensors file (its header and its size agree); else an error naming it.
    Weights are read from safetensors only: a folder with pickled weights in their place is refused."""
    if not path.is_file():
        pickled = [p.name for p in path.parent.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        extra = f" ({', '.join(sorted(pickled))} are pickles, which mmllm never loads)" if pickled else ""
        raise FileNotFoundError(f"{path}: the weights are missing{extra}; the folder is damaged: retrain or copy it again")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass  # opening checks the header, and its offsets against the file's size
    except Exception as exc:  # safetensors raises its own SafetensorError on a torn or foreign file
        raise ValueError(f"{path}: not readable safetensors ({exc}); the folder is damaged: retrain or copy it again") from None
    return path


def begin(folder: Path) -> None:
    """The recipe is about to write the folder (weights first): until :func:`finish`, labelling refuses it, so a
    stop half-way (a resumed run asked for more steps replaces a finished folder's weights) is never read as a
    model whose weights and calibration disagree."""
    (Path(folder) / UNFINISHED_FILE).write_text("training is writing this folder; `finish` removes this file at the end\n")


def finish(folder: Path) -> None:
    """The folder is complete (weights, meta, calibration, grounding): labelling may read it."""
    (Path(folder) / UNFINISHED_FILE).unlink(missing_ok=True)


def trained_field_counts(schema: LabelSchema, labels: Sequence[dict[str, Any] | None]) -> dict[str, int]:
    """Training rows with a known (non-null) gold value, per field: ``category`` then each attribute.

    Stored as ``trained_fields`` in the meta file. A field counted 0 was never supervised: its head
    (or the generative answer for it) is noise, so predictors answer null.
    """
    counts = {"category": 0, **{a.name: 0 for a in schema.attributes}}
    for label in labels:
        value = schema.validate(label, require_category=False).value if label else None
        if value is None:
            continue
        counts["category"] += value["category"] is not None
        for name, known in value["attributes"].items():
            counts[name] += known is not None
    return counts


def untrained_attributes(trained_fields: dict[str, int] | None) -> tuple[str, ...]:
    """Attributes recorded with 0 training rows; none for folders written before the record existed."""
    return tuple(name for name, rows in (trained_fields or {}).items() if name != "category" and rows == 0)


# ---------------------------------------------------------------------- writing
def write_folder(out_dir: Path, *, kind: str, base_model: str, schema: LabelSchema, schema_source: str,
                 config: Any, template: PromptTemplate | None, model: dict[str, Any], training: dict[str, Any],
                 trained_fields: dict[str, int] | None, category_counts: dict[str, int] | None = None) -> None:
    """Everything but the weights (each model kind saves its own): schema, template, config, meta, card.

    ``category_counts``: the training rows per category, which ``mmllm label --class-prior`` moves the
    answers away from (:mod:`mmllm.class_prior`)."""
    from mmllm.config import save_config

    assert kind in KINDS, kind
    begin(out_dir)
    schema.to_yaml(out_dir / SCHEMA_FILE, header=f"# label schema used for training (from {schema_source})\n")
    if template is not None:
        template.save_to(out_dir)
    save_config(config, out_dir / CONFIG_FILE, header="# resolved training config: rerun with --config this file\n")
    write_meta(out_dir, kind=kind, base_model=base_model, template=template.version if template else None, model=model,
               training=training, **({"trained_fields": trained_fields} if trained_fields else {}),
               **({COUNTS_KEY: category_counts} if category_counts else {}))
    write_card(out_dir)


def write_card(out_dir: Path) -> None:
    """training_curves.png + README.md (the model card) from metrics.jsonl and the meta file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = out_dir / METRICS_FILE
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    train = [r for r in records if "loss" in r]
    eval_keys = ("eval_loss", "json_valid", "category_acc", "attribute_acc")  # a run may score without a dev loss
    evals = [r for r in records if "loss" not in r and any(k in r for k in eval_keys)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    losses = [r for r in evals if "eval_loss" in r]
    if losses:
        axes[0].plot([r["step"] for r in losses], [r["eval_loss"] for r in losses], "o-", label="dev loss")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("cross-entropy per answer token")
    axes[0].legend()
    for key, label in (("json_valid", "JSON valid"), ("category_acc", "category accuracy"), ("attribute_acc", "attribute accuracy")):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axes[1].plot(*zip(*points), "o-", label=label)
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("dev generation" if evals else "no dev set")
    axes[1].legend() if evals else None
    fig.tight_layout()
    fig.savefig(out_dir / CURVES_FILE, dpi=110)
    plt.close(fig)
    meta = read_meta(out_dir, finished=False)  # (the recipe writing it draws its card)
    last_eval = evals[-1] if evals else {}
    untrained = untrained_attributes(meta.get("trained_fields"))
    training = meta["training"]
    launch = ("single process" if training["num_processes"] == 1
              else f"{training['distributed_type']} x {training['num_processes']} process(es)")
    use = ("merge it into a standalone model: `python -m mmllm.finetune merge THIS_FOLDER OUT`."
           if meta["kind"] == "generative-lora" else "it is used as it is (only a LoRA folder is merged).")
    lines = [
        f"# mmllm model: {meta['kind']} on `{meta['base_model']}`", "",
        f"Prompt template `{meta.get('template')}`, label schema `{SCHEMA_FILE}`, config `{CONFIG_FILE}`.",
        f"Trained {training['steps']} steps in {training['wall_s']} s ({launch}).", "",
        "| metric | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in last_eval.items() if k not in ("step", "final")),
        *(f"| final train loss | {train[-1]['loss']} |" for _ in train[-1:]), "",
        *([f"No training row stated {', '.join(untrained)}: the model answers null for "
           f"{'it' if len(untrained) == 1 else 'them'}.", ""] if untrained else []),
        f"![training curves]({CURVES_FILE})", "",
        f"Label with it: `mmllm label DUMP --model THIS_FOLDER --out labels.jsonl`; load it in Python: "
        f"`mmllm.model_dir.load(THIS_FOLDER)`; {use}",
    ]
    (out_dir / CARD_FILE).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------- loading
def load(source: str | Path, *, schema: str | Path | None = None, template: str | Path | None = None,
         device: str | None = None, trust_remote_code: bool = False, resolve: Callable[[str], str] = _as_is,
         grounded: bool = True) -> Any:
    """A ready predictor from a model folder of any kind, or from a base checkpoint (zero-shot).

    A model folder uses its own schema and template (``schema`` / ``template`` are refused for it);
    a base checkpoint needs ``schema``. ``resolve`` maps a base-model reference to a loadable
    one (the command line passes one that builds ``tiny:`` test checkpoints). A folder with a fitted
    ``grounding.json`` answers grounded attributes with their evidence (:mod:`mmllm.grounding`);
    ``grounded=False`` gives the model's own answers.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_model_dir(source):
        if schema or template:
            raise ValueError(f"{source} is a fine-tuned model folder: it labels with its own schema and template; "
                             "leave out --schema / --template")
        return _load_folder(Path(source), device, trust_remote_code, resolve, grounded)
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"{source}: not a model folder (no {META_FILE}) nor a checkpoint (no config.json); a "
                                "training that failed or was stopped leaves such a folder")
    if not Path(source).exists() and looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such model folder")
    if not schema:
        raise ValueError(f"{source} is a base checkpoint: zero-shot labelling needs --schema (the label schema YAML)")
    from mmllm.models.generative import GenerativePredictor, ModelConfig, load_base_model, load_processor

    cfg = ModelConfig(base=str(source), trust_remote_code=trust_remote_code)
    base = resolve(str(source))
    model = load_base_model(cfg, source=base)
    model.to(device).eval()
    return GenerativePredictor(model, load_processor(base, cfg), LabelSchema.from_yaml(schema),
                               PromptTemplate.load(template or DEFAULT_TEMPLATE), cfg.max_images)


def _load_folder(folder: Path, device: str, trust_remote_code: bool, resolve: Callable[[str], str],
                 grounded: bool = True) -> Any:
    """The folder's predictor; with its fitted ``grounding.json`` applied unless ``grounded`` is false."""
    predictor = _load_model(folder, device, trust_remote_code, resolve)
    grounder = Grounder.load(folder, predictor.schema) if grounded else None
    return GroundedPredictor(predictor, grounder) if grounder is not None else predictor


def _load_model(folder: Path, device: str, trust_remote_code: bool, resolve: Callable[[str], str]) -> Any:
    meta = read_meta(folder)
    schema = LabelSchema.from_yaml(folder / SCHEMA_FILE)
    untrained = untrained_attributes(meta.get("trained_fields"))
    if meta["kind"] == "fusion":
        from mmllm.models.fusion import FUSION_FILE, load_fusion

        check_weights(folder / FUSION_FILE)
        # as many photos as training read (the recipe's model.max_images; folders without it: 4, its default)
        return load_fusion(folder, schema, device, untrained=untrained,
                           max_images=int((meta.get("model") or {}).get("max_images", 4)))
    from mmllm.models.generative import GenerativePredictor, ModelConfig, load_base_model, load_processor

    merged = meta["kind"] == "generative-merged"
    try:
        cfg = ModelConfig(base=str(folder) if merged else meta["base_model"], trust_remote_code=trust_remote_code,
                          **{k: v for k, v in meta.get("model", {}).items() if k != "trust_remote_code"})
    except (TypeError, ValueError) as exc:  # a key this version does not know, a value out of range
        raise ValueError(f"{Path(folder) / META_FILE}: its 'model' settings do not fit ({exc}); the folder is damaged "
                         "or from another version of mmllm") from None
    processor = load_processor(folder, None)  # the processor saved at training (pixel budget included)
    model = load_base_model(cfg, source=str(folder) if merged else resolve(meta["base_model"]))
    if meta["kind"] in ("generative-lora", "classifier"):
        from peft import PeftModel

        check_weights(folder / ADAPTER_FILE)  # peft itself would fall back to a pickled adapter_model.bin
        model = PeftModel.from_pretrained(model, str(folder))
    template = PromptTemplate.load(folder / TEMPLATE_FILE)
    if meta["kind"] == "classifier":
        from mmllm.models.classifier import ClassifierPredictor, ListingClassifier

        model = ListingClassifier.load(model, folder)
    if cfg.quantization != "4bit":
        model.to(device)
    model.eval()
    if meta["kind"] == "classifier":
        return ClassifierPredictor(model, processor, schema, template, cfg.max_images, top_k=model.top_k,
                                   untrained=untrained)
    calibration = Calibration.load(folder)
    if calibration is not None and calibration.stale:
        log.warning("%s: fitted on an older answer score (a value's probability then left out the step that ended "
                    "it); today's confidences map lower than calibrated, so the review queue is conservative; "
                    "retrain the folder with data.dev to refit it", folder / CALIBRATION_FILE)
    return GenerativePredictor(model=model, processor=processor, schema=schema, template=template,
                               max_images=cfg.max_images, untrained=untrained, calibration=calibration)


def merge(folder: str | Path, out: str | Path, *, resolve: Callable[[str], str] = _as_is) -> Path:
    """Fold the LoRA adapter into the base weights and write a standalone model folder."""
    folder, out = Path(folder), Path(out)
    meta = read_meta(folder)
    if meta["kind"] != "generative-lora":
        raise ValueError(f"{folder}: only a LoRA model folder can be merged (kind is {meta['kind']!r}); "
                         "classifier and fusion folders are used as they are")
    if meta.get("model", {}).get("quantization") == "4bit":
        log.warning("merging a QLoRA adapter into a full-precision copy of the base model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; give a new OUT_DIR (a merge never writes "
                              "over a folder, the adapter's own included)")
    model_fields = {k: v for k, v in meta.get("model", {}).items() if k != "quantization"}
    predictor = _load_model(folder, "cpu", False, resolve)
    merged = predictor.model.merge_and_unload()
    tmp = out.with_name(out.name + ".merging")  # whole or not at all: a stopped merge leaves no folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    predictor.processor.save_pretrained(tmp)
    for name in (SCHEMA_FILE, TEMPLATE_FILE, *GROUNDING_FILES, CALIBRATION_FILE):
        if name in (SCHEMA_FILE, TEMPLATE_FILE) or (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    write_meta(tmp, kind="generative-merged", base_model=meta["base_model"], merged_from=str(folder), model=model_fields,
               **{k: meta[k] for k in ("trained_fields",) if k in meta})
    if out.is_dir():
        out.rmdir()  # the empty folder the user made for it
    os.replace(tmp, out)
    return out
