"""Process-wide tuning, in one place, each with one switch.

- :func:`tune_malloc` (switch: the ``CVPO_MALLOC_TUNING`` environment variable, ``0``
  turns it off): glibc keeps freed large blocks in the heap, so hot loops reuse warm
  pages;
- :func:`set_torch_threads` (switch: the config key ``learner_torch_threads``; the
  learner calls it with the resolved count, or not at all to leave torch's setting):
  torch's intra-op threads.

Nothing here runs at import.

Why the malloc tuning: glibc serves every allocation above ``M_MMAP_THRESHOLD``
(adaptive, starting at 128 KiB) with a fresh ``mmap`` and returns it to the kernel on
free. A learner update allocates the same few multi-megabyte tensors (the E-step's
(members, B*K, hidden) activations: 6 MiB at B=256, K=16, 3 critics) again and again,
so each allocation pays a page fault per 4 KiB page on first touch: measured on this
project's CPU learner, that was ~45 % of the E-step's critic pass (broadcast copies and
``addcmul`` outputs writing fresh pages). Raising the mmap threshold and the trim
threshold keeps those blocks in the heap, as jemalloc or tcmalloc would (the PyTorch
CPU tuning guide recommends either). The cost is memory that stays mapped after a peak
(bounded by the largest working set of the process). Only glibc Linux is affected;
elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["set_torch_threads", "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit builds.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024

_applied: bool | None = None


def tune_malloc() -> bool:
    """Apply the thresholds once per process; True if glibc accepted them."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("CVPO_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and ok
    _applied = ok
    return ok


def set_torch_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads to ``threads`` (None: leave them); returns the count."""
    import torch

    if threads is not None and int(threads) != torch.get_num_threads():
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
