"""Typed configs: dataclasses loaded from YAML, overridden as ``key.sub=value``.

Each config is a plain dataclass whose fields carry their help text in
``field(metadata={"help": ...})`` and whose cross-field checks live in ``__post_init__``.
This module turns YAML + command-line overrides into such an object, with errors that name the
file and the key (and suggest the closest key for a typo), and back into a dict for saving
the resolved config next to a model.

    cfg = load_config(TrainConfig, "finetune/tiny_cpu.yaml", ["lora.rank=8", "train.lr=1e-4"])
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last silently: a second
    ``train:`` section would drop every setting of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class names it
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice in one mapping (first on line {first}); keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML as ``yaml.safe_load`` reads it, except that a key given twice in one mapping is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """``dataclasses.field`` with a help text (mutable defaults via ``default_factory=``)."""
    metadata = {"help": help}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            loaded = load_yaml(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: cannot read config: {yaml_problem(exc)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file is a mapping of keys to values")
        data = loaded or {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:  # raised by a __post_init__ cross-field check
        raise ConfigError(f"{where}: {exc}") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where in the text and what (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (value parsed as YAML: ``3``, ``true``, ``[a, b]``, ``null``)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
            if value is not None and not isinstance(value, (str, list, dict)):
                value = _Raw(text.strip(), value)  # 0123, 2024.10, off: text as typed where a field is text
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {yaml_problem(exc)}") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Recursively build a dataclass, checking keys and coercing simple types."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in fields if name in data}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML-able data (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path, header: str = "") -> None:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    Path(path).write_text(header + text, encoding="utf-8")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every field, nested sections flattened: for ``--help`` output."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            rows.extend(describe(kind, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))
    return rows


@dataclasses.dataclass(frozen=True)
class _Raw:
    """A command-line value YAML reads as a number, a boolean or a date, with the text as typed: a text field
    takes the text (train.output_dir=0123 is '0123', not 83 read as octal; 2024.10 is not 2024.1)."""

    text: str
    parsed: Any


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if isinstance(value, _Raw) and origin not in (typing.Union, types.UnionType, list, tuple):
        value = value.text if kind in (str, Path) else value.parsed
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; or ".join(dict.fromkeys(errors)) if errors else f"'{key}': bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(kind):
        if value is None:
            return kind()
        return from_dict(kind, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, (str, int, float, _Raw)) and not isinstance(value, bool):
            value = [value]  # `key=x` on the command line for a one-item list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    if kind is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"'{key}' must be a path, got {value!r}")
    return value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# ---------------------------------------------------------------------- command-line numbers
def at_least(low: float, kind: type = int) -> Any:
    """An argparse type: a number of ``kind`` that is at least ``low`` (argparse exits 2 naming the flag)."""
    return _number(kind, lambda value: value >= low, f"must be at least {low}")  # (nan fails every comparison)


def positive(kind: type = int) -> Any:
    """An argparse type: a number of ``kind`` above 0 (and finite)."""
    return _number(kind, lambda value: 0 < value < float("inf"), "must be above 0")


def _number(kind: type, ok: Any, rule: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    return parse
