"""Host memory settings: the glibc tuning that keeps freed blocks, and huge-page advice."""

import ctypes
import subprocess
import sys

import pytest
import torch

from jaggedrec.ops import host_memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
                           reason="glibc only")

# A child process: the setting is process-wide, so it must not leak into the test session.
# It runs a few "steps" of 48 to 72 MB of temporaries, of varying sizes as batches vary, and
# prints its minor page faults: glibc maps and unmaps such blocks each time unless freed
# memory is kept, and each 4 KB page of a fresh mapping faults once.
_CHILD = r"""
import resource, sys, torch
from jaggedrec.ops import host_memory
if sys.argv[1] == "retain":
    assert host_memory.retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step(n):  # a step's temporaries: a few tens of MB, sizes varying with the batch
    a = torch.empty(n).fill_(1.0)
    b = torch.empty(n // 2).fill_(2.0)
    return float(a[-1] + b[-1])
step(12 << 20)
before = faults()
for n in (11 << 20, 10 << 20, 12 << 20, 9 << 20):
    step(n)
print(faults() - before)
"""


def _step_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@glibc
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _step_faults("default"), _step_faults("retain")
    assert default > 20000  # ~250 MB of fresh pages over the 4 steps
    assert retained < default / 4, (default, retained)


@glibc
def test_env_switch_turns_it_off():
    import os
    env = dict(os.environ, JAGGEDREC_RETAIN_FREED_MEMORY="0")
    out = subprocess.run([sys.executable, "-c", "from jaggedrec.ops import host_memory; "
                          "print(host_memory.retain_freed_memory())"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_huge_page_advice_skips_small_and_non_cpu_tensors():
    assert not host_memory.advise_huge_pages(torch.empty(16))
    assert not host_memory.advise_huge_pages(torch.empty(1 << 22, device="meta"))
