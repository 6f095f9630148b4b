"""Tiny random Qwen-VL checkpoints for tests and smoke runs.

`build_tiny_checkpoint` writes a folder that plain `AutoProcessor.from_pretrained`
and `AutoModelForImageTextToText.from_pretrained` load offline, with no custom
code: a few-hundred-thousand-parameter model with RANDOM weights, a byte-level
BPE tokenizer trained here on a small built-in corpus, the family's real special
tokens and chat template, and the family's real image and video processors with
small pixel bounds so that images become a handful of tokens.

Such a checkpoint exercises the whole pipeline (chat template, image tokens,
batching, generate, LoRA, saving) in seconds on a CPU. Its outputs are noise:
it is for tests and smoke runs only, never for predictions.

``vocab="real"`` keeps the toy BPE but pads its vocabulary with filler entries to
the real size: 151,643 regular entries, so the special tokens sit at the ids of
the real checkpoints (``<|im_end|>`` = 151645, ``<|image_pad|>`` = 151655) and
the embedding and output layer have the real 151,936 rows. Everything that
scales with the vocabulary (logits, grammar compilation, ``get_vocab()``) then
costs what it costs with the real tokenizer; the rest of the model stays tiny.

    python -m mmllm.tiny OUT --arch qwen2_vl|qwen2_5_vl|qwen3_vl [--seed 0] [--vocab tiny|real]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

ARCHES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

WARNING = (
    "For tests and smoke runs only: RANDOM weights and a toy tokenizer. "
    "Never use this checkpoint for predictions."
)

# Sizes shared by all three families. Heads of 16 dims keep the rotary sections
# small but non-trivial; 0.1 instead of the usual 0.02 init lets the tiny model
# visibly fit a few examples within a test's handful of optimizer steps.
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS
TEXT_INTERMEDIATE = 128
VISION_DEPTH = 2
VISION_WIDTH = 32
VISION_HEADS = 2
INIT_RANGE = 0.1
BPE_VOCAB = 1280
VOCAB_MULTIPLE = 64  # real Qwen checkpoints pad the embedding matrix past the tokenizer
VOCABS = ("tiny", "real")
# The real Qwen2 / Qwen2.5 / Qwen3 tokenizers: 151,643 byte-level BPE entries, then the added
# tokens from <|endoftext|> = 151643 on; the checkpoints pad the embedding to 151,936 rows.
REAL_BPE_VOCAB = 151_643
REAL_VOCAB_ROWS = 151_936

# Qwen2's pre-tokenizer regex; Qwen2Tokenizer rebuilds its pipeline with it on
# load, so the merges must be trained on exactly this split.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens in the order (hence relative ids) of the real tokenizers; the flag
# says whether the real tokenizer marks the token special.
QWEN2_VL_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
]
QWEN2_5_VL_TOKENS = QWEN2_VL_TOKENS + [
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
QWEN3_VL_TOKENS = QWEN2_5_VL_TOKENS + [
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
ADDED_TOKENS = {"qwen2_vl": QWEN2_VL_TOKENS, "qwen2_5_vl": QWEN2_5_VL_TOKENS, "qwen3_vl": QWEN3_VL_TOKENS}

# The chat template shipped with Qwen2-VL and Qwen2.5-VL Instruct: a default
# system prompt when none is given, one vision block per image or video.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The chat template shipped with Qwen3-VL Instruct: no default system prompt,
# tool calls in <tool_call> tags, tool results folded into a user turn.
QWEN3_VL_CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content, false) + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Built-in training text for the tokenizer: the vocabulary of toy listings and
# their JSON labels, so that typical prompts and targets take few tokens.
_CATEGORIES = [
    "Games > Board Games", "Games > Card Games", "Puzzles > Jigsaw Puzzles",
    "Building Toys > Construction Sets", "Dolls & Accessories > Fashion Dolls",
    "Action Figures", "Stuffed Animals & Plush", "Vehicles > Remote Control",
    "Vehicles > Die-Cast Cars", "Trains & Train Sets", "Arts & Crafts",
    "Educational Toys > Science Kits", "Baby & Toddler Toys", "Outdoor Play",
    "Pretend Play > Play Kitchens", "Musical Toys", "Electronic Toys",
    "Hobbies > Model Trains & Railway Sets",
]
_WORDS = """
title description seller brand price currency condition new used like good fair
category attributes piece_count age_range min_age max_age material color colour
size weight dimensions width height length depth battery batteries required
included players number of min_players max_players playing_time minutes hours
theme character license licensed franchise set series edition year vintage
wooden wood plastic metal fabric cotton plush rubber cardboard paper foam
red green blue yellow orange purple pink black white brown grey gray silver gold
multicolor small medium large mini giant pack box bundle lot collection piece pieces
toy toys game games puzzle puzzles doll dolls figure figures car cars truck train
trains track tracks block blocks brick bricks kit kits card cards dice board
animal animals bear teddy dinosaur unicorn robot rocket castle farm zoo city
kitchen tea party princess pirate knight dragon space ship plane boat tractor
fire station police rescue racing race remote control electric motor light
lights sound sounds music musical drum piano guitar xylophone learning letters
numbers shapes colors counting science stem magnet magnetic building stacking
sorting classic family strategy party trivia word memory matching cooperative
kids children child boys girls baby toddler adult adults teen ages years year
months old for with and or the a an of in on to from by is are this that it
great perfect gift birthday christmas holiday fun easy hard complete missing
original packaging sealed opened tested working works mint excellent shipping
free fast ships day days return returns returned item items listing seller
stock quantity available sold out sku ean upc gtin model number made china
germany denmark usa japan france uk safety warning choking hazard small parts
not suitable under contains yes no true false null unknown none other
""".split()
_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant.",
    "Extract the product attributes from the listing as JSON.",
    "Describe the toy in the photo and return a JSON object.",
    "Answer with valid JSON only, no extra text.",
    "This set is in great condition and all pieces are included.",
    "Please read the description carefully before you buy.",
    "Batteries are not included; requires 3 AA batteries.",
    "Warning: choking hazard, small parts, not for children under 3 years.",
]


def _corpus() -> list[str]:
    """Deterministic tokenizer training text: words, numbers and JSON-shaped labels."""
    lines = [" ".join(_WORDS), *_ENGLISH, *_CATEGORIES]
    lines += [" " + w for w in _WORDS] + [w.capitalize() for w in _WORDS]
    lines += [" ".join(str(n) for n in range(0, 1001, 7)), "0.5 1.25 9.99 19.99 24,95 100% 3+ 8-12"]
    for i, category in enumerate(_CATEGORIES):
        label = {
            "category": category,
            "attributes": {
                "piece_count": (i + 1) * 50,
                "age_range": f"{3 + i % 6}+",
                "material": ("wood", "plastic", "metal", "fabric", "cardboard")[i % 5],
                "color": ("red", "green", "blue", "yellow", "multicolor", None)[i % 6],
                "brand": None if i % 3 else "Unknown",
                "batteries_required": bool(i % 2),
            },
        }
        lines.append(json.dumps(label))
        lines.append(json.dumps(label, separators=(",", ":")))
        lines.append(json.dumps(label, indent=2))
    return lines


def _filler_vocab(vocab: dict[str, int], size: int) -> dict[str, int]:
    """``vocab`` extended with filler entries to ``size`` entries (ids ``len(vocab)`` .. ``size - 1``).

    A filler is a regular vocabulary entry that no merge produces, so text tokenizes exactly as
    with the toy BPE alone; ``<filler_ID>`` is made of printable ASCII, which byte-level BPE maps
    to itself, so a filler id a random model emits decodes to that visible text.
    """
    extended = dict(vocab)
    for token_id in range(len(vocab), size):
        extended[f"<filler_{token_id}>"] = token_id
    return extended


def _build_tokenizer(arch: str, vocab: str = "tiny") -> Qwen2Tokenizer:
    """Train a byte-level BPE on the built-in corpus and wrap it as the family's tokenizer.

    ``vocab="real"`` pads the regular vocabulary to the real tokenizers' 151,643 entries, so the
    added tokens get the real ids."""
    bpe = Tokenizer(models.BPE())
    # Same normalizer and pre-tokenizer as Qwen2Tokenizer, which re-creates them
    # from vocab and merges when the folder is loaded.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    regular = model["vocab"] if vocab == "tiny" else _filler_vocab(model["vocab"], REAL_BPE_VOCAB)

    added = ADDED_TOKENS[arch]
    first_id = len(regular)
    # added_tokens_decoder fixes the order, hence the ids, of the added tokens:
    # <|endoftext|> first, as in the real tokenizers.
    return Qwen2Tokenizer(
        vocab=regular,
        merges=[tuple(merge) for merge in model["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder={
            first_id + i: AddedToken(token, special=special, normalized=False)
            for i, (token, special) in enumerate(added)
        },
        extra_special_tokens=[token for token, special in added[1:] if special],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def _build_processor(arch: str, tokenizer: Qwen2Tokenizer) -> ProcessorMixin:
    """The family's processor with pixel bounds of 2x2 to 4x4 merged tokens per image."""
    if arch == "qwen3_vl":
        # Qwen3-VL: 16-pixel patches merged 2x2, so one token per 32x32 pixels;
        # its real preprocessor normalises with mean=std=0.5.
        side = 32
        image_processor = Qwen2VLImageProcessor(
            size={"shortest_edge": (2 * side) ** 2, "longest_edge": (4 * side) ** 2},
            patch_size=16,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        # The Qwen3-VL video bounds count pixels over all frames of a clip;
        # cap_pixels_per_frame=True is qwen-vl-utils' frame budget (and silences a per-call warning).
        video_processor = Qwen3VLVideoProcessor(
            size={"shortest_edge": 2 * (2 * side) ** 2, "longest_edge": 8 * (4 * side) ** 2},
            patch_size=16,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            cap_pixels_per_frame=True,
        )
        return Qwen3VLProcessor(
            image_processor, tokenizer, video_processor, chat_template=QWEN3_VL_CHAT_TEMPLATE
        )
    side = 28  # 14-pixel patches merged 2x2
    bounds = {"shortest_edge": (2 * side) ** 2, "longest_edge": (4 * side) ** 2}
    image_processor = Qwen2VLImageProcessor(size=bounds)
    video_processor = Qwen2VLVideoProcessor(size=bounds, cap_pixels_per_frame=True)
    processor_class = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
    return processor_class(image_processor, tokenizer, video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _build_config(arch: str, tokenizer: Qwen2Tokenizer, vocab: str = "tiny") -> PreTrainedConfig:
    """A small model config whose special-token ids match `tokenizer` (real vocabulary: real rows)."""
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE if vocab == "tiny" else REAL_VOCAB_ROWS
    text = dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=32768,
        initializer_range=INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "qwen3_vl":
        # Interleaved M-RoPE: the height and width sections take every third
        # frequency, so 3 * section must fit in head_dim / 2 = 8.
        text.update(
            head_dim=HEAD_DIM,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=VISION_DEPTH,
            hidden_size=VISION_WIDTH,
            intermediate_size=2 * VISION_WIDTH,
            num_heads=VISION_HEADS,
            patch_size=16,
            out_hidden_size=TEXT_HIDDEN,
            num_position_embeddings=64,  # an 8x8 grid of learned positions
            deepstack_visual_indexes=[1],
            initializer_range=INIT_RANGE,
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    # Qwen2 M-RoPE: contiguous [temporal, height, width] sections of head_dim / 2.
    text.update(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
    )
    if arch == "qwen2_5_vl":
        vision = dict(
            depth=VISION_DEPTH,
            hidden_size=VISION_WIDTH,
            intermediate_size=2 * VISION_WIDTH,
            num_heads=VISION_HEADS,
            out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=[VISION_DEPTH - 1],  # windowed first block, full-attention last
            initializer_range=INIT_RANGE,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(
        depth=VISION_DEPTH,
        embed_dim=VISION_WIDTH,
        hidden_size=TEXT_HIDDEN,  # Qwen2-VL's merger projects straight to the text width
        num_heads=VISION_HEADS,
        initializer_range=INIT_RANGE,
    )
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


_MODEL_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}


def build_tiny_checkpoint(out_dir, arch: str = "qwen2_vl", seed: int = 0, vocab: str = "tiny") -> pathlib.Path:
    """Write a tiny random `arch` checkpoint (model, tokenizer, processor) to `out_dir`.

    The same `seed` gives byte-identical weight and tokenizer files; the tokenizer
    does not depend on the seed. `vocab="real"` pads the tokenizer to the real
    size (special tokens at the real ids) and gives the embedding and output
    layer the real 151,936 rows (about 19M parameters at width 64).
    For tests and smoke runs only: random weights.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab {vocab!r}; expected one of {VOCABS}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(arch, vocab)
    processor = _build_processor(arch, tokenizer)
    config = _build_config(arch, tokenizer, vocab)

    # seeded on a forked generator: building must not move the caller's random state (a recipe that
    # seeds, then resolves "tiny:ARCH" for the first time, would otherwise start its LoRA from other
    # random numbers than the same recipe finding the checkpoint already built)
    with torch.random.fork_rng(devices=[]):  # the CPU generator, restored on exit; CUDA's is never touched
        torch.default_generator.manual_seed(seed)
        model = _MODEL_CLASSES[arch](config).eval()
    # Greedy by default so that generate() in tests is reproducible; the real
    # checkpoints stop on either end token, as here.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    flag = "" if vocab == "tiny" else f" --vocab {vocab}"
    fillers = "" if vocab == "tiny" else f", padded with filler entries to the real size ({REAL_VOCAB_ROWS:,} embedding rows)"
    (out / "README.md").write_text(
        f"# Tiny random {arch} checkpoint\n\n{WARNING}\n\n"
        f"Built by `python -m mmllm.tiny OUT --arch {arch} --seed {seed}{flag}`: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"tokenizer of {len(tokenizer)} tokens trained on a built-in toy-listing corpus{fillers}.\n"
    )
    return out


def resolve(ref: str) -> str:
    """A model reference as given, or for ``tiny:ARCH`` the folder of a tiny checkpoint (built once).

    ``tiny:qwen2_vl`` lets configs such as ``finetune/tiny_cpu.yaml`` run anywhere, offline, in
    seconds; the command lines and tests resolve it, the library never does. Random weights:
    smoke runs only. The folder is ``$MMLLM_CACHE/tiny/ARCH-seed0`` (default ``~/.cache/mmllm``);
    ``tiny:ARCH:real`` is the real-size-vocabulary variant, in ``ARCH-real-seed0``.
    """
    if not ref.startswith("tiny:"):
        return ref
    import os

    arch, _, vocab = ref.split(":", 1)[1].partition(":")
    vocab = vocab or "tiny"
    if vocab not in VOCABS:
        raise ValueError(f"unknown vocab in {ref!r}; expected tiny:ARCH or tiny:ARCH:real")
    name = f"{arch}-seed0" if vocab == "tiny" else f"{arch}-{vocab}-seed0"
    cache = pathlib.Path(os.environ.get("MMLLM_CACHE", pathlib.Path.home() / ".cache" / "mmllm")) / "tiny" / name
    if not (cache / "config.json").exists():
        build_tiny_checkpoint(cache, arch=arch, seed=0, vocab=vocab)
    return str(cache)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: build one tiny checkpoint and print where it went."""
    parser = argparse.ArgumentParser(
        prog="python -m mmllm.tiny",
        description=f"Write a tiny random Qwen-VL checkpoint that loads offline with Auto* classes. {WARNING}",
    )
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--arch", choices=ARCHES, default="qwen2_vl", help="model family (default: qwen2_vl)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: 0)")
    parser.add_argument("--vocab", choices=VOCABS, default="tiny",
                        help="tiny: a 1,280-entry toy BPE (default); real: the same BPE padded to the real "
                             "151,665-token size, special tokens at the real ids, 151,936 embedding rows")
    args = parser.parse_args(argv)
    out = build_tiny_checkpoint(args.out, arch=args.arch, seed=args.seed, vocab=args.vocab)
    print(f"wrote tiny random {args.arch} checkpoint ({args.vocab} vocabulary) to {out} (tests and smoke runs only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
