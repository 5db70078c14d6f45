"""Postcopy's page requests and the pages that answer them, sans-IO: enough of the destination's
return path and of the postcopy-preempt channel to time each request (migpipe-stream(5),
POSTCOPY REQUESTS).

The return path is a sequence of messages (be16 type, be16 length, payload); REQ_PAGES_ID names
a RAM block and asks for bytes of it, REQ_PAGES asks for bytes of the block named last, and
RECV_BITMAP (a recovery) carries a raw bitmap after its payload. The preempt channel carries
bare RAM records: a be64 word (the page's offset in its block, and flags), the block's counted
name unless CONTINUE says it is the last one named on the channel, then the page (PAGE: a
target page of bytes; ZERO: one byte); EOS ends it.

Neither reader is a gatekeeper: QEMU checks what it reads. They raise CorruptError on what they
cannot follow, and the caller then stops timing (the bytes cross whatever these readers think).
RequestTimes matches each page to the request for it, with times the caller gives.
"""

import statistics
import struct
from typing import NamedTuple

from migpipe.errors import CorruptError
from migpipe.stream import format as fmt

RP_HEADER = struct.Struct(">HH")
RP_REQ_PAGES_ID = 3
RP_REQ_PAGES = 4
RP_RECV_BITMAP = 5
RP_MAX_LENGTH = 512  # the source's buffer: a longer message is an error there too
BITMAP_END = 0x0123456789ABCDEF
MAX_BITMAP = 1 << 40  # bytes: one bit per page of 32 PiB of RAM
TARGET_PAGE = 4096  # the preempt channel's page size (x86, and every target migpipe parses)
MAX_PENDING = 1 << 16  # requests kept waiting for their page; older ones are forgotten


class Request(NamedTuple):
    """Bytes of a RAM block the destination asked for (its host page: 4 KiB, or a huge page)."""

    block: str
    start: int
    length: int


class ReturnPathReader:
    """The destination's return-path messages in; the page requests among them out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._block: str | None = None  # named by the last REQ_PAGES_ID
        self._bitmap = 0  # bytes of a RECV_BITMAP's trailer still to skip (with its end marker)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]:
        self._buf += data
        requests: list[Request] = []
        buf, pos = self._buf, 0
        while True:
            if self._bitmap:
                if self._bitmap < 0:  # its size comes first
                    if len(buf) - pos < 8:
                        break
                    size = int.from_bytes(buf[pos : pos + 8], "big")
                    if size > MAX_BITMAP:
                        raise CorruptError(f"a received-pages bitmap of {size} bytes")
                    pos, self._bitmap = pos + 8, size + 8
                skip = min(self._bitmap, len(buf) - pos)
                pos, self._bitmap = pos + skip, self._bitmap - skip
                if self._bitmap:
                    break
                continue
            if len(buf) - pos < RP_HEADER.size:
                break
            kind, length = RP_HEADER.unpack_from(buf, pos)
            if length > RP_MAX_LENGTH:
                raise CorruptError(f"a return-path message of {length} bytes")
            end = pos + RP_HEADER.size + length
            if len(buf) < end:
                break
            request = self._message(kind, bytes(buf[pos + RP_HEADER.size : end]))
            if request is not None:
                requests.append(request)
            pos = end
        del buf[:pos]
        return requests

    def _message(self, kind: int, payload: bytes) -> Request | None:
        if kind == RP_RECV_BITMAP:
            self._bitmap = -1
            return None
        if kind not in (RP_REQ_PAGES_ID, RP_REQ_PAGES) or len(payload) < 12:
            return None
        start, length = struct.unpack_from(">QI", payload)
        if kind == RP_REQ_PAGES_ID:
            if len(payload) < 13 or len(payload) != 13 + payload[12]:
                raise CorruptError("a page request whose block name does not fit it")
            self._block = payload[13:].decode("latin-1")
        if self._block is None:
            raise CorruptError("a page request before any block was named")
        return Request(self._block, start, length)


class PreemptReader:
    """The postcopy-preempt channel's bytes in; (block, offset) of each page it carries out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._block: str | None = None  # the last one named on this channel
        self.ended = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[str, int]]:
        self._buf += data
        pages: list[tuple[str, int]] = []
        buf, pos = self._buf, 0
        while not self.ended and len(buf) - pos >= 8:
            word = int.from_bytes(buf[pos : pos + 8], "big")
            flags, offset = word & (TARGET_PAGE - 1), word & ~(TARGET_PAGE - 1)
            kind = flags & ~fmt.RAM_CONTINUE
            if kind == fmt.RAM_EOS:
                self.ended, pos = True, pos + 8
                break
            if kind not in (fmt.RAM_PAGE, fmt.RAM_ZERO):
                raise CorruptError(f"a preempt channel record with flags 0x{flags:x}")
            at, block = pos + 8, self._block
            if not flags & fmt.RAM_CONTINUE:
                if len(buf) - at < 1 or len(buf) - at < 1 + buf[at]:
                    break
                block, at = (
                    bytes(buf[at + 1 : at + 1 + buf[at]]).decode("latin-1"),
                    at + 1 + buf[at],
                )
            elif block is None:
                raise CorruptError("a preempt channel record continues no block")
            end = at + (TARGET_PAGE if kind == fmt.RAM_PAGE else 1)
            if len(buf) < end:
                break
            self._block, pos = block, end
            pages.append((block, offset))
        del buf[:pos]
        return pages


class RequestTimes:
    """Each page request's time until its page came (the first page of the request), from the
    times the caller says it saw each; requests whose page never came are not counted."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], float] = {}
        self.requests = 0
        self.latencies: list[float] = []  # seconds

    def requested(self, request: Request, now: float) -> None:
        self.requests += 1
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        self._pending.setdefault((request.block, request.start), now)

    def arrived(self, block: str, offset: int, now: float) -> None:
        asked = self._pending.pop((block, offset), None)
        if asked is not None:
            self.latencies.append(now - asked)

    def figures(self) -> dict[str, float | int] | None:
        """Requests seen, answered, and the answers' median, 90th percentile and longest time
        in milliseconds; None before any request."""
        if not self.requests:
            return None
        times = sorted(self.latencies)
        answered = len(times)

        def ms(seconds: float) -> float:
            return round(seconds * 1000, 3)

        return {
            "requests": self.requests,
            "answered": answered,
            "median_ms": ms(statistics.median(times)) if times else None,
            "p90_ms": ms(times[min(answered - 1, int(answered * 0.9))]) if times else None,
            "max_ms": ms(times[-1]) if times else None,
        }
