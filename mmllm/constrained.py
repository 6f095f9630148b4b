"""Schema-constrained decoding: a finite grammar of the canonical answer, enforced by xgrammar.

The grammar accepts exactly the canonical JSON of :meth:`LabelSchema.canonical_json`: fixed key
order, no whitespace, the category one of the taxonomy paths, each attribute ``null`` or a value
of its type inside its bounds (integer ranges are spelled out digit by digit, strings and lists
are length-bounded). Because the grammar is finite and every token carries at least one byte,
an answer always completes within :func:`max_answer_tokens` new tokens, so even an untrained
model produces output that validates, every time.

xgrammar was chosen by measurement (``benchmarks/label_throughput.py``: filling its per-step mask
costs microseconds here) and because its matchers fit ``transformers`` ``generate`` as a logits
processor with no other change. :class:`GrammarProcessor` is that processor, written for batches:
the tokens the rows took at the last step come to the host in one copy per step (xgrammar's own
``contrib.hf`` processor reads them one ``.item()`` at a time, each a device synchronization on a
GPU), and on the CPU the mask is applied by vectorized tensor operations: the processor takes 1.35 ms
a step for 8 rows of 151,936 scores on 2 cores, where xgrammar's took 5.1 ms, 4.8 of them its CPU
kernel (cProfile over one constrained ``generate``, 2026-12-04; benchmarks/RESULTS.md, "What the grammar costs").
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from mmllm.schema import AttributeSpec, LabelSchema

_ANY_NUMBER_DIGITS = 15  # unbounded numbers still get a finite number of digits


def answer_grammar(schema: LabelSchema) -> str:
    """EBNF (xgrammar dialect) of the canonical answer for ``schema``."""
    rules = {"category": " | ".join(_literal(json.dumps(c, ensure_ascii=False)) for c in schema.categories)}
    parts = [_literal('{"category":'), "category", _literal(',"attributes":{')]
    for i, spec in enumerate(schema.attributes):
        name = f"attr_{i}"
        rules[name] = _value_rule(spec)
        prefix = ("," if i else "") + json.dumps(spec.name) + ":"
        parts += [_literal(prefix), name]
    parts.append(_literal("}}"))
    lines = ["root ::= " + " ".join(parts)]
    lines += [f"{name} ::= {body}" for name, body in rules.items()]
    lines.append(r'string_char ::= [^"\\\x00-\x1f]')
    return "\n".join(lines) + "\n"


def max_answer_tokens(schema: LabelSchema) -> int:
    """An upper bound on answer length in tokens (bytes, since a token is at least one byte)."""
    longest = len('{"category":,"attributes":{}}')
    longest += max(len(json.dumps(c, ensure_ascii=False).encode()) for c in schema.categories)
    for spec in schema.attributes:
        longest += len(json.dumps(spec.name).encode()) + 2 + _max_value_bytes(spec)
    return longest + 1  # + the end-of-turn token


class GrammarFactory:
    """Compiles the schema's grammar once; hands out a fresh logits processor per generate call."""

    def __init__(self, schema: LabelSchema, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        # The model's padded vocab size, not len(tokenizer): xgrammar asserts once a padded id comes up.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiled = xgr.GrammarCompiler(info, max_threads=2).compile_grammar(answer_grammar(schema))
        self.max_tokens = max_answer_tokens(schema)

    def processor(self) -> "GrammarProcessor":
        return GrammarProcessor(self.compiled)  # stateful: one per generate call


class GrammarProcessor:
    """A logits processor for one ``generate`` call: each row's grammar matcher accepts the token
    the row took at the last step and marks the tokens it allows next; every other score becomes
    ``-inf``. A row whose answer is complete keeps its last mask (``generate`` pads it from then on)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.matchers: list[Any] = []
        self.bitmask: Any = None  # int32 [B, ceil(vocab / 32)], bit j of word k: token 32k + j is allowed
        self._bits: Any = None  # the 8 bits of a byte, to unpack the mask on the CPU

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch
        import xgrammar as xgr

        if not self.matchers:  # the first step: the prompt has no answer token yet
            self.matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(input_ids.shape[0])]
            self.bitmask = xgr.allocate_token_bitmask(input_ids.shape[0], self.compiled.tokenizer_info.vocab_size)
            if scores.device.type == "cuda":
                self.bitmask = self.bitmask.pin_memory()  # so its copy to the device does not wait
        else:
            for row, (matcher, token) in enumerate(zip(self.matchers, input_ids[:, -1].tolist())):  # one copy
                if not matcher.is_terminated() and not matcher.accept_token(token):
                    raise RuntimeError(f"row {row}: token {token} is not allowed by the answer grammar")
        # on a GPU the last step's non-blocking upload of the pinned mask is done: ``tolist`` above
        # waited for the device, so the mask can be refilled in place
        for row, matcher in enumerate(self.matchers):
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, row)
        if scores.device.type != "cpu" or sys.byteorder != "little":
            xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device, non_blocking=True))
            return scores
        if self._bits is None:
            self._bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
        batch, vocab = scores.shape
        # the int32 words as their (little-endian) bytes, each byte as its 8 bits: token order
        allowed = (self.bitmask.view(torch.uint8).unsqueeze(-1) & self._bits).view(batch, -1)[:, :vocab]
        return torch.where(allowed.bool(), scores, float("-inf"))


# ---------------------------------------------------------------------- value rules
def _value_rule(spec: AttributeSpec) -> str:
    if spec.type == "boolean":
        return '"true" | "false" | "null"'
    if spec.type == "enum":
        return " | ".join([_literal(json.dumps(v, ensure_ascii=False)) for v in spec.values] + ['"null"'])
    if spec.type == "list":
        item = "(" + " | ".join(_literal(json.dumps(v, ensure_ascii=False)) for v in spec.values) + ")"
        more = f' ("," {item}){{0,{spec.max_items - 1}}}' if spec.max_items > 1 else ""
        return f'"null" | "[]" | "[" {item}{more} "]"'
    if spec.type == "string":
        return f'"null" | "\\"" string_char{{0,{spec.max_length}}} "\\""'
    if spec.type == "integer":
        return f"{_integer(spec.minimum, spec.maximum)} | \"null\""
    return f"{_number(spec.minimum, spec.maximum)} | \"null\""


def _bounds(lo: float | None, hi: float | None) -> tuple[int, int]:
    """The whole numbers a value's integer part may take: within [lo, hi], and an unbounded side within
    the digits a number may have (JSON numbers, so without leading zeros, either way)."""
    widest = 10**_ANY_NUMBER_DIGITS - 1
    return (-widest if lo is None else math.ceil(lo)), (widest if hi is None else math.floor(hi))


def _integer(lo: float | None, hi: float | None) -> str:
    """Exactly the JSON integers in [lo, hi] (no leading zeros: "007" is not JSON)."""
    lo_i, hi_i = _bounds(lo, hi)
    return "(" + " | ".join(_signed_patterns(lo_i, hi_i)) + ")"


def _signed_patterns(lo: int, hi: int) -> list[str]:
    alternatives = []
    if lo < 0:
        alternatives += ['"-" ' + p for p in _range_patterns(max(1, -min(hi, -1)), -lo)]
    if hi >= 0:
        alternatives += _range_patterns(max(lo, 0), hi)
    return alternatives


def _number(lo: float | None, hi: float | None) -> str:
    """Decimals inside [lo, hi]: the integers in it, or an integer part and a fraction that stay in it. A
    fraction moves a value away from zero, so it goes up from 0 .. hi - 1 and down from -1 .. lo + 1 (and
    "-0.5" needs lo <= -1): "-10.5" is below a minimum of -10."""
    lo_i, hi_i = _bounds(lo, hi)
    if lo_i > hi_i:  # no whole number in [lo, hi] (0.2 to 0.8): null, the only answer written out
        return '"null"'
    parts = _range_patterns(max(lo_i, 0), hi_i - 1) if hi_i - 1 >= max(lo_i, 0) else []
    if max(1, -hi_i) <= -lo_i - 1:
        parts += ['"-" ' + p for p in _range_patterns(max(1, -hi_i), -lo_i - 1)]
    if lo_i <= -1 and hi_i >= 0:
        parts.append('"-0"')
    whole = "(" + " | ".join(_signed_patterns(lo_i, hi_i)) + ")"
    if not parts:
        return whole
    return f'({whole} | ({" | ".join(parts)}) "." [0-9]{{1,6}})'


def _range_patterns(lo: int, hi: int) -> list[str]:
    """EBNF sequences matching exactly the decimal integers in [lo, hi] (lo >= 0), no leading zeros."""
    out = []
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
        b = min(hi, 10**digits - 1)
        if a <= b:
            out += [" ".join(p) for p in _same_length(str(a), str(b))]
    return out


def _same_length(a: str, b: str) -> list[list[str]]:
    if a == b:
        return [[f'"{a}"']]
    if len(a) == 1:
        return [[f"[{a}-{b}]"]]
    if a[0] == b[0]:
        return [[f'"{a[0]}"', *rest] for rest in _same_length(a[1:], b[1:])]
    n = len(a) - 1
    if a[1:] == "0" * n and b[1:] == "9" * n:
        return [[f"[{a[0]}-{b[0]}]", *(["[0-9]"] * n)]]
    out = [[f'"{a[0]}"', *rest] for rest in _same_length(a[1:], "9" * n)]
    if int(b[0]) - int(a[0]) > 1:
        out.append([f"[{int(a[0]) + 1}-{int(b[0]) - 1}]", *(["[0-9]"] * n)])
    out += [[f'"{b[0]}"', *rest] for rest in _same_length("0" * n, b[1:])]
    return out


def _literal(text: str) -> str:
    """An EBNF string literal for ``text`` (backslashes and quotes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _max_value_bytes(spec: AttributeSpec) -> int:
    if spec.type == "boolean":
        return len("false")
    if spec.type == "enum":
        return max([len(json.dumps(v, ensure_ascii=False).encode()) for v in spec.values] + [4])
    if spec.type == "list":
        item = max(len(json.dumps(v, ensure_ascii=False).encode()) for v in spec.values)
        return 2 + spec.max_items * (item + 1)
    if spec.type == "string":
        return 2 + 4 * spec.max_length  # a character is at most 4 UTF-8 bytes
    if spec.minimum is None or spec.maximum is None:
        return 1 + _ANY_NUMBER_DIGITS + 7
    digits = max(len(str(math.floor(abs(x)))) for x in (spec.minimum, spec.maximum)) + 1
    return digits + (7 if spec.type == "number" else 0)
