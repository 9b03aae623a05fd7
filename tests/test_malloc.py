"""cvpo.runtime: glibc thresholds that keep the learner's large tensors on warm pages.

Page-fault counts make a poor test here: glibc's dynamic thresholds and the
host's memory reclaim make them vary run to run. What the tuning changes, and
what is deterministic in a fresh process, is where a large block comes from:
glibc's own counters (``mallinfo2``) show whether a 6 MiB tensor (one E-step
activation at B=256, K=16, 3 critics) was mmapped, and whether its memory stays
in the heap after it is freed.
"""

import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import ctypes, torch
    from cvpo.runtime import tune_malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = tune_malloc()
    assert tune_malloc() is applied  # idempotent
    before = libc.mallinfo2()
    block = torch.ones(3 * 4096 * 128)  # 6 MiB
    during = libc.mallinfo2()
    del block
    after = libc.mallinfo2()
    mib = 1 << 20
    print(applied, (during.hblkhd - before.hblkhd) / mib, after.arena / mib)
    """
)


def _probe(env_value):
    env = dict(os.environ)
    env.pop("CVPO_MALLOC_TUNING", None)
    if env_value is not None:
        env["CVPO_MALLOC_TUNING"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1]), float(out[2])


def test_tuning_keeps_large_blocks_in_the_heap():
    applied, mmapped, heap_after_free = _probe(None)
    assert applied
    assert mmapped < 1.0, mmapped  # the 6 MiB came from the heap, not a fresh mmap
    assert heap_after_free >= 6.0, heap_after_free  # and stays there for the next one


def test_without_tuning_glibc_mmaps_the_block():
    applied, mmapped, _ = _probe("0")
    assert not applied
    assert mmapped >= 6.0, mmapped  # a fresh mmap: its pages fault in on every use
