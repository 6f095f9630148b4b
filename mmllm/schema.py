"""Label schema: the toy taxonomy and the attributes to predict.

This module is the one place that defines "valid output". Labelling,
evaluation, the demo and the training targets all go through it:

* :meth:`LabelSchema.from_yaml` reads the schema file (see ``examples/toys_schema.yaml``),
* :meth:`LabelSchema.json_schema` gives the JSON Schema of a model answer,
* :meth:`LabelSchema.validate` checks and normalizes an answer, one :class:`FieldError` per problem,
* :meth:`LabelSchema.parse` does the same for raw model text,
* :meth:`LabelSchema.canonical_json` renders a label as the fixed-order training target,
* :func:`mmllm.schema_infer.infer_schema` drafts a schema from labelled rows (``mmllm schema infer``).

An answer is ``{"category": "A > B", "attributes": {name: value-or-null}}``. ``null`` means
"unknown"; the canonical form lists every attribute in schema order so that a model (and a
grammar for constrained decoding) always sees the same shape.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from mmllm.config import load_yaml, yaml_problem
from mmllm.evidence import EvidenceError, EvidenceSpec

SEPARATOR = " > "
ATTRIBUTE_TYPES = ("enum", "integer", "number", "boolean", "string", "list")
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}


class SchemaError(ValueError):
    """The schema file itself is wrong (names the file and the entry)."""


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of a model answer.

    ``code`` is stable for programs (``invalid_json``, ``not_an_object``, ``missing``,
    ``unknown_key``, ``wrong_type``, ``not_in_taxonomy``, ``not_in_enum``, ``out_of_range``,
    ``too_long``, ``too_many``); ``message`` is for people.
    """

    field: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Validation:
    """Result of validating an answer: the normalized value when there were no errors."""

    value: dict[str, Any] | None
    errors: tuple[FieldError, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def reason(self) -> str:
        return "; ".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute to predict.

    ``type`` is one of ``enum`` / ``integer`` / ``number`` / ``boolean`` / ``string`` / ``list``
    (a list of enum values). ``values`` lists the allowed values of ``enum`` and ``list``.
    ``minimum`` / ``maximum`` bound numbers, ``max_length`` strings, ``max_items`` lists: the
    bounds also keep a decoding grammar finite, so every type has one.
    """

    name: str
    type: str
    description: str = ""
    values: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    max_length: int = 64
    max_items: int = 8
    evidence: EvidenceSpec | None = None  # what counts as the listing stating it (mmllm.evidence)

    def __post_init__(self) -> None:
        # YAML gives whatever was typed: check kinds before comparing, so a slip is named, not a TypeError
        for key in ("max_length", "max_items"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SchemaError(f"attribute '{self.name}': {key} must be a whole number >= 1, got {value!r}")
        for key in ("minimum", "maximum"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise SchemaError(f"attribute '{self.name}': {key} must be a finite number or left out, got {value!r}")
        if self.type not in ATTRIBUTE_TYPES:
            raise SchemaError(
                f"attribute '{self.name}': type '{self.type}' is not one of {', '.join(ATTRIBUTE_TYPES)}"
            )
        if self.type in ("enum", "list") and not self.values:
            raise SchemaError(f"attribute '{self.name}': type {self.type} needs a non-empty 'values' list")
        if self.type not in ("enum", "list") and self.values:
            raise SchemaError(f"attribute '{self.name}': 'values' only applies to enum and list types")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise SchemaError(f"attribute '{self.name}': minimum {self.minimum} > maximum {self.maximum}")
        if len(set(v.casefold() for v in self.values)) != len(self.values):
            raise SchemaError(f"attribute '{self.name}': values repeat (case-insensitively)")
        if self.evidence is not None:  # a rule's fixed value is published as it stands: it must fit the attribute
            object.__setattr__(self, "evidence", self._fitted_evidence(self.evidence))

    def _fitted_evidence(self, spec: EvidenceSpec) -> EvidenceSpec:
        """``spec`` with each rule's fixed ``value`` / ``otherwise`` in this attribute's canonical form ("Lego" ->
        "LEGO", "no" -> false); a value that does not fit (not an allowed value, out of bounds) is a schema error."""
        def fitted(value: Any, where: str) -> Any:
            if value is None:
                return None
            canonical, error = self.normalize(value)
            if error is not None:
                raise SchemaError(f"attribute '{self.name}': evidence {where}: the value {value!r} does not fit the "
                                  f"attribute ({error.message})")
            return canonical

        table = tuple(replace(r, value=fitted(r.value, f"table key '{r.key}'"),
                              otherwise=fitted(r.otherwise, f"table key '{r.key}' (otherwise)")) for r in spec.table)
        text = tuple(replace(r, value=fitted(r.value, f"text pattern '{r.name}'")) for r in spec.text)
        return replace(spec, table=table, text=text)

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of this attribute's value (``null`` always allowed: unknown)."""
        if self.type == "enum":
            return {"enum": [*self.values, None], "description": self.description}
        if self.type == "list":
            return {
                "type": ["array", "null"],
                "items": {"enum": list(self.values)},
                "uniqueItems": True,
                "maxItems": self.max_items,
                "description": self.description,
            }
        out: dict[str, Any] = {"type": [self.type, "null"], "description": self.description}
        if self.type in ("integer", "number"):
            if self.minimum is not None:
                out["minimum"] = self.minimum
            if self.maximum is not None:
                out["maximum"] = self.maximum
        if self.type == "string":
            out["maxLength"] = self.max_length
        return out

    def normalize(self, value: Any) -> tuple[Any, FieldError | None]:
        """Coerce a value to this attribute's canonical form, or say why it cannot be."""
        where = f"attributes.{self.name}"
        if value is None:
            return None, None
        if self.type == "boolean":
            return _to_bool(value, where)
        if self.type in ("integer", "number"):
            number, err = _to_number(value, where, integer=self.type == "integer")
            if err is None and not _in_range(number, self.minimum, self.maximum):
                err = FieldError(where, "out_of_range", f"{number} is outside [{self.minimum}, {self.maximum}]")
            return number, err
        if self.type == "string":
            if not isinstance(value, str):
                return None, _wrong_type(where, "a string", value)
            text = squeeze(value)
            if len(text) > self.max_length:
                return None, FieldError(where, "too_long", f"{len(text)} characters, at most {self.max_length}")
            return text, None
        if self.type == "enum":
            if not isinstance(value, str):
                return None, _wrong_type(where, f"one of {_show(self.values)}", value)
            return self._enum_value(value, where)
        # list of enum values; a bare string is a list of one
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            return None, _wrong_type(where, f"a list of {_show(self.values)}", value)
        out: list[str] = []
        for item in items:
            if not isinstance(item, str):
                return None, _wrong_type(where, f"a list of strings from {_show(self.values)}", value)
            canon, err = self._enum_value(item, where)
            if err:
                return None, err
            if canon not in out:
                out.append(canon)
        if len(out) > self.max_items:
            return None, FieldError(where, "too_many", f"{len(out)} items, at most {self.max_items}")
        return out, None

    def _enum_value(self, value: str, where: str) -> tuple[str | None, FieldError | None]:
        key = squeeze(value).casefold()
        for allowed in self.values:
            if allowed.casefold() == key:
                return allowed, None
        hint = difflib.get_close_matches(value, self.values, n=1)
        more = f" (did you mean '{hint[0]}'?)" if hint else ""
        return None, FieldError(where, "not_in_enum", f"'{value}' is not one of {_show(self.values)}{more}")


@dataclass(frozen=True)
class LabelSchema:
    """The taxonomy (category paths joined by ``" > "``) and the attribute specs."""

    categories: tuple[str, ...]
    attributes: tuple[AttributeSpec, ...]
    name: str = "schema"
    version: str = "1"
    description: str = ""
    category_ids: dict[str, str] = field(default_factory=dict)
    """A standard taxonomy's id of each node (``mmllm schema import``): every category's, and its parents'."""
    taxonomy_format: str = ""  # "shopify" / "google" when imported: the format the ids are written in
    _by_key: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _id_by_key: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.categories:
            raise SchemaError(f"schema '{self.name}': the taxonomy is empty")
        seen: dict[str, str] = {}
        for path in self.categories:
            key = category_key(path)
            if key in seen:
                raise SchemaError(f"schema '{self.name}': category '{path}' is listed twice")
            seen[key] = path
        self._by_key.update(seen)
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise SchemaError(f"schema '{self.name}': attribute names repeat: {names}")
        if self.category_ids:
            ids = {clean_path(str(k)): str(v) for k, v in self.category_ids.items()}
            missing = [c for c in self.categories if clean_path(c) not in ids]
            if missing:
                raise SchemaError(f"schema '{self.name}': category '{missing[0]}' has no id in category_ids")
            object.__setattr__(self, "category_ids", ids)
            self._id_by_key.update((category_key(path), i) for path, i in ids.items())

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path) -> "LabelSchema":
        """Read a schema file; errors name the file and the entry."""
        path = Path(path)
        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SchemaError(f"{path}: cannot read the label schema: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise SchemaError(f"{path}: cannot read the label schema: byte 0x{exc.object[exc.start]:02x} at offset "
                              f"{exc.start} is not UTF-8; save the file as UTF-8") from None
        except yaml.YAMLError as exc:
            raise SchemaError(f"{path}: cannot read the label schema: {yaml_problem(exc)}") from None
        try:
            return cls.from_dict(data)
        except SchemaError as exc:
            raise SchemaError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> "LabelSchema":
        if not isinstance(data, Mapping):
            raise SchemaError("a label schema is a mapping with 'taxonomy' and 'attributes'")
        unknown = set(data) - {"name", "version", "description", "taxonomy", "attributes", "category_ids",
                               "taxonomy_format"}
        if unknown:
            raise SchemaError(f"unknown top-level key(s) {sorted(unknown)}")
        specs = data.get("attributes") or {}
        if not isinstance(specs, Mapping):
            raise SchemaError(f"'attributes' must map each attribute name to its spec, got a {type(specs).__name__}")
        attributes = []
        for name, spec in specs.items():
            if not isinstance(spec, Mapping):
                raise SchemaError(f"attribute '{name}': expected a mapping with at least 'type'")
            extra = set(spec) - {"type", "description", "values", "minimum", "maximum", "max_length", "max_items",
                                 "evidence"}
            if extra:
                raise SchemaError(f"attribute '{name}': unknown key(s) {sorted(extra)}")
            values = spec.get("values") or []
            if not isinstance(values, list) or any(isinstance(v, (list, dict)) for v in values):
                raise SchemaError(f"attribute '{name}': values must be a list of names, got {values!r}")
            evidence = None
            if spec.get("evidence") is not None:
                try:
                    evidence = EvidenceSpec.from_dict(spec["evidence"], str(name), str(spec.get("type", "")))
                except EvidenceError as exc:
                    raise SchemaError(str(exc)) from None
            # Bounds pass through unconverted: AttributeSpec names a wrong kind (max_length: lots)
            attributes.append(
                AttributeSpec(
                    name=str(name),
                    type=str(spec.get("type", "")),
                    description=str(spec.get("description", "")).strip(),
                    values=tuple(str(v) for v in values),
                    minimum=spec.get("minimum"),
                    maximum=spec.get("maximum"),
                    max_length=spec.get("max_length", 64),
                    max_items=spec.get("max_items", 8),
                    evidence=evidence,
                )
            )
        return cls(
            categories=tuple(_flatten_taxonomy(data.get("taxonomy"))),
            attributes=tuple(attributes),
            name=str(data.get("name", "schema")),
            version=str(data.get("version", "1")),
            description=str(data.get("description", "")).strip(),
            category_ids=_category_ids(data.get("category_ids")),
            taxonomy_format=str(data.get("taxonomy_format") or ""),
        )

    def to_dict(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        for a in self.attributes:
            spec: dict[str, Any] = {"type": a.type, "description": a.description}
            if a.values:
                spec["values"] = list(a.values)
            if a.minimum is not None:
                spec["minimum"] = a.minimum
            if a.maximum is not None:
                spec["maximum"] = a.maximum
            if a.type == "string":
                spec["max_length"] = a.max_length
            if a.type == "list":
                spec["max_items"] = a.max_items
            if a.evidence is not None:
                spec["evidence"] = a.evidence.to_dict()
            attrs[a.name] = spec
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "taxonomy": list(self.categories),
            "attributes": attrs,
            **({"taxonomy_format": self.taxonomy_format} if self.taxonomy_format else {}),
            **({"category_ids": dict(self.category_ids)} if self.category_ids else {}),
        }

    def to_yaml(self, path: str | Path, header: str = "") -> None:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)
        Path(path).write_text(header + text, encoding="utf-8")

    # ------------------------------------------------------------------ queries
    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def attribute(self, name: str) -> AttributeSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(name)

    def category_id(self, category: str | None) -> str | None:
        """The standard taxonomy's id of a category or of a parent node (an imported schema), or None."""
        return self._id_by_key.get(category_key(category)) if isinstance(category, str) else None

    def canonical_category(self, category: str) -> str | None:
        """The taxonomy's spelling of ``category`` (spacing and case forgiven), or None."""
        return self._by_key.get(category_key(category))

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema (draft 2020-12) of a model answer; every attribute key is present."""
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"{self.name} label",
            "type": "object",
            "properties": {
                "category": {"enum": list(self.categories), "description": "taxonomy path"},
                "attributes": {
                    "type": "object",
                    "properties": {a.name: a.json_schema() for a in self.attributes},
                    "required": list(self.attribute_names),
                    "additionalProperties": False,
                },
            },
            "required": ["category", "attributes"],
            "additionalProperties": False,
        }

    # ------------------------------------------------------------------ validation
    def validate(self, answer: Any, *, require_category: bool = True) -> Validation:
        """Check and normalize an answer; every problem is reported, not just the first.

        Normalization forgives what a reader would: case and spacing of categories and enum
        values, numbers and booleans written as strings, ``3.0`` for an integer 3. Missing
        attribute keys become ``null``, as does every attribute of ``"attributes": null`` (a gold label
        for the category only: :func:`mmllm.catalog.attributes_labelled` tells the two apart).
        """
        if not isinstance(answer, Mapping):
            return Validation(None, (_wrong_type("answer", "a JSON object", answer, code="not_an_object"),))
        errors: list[FieldError] = []
        for key in answer:
            if key not in ("category", "attributes"):
                errors.append(FieldError(str(key), "unknown_key", "unknown key; expected 'category' and 'attributes'"))
        category = answer.get("category")
        if category is None:
            if require_category:
                errors.append(FieldError("category", "missing", "missing; expected a taxonomy path"))
        elif not isinstance(category, str):
            errors.append(_wrong_type("category", "a taxonomy path string", category))
        else:
            canon = self.canonical_category(category)
            if canon is None:
                hint = difflib.get_close_matches(category, self.categories, n=1, cutoff=0.5)
                more = f" (closest: '{hint[0]}')" if hint else ""
                errors.append(FieldError("category", "not_in_taxonomy", f"'{category}' is not in the taxonomy{more}"))
            category = canon
        attrs_in = answer.get("attributes")
        if attrs_in is None:  # missing, or a category-only label: every attribute null
            attrs_in = {}
        attrs: dict[str, Any] = {}
        if not isinstance(attrs_in, Mapping):
            errors.append(_wrong_type("attributes", "an object", attrs_in))
            attrs_in = {}
        known = set(self.attribute_names)
        for key in attrs_in:
            if key not in known:
                errors.append(
                    FieldError(f"attributes.{key}", "unknown_key", f"unknown attribute; known: {_show(self.attribute_names)}")
                )
        for spec in self.attributes:
            value, err = spec.normalize(attrs_in.get(spec.name))
            if err:
                errors.append(err)
            attrs[spec.name] = value
        if errors:
            return Validation(None, tuple(errors))
        return Validation({"category": category, "attributes": attrs})

    def parse(self, text: str) -> Validation:
        """Validate raw model text: the first JSON object in it (code fences tolerated)."""
        obj, err = extract_json_object(text)
        if err:
            return Validation(None, (FieldError("answer", "invalid_json", err),))
        return self.validate(obj)

    def canonical_json(self, label: Mapping[str, Any]) -> str:
        """The training target / comparison form: validated, fixed key order, no spaces.

        Raises ``ValueError`` naming the fields when the label does not fit the schema.
        """
        result = self.validate(label)
        if not result.ok:
            raise ValueError(f"label does not fit schema '{self.name}': {result.reason()}")
        return json.dumps(result.value, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------- helpers
def load_schema(path: str | Path) -> LabelSchema:
    return LabelSchema.from_yaml(path)


def extract_json_object(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """Find the first JSON object in model text; return it or a reason it is not there."""
    if not isinstance(text, str) or not text.strip():
        return None, "empty answer"
    start = _object_start(text)
    if start < 0:
        return None, f"no JSON object in the answer: {text[:80]!r}"
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at character {exc.pos}): {text[:80]!r}"
    if not isinstance(obj, dict):
        return None, "the answer is not a JSON object"
    return obj, None


def _object_start(text: str) -> int:
    """Where the first JSON object of ``text`` starts: the first ``{`` a whole object decodes from (prose
    such as "as {category, attributes}:" may come before it), else the first ``{`` (an answer cut short:
    its error, and its values' spans up to the break, are read from there); -1 without a ``{``."""
    first = text.find("{")
    decoder, start = json.JSONDecoder(), first
    while start >= 0:
        try:
            if isinstance(decoder.raw_decode(text, start)[0], dict):
                return start
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return first


def answer_spans(text: str) -> dict[str, tuple[int, int]]:
    """Character spans of the values in an answer's first JSON object: ``category`` and each
    attribute's value (keyed by its name), as ``[start, end)`` into ``text``. Values found before
    the JSON breaks are kept; a generative model's value probabilities are read over these spans.
    Keys: ``category`` (and any other top-level value) and ``attributes.NAME``."""
    spans: dict[str, tuple[int, int]] = {}
    start = _object_start(text) if isinstance(text, str) else -1
    if start >= 0:
        try:
            _object_spans(text, start, spans, "", nested="attributes")
        except (ValueError, IndexError):
            pass
    return spans


def _object_spans(text: str, i: int, spans: dict[str, tuple[int, int]], prefix: str, nested: str | None) -> int:
    """Walk one JSON object from its ``{`` at ``i``; record its values' spans; return the index after ``}``."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    i += 1
    while True:
        while text[i] in ws:
            i += 1
        if text[i] == "}":
            return i + 1
        if text[i] == ",":
            i += 1
            continue
        key, i = json.decoder.scanstring(text, i + 1)  # i was at the opening quote
        while text[i] in ws:
            i += 1
        if text[i] != ":":
            raise ValueError("expected ':'")
        i += 1
        while text[i] in ws:
            i += 1
        if key == nested and text[i] == "{":
            i = _object_spans(text, i, spans, f"{key}.", nested=None)
            continue
        _, end = decoder.raw_decode(text, i)
        spans[prefix + key] = (i, end)
        i = end


def _flatten_taxonomy(node: Any, prefix: str = "") -> list[str]:
    """Taxonomy as a list of paths, or nested mappings whose leaves are the categories."""
    if node is None or (isinstance(node, (list, Mapping)) and not node and prefix):  # a leaf: null, {} or []
        return [prefix] if prefix else []
    if isinstance(node, str):
        return [clean_path(prefix + SEPARATOR + node if prefix else node)]
    if isinstance(node, list):
        return [p for item in node for p in _flatten_taxonomy(item, prefix)]
    if isinstance(node, Mapping):
        out = []
        for name, child in node.items():
            path = clean_path(f"{prefix}{SEPARATOR}{name}" if prefix else str(name))
            out.extend(_flatten_taxonomy(child, path))
        return out
    raise SchemaError(f"taxonomy entries are paths or nested mappings, got {type(node).__name__}")


def _category_ids(data: Any) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, Mapping) or any(isinstance(v, (list, dict)) or v is None for v in data.values()):
        raise SchemaError("'category_ids' maps each category path to its id (a string)")
    return {str(k): str(v) for k, v in data.items()}


def clean_path(path: str) -> str:
    """A path's parts with their spacing evened out: " Games >  Card  Games " is "Games > Card Games"."""
    return SEPARATOR.join(squeeze(part) for part in path.split(">") if part.strip())


def squeeze(text: str) -> str:
    """A text as the schema compares it: runs of white space (a tab, a no-break space) one space, the ends stripped."""
    return " ".join(text.split())


def category_key(path: str) -> str:
    return clean_path(path).casefold()


def _show(values: Iterable[str], limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _wrong_type(where: str, expected: str, value: Any, code: str = "wrong_type") -> FieldError:
    return FieldError(where, code, f"expected {expected}, got {type(value).__name__} {json.dumps(value, default=str)[:60]}")


def _to_bool(value: Any, where: str) -> tuple[bool | None, FieldError | None]:
    if isinstance(value, bool):
        return value, None
    if isinstance(value, int) and value in (0, 1):
        return bool(value), None
    if isinstance(value, str):
        key = value.strip().casefold()
        if key in _TRUE:
            return True, None
        if key in _FALSE:
            return False, None
    return None, _wrong_type(where, "true or false", value)


_NUMBER = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$", re.ASCII)  # 0-9 only: '٣' is not read as 3


def _to_number(value: Any, where: str, *, integer: bool) -> tuple[int | float | None, FieldError | None]:
    expected = "an integer" if integer else "a number"
    if isinstance(value, bool):
        return None, _wrong_type(where, expected, value)
    if isinstance(value, str):
        text = value.strip()
        if not text or not _NUMBER.match(text) or text in "+-.":
            return None, _wrong_type(where, expected, value)
        value = float(text.replace(",", ""))
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return None, _wrong_type(where, expected, value)
    if float(value).is_integer():
        return int(value), None
    if integer:
        return None, _wrong_type(where, expected, value)
    return float(value), None


def _in_range(number: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or number >= lo) and (hi is None or number <= hi)
