"""The name-anchored text encoder: the sentence encoder fine-tuned so that each listing lands next
to its category's name, and two readers of the tuned vectors that vote beside the fusion heads.

Why: with a handful of labelled rows per category, a frozen sentence encoder + small heads is no
better than TF-IDF + logistic regression (measured on three catalogs). Few-shot text classifiers
that do better tune the encoder itself on the labelled rows (SetFit) and keep the label names in
play. Here both at once:

* ``tune_encoder``: a cosine classifier over every category of the schema, whose class vectors
  START at the encoder's embedding of the category name ("Jigsaws (Jigsaws & Puzzles)"), trained
  jointly with the encoder by cross-entropy on the training titles. A category with few rows
  keeps its name's meaning; one with no row at all keeps its name's vector and can still win.
  Where the names are codes ("C117"), ``start: auto`` (``class_starts``) finds that the names alone place
  the training titles no better than chance, and starts each vector at the mean of its category's titles
  instead (weight imprinting). Where the titles say nothing at all (SKUs), ``reads: auto`` tunes on title +
  description instead.
  With ``average`` the result is the mean of the weights over the last steps (stochastic weight
  averaging): at a constant rate the last step's weights are wherever the seed's last batches left
  them, and the default recipe's seeds swung 4.6 points of accuracy; averaged, 1.2 (benchmarks/RESULTS.md, "Where the swing came from").
  With ``attribute_weight`` the schema's enum attributes (a brand, a price band) are learned at the
  same time, each a cosine classifier whose vectors start at the value names ("LEGO (brand)"), on
  the rows that state a value; off in the default recipe (benchmarks/RESULTS.md: measured on the other-schema
  catalog, the brand and price band a few rows up, the category's macro-F1 down).
* ``Anchor``: what the fusion model keeps of it, saved with its weights: the tuned class vectors
  and scale (member ``names``: softmax of scale x cos(title, class)), and the training rows' tuned
  title / text vectors with their category (member ``neighbours``: a k-nearest-neighbour vote,
  similarity-weighted). At prediction the category distribution is the mean of the members'
  distributions (the fusion heads' softmax is member ``heads``); the dev temperature is fitted on
  that mixture. Training the heads sees the heads alone.

Equal weights, not weights fitted on dev: every member is a calibrated distribution over the same
classes, and averaging them needs no held-out rows (README and benchmarks/RESULTS.md: the ablation and the seeds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from mmllm.config import help_field
from mmllm.models.fusion.encoders import publish_folder
from mmllm.models.heads import pool

MEMBERS = ("heads", "names", "neighbours")


@dataclass
class AnchorConfig:
    """The recipe's ``anchor:`` section (fusion): name-anchored tuning of the text encoder."""

    epochs: int = help_field(0, "epochs of name-anchored tuning of the text encoder on the training titles; "
                                "0 = the frozen encoder (no tuning, the heads alone)")
    lr: float = help_field(3e-5, "learning rate of the text encoder while tuning")
    class_lr: float = help_field(1e-3, "learning rate of the class vectors and the scale")
    batch_size: int = help_field(32, "titles per tuning step")
    max_title_tokens: int = help_field(48, "title tokens read while tuning")
    scale: float = help_field(20.0, "initial (learned) scale of the cosine classifier")
    label_smoothing: float = help_field(0.05, "label smoothing of the tuning loss")
    schedule: Literal["constant", "linear"] = help_field(
        "constant", "learning rate over the tuning steps: constant, or linear = a warm-up then a linear decay to 0 "
                    "(sentence-transformers' default)")
    warmup: float = help_field(0.1, "share of the tuning steps spent warming up (schedule: linear)")
    average: float = help_field(0.0, "share of the last tuning steps whose weights are averaged into the result "
                                     "(tail / stochastic weight averaging); 0 = the last step's weights")
    precision: Literal["float32", "bfloat16", "auto"] = help_field(
        "float32", "the tuning's forward passes: float32, or under bf16 autocast (weights, gradients and optimizer "
                   "stay float32; ~1.5-2x the titles/s on a CPU with AVX-512 BF16 or AMX); auto = bfloat16 where "
                   "the device computes in bf16 natively (such a CPU, a GPU that supports it), else float32")
    start: Literal["names", "imprint", "auto"] = help_field(
        "auto", "where the class vectors start: names = the encoder's embedding of each category's name; imprint = "
                "the mean of the category's training titles (weight imprinting), for a taxonomy whose names are "
                "codes; auto = names when the names alone place the training titles better than chance (answers "
                "independent of the category) by 3 standard errors, else imprint where the titles' own means do "
                "(not for SKUs), else names. A category with no training row starts at its "
                "name either way")
    reads: Literal["title", "text", "auto"] = help_field(
        "auto", "what the tuning reads: title = the titles (max_title_tokens of them); text = title + description "
                "(the fusion's text view and token limit); auto = the titles, unless neither the names nor the titles' "
                "own means place them better than chance (titles that are SKUs) and title + description do (then "
                "the fusion recipe keeps no title view either: fusion.title_view off), or the names place more "
                "training rows by title + description than by their titles, by 3 standard errors (some titles SKUs)")
    attribute_weight: float = help_field(0.0, "weight of the enum attributes in the tuning loss: each is one more "
                                              "cosine classifier over its values, whose vectors start at the value "
                                              "names, trained on the rows that state a value; 0 = the category alone")
    members: list[str] = help_field(default_factory=lambda: list(MEMBERS),
                                    help="what votes on the category: heads, names, neighbours (mean of their "
                                         "distributions)")
    neighbours: int = help_field(10, "k of the nearest-neighbour vote")
    neighbour_temperature: float = help_field(0.05, "softness of the neighbours' similarity weights")
    memory_rows: int = help_field(50_000, "training rows kept for the neighbour vote (a class-stratified "
                                           "sample beyond that)")
    reference: list[str] = help_field(default_factory=list,
                                      help="labelled catalogs (paths) the model does not train on, read to check each "
                                           "category answer: their rows join the neighbours when the answer's "
                                           "confidence is computed, never when the answer is chosen (rows of a "
                                           "category outside the schema, or that are training or dev rows, left out)")

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"anchor.epochs must be >= 0, got {self.epochs}")
        for name in ("batch_size", "max_title_tokens", "neighbours", "memory_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"anchor.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "class_lr", "scale", "neighbour_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"anchor.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.average < 1:
            raise ValueError(f"anchor.average must be in [0, 1), got {self.average}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"anchor.warmup must be in [0, 1), got {self.warmup}")
        if self.start not in ("names", "imprint", "auto"):
            raise ValueError(f"anchor.start must be names, imprint or auto, got {self.start!r}")
        if self.reads not in ("title", "text", "auto"):
            raise ValueError(f"anchor.reads must be title, text or auto, got {self.reads!r}")
        if self.precision not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"anchor.precision must be float32, bfloat16 or auto, got {self.precision!r}")
        if self.attribute_weight < 0:
            raise ValueError(f"anchor.attribute_weight must be >= 0, got {self.attribute_weight}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"anchor.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        unknown = [m for m in self.members if m not in MEMBERS]
        if unknown or not self.members or "heads" not in self.members:
            raise ValueError(f"anchor.members must include heads and come from {list(MEMBERS)}, got {self.members}")


def native_bf16(device: torch.device, cpuinfo: str | None = None) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA device that supports it, or a CPU with AVX-512 BF16
    or AMX (x86) or the BF16 extension (Arm), read from ``cpuinfo`` (default: ``/proc/cpuinfo``; none
    elsewhere). Without them bf16 autocast is emulated and slower than float32, so ``precision: auto`` keeps
    float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features"))
             for flag in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def tuning_precision(cfg: AnchorConfig, device: torch.device) -> str:
    """The precision a tuning on ``device`` runs in: ``cfg.precision``, with ``auto`` resolved."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bfloat16" if native_bf16(device) else "float32"


def _embed(encoders: Any, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
    """[N, D] unit-length mean-pooled embeddings (with gradients when the encoder trains)."""
    device = next(encoders.text.parameters()).device
    enc = encoders.tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=True,
                             return_tensors="pt").to(device)
    tokens = encoders.text_tokens(enc["input_ids"], enc["attention_mask"]).float()
    return nn.functional.normalize(pool(tokens, enc["attention_mask"], "mean"), dim=-1)


def _embed_frozen(encoders: Any, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
    """``_embed`` in batches of 64, without gradients and with the encoder in eval mode (its mode restored):
    the vectors a tuning starts from."""
    was_training = encoders.text.training
    encoders.text.eval()
    try:
        with torch.no_grad():
            return torch.cat([_embed(encoders, texts[i:i + 64], max_tokens) for i in range(0, len(texts), 64)])
    finally:
        encoders.text.train(was_training)


@dataclass
class TuningTask:
    """One more label the tuning learns beside the category (``attribute_weight``): an enum attribute's
    value names and each title's value index (-100 where the row states none, or must not be seen)."""

    name: str
    value_names: list[str]
    targets: list[int]


def trained_tasks(tasks: Sequence[TuningTask], cfg: AnchorConfig) -> list[TuningTask]:
    """The tasks a tuning actually trains: none at ``attribute_weight: 0``, and none without a stated value."""
    return [t for t in tasks if cfg.attribute_weight > 0 and any(v >= 0 for v in t.targets)]


CHECK_ROWS = 1000  # training titles the names are checked on (``start: auto``): 3 standard errors of chance <= 0.047
IMPRINT_ROWS = 64  # titles a category's imprinted vector is the mean of, at most


@dataclass
class TuningStart:
    """What a tuning reads and where its class vectors start (``class_starts``): the texts (one per training
    row), their token limit, which view they are (``title``, or ``text`` = title + description) and a line
    saying why, for the log."""

    vectors: torch.Tensor  # [C, D] unit length
    texts: list[str]
    max_tokens: int
    view: str
    why: str
    titles_say_nothing: bool = False  # read from title + description because the titles alone place nothing


def class_starts(encoders: Any, titles: Sequence[str], targets: Sequence[int], class_names: Sequence[str],
                 cfg: AnchorConfig, texts: Sequence[str] | None = None, text_tokens: int = 128) -> TuningStart:
    """What the tuning reads (``cfg.reads``) and where its class vectors start (``cfg.start``).

    Names: the encoder's embedding of each category's name, the prior that gives the recipe its lead where
    the names mean something. Where they are codes ("C117", "10001234"), every name embeds alike and the
    tuning first has to pull each vector away from a meaningless point: measured on the 863 Amazon UK
    listings with their 151 categories renamed to codes (benchmarks/RESULTS.md, "A taxonomy of codes"),
    starting at the names gave 0.623 / 0.465 accuracy / macro-F1 over three seeds, below TF-IDF + LR's 0.635 /
    0.496, and imprinting 0.648 / 0.512. Imprinting (Qi et al. 2018, "Low-shot learning with imprinted
    weights") starts each vector at the mean of its category's training titles as the frozen encoder reads
    them (``IMPRINT_ROWS`` of them at most). ``auto`` asks the names first: their zero-shot accuracy on the
    training titles (each title's nearest name; ``CHECK_ROWS`` of them at most, a seeded sample) against the
    accuracy the same answers would get by chance, were they independent of the category (the sum over
    categories of the share of titles in it times the share of answers naming it: Cohen's kappa's chance
    agreement); names that do not beat it by 3 standard errors carry no usable meaning. Not the share of the
    commonest category: on a skewed catalog meaningful names can fall below it (0.287 against 0.310 on 1,000
    rows of one), while answers independent of the category cannot beat chance. Names that fail are replaced
    only where the titles themselves tell the categories apart (each checked title's nearest category mean,
    itself left out, beats chance the same way). A category with no training row keeps its name.

    Titles that are SKUs ("SKU-3F9A21C0") embed alike: neither the names nor the titles' own means place them
    better than chance. ``reads: auto`` then tunes on ``texts`` (title + description, the fusion's text
    view, ``text_tokens`` of it) instead, and asks the same questions of them: on the 863 Amazon UK listings
    with SKU titles, 0.470 / 0.345 over three seeds against 0.352 / 0.248 tuned on the SKUs (seed 0; TF-IDF
    + LR 0.465 / 0.350), and 0.501 / 0.356 where the recipe then drops the title view too (``recipes/fusion``;
    benchmarks/RESULTS.md, "Titles that say nothing"). Where only some titles are SKUs the checks pass on the
    others; ``auto`` then compares the names' hits on the same checked rows by title and by title +
    description, and reads the latter where they place more rows by 3 standard errors of the paired
    difference (the half-SKU catalog: 0.184 against 0.340; the named catalogs within 0.006 of each other):
    0.522 / 0.371 there against 0.465 / 0.323 (seed 0). Where the titles say as much, they stay what the
    tuning reads: with each title + description read beside its title, the named Amazon split lost 2.3 points
    (0.669 against 0.692), and title + description take ~3.5 times the tuning time."""
    names = _embed_frozen(encoders, list(class_names), 64)
    view, read, limit = ("text", list(texts), text_tokens) if cfg.reads == "text" and texts else \
        ("title", list(titles), cfg.max_title_tokens)
    vectors, line, informative, why, hits = _start(encoders, read, targets, names, cfg, limit,
                                                   check=cfg.reads == "auto", noun=view)
    described = bool(texts) and any(t.strip() != r.strip() for t, r in zip(texts, titles))
    if cfg.reads == "auto" and described and (not informative or hits is not None):
        text_vectors, text_line, text_informative, _, text_hits = _start(encoders, list(texts), targets, names, cfg,
                                                                          text_tokens, check=True, noun="text")
        if not informative and text_informative:
            return TuningStart(text_vectors, list(texts), text_tokens, "text",
                               f"{text_line}, read from title + description: the titles say nothing ({why})",
                               titles_say_nothing=True)
        if informative and text_hits is not None:  # both views' names place rows: does the text place more?
            gain = text_hits.float() - hits.float()  # [N] paired over the same checked rows
            bar = 3 * float(gain.std()) / math.sqrt(len(gain)) if len(gain) > 1 else float("inf")
            if float(gain.mean()) > bar:
                return TuningStart(text_vectors, list(texts), text_tokens, "text",
                                   f"{text_line}, read from title + description: the names place "
                                   f"{float(gain.mean()):+.3f} more of them than of the titles (above {bar:.3f}; "
                                   f"{why})")
    return TuningStart(vectors, read, limit, view, line)


def _start(encoders: Any, titles: Sequence[str], targets: Sequence[int], names: torch.Tensor, cfg: AnchorConfig,
           max_tokens: int, check: bool, noun: str = "title"
           ) -> tuple[torch.Tensor, str, bool, str, torch.Tensor | None]:
    """``class_starts`` on one view (``noun``: what its texts are called in the line): the start vectors, the
    line, whether the names or the texts' own means place the texts better than chance (True where that
    was not asked: ``check`` off and ``start`` not auto), what the check found ("" where not asked), and
    where the names start because they beat chance, which checked rows they place ([N] bool, the same
    seeded rows for every view of them; else None)."""
    if (cfg.start == "names" and not check) or not titles:
        return names, "the category names", True, "", None
    order = list(range(len(titles)))
    random.Random(0).shuffle(order)  # which titles are read: the same on every run, the torch generator untouched
    vectors: dict[int, torch.Tensor] = {}
    what = f"training {noun}s"

    def read(rows: Sequence[int]) -> torch.Tensor:
        new = sorted({i for i in rows if i not in vectors}, key=lambda i: (len(titles[i]), i))  # less padding
        if new:
            vectors.update(zip(new, _embed_frozen(encoders, [titles[i] for i in new], max_tokens)))
        return torch.stack([vectors[i] for i in rows])

    why, says = "", True
    if cfg.start == "auto" or check:
        checked = order[:CHECK_ROWS]
        y = torch.tensor([targets[i] for i in checked], dtype=torch.long, device=names.device)
        z = read(checked)

        def beyond_chance(answers: torch.Tensor, who: str) -> tuple[bool, str]:
            right = float(answers.eq(y).float().mean())
            shares = [torch.bincount(v, minlength=len(names)).float() / len(y) for v in (y, answers)]
            chance = float((shares[0] * shares[1]).sum())  # answers independent of the category, these shares
            bar = chance + 3 * math.sqrt(chance * (1 - chance) / len(y))
            return right > bar, (f"{who} place {right:.3f} of {len(y)} {what}, {chance:.3f} by chance: "
                                 f"{'above' if right > bar else 'not above'} {bar:.3f}")

        named = (z @ names.T).argmax(-1)
        meaningful, why = beyond_chance(named, "the names alone")
        if meaningful and cfg.start != "imprint":
            return names, f"the category names ({why})", True, why, named.eq(y)
        if cfg.start == "names" or not meaningful:
            # the texts' own means, each text left out of its category's: a title that says nothing (a SKU) leaves
            # nothing to imprint, and the names are kept (they at least mean something to the names member)
            sums = torch.zeros_like(names).index_add_(0, y, z)
            own = nn.functional.one_hot(y, len(names)).bool()
            dots = z @ sums.T - own.float()  # z . (S_c - z) for its own category: |z| = 1
            norms = (sums.pow(2).sum(-1)[None, :] - 2 * (z @ sums.T) * own + own.float()).clamp_min(0).sqrt()
            cosines = torch.where(norms > 1e-6, dots / norms.clamp_min(1e-6), torch.full_like(dots, -2.0))
            informative, own_why = beyond_chance(cosines.argmax(-1), f"their {noun}s' own means (each {noun} "
                                                                      "left out)")
            why = f"{why}; {own_why}"
            if cfg.start == "names" or (cfg.start == "auto" and not informative):
                return names, f"the category names ({why})", informative, why, None
            says = informative  # imprinted as asked (start: imprint), whatever the check says
    if cfg.start == "imprint":  # asked for: each category's rows embedded in batches of their own, as without a check
        vectors.clear()
    taken: dict[int, list[int]] = {}
    for i in order:
        if len(taken.setdefault(targets[i], [])) < IMPRINT_ROWS:
            taken[targets[i]].append(i)
    starts = names.clone()
    for category, rows in taken.items():
        starts[category] = nn.functional.normalize(read(rows).sum(0), dim=-1)
    unseen = len(names) - len(taken)
    return starts, (f"the mean of each category's {what} (imprinted, {unseen} without rows at their names"
                    + (f"; {why})" if why else ")")), says, why, None


def tune_encoder(encoders: Any, titles: Sequence[str], targets: Sequence[int], class_names: Sequence[str],
                 cfg: AnchorConfig, seed: int, progress: Any = None, tasks: Sequence[TuningTask] = (),
                 start: torch.Tensor | None = None, max_tokens: int | None = None) -> tuple[torch.Tensor, float]:
    """Fine-tune ``encoders.text`` in place on (title, category index) pairs; returns the tuned
    class vectors [C, D] (unit length) and the learned scale. ``start``: where the class vectors start
    (``class_starts``; default the names' embeddings); ``max_tokens``: of each title read (default
    ``cfg.max_title_tokens``; ``class_starts`` says, where it reads title + description instead). ``tasks``
    (with ``cfg.attribute_weight``): enum attributes learned at the same time, each a cosine classifier of its own whose loss (over the
    batch's rows that state a value) is added with that weight. ``progress.update(n)`` per step."""
    text = encoders.text
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tasks = trained_tasks(tasks, cfg)

    if start is None:
        start = _embed_frozen(encoders, list(class_names), 64)
    start = start.to(next(text.parameters()).device).float()
    vectors = nn.Parameter(start.clone())
    scale = nn.Parameter(torch.tensor(float(cfg.scale), device=start.device))
    task_vectors = [nn.Parameter(_embed_frozen(encoders, list(t.value_names), 64).clone()) for t in tasks]
    task_scales = [nn.Parameter(torch.tensor(float(cfg.scale), device=start.device)) for _ in tasks]
    optimizer = torch.optim.AdamW([{"params": [p for p in text.parameters() if p.requires_grad], "lr": cfg.lr},
                                   {"params": [vectors, scale, *task_vectors, *task_scales], "lr": cfg.class_lr}],
                                  weight_decay=0.01, fused=fused_adamw(start.device) or None)
    y = torch.tensor(list(targets), dtype=torch.long, device=start.device)
    task_y = [torch.tensor(t.targets, dtype=torch.long, device=start.device) for t in tasks]
    total = cfg.epochs * math.ceil(len(titles) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total))
    tuned = [p for p in text.parameters() if p.requires_grad] + [vectors, scale]
    first_averaged = total - round(cfg.average * total)  # steps after this one are averaged
    mean: list[torch.Tensor] = []
    step = 0

    bf16 = tuning_precision(cfg, start.device) == "bfloat16"

    def forward_precision() -> Any:
        return torch.autocast(start.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    text.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(titles), generator=generator).tolist()
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            with forward_precision():
                z = _embed(encoders, [titles[j] for j in idx], max_tokens or cfg.max_title_tokens).float()
            logits = scale * z @ nn.functional.normalize(vectors, dim=-1).T
            loss = nn.functional.cross_entropy(logits, y[idx], label_smoothing=cfg.label_smoothing)
            for t_vectors, t_scale, t_y in zip(task_vectors, task_scales, task_y):
                stated = t_y[idx] >= 0
                if stated.any():
                    t_logits = t_scale * z[stated] @ nn.functional.normalize(t_vectors, dim=-1).T
                    loss = loss + cfg.attribute_weight * nn.functional.cross_entropy(
                        t_logits, t_y[idx][stated], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step > first_averaged:  # a running mean of the weights after each of the last steps
                with torch.no_grad():
                    if not mean:
                        mean = [p.detach().clone() for p in tuned]
                    else:
                        for m, p in zip(mean, tuned):
                            m.add_(p.detach() - m, alpha=1.0 / (step - first_averaged))
            if progress is not None:
                progress.update(len(idx))
    if mean:
        with torch.no_grad():
            for m, p in zip(mean, tuned):
                p.copy_(m)
    text.eval()
    return nn.functional.normalize(vectors.detach(), dim=-1), float(scale.detach())


def lr_factor(cfg: AnchorConfig, step: int, total: int) -> float:
    """The tuning learning rate at ``step`` of ``total``, as a share of ``cfg.lr``."""
    if cfg.schedule == "constant":
        return 1.0
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup else 0
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def fingerprint(module: nn.Module) -> str:
    """A short content hash of a module's weights: the feature-cache key of a tuned encoder."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return "tuned:" + h.hexdigest()[:16]


TUNING_FIELDS = ("epochs", "lr", "class_lr", "batch_size", "max_title_tokens", "scale", "label_smoothing")


def fused_adamw(device: torch.device) -> bool:
    """On the CPU, AdamW's fused kernel: 176 -> 30 ms a step over MiniLM's 22.7 M weights (2 cores), the
    same update to rounding. Part of the tuning's cache key: a store tuned the other way is not read."""
    return device.type == "cpu"


def tuned_store(folder: Path | None, encoder_id: str, titles: Sequence[str], targets: Sequence[int],
                class_names: Sequence[str], cfg: AnchorConfig, seed: int, tasks: Sequence[TuningTask] = (),
                device: torch.device | None = None, reads: TuningStart | None = None) -> Path | None:
    """Where a tuning's result is kept in a feature-cache folder: ``tuned/<hash>`` of the base encoder,
    the (title, category) pairs, the category names, the tuning settings, the seed and the optimizer the
    ``device`` tunes with (fused on a CPU; the members and the neighbour settings act at prediction only and
    are not part of it); where ``reads`` (``class_starts``) says the tuning reads title + description, those
    texts and their token limit instead of the titles. None without a folder."""
    if folder is None:
        return None
    h = hashlib.sha256()
    fused = device is None or fused_adamw(device)
    settings = {"encoder": encoder_id, "seed": seed, "torch": torch.__version__.split("+")[0],
                **{k: getattr(cfg, k) for k in TUNING_FIELDS}, "optimizer": "adamw fused on cpu" if fused else "adamw"}
    if cfg.schedule != "constant" or cfg.average:  # (the defaults keep the keys of tunings stored before these)
        settings.update(schedule=cfg.schedule, warmup=cfg.warmup, average=cfg.average)
    if cfg.start != "names":  # (as above; auto is a function of what the key reads already)
        settings.update(start=cfg.start)
    precision = tuning_precision(cfg, device or torch.device("cpu"))  # auto: what it resolves to (the same tuning)
    if precision != "float32":  # (as above)
        settings.update(precision=precision)
    tasks = trained_tasks(tasks, cfg)
    if tasks:  # (as above: a tuning without attribute tasks keeps its key)
        settings.update(attribute_weight=cfg.attribute_weight,
                        tasks=[[t.name, list(t.value_names), [int(v) for v in t.targets]] for t in tasks])
    if reads is not None and reads.view != "title":  # (as above: a tuning on the titles keeps its key)
        settings.update(reads=reads.view, max_tokens=reads.max_tokens)
        titles = reads.texts
    h.update(json.dumps(settings, sort_keys=True).encode())
    for part in (class_names, titles, [str(t) for t in targets]):
        h.update(json.dumps(list(part), ensure_ascii=False).encode())
    return Path(folder) / "tuned" / h.hexdigest()[:24]


def save_tuned(store: Path, text: nn.Module, vectors: torch.Tensor, scale: float) -> None:
    """Write a tuning's result (safetensors), whole or not at all: a stopped write leaves no store, and two runs
    sharing the cache that tuned the same key at once keep one."""
    def write(folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in text.state_dict().items()},
                  str(folder / "encoder.safetensors"))
        save_file({"class_vectors": vectors.detach().cpu().contiguous(), "scale": torch.tensor(float(scale))},
                  str(folder / "anchor.safetensors"))

    publish_folder(store, write)


def memory_sample(targets: Sequence[int], limit: int, seed: int) -> list[int]:
    """Row indices kept for the neighbour vote: all of them up to ``limit``, else a class-stratified
    sample (every class keeps at least one row, the rest in proportion)."""
    if len(targets) <= limit:
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    rng = random.Random(seed)
    for rows in by_class.values():
        rng.shuffle(rows)
    classes = list(by_class)
    if len(classes) >= limit:  # more classes than rows to keep: one row each of a random ``limit`` of them
        return sorted(by_class[c][0] for c in rng.sample(classes, limit))
    # one row a class first, then the rest of the limit in proportion to what each class has beyond it
    # (largest remainders): cutting a proportional sample at the limit dropped the last classes whole
    spare = {c: len(by_class[c]) - 1 for c in classes}
    room, total = limit - len(classes), sum(spare.values())
    quota = {c: room * spare[c] / total for c in classes}
    extra = {c: int(q) for c, q in quota.items()}
    for c in sorted(classes, key=lambda c: extra[c] - quota[c])[: room - sum(extra.values())]:
        extra[c] += 1
    return sorted(i for c in classes for i in by_class[c][: 1 + extra[c]])


class Anchor(nn.Module):
    """The tuned class vectors + the neighbour memory; the category vote of every member."""

    def __init__(self, cfg: AnchorConfig, classes: int, dim: int, memory_rows: int, views: Sequence[str],
                 attribute_classes: dict[str, int] | None = None, reference_rows: int = 0) -> None:
        super().__init__()
        self.cfg, self.views = cfg, list(views)
        self.register_buffer("class_vectors", torch.zeros(classes, dim))
        self.register_buffer("scale", torch.tensor(float(cfg.scale)))
        self.register_buffer("memory", torch.zeros(memory_rows, len(self.views) * dim))
        self.register_buffer("memory_labels", torch.zeros(memory_rows, dtype=torch.long))
        # the memory rows' class on each softmax attribute head they vote on (-100: no value), by head order
        self.attribute_classes = dict(attribute_classes or {})
        if self.attribute_classes:
            self.register_buffer("memory_targets", torch.full((memory_rows, len(self.attribute_classes)), -100,
                                                              dtype=torch.long))
        # the reference rows (``cfg.reference``): labelled rows read only by the check of each answer (``check``);
        # half precision, as the feature cache keeps them (8,170 rows of the 10k catalog: 12.5 MB); none, no buffers
        self.register_buffer("reference", torch.zeros(reference_rows, len(self.views) * dim, dtype=torch.float16)
                             if reference_rows else None)
        self.register_buffer("reference_labels", torch.zeros(reference_rows, dtype=torch.long) if reference_rows else None)
        # each reference row's id (encoders.row_key): a listing that is itself a reference row is not its own neighbour
        self.register_buffer("reference_keys", torch.zeros(reference_rows, dtype=torch.long) if reference_rows else None)

    @staticmethod
    def row_vectors(views: dict[str, tuple[torch.Tensor, torch.Tensor]], names: Sequence[str]) -> torch.Tensor:
        """[B, V*D]: each text view mean-pooled and unit length, concatenated (title first)."""
        return torch.cat([nn.functional.normalize(pool(views[v][0].float(), views[v][1], "mean"), dim=-1)
                          for v in names], -1)

    def nearest(self, rows: torch.Tensor, exclude: torch.Tensor | None = None,
                memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest memory rows of each row vector [B, V*D]: (indices [B, k], similarity weights [B, k]).
        ``exclude`` [B, N] (True = not a neighbour of that row): a held-out row's own memory entry;
        ``memory``: other rows to search (default: the training memory)."""
        memory = self.memory if memory is None else memory
        sims = rows @ memory.T / len(self.views)  # mean cosine over the views, [B, N]
        if exclude is not None:
            sims = sims.masked_fill(exclude, -2.0)  # below any cosine: never among the k unless all are excluded
        k = min(self.cfg.neighbours, sims.shape[1])
        top, idx = sims.topk(k, dim=-1)
        weights = torch.exp((top - top[:, :1]) / self.cfg.neighbour_temperature)
        if exclude is not None:
            weights = weights * (top > -2.0)
        return idx, weights

    def members(self, head_logits: torch.Tensor, views: dict[str, tuple[torch.Tensor, torch.Tensor]],
                nearest: tuple[torch.Tensor, torch.Tensor] | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each member's category distribution [B, C]; ``nearest``: the rows' neighbours, if known, and
        ``labels`` the category of each row they index (default: the training memory's)."""
        out = {"heads": torch.softmax(head_logits.float(), -1)}
        rows = self.row_vectors(views, self.views)
        dim = self.class_vectors.shape[1]
        if "names" in self.cfg.members:
            tuned = rows[:, :dim]  # the first view: the one the vectors were tuned on (the title, or the text)
            out["names"] = torch.softmax(self.scale * tuned @ self.class_vectors.T, -1)
        if "neighbours" in self.cfg.members and self.memory.shape[0]:
            idx, weights = nearest if nearest is not None else self.nearest(rows)
            labels = self.memory_labels if labels is None else labels
            votes = torch.zeros_like(out["heads"]).scatter_add_(1, labels[idx], weights)
            out["neighbours"] = votes / votes.sum(-1, keepdim=True)
        return out

    def attribute_votes(self, nearest: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The neighbours' vote on each attribute head [B, classes]: similarity-weighted counts of the
        neighbours' values (``<not stated>`` included, when the head has it); uniform when no neighbour
        has a value."""
        idx, weights = nearest
        out = {}
        for j, (name, classes) in enumerate(self.attribute_classes.items()):
            labels = self.memory_targets[:, j][idx]  # [B, k]
            known = (labels >= 0).to(weights.dtype)
            votes = torch.zeros(idx.shape[0], classes, device=idx.device).scatter_add_(
                1, labels.clamp_min(0), weights.float() * known)
            total = votes.sum(-1, keepdim=True)
            out[name] = torch.where(total > 0, votes / total.clamp_min(1e-12), torch.full_like(votes, 1.0 / classes))
        return out

    def mix(self, head_logits: torch.Tensor, views: dict[str, tuple[torch.Tensor, torch.Tensor]],
            extra: Sequence[torch.Tensor] = (), nearest: tuple[torch.Tensor, torch.Tensor] | None = None,
            labels: torch.Tensor | None = None) -> torch.Tensor:
        """Log of the mean of the members' distributions (and of ``extra`` ones: the lexical member's):
        the category logits at prediction (``nearest`` / ``labels``: as :meth:`members` takes them)."""
        members = self.members(head_logits, views, nearest, labels)
        mean = torch.stack([*members.values(), *(e.float() for e in extra)]).mean(0)
        return torch.log(mean.clamp_min(1e-12)).to(head_logits.dtype)

    def check(self, head_logits: torch.Tensor, views: dict[str, tuple[torch.Tensor, torch.Tensor]],
              extra: Sequence[torch.Tensor] = (), keys: torch.Tensor | None = None) -> torch.Tensor | None:
        """The same mixture as :meth:`mix`, its neighbours found among the training memory AND the reference
        rows: the distribution each answer's confidence is read from (None without reference rows).

        Why apart from the answer: the reference rows are labelled another way (a catalog's title-level rows,
        skewed towards a few categories); voting on the answer they cost accuracy (measured: 0.692 -> 0.651),
        but an answer that the nearest of many more labelled rows do not support is the one to send to a
        reviewer (benchmarks/RESULTS.md, "Human review"). ``keys`` [B]: the rows' ids (``encoders.row_key``);
        a row that is itself a reference row does not find itself there (labelling the reference catalog:
        its own label would vouch for its answer)."""
        if self.reference is None or not self.memory.shape[0] or "neighbours" not in self.cfg.members:
            return None
        memory = torch.cat([self.memory, self.reference.to(self.memory.dtype)])
        labels = torch.cat([self.memory_labels, self.reference_labels])
        exclude = None
        if keys is not None and self.reference_keys is not None:
            itself = keys.to(self.reference_keys.device)[:, None] == self.reference_keys[None, :]  # [B, R]
            if itself.any():
                exclude = torch.cat([torch.zeros(len(keys), self.memory.shape[0], dtype=torch.bool,
                                                 device=itself.device), itself], 1)
        nearest = self.nearest(self.row_vectors(views, self.views), exclude, memory=memory)
        return self.mix(head_logits, views, extra, nearest, labels)

    def settings(self) -> dict[str, Any]:
        """What a loaded model needs to rebuild the module before its weights load."""
        return {**self.cfg.__dict__, "views": self.views, "memory_size": int(self.memory.shape[0]),
                "attribute_classes": self.attribute_classes, "reference_size": 0 if self.reference is None else int(self.reference.shape[0])}
