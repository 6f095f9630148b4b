"""Host memory: blocks of a few MB and more, once freed, go back to the operating system.

glibc's ``malloc`` takes a block below its mmap threshold from the heap, and each time a larger
mmapped block is freed it raises that threshold to the block's size (from 128 KiB up to 32 MiB).
A training step on the CPU allocates and frees activations of tens of MB: after the first frees,
blocks of up to 32 MiB come from the heap, whose freed space glibc keeps for reuse and cannot hand
back while anything above it lives, so the process's resident memory climbs well past what the step
holds at any moment. On the one-layer real-size Qwen2.5-VL-3B step of ``benchmarks/train_step.py
--real-size`` (2 CPU cores) that was ~850 MB of a 4.6 GB peak; PyTorch's own profiler saw 1.1 GB of
live tensors above the weights at the worst moment.

:func:`return_large_frees_to_os` fixes the threshold (which also stops the raising), so every block
of :data:`MMAP_THRESHOLD` or more is mapped on its own and unmapped when freed. Smaller blocks keep
the heap. The price is a fresh mapping (and page faults) per large block: microseconds against the
milliseconds of arithmetic such a tensor takes. ``mmllm.training.train_loop`` calls it on the CPU, and
the labelling engines before they label (``run_local``, each Ray actor). Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
MMAP_THRESHOLD = 4 * 2**20  # bytes: blocks at least this large are mapped and unmapped on their own


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; ``False`` where the C
    library is not glibc or another allocator is preloaded (nothing is changed there)."""
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
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
