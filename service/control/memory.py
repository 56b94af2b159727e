"""Heap settings for the long-lived server processes (API servers, inference workers): glibc's and Python's.

Validating an admin load (reading the checkpoint, building the model, a warm-up forward pass)
allocates and frees hundreds of MiB of large blocks at once. glibc's default raises its mmap
threshold each time such a block is freed (up to 32 MiB), so later large blocks come from the
heap, where freed memory fragments and stays resident: an API server's RSS then drifts by
tens of MiB from one admin load to the next. Pinning the threshold at 1 MiB keeps every large
block in its own mapping, given back to the system when it is freed. Inference workers keep
glibc's default: their forward passes reuse heap blocks, and fresh mappings for every batch's
activations would cost page faults; they give the free blocks back once they idle
(service.inference.worker.HeapTrim).

Python's cyclic collector, in a full collection, walks every object it tracks. A process that has
imported torch, torchvision and the web stack tracks about 380,000 objects, almost all of them
alive for good (modules, classes, functions), and a full collection takes 250 ms of one core on
a 2-core machine: an API server's event loop or a worker's batch stalls that long, every time
enough new objects have outlived younger collections (the stalls showed as 250-380 ms refusals
under overload). ``freeze_survivors`` collects once, then exempts what survived (``gc.freeze``):
later collections walk only what was made since.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def pin_mmap_threshold() -> bool:
    """For this process and the processes it forks later; False where the C library is not glibc."""
    libc = _libc()
    try:
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except AttributeError:
        return False


def release_freed_memory() -> bool:
    """Return free heap pages to the system after a burst of frees (a checkpoint validation, an
    inference worker's batches before it idles); False where the C library is not glibc."""
    libc = _libc()
    try:
        if libc is None:
            return False
        libc.malloc_trim(0)
        return True
    except AttributeError:
        return False


def freeze_survivors() -> int:
    """Collect, then exempt every object alive now from later collections; returns how many. Called
    once start-up has built what lasts (after imports, before a model that a hot swap may replace:
    a frozen reference cycle is never collected); a process forked later inherits the exemption."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
