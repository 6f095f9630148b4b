"""The generative model: a Qwen-VL checkpoint with LoRA (or QLoRA) that answers in JSON.

* :func:`load_processor` / :func:`load_base_model`: a hub id or local folder to objects, with
  the dtype, attention kernel and (optionally) 4-bit NF4 quantization resolved for the machine.
* :func:`attach_lora`: PEFT LoRA on the language model's linear layers, picked by regex
  (the vision tower reuses names like ``gate_proj``, so a suffix list would reach it too).
* :class:`GenerativePredictor`: listings in, validated predictions out (greedy decoding), each
  value with its probability (:mod:`mmllm.models.answer_scores`; the ``generate`` call's settings:
  :mod:`mmllm.models.decoding`).

Model folders (the files, loading any kind, merging) are :mod:`mmllm.model_dir`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import torch

from mmllm.catalog import Listing
from mmllm.collator import encode_prompts, set_pixel_budget
from mmllm.config import help_field
from mmllm.images import ImagePolicy
from mmllm.models import unpadded_attention
from mmllm.models.answer_scores import AnswerTokens, ChosenLogprobs, TokenSpans, answer_confidence, stop_ids
from mmllm.models.decoding import compile_failed, decoding_kernels, greedy_config, greedy_generation
from mmllm.models.greedy_loop import decoding_step, greedy_decode
from mmllm.models.growing_cache import growing_cache, growing_layers
from mmllm.models.heads import mark_untrained, prompt_vectors
from mmllm.models.prefix_cache import (PrefixCache, PromptBatch, base_model, cache_argument, new_static_cache,
                                       reset_rope_deltas, shared_prefix_ids)
from mmllm.predictor import STATIC_COMPILE, encoded_batches, predict_in_batches
from mmllm.prompts import PromptTemplate
from mmllm.schema import LabelSchema

log = logging.getLogger(__name__)

STATIC_CACHE_STEP = 256  # a static decoding cache's length is a multiple of this (see GenerativePredictor)
GROWING_ROOM = 256  # answer tokens a growing cache has room for at first (a grammar's bound can be far more:
# a longer answer doubles the buffer, where room for the whole bound would hold memory no answer uses)

# Language-model linear layers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5 module paths).
LANGUAGE_LORA = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_LORA = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))"
# the vision-to-text projector(s): Qwen3-VL adds one merger per deepstack layer
MERGER_MODULES = r".*visual\.(merger|deepstack_merger_list\.\d+)"


@dataclass
class ModelConfig:
    """Which checkpoint, in which precision, with which image budget."""

    base: str = help_field("Qwen/Qwen2.5-VL-3B-Instruct", "hub id or local folder of the base vision-language model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = help_field(
        "auto", "weights dtype; auto = bfloat16 on a GPU that has it, float32 on CPU")
    attn_implementation: Literal["auto", "sdpa", "sdpa_unpadded", "flash_attention_2", "eager"] = help_field(
        "auto", "attention kernel; auto = flash_attention_2 when installed on GPU, else sdpa; on CPU sdpa_unpadded "
                "(each row of a padded batch through SDPA's causal kernel: models/unpadded_attention.py)")
    quantization: Literal["none", "4bit"] = help_field("none", "4bit = QLoRA: NF4 base weights via bitsandbytes")
    # transformers 5.2x matches these from the start of the module path or as a suffix (older
    # versions: as a substring), so the vision tower is named both ways
    quant_skip_modules: list[str] = help_field(
        default_factory=lambda: ["model.visual", "visual", "lm_head"],
        help="modules kept out of 4-bit (vision tower, output layer)")
    gradient_checkpointing: bool = help_field(False, "recompute activations: ~30% slower, much less memory")
    mlp_chunks: int = help_field(1, "run each language-model MLP over this many checkpointed slices of the sequence "
                                    "while training (mini-sequence, models/mini_sequence.py): long prompts peak "
                                    "lower, one more MLP forward a step; 1 = whole")
    trust_remote_code: bool = help_field(False, "run code shipped with the checkpoint; only for repos you trust")
    min_pixels: int = help_field(128 * 28 * 28, "smallest image area after resizing (pixels); 28x28 = one token")
    max_pixels: int = help_field(512 * 28 * 28, "largest image area: caps image tokens per image (memory!)")
    max_images: int = help_field(4, "images per listing fed to the model; the rest are ignored")

    def __post_init__(self) -> None:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"model.min_pixels {self.min_pixels} > model.max_pixels {self.max_pixels}")
        if self.max_images < 0:
            raise ValueError("model.max_images must be >= 0")
        if self.mlp_chunks < 1:
            raise ValueError(f"model.mlp_chunks must be >= 1, got {self.mlp_chunks}")


@dataclass
class LoraSettings:
    """Where LoRA goes and how big it is."""

    rank: int = help_field(16, "adapter rank: 8-64; higher fits more, costs memory")
    alpha: float = help_field(32.0, "scaling; usually 2 x rank")
    dropout: float = help_field(0.05, "dropout on the adapter input; 0-0.1")
    target: str = help_field(LANGUAGE_LORA, "regex over module paths that get LoRA (default: language model linears)")
    vision: bool = help_field(False, "also put LoRA on the vision tower's blocks")
    train_merger: bool = help_field(False, "fully train the vision-to-text merger / projector")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("lora.rank must be >= 1")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"lora.alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.target)
        except re.error as exc:
            raise ValueError(f"lora.target is not a regular expression ({exc}): {self.target!r}") from None


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def resolve_attention(name: str) -> str:
    """The attention kernel to load with; ``sdpa_unpadded`` is registered with transformers here."""
    if name == "auto":
        name = unpadded_attention.NAME
        if torch.cuda.is_available():
            try:
                import flash_attn  # noqa: F401

                name = "flash_attention_2"
            except ImportError:
                name = "sdpa"  # on a GPU a mask costs SDPA little (memory-efficient kernel)
    return unpadded_attention.register() if name == unpadded_attention.NAME else name


def load_processor(source: str | Path, cfg: ModelConfig | None = None) -> Any:
    from transformers import AutoProcessor

    trust = bool(cfg and cfg.trust_remote_code)
    processor = AutoProcessor.from_pretrained(str(source), trust_remote_code=trust)
    if cfg is not None:
        set_pixel_budget(processor, cfg.min_pixels, cfg.max_pixels)
    return processor


def load_base_model(cfg: ModelConfig, *, source: str | None = None, device_map: Any = None) -> Any:
    """The base model from safetensors, with dtype / attention / quantization resolved.

    ``source`` is where to load it from when that differs from ``cfg.base`` (a resolved path)."""
    from transformers import AutoModelForImageTextToText

    dtype = resolve_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": resolve_attention(cfg.attn_implementation),
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": True,
    }
    if cfg.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=list(cfg.quant_skip_modules),
        )
        kwargs["device_map"] = device_map if device_map is not None else ({"": 0} if torch.cuda.is_available() else {"": "cpu"})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForImageTextToText.from_pretrained(source or cfg.base, **kwargs)


def attach_lora(model: Any, cfg: LoraSettings, *, gradient_checkpointing: bool = False) -> Any:
    """Wrap the model with a trainable LoRA adapter; everything else stays frozen.

    A 4-bit (QLoRA) base in bf16 is prepared like a bf16 one: frozen, and nothing cast. peft's
    ``prepare_model_for_kbit_training`` would copy every weight left out of 4-bit to float32; on
    Qwen2.5-VL-3B that is the vision tower and the 151,936-row embedding, 1.8 GiB more than in bf16
    (an H200 step peaked at 9.93 GiB with it, 6.22 without). bf16 has float32's range, Qwen's RMSNorm
    already computes in float32, and the LoRA weights peft adds are float32 whatever the base. A 4-bit
    base in float16 (GPUs without bf16) keeps peft's preparation: float16's narrow range is what the
    float32 copies are for, and a trained merger (``lora.train_merger``) then has float32 weights, which
    float16 mixed precision needs to unscale its gradients.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    float16_4bit = getattr(model, "is_loaded_in_4bit", False) and any(p.dtype == torch.float16 for p in model.parameters())
    if float16_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    target = f"(?:{cfg.target})|(?:{VISION_LORA})" if cfg.vision else cfg.target
    names = [n for n, _ in model.named_modules()]
    if not any(_fullmatch(target, n) for n in names):
        raise ValueError(f"lora.target {target!r} matches no module of {type(model).__name__}")
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,  # a string is matched as a full regex against module paths
        modules_to_save=[n for n in names if _fullmatch(MERGER_MODULES, n)] if cfg.train_merger else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def lora_module_names(model: Any) -> list[str]:
    """Paths of the modules that carry a LoRA adapter."""
    return sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")})


def _fullmatch(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


# ---------------------------------------------------------------------- prediction
@dataclass
class GenerativePredictor:
    """Greedy JSON generation for listings; every answer validated by the schema.

    With ``constrained=True`` decoding follows the schema's grammar (:mod:`mmllm.constrained`),
    so every answer validates; without it, invalid answers come back with the reason.
    Attributes in ``untrained`` (no training row stated them) are answered null.
    With ``prefix_cache`` the prompt text every row shares is encoded once, on the first batch, and
    reused by every batch (:mod:`mmllm.models.prefix_cache`); the answers are the same either way.
    With ``static_cache`` the keys and values go to a cache allocated at its full length before decoding
    (transformers' ``StaticCache``) instead of one that grows by a copy every step: on a GPU
    ``generate`` then compiles the decoding step and replays it as a CUDA graph (a step of a 2B
    model launches ~1,400 kernels, and eager decoding waits on the host). ``static_compile`` says how
    (:data:`STATIC_COMPILE`): ``cudagraphs`` records the eager kernels themselves, ``inductor`` generates
    fused kernels of its own (they round differently, so near ties can tip), ``eager`` compiles
    nothing. Its length is rounded up to
    :data:`STATIC_CACHE_STEP` tokens and never shrinks, so batches share one compiled step (one very
    long prompt makes every later batch attend over its length). If compiling fails, the job goes on
    with the growing cache (said once). On a CPU nothing is compiled, and the static cache's masks keep
    prefill off the unpadded kernel (:mod:`mmllm.models.unpadded_attention`): it is for GPUs.
    """

    model: Any
    processor: Any
    schema: LabelSchema
    template: PromptTemplate
    max_images: int = 4
    max_new_tokens: int = 256
    batch_size: int = 4
    constrained: bool = False
    untrained: tuple[str, ...] = ()
    prefix_cache: bool = True
    static_cache: bool = False
    static_compile: str = "cudagraphs"  # how a static cache's decoding step is compiled on a GPU: STATIC_COMPILE
    calibration: Any = None  # mmllm.confidence.Calibration: Platt maps of the raw scores (None: raw)
    own_loop: bool = True  # decoding steps after the first by mmllm's loop (models/greedy_loop.py); False: generate's
    _grammar: Any = None
    _stops: list[int] = field(default_factory=list, init=False, repr=False)
    _greedy: tuple[Any, str | None, Any] | None = field(default=None, init=False, repr=False)  # (model, compile, config)
    _answers: AnswerTokens | None = field(default=None, init=False, repr=False)  # ids -> texts and token spans
    _growing: tuple[Any, int | None] | None = field(default=None, init=False, repr=False)  # (model, its cache layers)
    _static_len: int = field(default=0, init=False, repr=False)  # the longest static cache so far
    _loop_ran: bool = field(default=False, init=False, repr=False)  # mmllm's loop has decoded a batch
    _static: tuple[tuple[Any, int, int], Any] | None = field(default=None, init=False, repr=False)  # (model, B, len), cache
    _said_static: bool = field(default=False, init=False, repr=False)  # the CPU note, once
    # (model, schema, template) the prefix was encoded for, and the cache (None: nothing to share)
    _prefix: tuple[tuple[Any, Any, Any], PrefixCache | None] | None = field(default=None, init=False, repr=False)
    _prefix_ids: tuple[tuple[Any, Any], np.ndarray] | None = field(default=None, init=False, repr=False)  # (schema, template)
    takes: ClassVar[frozenset[str]] = frozenset({"constrained", "max_new_tokens", "pixels", "static_cache"})  # see mmllm.predictor
    light_encode: ClassVar[bool] = True  # encode: prompts, tokens and pictures; the model runs in predict_encoded

    def encode(self, listings: Sequence[Listing], images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """CPU work of a batch (prompts, tokens, pixels, and with the prefix cache on, the tokens laid out
        behind the shared prefix: a :class:`PromptBatch`): safe to run in a worker thread."""
        enc = encode_prompts(self.processor, listings, self.schema, self.template,
                             [list(i)[: self.max_images] for i in images])
        return PromptBatch(enc, self._shared_prefix()) if self.prefix_cache else enc

    def __post_init__(self) -> None:
        # resolved once: at a 151k vocabulary a lookup through get_vocab() costs ~0.2 s a call
        # (a predictor that only parses answers, as the demo's record view, has no processor)
        self._stops = stop_ids(self.processor.tokenizer) if self.processor is not None else []
        self._answers = AnswerTokens(self.processor.tokenizer, self._stops) if self.processor is not None else None
        if self.static_compile not in STATIC_COMPILE:
            raise ValueError(f"static_compile {self.static_compile!r}: one of {', '.join(STATIC_COMPILE)}")

    def generate_encoded(self, enc: dict[str, torch.Tensor]) -> list[str]:
        """Decode one encoded batch; raw answer texts in batch order."""
        return [text for text, _ in self.generate_scored(enc)]

    def generate_scored(self, enc: dict[str, torch.Tensor]) -> list[tuple[str, TokenSpans]]:
        """Decode one encoded batch: per row the answer text and, per generated token, its character
        span in that text and its log-probability as decoded (under the grammar, when constrained:
        the distribution renormalized over the tokens the grammar allows): :class:`TokenSpans`."""
        device = next(self.model.parameters()).device
        tokenizer = self.processor.tokenizer
        grammar = self._grammar_factory() if self.constrained else None
        new_tokens = max(self.max_new_tokens, grammar.max_tokens) if grammar is not None else self.max_new_tokens
        recorder = ChosenLogprobs(new_tokens)
        processors = [grammar.processor(), recorder] if grammar is not None else [recorder]
        kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "logits_processor": processors}  # the recorder last
        prefix = self._prefix_cache()
        static_len = self._static_cache_len(enc["input_ids"].shape[1], new_tokens) if self.static_cache else None
        if static_len is not None:
            empty = self._reused_static_cache(enc["input_ids"].shape[0], static_len)
        else:  # room for the prompt and an answer: each step writes its token in place, never a copy of the cache
            empty = self._growing_cache(enc["input_ids"].shape[1] + min(new_tokens, GROWING_ROOM))
        # laid out where the batch was encoded (the host), then moved: the cache is on the device already
        inputs = (prefix.lay_out(enc, empty) if prefix is not None else None) or enc
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        cache_arg = cache_argument(self.model)
        if empty is not None:  # a prefix's layout holds it already
            inputs.setdefault(cache_arg, empty)
        if static_len is not None and device.type != "cuda" and not self._said_static:
            self._said_static = True
            log.warning("static cache on %s: nothing is compiled there, and prefill takes the masked attention kernel; "
                        "it pays on a GPU", device.type)
        reset_rope_deltas(base_model(self.model))  # positions come from this batch, never the last one
        compile = self.static_compile if static_len is not None and device.type == "cuda" else None
        if self._greedy is None or self._greedy[0] is not self.model or self._greedy[1] != compile:
            self._greedy = (self.model, compile,  # built once per loaded model and way of decoding
                            greedy_config(self.model, self._stops, tokenizer.pad_token_id, compile))
        try:
            with (torch.no_grad(), greedy_generation(self.model, self._stops, tokenizer.pad_token_id, self._greedy[2]),
                  decoding_kernels(device)):
                decoder = self._decoder() if static_len is None and empty is not None else None
                if decoder is not None:  # the steps after the first by mmllm's loop (greedy_loop.py)
                    out = self._own_loop(decoder, inputs, cache_arg, processors, tokenizer.pad_token_id, new_tokens)
                    if out is None:  # the loop does not run with this transformers: generate from now on
                        return self.generate_scored(enc)
                else:
                    out = self.model.generate(**inputs, **kwargs)
        except Exception as exc:
            if static_len is None or not compile_failed(exc):
                raise
            # the compiler is unusable here (no C compiler for Triton, an unsupported operator): every
            # later batch would fail the same way, so the job goes on with the growing cache
            log.warning("static cache: compiling the decoding step failed (%s: %s); decoding with the growing cache "
                        "from now on", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.static_cache, self._static = False, None  # and its memory
            return self.generate_scored(enc)
        new = out[:, enc["input_ids"].shape[1]:]  # [B, new tokens]
        return self._answers(new.cpu().numpy(), recorder.result(new.shape[1]).numpy())

    def _static_cache_len(self, prompt: int, new_tokens: int) -> int:
        """The static cache's length for a batch: room for its prompt and answers, rounded up, never
        shorter than an earlier batch's (a new length recompiles the decoding step)."""
        need = -(-(prompt + new_tokens) // STATIC_CACHE_STEP) * STATIC_CACHE_STEP
        self._static_len = max(self._static_len, need)
        return self._static_len

    def _growing_cache(self, capacity: int) -> Any:
        """A cache growing in place with room for ``capacity`` tokens (``None``: the model's decoder has
        layers it does not serve); its layout read from the model's config once per loaded model."""
        if self._growing is None or self._growing[0] is not self.model:
            self._growing = (self.model, growing_layers(self.model))
        return growing_cache(self._growing[1], capacity) if self._growing[1] is not None else None

    def _own_loop(self, decoder: Any, inputs: dict[str, Any], cache_arg: str, processors: list[Any],
                  pad_token_id: int | None, new_tokens: int) -> torch.Tensor | None:
        """One batch through :func:`greedy_decode`. If its first batch fails (a transformers whose layers or
        generate take other arguments than the tested ones), the job says so once and goes on with
        ``generate`` (``None``); a failure after a batch has passed is raised as any model error."""
        try:
            out = greedy_decode(self.model, decoder, {k: v for k, v in inputs.items() if k != cache_arg},
                                inputs[cache_arg], cache_arg, processors, self._stops, pad_token_id, new_tokens)
        except Exception as exc:  # noqa: BLE001 - any incompatibility: generate can still answer
            if self._loop_ran:
                raise
            log.warning("mmllm's decoding loop failed on its first batch (%s: %s); decoding with generate from now on",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.own_loop = False
            return None
        self._loop_ran = True
        return out

    def _decoder(self) -> Any:
        """The decoding step mmllm's greedy loop runs (:func:`decoding_step`); ``None``: ``generate`` decodes
        (``own_loop`` off, or a model the loop does not serve)."""
        return decoding_step(self.model) if self.own_loop else None

    def _reused_static_cache(self, batch: int, length: int) -> Any:
        """The static cache of the last batch of this shape, emptied, else a new one. Its tensors keep their
        addresses, so a decoding step recorded as a CUDA graph replays (a cache at new addresses would be
        recorded again: :mod:`mmllm.models.cuda_graphs`). One is kept: a job's batches share a shape, but
        for its last."""
        if self._static is not None and self._static[0][0] is self.model and self._static[0][1:] == (batch, length):
            self._static[1].reset()
            return self._static[1]
        self._static = None  # the old one's memory first
        self._static = ((self.model, batch, length), new_static_cache(self.model, length))
        return self._static[1]

    def _prefix_cache(self) -> PrefixCache | None:
        """The shared prefix of this template's prompts, encoded on first use (``None``: off or none)."""
        if not self.prefix_cache:
            return None
        key = (self.model, self.schema, self.template)
        if self._prefix is None or any(a is not b for a, b in zip(self._prefix[0], key)):
            self._prefix = (key, PrefixCache.build(self.model, self._shared_prefix().tolist()))
        return self._prefix[1]

    def _shared_prefix(self) -> np.ndarray:
        """The token ids this template's prompts all start with (:func:`shared_prefix_ids`), once per schema
        and template. Encoding workers may race to it: each computes the same ids."""
        known = self._prefix_ids
        if known is None or known[0][0] is not self.schema or known[0][1] is not self.template:
            known = ((self.schema, self.template),
                     np.asarray(shared_prefix_ids(self.processor, self.schema, self.template), dtype=np.int64))
            self._prefix_ids = known
        return known[1]

    def generate(self, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[str]:
        """Raw answer texts, in input order (broken images are dropped with a warning)."""
        return [text for _, enc in encoded_batches(self, listings, image_policy) for text in self.generate_encoded(enc)]

    def predict(self, listings: Sequence[Listing], image_policy: ImagePolicy) -> list[dict[str, Any]]:
        """One prediction record per listing: ``{"id", "category", "attributes", "status", ...}``."""
        return predict_in_batches(self, listings, image_policy)

    def predict_encoded(self, enc: dict[str, torch.Tensor], raw: bool = False) -> list[dict[str, Any]]:
        """Records (without id) for an encoded batch; ``raw`` keeps the decoded text of every row."""
        records = []
        for text, tokens in self.generate_scored(enc):
            record = {k: v for k, v in self.record(None, text, tokens).items() if k != "id"}
            records.append({**record, "raw": text} if raw else record)
        return records

    def embed_encoded(self, enc: dict[str, torch.Tensor], pooling: str = "last") -> np.ndarray:
        """Similar-product vectors: the pooled prompt state (the answer is never generated)."""
        return prompt_vectors(self.model, enc, pooling)

    def record(self, listing_id: str | None, text: str,
               tokens: TokenSpans | Sequence[tuple[int, int, float]] | None = None) -> dict[str, Any]:
        """A prediction record from raw answer text, validated by the schema. With the answer's
        ``tokens`` (spans and log-probabilities, :meth:`generate_scored`) it carries ``confidence``
        (the category path's probability) and ``attribute_confidence`` (each stated value's), mapped
        through the folder's calibration when there is one."""
        result = self.schema.parse(text)
        if result.ok:
            record = mark_untrained({"id": listing_id, **result.value, "status": "ok"}, self.untrained)
            if tokens is not None:
                record.update(answer_confidence(text, tokens, record))
                if self.calibration is not None:
                    record = self.calibration.apply(record)
            return record
        return mark_untrained({"id": listing_id, "category": None, "attributes": {}, "status": "invalid",
                               "error": result.reason(), "raw": text}, self.untrained)

    def compile_grammar(self) -> None:
        """Compile the schema's answer grammar now, not in the first batch (constrained decoding only).
        ``mmllm label`` calls it while loading: a machine without xgrammar, or a schema the grammar cannot
        serve, is told so before any row is read, and a job's rows/s counts its rows (xgrammar's import
        and the compile took 0.28 s with the tiny checkpoint, 0.6 s more at the real vocabulary)."""
        if self.constrained and self.processor is not None:
            self._grammar_factory()

    def build_shared(self) -> None:
        """Build now what every batch shares: the answer grammar (constrained decoding) and the shared
        prompt prefix's cache. Labelling replicas (:mod:`mmllm.labelling.replicas`) call it before they
        fork, so they share one copy instead of each encoding the prefix in its first batch."""
        self.compile_grammar()
        with torch.no_grad():
            self._prefix_cache()

    def _grammar_factory(self) -> Any:
        if self._grammar is None:
            if importlib.util.find_spec("xgrammar") is None:
                raise ValueError("constrained decoding needs xgrammar (pip install xgrammar), or label with "
                                 "--no-constrained (answers are then validated, not guaranteed)")
            from mmllm.constrained import GrammarFactory

            tokenizer = self.processor.tokenizer
            vocab = self.model.get_output_embeddings().weight.shape[0]  # padded past len(tokenizer)
            self._grammar = GrammarFactory(self.schema, tokenizer, vocab, self._stops)
        return self._grammar
