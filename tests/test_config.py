"""Typed configs: YAML + key.sub=value overrides, errors that name the file and key."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmllm.config import ConfigError, describe, help_field, load_config, save_config, to_dict


@dataclass
class Lora:
    rank: int = help_field(16, "LoRA rank")
    alpha: float = help_field(32.0, "scaling; usually 2 x rank")
    targets: list[str] = help_field(default_factory=lambda: ["q_proj"], help="module regexes")


@dataclass
class Run:
    model: str = help_field("Qwen/Qwen2.5-VL-3B-Instruct", "hub id or local path")
    out: Path = help_field(Path("runs/x"), "output folder")
    precision: Literal["fp32", "bf16"] = help_field("fp32", "compute dtype")
    lr: float = help_field(2e-4, "peak learning rate")
    max_steps: int | None = help_field(None, "stop after this many steps")
    lora: Lora = field(default_factory=Lora)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be positive")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: ./tiny\nlr: 1e-4\nlora:\n  rank: 8\n")
    cfg = load_config(Run, path, ["lora.alpha=16", "max_steps=5", "lora.targets=[a, b]", "out=/tmp/o"])
    assert cfg.model == "./tiny" and cfg.lr == 1e-4 and cfg.max_steps == 5
    assert cfg.lora == Lora(rank=8, alpha=16.0, targets=["a", "b"])
    assert cfg.out == Path("/tmp/o")
    assert load_config(Run).lora.rank == 16


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(Run, None, ["lora.rank=4", "precision=bf16"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg
    assert to_dict(cfg)["out"] == "runs/x"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rnak=4"], "unknown key 'lora.rnak'; did you mean 'lora.rank'?"),
        (["lora.rank=four"], "'lora.rank' must be an integer, got 'four'"),
        (["precision=fp8"], "'precision' must be one of ['fp32', 'bf16']"),
        (["lr=-1"], "lr must be positive"),
        (["lr"], "is not key=value"),
        (["model.name=x"], "'model' must be a string, got {'name': 'x'}"),
        (["lr=1", "lr.x=2"], "'lr' is a value, not a section"),
    ],
)
def test_bad_overrides_say_what_is_wrong(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Run, None, overrides)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n  dropout: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'lora.dropout'"):
        load_config(Run, path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a config file is a mapping"):
        load_config(Run, path)


def test_describe_lists_every_knob_with_help():
    rows = {key: (help_text, default) for key, help_text, default in describe(Run)}
    assert rows["lora.alpha"] == ("scaling; usually 2 x rank", 32.0)
    assert rows["max_steps"] == ("stop after this many steps", None)
    assert set(rows) == {"model", "out", "precision", "lr", "max_steps", "lora.rank", "lora.alpha", "lora.targets"}


def test_a_key_given_twice_in_a_file_is_an_error_not_a_silent_drop(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `lora:` section dropped every setting of the first."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nlora:\n  rank: 8\n  alpha: 4\nmax_steps: 3\nlora:\n  targets: [v_proj]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: cannot read config: line 6 column 1: 'lora' is given twice in "
                                          r"one mapping \(first on line 2\); keep one"):
        load_config(Run, path)
    path.write_text("lora:\n  rank: 8\n  rank: 4\n")
    with pytest.raises(ConfigError, match="'rank' is given twice"):
        load_config(Run, path)
    path.write_text("lora:\n  rank: 8\nlr: 1e-4\n")  # the same key in two mappings is fine
    assert load_config(Run, path).lora.rank == 8


def test_a_schema_naming_an_attribute_twice_is_refused(tmp_path):
    from mmllm.schema import LabelSchema, SchemaError

    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntaxonomy: [A]\nattributes:\n  pieces: {type: integer}\n  pieces: {type: boolean}\n")
    with pytest.raises(SchemaError, match="line 5 column 3: 'pieces' is given twice in one mapping"):
        LabelSchema.from_yaml(path)


def test_a_text_field_takes_the_text_as_typed():
    """Overrides are read as YAML: 0123 was 83 (octal), 2024.10 was 2024.1 and 12:30 was 750 in a text field."""
    for text in ("0123", "2024.10", "12:30", "off"):
        assert load_config(Run, None, [f"model={text}"]).model == text
        assert load_config(Run, None, [f"out={text}"]).out == Path(text)
    cfg = load_config(Run, None, ["lr=3e-4", "max_steps=12", "lora.targets=0123"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 12 and cfg.lora.targets == ["0123"]
    assert load_config(Run, None, ["max_steps=null"]).max_steps is None
