"""Batch JSON labelling of catalog dumps: one output line per input row, always.

    python -m mmllm.label DUMP [DUMP ...] --model MODEL_DIR_OR_ID --out labels.jsonl
        [--errors errors.jsonl] [--batch-size 8] [--resume] [--shard I/N] [--limit N]
        [--engine local|ray] [--replicas N] [--no-constrained] [--schema S.yaml --template listing_v1]
        [--review-below T | --review-target-accuracy A] [--review-out queue.jsonl]
        [--class-prior LABELLED_CATALOG | uniform]

Every input row produces exactly one line in ``--out``: the prediction (``status: ok``), an
answer that failed validation (``status: invalid``, unconstrained decoding only) or an error
record (``status: error`` with the ``stage`` - read, image, encode or model - and the reason), the
last two also in ``--errors``. Lines are written whole; ``--resume`` skips rows already written
(by id; rows without a usable id by file and line), so an interrupted run - kill -9 included -
ends with exactly one line per row. The labeller never writes to its inputs, locks ``--out`` for
the run, and resumes only the job that wrote ``--out`` (see :mod:`mmllm.labelling.output`).

A review queue: ``--review-below T`` flags every record whose category confidence is under T (or
that has none, or is invalid) with ``review: true`` and its ``review_reason``;
``--review-target-accuracy A`` takes T from the model folder's ``calibration.json``: the lowest
threshold whose kept dev rows reached accuracy A. At the end of the run the flagged records are
written, least confident first, to ``--review-out`` (default: ``--out`` with ``.jsonl`` replaced by
``.review.jsonl``), the queue the
demo's review tab steps through (:mod:`mmllm.labelling.review`).

``--class-prior``: a classifier or fusion model answers under its training rows' category shares;
labelling a catalog whose categories come in other shares, give a labelled sample of it (its gold
categories are counted) or ``uniform``, and each answer is reweighted by Bayes' rule
(:mod:`mmllm.class_prior`). After a review round has added another catalog's rows to ``data.train``,
``--class-prior OLD_TRAIN.jsonl`` labels the old catalog as its own shares say.

The work itself is :mod:`mmllm.labelling.engine` (local threads) or
:mod:`mmllm.labelling.ray_engine` (Ray Data actors); this module is the command line.

Exit codes: 0 every row labelled; 1 some rows failed (their error records are in ``--out``) or a
write failed mid-run; 2 nothing was done (bad arguments, a path clash, a held lock, a changed job).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from mmllm.catalog import CatalogError, detect_format
from mmllm.class_prior import COUNTS_KEY, ClassPrior
from mmllm.labelling.engine import MODEL_REFUSALS, LabelOptions, run_local
from mmllm import model_dir
from mmllm.confidence import CALIBRATION_FILE, Calibration
from mmllm.config import at_least
from mmllm.labelling.replicas import ReplicaError
from mmllm.labelling.output import Output, OutputError, WriteError, fingerprint, job_manifest
from mmllm.labelling.review import check_queue_path, default_queue_path, write_queue
from mmllm.model_dir import is_model_dir
from mmllm.predictor import ENCODER_PRECISIONS, OPTIONS, STATIC_COMPILE, OptionError, Predictor, configure, model_kind


# ---------------------------------------------------------------------- models
def load_predictor(model: str, *, schema: str | None = None, template: str | None = None,
                   constrained: bool | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None,
                   trust_remote_code: bool = False, grounded: bool = True, static_cache: str | None = None,
                   encoder_precision: str | None = None, class_prior: str | None = None) -> Predictor:
    """A model folder of any kind, or a base checkpoint (zero-shot), set up for labelling.

    ``None`` means "not given". Generative models decode under the schema's grammar unless
    ``constrained`` is False; an option the model does not take raises :class:`OptionError`. A
    folder's ``grounding.json`` grounds the attributes in what each listing states (with their
    evidence) unless ``grounded`` is False. ``class_prior`` (a labelled catalog or ``uniform``) moves a
    classifier's or fusion model's category answers from its training shares to those
    (:mod:`mmllm.class_prior`).
    """
    from mmllm.tiny import resolve

    if is_model_dir(model) and (schema or template):
        print("note: --schema / --template are ignored for a fine-tuned model folder: it uses its own", file=sys.stderr)
        schema = template = None
    predictor = model_dir.load(model, schema=schema, template=template, trust_remote_code=trust_remote_code,
                               resolve=resolve, grounded=grounded)
    if constrained is None and "constrained" in predictor.takes:
        constrained = True  # labelling default: every answer validates
    predictor = configure(predictor, source=model, batch_size=batch_size, constrained=constrained,
                          max_new_tokens=max_new_tokens, min_pixels=min_pixels, max_pixels=max_pixels,
                          static_cache=static_cache, encoder_precision=encoder_precision)
    if class_prior is not None:
        predictor.class_prior = _class_prior(predictor, model, class_prior)
    compile_grammar = getattr(predictor, "compile_grammar", None)  # generative models: before any row is read
    if compile_grammar is not None:
        compile_grammar()
    return predictor


def _class_prior(predictor: Predictor, model: str, spec: str) -> ClassPrior:
    """The shift from the folder's training category shares to ``spec``'s; refused for a model kind
    without a category distribution (a generative model answers one path under its grammar)."""
    if "class_prior" not in predictor.takes:
        raise OptionError(f"--class-prior: {model} is a {model_kind(predictor)} model and does not take "
                          f"{OPTIONS['class_prior']}; leave it out")
    inner = getattr(predictor, "inner", predictor).model
    correction = float(getattr(getattr(inner, "cfg", None), "prior_correction", 0.0) or 0.0)
    prior = ClassPrior.for_model(spec, inner.specs[0].classes, model_dir.read_meta(model).get(COUNTS_KEY), model,
                                 correction)
    print(f"--class-prior: the category answers follow {prior.note}", file=sys.stderr)
    return prior


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    dumps = [Path(d) for d in args.dumps]
    for dump in dumps:
        if not dump.exists():
            return _fail(f"{dump}: no such dump")
        try:
            detect_format(dump)
        except CatalogError as exc:
            return _fail(str(exc))
    names = [d.name for d in dumps]
    if len(set(names)) != len(names):
        return _fail("two dumps share a file name; records name their dump by file name")
    if args.static_compile and not args.static_cache:
        return _fail("--static-compile says how a static cache is compiled: add --static-cache")
    if args.replicas > 1 and args.engine != "local":
        return _fail("--replicas forks the local engine's model: with --engine ray give --ray-actors")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        return _fail(f"--min-pixels {args.min_pixels} is larger than --max-pixels {args.max_pixels}")
    if args.review_out and args.review_below is None and args.review_target_accuracy is None:
        return _fail("--review-out names the review queue: add --review-below T or --review-target-accuracy A")
    try:
        review_below = _review_threshold(args)
    except ValueError as exc:
        return _fail(str(exc))
    queue = (args.review_out or default_queue_path(args.out)) if review_below is not None else None
    opts = LabelOptions(batch_size=args.batch_size, workers=args.workers, limit=args.limit, shard=args.shard,
                        resume=args.resume, image_root=args.image_root.resolve() if args.image_root else None,
                        allow_remote=args.allow_remote, quiet=args.quiet,
                        roots={d.name: d.resolve().parent for d in dumps}, review_below=review_below,
                        replicas=args.replicas)
    model_args = {"model": args.model, "schema": args.schema, "template": args.template,
                  "constrained": False if args.no_constrained else None, "max_new_tokens": args.max_new_tokens,
                  "batch_size": args.batch_size, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
                  "trust_remote_code": args.trust_remote_code, "grounded": not args.ungrounded,
                  "static_cache": (args.static_compile or "cudagraphs") if args.static_cache else None,
                  "encoder_precision": args.encoder_precision, "class_prior": args.class_prior}
    try:
        if queue is not None:  # before anything is opened: a user's file there is refused, not replaced
            check_queue_path(queue, resume=args.resume)
        output = Output(args.out, args.errors, args.resume, inputs=dumps, resume_changed=args.resume_changed,
                        manifest=job_manifest(dumps, args.model, _settings(args, review_below)),
                        extra_writes={"--review-out": queue} if queue else None)
    except (OutputError, WriteError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot open the output: {exc}")
    for note in output.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        if args.engine == "ray":
            from mmllm.labelling.ray_engine import Lost, RayOptions, Refused, run_ray

            ray_opts = RayOptions(args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor, args.ray_address)
            try:
                summary = run_ray(load_predictor, model_args, dumps, output, opts, ray_opts)
            except Refused as exc:  # as the local engine: one line, exit 2, the files this run created go
                output.abandon()
                return _fail(str(exc))
            except Lost as exc:
                print(f"error: {exc}; {output.written:,} records were written this run, each whole; run the same "
                      "command with --resume to continue", file=sys.stderr)
                return 1
        else:
            try:
                predictor = load_predictor(**model_args)
            except MODEL_REFUSALS as exc:  # the model or an option: nothing labelled
                output.abandon()  # and nothing left behind: the files this run created go
                return _fail(str(exc))
            summary = run_local(predictor, dumps, output, opts)
        flagged, queue_error = None, None
        if queue is not None:
            try:
                flagged = write_queue(args.out, queue)  # under the run's lock on it
            except OutputError as exc:  # it holds another run's queue: the records are written, not the queue
                queue_error = str(exc)
    except ReplicaError as exc:
        print(f"error: {exc}; {output.written:,} records were written this run", file=sys.stderr)
        return 1
    except WriteError as exc:
        print(f"error: {exc}; {output.written:,} records were written this run. Free space (or fix the cause) and "
              "run the same command with --resume to continue", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {output.written:,} records were written this run, each whole; run the same command with "
              "--resume to continue", file=sys.stderr)
        return 130
    finally:
        output.close()
    print(summary.line())
    if queue_error is not None:
        print(f"error: {queue_error}", file=sys.stderr)
        return 2
    if queue is not None:
        print(f"review queue: {flagged:,} rows (confidence below {review_below:.6g}, or none, or an invalid answer), "
              f"least confident first: {queue}")
    return 1 if summary.failed else 0


def _review_threshold(args: argparse.Namespace) -> float | None:
    """``--review-below`` as given, or the threshold the model folder's calibration gives for
    ``--review-target-accuracy``."""
    if args.review_target_accuracy is None:
        return args.review_below
    if not is_model_dir(args.model):
        raise ValueError("--review-target-accuracy needs a fine-tuned model folder (its calibration.json); "
                         "with a base checkpoint give --review-below T")
    calibration = Calibration.load(args.model)
    if calibration is None or calibration.curve is None:
        raise ValueError(f"{args.model} has no {CALIBRATION_FILE} with a dev curve (the folder was trained without "
                         "dev rows, or before calibration existed): give --review-below T, or retrain with data.dev")
    point = calibration.threshold_for(args.review_target_accuracy)
    if point is None:
        best = max(calibration.curve.accuracy)
        raise ValueError(f"no share of the dev rows reached accuracy {args.review_target_accuracy} with {args.model} "
                         f"(best: {best:.3f}); lower the target or give --review-below T")
    print(f"--review-target-accuracy {args.review_target_accuracy}: on dev, {point.sentence()}; the rest go to review",
          file=sys.stderr)
    return point.threshold


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _settings(args: argparse.Namespace, review_below: float | None = None) -> dict[str, Any]:
    """What, besides inputs and model, decides which rows a job labels and what it answers."""
    files = {}
    for name in ("schema", "template"):
        value = getattr(args, name)
        if value and Path(value).is_file():
            files[name] = fingerprint(Path(value))["sha256"]
        elif value:
            files[name] = value
    ungrounded = {"grounded": False} if args.ungrounded else {}  # absent = grounded, as jobs before it were
    review = {"review_below": review_below} if review_below is not None else {}  # absent = no flags, as before
    lower = args.encoder_precision not in (None, "float32")
    precision = {"encoder_precision": args.encoder_precision} if lower else {}  # absent = float32, as trained
    prior = args.class_prior
    if prior and prior != "uniform" and Path(prior).is_file():
        prior = fingerprint(Path(prior))["sha256"]
    shares = {"class_prior": prior} if prior else {}  # absent = the training shares, as jobs before it
    # what the pictures and the answer budget are: absent = the defaults, as jobs before these were recorded
    inputs = {k: v for k, v in (("image_root", str(args.image_root.resolve()) if args.image_root else None),
                                ("allow_remote", True if args.allow_remote else None),
                                ("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels),
                                ("max_new_tokens", args.max_new_tokens)) if v is not None}
    return {"shard": f"{args.shard[0]}/{args.shard[1]}", "constrained": not args.no_constrained, **ungrounded,
            **review, **precision, **shares, **inputs, **files}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmllm.label", description=__doc__.split("\n\n")[0])
    p.add_argument("dumps", nargs="+", help="catalog dumps (.jsonl[.gz], .csv, .parquet, save_to_disk folder)")
    p.add_argument("--model", required=True, help="model folder from `mmllm finetune`, or a base hub id / folder (zero-shot)")
    p.add_argument("--out", type=Path, required=True, help="output JSONL: one line per input row")
    p.add_argument("--errors", type=Path, help="also write error and invalid records here")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="listings per generate call")
    p.add_argument("--workers", type=at_least(1), default=2, help="threads decoding images / tokenizing ahead of the model")
    p.add_argument("--max-new-tokens", type=at_least(1),
                   help="generation budget, default 256 (constrained decoding raises it to the longest valid answer)")
    p.add_argument("--min-pixels", type=at_least(1), help="smallest image area after resizing (default: the model's)")
    p.add_argument("--max-pixels", type=at_least(1), help="largest image area after resizing: caps image tokens")
    p.add_argument("--limit", type=at_least(1), help="label only the first N rows (of this shard)")
    p.add_argument("--resume", action="store_true", help="continue --out: skip rows already written (by id)")
    p.add_argument("--resume-changed", action="store_true",
                   help="with --resume: continue even though the inputs, model or settings differ from the run "
                        "that started --out (rows are still matched by id)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: this job labels rows I, I+N, I+2N, ... (job arrays)")
    p.add_argument("--replicas", type=at_least(1), default=1,
                   help="CPU: fork the loaded model into N processes of one thread each, labelling batches side by "
                        "side (small models on many cores: benchmarks/RESULTS.md 'Replicas'); not with CUDA")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: Ray Data actors, one model each")
    p.add_argument("--ray-actors", type=at_least(1), default=2, help="--engine ray: model replicas")
    p.add_argument("--ray-gpus-per-actor", type=at_least(0.0, float), default=0.0,
                   help="--engine ray: GPUs per replica (0 = CPU)")
    p.add_argument("--ray-cpus-per-actor", type=at_least(0.0, float), default=1.0, help="--engine ray: CPUs per replica")
    p.add_argument("--ray-address", help="--engine ray: an existing cluster (default: $RAY_ADDRESS, else a local Ray "
                                         "instance)")
    p.add_argument("--no-constrained", action="store_true", help="free decoding: invalid answers are reported, not prevented")
    p.add_argument("--static-cache", action="store_true",
                   help="generative models on a GPU: decode into a cache allocated at full length, so the decoding step "
                        "can be compiled once and replayed as a CUDA graph (--static-compile; the first batch records it: "
                        "worth it for large dumps)")
    p.add_argument("--static-compile", choices=STATIC_COMPILE,
                   help="with --static-cache, how the step is compiled: cudagraphs (default: the eager kernels recorded, "
                        "the growing cache's kernels), inductor (fused kernels of its own: faster, rounds differently, so "
                        "near ties can tip), eager (no graphs)")
    p.add_argument("--encoder-precision", choices=ENCODER_PRECISIONS,
                   help="fusion models: run the text and image encoders under bfloat16 autocast (1.3-1.5x the rows/s "
                        "on a CPU with AVX-512 BF16; answers may turn at near ties) instead of float32, as trained")
    p.add_argument("--ungrounded", action="store_true",
                   help="the model's own attribute answers: skip the folder's grounding.json (no evidence)")
    p.add_argument("--class-prior", metavar="CATALOG|uniform",
                   help="category shares to answer under (classifier and fusion models): a labelled catalog whose gold "
                        "categories are counted (e.g. the old training file after a review round added another "
                        "catalog's rows), or uniform; default: the model's training shares")
    p.add_argument("--schema", help="label schema YAML (zero-shot with a base checkpoint only)")
    p.add_argument("--template", help="prompt template (zero-shot with a base checkpoint only; default listing_v1)")
    p.add_argument("--image-root", type=Path, help="folder image paths resolve in (default: each dump's folder)")
    p.add_argument("--allow-remote", action="store_true", help="fetch http(s) image URLs (refused by default)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    review = p.add_mutually_exclusive_group()
    review.add_argument("--review-below", type=_probability, metavar="T",
                        help="flag records with category confidence below T for review (review: true)")
    review.add_argument("--review-target-accuracy", type=_probability, metavar="A",
                        help="flag for review what the model folder's dev calibration says keeps the rest at accuracy A")
    p.add_argument("--review-out", type=Path, help="the review queue (default: --out with .jsonl replaced by .review.jsonl)")
    return p


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N")
    return i, n


if __name__ == "__main__":
    from mmllm import interrupt

    interrupt.run(main)
