"""The ``mmllm`` command: one verb per job, each a thin layer over a module.

    mmllm catalog validate|stats FILE     check / describe a catalog dump
    mmllm schema infer|import|export|check|json-schema   draft, import (Shopify / Google taxonomy), check or export a schema
    mmllm tiny OUT --arch ...             tiny random checkpoint (tests and smoke runs only)
    mmllm finetune|label|evaluate|search|demo ...   the jobs (also `python -m mmllm.<job>`)

Only this layer turns paths and hub ids into objects (ARCHITECTURE.md: entry points). A catalog or schema
that cannot be used at all is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from mmllm import __version__
from mmllm.catalog import CatalogError
from mmllm.schema import SchemaError

# verb -> (module with main(argv), one-line help). Jobs take their own arguments.
JOBS = {
    "finetune": ("mmllm.finetune", "LoRA / QLoRA fine-tuning of a vision-language model (or a head)"),
    "label": ("mmllm.label", "batch JSON labelling of catalog dumps"),
    "evaluate": ("mmllm.evaluate", "metrics and a report with plots for predictions"),
    "search": ("mmllm.search", "similar-product search and its Recall@K / NDCG"),
    "demo": ("mmllm.demo", "the Gradio demo"),
    "tiny": ("mmllm.tiny", "tiny random checkpoint for tests and smoke runs (never for predictions)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"mmllm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    from mmllm import validate

    catalog = verbs.add_parser("catalog", help="check or describe a catalog dump").add_subparsers(dest="action", metavar="ACTION", required=True)
    p = catalog.add_parser("validate", help="check every row and open every image; exit 1 if any row is bad")
    validate.add_arguments(p, images=True)
    p.set_defaults(run=validate.run_validate)
    p = catalog.add_parser("stats", help="rows, valid/invalid, images, label coverage, categories, attributes")
    validate.add_arguments(p, images=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=validate.run_stats)

    schema = verbs.add_parser("schema", help="label schema tools").add_subparsers(dest="action", metavar="ACTION", required=True)
    p = schema.add_parser("infer", help="draft a schema from labelled rows")
    p.add_argument("catalog", type=Path, help="labelled catalog (rows with 'label')")
    p.add_argument("-o", "--out", type=Path, help="write the YAML here (default: print it)")
    p.add_argument("--name", default="inferred", help="schema name")
    p.add_argument("--max-enum-values", type=int, default=50, help="strings with at most this many distinct values become an enum")
    p.add_argument("--no-table-keys", action="store_true",
                   help="do not propose seller-table keys (evidence.table) from the rows' attribute tables")
    p.add_argument("--no-text-names", action="store_true",
                   help="do not propose the enum values named in titles (evidence.text: named_in_title)")
    p.add_argument("--min-agreement", type=_fraction, default=0.8,
                   help="share of rows (0-1) where a seller-table key's value, or an enum value named in the title, "
                        "must equal the gold for it to be proposed")
    p.set_defaults(run=_schema_infer)
    p = schema.add_parser("import", help="a label schema from a Shopify or Google product taxonomy file")
    p.add_argument("taxonomy", type=Path, help="taxonomy text file: 'gid://shopify/TaxonomyCategory/ID : A > B' "
                                               "or 'ID - A > B' lines")
    p.add_argument("-o", "--out", type=Path, required=True, help="write the schema YAML here (never overwritten)")
    p.add_argument("--format", choices=["shopify", "google"], help="the file's format (default: detected)")
    p.add_argument("--depth", type=int, help="cut the tree at this many levels (categories: the leaves of the cut tree)")
    p.add_argument("--under", metavar="PATH", help="keep only the subtree under this path (e.g. 'Toys & Games')")
    p.add_argument("--attributes", type=Path, help="YAML with an 'attributes' mapping (as in a schema) to add")
    p.add_argument("--name", help="schema name (default: the file's name)")
    p.set_defaults(run=_schema_import)
    p = schema.add_parser("export", help="write an imported schema's taxonomy back as Shopify or Google lines")
    p.add_argument("schema", type=Path)
    p.add_argument("--format", choices=["shopify", "google"], help="default: the format it was imported from")
    p.set_defaults(run=_schema_export)
    p = schema.add_parser("check", help="load a schema and summarize it")
    p.add_argument("schema", type=Path)
    p.set_defaults(run=_schema_check)
    p = schema.add_parser("json-schema", help="print the JSON Schema of a model answer")
    p.add_argument("schema", type=Path)
    p.set_defaults(run=_schema_json)

    for verb, (_, help_text) in JOBS.items():
        verbs.add_parser(verb, help=help_text, add_help=False)
    return parser


def command() -> None:
    """The ``mmllm`` console script: :func:`main` with the Ctrl-C policy of :mod:`mmllm.interrupt`."""
    from mmllm.interrupt import run

    run(main)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in JOBS:
        return _run_job(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (CatalogError, SchemaError) as exc:
        return _fail(exc)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _run_job(verb: str, argv: list[str]) -> int:
    module_name, _ = JOBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"mmllm {verb}: this job is not part of this version of mmllm yet ({module_name})", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.main(argv) or 0)
    except SchemaError as exc:  # a model folder's schema, for jobs that do not catch it themselves
        return _fail(exc)


def _schema_infer(args: argparse.Namespace) -> int:
    from mmllm.catalog import CatalogReader, RowError
    from mmllm.schema_infer import infer_schema

    if args.out is not None:
        problem = _new_file_problem(args.out, [args.catalog], "a schema file is never overwritten")
        if problem:
            return _fail(problem)
    bad: list[RowError] = []

    def labelled() -> Any:
        for row in CatalogReader(args.catalog):
            if isinstance(row, RowError):
                bad.append(row)
            elif row.label:
                yield row

    listings = labelled()
    if args.no_table_keys:
        schema, report = infer_schema((row.label for row in listings), name=args.name,
                                      max_enum_values=args.max_enum_values)
    else:
        # The keys and names are scored against the attribute types drafted from all labels: keep the seller
        # tables, titles and labels (not descriptions) for a second look.
        rows = [{"attributes": row.attributes, "title": row.title, "label": row.label} for row in listings]
        schema, report = infer_schema([row["label"] for row in rows], name=args.name,
                                      max_enum_values=args.max_enum_values, rows=rows, min_agreement=args.min_agreement,
                                      text_names=not args.no_text_names)
    for kept, spelled in report.get("merged_categories", {}).items():
        print(f"note: categories spelled {' / '.join(repr(x) for x in spelled)} are one category: {kept!r}", file=sys.stderr)
    if report.get("other_separator"):
        shown = ", ".join(repr(c) for c in report["other_separator"][:3])
        print(f"note: {len(report['other_separator'])} categories hold '/' but no '>' ({shown}), beside paths written with "
              "'>': each is one level here; if '/' separates levels, write them with ' > ' and draft again", file=sys.stderr)
    for attribute, refused in report.get("refused_labels", {}).items():
        kinds = ", ".join(f"{n} {kind}" for kind, n in refused["types"].items())
        print(f"warning: {attribute}: the draft refuses {refused['values']} of its {refused['of']} gold values (written as "
              f"{kinds}; first {refused['first']}): give it one type in the labels, or edit its spec", file=sys.stderr)
    if report.get("empty_attributes"):
        print(f"note: left out {', '.join(report['empty_attributes'])}: every label gives an empty list", file=sys.stderr)
    if bad:  # left out of the draft, and said so: the schema must not lose categories without a word
        for row in bad[:5]:
            print(f"BAD  {row}; left out", file=sys.stderr)
        more = f" ({len(bad) - 5:,} more not shown; `mmllm catalog validate` lists them all)" if len(bad) > 5 else ""
        print(f"{len(bad):,} bad row(s) left out of the draft{more}", file=sys.stderr)
    header = (
        f"# Drafted by `mmllm schema infer {args.catalog}` from {report['rows']} labelled rows.\n"
        "# Review it: merge near-duplicate categories, write descriptions, check the bounds (ten times the largest value seen: a value outside them is dropped).\n"
    )
    if "table_keys" in report:
        header += ("# evidence.table: seller-table keys whose values agreed with the gold labels; check each one,\n"
                   "# and add text patterns (see mmllm/evidence.py).\n")
    if report.get("text_names"):
        header += ("# evidence.text named_in_title: the enum values whose names in titles agreed with the gold labels.\n")
    if args.out:
        schema.to_yaml(args.out, header=header)
        print(f"wrote {args.out}: {len(schema.categories)} categories, {len(schema.attributes)} attributes from {report['rows']} rows")
    else:
        import yaml

        print(header + yaml.safe_dump(schema.to_dict(), sort_keys=False, allow_unicode=True))
    if "table_keys" in report:
        # Next to the summary line; on stderr when the YAML itself goes to stdout, so it can be redirected
        print("\n".join(_table_keys_lines(report["table_keys"], args.min_agreement)),
              file=sys.stdout if args.out else sys.stderr)
    if "text_names" in report:
        print("\n".join(_text_names_lines(report["text_names"], args.min_agreement)),
              file=sys.stdout if args.out else sys.stderr)
    return 0


def _table_keys_lines(proposals: list[dict], min_agreement: float) -> list[str]:
    return _proposal_lines(proposals, "seller-table keys (proposed: {rule} over >= {rows} rows):",
                           "none agreed with the gold labels on enough rows", "key", ("parser", "parser", "<8"),
                           min_agreement)


def _text_names_lines(proposals: list[dict], min_agreement: float) -> list[str]:
    return _proposal_lines(proposals, "enum values named in titles (proposed: {rule} over >= {rows} rows with a gold "
                                      "value):", "no enum value named in enough titles", "value",
                           ("titles", "mentions", ">6"), min_agreement)


def _proposal_lines(proposals: list[dict], title: str, empty: str, name: str, extra: tuple[str, str, str],
                    min_agreement: float) -> list[str]:
    """The table ``schema infer`` prints for its proposals: what is proposed (``name``: the key or the
    value, ``extra``: one more column as header, report field, alignment), its agreement and kappa."""
    from mmllm.schema_infer import MIN_KAPPA, MIN_KEY_ROWS

    lines = [title.format(rule=f"agreement >= {min_agreement:.0%} and kappa >= {MIN_KAPPA}", rows=MIN_KEY_ROWS)]
    if not proposals:
        return lines + [f"  {empty}"]
    width = max(len(p[name]) for p in proposals)
    header, field, align = extra
    lines.append(f"  {'attribute':<22} {name:<{width}} {header:{align}} {'agree':>11} {'agreement':>9} {'chance':>6} "
                 f"{'kappa':>6}  proposed")
    for p in proposals:
        agree = f"{p['agree']}/{p['support']}"
        lines.append(f"  {p['attribute']:<22} {p[name]:<{width}} {p[field]:{align}} {agree:>11} {p['agreement']:>9.0%} "
                     f"{p['chance']:>6.0%} {p['kappa']:>6.2f}  {'yes' if p['proposed'] else 'no'}")
    return lines


def _new_file_problem(out: Path, inputs: list[Path | None], why: str) -> str | None:
    """Why ``out`` cannot be written as a new file (it exists, is an input, or its folder is missing), or None."""
    from mmllm.output_paths import PathClash, check_writes

    try:
        check_writes(inputs, {"--out": out})
    except PathClash as exc:
        return str(exc)
    if out.exists():
        return f"{out} exists; choose another --out ({why})"
    if not out.parent.is_dir():
        return f"--out {out}: the folder {out.parent} does not exist"
    return None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _schema_check(args: argparse.Namespace) -> int:
    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_yaml(args.schema)
    tops = sorted({c.split(" > ")[0] for c in schema.categories})
    print(f"{args.schema}: schema '{schema.name}' v{schema.version}: {len(schema.categories)} categories under {len(tops)} top-level nodes")
    for a in schema.attributes:
        extra = f" {list(a.values)}" if a.values else ""
        print(f"  {a.name:<22} {a.type:<8} {a.description}{extra}")
    return 0


def _schema_import(args: argparse.Namespace) -> int:
    import yaml

    from mmllm.taxonomies import read_taxonomy, taxonomy_schema

    problem = _new_file_problem(args.out, [args.taxonomy, args.attributes], "a schema file is never overwritten")
    if problem:
        return _fail(problem)
    fmt, nodes = read_taxonomy(args.taxonomy, args.format)
    attributes = None
    if args.attributes:
        try:
            data = yaml.safe_load(args.attributes.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            return _fail(f"{args.attributes}: cannot read the attributes: {exc}")
        if not isinstance(data, dict) or not isinstance(data.get("attributes"), dict):
            return _fail(f"{args.attributes}: expected a mapping with an 'attributes' mapping (as in a label schema)")
        try:
            attributes = data["attributes"]
            taxonomy_schema(nodes[:1], name="check", fmt=fmt, attributes=attributes)
        except SchemaError as exc:
            return _fail(f"{args.attributes}: {exc}")
    schema = taxonomy_schema(nodes, name=args.name or args.taxonomy.stem, fmt=fmt, source=args.taxonomy.name,
                             depth=args.depth, under=args.under, attributes=attributes)
    header = (f"# Imported by `mmllm schema import {args.taxonomy}` ({fmt} format"
              + (f", --depth {args.depth}" if args.depth else "") + (f", --under {args.under!r}" if args.under else "")
              + ").\n# category_ids: the taxonomy's id of every kept node; labels records carry it as category_id.\n")
    schema.to_yaml(args.out, header=header)
    print(f"wrote {args.out}: {len(schema.categories)} categories ({len(schema.category_ids)} nodes with ids), "
          f"{len(schema.attributes)} attributes, from {len(nodes)} {fmt} taxonomy lines")
    return 0


def _schema_export(args: argparse.Namespace) -> int:
    from mmllm.schema import LabelSchema
    from mmllm.taxonomies import write_taxonomy

    sys.stdout.write(write_taxonomy(LabelSchema.from_yaml(args.schema), args.format))
    return 0


def _schema_json(args: argparse.Namespace) -> int:
    from mmllm.schema import LabelSchema

    print(json.dumps(LabelSchema.from_yaml(args.schema).json_schema(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    from mmllm import interrupt

    interrupt.run(main)
