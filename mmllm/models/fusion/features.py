"""Hashed features the fusion model reads without an encoder: the seller table and the listing's words.

* attributes: the seller table, one token per (name, value) pair, by value type: every token
  has its hashed name; a number (or the number inside "998 g") adds sign * log1p |x|, a yes/no
  adds a boolean feature, a short word value (brand, colour, language) adds a hashed name=value
  bucket, each item of a list its own token; long free text and codes add only their name, so
  model numbers and prices are not memorized. Unknown names and values fall into hash buckets.
* lexical: a hashed bag of word n-grams (the wide half of wide-and-deep: brand names, model
  numbers and rare words a small encoder blurs).

Also how a taxonomy path is read by the text encoder for the category-name prior (``category_name``).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from mmllm.catalog import Listing


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


def category_name(path: str) -> str:
    """How a taxonomy path is read by the text encoder: the leaf first, its ancestors in brackets."""
    parts = [p.strip() for p in path.split(">")]
    return parts[-1] if len(parts) == 1 else f"{parts[-1]} ({' > '.join(parts[:-1])})"
