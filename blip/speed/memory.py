"""The process's memory, where PyTorch leaves it to the C library and the kernel (Linux; elsewhere
both functions do nothing).

Keep what is freed for the next use. A training step makes and frees the same large tensors every
step (activations, gradients, the temporaries of backward), and a captioning batch those of its ViT
and decoding. glibc's malloc gives each block of 128 KB and up (a threshold that grows to at most 32
MB) a mapping of its own, returned to the kernel when freed, and trims the free top of its heap, so
the next use touches fresh pages again and the kernel zeroes each one on its first touch. For the
base model at batch 4 that is about 250,000 page faults (1 GB) per training step, 0.3-1.5 s of kernel
time on 2 cores (benchmarks/bench_train.py). `keep_freed_memory` makes malloc serve every block from
its heap and trim the heap only past 1 GB of free memory. Peak memory does not grow (measured): the
next use takes the freed blocks again. Captioning 64 photos in batches of 16 (caption.py, which calls
it as train.py does): 37.8 s against 39.4 s while the ViT ran 16 images at once (blocks of up to 113
MB); with the ViT at 4 images at a time (blip/model.py), within 1%, and a peak RSS of 2.67-2.78 GB
against 2.58-3.20 GB (3 runs each).

Captioning: give back a checkpoint's pages once nothing reads them. A loaded checkpoint's weights
are the pages of its file, mapped copy-on-write (blip/checkpoint.py). Where the packed CPU path runs
(blip/speed/linear.py), it reads each weight once to pack it and then only ever reads the packed copy:
`drop_file_pages` unmaps the weight's pages (MADV_DONTNEED). They stay in the kernel's file cache,
and the weight reads the same values from it should anything read it again (saving, training). The
kernel is asked only when every page of the weight is still the file's: a page the process has
written (a weight changed in place) has no other copy, and dropping it would lose the change, so
then nothing is dropped (/proc/self/pagemap tells which pages are which).
"""

import ctypes
import functools
import mmap
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**30


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc; other C libraries (musl) have no such file
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse: no block gets a mapping of its own (M_MMAP_MAX 0; the
    threshold that decides which do cannot be set above 32 MB), the heap's free top is trimmed past 1 GB.
    True when it took the settings."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def drop_file_pages(t) -> bool:
    """Unmap the whole pages of contiguous CPU tensor `t` when every one is still a mapped file's (a
    loaded checkpoint's, unchanged); leave any other memory alone. True when the pages were unmapped.
    Nothing may write `t` meanwhile (the check and the unmapping are two steps): our callers hold
    weights no other thread changes."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or not t.is_contiguous():
        return False
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page  # whole pages inside the tensor only: neighbours keep theirs
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start or not _file_pages(start, end):
        return False
    return libc.madvise(start, end - start, mmap.MADV_DONTNEED) == 0


def _file_pages(start: int, end: int) -> bool:
    """Whether each page from `start` to `end` holds a file's data, unchanged (or was never touched):
    /proc/self/pagemap has a 64-bit entry per page, bit 63 present, 62 swapped, 61 a file's page."""
    page = mmap.PAGESIZE
    n = (end - start) // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            raw = bytearray(f.read(n * 8))
    except OSError:
        return False
    if len(raw) != n * 8:
        return False
    entries = torch.frombuffer(raw, dtype=torch.int64)
    files = (entries >> 61) & 1 == 1
    untouched = (entries >> 62) & 3 == 0  # neither present nor swapped: nothing written
    return bool((files | untouched).all())
