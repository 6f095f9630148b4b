"""The ``mmllm`` command: one verb per job, each a thin layer over a module.

    mmllm catalog validate|stats FILE     check / describe a catalog dump
    mmllm schema infer|check|json-schema  draft, check or export a label schema
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
    p.set_defaults(run=_schema_infer)
    p = schema.add_parser("check", help="load a schema and summarize it")
    p.add_argument("schema", type=Path)
    p.set_defaults(run=_schema_check)
    p = schema.add_parser("json-schema", help="print the JSON Schema of a model answer")
    p.add_argument("schema", type=Path)
    p.set_defaults(run=_schema_json)

    for verb, (_, help_text) in JOBS.items():
        verbs.add_parser(verb, help=help_text, add_help=False)
    return parser


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
    from mmllm.catalog import CatalogReader, Listing
    from mmllm.schema import infer_schema

    labels = (row.label for row in CatalogReader(args.catalog) if isinstance(row, Listing) and row.label)
    schema, report = infer_schema(labels, name=args.name, max_enum_values=args.max_enum_values)
    header = (
        f"# Drafted by `mmllm schema infer {args.catalog}` from {report['rows']} labelled rows.\n"
        "# Review it: merge near-duplicate categories, write descriptions, tighten bounds.\n"
    )
    if args.out:
        schema.to_yaml(args.out, header=header)
        print(f"wrote {args.out}: {len(schema.categories)} categories, {len(schema.attributes)} attributes from {report['rows']} rows")
    else:
        import yaml

        print(header + yaml.safe_dump(schema.to_dict(), sort_keys=False, allow_unicode=True))
    return 0


def _schema_check(args: argparse.Namespace) -> int:
    from mmllm.schema import LabelSchema

    schema = LabelSchema.from_yaml(args.schema)
    tops = sorted({c.split(" > ")[0] for c in schema.categories})
    print(f"{args.schema}: schema '{schema.name}' v{schema.version}: {len(schema.categories)} categories under {len(tops)} top-level nodes")
    for a in schema.attributes:
        extra = f" {list(a.values)}" if a.values else ""
        print(f"  {a.name:<22} {a.type:<8} {a.description}{extra}")
    return 0


def _schema_json(args: argparse.Namespace) -> int:
    from mmllm.schema import LabelSchema

    print(json.dumps(LabelSchema.from_yaml(args.schema).json_schema(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
