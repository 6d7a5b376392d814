"""Giving back a thread's OpenMP workers, so that the engine's thread runs its steps at full speed.

libgomp, the OpenMP runtime that torch ships and the C++ kernels use, keeps a pool of worker threads
for every thread that has opened a parallel region, and counts the workers of all pools. While they
outnumber the CPUs, a worker that finishes a region spins only about 100 times before it sleeps on a
futex, so every next region pays a full wake-up. A CPU decode step opens about 150 regions (five per
layer). The engine runs its steps on its own thread, while loading the model opened regions on the
caller's thread, whose pool stays: on 2 cores each step took 2.5-3x as long as the same step on the
caller's thread (benchmarks/thread_step.py). `release_workers` frees the calling thread's pool
(OpenMP 5's omp_pause_resource_all), so the engine's pool is the only one; a later region on the
calling thread builds a new pool.
"""

from __future__ import annotations

import ctypes
import functools
import os

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what can be rebuilt


@functools.lru_cache(maxsize=1)
def _loaded_libgomp() -> ctypes.CDLL | None:
    """The libgomp this process already runs (torch's), or None where torch uses another runtime."""
    import torch  # noqa: F401  (loads torch's libgomp, if it has one)

    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except OSError:
        return None


def release_workers() -> bool:
    """Free the calling thread's OpenMP worker threads; False where there is no libgomp to ask."""
    libgomp = _loaded_libgomp()
    if libgomp is None or not hasattr(libgomp, "omp_pause_resource_all"):
        return False
    return libgomp.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
