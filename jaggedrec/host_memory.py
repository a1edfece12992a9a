"""Large host tensors in 2 MB pages.

Embedding rows are read and written at random. With 4 KB pages, nearly every row access of
a table of hundreds of MB misses the TLB; with Linux's transparent huge pages a miss covers
2 MB instead. Where the kernel's THP mode is "madvise" (a common default) a region gets them
only when asked, and only for pages not yet touched, so the ask comes right after allocation.
"""

from __future__ import annotations

import ctypes
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
