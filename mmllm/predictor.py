"""What every model kind offers the jobs above it: the :class:`Predictor` protocol.

The generative predictor (:mod:`mmllm.models.generative`), the classification heads
(:mod:`mmllm.models.classifier`) and the fusion model (:mod:`mmllm.models.fusion`) all implement
it, so labelling, search and the demo never ask which kind they hold. Work is split in two so the
CPU part can run in worker threads while the model runs:

- ``encode(listings, images)``: prompts, tokens, pixels or features for one batch (CPU);
- ``predict_encoded(encoded, raw=False)``: one record per row, without the id - ``category``,
  ``attributes``, ``status`` and what the kind adds (``confidence``, ``top_k``, ...); with
  ``raw`` a generative model adds the text it decoded (``raw``);
- ``embed_encoded(encoded, pooling)``: [B, D] L2-normalized vectors for similar-product search
  (the pooled prompt state of a VLM, the fused representation of the fusion model).

Options a kind does not take are refused by :func:`configure` with a message naming the option,
never silently ignored and never an ``AttributeError``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from mmllm.catalog import Listing
from mmllm.collator import load_listing_images
from mmllm.images import ImagePolicy
from mmllm.schema import LabelSchema

# option name -> what it means, for the messages
OPTIONS = {
    "constrained": "schema-constrained decoding (generative models only; heads always answer inside the schema)",
    "max_new_tokens": "the generation budget (generative models only)",
    "pixels": "image pixel bounds (models that read images through a Qwen-VL processor)",
    "static_cache": "a static decoding cache, compiled on a GPU (generative models only)",
    "encoder_precision": "a lower precision for its encoders (fusion models only)",
    "class_prior": "another catalog's category shares (models with a category head: classifier, fusion)",
}

ENCODER_PRECISIONS = ("float32", "bfloat16")  # a fusion model's encoders: as trained, or under bf16 autocast


STATIC_COMPILE = ("cudagraphs", "inductor", "eager")  # how a static decoding cache's step is compiled on a GPU


class OptionError(ValueError):
    """An option the loaded model does not take."""


@runtime_checkable
class Predictor(Protocol):
    schema: LabelSchema
    max_images: int  # images read per listing (0: the model reads none)
    batch_size: int
    takes: ClassVar[frozenset[str]]  # which of OPTIONS it takes
    # whether encode is light host work (prompts, tokens, pictures) and the model's work all in predict_encoded:
    # then the labeller's encoding workers run torch on one thread each (mmllm/openmp.py); False where
    # encode runs encoders itself (fusion), which want the cores
    light_encode: ClassVar[bool]

    def encode(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> Any: ...

    def predict_encoded(self, encoded: Any, raw: bool = False) -> list[dict[str, Any]]: ...

    def embed_encoded(self, encoded: Any, pooling: str = "last") -> np.ndarray: ...


def configure(predictor: Predictor, *, source: str, batch_size: int | None = None, constrained: bool | None = None,
              max_new_tokens: int | None = None, min_pixels: int | None = None,
              max_pixels: int | None = None, static_cache: str | None = None,
              encoder_precision: str | None = None) -> Predictor:
    """Apply the options the user gave (``None``: not given); refuse one the model does not take.
    ``static_cache``: how its decoding step is compiled (``cudagraphs``, ``inductor``, ``eager``);
    ``encoder_precision``: one of :data:`ENCODER_PRECISIONS`."""
    from mmllm.collator import set_pixel_budget

    given = {"constrained": constrained is not None, "max_new_tokens": max_new_tokens is not None,
             "pixels": bool(min_pixels or max_pixels), "static_cache": bool(static_cache),
             "encoder_precision": encoder_precision is not None}
    for option, asked in given.items():
        if asked and option not in predictor.takes:
            flag = {"pixels": "--min-pixels / --max-pixels", "constrained": "--no-constrained"}.get(
                option, "--" + option.replace("_", "-"))
            raise OptionError(f"{flag}: {source} is a {model_kind(predictor)} "
                              f"model and does not take {OPTIONS[option]}; leave it out")
    if batch_size is not None:
        predictor.batch_size = batch_size
    if constrained is not None:
        predictor.constrained = constrained
    if max_new_tokens is not None:
        predictor.max_new_tokens = max_new_tokens
    if static_cache:
        if static_cache not in STATIC_COMPILE:
            raise OptionError(f"--static-compile {static_cache!r}: one of {', '.join(STATIC_COMPILE)}")
        predictor.static_cache, predictor.static_compile = True, static_cache
    if encoder_precision is not None:
        if encoder_precision not in ENCODER_PRECISIONS:
            raise OptionError(f"--encoder-precision {encoder_precision!r}: one of {', '.join(ENCODER_PRECISIONS)}")
        predictor.encoder_precision = encoder_precision
    if min_pixels or max_pixels:
        size = predictor.processor.image_processor.size
        set_pixel_budget(predictor.processor, min_pixels or size["shortest_edge"], max_pixels or size["longest_edge"])
    return predictor


def model_kind(predictor: Predictor) -> str:
    """``generative``, ``classifier``, ``fusion``: the kind of the model itself, also inside a wrapper that
    keeps it as ``inner`` (:class:`mmllm.grounding.GroundedPredictor`)."""
    return type(getattr(predictor, "inner", predictor)).__name__.removesuffix("Predictor").lower()


def encoded_batches(predictor: Predictor, listings: Sequence[Listing],
                    image_policy: ImagePolicy) -> Iterator[tuple[Sequence[Listing], Any]]:
    """(chunk, encoded chunk) over ``batch_size`` chunks - the one batching loop outside labelling.

    Images that fail to load are dropped with a warning (the labelling engine is the strict path).
    """
    for start in range(0, len(listings), predictor.batch_size):
        chunk = listings[start:start + predictor.batch_size]
        images = [load_listing_images(listing, image_policy, predictor.max_images) if predictor.max_images else []
                  for listing in chunk]
        yield chunk, predictor.encode(chunk, images)


def predict_in_batches(predictor: Predictor, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[dict[str, Any]]:
    """One record (with its id) per listing, in order."""
    return [{"id": listing.id, **record} for chunk, encoded in encoded_batches(predictor, listings, image_policy)
            for listing, record in zip(chunk, predictor.predict_encoded(encoded))]


def embed_in_batches(predictor: Predictor, listings: Sequence[Listing], image_policy: ImagePolicy,
                     pooling: str = "last") -> np.ndarray:
    """[N, D] L2-normalized float32 vectors of ``listings``, in order."""
    chunks = [predictor.embed_encoded(encoded, pooling) for _, encoded in encoded_batches(predictor, listings, image_policy)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
