"""``mmllm label --engine ray``: the same labelling on Ray, one model per actor.

The driver streams the dumps with mmllm's own reader and hands batches to a pool of
:class:`LabelActor` (one model replica each, CPUs or GPUs per actor are options, two batches queued
per actor), and writes every batch's records as it comes back, through the same
:class:`~mmllm.labelling.output.Output` as the local engine: same format, same one-line-per-row
guarantee, same ``--resume``, and a run stopped at any point keeps what it wrote. (A Ray Data
pipeline with one read task per actor handed nothing back before a whole part was labelled: an
interrupt lost the run.)
Connect to a cluster with ``--ray-address`` (or Ray's own ``RAY_ADDRESS``); without either a local Ray
instance is started. The actors get the driver's absolute paths and its hub / cache settings (``HF_*``,
``TRANSFORMERS_*``, ``MMLLM_*``); on several machines the model folder, the schema and the pictures must be
on a filesystem they share. An actor that dies (the OOM killer, a lost node) is replaced and its batches
relabelled by the new one.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmllm.catalog import Listing, RowError, byte_total
from mmllm.host_memory import reuse_step_buffers
from mmllm.labelling.engine import (MODEL_REFUSALS, LabelOptions, Summary, error_record, iter_rows, label_timed,
                                   record_writer)
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
        except Exception as exc:  # anything else that keeps the model from loading: said the same way
            self.refused = f"the model did not load in a Ray actor: {type(exc).__name__}: {exc}"
        self.opts = opts

    def ready(self) -> str | None:
        """``None``, or why the model cannot label (an option that does not fit it, a missing folder)."""
        return self.refused

    def label(self, listings: list[Listing]) -> tuple[list[dict[str, Any]], float, float]:
        """The batch's records, and its seconds in the model and preparing."""
        return label_timed(self.predictor, listings, self.opts)


class Refused(ValueError):
    """The cluster or the model refused before anything was labelled (an address nothing answers at, a model the
    actors cannot load): nothing was written."""


class Lost(RuntimeError):
    """The cluster went away during the run (its actors died more often than they may be replaced): what was
    written stays, and ``--resume`` goes on."""


# the driver's settings for the hub and mmllm's cache: the actors run where the cluster started, not here
ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "MMLLM_")
PATH_ARGS = ("model", "schema", "template", "class_prior")
REPLACEMENTS_PER_ACTOR = 2  # replicas that die (the OOM killer, a lost node) are replaced 2 x actors times in all
REPLACEMENT_WAIT_S = 900  # how long a replacement may take to be placed and to load its model


def actor_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` with the driver's local paths made absolute: an actor's working folder is the one its
    cluster was started in, where a relative path would name nothing (or a hub id)."""
    out = dict(model_args)
    for key in PATH_ARGS:
        value = out.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def actor_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's settings an actor needs to load the model as the driver would (offline hub, caches)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES)}


def cluster_address(address: str | None) -> str | None:
    """``--ray-address``, else ``RAY_ADDRESS`` (Ray's own setting: with it set, ``ray.init`` connects), else
    ``None``: a local Ray instance."""
    return address or os.environ.get("RAY_ADDRESS") or None


def unreachable(address: str | None, timeout_s: float = 10.0) -> str | None:
    """Why nothing answers at a cluster's address, or ``None`` (it answers; or a local instance, ``auto`` or an
    address without a port, which are left to Ray)."""
    host, _, port = (address or "").split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_reachable(address: str) -> None:
    """Refuse at once an address nothing answers at (``ray.init`` retries one for about 14 minutes)."""
    why = unreachable(address)
    if why is not None:
        raise Refused(f"--ray-address {address}: no Ray cluster answers there ({why}); start one "
                      "(`ray start --head`) or check the address")


def run_ray(load: Any, model_args: dict[str, Any], dumps: Sequence[Path], output: Output, opts: LabelOptions,
            ray_opts: RayOptions) -> Summary:
    """``load(**model_args)`` builds one predictor in each actor. The driver reads the dumps (mmllm's
    own reader, streaming), hands each actor a batch as soon as it is free (two batches queued per
    actor, so none waits for the driver), and writes each batch's records the moment they come back:
    an interrupted run keeps every record written, and ``--resume`` continues from them, as with the
    local engine. An actor that dies is replaced and its batches go to the new one (nothing is written
    twice: only the driver writes). Raises :class:`Refused` when the cluster or the actors refuse before
    anything was labelled, :class:`Lost` when the cluster goes away during the run."""
    import ray
    from ray.exceptions import RayActorError

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray writes a token under the home folder
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # else the head posts usage stats to ray.io
    address = cluster_address(ray_opts.address)
    env = {"env_vars": actor_env(os.environ)}
    temp_dir = None
    summary = Summary(replicas=ray_opts.actors)
    started = time.perf_counter()
    progress = Progress("label (ray)", total_bytes=byte_total(dumps), enabled=not opts.quiet,
                        log_every_s=opts.log_every_s, log_every_rows=opts.log_every_rows)
    position = {"bytes": 0}
    try:
        if address is None:
            temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
            logical_cpus = max(1, int(ray_opts.actors * ray_opts.cpus_per_actor))
            ray.init(address="local", num_cpus=logical_cpus, include_dashboard=False, _temp_dir=temp_dir,
                     log_to_driver=False, ignore_reinit_error=True, runtime_env=env)
        else:
            check_reachable(address)
            try:
                ray.init(address=address, ignore_reinit_error=True, runtime_env=env)
            except ConnectionError as exc:
                raise Refused(f"--ray-address {address}: {exc}") from None
        remote = ray.remote(num_cpus=ray_opts.cpus_per_actor, num_gpus=ray_opts.gpus_per_actor)(LabelActor)
        args = actor_args(model_args)
        pool = _Pool(lambda: remote.remote(load, args, opts), ray_opts.actors, ray, RayActorError, address)
        done = output.done if opts.resume else DoneRows()

        emit = record_writer(output, summary, progress, opts, position)

        def take() -> None:
            records, model_s, prepare_s = pool.next_result()
            summary.model_s += model_s
            summary.prepare_s += prepare_s
            for record in records:
                emit(record)

        batch: list[Listing] = []
        for row in iter_rows([Path(d) for d in dumps], opts, done.__contains__, summary, position):
            if isinstance(row, RowError):
                emit(error_record(row, "read", row.message))
                continue
            batch.append(row)
            if len(batch) < opts.batch_size:
                continue
            while pool.full():  # enough queued: take what is ready first
                take()
            pool.submit(batch)
            batch = []
        if batch:
            pool.submit(batch)
        while pool.busy():
            take()
    finally:
        progress.close()
        summary.wall_s = time.perf_counter() - started
        if ray.is_initialized():
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return summary


class _Pool:
    """The actors and the batches each holds (at most two queued per actor, handed to the least loaded).
    A batch whose actor died goes to that actor's replacement; the run stops (:class:`Lost`) after
    ``REPLACEMENTS_PER_ACTOR`` x actors replacements in all, or when a replacement cannot start (the cluster
    stops answering, it is not ready in ``REPLACEMENT_WAIT_S``)."""

    def __init__(self, start: Any, actors: int, ray: Any, died: type[BaseException], address: str | None) -> None:
        self.start, self.ray, self.died, self.address = start, ray, died, address
        self.actors = [start() for _ in range(actors)]
        self.generation = [0] * actors
        self.load = [0] * actors
        self.in_flight: dict[Any, tuple[int, int, list[Listing]]] = {}  # ref -> (slot, generation, batch)
        self.replaced = 0
        try:
            refusals = [r for r in ray.get([a.ready.remote() for a in self.actors]) if r is not None]
        except died as exc:  # killed while it loaded (the OOM killer at the weights' peak): nothing was labelled
            raise Refused(f"a Ray actor died while it loaded the model ({_first_line(exc)}); if memory ran out, give "
                          "each actor more (--ray-cpus-per-actor, --ray-gpus-per-actor) or start fewer "
                          "(--ray-actors)") from None
        if refusals:
            raise Refused(refusals[0])

    def full(self) -> bool:
        return min(self.load) >= 2

    def busy(self) -> bool:
        return bool(self.in_flight)

    def submit(self, batch: list[Listing]) -> None:
        self.submit_to(min(range(len(self.actors)), key=self.load.__getitem__), batch)

    def next_result(self) -> tuple[list[dict[str, Any]], float, float]:
        """The next batch to come back (its records and timings), replacing dead actors on the way."""
        while True:
            (ref,), _ = self.ray.wait(list(self.in_flight), num_returns=1)
            slot, generation, batch = self.in_flight.pop(ref)
            self.load[slot] -= 1
            try:
                return self.ray.get(ref)
            except self.died as exc:
                if generation == self.generation[slot]:  # the first of its batches to come back: replace it
                    self._replace(slot, exc)
                self.submit_to(slot, batch)

    def submit_to(self, slot: int, batch: list[Listing]) -> None:
        self.in_flight[self.actors[slot].label.remote(batch)] = (slot, self.generation[slot], batch)
        self.load[slot] += 1

    def _replace(self, slot: int, exc: BaseException) -> None:
        reason = _first_line(exc)
        if self.replaced >= REPLACEMENTS_PER_ACTOR * len(self.actors):
            raise Lost(f"Ray actors died {self.replaced + 1} times (the last: {reason})") from None
        self.replaced += 1
        print(f"note: a Ray actor died ({reason}); its batches go to a new one "
              f"({self.replaced} of {REPLACEMENTS_PER_ACTOR * len(self.actors)} replacements)", file=sys.stderr)
        try:
            self.ray.kill(self.actors[slot])
        except Exception:  # already gone with its node
            pass
        self.actors[slot] = self.start()
        self.generation[slot] += 1
        ready, waited = self.actors[slot].ready.remote(), 0
        while not self.ray.wait([ready], timeout=5)[0]:  # loading a model may take minutes; a gone cluster, never
            waited += 5
            why = unreachable(self.address, timeout_s=5)
            if why is not None:  # (Ray ends the process itself a minute after its head goes)
                raise Lost(f"a Ray actor died ({reason}) and the cluster at {self.address} no longer answers ({why})")
            if waited >= REPLACEMENT_WAIT_S:  # never placed (the lost node held the only GPU) or never loaded
                raise Lost(f"a Ray actor died ({reason}) and its replacement was not ready in {REPLACEMENT_WAIT_S} s "
                           "(the cluster has no room for it, or loading hangs)")
            if waited == 60:
                print("note: waiting for the replacement actor: the cluster may have no room for it (CPUs, GPUs "
                      f"per actor); the run stops after {REPLACEMENT_WAIT_S} s", file=sys.stderr)
        try:
            refused = self.ray.get(ready)
        except Exception as err:  # the replacement died too
            raise Lost(f"a Ray actor died ({reason}) and its replacement did not start ({type(err).__name__})") from None
        if refused is not None:
            raise Lost(f"a Ray actor died ({reason}) and its replacement refused the model: {refused}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
