"""What a generated answer's tokens say: where each one sits in the answer text, how sure the model
was of it, and so how probable each value of the answer is.

* :class:`ChosenLogprobs`: a logits processor recording each step's log-probability of the token
  greedy decoding picks (under the grammar's mask), O(batch) memory a step.
* :class:`AnswerTokens`: a batch's generated ids to per-row texts and :class:`TokenSpans` (each
  token's characters in the text and its log-probability).
* :func:`answer_confidence`: the record's ``confidence`` and ``attribute_confidence``, the
  probability of each value (its tokens and the one that ends it).
* :func:`stop_ids`: the tokens that end an answer.

The generative predictor (:mod:`mmllm.models.generative`) composes them; calibration of these raw
probabilities is :mod:`mmllm.confidence`.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from mmllm.confidence import significant
from mmllm.schema import answer_spans


class ChosenLogprobs:
    """A logits processor, last in the list, that records each step's log-probability of the
    token greedy decoding picks: the largest log-softmax of the (grammar-masked) scores it is handed.
    O(batch) memory per step, where ``output_scores`` would keep [steps x batch x vocab].

    One fused pass: at a 151,936-entry vocabulary and batch 8 on 2 CPU cores, ``log_softmax`` then
    ``amax`` takes 0.39-0.40 ms a step, where the maximum (``max`` also finds its index) minus
    ``logsumexp`` took 1.5 ms, and 3.0 ms over grammar-masked scores (ad-hoc timing, 2026-12-04).
    Each step writes one row of a [steps, batch] buffer allocated for ``capacity`` steps (grown by
    doubling past it), so the answer's values are one tensor, not a stack of a hundred."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = max(1, capacity)
        self.buffer: torch.Tensor | None = None  # [capacity, B] float32, on the scores' device
        self.count = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.buffer is None or self.count == self.buffer.shape[0]:
            grown = torch.empty(max(self.capacity, 2 * self.count), scores.shape[0], device=scores.device)
            if self.buffer is not None:
                grown[: self.count] = self.buffer
            self.buffer = grown
        torch.amax(torch.log_softmax(scores.float(), -1), -1, out=self.buffer[self.count])  # [B]
        self.count += 1
        return scores

    def result(self, steps: int) -> torch.Tensor:
        """[B, steps] log-probabilities on the CPU (0 past the last recorded step)."""
        if self.buffer is None:
            return torch.zeros(0, steps)
        out = self.buffer[: min(self.count, steps)].t().cpu()
        return torch.nn.functional.pad(out, (0, steps - out.shape[1]))

def answer_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` for a list of ints, built once per predictor.

    A fast tokenizer that cleans up no spaces decodes exactly what its Rust backend decodes; calling the
    backend directly skips ``decode``'s check of every id's type, half of its cost for an answer of ~100
    tokens. (Its ``decode_batch`` hands a batch to a thread pool, which right after ``generate`` competes
    with PyTorch's threads for the cores.) Any other tokenizer goes through ``decode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

def joins_pieces(tokenizer: Any) -> bool:
    """Whether an answer's text is its tokens' texts, each decoded alone, put end to end, whenever each of
    those is whole characters. So for a byte-level BPE decoder (Qwen's, GPT-2's) that cleans up nothing:
    it maps every token to its bytes, independently of its neighbours, and decodes the bytes of the
    whole answer as UTF-8; the bytes of complete characters decode to the same characters end to end.
    (Special tokens decode to nothing either way.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False
            and type(backend.decoder).__name__ == "ByteLevel")

@dataclass(frozen=True, eq=False)
class TokenSpans:
    """One answer's generated tokens up to its stop: token ``i`` covers characters ``[starts[i], ends[i])``
    of the answer text and was decoded with log-probability ``logprobs[i]``. The spans tile the text in
    order (both arrays non-decreasing). Iterating gives ``(start, end, logprob)`` tuples."""

    starts: np.ndarray  # [N] int64
    ends: np.ndarray  # [N] int64
    logprobs: np.ndarray  # [N] float

    @classmethod
    def of(cls, spans: Sequence[tuple[int, int, float]]) -> "TokenSpans":
        """``(start, end, logprob)`` tuples as arrays (a :class:`TokenSpans` is returned as it is)."""
        if isinstance(spans, TokenSpans):
            return spans
        starts, ends, logprobs = zip(*spans) if len(spans) else ((), (), ())
        return cls(np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), np.asarray(logprobs, dtype=float))

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        return zip(self.starts.tolist(), self.ends.tolist(), self.logprobs.tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenSpans) and all(
            np.array_equal(a, b) for a, b in ((self.starts, other.starts), (self.ends, other.ends),
                                              (self.logprobs, other.logprobs)))

    def logprob(self, lo: int, hi: int, *, with_end: bool = False) -> float:
        """The summed log-probability of the tokens that overlap characters ``[lo, hi)`` (0.0: none).

        ``with_end``: and of the token that starts at ``hi``, where none of those reaches past it: the
        step that ended the value there rather than going on to a longer one ("4" or "40", "Games" or
        "Games > Board"); a token that covers the end already holds that decision."""
        starts, ends, running = self._lookup
        first = bisect.bisect_right(ends, lo)  # the first token ending after lo
        last = bisect.bisect_left(starts, hi)  # past the last token starting before hi
        if with_end and last > first and ends[last - 1] <= hi:
            while last < len(starts) and ends[last] <= hi:  # zero-width tokens at the end (special ones)
                last += 1
            last = min(last + 1, len(starts))
        return running[last] - running[first] if last > first else 0.0

    @cached_property
    def _lookup(self) -> tuple[list[int], list[int], list[float]]:
        """The spans as lists, and the running sums of the log-probabilities: a record reads a few values."""
        return self.starts.tolist(), self.ends.tolist(), [0.0, *itertools.accumulate(self.logprobs.tolist())]

class AnswerTokens:
    """A batch's generated ids to its answers: per row the decoded text up to the first stop and, per
    token, its ``[start, end)`` characters in that text and its log-probability.

    Built once per predictor. It keeps every token's text decoded alone (which does not depend on its
    neighbours), its length and whether it is whole characters, in arrays indexed by token id: a
    predictor's answers reuse a few hundred JSON pieces, and each is decoded alone once, ever. Where a
    row's pieces make its text (:func:`joins_pieces`, or checked against the row decoded), the spans are
    the running sums of the pieces' lengths, for the whole batch in NumPy: no Python loop over the
    ~1,000 tokens of a batch of 8 under the grammar. A character split over byte-level tokens decodes
    whole only with its neighbours; that row's spans are measured over its prefixes instead."""

    def __init__(self, tokenizer: Any, stops: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ends_at = sorted({*stops, tokenizer.pad_token_id} - {None})
        self.decode = answer_decoder(tokenizer)
        self.joins = joins_pieces(tokenizer)
        self.lengths = np.full(0, -1, dtype=np.int64)  # token id -> len(its text alone); -1: not decoded yet
        self.pieces = np.empty(0, dtype=object)  # token id -> its text alone
        self.whole = np.zeros(0, dtype=bool)  # token id -> its text alone is whole characters (no U+FFFD)

    def __call__(self, ids: np.ndarray, logprobs: np.ndarray) -> list[tuple[str, TokenSpans]]:
        """``ids`` [B, S] generated token ids, ``logprobs`` [B, S] as recorded."""
        ids = np.asarray(ids, dtype=np.int64)
        stopped = np.zeros(ids.shape, dtype=bool)
        for stop in self.ends_at:  # two or three ids: cheaper than isin's sort
            stopped |= ids == stop
        cuts = np.where(stopped.any(axis=1), stopped.argmax(axis=1), ids.shape[1])
        live = np.arange(ids.shape[1]) < cuts[:, None]  # [B, S]: before the row's first stop
        if ids.size and ids.max() >= len(self.lengths):
            self._grow(int(ids.max()) + 1)
        lengths = self.lengths[ids]
        if (unknown := live & (lengths < 0)).any():
            self._learn(np.unique(ids[unknown]))
            lengths = self.lengths[ids]
        lengths[~live] = 0
        ends = np.cumsum(lengths, axis=1)
        starts = ends - lengths
        whole = (self.whole[ids] | ~live).all(axis=1).tolist()
        out = []
        for b, cut in enumerate(cuts.tolist()):
            joined = "".join(self.pieces[ids[b, :cut]])
            text = joined if self.joins and whole[b] else self.decode(ids[b, :cut].tolist())
            if text == joined:  # each token's span is its piece
                out.append((text, TokenSpans(starts[b, :cut], ends[b, :cut], logprobs[b, :cut])))
            else:
                spans = self._prefix_spans(ids[b, :cut].tolist(), text, logprobs[b, :cut].tolist())
                out.append((text, TokenSpans.of(spans)))
        return out

    def _grow(self, size: int) -> None:
        grow = size - len(self.lengths)
        self.lengths = np.concatenate([self.lengths, np.full(grow, -1, dtype=np.int64)])
        self.pieces = np.concatenate([self.pieces, np.full(grow, "", dtype=object)])
        self.whole = np.concatenate([self.whole, np.zeros(grow, dtype=bool)])

    def _learn(self, new: np.ndarray) -> None:
        """Decode alone, in one call, each token in ``new``."""
        texts = self.tokenizer.batch_decode([[t] for t in new.tolist()], skip_special_tokens=True)
        self.pieces[new] = texts
        self.lengths[new] = [len(t) for t in texts]
        self.whole[new] = ["\ufffd" not in t for t in texts]

    def _prefix_spans(self, ids: list[int], text: str, logprobs: list[float]) -> list[tuple[int, int, float]]:
        """Spans where a character is split over tokens: each token ends where the decoded prefix up to it
        ends (a split UTF-8 character decodes late, never early)."""
        ends = [len(p) for p in self.tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))],
                                                            skip_special_tokens=True)]
        spans, before = [], 0
        for end, lp in zip(ends, logprobs):
            end = max(before, min(end, len(text)))
            spans.append((before, end, float(lp)))
            before = end
        return spans

def answer_confidence(text: str, tokens: TokenSpans | Sequence[tuple[int, int, float]],
                      record: dict[str, Any]) -> dict[str, Any]:
    """``confidence`` (the category path) and ``attribute_confidence`` (each non-null value): the
    probability of the value, the product of the probabilities of the tokens that overlap it in the
    answer text (a string without its opening quote: the token that opens it decides layout) and of
    the token that ends it (the closing quote, or the ``,`` / ``}`` after a number): where a longer
    value was allowed too, ending there was a choice ("4" against "40", "Games" against "Games >
    Board"), and without it the product is the probability that the answer *starts with* the value."""
    spans = answer_spans(text)
    tokens = TokenSpans.of(tokens)

    def probability(key: str) -> float | None:
        if key not in spans:
            return None
        lo, hi = spans[key]
        if text[lo] == '"' and hi - lo >= 2:
            lo, hi = lo + 1, hi - 1
        return float(np.exp(tokens.logprob(lo, hi, with_end=True)))

    out: dict[str, Any] = {}
    p = probability("category")
    if p is not None:
        out["confidence"] = significant(p)
    attribute_confidence = {}
    for name, value in (record.get("attributes") or {}).items():
        q = probability(f"attributes.{name}") if value is not None else None
        if q is not None:
            attribute_confidence[name] = significant(q)
    out["attribute_confidence"] = attribute_confidence
    return out

def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the chat end-of-turn and end-of-text tokens, and the eos.

    Looked up one token at a time (never through ``get_vocab()``, a 151k-entry dict at real size);
    a token counts only when the id maps back to it."""
    ids = set()
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.add(token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
