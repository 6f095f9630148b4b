"""Evidence candidates: the attribute values a listing states, and where it states them.

A catalog team cannot publish a value that contradicts the seller's own table, and cannot review
a value whose origin it cannot see. So before any model answers, each attribute collects the
values the listing itself states, as :class:`Candidate` s with their provenance:

- ``table``: a seller-table key declared for the attribute ("Manufacturer recommended age",
  "Our recommended age", ...), its text parsed by a value parser ("8 years and up" -> 8);
- ``title`` / ``description``: a declared text pattern ("894 pieces", "ages 6-12", "batteries not
  required"), with the character span of the match.

What counts as evidence is declared per attribute in the label schema (``evidence:``), so another
catalog configures its own keys and patterns without a code change::

    min_age_years:
      type: number
      evidence:
        parse: age                          # value parser (default: by the attribute's type)
        table: ["Manufacturer recommended age", {key: "Our recommended age"}]
        text:
          - {name: ages_plus, pattern: '\\bages?\\s+(?P<value>[0-9]{1,2})\\s*\\+'}
          - {name: no_batteries, pattern: 'batteries not required', value: false}

A text pattern either captures ``(?P<value>...)`` (parsed like a table value) or gives a fixed
``value``. Patterns are case-insensitive and ASCII (``\\d`` is 0-9): digits of other scripts are
refused, never misread. Each parsed value also carries its ``form`` (``and_up``, ``range``,
``months``, ``thousands``, ...), so the learned choice (:mod:`mmllm.grounding`) can learn which
forms a catalog's gold agrees with. A parser that cannot read a text returns ``None``: no candidate.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

PARSERS = ("boolean", "integer", "number", "age", "enum", "list", "string")
DEFAULT_PARSER = {"boolean": "boolean", "integer": "integer", "number": "number", "enum": "enum", "list": "list",
                  "string": "string"}
TEXT_FIELDS = ("title", "description")
MAX_TEXT = 20_000  # characters of a description searched: patterns run on bounded text
MAX_CANDIDATES = 8  # per attribute and listing
MAX_VALUE_TEXT = 2_000  # characters of one table value or matched text a parser reads (the catalog allows 10,000)


class EvidenceError(ValueError):
    """An ``evidence:`` entry of the schema is wrong (names the attribute and the entry)."""


@dataclass(frozen=True)
class Parsed:
    value: Any
    form: str  # how the text said it: and_up, range, months, plain, word, thousands, ...


@dataclass(frozen=True)
class Candidate:
    """One value the listing states for one attribute, with where it says so."""

    value: Any
    source: str  # table | title | description
    key: str  # the table key as the seller wrote it, or the text pattern's name
    text: str  # the seller's text (table) or the matched text (title / description)
    form: str
    span: tuple[int, int] | None = None  # character span in the title / description

    def evidence(self) -> dict[str, Any]:
        """The provenance written next to a value in a prediction record."""
        out: dict[str, Any] = {"source": self.source, "key": self.key, "text": self.text, "form": self.form}
        if self.span is not None:
            out["span"] = list(self.span)
        return out


@dataclass(frozen=True)
class TableRule:
    key: str
    parse: str | None = None
    pattern: re.Pattern[str] | None = None  # with ``value``: the value when the seller's text matches
    value: Any = None
    otherwise: Any = None  # with ``pattern``: the value when it does not match (None: no candidate)


@dataclass(frozen=True)
class TextRule:
    name: str
    pattern: re.Pattern[str]
    value: Any = None  # fixed value; None: parse the ``value`` group
    parse: str | None = None
    fields: tuple[str, ...] = TEXT_FIELDS


@dataclass(frozen=True)
class EvidenceSpec:
    """What counts as evidence for one attribute (the schema's ``evidence:`` entry)."""

    parse: str | None = None
    table: tuple[TableRule, ...] = ()
    text: tuple[TextRule, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, attribute: str, attr_type: str) -> "EvidenceSpec":
        where = f"attribute '{attribute}': evidence"
        if not isinstance(data, Mapping):
            raise EvidenceError(f"{where}: expected a mapping with parse / table / text, got {type(data).__name__}")
        extra = set(data) - {"parse", "table", "text"}
        if extra:
            raise EvidenceError(f"{where}: unknown key(s) {sorted(extra)}; use parse, table, text")
        parse = _parser_name(data.get("parse"), f"{where}.parse")
        if parse is None and attr_type not in DEFAULT_PARSER:
            raise EvidenceError(f"{where}: attribute type '{attr_type}' has no value parser")
        table_in = data.get("table") or []
        text_in = data.get("text") or []
        if not isinstance(table_in, list):
            raise EvidenceError(f"{where}.table: expected a list of keys, got {type(table_in).__name__}")
        if not isinstance(text_in, list):
            raise EvidenceError(f"{where}.text: expected a list of patterns, got {type(text_in).__name__}")
        table = tuple(_table_rule(entry, f"{where}.table[{i}]") for i, entry in enumerate(table_in))
        text = tuple(_text_rule(entry, f"{where}.text[{i}]") for i, entry in enumerate(text_in))
        names = [r.name for r in text]
        if len(set(names)) != len(names):
            raise EvidenceError(f"{where}.text: pattern names repeat: {names}")
        return cls(parse=parse, table=table, text=text)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.parse:
            out["parse"] = self.parse
        if self.table:
            out["table"] = [r.key if (r.parse is None and r.pattern is None) else
                            {k: v for k, v in (("key", r.key), ("parse", r.parse),
                                               ("pattern", r.pattern.pattern if r.pattern else None),
                                               ("value", r.value), ("otherwise", r.otherwise)) if v is not None}
                            for r in self.table]
        if self.text:
            out["text"] = [{k: v for k, v in (("name", r.name), ("pattern", r.pattern.pattern), ("value", r.value),
                                              ("parse", r.parse),
                                              ("fields", list(r.fields) if r.fields != TEXT_FIELDS else None))
                            if v is not None} for r in self.text]
        return out


def _parser_name(name: Any, where: str) -> str | None:
    if name is None:
        return None
    if name not in PARSERS:
        raise EvidenceError(f"{where}: unknown parser {name!r}; one of {', '.join(PARSERS)}")
    return str(name)


def _compile(pattern: Any, where: str, *, needs_value_group: bool) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise EvidenceError(f"{where}.pattern: expected a regular expression, got {pattern!r}")
    try:
        compiled = re.compile(pattern, re.IGNORECASE | re.ASCII)
    except re.error as exc:
        raise EvidenceError(f"{where}.pattern: not a regular expression: {exc}") from None
    if needs_value_group and "value" not in compiled.groupindex:
        raise EvidenceError(f"{where}: the pattern needs a (?P<value>...) group, or give a fixed 'value'")
    return compiled


def _entry(entry: Any, allowed: set[str], name_key: str, where: str, expected: str, missing: str) -> str:
    """Check one rule mapping (its kind, its keys); returns its stripped ``name_key`` value."""
    if not isinstance(entry, Mapping):
        raise EvidenceError(f"{where}: expected {expected}, got {entry!r}")
    extra = set(entry) - allowed
    if extra:
        raise EvidenceError(f"{where}: unknown key(s) {sorted(extra)}")
    name = entry.get(name_key)
    if not isinstance(name, str) or not name.strip():
        raise EvidenceError(f"{where}: {missing}")
    return name.strip()


def _table_rule(entry: Any, where: str) -> TableRule:
    if isinstance(entry, str) and entry.strip():
        return TableRule(key=entry.strip())
    key = _entry(entry, {"key", "parse", "pattern", "value", "otherwise"}, "key", where,
                 "a table key or a mapping with 'key'", "'key' must name the seller-table key")
    pattern = None
    if "pattern" in entry:
        if "value" not in entry:
            raise EvidenceError(f"{where}: a table 'pattern' needs the 'value' it stands for")
        pattern = _compile(entry["pattern"], where, needs_value_group=False)
    elif "value" in entry or "otherwise" in entry:
        raise EvidenceError(f"{where}: 'value' / 'otherwise' need a 'pattern'")
    return TableRule(key=key, parse=_parser_name(entry.get("parse"), f"{where}.parse"), pattern=pattern,
                     value=entry.get("value"), otherwise=entry.get("otherwise"))


def _text_rule(entry: Any, where: str) -> TextRule:
    name = _entry(entry, {"name", "pattern", "value", "parse", "fields"}, "name", where,
                  "a mapping with 'name' and 'pattern'", "every text pattern needs a 'name' (it is the evidence's key)")
    fields = tuple(entry.get("fields") or TEXT_FIELDS)
    if not set(fields) <= set(TEXT_FIELDS):
        raise EvidenceError(f"{where}.fields: only {', '.join(TEXT_FIELDS)}, got {list(fields)}")
    fixed = "value" in entry
    return TextRule(name=name, pattern=_compile(entry.get("pattern"), where, needs_value_group=not fixed),
                    value=entry.get("value"), parse=_parser_name(entry.get("parse"), f"{where}.parse"), fields=fields)


# ---------------------------------------------------------------------- value parsers
_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
          "sixteen": 16, "seventeen": 17, "eighteen": 18}
_TRUE = {"yes", "y", "true", "1", "required", "included", "needed", "si"}
_FALSE = {"no", "n", "false", "0", "not required", "not included", "not needed", "none", "no batteries"}
_NUMBER = r"[0-9]+(?:[.,][0-9]+)*"
# a word that goes on a number word ("one thousand", "twelve dozen"): the number is not the first word's
_MORE_NUMBER = re.compile(r"(?:hundred|thousand|million|dozen|score|gross|point|half|quarter|twenty|thirty|forty|"
                          r"fifty|sixty|seventy|eighty|ninety|" + "|".join(_WORDS) + r")\b")


def foreign_digits(text: str) -> bool:
    """True when the text has digits of a script other than ASCII (refused, never misread)."""
    return any(ch.isdigit() and not "0" <= ch <= "9" for ch in text)


def _clean(text: Any) -> str | None:
    if isinstance(text, bool):
        return "yes" if text else "no"
    if isinstance(text, (int, float)) and not (isinstance(text, float) and not math.isfinite(text)):
        return str(text)
    if not isinstance(text, str):
        return None
    text = " ".join(text.replace("\u00a0", " ").split())
    if not text or len(text) > MAX_VALUE_TEXT or foreign_digits(text):
        return None
    return text


def _table_text(raw: Any, spec: Any) -> str | None:
    """A seller-table value as the parsers read it: a list of plain values (the catalog allows them) as the
    text a seller would have typed ("Plastic, Wood") for a list attribute, its one item for the others (two
    numbers for a piece count are no piece count)."""
    if isinstance(raw, list):
        items = [_clean(item) for item in raw if item is not None]
        if not items or None in items:  # a nested list, an object, an empty text: not a value a seller typed
            return None
        if getattr(spec, "type", None) == "list":
            return _clean(", ".join(items))
        return items[0] if len(items) == 1 else None
    return _clean(raw)


def _number(token: str) -> tuple[float, str] | None:
    """'1,000' -> 1000 (thousands), '2.5' -> 2.5; '1.000' / '1,5' (ambiguous separators) -> None."""
    if re.fullmatch(r"[0-9]+", token):
        return float(token), "plain"
    if re.fullmatch(r"[0-9]{1,3}(?:,[0-9]{3})+", token):
        return float(token.replace(",", "")), "thousands"
    if re.fullmatch(r"[0-9]+\.[0-9]+", token) and not re.fullmatch(r"[0-9]{1,3}\.[0-9]{3}", token):
        return float(token), "decimal"
    return None  # 1.000 (a thousand or one?), 1,5, 1.000.000: refused, not guessed


def parse_boolean(text: Any, spec: Any = None) -> Parsed | None:
    s = _clean(text)
    if s is None:
        return None
    low = s.casefold().rstrip(".!")
    if low in _TRUE:
        return Parsed(True, "word")
    if low in _FALSE:
        return Parsed(False, "word")
    return None


def parse_number(text: Any, spec: Any = None, *, integer: bool = False) -> Parsed | None:
    """One number in the text ('1,000 pieces', '894', '2.5 kg'); none or several (a range) -> None."""
    s = _clean(text)
    if s is None:
        return None
    tokens = re.findall(_NUMBER, s)
    if len(tokens) != 1:
        words = s.casefold().split()
        word = _WORDS.get(words[0]) if words and not tokens else None
        if word is not None and len(words) > 1 and (_MORE_NUMBER.match(words[1]) or {"half", "quarter"} & set(words)):
            return None  # "one thousand", "two hundred", "twelve dozen", "two and a half": not the first word's number
        return _bounded(Parsed(word, "word"), spec) if word is not None else None
    got = _number(tokens[0])
    if got is None:
        return None
    value, form = got
    if integer:
        if not value.is_integer():
            return None
        value = int(value)
    return _bounded(Parsed(value, form), spec)


def parse_integer(text: Any, spec: Any = None) -> Parsed | None:
    return parse_number(text, spec, integer=True)


_AGE_UNIT = r"years?|yrs?|months?|mths?|mos?(?![a-z])|m(?![a-z])|weeks?|wks?"  # "18m+", "18 mos" are 18 months
_OTHER_UNIT = re.compile(r"\+?\s*(?:days?|hours?|cm|mm|kg|g|inch(?:es)?|in|ft|metres?|meters?)\b")  # an age it is not


def _years(value: float, unit: str) -> float:
    """An age in ``unit`` (years, months, weeks: their first letter) in years, 2 decimals."""
    if unit.startswith("w"):
        return round(value / 52, 2)
    return round(value / 12, 2) if unit.startswith("m") else value


def parse_age(text: Any, spec: Any = None) -> Parsed | None:
    """A minimum age in years: '8 years and up' -> 8, '36 months - 8 years' -> 3, '18 months+' / '18 mos+' /
    '18+m' -> 1.5, '6 weeks and up' -> 0.12, '1½ years' -> 1.5, '4 - 10 years' -> 4 (form ``range``), 'six and
    up' -> 6. Months and weeks become years (2 decimals); a number in another unit ('3 days') is no age."""
    s = _clean(text)
    if s is None:
        return None
    low = re.sub(r"([0-9])\s*½", r"\1.5", s.casefold())  # "1½ years"
    if re.search(r"[¼½¾⅓⅔⅛]|[0-9]\s*/\s*[0-9]|\b(?:half|quarter)\b", low):
        return None  # another fraction: refused, not read as its whole part
    for word, number in _WORDS.items():
        low = re.sub(rf"\b{word}\b", str(number), low)
    tokens = re.findall(r"[0-9]+(?:\.[0-9]+)?", low)
    if not tokens or len(tokens) > 2:
        return None
    m = re.match(rf"\s*(?:ages?\s*:?\s*|aged\s+|for\s+ages?\s+)?(?P<lo>[0-9]+(?:\.[0-9]+)?)\s*(?P<lo_unit>{_AGE_UNIT})?"
                 r"\s*(?P<rest>.*)$", low)
    if m is None:
        return None
    if re.search(r"\b(?:under|below|younger|max(?:imum)?)\b|\bup\s+to\b", m["rest"]):
        return None  # "3 years and under" is a maximum age
    lo = float(m["lo"])
    lo_unit = m["lo_unit"] or ""
    rest = m["rest"]
    if not lo_unit:  # "18+m", "18+ mos": the unit after the plus
        after = re.match(rf"\+\s*(?P<unit>{_AGE_UNIT})", rest)
        lo_unit = after["unit"] if after else ""
        if not lo_unit and _OTHER_UNIT.match(rest):
            return None
    hi_m = re.match(rf"(?:-|to|–)\s*(?P<hi>[0-9]+(?:\.[0-9]+)?)\s*(?P<hi_unit>{_AGE_UNIT})?", rest)
    if hi_m is not None and (hi_m["hi_unit"] or "y")[0] == (lo_unit or "y")[0] and float(hi_m["hi"]) < lo:
        return None  # "4 - 3 years": the range runs backwards, so which end is the minimum is unknown
    if hi_m is not None:
        unit = lo_unit or hi_m["hi_unit"] or "years"
        form = "months_range" if unit.startswith("m") else "range"
    elif len(tokens) == 1:
        unit = lo_unit or ("months" if re.search(r"\bmonths?\b|\bmths?\b|^m\b", rest) else "years")
        form = "months" if unit.startswith("m") else ("and_up" if re.search(r"\+|up|over|older|plus|above", rest)
                                                      else "plain")
    else:
        return None
    if unit.startswith("w") and hi_m is None:
        form = "weeks"
    years = _years(lo, unit)
    if years.is_integer():
        years = int(years)
    return _bounded(Parsed(years, form), spec)


def fold(text: str) -> str:
    """How enum and list values compare with the seller's text: any case, any accents ("POKEMON" is
    "Pokémon"), any spacing."""
    decomposed = unicodedata.normalize("NFKD", text)
    return " ".join("".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold().split())


def parse_enum(text: Any, spec: Any = None) -> Parsed | None:
    s = _clean(text)
    values = getattr(spec, "values", ()) or ()
    if s is None:
        return None
    by_key = {fold(v): v for v in values}
    got = by_key.get(fold(s))
    return Parsed(got, "exact") if got is not None else None


def parse_list(text: Any, spec: Any = None) -> Parsed | None:
    """'Plastic, Wood' -> ['plastic', 'wood'] when every part is an allowed value."""
    s = _clean(text)
    values = getattr(spec, "values", ()) or ()
    if s is None:
        return None
    by_key = {fold(v): v for v in values}
    parts = [fold(p) for p in re.split(r",|/|;|&|\band\b", s) if p.strip()]
    found = [by_key[p] for p in parts if p in by_key]
    if not found or len(found) != len(parts):
        return None
    found = list(dict.fromkeys(found))[: getattr(spec, "max_items", 8)]
    return Parsed(found, "exact")


def parse_string(text: Any, spec: Any = None) -> Parsed | None:
    s = _clean(text)
    if s is None or len(s) > getattr(spec, "max_length", 64):
        return None
    return Parsed(s, "exact")


def _bounded(parsed: Parsed, spec: Any) -> Parsed | None:
    lo, hi = getattr(spec, "minimum", None), getattr(spec, "maximum", None)
    if (lo is not None and parsed.value < lo) or (hi is not None and parsed.value > hi):
        return None
    return parsed


PARSE: dict[str, Callable[[Any, Any], Parsed | None]] = {
    "boolean": parse_boolean, "integer": parse_integer, "number": parse_number, "age": parse_age,
    "enum": parse_enum, "list": parse_list, "string": parse_string}


def parser_for(spec: Any, name: str | None = None) -> Callable[[Any, Any], Parsed | None]:
    """The value parser a rule uses: its own, else the attribute's ``evidence.parse``, else by type."""
    evidence = getattr(spec, "evidence", None)
    return PARSE[name or (evidence.parse if evidence is not None else None) or DEFAULT_PARSER[spec.type]]


# ---------------------------------------------------------------------- candidates
def table_key(key: str) -> str:
    """Seller-table keys compare case-, space- and colon-insensitively."""
    return " ".join(str(key).replace("_", " ").split()).casefold().rstrip(":").strip()


def table_candidates(table: Mapping[str, Any], spec: Any) -> list[Candidate]:
    evidence: EvidenceSpec | None = getattr(spec, "evidence", None)
    if evidence is None or not table:
        return []
    by_key = {table_key(k): (k, v) for k, v in table.items()}
    out = []
    read: set[tuple[str, str | None]] = set()
    for rule in evidence.table:
        found = by_key.get(table_key(rule.key))
        same = (table_key(rule.key), rule.pattern.pattern if rule.pattern is not None else None)
        if found is None or same in read:  # "Assembly Required" and "Assembly required" are one key: read once
            continue
        read.add(same)
        key, raw = found
        text = _table_text(raw, spec)
        if text is None:
            continue
        if rule.pattern is not None:
            value = rule.value if rule.pattern.search(text) else rule.otherwise
            if value is None:
                continue
            parsed = Parsed(value, "pattern")
        else:
            parsed = parser_for(spec, rule.parse)(text, spec)
            if parsed is None:
                continue
        out.append(Candidate(parsed.value, "table", key, text, parsed.form))
    return out


def _parse_match(m: re.Match, parser: Any, spec: Any) -> Parsed | None:
    """The value group parsed; its form read with the rest of the match after it, where that says the
    same value ("ages 3+": the value group is "3", its form ``and_up`` from the "+" the rule matched)."""
    parsed = parser(m["value"], spec)
    tail = m.string[m.end("value"):m.end()]
    if parsed is None or not tail.strip():
        return parsed
    fuller = parser(m["value"] + tail, spec)
    return fuller if fuller is not None and fuller.value == parsed.value else parsed


def text_candidates(title: str, description: str, spec: Any) -> list[Candidate]:
    evidence: EvidenceSpec | None = getattr(spec, "evidence", None)
    if evidence is None:
        return []
    texts = {"title": title or "", "description": (description or "")[:MAX_TEXT]}
    out: list[Candidate] = []
    for rule in evidence.text:
        for field_name in rule.fields:
            for m in rule.pattern.finditer(texts[field_name]):
                if rule.value is not None:
                    parsed: Parsed | None = Parsed(rule.value, "pattern")
                else:
                    parsed = _parse_match(m, parser_for(spec, rule.parse), spec)
                if parsed is None:
                    continue
                out.append(Candidate(parsed.value, field_name, rule.name, m.group(0), parsed.form, (m.start(), m.end())))
                if len(out) >= MAX_CANDIDATES:
                    return out
    return out


def candidates(listing: Any, schema: Any) -> dict[str, list[Candidate]]:
    """Every attribute's candidates from one listing (title, description, seller table)."""
    out = {}
    for spec in schema.attributes:
        if getattr(spec, "evidence", None) is None:
            out[spec.name] = []
            continue
        found = table_candidates(listing.attributes or {}, spec) + text_candidates(listing.title, listing.description,
                                                                                   spec)
        out[spec.name] = found[:MAX_CANDIDATES]
    return out


def values_match(pred: Any, gold: Any, tolerance: float = 0.0) -> bool:
    """The one rule for "this value is the gold one" (evaluation, the learned choice, schema infer):
    booleans by identity, numbers within ``tolerance``, lists as case-insensitive sets, the rest as
    trimmed case-insensitive text."""
    if isinstance(gold, bool) or isinstance(pred, bool):
        return pred is gold
    if isinstance(gold, (int, float)) and isinstance(pred, (int, float)):
        return abs(pred - gold) <= tolerance
    if isinstance(gold, list) and isinstance(pred, list):
        return {str(v).casefold() for v in pred} == {str(v).casefold() for v in gold}
    return str(pred).strip().casefold() == str(gold).strip().casefold()


def value_key(value: Any) -> str:
    """A hashable key for a value (options of the learned choice are grouped by it)."""
    if isinstance(value, bool):
        return "bool:" + str(value)
    if isinstance(value, (int, float)):  # %g as before (the keys in a model folder's grounding.json), unless it
        short = f"{float(value):g}"      # rounds: 1234567 and 1234568 are two values, not one "1.23457e+06"
        return "num:" + (short if float(short) == float(value) else repr(float(value)))
    if isinstance(value, list):
        return "list:" + "|".join(sorted(str(v).casefold() for v in value))
    return "str:" + str(value).strip().casefold()


def stated_keys(table: Mapping[str, Any], specs: Sequence[Any]) -> int:
    """How many of the schema's declared table keys the seller's table has (how complete it is)."""
    keys = {table_key(k) for k in table}
    return sum(any(table_key(r.key) in keys for r in s.evidence.table) for s in specs if getattr(s, "evidence", None))
