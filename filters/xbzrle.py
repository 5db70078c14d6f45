"""xbzrle: a page QEMU sends again travels as a delta against the copy that last crossed.

Both ends keep the same cache of pages, in bytes that crossed the wire (never live guest
memory, so nothing can race the guest): an LRU of at most `cache` bytes, keyed by (block,
offset), updated by every page record in stream order (zero pages only update entries).
Because the decoder sees the very same record sequence (it rebuilds it), its cache mirrors the
encoder's exactly, so a delta always applies to the page it was computed against, and memory
stays bounded by `cache` on both sides.

A re-sent page whose delta (QEMU's XBZRLE encoding) is smaller than the page goes on the wire
as an XBZRLE record with encoding byte WIRE_ENCODING, never seen by QEMU: decode turns it back
into the original page record. An unchanged page costs 11 bytes instead of 4 KiB.
"""

import mmap
import zlib
from collections import OrderedDict
from typing import Any

from migpipe.chain import PageFilter, RecordTransform
from migpipe.errors import EXIT_CORRUPT, EXIT_INCOMPATIBLE, MigpipeError
from migpipe.keys import Secrets
from migpipe.stream.records import CompressedPage, NormalPage, Record, XbzrlePage, ZeroPage
from migpipe.stream.xbzrle import apply_delta, encode_deltas
from migpipe.units import parse_size

WIRE_ENCODING = 0x02  # QEMU uses 0x01; 0x02 marks migpipe's own deltas on migpipe's wire
DEFAULT_CACHE = 64 << 20  # QEMU's default xbzrle-cache-size
MAX_CACHE = 1 << 30
"""The largest cache either end accepts: the decoder maps as much as the (unauthenticated)
wire header names, so it must be bounded. 1 GiB is 16 times QEMU's default; QEMU itself allows
any power of two up to the guest's RAM, migpipe any whole number of bytes (the cache holds
size // 4096 pages), as its encoders have always written."""
PAGE = 4096
XBZRLE_HEADER = 3  # encoding byte + be16 length: a delta must beat the page by more than this


class PageCache:
    """The pages that crossed, LRU-bounded; encoder and decoder update it identically.

    The pages live in one anonymous mapping of `size` bytes (touched only as it fills), not as
    a bytes object each: long-lived 4 KiB objects scattered among the pipeline's short-lived
    megabyte buffers fragmented the heap until RSS exceeded the cache by 75 MiB on a 4 GiB
    stream. Only pages of PAGE bytes are kept; any other size is forgotten, on both ends alike.
    """

    def __init__(self, size: int) -> None:
        self.capacity = max(1, size // PAGE)
        self._slab = mmap.mmap(-1, self.capacity * PAGE)
        self._slots: OrderedDict[tuple[str, int], int] = OrderedDict()  # key -> slot, LRU first
        self._free: list[int] = []  # slots of forgotten pages
        self._unused = 0  # slots from here on were never filled
        self.evictions = 0

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._slots

    def get(self, key: tuple[str, int]) -> bytes | None:
        """A copy of the page: its slot may be refilled before the caller is done with it."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        return self._slab[slot * PAGE : (slot + 1) * PAGE]

    def put(self, key: tuple[str, int], page: bytes | bytearray) -> None:
        slots = self._slots
        if len(page) != PAGE:
            self.forget(key)
            return
        slot = slots.get(key)
        if slot is not None:
            slots.move_to_end(key)
        else:
            if self._free:
                slot = self._free.pop()
            elif self._unused < self.capacity:
                slot, self._unused = self._unused, self._unused + 1
            else:
                _, slot = slots.popitem(last=False)
                self.evictions += 1
            slots[key] = slot
        self._slab[slot * PAGE : (slot + 1) * PAGE] = page

    def forget(self, key: tuple[str, int]) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot)

    def observe(self, record: Record) -> None:
        """Update the cache for a page record of QEMU's own (as both ends see it)."""
        kind = type(record)
        key = (record.block, record.offset)
        if kind is NormalPage:
            self.put(key, record.data)
        elif kind is ZeroPage:
            # Update, never insert: a guest's bulk pass is mostly zero pages, which would
            # otherwise fill the LRU and evict the pages worth a delta.
            if key in self:
                self.put(key, _fill_page(record.fill))
        elif kind is XbzrlePage:  # QEMU's own delta: follow it if we hold the page
            old = self.get(key)
            if old is None:
                return
            page = bytearray(old)
            apply_delta(record.data, page)
            self.put(key, page)
        elif kind is CompressedPage:
            self.put(key, _inflate_page(record.data))


def _inflate_page(data: bytes) -> bytes:
    """A compressed page's page, or b"" (which put() forgets) when it is not exactly one page:
    QEMU's destination refuses such a record, and inflating it whole could take ~1000 times
    its size. Both ends get the same answer, so their caches stay alike."""
    inflater = zlib.decompressobj()
    try:
        page = inflater.decompress(data, PAGE + 1)
    except zlib.error:
        return b""
    return page if inflater.eof and len(page) == PAGE else b""


_FILLED: dict[int, bytes] = {}


def _fill_page(fill: int) -> bytes:
    page = _FILLED.get(fill)
    if page is None:
        page = _FILLED[fill] = bytes([fill]) * PAGE
    return page


class _Encoder(RecordTransform):
    name = "xbzrle"

    def __init__(self, cache_size: int) -> None:
        self.cache = PageCache(cache_size)
        self.hits = self.misses = self.overflows = self.unchanged = 0

    def transform(self, records: list[Record]) -> list[Record]:
        out: list[Record] = []
        positions, olds, news = [], [], []
        cache = self.cache
        for record in records:
            kind = type(record)
            if kind is NormalPage:
                old = cache.get((record.block, record.offset))
                if old is None:
                    self.misses += 1
                else:
                    positions.append(len(out))
                    olds.append(old)
                    news.append(record.data)
            if kind in (NormalPage, ZeroPage, XbzrlePage, CompressedPage):
                cache.observe(record)
            out.append(record)
        if positions:
            deltas = encode_deltas(olds, news, PAGE - XBZRLE_HEADER - 1)
            for at, delta in zip(positions, deltas, strict=True):
                if delta is None:
                    self.overflows += 1
                    continue
                self.hits += 1
                self.unchanged += not delta
                page = out[at]
                out[at] = XbzrlePage(page.block, page.offset, delta, page.named, WIRE_ENCODING)
        return out

    def counters(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "overflows": self.overflows,
                "unchanged": self.unchanged, "evictions": self.cache.evictions}  # fmt: skip


class _Decoder(RecordTransform):
    name = "xbzrle"

    def __init__(self, cache_size: int) -> None:
        self.cache = PageCache(cache_size)
        self.deltas = 0

    def transform(self, records: list[Record]) -> list[Record]:
        out: list[Record] = []
        cache = self.cache
        for record in records:
            kind = type(record)
            if kind is XbzrlePage and record.encoding == WIRE_ENCODING:
                old = cache.get((record.block, record.offset))
                if old is None:
                    raise MigpipeError(
                        f"xbzrle delta for page 0x{record.offset:x} of {record.block!r}, "
                        "which is not in the cache: the two ends disagree", status=EXIT_CORRUPT,
                    )  # fmt: skip
                page = bytearray(old)
                apply_delta(record.data, page)
                record = NormalPage(record.block, record.offset, bytes(page), record.named)
                self.deltas += 1
                kind = NormalPage
            if kind in (NormalPage, ZeroPage, XbzrlePage, CompressedPage):
                cache.observe(record)
            out.append(record)
        return out

    def counters(self) -> dict[str, int]:
        return {"deltas": self.deltas, "evictions": self.cache.evictions}


class Xbzrle(PageFilter):
    name = "xbzrle"
    wire_encodings = frozenset({WIRE_ENCODING})

    def __init__(self, cache: int = DEFAULT_CACHE) -> None:
        if type(cache) is not int or not PAGE <= cache <= MAX_CACHE:
            raise MigpipeError(f"xbzrle cache of {cache!r} bytes is not from {PAGE} to {MAX_CACHE}")
        self.cache = cache

    @classmethod
    def from_params(cls, params: dict[str, Any], secrets: Secrets) -> "Xbzrle":
        """A cache size the decoder refuses is a header it cannot follow (status 6)."""
        try:
            return cls(**params)
        except MigpipeError as e:
            raise MigpipeError(f"wire header: {e.message}", None, EXIT_INCOMPATIBLE) from None

    @classmethod
    def from_argument(cls, argument: str | None, secrets: Secrets) -> "Xbzrle":
        if argument is None:
            return cls()
        try:
            size = parse_size(argument)
        except MigpipeError as e:
            raise MigpipeError(f"xbzrle cache size: {e}") from None
        return cls(size)

    def params(self) -> dict[str, int]:
        return {"cache": self.cache}

    def encoder(self) -> RecordTransform:
        return _Encoder(self.cache)

    def decoder(self) -> RecordTransform:
        return _Decoder(self.cache)
