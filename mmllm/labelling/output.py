"""The files a labelling job writes, and the rules that keep the user's data safe.

A job writes ``--out`` (one JSON line per input row), optionally ``--errors`` (a copy of every
record that is not ``ok``) and two sidecars next to ``--out``:

- ``OUT.lock``: held with ``flock`` for the whole run, so two runs never append to one ``--out``;
  it names the holder (pid, host, start time, command) for the run that is refused. ``--out`` and
  ``--errors`` themselves are held with ``flock`` too, before a resume may cut a torn line: a hard
  link to a running job's file has a lock file of its own name, but not a file of its own. So is the
  review queue (``--review-out``, a caller's extra write), until the caller has written it.
- ``OUT.job.json``: the job's manifest - the inputs (resolved path, size, content fingerprint),
  the model, the schema / template and the shard. ``--resume`` continues only the job that wrote
  ``--out``: a changed input or model is refused, saying what changed, unless the user passes
  ``--resume-changed``.

Before anything is opened for writing, no path the job writes may be (or resolve to, through a
symlink or a hard link) an input dump or another written path. Records are written whole with one
``write`` each; a failed write (disk full, quota, a file-size limit) is cut back to the last whole
line and ends the run with :class:`WriteError`; ``--resume`` repairs a torn last line in both files
and copies into ``--errors`` any failed record it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmllm.catalog import Listing, RowError
from mmllm.file_lock import Held, hold
from mmllm.output_paths import PathClash, check_writes

MANIFEST_FORMAT = "mmllm-label-job/1"
FULL_HASH_BYTES = 1 << 30  # files up to 1 GiB are hashed whole (about a second); larger ones are sampled
SAMPLE_BLOCKS = 64
BLOCK = 1 << 20


class OutputError(Exception):
    """The job cannot start: a path clash, a held lock, a changed input. Nothing was written."""


class WriteError(Exception):
    """A write failed mid-run (disk full, ...): the run stops; ``--resume`` continues it."""


# ---------------------------------------------------------------------- paths
def sidecar_paths(out: Path) -> dict[str, Path]:
    """The lock and the job manifest of an output file, named after the file itself (links resolved): a
    symbolic link to a running job's --out finds its lock, not a lock of its own."""
    out = Path(out).resolve()
    return {"lock file": out.with_name(out.name + ".lock"), "job manifest": out.with_name(out.name + ".job.json")}


def check_paths(inputs: Sequence[Path], writes: dict[str, Path]) -> None:
    """Refuse a written path that is an input, lies inside an input folder, or is another written path."""
    try:
        check_writes(inputs, writes)
    except PathClash as exc:
        raise OutputError(str(exc)) from None


# ---------------------------------------------------------------------- fingerprints
def fingerprint(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file (sampled past 1 GiB), or of every file of a folder."""
    path = Path(path)
    if path.is_dir():
        digest, size, sampled = hashlib.sha256(), 0, False
        for part in sorted(p for p in path.rglob("*") if p.is_file()):
            info = fingerprint(part)
            digest.update(f"{part.relative_to(path)}\0{info['size']}\0{info['sha256']}\n".encode())
            size, sampled = size + info["size"], sampled or info["sampled"]
        return {"size": size, "sha256": digest.hexdigest(), "sampled": sampled}
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while chunk := f.read(BLOCK):
                digest.update(chunk)
        else:  # evenly spaced blocks, first and last included: a second, not minutes, for a huge dump
            for k in range(SAMPLE_BLOCKS):
                f.seek((size - BLOCK) * k // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(BLOCK))
    return {"size": size, "sha256": digest.hexdigest(), "sampled": size > FULL_HASH_BYTES}


def job_manifest(inputs: Sequence[Path], model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies a job: its inputs, its model and the settings that change which rows or answers."""
    model_path = Path(model)
    model_info = ({"path": str(model_path.resolve()), **fingerprint(model_path)} if model_path.exists()
                  else {"id": model})
    return {
        "format": MANIFEST_FORMAT,
        "inputs": [{"name": p.name, "path": str(p.resolve()), **fingerprint(p)} for p in inputs],
        "model": model_info,
        "settings": settings,
    }


def manifest_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the job that wrote --out and this one, in words."""
    changes = []
    old_inputs, new_inputs = old.get("inputs", []), new["inputs"]
    if [i["name"] for i in old_inputs] != [i["name"] for i in new_inputs]:
        changes.append(f"inputs were {[i['name'] for i in old_inputs]}, now {[i['name'] for i in new_inputs]}")
    for before, now in zip(old_inputs, new_inputs):
        if before.get("path") != now["path"]:
            changes.append(f"input {now['name']} is another file: was {before.get('path')}, now {now['path']}")
        elif before.get("size") != now["size"]:
            changes.append(f"input {now['name']} changed: {before.get('size'):,} bytes, now {now['size']:,}")
        elif before.get("sha256") != now["sha256"]:
            changes.append(f"input {now['name']} changed: same size, different content")
    if old.get("model") != new["model"]:
        was, now = old.get("model", {}), new["model"]
        name = now.get("path") or now.get("id")
        same_ref = (was.get("path") or was.get("id")) == name
        changes.append(f"model {name} changed since the run started" if same_ref
                       else f"model was {was.get('path') or was.get('id')}, now {name}")
    for key in sorted(set(old.get("settings", {})) | set(new["settings"])):
        if old.get("settings", {}).get(key) != new["settings"].get(key):
            changes.append(f"{key} was {old.get('settings', {}).get(key)!r}, now {new['settings'].get(key)!r}")
    return changes


# ---------------------------------------------------------------------- which rows are done
@dataclass
class DoneRows:
    """Rows already labelled in --out: by id; rows without a usable id (read errors) by file and line."""

    ids: set[str] = field(default_factory=set)
    positions: set[tuple[str, int]] = field(default_factory=set)

    def add(self, record: dict[str, Any]) -> None:
        if record.get("stage") == "read":  # its id (if any) is not trusted: a repeated id is a read error too
            self.positions.add((record.get("source"), record.get("line")))
        elif record.get("id") is not None:
            self.ids.add(record["id"])

    def __contains__(self, row: Listing | RowError) -> bool:
        if isinstance(row, Listing):
            return row.id in self.ids
        return (row.source, row.line) in self.positions

    def __len__(self) -> int:
        return len(self.ids) + len(self.positions)


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and "status" in value and "source" in value


RECORD_START = b'{"id": '  # how every record the labeller writes begins


def starts_a_record(tail: bytes) -> bool:
    """Whether a last line without its newline, that is no whole record, is the start of one cut short by a
    kill or a failed write (and so may be cut off). A user's file that merely lacks a final newline
    (``json.dump`` writes one such line) does not start so. Every row mmllm appends begins ``{"id": ``."""
    return tail.startswith(RECORD_START) or RECORD_START.startswith(tail)


def _torn_record(tail: bytes) -> bool:
    """Whether a last line without its newline is a whole record or the start of one."""
    try:
        return _is_record(json.loads(tail))
    except ValueError:
        return starts_a_record(tail)


def read_records(path: Path, name: str) -> tuple[list[dict[str, Any]], int]:
    """Whole label records of an output file, and the byte length of its whole lines.

    Refuses (before anything is cut) a file that is not a label output; a torn last line - a kill
    or a failed write - is not counted and will be cut off.
    """
    records: list[dict[str, Any]] = []
    _, whole = scan_records(path, name, records.append)
    return records, whole


def scan_records(path: Path, name: str, visit: Any) -> tuple[int, int]:
    """``visit(record)`` for each whole label record of an output file, one line at a time (a resume of a
    million-row --out keeps what it needs of each, not every record); returns how many, and the byte length
    of the whole lines. Refuses a file that is not a label output, as :func:`read_records`."""
    count, whole = 0, 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                if not _torn_record(raw):
                    raise OutputError(f"{name} {path} line {number} is not a label record: it is not an output of "
                                      "`mmllm label`; choose another path")
                break
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not _is_record(record):
                raise OutputError(f"{name} {path} line {number} is not a label record: it is not an output of "
                                  "`mmllm label`; choose another path")
            visit(record)
            count += 1
            whole += len(raw)
    return count, whole


# ---------------------------------------------------------------------- the output
class Output:
    """Append-only JSONL output (+ errors file, lock, manifest); knows which rows are done for --resume.

    ``inputs`` and ``manifest`` are optional so that callers writing to a private file (the demo)
    need no sidecars; the command line always passes both.
    """

    def __init__(self, path: Path, errors: Path | None, resume: bool, *, inputs: Sequence[Path] = (),
                 manifest: dict[str, Any] | None = None, resume_changed: bool = False,
                 extra_writes: dict[str, Path] | None = None) -> None:
        self.path, self.errors_path = Path(path), Path(errors) if errors else None
        self.done = DoneRows()
        self.notes: list[str] = []
        self.written = 0
        self._lock_fd: int | None = None
        self._out_fd: int | None = None
        self._err_fd: int | None = None
        self._extra_fds: list[int] = []
        sidecars = sidecar_paths(self.path) if manifest is not None else {}
        writes = {"--out": self.path, **({"--errors": self.errors_path} if self.errors_path else {}), **sidecars,
                  **(extra_writes or {})}  # files the caller writes itself (the review queue): checked the same way
        self._missing_errors: list[dict[str, Any]] = []
        check_paths(inputs, writes)
        self._created: list[Path] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock_path = sidecars.get("lock file")
            lock_was_there = lock_path is not None and lock_path.exists()
            if lock_path is not None:  # locked before looking at --out: a run that ends meanwhile cannot slip past
                self._lock(lock_path)
            # the files this job brings into being, known once it holds the lock (before, a run refused by the
            # lock took away the files of the run that holds it): a job refused before its first row removes them
            self._created = [f for f in (self.path, self.errors_path, sidecars.get("job manifest"),
                                         *(extra_writes or {}).values()) if f is not None and not f.exists()]
            if lock_path is not None and not lock_was_there:
                self._created.append(lock_path)
            for name, target in (("--out", self.path), ("--errors", self.errors_path)):
                if target is not None and target.exists() and target.stat().st_size and not resume:
                    raise OutputError(f"{name} {target} exists: pass --resume to continue it, or choose another path")
            # the files themselves are locked too, before a resume may cut a torn line: another run writing the
            # same file under another name (a hard link: its own lock file) holds them
            self._out_fd = self._open_locked("--out", self.path)
            if self.errors_path is not None:
                self.errors_path.parent.mkdir(parents=True, exist_ok=True)
                self._err_fd = self._open_locked("--errors", self.errors_path)
            for name, target in (extra_writes or {}).items():  # the review queue: held until the caller wrote it
                target.parent.mkdir(parents=True, exist_ok=True)
                self._extra_fds.append(self._open_locked(name, target))
            if resume:
                self._resume(manifest, sidecars.get("job manifest"), resume_changed)
            if manifest is not None:
                self._write_manifest(sidecars["job manifest"], manifest)
            for record in self._missing_errors:  # failed records a previous run wrote to --out only
                _append(self._err_fd, _line(record), self.errors_path)
        except BaseException:
            self.abandon()  # a refused job leaves nothing it made (the lock beside a user's file included)
            raise

    # ------------------------------------------------------------------ start
    def _lock(self, lock_path: Path) -> None:
        try:
            fd = hold(lock_path, os.O_RDWR | os.O_CREAT)
        except Held:
            with open(lock_path, "rb") as f:
                holder = f.read(4096).decode("utf-8", "replace").strip()
            raise OutputError(f"--out {self.path} is being written by another run ({_describe_holder(holder)}); "
                              f"wait for it to end or stop it (lock: {lock_path})") from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._lock_fd = fd

    @staticmethod
    def _open_locked(name: str, path: Path) -> int:
        try:
            return hold(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except Held:
            raise OutputError(f"{name} {path} is being written by another run (the same file, or the same file "
                              "under another name: a hard link); wait for it to end or choose another path") from None

    def _resume(self, manifest: dict[str, Any] | None, manifest_path: Path | None, resume_changed: bool) -> None:
        errors, err_whole = [], None
        if self.errors_path is not None and self.errors_path.exists():
            errors, err_whole = read_records(self.errors_path, "--errors")
        have = {_key(e) for e in errors}
        done, failed = DoneRows(), []

        def visit(record: dict[str, Any]) -> None:  # what a resume needs of each record, not the record itself
            done.add(record)
            if record["status"] != "ok" and _key(record) not in have:
                failed.append(record)  # a failure --errors lacks (a previous run wrote --out only)

        out_records, out_whole = 0, None
        if self.path.exists():
            out_records, out_whole = scan_records(self.path, "--out", visit)
        if manifest is not None and out_records:
            if manifest_path is not None and manifest_path.exists():
                try:
                    old = json.loads(manifest_path.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise OutputError(f"--resume: the job manifest {manifest_path} is damaged ({exc}); the job that "
                                      f"wrote --out {self.path} cannot be checked: choose another --out") from None
                changes = manifest_changes(old, manifest)
                if changes and not resume_changed:
                    raise OutputError(f"--resume: --out {self.path} was written by another job: " + "; ".join(changes)
                                      + ". Pass --resume-changed to continue it anyway (rows are matched by id), "
                                      "or choose another --out")
                if changes:
                    self.notes.append("resuming despite: " + "; ".join(changes))
            else:
                self.notes.append(f"{self.path} has no job manifest (written by an older mmllm): "
                                  "its inputs and model cannot be checked")
        if errors and not out_records:
            raise OutputError(f"--resume: --errors {self.errors_path} holds {len(errors)} record(s) but --out {self.path} "
                              "holds none: they belong to another run, and resuming would write its failures twice; "
                              "choose another --errors (or move that file away)")
        # the files are ours and this job's: now a torn last line may be cut
        if out_whole is not None:
            _truncate(self.path, out_whole)
        if err_whole is not None:
            _truncate(self.errors_path, err_whole)
        self.done = done
        if self.errors_path is not None:
            self._missing_errors = failed

    def _write_manifest(self, path: Path, manifest: dict[str, Any]) -> None:
        history = []
        if path.exists():
            try:
                history = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
            except ValueError:
                history = []
        document = {**manifest, "runs": [*history, {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "resumed_rows": len(self.done)}]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # a kill leaves the old manifest or the new one, never half of one

    # ------------------------------------------------------------------ run
    def is_done(self, row: Listing | RowError) -> bool:
        return row in self.done

    def write(self, record: dict[str, Any]) -> None:
        line = _line(record)
        _append(self._out_fd, line, self.path)  # --out first: a record in --errors always has its --out line
        self.written += 1
        if self._err_fd is not None and record["status"] != "ok":
            _append(self._err_fd, line, self.errors_path)

    def abandon(self) -> None:
        """Close, and remove the files this job created, when it wrote no record: a job refused after the
        output was opened (the model cannot be loaded, an option does not fit it) leaves nothing behind."""
        created = self._created if self.written == 0 else []
        self.close()
        for path in created:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        while self._extra_fds:
            os.close(self._extra_fds.pop())
        for name in ("_out_fd", "_err_fd", "_lock_fd"):  # the lock last: it guards the other two
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _line(record: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form: JSON's escapes carry it, and the line is written
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


def _append(fd: int, data: bytes, path: Path) -> None:
    """One whole line or nothing: on a failed write the file is cut back to where the line began."""
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # --resume cuts the torn line instead
        raise WriteError(f"writing {path} failed: {exc.strerror or exc}") from exc


def _truncate(path: Path, size: int) -> None:
    if path.stat().st_size != size:
        os.truncate(path, size)


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return record.get("source"), record.get("line"), record.get("id")


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a run that left no details"
