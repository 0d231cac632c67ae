"""Keep the memory a training step frees for the next step (Linux with glibc; elsewhere nothing changes).

A training step makes and frees the same large tensors every step: activations, gradients, the
temporaries of backward. glibc's malloc gives blocks from 128 KB up (a threshold that grows to at
most 32 MB) back to the kernel when they are freed, and trims the free top of its heap, so the next
step touches fresh pages again and the kernel zeroes each one on its first touch. For the base
model at batch 4 on the CPU that is about 250,000 page faults (1 GB) per step, 0.3-1.5 s of kernel
time on 2 cores (benchmarks/bench_train.py). Two settings keep those blocks in the heap: serve
blocks up to 32 MB from the heap, and trim its top only past 1 GB of free memory. The peak memory
of a step stays the same (measured), since the next step takes the freed blocks again.
"""

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's own upper limit for this setting on 64-bit machines
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse. True when it took the settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc; other C libraries (musl) have no such file
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
