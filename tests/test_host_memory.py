"""Freed blocks of a few MB go back to the operating system (mmllm.host_memory), each case in a fresh process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys
sys.path.insert(0, {root!r})
import torch
from mmllm.host_memory import return_large_frees_to_os
if {fixed}:
    assert return_large_frees_to_os()

def anonymous_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

before = anonymous_mib()
a = torch.ones(5_000_000); del a  # 20 MB, mapped; freeing it raises glibc's threshold to 20 MB
b = torch.ones(5_000_000)  # so the next 20 MB come from the heap ...
c = torch.ones(1_000)  # ... under a small block that stays
del b
print(anonymous_mib() - before)
"""


def last_line(code: str) -> str:
    """What a fresh Python process running ``code`` prints last, under glibc's own defaults: no
    tunables, no allocator preloaded in front of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what this changes")
def test_a_freed_20_mb_tensor_stays_resident_under_glibcs_default_and_not_after_the_fix():
    def retained(fixed: bool) -> float:
        return float(last_line(CHILD.format(root=str(ROOT), fixed=fixed)))

    assert retained(False) > 15  # the freed block is still resident memory
    assert retained(True) < 5  # it was unmapped when freed


STEP_CHILD = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
from mmllm.host_memory import return_large_frees_to_os, reuse_step_buffers
assert {policy}()
scores = torch.randn(8, 151_936)  # a decoding step's scores at the real vocabulary: 4.9 MB
for _ in range(3):
    torch.log_softmax(scores, -1).amax(-1)  # warm up: the first blocks are new either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):  # what every decoding step allocates and frees again
    torch.log_softmax(scores, -1).amax(-1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what this changes")
def test_labelling_reuses_a_decoding_steps_blocks_where_the_training_setting_maps_them_afresh():
    def page_faults(policy: str) -> int:
        return int(last_line(STEP_CHILD.format(root=str(ROOT), policy=policy)))

    # mapped afresh, each 4.9 MB block is ~1,190 pages touched for the first time: 40 steps, ~47,500 faults
    assert page_faults("return_large_frees_to_os") > 20_000
    assert page_faults("reuse_step_buffers") < 10_000  # the same blocks again from the heap (measured: 0-3 blocks' worth, once)
