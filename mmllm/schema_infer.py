"""Drafting a label schema from labelled rows (``mmllm schema infer``).

* :func:`infer_schema`: the taxonomy the rows use and one attribute spec per labelled field, typed
  from its values (boolean, integer, number, enum, string, list), numeric bounds widened to a round
  number, and a report a person reviews before using the draft.
* :func:`propose_table_keys`: which seller-table keys state which attribute, scored by how often
  their parsed text agrees with the gold, beyond chance (Cohen's kappa); the agreeing ones become
  the attribute's ``evidence.table``.
* :func:`propose_text_names`: which enum values are named in titles and agree with the gold; they
  become the attribute's ``named_in_title`` text rule.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Mapping

from mmllm.evidence import (DEFAULT_PARSER, MAX_TEXT, PARSE, EvidenceSpec, TableRule, TextRule, fold, table_key,
                            value_key, values_match)
from mmllm.schema import SEPARATOR, AttributeSpec, LabelSchema, SchemaError, category_key, clean_path, squeeze

# Value parsers tried on a seller-table key, by attribute type (mmllm.evidence.PARSE); the type's
# default comes first, so it wins a tie.
TABLE_KEY_PARSERS = {"boolean": ("boolean",), "integer": ("integer", "age"), "number": ("number", "age"),
                     "enum": ("enum",), "list": ("list",), "string": ("string",)}
# A key whose texts name an age unit ("18 months and up") is read by the age parser on a tie: a plain
# number parser takes the 18 for years. Whole-year gold agrees with both on whole-year texts.
AGE_UNIT = re.compile(r"\b(?:years?|yrs?|months?|mths?)\b", re.IGNORECASE)
# Agreement beyond chance (Cohen's kappa) a proposed key needs besides ``min_agreement``: when most
# gold booleans are false, any mostly-"No" key agrees often. On examples/amazon_uk_toys the true keys
# score 1.0 and such look-alikes ("Batteries Included" for assembly_required, 0.84 agreement) at most 0.51.
MIN_KAPPA = 0.6
MIN_KEY_ROWS = 5  # rows with both the key and a gold value before a key is judged at all


def infer_schema(
    labels: Iterable[Mapping[str, Any]],
    *,
    name: str = "inferred",
    max_enum_values: int = 50,
    rows: Iterable[Any] | None = None,
    min_rows: int = MIN_KEY_ROWS,
    min_agreement: float = 0.8,
    text_names: bool = True,
) -> tuple[LabelSchema, dict[str, Any]]:
    """Draft a schema from gold labels (``{"category", "attributes"}`` dicts).

    Categories are the ones seen. An attribute whose values are all booleans is ``boolean``,
    all integers ``integer``, all numbers ``number``; strings with at most
    ``max_enum_values`` distinct values become ``enum`` (else ``string``); lists of strings
    become ``list``. Numeric bounds are widened to a round number at least ten times the largest
    value seen (a draft's bound drops a value outside it). Returns the schema and a report (rows,
    counts per category and attribute) so a person can review the draft before using it.

    With ``rows`` (catalog rows with their seller tables and labels, read after ``labels``), each
    attribute also gets ``evidence.table``: the seller-table keys :func:`propose_table_keys` finds
    agreeing with its gold (often, and beyond chance), and the report gains ``table_keys`` (every key scored, proposed or not).
    With ``text_names`` too, each enum attribute gets a text rule ``named_in_title`` matching the values
    :func:`propose_text_names` finds named in titles and agreeing with the gold, and the report gains
    ``text_names`` (every value named in enough titles, proposed or not).
    """
    spellings: dict[str, Counter[str]] = defaultdict(Counter)  # a path's casefold -> how the rows spell it
    values: dict[str, list[Any]] = defaultdict(list)
    count = 0
    for label in labels:
        count += 1
        if isinstance(label.get("category"), str) and label["category"].strip():
            path = clean_path(label["category"])
            spellings[category_key(path)][path] += 1
        for key, value in (label.get("attributes") or {}).items():
            if value is not None:
                values[key].append(value)
    if not spellings:
        raise SchemaError("no labelled rows with a category: cannot infer a taxonomy")
    # One category per path whatever its case (a schema refuses two): the most frequent spelling names it
    categories = Counter({spelled.most_common(1)[0][0]: sum(spelled.values()) for spelled in spellings.values()})
    merged = {spelled.most_common(1)[0][0]: sorted(spelled) for spelled in spellings.values() if len(spelled) > 1}
    empty = sorted(key for key, vals in values.items() if all(isinstance(v, list) and not v for v in vals))
    specs = [_infer_attribute(key, vals, max_enum_values) for key, vals in sorted(values.items()) if key not in empty]
    proposals = names = None
    if rows is not None:
        rows = list(rows)
        proposals = propose_table_keys(rows, specs, min_rows=min_rows, min_agreement=min_agreement)
        specs = [_with_table_keys(spec, proposals) for spec in specs]
        if text_names and any(s.type == "enum" and s.values for s in specs):
            names = propose_text_names(rows, specs, min_rows=min_rows, min_agreement=min_agreement)
            specs = [_with_text_names(spec, names) for spec in specs]
    schema = LabelSchema(
        categories=tuple(sorted(categories)),
        attributes=tuple(specs),
        name=name,
        description=f"Drafted by `mmllm schema infer` from {count} labelled rows; review before use.",
    )
    report: dict[str, Any] = {
        "rows": count,
        "categories": dict(categories.most_common()),
        "attributes": {key: len(vals) for key, vals in sorted(values.items())},
    }
    if merged:
        report["merged_categories"] = merged
    if empty:
        report["empty_attributes"] = empty  # only ever an empty list: no value to learn, left out
    # paths written with another separator ("Games / Card Games" beside "Games > Board Games") stay one
    # level deep: said, since only the person who knows the catalog can say whether "/" means a level
    slashed = sorted(c for c in categories if "/" in c and SEPARATOR.strip() not in c)
    if slashed and any(SEPARATOR.strip() in c for c in categories):
        report["other_separator"] = slashed
    refused = {spec.name: r for spec in specs if (r := _refused(spec, values[spec.name])) is not None}
    if refused:  # values no one type reads (a number beside a list): the person drafting must choose
        report["refused_labels"] = refused
    if proposals is not None:
        report["table_keys"] = [p.to_dict() for p in proposals]
    if names is not None:
        report["text_names"] = [p.to_dict() for p in names]
    return schema, report


def _infer_attribute(name: str, vals: list[Any], max_enum_values: int) -> AttributeSpec:
    """One attribute's spec from its gold values. A catalog writes one attribute several ways (386 and
    "386", true and "yes", a list and a bare string): where every value reads as the type the typed ones
    have (the schema's own reading: numbers from numeric strings, yes / no, a bare string as a list of
    one), that type; a value the draft would still refuse is counted in the report (``refused_labels``)."""
    described = f"inferred from {len(vals)} values"
    typed = [v for v in vals if not isinstance(v, str)]
    boolean, number = AttributeSpec(name, "boolean"), AttributeSpec(name, "number")  # the schema's own reading
    if (any(isinstance(v, bool) for v in typed) and all(isinstance(v, bool) or v in (0, 1) for v in typed)
            and all(_reads(boolean, v) for v in vals)):  # true beside 1 and 0: one boolean, as the schema reads it
        return AttributeSpec(name, "boolean", described)
    if (typed and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in typed)
            and all(_reads(number, v) for v in vals)):
        numbers = [number.normalize(v)[0] for v in vals]
        integer = all(float(v).is_integer() for v in numbers)
        low, top = min(numbers), max(numbers)
        lo = 0 if low >= 0 else _round_up(-low) * -1  # exact: a float would round -100000000000000001 up
        # bounds well past the sample's (a 1,000-piece puzzle beyond the 500 seen is a value, not an error):
        # the schema drops a value outside them, a gold row's whole label included
        ten = 10 * float(top)  # inf past the largest float: the bound is then the value itself
        hi = _round_up(ten if math.isfinite(ten) else float(top))  # 1 where every value is 0 or less
        return AttributeSpec(name, "integer" if integer else "number", described, minimum=lo, maximum=hi)
    if typed and all(isinstance(v, list) for v in typed) and all(
            isinstance(v, str) or all(isinstance(i, str) for i in v) for v in vals):
        items = [[v] if isinstance(v, str) else v for v in vals]
        spelled = _spellings(i for v in items for i in v)
        return AttributeSpec(name, "list", described, values=tuple(sorted(spelled, key=str.casefold)),
                             max_items=max(len({squeeze(i).casefold() for i in v}) for v in items))
    strings = [squeeze(str(v)) for v in vals]
    distinct = _spellings(strings)
    if len(distinct) <= max_enum_values and len(distinct) < len(strings):
        return AttributeSpec(name, "enum", described, values=tuple(sorted(distinct, key=str.casefold)))
    return AttributeSpec(name, "string", described, max_length=max(64, _round_up(max(map(len, strings)))))


def _reads(spec: AttributeSpec, value: Any) -> bool:
    return spec.normalize(value)[1] is None


def _spellings(values: Iterable[str]) -> list[str]:
    """One spelling per value whatever its case: the most frequent (the first seen on a tie), as the
    categories' paths are named."""
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for value in values:
        text = squeeze(value)
        if text:
            seen[text.casefold()][text] += 1
    return [spelled.most_common(1)[0][0] for spelled in seen.values()]


def _refused(spec: AttributeSpec, vals: list[Any]) -> dict[str, Any] | None:
    """How many of an attribute's gold values its drafted spec refuses, and the first (None: none)."""
    refused = [v for v in vals if spec.normalize(v)[1] is not None]
    if not refused:
        return None
    kinds = Counter(type(v).__name__ for v in vals)
    return {"values": len(refused), "of": len(vals), "first": repr(refused[0])[:80], "types": dict(kinds)}


def _round_up(x: float) -> int:
    """Smallest 1, 2 or 5 times a power of ten that is >= x (at least 1)."""
    if x <= 1:
        return 1
    power = 10 ** math.floor(math.log10(x))
    for step in (1, 2, 5, 10):
        if step * power >= x:
            return int(step * power) if step * power <= sys.float_info.max else math.ceil(x)  # (a bound stays a float)
    return int(10 * power)


class _Agreement:
    """What a proposal (a table key, a value named in titles) shares: its agreement with the gold over
    ``support`` rows, beyond ``chance``; ``to_dict`` for the report."""

    support: int
    agree: int
    chance: float

    @property
    def agreement(self) -> float:
        return self.agree / self.support

    @property
    def kappa(self) -> float:
        """Agreement beyond chance (1: always agrees; 0: no better than chance, or nothing to tell apart)."""
        return _kappa(self.agreement, self.chance)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():  # the fields in order, each ratio after what it is made of
            out[name] = value
            if name == "agree":
                out["agreement"] = self.agreement
            elif name == "chance":
                out["kappa"] = self.kappa
        return out


@dataclass(frozen=True)
class TableKeyProposal(_Agreement):
    """How well one seller-table key states one attribute, over the labelled rows that have both.

    ``support``: rows where the key is present and the gold value is not null; ``agree``: those whose
    key text, read by ``parser``, equals the gold (the parser that agreed most for this key);
    ``chance``: the agreement expected if the key's values were unrelated to the gold, with the same
    frequencies (how often each value is parsed times how often it is the gold).
    """

    attribute: str
    key: str  # the seller's most frequent spelling of the key
    parser: str
    support: int
    agree: int
    chance: float
    proposed: bool


def propose_table_keys(
    rows: Iterable[Any],
    specs: Iterable[AttributeSpec],
    *,
    min_rows: int = MIN_KEY_ROWS,
    min_agreement: float = 0.8,
    min_kappa: float = MIN_KAPPA,
) -> list[TableKeyProposal]:
    """Score every seller-table key against every attribute's gold: which keys state which attribute.

    ``rows`` are catalog rows (dicts, or objects with ``.attributes`` and ``.label``). Keys compare as
    :func:`mmllm.evidence.table_key` does (case, spacing, a trailing colon). Each key's text is read
    with the parsers of the attribute's type (:data:`TABLE_KEY_PARSERS`) and compared with the gold
    by :func:`mmllm.evidence.values_match`. A key is proposed when ``support >= min_rows``,
    ``agreement >= min_agreement`` and ``kappa >= min_kappa``. Returned: every pair with
    ``support >= min_rows`` and at least one agreeing row, proposed or not (so a person sees why a key
    was left out), per attribute in ``specs`` order, proposed first, then by agreement and support.
    """
    specs, rows = list(specs), list(rows)
    # a key on fewer than min_rows labelled rows can never be judged: counted first and skipped, so a catalog
    # whose tables hold a key of their own per row (serial numbers, free notes) does not hold a counter for
    # each (attribute, key, parser): 20,000 such rows took 1.15 GB, against 53 MB without the keys
    on_rows: Counter[str] = Counter()
    for row in rows:
        table, label = _field_and_label(row, "attributes")
        if isinstance(table, Mapping) and isinstance(label, Mapping) and isinstance(label.get("attributes"), Mapping):
            on_rows.update({table_key(key) for key in table})
    judged = {norm for norm, n in on_rows.items() if n >= min_rows}
    gold_seen: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)  # (attribute, key) -> gold values
    parsed_seen: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)  # (..., parser) -> parsed values
    agree: Counter[tuple[str, str, str]] = Counter()
    spellings: dict[str, Counter[str]] = defaultdict(Counter)
    aged: set[str] = set()  # keys whose texts name an age unit
    for row in rows:
        table, label = _field_and_label(row, "attributes")
        gold = label.get("attributes") if isinstance(label, Mapping) else None
        if not isinstance(table, Mapping) or not table or not isinstance(gold, Mapping):
            continue
        keyed: dict[str, Any] = {}
        for key, text in table.items():
            norm = table_key(key)
            if norm not in judged:
                continue
            spellings[norm][str(key)] += 1
            keyed.setdefault(norm, text)
            if isinstance(text, str) and AGE_UNIT.search(text):
                aged.add(norm)
        for spec in specs:
            value, err = spec.normalize(gold.get(spec.name))
            if value is None or err is not None:
                continue
            for norm, text in keyed.items():
                gold_seen[spec.name, norm][value_key(value)] += 1
                for parser in TABLE_KEY_PARSERS[spec.type]:
                    parsed = PARSE[parser](text, spec)
                    if parsed is None:
                        continue
                    parsed_seen[spec.name, norm, parser][value_key(parsed.value)] += 1
                    agree[spec.name, norm, parser] += values_match(parsed.value, value)
    out = []
    for spec in specs:
        found = []
        for (attribute, norm), golds in gold_seen.items():
            support = sum(golds.values())
            if attribute != spec.name or support < min_rows:
                continue
            # max() keeps the first of equals: the type's default parser wins a tie, the age parser on a
            # key that names age units
            order = TABLE_KEY_PARSERS[spec.type]
            if norm in aged and "age" in order:
                order = ("age", *(p for p in order if p != "age"))
            parser = max(order, key=lambda p: agree[attribute, norm, p])
            k = agree[attribute, norm, parser]
            if k == 0:
                continue  # never states this attribute: not a candidate at all
            parsed = parsed_seen[attribute, norm, parser]
            chance = sum(n * golds[v] for v, n in parsed.items()) / support**2
            proposed = _proposed(k, support, chance, min_agreement, min_kappa)
            if not proposed and chance >= 1 and k == support and norm == table_key(attribute):
                # one value on every row, gold and key alike: chance explains any agreement, so kappa says
                # nothing; a key named as the attribute, never disagreeing, is taken ("Batteries Required")
                proposed = True
            found.append(TableKeyProposal(attribute, spellings[norm].most_common(1)[0][0], parser, support, k, chance,
                                          proposed))
        out += sorted(found, key=lambda p: (not p.proposed, -p.agreement, -p.support, p.key.casefold()))
    return out


def _kappa(agreement: float, chance: float) -> float:
    return (agreement - chance) / (1 - chance) if chance < 1 else 0.0


def _proposed(agree: int, support: int, chance: float, min_agreement: float, min_kappa: float) -> bool:
    """The rule every proposal (a table key, a value named in titles) passes: agreement with the gold
    over its rows at least ``min_agreement``, and beyond chance by at least ``min_kappa``."""
    return agree / support >= min_agreement and _kappa(agree / support, chance) >= min_kappa


NAMED_RULE = "named_in_title"


@dataclass(frozen=True)
class TextNameProposal(_Agreement):
    """How well "the title names this enum value" states the attribute, over the labelled rows.

    ``mentions``: rows whose title names the value (whole words, any case, accents and spacing); ``support``:
    those with a gold value; ``agree``: those whose gold is the value; ``chance``: the value's share of
    all gold values (the agreement if naming it were unrelated to the gold).
    """

    attribute: str
    value: str
    mentions: int
    support: int
    agree: int
    chance: float
    proposed: bool


def name_pattern(values: Iterable[str]) -> str:
    """A regular expression naming any of ``values`` as whole words (longest first, so "Hot Wheels" wins
    over a value "Hot"; any spacing between words; "Pokemon" names "Pokémon"), captured as the
    ``value`` group."""
    alternatives = [r"\s+".join("".join(_accents(ch) for ch in word) for word in v.split())
                    for v in sorted(values, key=lambda v: (-len(v), v.casefold())) if v.split()]
    return r"(?<!\w)(?P<value>" + "|".join(alternatives) + r")(?!\w)"


def _accents(ch: str) -> str:
    """One character of a value's name as a pattern: itself, or an accented letter or its bare letter."""
    bare = fold(ch)
    if not (bare and bare != ch.casefold() and bare.isascii() and len(bare) == 1):
        return re.escape(ch)
    return "[" + "".join(dict.fromkeys(ch.lower() + ch.upper() + bare)) + "]"  # the ASCII flag folds ASCII case only


def propose_text_names(
    rows: Iterable[Any],
    specs: Iterable[AttributeSpec],
    *,
    min_rows: int = MIN_KEY_ROWS,
    min_agreement: float = 0.8,
    min_kappa: float = MIN_KAPPA,
) -> list[TextNameProposal]:
    """Score every enum value named in the titles against the gold: which names state the attribute.

    A brand, a colour or a licence is often written in the title. Naming a value is evidence only where
    the catalog's gold agrees: a licence ("Star Wars") named in the title of a product the catalog files
    under its maker is not. A value is proposed when ``support >= min_rows``, ``agreement >=
    min_agreement`` and ``kappa >= min_kappa``, as :func:`propose_table_keys` judges keys. Returned:
    every value with ``support >= min_rows``, per attribute in ``specs`` order, proposed first.
    """
    specs = [s for s in specs if s.type == "enum" and s.values]
    compiled = {s.name: re.compile(name_pattern(s.values), re.IGNORECASE | re.ASCII) for s in specs}
    by_key = {s.name: {fold(v): v for v in s.values} for s in specs}
    mentions: Counter[tuple[str, str]] = Counter()
    support: Counter[tuple[str, str]] = Counter()
    agree: Counter[tuple[str, str]] = Counter()
    golds: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        title, label = _field_and_label(row, "title")
        title = title[:MAX_TEXT] if isinstance(title, str) else ""  # patterns run on bounded text
        gold_all = label.get("attributes") if isinstance(label, Mapping) else None
        if not isinstance(gold_all, Mapping):
            continue
        for spec in specs:
            gold, err = spec.normalize(gold_all.get(spec.name))
            gold = None if err is not None else gold
            if gold is not None:
                golds[spec.name][gold] += 1
            named = {by_key[spec.name].get(fold(m["value"]))
                     for m in compiled[spec.name].finditer(title)} - {None}
            for value in named:
                mentions[spec.name, value] += 1
                if gold is not None:
                    support[spec.name, value] += 1
                    agree[spec.name, value] += gold == value
    out = []
    for spec in specs:
        total = sum(golds[spec.name].values())
        found = []
        for value in spec.values:
            n = support[spec.name, value]
            if n < min_rows or total == 0:
                continue
            chance = golds[spec.name][value] / total
            k = agree[spec.name, value]
            proposed = _proposed(k, n, chance, min_agreement, min_kappa)
            found.append(TextNameProposal(spec.name, value, mentions[spec.name, value], n, k, chance, proposed))
        out += sorted(found, key=lambda p: (not p.proposed, -p.agreement, -p.support, p.value.casefold()))
    return out


def _with_text_names(spec: AttributeSpec, proposals: Iterable[TextNameProposal]) -> AttributeSpec:
    """``spec`` with a ``named_in_title`` text rule over its proposed values, or unchanged without any."""
    mine = [p.value for p in proposals if p.attribute == spec.name and p.proposed]
    evidence = spec.evidence or EvidenceSpec()
    if not mine or any(r.name == NAMED_RULE for r in evidence.text):
        return spec
    rule = TextRule(name=NAMED_RULE, pattern=re.compile(name_pattern(mine), re.IGNORECASE | re.ASCII),
                    fields=("title",))
    return replace(spec, evidence=replace(evidence, text=evidence.text + (rule,)))


def _field_and_label(row: Any, name: str) -> tuple[Any, Any]:
    """A catalog row's field ``name`` (unchecked) and its label, from a dict or a listing object."""
    if isinstance(row, Mapping):
        return row.get(name), row.get("label")
    return getattr(row, name, None), getattr(row, "label", None)


def _with_table_keys(spec: AttributeSpec, proposals: Iterable[TableKeyProposal]) -> AttributeSpec:
    """``spec`` with ``evidence.table`` listing its proposed keys (best first), or unchanged without any.

    The best key's parser becomes the attribute's ``parse`` when it is not the type's default; a key
    read best by another parser carries its own ``parse``.
    """
    mine = [p for p in proposals if p.attribute == spec.name and p.proposed]
    if not mine:
        return spec
    if spec.type == "integer" and mine[0].parser == "age":  # "18 months and up" is 1.5 years: not a whole number
        spec = replace(spec, type="number")
    default = DEFAULT_PARSER[spec.type]
    parse = mine[0].parser if mine[0].parser != default else None
    table = tuple(TableRule(key=p.key, parse=None if p.parser == (parse or default) else p.parser) for p in mine)
    return replace(spec, evidence=EvidenceSpec(parse=parse, table=table))
