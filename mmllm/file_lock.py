"""One writer at a time: an exclusive ``flock`` on a file, held by a run and refused at once to another.

Labelling's ``--out`` / ``--errors`` / ``--review-out`` and its ``OUT.lock``, a training folder's
``training.lock``, a search index build's ``.index.lock`` and a review session's corrections file are
each held this way for as long as the run writes them. The lock belongs to the open file: it goes with
the process however that ends (a kill, a lost machine), so a stale lock never blocks the next run. On a
file system without ``flock`` (NFS with no lock daemon) the file is opened unlocked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Held(Exception):
    """Another process holds the file's lock (the caller says who, in its own words)."""


def hold(path: str | Path, flags: int = os.O_WRONLY | os.O_CREAT) -> int:
    """A descriptor of ``path`` (opened with ``flags``, created 0644) holding its exclusive lock; :class:`Held`
    (nothing left open) when another process has it. Closing the descriptor releases it."""
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Held(str(path)) from None
    except OSError:  # no flock on this file system: the caller's other checks guard the path
        pass
    return fd
