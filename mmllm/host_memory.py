"""Host memory: how glibc's ``malloc`` treats blocks of megabytes, set per kind of work.

glibc takes a block below its mmap threshold from the heap and maps a larger one on its own (unmapped
when freed); each time a mapped block is freed it raises that threshold to the block's size (from
128 KiB up to 32 MiB), and it hands the heap's free top back to the system above a trim threshold.
Two kinds of work want opposite things:

* **Training** (:func:`return_large_frees_to_os`). A step on the CPU allocates and frees activations
  of tens of MB: after the first frees, blocks of up to 32 MiB come from the heap, whose freed space
  glibc keeps and cannot hand back while anything above it lives, so the resident memory climbs well
  past what the step holds at any moment. On the one-layer real-size Qwen2.5-VL-3B step of
  ``benchmarks/train_step.py --real-size`` (2 CPU cores) the peak fell from 4,730 to 3,864 MB with
  the threshold fixed at 4 MiB (every larger block mapped and unmapped on its own), the loss unchanged.
* **Labelling** (:func:`reuse_step_buffers`). Every decoding step allocates the same blocks again:
  the scores over the vocabulary (batch 8 x 151,936 float32 = 4.9 MB, and their masked and
  normalized copies). Mapped afresh, each costs ~1,200 page faults, more than the arithmetic on it:
  with the training threshold, a constrained ``generate`` call at the real vocabulary
  (``benchmarks/generate_overhead.py --malloc``, 2 cores) took 2,529 ms against 1,586 ms when blocks
  up to 32 MiB (glibc's documented limit for the threshold on 64-bit) come from the heap and up to
  256 MiB of free heap top is kept for the next step; larger blocks (a CPU prefill's activations) are
  still mapped and returned (benchmarks/RESULTS.md, "What one training step costs").

Each sets both values, fixed (which also stops the raising), so a process that labels and then trains
(or the reverse) gets the setting of what it does now; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 2**20  # training: blocks at least this large are mapped and unmapped on their own
TRIM_THRESHOLD = 128 * 2**10  # training: glibc's default; free heap top above it goes back to the system
STEP_MMAP_THRESHOLD = 32 * 2**20  # labelling: blocks below this come from the heap (glibc's limit on 64-bit)
STEP_TRIM_THRESHOLD = 256 * 2**20  # labelling: free heap top kept for the next step, up to this


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Training: fix glibc's mmap threshold at ``threshold`` bytes for this process (and its trim
    threshold at glibc's default); ``False`` where the C library is not glibc or another allocator is
    preloaded (nothing is changed there), or where glibc refused a value (the others stay set)."""
    return _mallopt({M_MMAP_THRESHOLD: threshold, M_TRIM_THRESHOLD: TRIM_THRESHOLD})


def reuse_step_buffers(mmap_threshold: int = STEP_MMAP_THRESHOLD, trim_threshold: int = STEP_TRIM_THRESHOLD) -> bool:
    """Labelling: blocks below ``mmap_threshold`` from the heap, and up to ``trim_threshold`` bytes of
    free heap kept, so a decoding step's buffers are reused instead of mapped again; ``False`` as for
    :func:`return_large_frees_to_os`."""
    return _mallopt({M_MMAP_THRESHOLD: mmap_threshold, M_TRIM_THRESHOLD: trim_threshold})


def _mallopt(values: dict[int, int]) -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False  # another allocator serves malloc: glibc's mallopt would answer yes and change nothing
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's libc.so.6 stand-in has no mallopt to set
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(parameter, int(value)) == 1 for parameter, value in values.items()])
