"""Give freed heap memory back to the operating system after each inference.

Volumes of different sizes leave freed blocks scattered over glibc's heap, and
glibc returns only the top of the heap by itself, so without a trim a replica's
RSS creeps towards the largest working set it has ever seen. The 30-minute soak
(docs/reliability.md) showed that creep on the replicas that served the fewest
requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None  # musl has none


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); False where that is not available."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
