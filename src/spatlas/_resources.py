"""Measuring this process' peak memory."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    On Linux this reads ``VmHWM`` from ``/proc/self/status``: unlike ``getrusage``'s
    ``ru_maxrss``, it is not inherited from a parent across ``fork``/``exec``, so a worker
    process started by a large parent reports its own peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's ``malloc_trim``).

    Called between pipeline steps: the small allocations a step frees (Python objects, pandas
    buffers) otherwise stay mapped in the allocator's arenas and count towards the next step's
    peak. A no-op where glibc is not the allocator.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
