"""QEMU's XBZRLE page delta: decoding it exactly as a QEMU destination does.

A delta is a list of (zero run, non-zero run) pairs, each length a ULEB128 of at most two bytes,
the non-zero run followed by that many literal bytes of the new page. The rules enforced here are
the destination's, so a delta migpipe accepts is one QEMU accepts (see migpipe-stream(5)).
"""

from migpipe.errors import MigpipeError


def _uleb(delta: bytes, at: int) -> tuple[int, int]:
    first = delta[at]
    if first < 0x80:
        return first, at + 1
    second = delta[at + 1]
    if second >= 0x80:
        raise MigpipeError("invalid XBZRLE delta: run length longer than two bytes")
    return (first & 0x7F) | (second << 7), at + 2


def apply_delta(delta: bytes, page: memoryview | bytearray) -> None:
    """Apply `delta` over `page` (the destination's current copy) in place."""
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
