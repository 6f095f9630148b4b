"""From listings to model inputs: images loaded safely, the conversation rendered and tokenized.

:class:`TrainCollator` builds training batches: the processor runs over the whole conversation
(system + user with images + assistant answer), right-padded, and ``labels`` are
``IGNORE_INDEX`` everywhere except the assistant answer and its end-of-turn token. Every key the
processor returns (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ...) is kept:
Qwen-VL models raise without some of them.

:func:`encode_prompts` builds left-padded generation inputs for the same conversations without
the answer (evaluation and labelling).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from mmllm.augment import AugmentConfig, augment_images, augment_listing
from mmllm.catalog import Listing, attributes_labelled
from mmllm.images import ImageError, ImagePolicy, load_image
from mmllm.prompts import PromptTemplate, build_messages, target_text
from mmllm.schema import LabelSchema

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
log = logging.getLogger(__name__)


def set_pixel_budget(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Bound the pixels (hence image tokens) per image; saved with the processor.

    The library default allows up to 16,384 tokens per image, the usual cause of
    out-of-memory reports; one token covers 28 x 28 pixels (Qwen3-VL: 32 x 32).
    """
    processor.image_processor.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}


def load_listing_images(listing: Listing, policy: ImagePolicy, max_images: int) -> list[Image.Image]:
    """The listing's first ``max_images`` images; a broken one is dropped with a warning."""
    images = []
    policy = policy.for_source(listing.source)
    for ref in listing.images[:max_images]:
        try:
            images.append(load_image(ref, policy))
        except ImageError as exc:
            log.warning("%s line %s (id %r): image dropped: %s", listing.source, listing.line, listing.id, exc)
    return images


@dataclass
class TrainCollator:
    """Listings (with labels) -> a right-padded training batch with masked labels.

    Call it with ``(listing, seed)`` pairs: the seed drives augmentation, so a resumed run
    sees exactly the same augmented examples.
    """

    processor: Any
    schema: LabelSchema
    template: PromptTemplate
    image_policy: ImagePolicy
    max_images: int = 4
    augment: AugmentConfig | None = None
    _end_id: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._end_id = end_of_turn_id(self.processor.tokenizer)  # once: not per batch

    def __call__(self, batch: Sequence[tuple[Listing, int]]) -> dict[str, torch.Tensor]:
        texts, answers, images, cuts = [], [], [], []
        for listing, seed in batch:
            rng = random.Random(seed)
            if self.augment is not None and self.augment.enabled:
                listing = augment_listing(listing, self.augment, rng)
            pictures = load_listing_images(listing, self.image_policy, self.max_images)
            if self.augment is not None and self.augment.enabled:
                pictures = augment_images(pictures, self.augment, rng)
            answer = target_text(listing, self.schema)
            messages = build_messages(listing, self.schema, self.template, n_images=len(pictures), answer=answer)
            full = self.processor.apply_chat_template(messages, tokenize=False)
            prompt = self.processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            if not full.startswith(prompt):
                raise ValueError("the chat template renders the prompt differently with and without the answer")
            texts.append(full)
            answers.append(full[len(prompt):])  # the answer, its end-of-turn token, and template trailer
            cuts.append(None if attributes_labelled(listing.label) else _category_end(answers[-1], answer))
            images.extend(pictures)
        enc = self.processor(
            text=texts, images=images or None, padding=True, padding_side="right", return_tensors="pt"
        )
        enc["labels"] = self._labels(enc, answers, [listing.id for listing, _ in batch], cuts)
        return dict(enc)

    def _labels(self, enc: Any, answers: list[str], ids: list[str], cuts: Sequence[int | None]) -> torch.Tensor:
        """Supervise each answer up to its end-of-turn token; where ``cuts[row]`` is a character count
        (a label for the category only), only the tokens within it: the category, not the attributes."""
        tokenizer, end_id = self.processor.tokenizer, self._end_id
        labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)  # [B, T]
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        for row, (answer, length) in enumerate(zip(answers, lengths)):
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            start = length - len(answer_ids)
            if enc["input_ids"][row, start:length].tolist() != answer_ids:
                raise ValueError(f"listing {ids[row]!r}: the answer does not tokenize the same inside the conversation")
            # supervise up to and including the end-of-turn token, not the template's trailing newline
            stop = answer_ids.index(end_id) + 1 if end_id in answer_ids else len(answer_ids)
            if cuts[row] is not None:
                stop = _tokens_within(tokenizer, answer_ids[:stop], cuts[row])
            labels[row, start:start + stop] = enc["input_ids"][row, start:start + stop]
        return labels


def _category_end(conversation_answer: str, answer: str) -> int:
    """Characters of ``conversation_answer`` (the answer as the template renders it) up to the end of
    the canonical answer's category value, ``{"category":"A > B",`` (the canonical JSON puts it first)."""
    value = json.loads(answer)["category"]
    head = '{"category":' + json.dumps(value, ensure_ascii=False, separators=(",", ":")) + ","
    at = conversation_answer.find(head)
    if not answer.startswith(head) or at < 0:
        raise ValueError("the canonical answer does not start with its category")
    return at + len(head)


def _tokens_within(tokenizer: Any, ids: list[int], chars: int) -> int:
    """How many of the leading ``ids`` decode to at most ``chars`` characters (a token that straddles
    the end is not supervised)."""
    count = 0
    for n in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:n], skip_special_tokens=False)) > chars:
            break
        count = n
    return count


def encode_prompts(
    processor: Any,
    listings: Sequence[Listing],
    schema: LabelSchema,
    template: PromptTemplate,
    images: Sequence[Sequence[Image.Image]],
) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs (the conversation up to the assistant's turn).

    ``images[i]`` are the already loaded pictures of ``listings[i]`` (see
    :func:`load_listing_images`), so callers decide what a bad image means for them.
    """
    texts, flat = [], []
    for listing, pictures in zip(listings, images):
        messages = build_messages(listing, schema, template, n_images=len(pictures))
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        flat.extend(pictures)
    # padding_side is not restored when a processor is reloaded; right padding would silently
    # corrupt batched generation, so it is passed on every call.
    enc = processor(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    return dict(enc)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The chat end-of-turn token's id (``<|im_end|>`` for the Qwen families, else the eos), looked
    up one token at a time: ``get_vocab()`` builds a 151k-entry dict at real size."""
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == "<|im_end|>":
        return token_id
    return tokenizer.eos_token_id
