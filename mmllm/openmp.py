"""OpenMP and helper threads: a helper thread's torch work must not slow the main thread's model.

PyTorch's CPU kernels run their parallel regions on OpenMP, and libgomp gives every thread that
enters one a team of its own (``torch.get_num_threads()`` threads). Once a helper thread has a team
(the labeller's workers resize pictures and lay out token tensors while the model decodes), the
process holds more OpenMP threads than cores, and libgomp then barely busy-waits between regions
(its documentation: with more OpenMP threads than available CPUs the spin count drops to 1,000, or
100 without ``OMP_WAIT_POLICY``), so each parallel region of the main thread waits for its team to be
woken through the kernel. A decoding step is ~50 small operations: on 2 cores a [8, 1, 64] x [64, 128]
linear layer took 6.5 us before a helper thread had run a torch operation and 100 us after; with the
helper's team cut to one thread, 10 us, and the main thread kept its two (an ad-hoc timing,
2026-12-05; benchmarks/RESULTS.md, "Where it came from").

:func:`single_thread_team` sets the calling thread's team size to one. ``omp_set_num_threads`` is a
setting of the calling thread, where ``torch.set_num_threads`` also sets the process's count: a
helper calling that would leave the model one core.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any, Callable

OPENMP_LIBRARIES = ("libgomp", "libiomp5", "libomp")


def single_thread_team() -> bool:
    """Make the calling thread run its OpenMP regions (torch's CPU kernels) on itself alone; a
    ``ThreadPoolExecutor`` ``initializer`` for helper threads. ``False`` where no OpenMP runtime
    could be found in the process (nothing is changed)."""
    setter = _omp_set_num_threads()
    if setter is None:
        return False
    setter(1)
    return True


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads() -> Callable[[int], Any] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (Linux: found in ``/proc/self/maps``)."""
    import torch

    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = [line.split()[-1] for line in maps if len(line.split()) >= 6]
    except OSError:
        return None
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        if any(name.startswith(lib) for lib in OPENMP_LIBRARIES):
            try:
                function = ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                continue
            function.argtypes, function.restype = [ctypes.c_int], None
            return function
    return None
