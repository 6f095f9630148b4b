"""Progress lines for logs: rows, rate, ETA estimated from bytes when the row count is unknown."""

import io

from mmllm.progress import Progress


def test_log_lines_every_n_rows_with_rate_and_eta():
    stream = io.StringIO()
    progress = Progress("label", total_bytes=1000, stream=stream, log_every_s=3600, log_every_rows=10)
    for i in range(25):
        progress.update(1, bytes_done=(i + 1) * 20)  # 20 bytes a row: 50 rows in all
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("label: 10/~50 rows, ") and "rows/s" in lines[0] and "ETA" in lines[0]
    assert progress.eta() is not None and progress.rows == 25


def test_known_total_and_disabled():
    stream = io.StringIO()
    progress = Progress("train", total_rows=4, stream=stream, log_every_s=0, unit="steps")
    progress.update(2)
    assert "train: 2/4 steps" in stream.getvalue()
    quiet = io.StringIO()
    Progress("x", stream=quiet, log_every_s=0, enabled=False).update(5)
    assert quiet.getvalue() == ""


def test_the_total_of_a_resumed_or_limited_run_counts_what_is_left_to_do():
    """A resume skips the rows done at the front of the file: the rows left are the rest of the file
    at the rate of every row read per byte, not the rows handed on so far scaled up (which said ~8 where
    25 rows are left). A --limit caps the total."""
    progress = Progress("label", total_bytes=1000, stream=io.StringIO(), log_every_s=3600)
    # 1,000 bytes, 20 a row (50 rows); the first 25 were done before: skipped, then 5 handed on
    progress.update(5, bytes_done=600, rows_read=5, rows_seen=30)
    assert progress._estimated_total == 5 + 20  # the 20 rows in the 400 bytes left
    limited = Progress("label", total_bytes=1000, stream=io.StringIO(), log_every_s=3600)
    limited.update(5, bytes_done=100, rows_read=5, rows_seen=5, at_most=8)
    assert limited._estimated_total == 8
