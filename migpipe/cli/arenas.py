"""One malloc arena for the whole process, so memory stays bounded by what migpipe holds.

glibc gives each thread that allocates an arena of its own (up to eight per core). migpipe's
worker threads allocate page-sized buffers that other threads free or keep (the XBZRLE cache,
frames in flight), and memory freed into several arenas is not reused across them. On a 4 GiB
stream, peak RSS with one arena instead of glibc's default: `encode --filters xbzrle` (64 MiB
cache) 224 -> 133 MiB, `xbzrle,zstd:1` 243 -> 145 MiB, pass-through 65 -> 43 MiB, in the same
time or less: two cores and megabyte buffers leave little malloc contention to lose.
"""

import ctypes
import os

M_ARENA_MAX = -8  # mallopt(3)


def use_one_arena() -> None:
    """Call before any thread starts. MALLOC_ARENA_MAX, if set, is the user's choice and is
    left alone, as is a C library without mallopt."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, 1)
