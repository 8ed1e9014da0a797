"""glibc's malloc tuned for a CPU training step, which allocates and frees the same activation-sized
blocks (a few MiB each) hundreds of times a step.

By default glibc serves each block above its mmap threshold (128 KiB, raised towards 32 MiB as such blocks
are freed) with a fresh mmap and returns it to the kernel when freed, and trims the top of the heap when
more than twice that is free. Either way the next step touches fresh pages: a DDPM++ step at 32 and 64
channels took 13k-33k minor page faults, and its system time was a sixth of the step (benchmarks/peers.py's
network, this 2-core machine). Fixed thresholds keep freed memory in the process for the next step (the
process keeps its peak heap, which it reaches again every step anyway): 0-100 faults a step.
`CMBENCH_MALLOC=glibc` leaves glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30          # blocks up to 1 GiB come from the heap (a 128-channel 32x32 activation is 64 MiB)
TRIM_THRESHOLD = (1 << 31) - 1    # the largest value mallopt takes (an int): the heap top is never trimmed
ENV, CHOICES = "CMBENCH_MALLOC", ("keep", "glibc")

_applied = False


def malloc_choice() -> str:
    """`CMBENCH_MALLOC` (default keep); any other value than keep / glibc is a ValueError (one line)."""
    choice = os.environ.get(ENV, "keep")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a valid value; valid: {', '.join(CHOICES)}")
    return choice


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process (glibc only, unless CMBENCH_MALLOC=glibc); returns whether
    they are in force."""
    global _applied
    choice = malloc_choice()            # checked on every call, also once applied
    if _applied or choice == "glibc":
        return _applied
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _applied:
        log.debug("glibc's mallopt refused the thresholds; its defaults stay")
    return _applied


def _glibc_mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):      # musl and others: not glibc's malloc
            return None
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt
