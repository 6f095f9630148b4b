"""The fusion model: pretrained text / image encoders + a small attribute network, fused, softmax heads.

The CPU baseline the VLM must beat. Three modalities, each as token-level features [B, T, H]
with a mask, plus a pooled vector (masked mean):

* text: the text encoder (``encoders``) reads the title alone and title + description (cut to
  its max length), beside a hashed bag of word n-grams (``lexical``, see ``features``);
* image: the listing's photos through the vision backbone (or ``none``); patch tokens of every
  photo, concatenated; a listing without photos has the modality masked;
* attributes: the seller table as hashed tokens (``features``) through a small MLP; an empty
  table is a masked modality.

Encoders are frozen by default and their features CACHED on disk (``encoders.FeatureCache``);
``freeze: false`` fine-tunes them end to end (no cache). The fusion methods live in ``layers``.

Category-name prior (``label_prior``, on by default): the taxonomy's own words are embedded once by
the same text encoder ("Harry Potter (Characters & Brands)"), and a learned scale times the cosine
between each text view and each category name is added to the category logits. A catalog team
has a taxonomy of hundreds of categories and a handful of labelled rows for most of them: the
prior lets a category with one labelled row, or none, still win when the listing says what it
is. The category vectors are a buffer saved with the weights. ``value_prior`` does the same for the
values of enum and list attributes, where a value's name carries meaning (a brand, "3y-5y", "Fine
Motor Skills"): one :class:`NamePrior` per such head, its "<not stated>" class left at zero.

Heads, targets, loss, calibration and the prediction record come from ``mmllm.models.heads``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmllm.catalog import Listing
from mmllm.class_prior import ClassPrior, smoothed_shares
from mmllm.config import help_field
from mmllm.images import ImagePolicy
from mmllm.predictor import predict_in_batches
from mmllm.models.fusion.anchor import Anchor, AnchorConfig
from mmllm.models.fusion.encoders import AttributeEncoder, Encoders, Featurizer
from mmllm.models.fusion.lexicon import LEXICON_FILE, Lexicon, Vectorizer
from mmllm.models.fusion.layers import FUSIONS
from mmllm.models.fusion.vote import MEMBERS as VOTE_MEMBERS
from mmllm.models.fusion.vote import mix
from mmllm.models.heads import (NOT_STATED, HeadSpec, encode_targets, head_probabilities, json_number, pool,
                                prediction_record)
from mmllm.schema import LabelSchema

FUSION_FILE = "fusion.safetensors"
FUSION_CONFIG = "fusion.json"
MODALITIES = ("text", "image", "attributes")


@dataclass
class FusionConfig:
    """The fusion model (used when ``task: fusion``)."""

    text_encoder: str = help_field("minilm", "HF AutoModel text encoder id/path; minilm = the bundled all-MiniLM-L6-v2")
    image_encoder: str = help_field("none", "HF AutoModel vision backbone id/path, or none")
    method: Literal["concat", "attention", "coattention"] = help_field("attention", "how the modalities are fused")
    modalities: list[str] = help_field(default_factory=lambda: list(MODALITIES), help="modalities used (ablations)")
    hidden: int = help_field(256, "width of the fused representation")
    dropout: float = help_field(0.2, "dropout in the fusion MLPs")
    heads: int = help_field(4, "attention heads of the co-attention")
    freeze: bool = help_field(True, "frozen encoders with cached features; false = fine-tune end to end")
    cache_dir: str | None = help_field(None, "feature cache folder (default: <output_dir>/feature_cache)")
    max_text_tokens: int = help_field(256, "text tokens kept (title first, then description)")
    title_view: bool = help_field(True, "also encode the title alone (a second, sharper text view)")
    lexical: bool = help_field(True, "hashed word uni/bigrams of title, description and short attribute values")
    lexical_buckets: int = help_field(16384, "hash buckets of the lexical features")
    attr_buckets: int = help_field(4096, "hash buckets for attribute names and name=value pairs")
    max_attributes: int = help_field(32, "attribute tokens kept per listing")
    modality_dropout: float = help_field(0.25, "training: chance to hide a whole modality (never all of them)")
    token_dropout: float = help_field(0.3, "training: chance to hide each attribute token")
    encoder_lr: float = help_field(2e-5, "learning rate of unfrozen encoders (freeze: false)")
    encode_batch: int = help_field(32, "listings per encoder batch when filling the cache")
    label_prior: bool = help_field(True, "add the text encoder's cosine between the listing and each category's "
                                         "name to the category logits (rare and unseen categories get a signal)")
    label_prior_scale: float = help_field(5.0, "initial (learned) scale of that cosine, per text view")
    value_prior: bool = help_field(False, "the same for enum and list attributes: add a learned scale x the cosine "
                                          "between the listing and each value's name (\"LEGO\", \"3y-5y\", \"Fine "
                                          "Motor Skills\") to that head's logits")
    prior_correction: float = help_field(0.0, "at prediction, subtract this x log(training share of each category) "
                                              "from the category's log-probabilities (logit adjustment): 1 = the "
                                              "balanced posterior, for a skewed training catalog; 0 = off")

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"fusion.modalities must be a non-empty subset of {list(MODALITIES)}, got {self.modalities}")
        for name in ("hidden", "heads", "max_text_tokens", "max_attributes", "encode_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"fusion.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lexical_buckets", "attr_buckets"):  # bucket 0 is padding
            if getattr(self, name) < 2:
                raise ValueError(f"fusion.{name} must be >= 2, got {getattr(self, name)}")
        for name in ("dropout", "modality_dropout", "token_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"fusion.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.prior_correction < 0:
            raise ValueError(f"fusion.prior_correction must be >= 0, got {self.prior_correction}")
        if self.method == "coattention" and self.hidden % self.heads:
            raise ValueError(f"fusion.hidden ({self.hidden}) must be a multiple of fusion.heads ({self.heads})")


def name_cosines(views: dict[str, tuple[torch.Tensor, torch.Tensor]], vectors: torch.Tensor) -> torch.Tensor:
    """[B, C] the sum over text views of cos(mean-pooled listing view, each name vector [C, D])."""
    return torch.stack([nn.functional.normalize(pool(t, mask, "mean"), dim=-1) @ vectors.T
                        for t, mask in views.values()]).sum(0)


class NamePrior(nn.Module):
    """A learned scale x the cosine between the listing and each class's name (unit vectors [C, D]
    from the text encoder, a buffer saved with the weights; a zero row gives its class no prior)."""

    def __init__(self, vectors: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("vectors", vectors.float())
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, views: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        return self.scale * name_cosines(views, self.vectors)


def value_name_vectors(schema: LabelSchema, specs: list[HeadSpec], encoders: Encoders) -> dict[str, torch.Tensor]:
    """The value-name priors' vectors (``value_prior``): per enum / list attribute head, each value's name
    embedded by the text encoder [C, D]; "<not stated>" a zero row (no prior). Booleans and numbers have none."""
    named = {a.name for a in schema.attributes if a.type in ("enum", "list")}
    out = {}
    for sp in specs[1:]:
        if sp.name in named:
            vectors = encoders.sentence_vectors([str(c).replace("_", " ") for c in sp.classes])
            if sp.classes and sp.classes[0] == NOT_STATED:
                vectors[0] = 0.0
            out[sp.name] = vectors
    return out


class FusionModel(nn.Module):
    """Projections of each modality to ``hidden`` -> fusion -> one head per schema field."""

    def __init__(self, cfg: FusionConfig, specs: list[HeadSpec], text_dim: int, image_dim: int,
                 encoders: Encoders | None = None, label_vectors: torch.Tensor | None = None,
                 anchor: Anchor | None = None, lexicon: Lexicon | None = None,
                 value_vectors: dict[str, torch.Tensor | None] | None = None) -> None:
        super().__init__()
        self.cfg, self.specs = cfg, specs
        self.modalities = [m for m in MODALITIES if m in cfg.modalities and (m != "image" or image_dim)]
        h = cfg.hidden
        self.encoders = encoders if not cfg.freeze else None  # trained end to end only when unfrozen
        self.proj = nn.ModuleDict()
        if "text" in self.modalities:
            for view in ("text", "title") if cfg.title_view else ("text",):
                self.proj[view] = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, h))
            if cfg.lexical:  # a linear bag of hashed n-grams: sum of per-n-gram vectors, tf weighted
                self.lexical = nn.EmbeddingBag(cfg.lexical_buckets, h, mode="sum", padding_idx=0)
                nn.init.normal_(self.lexical.weight, std=0.02)
        if "image" in self.modalities:
            self.proj["image"] = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, h))
        if "attributes" in self.modalities:
            self.attributes = AttributeEncoder(cfg.attr_buckets, h)
        args = (len(self.modalities), h, cfg.dropout) + ((cfg.heads,) if cfg.method == "coattention" else ())
        self.fusion = FUSIONS[cfg.method](*args)
        self.dropout = nn.Dropout(cfg.dropout)
        self.heads = nn.ModuleDict({s.name: nn.Linear(self.fusion.out_dim, len(s.classes)) for s in specs if s.classes})
        self.register_buffer("label_vectors", None)
        if cfg.label_prior and "text" in self.modalities and specs and specs[0].name == "category":
            # the category names embedded by the same text encoder [C, D], unit length; saved with the weights
            shape = (len(specs[0].classes), text_dim)
            self.label_vectors = torch.zeros(shape) if label_vectors is None else label_vectors.float()
            self.label_scale = nn.Parameter(torch.tensor(float(cfg.label_prior_scale)))
        # value-name priors ({head: [C, D] or None = zeros until the weights load}), for the heads the recipe names
        sizes = {sp.name: len(sp.classes) for sp in specs}
        self.value_priors = nn.ModuleDict({
            name: NamePrior(torch.zeros(sizes[name], text_dim) if v is None else v, cfg.label_prior_scale)
            for name, v in (value_vectors or {}).items()
            if cfg.value_prior and "text" in self.modalities and name in self.heads})
        if cfg.prior_correction and specs and specs[0].name == "category":  # filled by set_prior (training counts)
            self.register_buffer("log_prior", torch.zeros(len(specs[0].classes)))
        self.anchor = anchor  # name-anchored members (tuned encoder): they vote beside the heads at prediction
        self.lexicon = lexicon  # the convex bag-of-words member (``lexicon``): votes on every head it fits
        # who votes on the attribute heads and with what weights ({head: {member: weight}}; none = equal): vote.py
        self.vote_members: list[str] = list(VOTE_MEMBERS)
        self.vote_weights: dict[str, dict[str, float]] = {}
        self.vote_scores: dict[str, dict[str, float]] = {}
        self.temperature = 1.0
        self.check_temperature = 1.0  # the same for ``category_check`` (reference rows), fitted on dev apart
        self.last_weights: torch.Tensor | None = None

    def _encoded(self, batch: dict[str, torch.Tensor], view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder token features of one view: from the cache, or run the (trainable) encoder."""
        if f"{view}_tokens" in batch:
            return batch[f"{view}_tokens"].float(), batch[f"{view}_mask"]
        if view == "image":
            pixels, present = batch["pixel_values"], batch["image_present"]  # [B, K, C, H, W], [B, K]
            b, k = present.shape
            out = self.encoders.image_tokens(pixels.flatten(0, 1))  # [B*K, P, D]
            return out.reshape(b, k * out.shape[1], out.shape[-1]).float(), present.repeat_interleave(out.shape[1], dim=1)
        mask = batch[f"{view}_attention_mask"]
        return self.encoders.text_tokens(batch[f"{view}_input_ids"], mask).float(), mask

    def _features(self, batch: dict[str, torch.Tensor], view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features of one view; concat / attention read one pooled token (pooled before
        projecting: much faster), co-attention every token."""
        t, mask = self._encoded(batch, view)
        if self.cfg.method != "coattention":
            t, mask = pool(t, mask, "mean").unsqueeze(1), (mask.sum(1, keepdim=True) > 0).long()
        return t, mask

    def text_views(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The features of each text view (text, title), once a batch: the fusion and the prior share them."""
        return {view: self._features(batch, view) for view in self.proj if view in ("text", "title")}

    def _project(self, features: tuple[torch.Tensor, torch.Tensor], view: str) -> tuple[torch.Tensor, torch.Tensor]:
        t, mask = features
        return self.proj[view](self.dropout(t)), mask

    def modality_features(self, batch: dict[str, torch.Tensor], views: dict[str, Any] | None = None
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per modality: token vectors [B, T, H] and their mask [B, T] (one pooled token unless co-attention)."""
        pooled = self.cfg.method != "coattention"
        views = self.text_views(batch) if views is None else views
        tokens, masks = [], []
        for m in self.modalities:
            if m == "text":
                parts = [self._project(features, view) for view, features in views.items()]
                if self.cfg.lexical:
                    weights = batch["lexical_weights"].float()
                    bag = self.lexical(batch["lexical_ids"], per_sample_weights=weights).unsqueeze(1)
                    parts.append((bag, (weights.sum(1, keepdim=True) > 0).long()))
                if pooled:  # the views add up: one linear map of all of them, as a concat would be
                    present = torch.stack([p_mask for _, p_mask in parts], 0)  # [V, B, 1]
                    t = sum(p * p_mask.unsqueeze(-1).to(p.dtype) for p, p_mask in parts)
                    mask = present.amax(0)
                else:
                    t, mask = torch.cat([p for p, _ in parts], 1), torch.cat([p_mask for _, p_mask in parts], 1)
            elif m == "image":
                t, mask = self._project(self._features(batch, "image"), "image")
            else:
                t = self.attributes(batch["attr_names"], batch["attr_values"], batch["attr_features"].float())
                mask = batch["attr_mask"]
                if self.training and self.cfg.token_dropout > 0:
                    mask = mask * (torch.rand(mask.shape, device=mask.device) >= self.cfg.token_dropout).long()
            tokens.append(t)
            masks.append(mask)
        if self.training and self.cfg.modality_dropout > 0 and len(masks) > 1:
            # drop whole modalities now and then (never all), so no single one is memorized
            present = torch.stack([m.sum(1) > 0 for m in masks], 1)
            drop = (torch.rand(present.shape, device=present.device) < self.cfg.modality_dropout) & present
            drop &= (present & ~drop).any(1, keepdim=True)
            masks = [m * (~drop[:, i:i + 1]).long() for i, m in enumerate(masks)]
        return tokens, masks

    def fused(self, batch: dict[str, torch.Tensor], views: dict[str, Any] | None = None) -> torch.Tensor:
        """The fused representation [B, out_dim] that every head reads."""
        fused, weights = self.fusion(*self.modality_features(batch, views))
        self.last_weights = None if weights is None else weights.detach()
        return fused

    def label_prior(self, views: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """[B, C] learned scale x the sum over text views of cos(listing view, category name)."""
        return self.label_scale * name_cosines(views, self.label_vectors)

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        views = self.text_views(batch)
        fused = self.dropout(self.fused(batch, views))
        logits = {name: head(fused) for name, head in self.heads.items()}
        if self.label_vectors is not None and views:
            logits["category"] = logits["category"] + self.label_prior(views)
        if views:
            for name, prior in self.value_priors.items():
                logits[name] = logits[name] + prior(views)
        if self.training:  # training fits the heads alone; the members vote at prediction
            return logits
        lexical = {}
        if self.lexicon is not None and "lexicon_ids" in batch:  # the convex member votes
            lexical = {n: torch.softmax(v.float(), -1) for n, v in
                       self.lexicon(batch["lexicon_ids"], batch["lexicon_weights"]).items()}
        nearest = None
        if self.anchor is not None and views and self.anchor.memory.shape[0]:
            nearest = self.anchor.nearest(Anchor.row_vectors(views, self.anchor.views))
        check = None
        if self.anchor is not None and views:
            extra = [lexical.pop("category")] if "category" in lexical else []
            check = self.anchor.check(logits["category"], views, extra, batch.get("row_key"))  # None without reference rows
            logits["category"] = self.anchor.mix(logits["category"], views, extra, nearest)
        neighbours = {}
        if nearest is not None and "neighbours" in self.vote_members:
            neighbours = self.anchor.attribute_votes(nearest)
        for name in dict.fromkeys([*lexical, *neighbours]):  # the weighted mean (vote.py), as log-probabilities
            members = {"heads": torch.softmax(logits[name].float(), -1)}
            if name in lexical and (name == "category" or "lexicon" in self.vote_members):
                members["lexicon"] = lexical[name]
            if name in neighbours:
                members["neighbours"] = neighbours[name]
            if len(members) > 1:
                mean = mix(members, self.vote_weights.get(name))
                logits[name] = torch.log(mean.clamp_min(1e-12)).to(logits[name].dtype)
        if check is not None:  # what the answer's confidence is read from (Anchor.check)
            logits["category_check"] = check
        if self.cfg.prior_correction:  # the balanced posterior (logit adjustment)
            for name in ("category", "category_check"):
                if name in logits:
                    adjusted = torch.log_softmax(logits[name].float(), -1) - self.cfg.prior_correction * self.log_prior
                    logits[name] = adjusted.to(logits[name].dtype)
        return logits

    def set_prior(self, counts: Sequence[int]) -> None:
        """The training share of each category (add-one smoothed), for ``prior_correction``."""
        self.log_prior.copy_(torch.log(torch.tensor(smoothed_shares(counts))))

    # ------------------------------------------------------------------ persistence
    def save(self, folder: Path, tuned_text: Encoders | None = None, vectorizer: Vectorizer | None = None) -> None:
        """Weights (safetensors) + ``fusion.json``; a fine-tuned text encoder (end to end, or
        ``tuned_text`` by the anchor) is saved beside them as ``text_encoder/``; the lexical member's
        vocabulary (``vectorizer``) as ``lexicon.json``."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("encoders.")}
        save_file(state, str(folder / FUSION_FILE))
        text_id, image_id = self.cfg.text_encoder, self.cfg.image_encoder
        trained_text = tuned_text if tuned_text is not None else self.encoders  # either travels with the model
        if trained_text is not None and trained_text.text is not None:
            trained_text.text.save_pretrained(folder / "text_encoder", safe_serialization=True)
            trained_text.tokenizer.save_pretrained(folder / "text_encoder")
            text_id = "text_encoder"
        if self.encoders is not None:  # fine-tuned end to end: the image encoder too
            if self.encoders.image is not None:
                self.encoders.image.save_pretrained(folder / "image_encoder")
                self.encoders.image_processor.save_pretrained(folder / "image_encoder")
                image_id = "image_encoder"
        config = {"fusion": {**self.cfg.__dict__, "text_encoder": text_id, "image_encoder": image_id},
                  "text_dim": self.proj["text"][1].in_features if "text" in self.proj else 0,
                  "image_dim": self.proj["image"][1].in_features if "image" in self.proj else 0,
                  "temperature": self.temperature, "check_temperature": self.check_temperature,
                  "modalities": self.modalities,
                  "heads": [s.__dict__ for s in self.specs],
                  "anchor": self.anchor.settings() if self.anchor is not None else None,
                  "lexicon": self.lexicon.shapes() if self.lexicon is not None else None,
                  "lexicon_hurdle": self.lexicon.hurdle if self.lexicon is not None else [],
                  "value_prior_heads": list(self.value_priors),
                  "vote": {"members": self.vote_members, "weights": self.vote_weights, "held_out": self.vote_scores}}
        (folder / FUSION_CONFIG).write_text(json.dumps(config, indent=2, default=json_number))
        if self.lexicon is not None:
            if vectorizer is None:
                raise ValueError("a model with a lexical member is saved with its vectorizer")
            (folder / LEXICON_FILE).write_text(json.dumps(vectorizer.to_dict(), ensure_ascii=False))


def _read_json(path: Path) -> Any:
    """A JSON file of the folder, or an error naming it (a damaged folder is told apart from a bug)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the model folder is damaged: retrain or copy it again") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc}); the model folder is damaged: retrain or copy it again") from None


def load_fusion(folder: str | Path, schema: LabelSchema, device: str | None = None,
                untrained: Sequence[str] = (), max_images: int = 4) -> "FusionPredictor":
    """The fusion weights of a model folder as a predictor (:func:`mmllm.model_dir.load` reads the
    folder's schema, the attributes its meta file records with no training rows (answered null) and
    ``max_images``, the photos per listing the model was trained on)."""
    folder = Path(folder)
    config = _read_json(folder / FUSION_CONFIG)
    saved = dict(config["fusion"])
    for key in ("text_encoder", "image_encoder"):
        if (folder / saved[key]).is_dir() and saved[key] in ("text_encoder", "image_encoder"):
            saved[key] = str(folder / saved[key])
    saved.setdefault("label_prior", False)  # folders written before the prior existed
    cfg = FusionConfig(**{**saved, "freeze": True, "cache_dir": None})
    specs = [HeadSpec(**{**h, "edges": [float(e) for e in h["edges"]]}) for h in config["heads"]]
    encoders = Encoders(cfg.text_encoder, cfg.image_encoder, cfg.max_text_tokens,
                        "text" in config["modalities"], "image" in config["modalities"])
    anchor = None
    if config.get("anchor"):
        saved_anchor = dict(config["anchor"])
        views, size = saved_anchor.pop("views"), saved_anchor.pop("memory_size")
        attribute_classes = saved_anchor.pop("attribute_classes", None)  # None: a folder from before the attribute vote
        reference = saved_anchor.pop("reference_size", 0)  # none in folders from before the reference rows
        anchor = Anchor(AnchorConfig(**saved_anchor), len(specs[0].classes), config["text_dim"], size, views,
                        attribute_classes, reference)
    lexicon = vectorizer = None
    if config.get("lexicon"):
        lexicon = Lexicon({n: tuple(shape) for n, shape in config["lexicon"].items()},
                          hurdle=config.get("lexicon_hurdle", ()))  # none in folders from before the hurdle
        vectorizer = Vectorizer.from_dict(_read_json(folder / LEXICON_FILE))
    model = FusionModel(cfg, specs, config["text_dim"], config["image_dim"], anchor=anchor, lexicon=lexicon,
                        value_vectors=dict.fromkeys(config.get("value_prior_heads", ())))  # none before the prior
    state = load_file(str(folder / FUSION_FILE))
    if "anchor.reference" in state and "anchor.reference_keys" not in state:  # written before the keys (2026-12-06)
        state["anchor.reference_keys"] = torch.full((state["anchor.reference"].shape[0],), -1, dtype=torch.long)
    model.load_state_dict(state)
    model.temperature = float(config["temperature"])
    model.check_temperature = float(config.get("check_temperature", 1.0))
    vote = config.get("vote") or {}  # folders from before the per-head weights: the equal-weight mean
    model.vote_members = list(vote.get("members", VOTE_MEMBERS))
    model.vote_weights = {h: dict(w) for h, w in vote.get("weights", {}).items()}
    model.vote_scores = dict(vote.get("held_out", {}))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    encoders.to(device).eval()
    return FusionPredictor(model, Featurizer(encoders, cfg, lexicon=vectorizer), schema,
                           max_images=max_images if encoders.image is not None else 0, untrained=tuple(untrained))


# ---------------------------------------------------------------------- prediction
@dataclass
class FusionPredictor:
    """The label interface (``encode`` / ``predict_encoded`` / ``predict``) for a fusion model."""

    model: FusionModel
    featurizer: Featurizer
    schema: LabelSchema
    max_images: int = 0
    batch_size: int = 32
    top_k: int = 5
    untrained: tuple[str, ...] = ()  # attributes without training rows: answered null
    class_prior: ClassPrior | None = None  # the category answers moved to another catalog's shares
    takes: ClassVar[frozenset[str]] = frozenset({"encoder_precision", "class_prior"})  # no decoding options
    light_encode: ClassVar[bool] = False  # encode runs the text and image encoders: its workers keep torch's threads

    @property
    def encoder_precision(self) -> str:
        """``float32`` (as trained) or ``bfloat16``: the encoders run under bf16 autocast."""
        return self.featurizer.precision

    @encoder_precision.setter
    def encoder_precision(self, value: str) -> None:
        self.featurizer.precision = value

    def encode(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.featurizer(listings, [list(i)[: self.max_images] for i in images])

    def predict_encoded(self, enc: dict[str, torch.Tensor], raw: bool = False) -> list[dict[str, Any]]:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(**{k: v.to(device) for k, v in enc.items()})
        probs = head_probabilities(self.model.specs, logits, self.model.temperature)
        check = None
        if "category_check" in logits:  # the answer's confidence, once the reference rows are consulted
            check = torch.softmax(logits["category_check"].float().cpu() / self.model.check_temperature, -1)
        if self.class_prior is not None:
            probs["category"] = self.class_prior.apply(probs["category"])
            check = None if check is None else self.class_prior.apply(check)
        weights = self.model.last_weights
        records = []
        classes = {c: i for i, c in enumerate(self.model.specs[0].classes)}
        for row in range(enc["attention_mask"].shape[0]):
            record = prediction_record(self.model.specs, probs, row, self.schema, self.top_k, self.untrained)
            if check is not None and record.get("category") in classes:
                record["confidence"] = round(float(check[row, classes[record["category"]]]), 6)
            if weights is not None:
                record["modality_weights"] = {m: round(float(w), 4) for m, w in zip(self.model.modalities, weights[row])}
            records.append(record)
        return records

    def embed_encoded(self, enc: dict[str, torch.Tensor], pooling: str = "last") -> np.ndarray:
        """[N, D] L2-normalized float32 fused representations (what the heads read): for search.

        ``pooling`` is the VLM kinds' choice; the fused vector is already one per listing."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            fused = self.model.fused({k: v.to(device) for k, v in enc.items()})
        return torch.nn.functional.normalize(fused.float(), dim=-1).cpu().numpy().astype(np.float32)

    def predict(self, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[dict[str, Any]]:
        return predict_in_batches(self, listings, image_policy)


# ---------------------------------------------------------------------- training batches
@dataclass
class FusionCollator:
    """(listing, seed) pairs -> features + head targets, for ``train_loop``."""

    featurizer: Featurizer
    schema: LabelSchema
    specs: list[HeadSpec]
    image_policy: ImagePolicy
    max_images: int
    members: bool = True  # the voting members' inputs too (evaluation); training batches go without them

    def __call__(self, batch: Sequence[tuple[Listing, int]]) -> dict[str, torch.Tensor]:
        from mmllm.collator import load_listing_images

        listings = [listing for listing, _ in batch]
        images = [load_listing_images(r, self.image_policy, self.max_images) if self.max_images else [] for r in listings]
        return {**self.featurizer(listings, images, self.members),
                **encode_targets(self.specs, [r.label for r in listings], self.schema)}
