"""Standard product taxonomies read as label schemas (``mmllm schema import``), and written back.

Two published text formats, one category per line, every node listed (a path's parents come before it):

* Shopify Product Taxonomy (``categories.txt``)::

      gid://shopify/TaxonomyCategory/tg : Toys & Games
      gid://shopify/TaxonomyCategory/tg-5 : Toys & Games > Toys
      gid://shopify/TaxonomyCategory/tg-5-4 : Toys & Games > Toys > Building Toys

* Google Product Taxonomy (``taxonomy-with-ids.en-US.txt``)::

      # Google_Product_Taxonomy_Version: 2021-09-21
      1239 - Toys & Games
      1253 - Toys & Games > Toys
      3287 - Toys & Games > Toys > Building Toys

:func:`read_taxonomy` parses either (lines starting with ``#`` and blank lines are skipped; any other line
that does not parse is an error naming the file and line). :func:`taxonomy_schema` cuts the tree at
``depth`` levels, optionally to the subtree ``under`` a path, and makes a :class:`~mmllm.schema.LabelSchema`
whose categories are the leaves of the cut tree and whose ``category_ids`` keep every kept node's id, so a
prediction can carry the id a shop's systems use (``category_id`` in each labels record).
:func:`write_taxonomy` writes a schema's nodes back in either format: import then export gives the input
lines back (comments aside).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from mmllm.schema import SEPARATOR, AttributeSpec, LabelSchema, SchemaError, clean_path, squeeze

Format = Literal["shopify", "google"]
FORMATS: tuple[str, ...] = ("shopify", "google")
_SHOPIFY = re.compile(r"^(gid://shopify/TaxonomyCategory/[A-Za-z0-9_-]+)\s+:\s+(\S.*)$")
_GOOGLE = re.compile(r"^(\d+)\s+-\s+(\S.*)$")


@dataclass(frozen=True)
class Node:
    """One taxonomy line: the category's id and its full path."""

    id: str
    path: str

    @property
    def depth(self) -> int:
        return len(self.path.split(SEPARATOR))


def detect_format(text: str, where: str = "taxonomy") -> Format:
    """The format of the first non-comment line."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _SHOPIFY.match(line):
            return "shopify"
        if _GOOGLE.match(line):
            return "google"
        raise SchemaError(f"{where}: the first entry {line[:80]!r} is neither Shopify ('gid://shopify/TaxonomyCategory/"
                          "ID : A > B') nor Google ('ID - A > B') taxonomy format")
    raise SchemaError(f"{where}: no taxonomy lines (only comments or blank lines)")


def read_taxonomy(path: str | Path, fmt: Format | None = None) -> tuple[Format, list[Node]]:
    """The nodes of a taxonomy file in file order; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read the taxonomy: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: the taxonomy is not UTF-8 text") from None
    fmt = fmt or detect_format(text, str(path))
    if fmt not in FORMATS:
        raise SchemaError(f"unknown taxonomy format {fmt!r}; known: {', '.join(FORMATS)}")
    pattern = _SHOPIFY if fmt == "shopify" else _GOOGLE
    nodes: list[Node] = []
    ids: dict[str, int] = {}
    paths: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = pattern.match(line)
        if match is None:
            raise SchemaError(f"{path} line {number}: {line[:80]!r} is not a {fmt} taxonomy line "
                              f"({'gid://shopify/TaxonomyCategory/ID : A > B' if fmt == 'shopify' else 'ID - A > B'})")
        node_id = match.group(1)
        if SEPARATOR in match.group(2) and re.search(r"\S>|>\S", match.group(2)):
            # mmllm reads every ">" of a category path as a level ("A>B" is "A > B"): a name holding one
            # would gain a level the file never had, and export would not give the line back
            raise SchemaError(f"{path} line {number}: a name in {match.group(2)!r} holds '>', which a category path reads "
                              "as a level; write it otherwise (e.g. '3-5' or '3 to 5') and import again")
        parts = [squeeze(p) for p in match.group(2).split(">")]  # spacing as the schema compares it
        if not all(parts):
            raise SchemaError(f"{path} line {number}: the path {match.group(2)!r} has an empty level")
        node = Node(node_id, SEPARATOR.join(parts))
        if node.id in ids:
            raise SchemaError(f"{path} line {number}: id {node.id} is already used on line {ids[node.id]}")
        if node.path.casefold() in paths:
            raise SchemaError(f"{path} line {number}: {node.path!r} is already listed on line {paths[node.path.casefold()]}")
        ids[node.id], paths[node.path.casefold()] = number, number
        nodes.append(node)
    if not nodes:
        raise SchemaError(f"{path}: no taxonomy lines (only comments or blank lines)")
    return fmt, nodes


def cut(nodes: list[Node], depth: int | None = None, under: str | None = None) -> list[Node]:
    """The nodes at most ``depth`` levels deep (None: all), inside the subtree ``under`` (its own node
    included) when given. A path cut at ``depth`` whose node is not listed keeps the first id found under it."""
    if depth is not None and depth < 1:
        raise SchemaError(f"--depth must be >= 1, got {depth}")
    kept: dict[str, Node] = {}
    prefix = clean_path(under) if under else None  # spaced as the paths are
    for node in nodes:
        if prefix is not None and not (node.path.casefold() == prefix.casefold()
                                       or node.path.casefold().startswith(prefix.casefold() + SEPARATOR.casefold())):
            continue
        path = SEPARATOR.join(node.path.split(SEPARATOR)[:depth]) if depth else node.path
        if path == node.path:
            kept[path] = node
        else:
            kept.setdefault(path, Node(node.id, path))
    if not kept:
        raise SchemaError(f"no category under {under!r} in the taxonomy" if under else "the taxonomy is empty")
    return [n for n in kept.values()]


def leaves(nodes: list[Node]) -> list[str]:
    """The paths that are no other kept path's parent: the categories a listing is labelled with."""
    parents = set()
    for node in nodes:
        parts = node.path.split(SEPARATOR)
        parents.update(SEPARATOR.join(parts[:i]) for i in range(1, len(parts)))
    return [n.path for n in nodes if n.path not in parents]


def taxonomy_schema(nodes: list[Node], *, name: str, fmt: Format, source: str = "",
                    depth: int | None = None, under: str | None = None,
                    attributes: Mapping[str, Any] | None = None) -> LabelSchema:
    """A label schema from taxonomy nodes: the leaves of the cut tree as categories, every kept node's id in
    ``category_ids``, and ``attributes`` (a schema's ``attributes`` mapping) when given."""
    kept = cut(nodes, depth, under)
    specs: tuple[AttributeSpec, ...] = ()
    if attributes:
        specs = LabelSchema.from_dict({"taxonomy": ["x"], "attributes": dict(attributes)}).attributes
    described = f"Imported from the {fmt} taxonomy {source}".rstrip()
    if depth:
        described += f", cut at depth {depth}"
    if under:
        described += f", under {under!r}"
    return LabelSchema(categories=tuple(leaves(kept)), attributes=specs, name=name,
                       description=described + f" ({len(kept)} nodes).",
                       category_ids={n.path: n.id for n in kept}, taxonomy_format=fmt)


def write_taxonomy(schema: LabelSchema, fmt: Format | None = None) -> str:
    """The schema's nodes (``category_ids``, in order) as taxonomy lines in ``fmt`` (default: the format
    it was imported from)."""
    fmt = fmt or schema.taxonomy_format
    if fmt not in FORMATS:
        raise SchemaError(f"schema '{schema.name}': give the taxonomy format to write ({', '.join(FORMATS)})")
    if not schema.category_ids:
        raise SchemaError(f"schema '{schema.name}' has no category ids: import it from a taxonomy file first")
    wrong = [i for i in schema.category_ids.values() if (fmt == "google") != bool(re.fullmatch(r"\d+", i))]
    if wrong:
        raise SchemaError(f"schema '{schema.name}': id {wrong[0]!r} cannot be written in the {fmt} format")
    separator = " : " if fmt == "shopify" else " - "
    return "".join(f"{node_id}{separator}{path}\n" for path, node_id in schema.category_ids.items())
