"""``mmllm label --engine ray``: the same labelling on Ray, one model per actor.

The driver streams the dumps with mmllm's own reader and hands batches to a pool of
:class:`LabelActor` (one model replica each, CPUs or GPUs per actor are options, two batches queued
per actor), and writes every batch's records as it comes back, through the same
:class:`~mmllm.labelling.output.Output` as the local engine: same format, same one-line-per-row
guarantee, same ``--resume``, and a run stopped at any point keeps what it wrote. (A Ray Data
pipeline with one read task per actor handed nothing back before a whole part was labelled: an
interrupt lost the run.)
Connect to a cluster with ``--ray-address``; without it a local Ray instance is started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mmllm.catalog import Listing, RowError
from mmllm.host_memory import reuse_step_buffers
from mmllm.labelling.engine import MODEL_REFUSALS, LabelOptions, Summary, error_record, iter_rows, label_batch
from mmllm.labelling.output import DoneRows, Output
from mmllm.progress import Progress


@dataclass(frozen=True)
class RayOptions:
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None


class LabelActor:
    """One model replica (a Ray actor); turns a batch of listings into one record each."""

    def __init__(self, load: Any, model_args: dict[str, Any], opts: LabelOptions) -> None:
        reuse_step_buffers()  # as run_local does: each actor is a process of its own
        self.predictor, self.refused = None, None
        try:
            self.predictor = load(**model_args)
        except MODEL_REFUSALS as exc:  # the model or an option: said once by the driver, not as an actor's death
            self.refused = str(exc)
        self.opts = opts

    def ready(self) -> str | None:
        """``None``, or why the model cannot label (an option that does not fit it, a missing folder)."""
        return self.refused

    def label(self, listings: list[Listing]) -> list[dict[str, Any]]:
        return label_batch(self.predictor, listings, self.opts)


class Refused(ValueError):
    """The model or an option refused in the actors: nothing was labelled."""


def run_ray(load: Any, model_args: dict[str, Any], dumps: Sequence[Path], output: Output, opts: LabelOptions,
            ray_opts: RayOptions) -> Summary:
    """``load(**model_args)`` builds one predictor in each actor. The driver reads the dumps (mmllm's
    own reader, streaming), hands each actor a batch as soon as it is free (two batches queued per
    actor, so none waits for the driver), and writes each batch's records the moment they come back:
    an interrupted run keeps every record written, and ``--resume`` continues from them, as with the
    local engine. Raises :class:`Refused` when the actors cannot load the model."""
    import ray
    from ray.util import ActorPool

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under the home folder
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # else the head posts usage stats to ray.io
    temp_dir = None
    if ray_opts.address is None:
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
        logical_cpus = max(1, int(ray_opts.actors * ray_opts.cpus_per_actor))
        ray.init(num_cpus=logical_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 ignore_reinit_error=True)
    else:
        ray.init(address=ray_opts.address, ignore_reinit_error=True)
    summary = Summary()
    started = time.perf_counter()
    progress = Progress("label (ray)", enabled=not opts.quiet, log_every_s=opts.log_every_s,
                        log_every_rows=opts.log_every_rows)
    try:
        remote = ray.remote(num_cpus=ray_opts.cpus_per_actor, num_gpus=ray_opts.gpus_per_actor)(LabelActor)
        actors = [remote.remote(load, model_args, opts) for _ in range(ray_opts.actors)]
        refusals = [r for r in ray.get([a.ready.remote() for a in actors]) if r is not None]
        if refusals:
            raise Refused(refusals[0])
        pool, in_flight = ActorPool(actors), 0
        label = lambda actor, rows: actor.label.remote(rows)  # noqa: E731  (ActorPool's (actor, value) -> ref)
        done = output.done if opts.resume else DoneRows()

        def write(records: list[dict[str, Any]]) -> None:
            for record in records:
                output.write(record)
                summary.count(record)
            progress.update(len(records))

        batch: list[Listing] = []
        for row in iter_rows([Path(d) for d in dumps], opts, done.__contains__, summary):
            if isinstance(row, RowError):
                write([error_record(row, "read", row.message)])
                continue
            batch.append(row)
            if len(batch) < opts.batch_size:
                continue
            while in_flight >= 2 * len(actors):  # enough queued: take what is ready first
                write(pool.get_next_unordered())
                in_flight -= 1
            pool.submit(label, batch)
            batch, in_flight = [], in_flight + 1
        if batch:
            pool.submit(label, batch)
            in_flight += 1
        while in_flight:
            write(pool.get_next_unordered())
            in_flight -= 1
    finally:
        progress.close()
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    summary.wall_s = time.perf_counter() - started
    return summary
