"""The fusion recipe (``task: fusion``): pretrained text / image encoders + a small attribute
network, fused, with the classify recipe's heads, loss and calibration - the CPU baseline.

The story: checked inputs (``common.setup``) -> encoders -> the name-anchored tuning of the text
encoder on the training titles (``anchor``, when ``anchor.epochs`` > 0) -> feature cache and fusion
model -> fill the cache once (frozen encoders) -> the anchor's neighbour memory -> the lexical member
-> the vote's per-head weights, chosen on held-out training rows (``vote``) -> train the heads
(``heads_training``; at prediction they vote with the anchor's and lexical members) -> the model folder:
``fusion.safetensors`` + ``fusion.json``, label schema, resolved config, metrics, model card ->
the grounded-attribute choice fitted on it (``grounding.json``, :mod:`mmllm.grounding`).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mmllm import model_dir
from mmllm.catalog import attributes_labelled
from mmllm.config import help_field
from mmllm.grounding import GroundingConfig
from mmllm.models import fusion, heads
from mmllm.models.fusion import FusionConfig
from mmllm.models.fusion.anchor import (Anchor, AnchorConfig, TuningTask, class_starts, fingerprint, memory_sample,
                                        save_tuned, tune_encoder, tuned_store, tuning_precision)
from mmllm.models.fusion.lexicon import (Lexicon, LexiconConfig, Vectorizer, fit_lexicon, lexicon_store, load_lexicon,
                                         save_lexicon)
from mmllm.models.fusion.vote import VoteConfig, VoteFit, choose, holdout_split
from mmllm.progress import Progress
from mmllm.recipes.common import (DataConfig, InputError, fit_after_training, load_training_rows, say, setup,
                                  train_sources)
from mmllm.recipes.heads_training import HeadsEvalConfig, fit_heads, train_heads
from mmllm.training import TrainConfig


@dataclass
class ImagesConfig:
    """The photo budget (read only when ``fusion.image_encoder`` is set)."""

    max_images: int = help_field(4, "photos per listing fed to the image encoder; the rest are ignored")

    def __post_init__(self) -> None:
        if self.max_images < 0:
            raise ValueError("model.max_images must be >= 0")


@dataclass
class FusionRecipeConfig:
    """``task: fusion``: encoders + attribute network, fused, softmax heads."""

    task: Literal["fusion"] = help_field(
        "fusion", "fusion = pretrained text/image encoders + attribute MLP, fused, softmax heads (CPU baseline)")
    model: ImagesConfig = field(default_factory=ImagesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: HeadsEvalConfig = field(default_factory=HeadsEvalConfig)
    heads: heads.HeadsConfig = field(default_factory=heads.HeadsConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    lexicon: LexiconConfig = field(default_factory=LexiconConfig)
    vote: VoteConfig = field(default_factory=VoteConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)

    def __post_init__(self) -> None:
        if self.anchor.epochs and not self.fusion.freeze:
            raise ValueError("anchor.epochs > 0 tunes the text encoder before the heads and needs fusion.freeze: true "
                             "(freeze: false fine-tunes it end to end instead)")


def run(cfg: FusionRecipeConfig) -> dict[str, Any]:
    """Frozen (cached) or fine-tuned encoders + fusion + heads, in the shared loop; returns the summary."""
    if cfg.anchor.reference:  # a missing file is told before anything is built
        train_sources(cfg.anchor.reference, key="anchor.reference")
    s = setup(cfg)
    fc = cfg.fusion
    specs = heads.head_specs(s.schema, [r.label for r in s.train_rows], cfg.heads.bins, cfg.heads.null_class)
    encoders = fusion.Encoders(fc.text_encoder, fc.image_encoder, fc.max_text_tokens,
                               "text" in fc.modalities, "image" in fc.modalities)
    encoders.to(s.accelerator.device)  # tuning and encoding run where the heads train (their features live on the host)
    cache = fusion.FeatureCache(Path(fc.cache_dir) if fc.cache_dir else s.out_dir / "feature_cache") if fc.freeze else None
    anchor, memory_rows = None, []
    voting = {sp.name: len(sp.classes) for sp in _voting_heads(specs)}
    if cfg.anchor.epochs and encoders.text is not None and "text" in fc.modalities:
        # the tuned weights are kept only in a shared cache (fusion.cache_dir), not in each output folder
        anchor, memory_rows = _tune(s, encoders, specs[0].classes, cfg, Path(fc.cache_dir) if fc.cache_dir else None,
                                    voting if "neighbours" in cfg.vote.members else {})
        if fc.title_view and "title" not in anchor.views:  # the titles say nothing: no view of their own
            cfg.fusion = fc = replace(fc, title_view=False)
            say(s.accelerator, "fusion.title_view: off, the titles say nothing (the heads, names and neighbours "
                               "read title + description alone)")
        # tuning draws random numbers (dropout), reading its cached result draws none: from here on a cold
        # run and a warm one start from the same state, so they train the same heads
        set_seed(cfg.train.seed)
    featurizer = fusion.Featurizer(encoders, fc, cache, remember_rows=True)  # every epoch reads the same rows
    names = None
    if fc.label_prior and encoders.text is not None:  # the taxonomy's own words, embedded once
        names = encoders.sentence_vectors([fusion.category_name(c) for c in specs[0].classes])
    values = fusion.value_name_vectors(s.schema, specs, encoders) if fc.value_prior and encoders.text is not None else {}
    model = fusion.FusionModel(fc, specs, encoders.text_dim, encoders.image_dim, encoders, names, anchor,
                               value_vectors=values)
    if fc.prior_correction:
        counts = s.category_counts
        model.set_prior([counts[c] for c in specs[0].classes])
    max_images = cfg.model.max_images if encoders.image is not None else 0
    collate = fusion.FusionCollator(featurizer, s.schema, specs, s.train_policy, max_images, members=False)
    dev_collate = fusion.FusionCollator(featurizer, s.schema, specs, s.dev_policy, max_images)
    if fc.freeze:  # fill the feature cache once; epochs (and reruns) read it
        encoders.eval()
        started = time.perf_counter()
        with Progress("encode", total_rows=len(s.train_rows) + len(s.dev_rows), unit="listings",
                      enabled=s.accelerator.is_main_process) as progress:
            for rows, col in ((s.train_rows, collate), (s.dev_rows, dev_collate)):
                rows = sorted(rows, key=_text_length)  # batches of like lengths: a third less padding to encode
                for start in range(0, len(rows), fc.encode_batch):
                    col([(r, 0) for r in rows[start:start + fc.encode_batch]])
                    progress.update(len(rows[start:start + fc.encode_batch]))
        say(s.accelerator, f"encoder features: {cache.misses} computed, {cache.hits} from the cache "
                           f"in {time.perf_counter() - started:.1f} s on {s.accelerator.device}")
    if anchor is not None:
        _remember(anchor, featurizer, memory_rows, fc.encode_batch, specs, s.schema)
        if cfg.anchor.reference and "neighbours" in cfg.anchor.members:
            _reference(s, anchor, fusion.Featurizer(encoders, fc, fusion.FeatureCache(cache.folder) if cache else None),
                       specs[0].classes, cfg)
    if cfg.anchor.reference and (anchor is None or "neighbours" not in cfg.anchor.members):
        why = ("anchor.members has no neighbours" if anchor is not None else
               "no anchor: anchor.epochs is 0" if not cfg.anchor.epochs else "no anchor: the recipe reads no text")
        say(s.accelerator, f"anchor.reference: not read ({why}; only the neighbours read the reference rows): "
                           "the answers' confidence is their own probability")
    if cfg.lexicon.enabled:
        model.lexicon = _lexicon(s, specs, featurizer, cfg)
    model.vote_members = list(cfg.vote.members)
    if cfg.vote.weights == "holdout":
        def build() -> fusion.FusionModel:
            side = fusion.FusionModel(fc, specs, encoders.text_dim, encoders.image_dim, encoders, names,
                                      value_vectors=values)
            if fc.prior_correction:
                side.log_prior.copy_(model.log_prior)
            return side

        # the side fit draws random numbers of its own: the final heads train as they would without it
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[s.accelerator.device] if s.accelerator.device.type == "cuda" else []):
            vote = _fit_vote(s, cfg, specs, featurizer, collate, anchor, memory_rows, build, model.lexicon)
        random.setstate(py_state)
        model.vote_weights, model.vote_scores = vote.weights, vote.scores
    summary, unwrapped = train_heads(s, model, specs, collate, dev_collate, heads.count_rows, cfg.train, cfg.eval,
                                     cfg.heads)
    if summary["interrupted"]:
        return summary
    if s.accelerator.is_main_process:
        model_dir.begin(s.out_dir)
        unwrapped.save(s.out_dir, tuned_text=encoders if anchor is not None else None, vectorizer=featurizer.lexicon)
        model_dir.write_folder(s.out_dir, kind="fusion", base_model=f"text={fc.text_encoder}, image={fc.image_encoder}",
                               schema=s.schema, schema_source=cfg.data.schema, config=cfg, template=None,
                               model={"max_images": max_images, "method": fc.method, "modalities": unwrapped.modalities},
                               training=summary, trained_fields=s.trained, category_counts=s.category_counts)
        fit_after_training(s, cfg.grounding, fusion.FusionPredictor(unwrapped, featurizer, s.schema, max_images,
                                                               untrained=s.untrained))
    say(s.accelerator, f"model folder written: {s.out_dir}")
    return summary


def _tune(s: Any, encoders: fusion.Encoders, classes: list[str], cfg: FusionRecipeConfig,
          cache_folder: Path | None, attribute_classes: dict[str, int]) -> tuple[Anchor, list[Any]]:
    """Name-anchored tuning of the text encoder on the training titles (in place); the anchor
    module with the tuned class vectors and its memory's labels, and the rows whose vectors fill
    that memory once the cache holds them (``_remember``). With a shared cache folder, the tuned
    weights are kept under ``tuned/`` by a hash of everything the tuning reads: a rerun (another head
    setting, another output folder) reads them instead of tuning again. Where ``anchor.reads: auto`` finds
    that the titles say nothing (``class_starts``), the anchor reads the text view alone, and so does the
    rest of the model (``run``): on the SKU catalog 0.501 / 0.356 over three seeds against 0.470 / 0.345
    with the title view kept (benchmarks/RESULTS.md, "Titles that say nothing")."""
    index = {c: i for i, c in enumerate(classes)}
    rows = [r for r in s.train_rows if (r.label or {}).get("category") in index]
    targets = [index[r.label["category"]] for r in rows]
    started = time.perf_counter()
    names = [fusion.category_name(c) for c in classes]
    titles = [r.title for r in rows]
    tasks = _tuning_tasks(s.schema, rows, cfg) if cfg.anchor.attribute_weight > 0 else []
    # what the tuning reads (the titles, or title + description where the titles say nothing) and where its
    # class vectors start: asked of the frozen encoder before the cache, whose key depends on the answer
    texts, text_tokens = encoders.view_texts(rows, "text")
    start = class_starts(encoders, titles, targets, names, cfg.anchor, texts=texts, text_tokens=text_tokens)
    read = "titles" if start.view == "title" else "titles and descriptions"
    stored = tuned_store(cache_folder, encoders.text_id, titles, targets, names, cfg.anchor, cfg.train.seed, tasks,
                         device=next(encoders.text.parameters()).device,  # a GPU tunes with another optimizer
                         reads=start)
    if stored is not None and stored.is_dir():  # the same texts, categories, settings and seed: tuned before
        encoders.text.load_state_dict(load_file(str(stored / "encoder.safetensors")))
        saved = load_file(str(stored / "anchor.safetensors"))
        vectors, scale = saved["class_vectors"], float(saved["scale"])
        how = f"read from the tuning cache (tuned on {len(rows)} {read})"
    else:
        with Progress("tune text encoder", total_rows=len(rows) * cfg.anchor.epochs,
                      unit="titles" if start.view == "title" else "listings",
                      enabled=s.accelerator.is_main_process) as progress:
            vectors, scale = tune_encoder(encoders, start.texts, targets, names, cfg.anchor, cfg.train.seed, progress,
                                          tasks, start=start.vectors, max_tokens=start.max_tokens)
        how = (f"tuned on {len(rows)} {read} x {cfg.anchor.epochs} epochs, the class vectors starting at "
               f"{start.why}")
        if tuning_precision(cfg.anchor, next(encoders.text.parameters()).device) == "bfloat16":
            how += " (forward passes in bf16)"
        if tasks:
            how += " with " + ", ".join(f"{t.name} ({sum(v >= 0 for v in t.targets)} rows)" for t in tasks)
        if stored is not None and s.accelerator.is_main_process:
            save_tuned(stored, encoders.text, vectors, scale)
    encoders.text_id = fingerprint(encoders.text)  # tuned features never mix with the frozen encoder's in the cache
    kept = memory_sample(targets, cfg.anchor.memory_rows, cfg.train.seed)
    # the first view is the one the class vectors were tuned on (what the names member scores); where auto found
    # that the titles say nothing, a view of them is noise and the anchor (then the model, in run) has none
    views = ["text"] if start.titles_say_nothing or not cfg.fusion.title_view else \
        ["title", "text"] if start.view == "title" else ["text", "title"]
    anchor = Anchor(cfg.anchor, len(classes), encoders.text_dim, len(kept), views, attribute_classes)
    anchor.class_vectors.copy_(vectors.cpu())
    anchor.scale.fill_(scale)
    anchor.memory_labels.copy_(torch.tensor([targets[i] for i in kept], dtype=torch.long))
    say(s.accelerator, f"text encoder {how} in {time.perf_counter() - started:.1f} s on "
                       f"{next(encoders.text.parameters()).device} ({encoders.text_id})")
    return anchor, [rows[i] for i in kept]


def _tuning_tasks(schema: Any, rows: list[Any], cfg: FusionRecipeConfig) -> list[TuningTask]:
    """The enum attributes the tuning learns beside the category (``anchor.attribute_weight``): each value
    read as "<value> (<attribute>)", each row's value index. The rows the vote holds out to choose its
    weights are left out (-100), so the members it scores there have not seen their values."""
    held = set(holdout_split([r.id for r in rows], cfg.vote.holdout)[1]) if cfg.vote.weights == "holdout" else set()
    tasks = []
    for attr in schema.attributes:
        if attr.type != "enum" or not attr.values:
            continue
        index = {str(v): i for i, v in enumerate(attr.values)}
        gold = [((r.label or {}).get("attributes") or {}).get(attr.name) for r in rows]
        targets = [-100 if g is None or i in held else index.get(str(g), -100) for i, g in enumerate(gold)]
        label = attr.name.replace("_", " ")
        tasks.append(TuningTask(attr.name, [f"{v} ({label})" for v in attr.values], targets))
    return tasks


def _lexicon(s: Any, specs: list[heads.HeadSpec], featurizer: fusion.Featurizer, cfg: FusionRecipeConfig) -> Lexicon:
    """The convex bag-of-words member: TF-IDF of the training rows, one logistic regression per softmax
    head; the featurizer adds its columns to every batch from now on (dev evaluation, prediction)."""
    started = time.perf_counter()
    targets = heads.encode_targets(specs, [r.label for r in s.train_rows], s.schema)
    softmax = [(sp.name, len(sp.classes)) for sp in specs if sp.kind == "softmax" and sp.classes
               and (cfg.lexicon.category or sp.name != "category")]
    abstaining = {sp.name for sp in specs if sp.abstains}
    store = lexicon_store(Path(cfg.fusion.cache_dir) if cfg.fusion.cache_dir else None, s.train_rows, targets,
                          softmax, cfg.lexicon, cfg.train.seed, abstaining)
    if store is not None and store.is_dir():  # the same rows, targets, settings and seed: fitted before
        lexicon, vectorizer, chosen = load_lexicon(store)
        how = "read from the cache"
    else:
        vectorizer = Vectorizer.fit(s.train_rows, cfg.lexicon)
        lexicon, chosen = fit_lexicon(vectorizer.matrix(s.train_rows), targets, softmax, cfg.lexicon, cfg.train.seed,
                                      say=lambda text: say(s.accelerator, text), abstaining=abstaining)
        how = "fitted"
        if store is not None and s.accelerator.is_main_process:
            save_lexicon(store, lexicon, vectorizer, chosen)
    featurizer.lexicon = vectorizer
    picked = ", ".join(f"{n} C={c:g}" for n, c in chosen.items())
    say(s.accelerator, f"lexical member {how}: {vectorizer.size:,} n-grams, {len(chosen)} heads ({picked}) "
                       f"in {time.perf_counter() - started:.1f} s")
    return lexicon


def _text_length(listing: Any) -> int:
    """About how many tokens a listing's text view takes (characters, capped past any token limit)."""
    return min(len(listing.title or "") + len(listing.description or ""), 4000)


def _remember(anchor: Anchor, featurizer: fusion.Featurizer, rows: list[Any], batch_size: int,
              specs: list[heads.HeadSpec], schema: Any) -> None:
    """The neighbour memory: the tuned vectors of its rows, read from the filled feature cache, and
    their class on each attribute head the neighbours vote on."""
    anchor.memory.copy_(_row_vectors(anchor, featurizer, rows, batch_size))
    if anchor.attribute_classes:
        targets = heads.encode_targets(specs, [r.label for r in rows], schema)
        for j, name in enumerate(anchor.attribute_classes):
            anchor.memory_targets[:, j] = targets[f"target_{name}"]


def _reference(s: Any, anchor: Anchor, featurizer: fusion.Featurizer, classes: list[str],
               cfg: FusionRecipeConfig) -> None:
    """The reference rows of ``anchor.reference`` (:meth:`Anchor.check`): read like training rows (bad rows and
    categories outside the schema reported and skipped; none usable, said), less any row that is a training or dev row (by id or
    title: a dev row checking itself would make the dev confidence a lie), a class-stratified sample past
    ``anchor.memory_rows``, their tuned vectors put in the anchor. ``featurizer`` has a cache of its own: the
    rows' token features are written to the shared cache folder, not kept in memory."""
    started = time.perf_counter()
    try:
        rows = load_training_rows(train_sources(cfg.anchor.reference, key="anchor.reference"), s.schema, None,
                                  key="anchor.reference")
    except InputError as exc:  # another catalog's rows (the default recipe's, under a schema of the user's own)
        say(s.accelerator, f"{exc}: the answers' confidence is their own probability")
        return
    known = {r.id for r in (*s.train_rows, *s.dev_rows)}
    titles = {_normal_title(r.title) for r in (*s.train_rows, *s.dev_rows)}
    kept = [r for r in rows if r.id not in known and _normal_title(r.title) not in titles]
    dropped = len(rows) - len(kept)
    if not kept:  # every row is a training or dev row: nothing to check against
        say(s.accelerator, f"anchor.reference: none of its {len(rows)} rows is usable (all are training or dev rows); "
                           "the answers' confidence is their own probability")
        return
    index = {c: i for i, c in enumerate(classes)}  # load_training_rows kept only rows of the schema's categories
    targets = [index[s.schema.canonical_category(str(r.label["category"]))] for r in kept]
    sample = memory_sample(targets, cfg.anchor.memory_rows, cfg.train.seed)
    kept, targets = [kept[i] for i in sample], [targets[i] for i in sample]
    vectors = []
    with Progress("reference rows", total_rows=len(kept), unit="listings",
                  enabled=s.accelerator.is_main_process) as progress:
        order = sorted(range(len(kept)), key=lambda i: _text_length(kept[i]))  # like lengths: less padding
        for start in range(0, len(order), cfg.fusion.encode_batch):
            part = [kept[i] for i in order[start:start + cfg.fusion.encode_batch]]
            vectors.append(_row_vectors(anchor, featurizer, part, len(part)))
            progress.update(len(part))
    placed = torch.empty(len(kept), anchor.memory.shape[1])  # back in the rows' order
    placed[torch.tensor(order)] = torch.cat(vectors)
    anchor.reference = placed.to(torch.float16)
    anchor.reference_labels = torch.tensor(targets, dtype=torch.long)
    anchor.reference_keys = torch.tensor([fusion.row_key(r.id) for r in kept], dtype=torch.long)
    say(s.accelerator, f"reference rows: {len(kept)} read for the answers' confidence"
                       + (f" ({dropped} left out: training or dev rows)" if dropped else "")
                       + f" in {time.perf_counter() - started:.1f} s")


def _normal_title(title: str | None) -> str:
    return " ".join((title or "").lower().split())


def _row_vectors(anchor: Anchor, featurizer: fusion.Featurizer, rows: list[Any], batch_size: int) -> torch.Tensor:
    """[N, V*D] the anchor's view of each row (tuned text vectors, from the feature cache)."""
    vectors = []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        batch = featurizer(part, [[] for _ in part])
        views = {v: (batch[f"{v}_tokens"], batch[f"{v}_mask"]) for v in anchor.views}
        vectors.append(Anchor.row_vectors(views, anchor.views))
    return torch.cat(vectors) if vectors else torch.zeros(0, anchor.memory.shape[1])


def _voting_heads(specs: list[heads.HeadSpec]) -> list[heads.HeadSpec]:
    """The attribute heads the vote mixes: every softmax head but the category's."""
    return [sp for sp in specs[1:] if sp.kind == "softmax" and sp.classes]


def _fit_vote(s: Any, cfg: FusionRecipeConfig, specs: list[heads.HeadSpec], featurizer: fusion.Featurizer,
              collate: Any, anchor: Anchor | None, memory_rows: list[Any], build: Any,
              full_lexicon: Lexicon | None = None) -> VoteFit:
    """The vote's per-head weights (``vote.py``): hold out ``vote.holdout`` of the training rows that label the
    attributes (a category-only row is neither scored nor teaches an attribute), fit
    each member on the rest (the heads trained again, the lexical member refitted with the C and temperature
    its fit on all the rows chose (``full_lexicon``), the neighbours
    among the rest), and choose each attribute head's weights on the held-out rows."""
    voting = _voting_heads(specs)
    members = [m for m in cfg.vote.members if m == "heads" or (m == "lexicon" and cfg.lexicon.enabled)
               or (m == "neighbours" and anchor is not None and bool(anchor.attribute_classes))]
    if not voting or len(members) < 2:
        return VoteFit()
    if not cfg.fusion.freeze:
        say(s.accelerator, "vote: equal weights (fusion.freeze: false tunes the encoders end to end; a side fit "
                           "would tune the same encoders)")
        return VoteFit()
    # the vote weighs attribute heads: a row labelled for the category only (its attributes unknown) would
    # neither be scored nor teach an attribute, so the side fit reads the rows that label the attributes
    labelled = [r for r in s.train_rows if attributes_labelled(r.label)]
    kept, held = holdout_split([r.id for r in labelled], cfg.vote.holdout)
    if len(held) < cfg.vote.min_rows or len(kept) < len(held):
        say(s.accelerator, f"vote: equal weights ({len(held)} held-out training rows, fewer than vote.min_rows)")
        return VoteFit()
    started = time.perf_counter()
    fit_rows, held_rows = [labelled[i] for i in kept], [labelled[i] for i in held]
    skipped = len(s.train_rows) - len(labelled)
    say(s.accelerator, f"vote: choosing the weights of {', '.join(members)} on {len(held_rows)} held-out training rows "
                       f"(the heads trained on the other {len(fit_rows)}"
                       + (f"; {skipped} rows labelled for the category only left out" if skipped else "") + ")")
    probs: dict[str, dict[str, torch.Tensor]] = {sp.name: {} for sp in voting}
    side_dir = s.out_dir / "vote_holdout"
    try:
        side = fit_heads(s, build(), fit_rows, specs, collate, heads.count_rows, cfg.train, cfg.heads, side_dir)
    finally:
        shutil.rmtree(side_dir, ignore_errors=True)
    batches = [collate([(r, 0) for r in held_rows[i:i + 64]]) for i in range(0, len(held_rows), 64)]
    device = s.accelerator.device
    with torch.no_grad():
        outputs = [side(**{k: v.to(device) for k, v in b.items()}) for b in batches]
    for sp in voting:
        probs[sp.name]["heads"] = torch.cat([torch.softmax(o[sp.name].float().cpu(), -1) for o in outputs])
    targets = {sp.name: torch.cat([b[f"target_{sp.name}"] for b in batches]) for sp in voting}
    if "lexicon" in members:
        vectorizer = Vectorizer.fit(fit_rows, cfg.lexicon)
        fitted = heads.encode_targets(specs, [r.label for r in fit_rows], s.schema)
        lexicon, _ = fit_lexicon(vectorizer.matrix(fit_rows), fitted, [(sp.name, len(sp.classes)) for sp in voting],
                                 cfg.lexicon, cfg.train.seed, say=lambda text: say(s.accelerator, text),
                                 abstaining={sp.name for sp in voting if sp.abstains},
                                 settled=full_lexicon.settled if full_lexicon is not None else None)
        ids, weights = vectorizer.batch(held_rows)
        for name, logits in lexicon(ids, weights).items():
            probs[name]["lexicon"] = torch.softmax(logits.float(), -1)
    if "neighbours" in members:
        held_ids = {r.id for r in held_rows}
        own = torch.tensor([r.id in held_ids for r in memory_rows])  # [N] memory rows the held-out rows must not see
        rows = _row_vectors(anchor, featurizer, held_rows, cfg.fusion.encode_batch)
        votes = anchor.attribute_votes(anchor.nearest(rows, own.unsqueeze(0).expand(len(held_rows), -1)))
        for name, p in votes.items():
            probs[name]["neighbours"] = p
    fit = choose(probs, targets, cfg.vote)
    for name, score in fit.scores.items():
        weights = ", ".join(f"{m} {w:.1f}" for m, w in fit.weights[name].items())
        say(s.accelerator, f"vote: {name}: {weights} (held-out {score['rows']} rows: accuracy "
                           f"{score['accuracy_equal']:.3f} -> {score['accuracy']:.3f}, log-loss "
                           f"{score['log_loss_equal']:.3f} -> {score['log_loss']:.3f})")
    say(s.accelerator, f"vote: weights chosen for {len(fit.weights)} of {len(voting)} attribute heads "
                       f"in {time.perf_counter() - started:.1f} s")
    return fit
