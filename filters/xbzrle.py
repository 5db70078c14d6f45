"""xbzrle: a page QEMU sends again travels as a delta against the copy that last crossed.

Both ends keep the same cache of pages, in bytes that crossed the wire (never live guest
memory, so nothing can race the guest) of at most `cache` bytes, keyed by (block, offset),
direct-mapped by page (PythonDirectCache; the wire header says "index": "direct") or, on wires
written before that, an LRU (PythonPageCache), updated by every page record in stream order
(zero pages only update entries).
Because the decoder sees the very same record sequence (it rebuilds it), its cache mirrors the
encoder's exactly, so a delta always applies to the page it was computed against, and memory
stays bounded by `cache` on both sides.

A re-sent page whose delta (QEMU's XBZRLE encoding) is smaller than the page goes on the wire
as an XBZRLE record with encoding byte WIRE_ENCODING, never seen by QEMU: decode turns it back
into the original page record. An unchanged page costs 11 bytes instead of 4 KiB.

The cache and both transforms' loops over a batch of records run in C
(migpipe.stream._xbzrle_cache) when it was built; PythonPageCache, the reference, gives the same
results otherwise (CACHE_IMPLEMENTATION says which is in use; MIGPIPE_XBZRLE=python forces it).
"""

import mmap
import os
from collections import OrderedDict
from typing import Any, Literal

from migpipe.chain import PageFilter, RecordTransform
from migpipe.errors import (
    CorruptError,
    MigpipeError,
    quoted,
)
from migpipe.keys import Secrets
from migpipe.stream import format as fmt
from migpipe.stream.ramimage import apply_page, inflate_page
from migpipe.stream.records import CompressedPage, NormalPage, Record, XbzrlePage, ZeroPage
from migpipe.stream.xbzrle import encode_deltas
from migpipe.units import parse_size

WIRE_ENCODING = 0x02  # QEMU uses 0x01; 0x02 marks migpipe's own deltas on migpipe's wire
DEFAULT_CACHE = fmt.XBZRLE_CACHE_SIZE
MAX_CACHE = 1 << 30
"""The largest cache either end accepts: the decoder maps as much as the (unauthenticated)
wire header names, so it must be bounded. 1 GiB is 16 times QEMU's default; QEMU itself allows
any power of two up to the guest's RAM, migpipe any whole number of bytes (the cache holds
size // 4096 pages), as its encoders have always written."""
PAGE = fmt.DEFAULT_PAGE_SIZE  # the only page size the cache keeps, on both ends alike
XBZRLE_HEADER = 3  # encoding byte + be16 length: a delta must beat the page by more than this
DELTA_LIMIT = PAGE - XBZRLE_HEADER - 1  # the longest delta worth sending instead of the page


class PythonPageCache:
    """The pages that crossed, LRU-bounded; encoder and decoder update it identically.

    The pages live in one anonymous mapping of `size` bytes (touched only as it fills), not as
    a bytes object each: long-lived 4 KiB objects scattered among the pipeline's short-lived
    megabyte buffers fragmented the heap until RSS exceeded the cache by 75 MiB on a 4 GiB
    stream. Only pages of PAGE bytes are kept; any other size is forgotten, on both ends alike.

    This is the reference and the fallback: migpipe.stream._xbzrle_cache.PageCache has the
    same methods, counters and results in C (PageCache is whichever is in use).
    """

    def __init__(self, size: int) -> None:
        self.capacity = max(1, size // PAGE)
        self._slab = mmap.mmap(-1, self.capacity * PAGE)
        self._view = memoryview(self._slab)
        self._slots: OrderedDict[tuple[str, int], int] = OrderedDict()  # key -> slot, LRU first
        self._free: list[int] = []  # slots of forgotten pages
        self._unused = 0  # slots from here on were never filled
        self.evictions = 0
        self.hits = self.misses = self.overflows = self.unchanged = 0  # encode()'s
        self.deltas = 0  # decode()'s

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._slots

    def keys(self) -> list[tuple[str, int]]:
        """The keys held, least recently used first."""
        return list(self._slots)

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
        elif kind is CompressedPage:
            try:
                self.put(key, inflate_page(record.data, PAGE))
            except MigpipeError:  # not exactly one page: forgotten, on both ends alike
                self.forget(key)
        else:
            # Update, never insert: a guest's bulk pass is mostly zero pages, which would
            # otherwise fill the LRU and evict the pages worth a delta; QEMU's own deltas are
            # followed only for the pages we hold.
            self._update(key, record)

    def _update(self, key: tuple[str, int], record: Record) -> memoryview | None:
        """Apply a zero or delta page record to the page held under `key`, in place; the page
        (a view of its slot, valid until the next change) or None when none is held."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._slots.move_to_end(key)
        page = self._view[slot * PAGE : (slot + 1) * PAGE]
        apply_page(record, page)
        return page

    def encode(self, records: list[Record], encoding: int, limit: int) -> list[Record]:
        """The encoder's transform: every record, in order, updating the cache; a NORMAL page
        whose key is held becomes an XBZRLE record with `encoding` when its delta against the
        held copy fits `limit` bytes."""
        out: list[Record] = []
        positions, olds, news = [], [], []
        for record in records:
            kind = type(record)
            if kind is NormalPage:
                # A page of another size has no delta: put() forgets its key.
                old = self.get((record.block, record.offset)) if len(record.data) == PAGE else None
                if old is None:
                    self.misses += 1
                else:
                    positions.append(len(out))
                    olds.append(old)
                    news.append(record.data)
            if kind in _PAGE_KINDS:
                self.observe(record)
            out.append(record)
        if positions:
            deltas = encode_deltas(olds, news, limit)
            for at, delta in zip(positions, deltas, strict=True):
                if delta is None:
                    self.overflows += 1
                    continue
                self.hits += 1
                self.unchanged += not delta
                page = out[at]
                out[at] = XbzrlePage(page.block, page.offset, delta, page.named, encoding)
        return out

    def decode(self, records: list[Record], encoding: int) -> list[Record]:
        """The decoder's transform: every record, in order, updating the cache as encode()
        did; an XBZRLE record with `encoding` becomes the NORMAL page it was."""
        out: list[Record] = []
        for record in records:
            kind = type(record)
            if kind is XbzrlePage and record.encoding == encoding:
                page = self._update((record.block, record.offset), record)
                if page is None:
                    raise CorruptError(
                        f"xbzrle delta for page 0x{record.offset:x} of {quoted(record.block)}, "
                        "which is not in the cache: the two ends disagree",
                    )
                record = NormalPage(record.block, record.offset, bytes(page), record.named)
                self.deltas += 1
            elif kind in _PAGE_KINDS:
                self.observe(record)
            out.append(record)
        return out


FNV_OFFSET = 0xCBF29CE484222325  # FNV-1a (64-bit): a hash both ends compute alike, unlike
FNV_PRIME = 0x100000001B3  # Python's hash() of a str, which is salted per process


def block_base(block: str) -> int:
    """The direct-mapped index's base for a RAM block: FNV-1a over the name's characters (its
    bytes on the wire, which the parser reads as latin-1), so different blocks' pages spread
    over different slots and both ends, which see the same names, derive the same base."""
    h = FNV_OFFSET
    for char in block:
        h = ((h ^ ord(char)) * FNV_PRIME) & 0xFFFF_FFFF_FFFF_FFFF
    return h


class PythonDirectCache(PythonPageCache):
    """The pages that crossed, direct-mapped: the page at `offset` of `block` can only be held
    in slot (block_base(block) + offset // PAGE) % capacity, and a new page there replaces
    whatever it held, as QEMU's own xbzrle cache does. A cyclic scan over more pages than the
    cache holds then keeps most of the pages it will meet again, where an LRU would have
    evicted each one just before it comes round.

    Same methods, counters and rules as PythonPageCache otherwise (zero pages and QEMU's own
    deltas only update a held page); keys() lists the held keys by slot. This is the reference
    for PageCache(size, "direct") in C.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._keys: list[tuple[str, int] | None] = [None] * self.capacity

    def _slot(self, key: tuple[str, int]) -> int:
        block, offset = key
        return (block_base(block) + offset // PAGE) % self.capacity

    def _held(self, key: tuple[str, int]) -> int | None:
        slot = self._slot(key)
        return slot if self._keys[slot] == key else None

    def __contains__(self, key: tuple[str, int]) -> bool:
        return self._held(key) is not None

    def keys(self) -> list[tuple[str, int]]:
        """The keys held, by slot."""
        return [key for key in self._keys if key is not None]

    def get(self, key: tuple[str, int]) -> bytes | None:
        slot = self._held(key)
        if slot is None:
            return None
        return self._slab[slot * PAGE : (slot + 1) * PAGE]

    def put(self, key: tuple[str, int], page: bytes | bytearray) -> None:
        if len(page) != PAGE:
            self.forget(key)
            return
        slot = self._slot(key)
        if self._keys[slot] not in (None, key):
            self.evictions += 1
        self._keys[slot] = key
        self._slab[slot * PAGE : (slot + 1) * PAGE] = page

    def forget(self, key: tuple[str, int]) -> None:
        slot = self._held(key)
        if slot is not None:
            self._keys[slot] = None

    def _update(self, key: tuple[str, int], record: Record) -> memoryview | None:
        slot = self._held(key)
        if slot is None:
            return None
        page = self._view[slot * PAGE : (slot + 1) * PAGE]
        apply_page(record, page)
        return page


_PAGE_KINDS = (NormalPage, ZeroPage, XbzrlePage, CompressedPage)

try:
    if os.environ.get("MIGPIPE_XBZRLE") == "python":
        raise ImportError("MIGPIPE_XBZRLE=python")
    from migpipe.stream._xbzrle_cache import PageCache
except ImportError:
    PageCache = PythonPageCache  # type: ignore[assignment,misc]

CACHE_IMPLEMENTATION: Literal["c", "python"] = "python" if PageCache is PythonPageCache else "c"

Index = Literal["lru", "direct"]
INDEXES: tuple[Index, ...] = ("lru", "direct")
DEFAULT_INDEX: Index = "direct"
"""What a new wire's cache is, unless asked for "lru" (which every decoder reads): on a busy
guest's real stream the LRU missed most re-sent pages once the dirtied region was as large as
the cache; see Xbzrle."""


def new_cache(size: int, index: Index) -> PythonPageCache:
    """The cache in use (C or Python) with that index."""
    if PageCache is PythonPageCache:
        return PythonDirectCache(size) if index == "direct" else PythonPageCache(size)
    return PageCache(size, index)  # type: ignore[call-arg]


class _Encoder(RecordTransform):
    name = "xbzrle"

    def __init__(self, cache_size: int, index: Index) -> None:
        self.cache = new_cache(cache_size, index)

    def transform(self, records: list[Record]) -> list[Record]:
        return self.cache.encode(records, WIRE_ENCODING, DELTA_LIMIT)

    def counters(self) -> dict[str, int]:
        cache = self.cache
        return {
            "hits": cache.hits,
            "misses": cache.misses,
            "overflows": cache.overflows,
            "unchanged": cache.unchanged,
            "evictions": cache.evictions,
        }


class _Decoder(RecordTransform):
    name = "xbzrle"

    def __init__(self, cache_size: int, index: Index) -> None:
        self.cache = new_cache(cache_size, index)

    def transform(self, records: list[Record]) -> list[Record]:
        return self.cache.decode(records, WIRE_ENCODING)

    def counters(self) -> dict[str, int]:
        return {"deltas": self.cache.deltas, "evictions": self.cache.evictions}


class Xbzrle(PageFilter):
    """The filter, with a cache of `cache` bytes on each end and its `index`.

    The index is in the wire header as {"index": "direct"}; a header without one (every wire
    written before there was a choice) means "lru", and an LRU filter writes none, so that
    older decoders still read it. An older decoder refuses "index" as a parameter it does not
    know (status 6), rather than mirror the wrong cache.
    """

    name = "xbzrle"
    wire_encodings = frozenset({WIRE_ENCODING})

    def __init__(self, cache: int = DEFAULT_CACHE, index: Index = DEFAULT_INDEX) -> None:
        if type(cache) is not int or not PAGE <= cache <= MAX_CACHE:
            raise MigpipeError(
                f"xbzrle cache of {quoted(cache)} bytes is not from {PAGE} to {MAX_CACHE}"
            )
        if index not in INDEXES:
            raise MigpipeError(
                f"xbzrle cache index {quoted(index)} is not one of {', '.join(INDEXES)}"
            )
        self.cache = cache
        self.index = index

    @classmethod
    def from_params(cls, params: dict[str, Any], secrets: Secrets) -> "Xbzrle":
        return super().from_params({"index": "lru", **params}, secrets)  # type: ignore[return-value]

    @classmethod
    def from_argument(cls, argument: str | None, secrets: Secrets) -> "Xbzrle":
        if argument is None:
            return cls()
        try:
            size = parse_size(argument)
        except MigpipeError as e:
            raise MigpipeError(f"xbzrle cache size: {e}") from None
        return cls(size)

    def params(self) -> dict[str, Any]:
        if self.index == "lru":
            return {"cache": self.cache}
        return {"cache": self.cache, "index": self.index}

    def encoder(self) -> RecordTransform:
        return _Encoder(self.cache, self.index)

    def decoder(self) -> RecordTransform:
        return _Decoder(self.cache, self.index)
