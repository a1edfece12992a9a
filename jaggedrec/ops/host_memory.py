"""Host memory for CPU embedding work: huge pages for the tables, and freed memory kept.

Embedding rows are read and written at random. With 4 KB pages, nearly every row access of
a table of hundreds of MB misses the TLB; with Linux's transparent huge pages a miss covers
2 MB instead. Where the kernel's THP mode is "madvise" (a common default) a region gets them
only when asked, and only for pages not yet touched, so the ask comes right after allocation.

Each CPU step allocates tens of MB of temporaries (the pooled output, sorted ids, bag
gradients). glibc serves such blocks with ``mmap`` and unmaps them on free, so every step
faults in and zeroes them again, page by page. :func:`retain_freed_memory` makes glibc keep
freed memory for reuse instead, as a caching allocator would.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

_MADV_HUGEPAGE = 14
_PAGE = 4096
_MIN_BYTES = 4 << 20


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back ``tensor``'s memory with huge pages; a no-op elsewhere. Returns
    whether the request was made (the kernel may still decline)."""
    nbytes = tensor.numel() * tensor.element_size()
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or nbytes < _MIN_BYTES:
        return False
    start = (tensor.data_ptr() + _PAGE - 1) // _PAGE * _PAGE
    end = (tensor.data_ptr() + nbytes) // _PAGE * _PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_FREED_BYTES = 2**31 - 1  # mallopt takes an int
_retained = False


def retain_freed_memory() -> bool:
    """Make glibc keep freed host memory for reuse instead of handing it back to the OS.

    Process-wide: no more ``mmap`` for large blocks, and up to 2 GB free at the heap's top is
    kept. Called when a CPU EmbeddingBagCollection is built; measured on a 2-core EPYC, a
    26-table training step at 20 ids per bag went from ~246 ms to ~177 ms. The cost is that
    the process's resident memory stays at its peak. ``JAGGEDREC_RETAIN_FREED_MEMORY=0`` in the
    environment turns it off. Returns whether the setting is in effect (False off glibc).
    """
    global _retained
    if _retained:
        return True
    if os.environ.get("JAGGEDREC_RETAIN_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl and others have no such knobs
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _retained = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
    return _retained
