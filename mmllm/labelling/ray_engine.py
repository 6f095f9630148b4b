"""``mmllm label --engine ray``: the same labelling as a Ray Data pipeline, one model per actor.

Read tasks stream the dumps with mmllm's own reader (each takes every P-th row of the shard),
``map_batches`` runs one :class:`LabelActor` per model replica (CPUs or GPUs per actor are
options), and the driver writes every record through the same :class:`~mmllm.labelling.output.Output`
as the local engine: same format, same one-line-per-row guarantee, same ``--resume``.
Connect to a cluster with ``--ray-address``; without it a local Ray instance is started.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mmllm.catalog import Listing, RowError
from mmllm.host_memory import reuse_step_buffers
from mmllm.labelling.engine import LabelOptions, Summary, error_record, iter_rows, label_batch
from mmllm.labelling.output import DoneRows, Output
from mmllm.progress import Progress


@dataclass(frozen=True)
class RayOptions:
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None


class LabelActor:
    """One model replica; turns a batch of payloads into one record each."""

    def __init__(self, load: Any, model_args: dict[str, Any], opts: LabelOptions) -> None:
        reuse_step_buffers()  # as run_local does: each actor is a process of its own
        self.predictor = load(**model_args)
        self.opts = opts

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        records, listings = [], []
        for payload in batch["payload"]:
            item = json.loads(payload)
            if "record" in item:  # a bad row, already an error record
                records.append(item["record"])
            else:
                listings.append(Listing(**{**item["listing"], "images": tuple(item["listing"]["images"])}))
        if listings:
            records += label_batch(self.predictor, listings, self.opts)
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def _read_part(item: dict[str, Any], dumps: list[str], opts: LabelOptions, done: DoneRows) -> list[dict[str, str]]:
    out = []
    for row in iter_rows([Path(d) for d in dumps], opts, done.__contains__, part=(item["part"], item["parts"])):
        if isinstance(row, RowError):
            out.append({"payload": json.dumps({"record": error_record(row, "read", row.message)})})
        else:
            listing = {**row.to_dict(), "source": row.source, "line": row.line}
            out.append({"payload": json.dumps({"listing": listing}, ensure_ascii=False)})
    return out


def run_ray(load: Any, model_args: dict[str, Any], dumps: Sequence[Path], output: Output, opts: LabelOptions,
            ray_opts: RayOptions) -> Summary:
    """``load(**model_args)`` builds one predictor in each actor."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under the home folder
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # else the head posts usage stats to ray.io
    temp_dir = None
    if ray_opts.address is None:
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
        logical_cpus = int(ray_opts.actors * ray_opts.cpus_per_actor) + 2  # actors + the read tasks
        ray.init(num_cpus=logical_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 ignore_reinit_error=True)
    else:
        ray.init(address=ray_opts.address, ignore_reinit_error=True)
    summary = Summary(skipped=len(output.done) if opts.resume else 0)
    started = time.perf_counter()
    progress = Progress("label (ray)", enabled=not opts.quiet, log_every_s=opts.log_every_s,
                        log_every_rows=opts.log_every_rows)
    try:
        done = output.done if opts.resume else DoneRows()
        parts = max(1, ray_opts.actors)
        ds = ray.data.from_items([{"part": k, "parts": parts} for k in range(parts)], override_num_blocks=parts)
        ds = ds.flat_map(_read_part, fn_kwargs={"dumps": [str(d) for d in dumps], "opts": opts, "done": done})
        ds = ds.map_batches(
            LabelActor, fn_constructor_kwargs={"load": load, "model_args": model_args, "opts": opts}, batch_size=opts.batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ray_opts.actors),
            num_cpus=ray_opts.cpus_per_actor, num_gpus=ray_opts.gpus_per_actor,
        )
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            output.write(record)
            summary.count(record)
            progress.update(1)
    finally:
        progress.close()
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    summary.wall_s = time.perf_counter() - started
    return summary
