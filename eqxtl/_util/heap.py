"""Memory the process freed, handed back to the system: glibc's ``malloc_trim``.

glibc keeps what large arrays free in its heap (its mmap threshold grows with the sizes it
has seen), fragmented among arenas; what comes next (a compilation's memory on another
thread's arena, a step's temporaries) lands on top of it, and the resident set keeps the
high-water mark of both. A trim costs milliseconds and changes no value.
"""

from __future__ import annotations

import functools

import jax

enabled = True
"""``False``: leave the heap alone (``benchmarks/memory.py`` compares both)."""

TRIM_EVERY_BYTES = 256 * 2**20
_freed_since_trim = 0


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def trim_heap() -> None:
    """On the CPU with glibc, return the freed memory of every malloc arena to the system."""
    global _freed_since_trim
    _freed_since_trim = 0
    trim = _malloc_trim()
    if enabled and trim is not None and jax.default_backend() == "cpu":
        trim(0)


def freed(nbytes: int) -> None:
    """Count ``nbytes`` of arrays just deleted; trim once ``TRIM_EVERY_BYTES`` add up (a
    loop that replaces arrays with new ones, as packing the model does, then holds one
    such share more than its arrays, not a second copy of them)."""
    global _freed_since_trim
    _freed_since_trim += nbytes
    if _freed_since_trim >= TRIM_EVERY_BYTES:
        trim_heap()
