"""Progress for long jobs: rows, rows/s and ETA.

On a terminal it is a tqdm bar; in a log file (overnight batch jobs, CI) it is one plain line
every ``log_every_s`` seconds or ``log_every_rows`` rows, because a redrawn bar is unreadable there. When only the input's
size in bytes is known (a JSONL dump), the total row count is estimated from the bytes read so
far, which gives an ETA without a first counting pass over the file.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Count rows; show rate and ETA. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        desc: str,
        *,
        total_rows: int | None = None,
        total_bytes: int | None = None,
        stream: TextIO | None = None,
        log_every_s: float = 30.0,
        log_every_rows: int | None = None,
        enabled: bool = True,
        unit: str = "rows",
    ) -> None:
        self.desc = desc
        self.unit = unit
        self.stream = stream or sys.stderr
        self.total_rows = total_rows
        self.total_bytes = total_bytes
        self.rows = 0
        self.start = time.perf_counter()
        self.log_every_s = log_every_s
        self.log_every_rows = log_every_rows
        self._last_log = self.start
        self._last_log_rows = 0
        self.enabled = enabled
        interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = (
            tqdm(desc=desc, total=total_rows, unit=unit, file=self.stream, dynamic_ncols=True, mininterval=0.5)
            if interactive
            else None
        )

    def update(self, rows: int = 1, *, bytes_done: int | None = None, rows_read: int | None = None,
               rows_seen: int | None = None, at_most: int | None = None) -> None:
        """Count ``rows`` done; ``bytes_done`` / ``rows_read`` say how far the reader is (it may
        run ahead of the rows done, e.g. by a batch window), for the total-row estimate: the rows
        handed on so far plus the bytes left at the rate of ``rows_seen`` (every row read, those a
        resume skips included: the rest of the file is taken as not done yet) per byte read, at
        most ``at_most`` (a ``--limit``)."""
        self.rows += rows
        if self.total_rows is None and self.total_bytes and bytes_done:
            read = rows_read or self.rows
            left = max(0, self.total_bytes - bytes_done)
            estimate = read + round((rows_seen or read) * left / bytes_done)
            if at_most is not None:
                estimate = min(estimate, at_most)
            estimate = max(self.rows, estimate)
            if self._bar is not None and estimate != self._bar.total:
                self._bar.total = estimate
            self._estimated_total = estimate
        if self._bar is not None:
            self._bar.update(rows)
        elif self.enabled and (
            time.perf_counter() - self._last_log >= self.log_every_s
            or (self.log_every_rows and self.rows - self._last_log_rows >= self.log_every_rows)
        ):
            self._last_log, self._last_log_rows = time.perf_counter(), self.rows
            print(self.line(), file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def eta(self) -> float | None:
        total = self.total_rows or getattr(self, "_estimated_total", None)
        if not total or not self.rate:
            return None
        return max(0.0, (total - self.rows) / self.rate)

    def line(self) -> str:
        eta = self.eta()
        eta_text = f", ETA {_clock(eta)}" if eta is not None else ""
        total = self.total_rows or getattr(self, "_estimated_total", None)
        of = f"/{'~' if self.total_rows is None else ''}{total:,}" if total else ""
        return (f"{self.desc}: {self.rows:,}{of} {self.unit}, {self.rate:,.1f} {self.unit}/s, "
                f"{_clock(self.elapsed)} elapsed{eta_text}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
