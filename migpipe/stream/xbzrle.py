"""QEMU's XBZRLE page delta: decoding it exactly as a QEMU destination does, and encoding it
exactly as a QEMU 7.2 source does.

A delta is a list of (zero run, non-zero run) pairs, each length a ULEB128 of at most two bytes,
the non-zero run followed by that many literal bytes of the new page. The rules enforced here are
the destination's, so a delta migpipe accepts is one QEMU accepts (see migpipe-stream(5)).

The encoder emits QEMU's canonical form (maximal runs, only the first zero run may be 0, the
trailing zero run left out) and gives up (None) at the same points as QEMU's generic encoder, so
migpipe's output and its choice between an XBZRLE record and a whole page match QEMU's.

Both directions use the C extension `migpipe.stream._xbzrle` when it was built (it is optional)
and a pure-Python implementation giving identical results otherwise; IMPLEMENTATION says which
is in use. Setting MIGPIPE_XBZRLE=python in the environment forces the fallback.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import compress, count
from operator import ne
from typing import Literal

from migpipe.errors import MigpipeError

BytesLike = bytes | bytearray | memoryview

MAX_PAGE = 0x3FFF
"""The longest page XBZRLE can describe: every run length must fit a two-byte ULEB128."""


# -- decoding ----------------------------------------------------------------------------------


def _uleb(delta: BytesLike, at: int) -> tuple[int, int]:
    first = delta[at]
    if first < 0x80:
        return first, at + 1
    second = delta[at + 1]
    if second >= 0x80:
        raise MigpipeError("invalid XBZRLE delta: run length longer than two bytes")
    return (first & 0x7F) | (second << 7), at + 2


def apply_delta_py(delta: BytesLike, page: memoryview | bytearray) -> None:
    """apply_delta in pure Python: the fallback, and the reference the C decoder is tested on."""
    size, end = len(page), len(delta)
    i = d = 0
    while i < end:
        if end - i < 2:
            raise MigpipeError("invalid XBZRLE delta: truncated zero run")
        zero_run, j = _uleb(delta, i)
        if i and not zero_run:
            raise MigpipeError("invalid XBZRLE delta: empty zero run after the first")
        d += zero_run
        if d > size or end - j < 2:
            raise MigpipeError("invalid XBZRLE delta: zero run past the page or delta end")
        literal, i = _uleb(delta, j)
        if not literal or d + literal > size or i + literal > end:
            raise MigpipeError("invalid XBZRLE delta: literal run empty or past the page")
        page[d : d + literal] = delta[i : i + literal]
        d += literal
        i += literal


# -- encoding in pure Python -------------------------------------------------------------------

# Bytes are compared a chunk at a time (one struct call splits a page into chunks, one map
# compares them all), and only chunks that differ are XOR-ed through ints to find the exact runs:
# most of a dirty page never reaches Python-level loops. 256 was the fastest size measured.
_CHUNK = 256
_NONZERO = bytes([0] + [1] * 255)  # translate table: 1 where the XOR is not zero


@lru_cache(maxsize=8)
def _splitter(size: int) -> Callable[[bytes], tuple[bytes, ...]]:
    chunks, tail = divmod(size, _CHUNK)
    return struct.Struct(f"{_CHUNK}s" * chunks + (f"{tail}s" if tail else "")).unpack


def _changed_spans(old: bytes, new: bytes, size: int) -> list[tuple[int, bytes]]:
    """(start, flags) per stretch of differing chunks: flags[k] is 1 where old and new differ
    at start + k. Bytes outside the stretches are equal, so no run crosses a stretch's edge."""
    split = _splitter(size)
    changed = list(compress(count(), map(ne, split(old), split(new))))
    if len(changed) * _CHUNK >= size:  # all of them: skip the slicing
        x = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
        return [(0, x.to_bytes(size, "little").translate(_NONZERO))]
    bounds: list[list[int]] = []
    for k in changed:
        a = k * _CHUNK
        if bounds and bounds[-1][1] == a:
            bounds[-1][1] = min(a + _CHUNK, size)
        else:
            bounds.append([a, min(a + _CHUNK, size)])
    return [
        (
            a,
            (int.from_bytes(old[a:b], "little") ^ int.from_bytes(new[a:b], "little"))
            .to_bytes(b - a, "little")
            .translate(_NONZERO),
        )
        for a, b in bounds
    ]


def _check_pages(old: BytesLike, new: BytesLike, limit: int | None) -> int:
    if len(old) != len(new):
        raise ValueError(f"old and new pages differ in length ({len(old)} != {len(new)})")
    if len(new) > MAX_PAGE:
        raise ValueError(f"pages of {len(new)} bytes are too long for XBZRLE (at most {MAX_PAGE})")
    if limit is None:
        return len(new)
    if limit < 0:
        raise ValueError("limit must not be negative")
    return limit


def encode_delta_py(old: BytesLike, new: BytesLike, limit: int | None = None) -> bytes | None:
    """encode_delta in pure Python: the fallback, and the reference the C encoder is tested on.

    QEMU checks the room left before every zero run (A), literal length (B) and literal (C).
    Those checks only ever grow, so the encoder overflows exactly when the whole canonical
    delta is longer than `limit`, or when it leaves a trailing zero run (check A runs once more)
    and is within two bytes of `limit`; identical pages only fail check A itself (limit < 2).
    """
    limit = _check_pages(old, new, limit)
    size = len(new)
    if not size:
        return b""
    if limit < 2:
        return None
    old, new = bytes(old), bytes(new)
    if old == new:
        return b""
    spans = _changed_spans(old, new, size)
    # Every run costs its bytes plus at least two length bytes: a page that cannot fit is
    # known without walking its runs (random pages, the usual overflow, end here).
    changed = sum(len(flags) - flags.count(0) for _, flags in spans)
    runs = sum(flags.count(b"\0\1") + flags[0] for _, flags in spans)
    if changed + 2 * runs > limit:
        return None
    out = bytearray()
    end = 0
    for a, flags in spans:
        p = 0
        while (s := flags.find(1, p)) >= 0:
            p = flags.find(0, s)
            if p < 0:
                p = len(flags)
            zrun, literal = a + s - end, p - s
            if zrun < 0x80:
                out.append(zrun)
            else:
                out += bytes(((zrun & 0x7F) | 0x80, zrun >> 7))
            if literal < 0x80:
                out.append(literal)
            else:
                out += bytes(((literal & 0x7F) | 0x80, literal >> 7))
            end = a + p
            out += new[end - literal : end]
    if len(out) > limit or (end < size and len(out) + 2 > limit):
        return None
    return bytes(out)


def encode_deltas_py(
    olds: Sequence[BytesLike], news: Sequence[BytesLike], limit: int | None = None
) -> list[bytes | None]:
    """encode_deltas in pure Python."""
    if len(olds) != len(news):
        raise ValueError(f"{len(olds)} old pages but {len(news)} new pages")
    return [encode_delta_py(old, new, limit) for old, new in zip(olds, news, strict=True)]


# -- the public functions, on the C extension when it is there ----------------------------------

try:
    if os.environ.get("MIGPIPE_XBZRLE") == "python":
        raise ImportError("MIGPIPE_XBZRLE=python")
    from migpipe.stream import _xbzrle
except ImportError:
    _xbzrle = None  # type: ignore[assignment]

IMPLEMENTATION: Literal["c", "python"] = "python" if _xbzrle is None else "c"


def apply_delta(delta: BytesLike, page: memoryview | bytearray) -> None:
    """Apply `delta` over `page` (the destination's current copy) in place.

    Raises MigpipeError for anything a QEMU destination would refuse; the pairs before the bad
    one have been applied by then, as on the destination.
    """
    if _xbzrle is None:
        apply_delta_py(delta, page)
        return
    try:
        _xbzrle.decode(delta, page)
    except ValueError as e:
        raise MigpipeError(str(e)) from None


def encode_delta(old: BytesLike, new: BytesLike, limit: int | None = None) -> bytes | None:
    """QEMU's delta turning page `old` (what the destination holds) into `new`.

    b"" when the pages are identical (QEMU then sends nothing), None when the delta would be
    longer than `limit` (default: the page size; QEMU then sends the whole page). ValueError
    if the pages differ in length or are longer than MAX_PAGE.
    """
    if _xbzrle is None:
        return encode_delta_py(old, new, limit)
    return _xbzrle.encode(old, new, limit)


def encode_deltas(
    olds: Sequence[BytesLike], news: Sequence[BytesLike], limit: int | None = None
) -> list[bytes | None]:
    """encode_delta for many pages in one call: the fast path (the C loop runs without the GIL,
    so encoding threads run in parallel, and the per-call cost is paid once per batch)."""
    if _xbzrle is None:
        return encode_deltas_py(olds, news, limit)
    return _xbzrle.encode_batch(olds, news, limit)
