"""The paths a command writes never reach what the user gave it.

Every command that writes (``mmllm label``, ``catalog validate --errors-out``, ``schema infer -o``,
``search index --out``, ``evaluate --report``) checks its paths here before it opens anything: a written
file may not be an input, reach one through a symlink or a hard link, or lie inside an input folder (a
model folder), and two written paths may not be one file. A command that writes a folder of files of
fixed names (a report, an index) checks each of those files. A refusal is a :class:`PathClash`, whose
message names the flag and both paths; nothing has been written when it is raised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class PathClash(ValueError):
    """A path a command would write is one it reads (or another it writes): nothing was written."""


def check_writes(inputs: Sequence[Path | None], writes: dict[str, Path]) -> None:
    """Refuse a written file (``writes``: what names it, e.g. the flag -> path) that is an input, reaches
    one, lies inside an input folder, or is another written file; and one that is a folder."""
    given = [Path(p) for p in inputs if p is not None]
    resolved = {name: Path(path).resolve() for name, path in writes.items()}
    for name, path in writes.items():
        if Path(path).is_dir():
            raise PathClash(f"{name} {path} is a folder; give a file path")
        for dump in given:
            target = dump.resolve()
            if resolved[name] == target or same_file(path, dump) or (dump.is_dir() and target in resolved[name].parents):
                raise PathClash(f"{name} {path} would write over the input {dump}; choose another path "
                                "(mmllm never writes to its inputs)")
    names = list(writes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if resolved[a] == resolved[b] or same_file(writes[a], writes[b]):
                raise PathClash(f"{a} and {b} are the same file ({writes[a]}); choose two different paths")


def check_folder(inputs: Sequence[Path | None], flag: str, folder: Path, names: Sequence[str]) -> None:
    """A folder a command fills with files of these ``names``: not an existing file, and none of the
    files it writes an input (or inside an input folder)."""
    if folder.exists() and not folder.is_dir():
        raise PathClash(f"{flag} {folder} is a file; give a folder path")
    check_writes(inputs, {f"{flag} (its file {name})": folder / name for name in names})


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (a symlink or a hard link included); False while either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
