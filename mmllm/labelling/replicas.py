"""Data-parallel labelling on one CPU host: the loaded model forked into single-thread replicas.

On a CPU, a small model's forward pass is many small operations. Split across the cores (torch's
intra-op threads), each waits on its slowest thread and the cores idle between operations; N copies
of the model, one core each, each labelling whole batches, keep every core busy. ``mmllm label
--replicas N`` runs a job that way (benchmarks/RESULTS.md, "Replicas").

How it works:

* the model is loaded once, in this process, with what every batch shares and the first batch would
  otherwise build (a generative model's grammar and the cache of its prompts' shared prefix:
  ``build_shared``); then the process forks N replicas. ``fork``: the
  weights are shared copy-on-write, nothing is reloaded or pickled, a replica starts in milliseconds;
* each replica runs torch on **one** thread. After a fork, the parent's GNU OpenMP thread team cannot
  be used again: a child that asks for two threads hangs in its first parallel operation, while one
  thread never starts a team (:func:`fork_safe` below checks the setting, the test suite the hang's
  absence);
* this process reads the dumps, forms the same length-sorted batches as in-process labelling (so a
  batch is padded, and answered, exactly as there), hands each replica its next batch as it returns the last one's records, and writes
  every record: the output, its lock, the progress line and ``--resume`` stay in one process, and the
  records arrive as batches finish;
* a replica ends with its parent, ``kill -9`` included (the parent-death signal), so none outlives a killed
  job holding its files, and ``--resume`` continues it as any killed job;
* a replica that dies (killed, out of memory) has the rows of its batches in flight written as error
  records (stage ``model``, with its exit code), and the others go on; if every replica is gone the
  rest of the job stops with an error (``--resume`` continues it). Ctrl-C or a write error ends the
  replicas at once; everything already written stays.

Not for CUDA: a CUDA context does not survive a fork (run one job per GPU with ``--shard I/N``, or the
Ray engine). Each replica's rows/s is a single core's, so the gain is where the in-process job leaves
cores idle between small operations, as it does on the tiny and small models measured; for a model
whose decoding step is bound by memory bandwidth, N replicas read the weights N times per step.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable

import torch

from mmllm.catalog import Listing

Record = dict[str, Any]
AHEAD = 1  # batches in flight per replica. One: a replica reads its next batch only after sending the last one's
# records, so a second batch, larger than the pipe's buffer, would block this process while the replica blocks
# sending it records; the round trip between two batches is a few ms against ~0.5 s of labelling


class ReplicaError(RuntimeError):
    """The replicas could not start, or every one of them stopped before the job was done."""


def fork_safe() -> str | None:
    """Why this process cannot fork replicas, or ``None`` when it can."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork a process (replicas share the loaded model through fork)"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return ("CUDA is initialised in this process, and a CUDA context does not survive a fork: on GPUs run one "
                "job per GPU (--shard I/N) or --engine ray")
    return None


Labelled = tuple[list[Record], float, float]  # a batch's records, seconds in the model, seconds preparing


def _die_with(parent: int) -> None:
    """End this replica when its parent ends, even by ``kill -9`` (Linux: the parent-death signal), so that no
    replica outlives a killed job holding its files (the output's lock among them)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: the end of the pipe ends it, after its current batch
            pass
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(0)


def _serve(conn: Connection, label: Callable[[list[Listing]], Labelled], others: list[Connection], parent: int
           ) -> None:
    """A replica: one torch thread, then batches in, their records out, until the parent sends ``None``
    (or is gone). ``others``: the parent's ends of the replicas forked before this one, closed here, so that
    each replica sees the end of its pipe when the parent dies."""
    _die_with(parent)
    for other in others:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the replicas
    torch.set_num_threads(1)
    while True:
        try:
            batch = conn.recv()
        except EOFError:  # the parent is gone
            return
        if batch is None:
            return
        conn.send(label(batch))


@dataclass
class _Replica:
    process: Any
    conn: Connection
    in_flight: list[list[Listing]]


def run_replicas(predictor: Any, label: Callable[[list[Listing]], Labelled], batches: Iterable[list[Listing]],
                 emit: Callable[[Record], None], replicas: int, error_record: Callable[[Listing, str, str], Record],
                 summary: Any = None) -> None:
    """Label ``batches`` by ``label`` (one batch of ``predictor``'s: its records and timings) in ``replicas``
    forked processes; ``emit`` sees every record, in this process."""
    reason = fork_safe()
    if reason is not None:
        raise ReplicaError(f"--replicas {replicas}: {reason}")
    build_shared = getattr(predictor, "build_shared", None)  # the grammar, the prompt prefix's cache: once, shared
    if build_shared is not None:
        build_shared()
    context = multiprocessing.get_context("fork")
    pool: list[_Replica] = []
    tokenizers = os.environ.get("TOKENIZERS_PARALLELISM")
    # Hugging Face tokenizers warn in a forked child whose parent tokenized in parallel, unless this is set
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        for _ in range(replicas):
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, label, [r.conn for r in pool], os.getpid()),
                                      daemon=True)
            process.start()
            theirs.close()
            pool.append(_Replica(process, mine, []))
    finally:
        if tokenizers is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = tokenizers
    try:
        source = iter(batches)
        pending: list[Listing] | None = None  # a batch read from the source, not yet with a replica
        exhausted = False
        while True:
            for replica in pool:
                while not exhausted and len(replica.in_flight) < AHEAD and replica.process.is_alive():
                    if pending is None:
                        pending = next(source, None)
                        if pending is None:
                            exhausted = True
                            break
                    try:
                        replica.conn.send(pending)
                    except OSError:  # it has just died: its sentinel says so below
                        break
                    replica.in_flight.append(pending)
                    pending = None
            busy = [r for r in pool if r.in_flight]
            if not busy:
                if exhausted:
                    return
                raise ReplicaError(f"every one of the {replicas} replicas stopped (exit codes "
                                   f"{[r.process.exitcode for r in pool]}); the records written so far are kept: "
                                   "run the same command with --resume to continue")
            ready = wait([r.conn for r in busy] + [r.process.sentinel for r in busy])
            for replica in busy:
                if replica.conn in ready:
                    try:
                        done = replica.conn.recv()
                    except Exception:  # noqa: BLE001 - it died while sending (EOF, a torn message)
                        _lost(replica, emit, error_record)
                        continue
                    replica.in_flight.pop(0)
                    records, model_s, prepare_s = done
                    for record in records:
                        emit(record)
                    if summary is not None:
                        summary.model_s += model_s
                        summary.prepare_s += prepare_s
                elif replica.process.sentinel in ready:
                    _lost(replica, emit, error_record)
    finally:
        _stop(pool)


def _lost(replica: _Replica, emit: Callable[[Record], None], error_record: Callable[[Listing, str, str], Record]
          ) -> None:
    """A replica died: the rows it held become error records, so the job's one-record-per-row holds."""
    replica.process.join(timeout=5)
    code = replica.process.exitcode
    for batch in replica.in_flight:
        for listing in batch:
            emit(error_record(listing, "model", f"the labelling replica (pid {replica.process.pid}) stopped "
                                                f"with exit code {code} while labelling this row's batch"))
    replica.in_flight.clear()


def _stop(pool: list[_Replica]) -> None:
    """Tell every replica to finish, and end any that does not within a moment (an interrupted job)."""
    for replica in pool:
        try:
            if replica.process.is_alive() and not replica.in_flight:
                replica.conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + 2.0
    for replica in pool:
        if replica.in_flight:  # interrupted mid-batch: its answer is no longer wanted
            replica.process.terminate()
        replica.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if replica.process.is_alive():
            replica.process.kill()
            replica.process.join()
        replica.conn.close()
