"""The xbzrle filter's page cache in C against its Python twin: the same records out, the same
keys in the same LRU order, the same pages, counters and errors, batch after batch.

The Python cache (PythonPageCache, with the C delta codec) is the code every earlier wire was
written with, so a wire either writes must decode with the other, byte for byte.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from migpipe_filters import xbzrle as xbzrle_filter
from migpipe_filters.xbzrle import (
    CACHE_IMPLEMENTATION,
    DELTA_LIMIT,
    WIRE_ENCODING,
    PythonDirectCache,
    PythonPageCache,
    Xbzrle,
    block_base,
)
from support import PAGE

from migpipe.errors import CorruptError, MigpipeError
from migpipe.stream.records import (
    CompressedPage,
    EndOfSection,
    NormalPage,
    Record,
    SectionPart,
    XbzrlePage,
    ZeroPage,
)
from migpipe.stream.writer import write_records
from migpipe.stream.xbzrle import encode_delta
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.tunnel.pipeline import Decoder, Encoder

FORCED_PYTHON = os.environ.get("MIGPIPE_XBZRLE") == "python"


def c_cache() -> type:
    """The C cache; importing it fails the test where it was not built (CI builds it)."""
    from migpipe.stream._xbzrle_cache import PageCache

    return PageCache


Cache = Callable[[int], PythonPageCache]


def test_the_c_cache_is_in_use() -> None:
    expected = "python" if FORCED_PYTHON else "c"
    assert expected == CACHE_IMPLEMENTATION
    if not FORCED_PYTHON:
        from migpipe.stream import _xbzrle_cache

        assert xbzrle_filter.PageCache is c_cache()
        assert _xbzrle_cache.PAGE == PAGE


@pytest.fixture(params=["python", "c"])
def cache_class(request: pytest.FixtureRequest) -> Cache:
    return PythonPageCache if request.param == "python" else c_cache()


# -- the cache's rules, in both ---------------------------------------------------------------


def test_eviction_order_under_a_tiny_cache(cache_class: Cache) -> None:
    """A new key takes a forgotten slot, then a never-used one, then the least recent's; every
    use (put, zero, delta) makes a key the most recent; get() and misses leave the order."""
    cache = cache_class(3 * PAGE)
    assert cache.capacity == 3
    page = bytes(range(256)) * 16
    for n in range(3):
        cache.put(("a", n * PAGE), page)
    assert cache.keys() == [("a", 0), ("a", PAGE), ("a", 2 * PAGE)]
    cache.observe(ZeroPage("a", 0, 0))  # held: updated, most recent
    cache.get(("a", PAGE))  # a look, not a use
    cache.observe(ZeroPage("b", 0, 0))  # not held: never inserted
    assert cache.keys() == [("a", PAGE), ("a", 2 * PAGE), ("a", 0)]
    changed = page[:5] + b"\0" + page[6:]
    cache.observe(XbzrlePage("a", PAGE, encode_delta(page, changed)))
    assert cache.keys() == [("a", 2 * PAGE), ("a", 0), ("a", PAGE)]
    assert cache.get(("a", PAGE)) == changed
    cache.put(("b", 0), page)  # full: evicts the least recent
    assert cache.keys() == [("a", 0), ("a", PAGE), ("b", 0)] and cache.evictions == 1
    cache.put(("a", 0), page[:1024])  # another size: forgotten, its slot free
    cache.put(("b", PAGE), page)  # takes the free slot: no eviction
    assert cache.keys() == [("a", PAGE), ("b", 0), ("b", PAGE)] and cache.evictions == 1
    cache.forget(("b", 0))
    cache.forget(("b", 0))  # not held: nothing
    cache.observe(CompressedPage("c", 0, zlib.compress(page)))
    cache.observe(CompressedPage("a", PAGE, b"not zlib"))  # forgotten
    assert cache.keys() == [("b", PAGE), ("c", 0)] and cache.evictions == 1
    assert ("c", 0) in cache and ("a", PAGE) not in cache
    assert cache.get(("c", 0)) == page


def test_an_lru_of_one_page(cache_class: Cache) -> None:
    cache = cache_class(0)  # at least one page, as ever
    records = [NormalPage("a", 0, b"\1" * PAGE), NormalPage("a", 0, b"\1" * PAGE)]
    records += [NormalPage("a", PAGE, b"\2" * PAGE), NormalPage("a", 0, b"\1" * PAGE)]
    out = cache.encode(records, WIRE_ENCODING, DELTA_LIMIT)
    assert [type(r) for r in out] == [NormalPage, XbzrlePage, NormalPage, NormalPage]
    assert (cache.capacity, cache.evictions, cache.hits, cache.misses) == (1, 2, 1, 3)


def test_block_names_compare_by_value(cache_class: Cache) -> None:
    """The parser makes a new str for every named record: keys are equal by value."""
    cache = cache_class(2 * PAGE)
    cache.put(("".join(["pc", ".ram"]), 0), b"\5" * PAGE)
    assert ("pc.ram", 0) in cache and ("pc.ram", PAGE) not in cache and ("pc.rom", 0) not in cache
    assert cache.get(("pc" + ".ram", 0)) == b"\5" * PAGE


def test_errors_are_the_same(cache_class: Cache) -> None:
    cache = cache_class(2 * PAGE)
    cache.put(("a", 0), bytes(PAGE))
    with pytest.raises(MigpipeError, match="invalid XBZRLE delta: truncated zero run"):
        cache.observe(XbzrlePage("a", 0, b"\x05"))
    with pytest.raises(CorruptError, match=r'page 0x1000 of "a", which is not in the cache'):
        cache.decode([XbzrlePage("a", PAGE, b"", False, WIRE_ENCODING)], WIRE_ENCODING)
    assert cache.decode([XbzrlePage("b", 0, b"\x05", False, 1)], WIRE_ENCODING)  # not held


def test_buffers_other_than_bytes(cache_class: Cache) -> None:
    cache = cache_class(2 * PAGE)
    page = bytearray(b"\3" * PAGE)
    cache.put(("a", 0), memoryview(page))
    page[7] = 9
    out = cache.encode([NormalPage("a", 0, page, True)], WIRE_ENCODING, DELTA_LIMIT)
    assert out == [XbzrlePage("a", 0, b"\x07\x01\x09", True, WIRE_ENCODING)]
    assert cache.get(("a", 0)) == page


def test_a_direct_mapped_cache_holds_a_page_in_one_slot() -> None:
    """Slot (FNV-1a of the name + offset // 4096) mod capacity; a new page replaces what held
    its slot; zero pages and QEMU's deltas update a held page only; C and Python alike."""
    assert block_base("") == 0xCBF29CE484222325 and block_base("a") == 0xAF63DC4C8601EC8C
    base = block_base("pc.ram") % 3
    caches = [PythonDirectCache(3 * PAGE)]
    if not FORCED_PYTHON:
        caches.append(c_cache()(3 * PAGE, "direct"))
    page = bytes(range(256)) * 16
    for cache in caches:
        for n in range(3):
            cache.put(("pc.ram", n * PAGE), bytes([n]) * PAGE)
        assert cache.keys() == sorted(cache.keys(), key=lambda k: (base + k[1] // PAGE) % 3)
        assert cache.evictions == 0
        cache.put(("pc.ram", 3 * PAGE), page)  # the slot of page 0, whatever its age
        assert ("pc.ram", 0) not in cache and cache.get(("pc.ram", 3 * PAGE)) == page
        cache.observe(ZeroPage("pc.ram", 0, 0))  # not held: never inserted
        cache.observe(ZeroPage("pc.ram", PAGE, 9))
        assert ("pc.ram", 0) not in cache and cache.get(("pc.ram", PAGE)) == b"\t" * PAGE
        cache.forget(("pc.ram", 4 * PAGE))  # its slot holds page 1, which stays
        assert ("pc.ram", PAGE) in cache and cache.evictions == 1
        cache.forget(("pc.ram", PAGE))
        assert len(cache.keys()) == 2


def test_a_direct_mapped_cache_keeps_a_cyclic_scan(cache_class: Cache) -> None:
    """Passes over 5 pages in address order through a 4-page cache: the LRU always evicts the
    page the scan meets next; direct-mapped, only the 2 pages sharing a slot miss."""
    scan = [NormalPage("pc.ram", n * PAGE, bytes([n]) * PAGE) for n in range(5)] * 4
    lru = cache_class(4 * PAGE)
    if cache_class is PythonPageCache:
        direct = PythonDirectCache(4 * PAGE)
    else:
        direct = c_cache()(4 * PAGE, "direct")
    for cache in (lru, direct):
        cache.encode(scan, WIRE_ENCODING, DELTA_LIMIT)
    assert (lru.hits, lru.misses) == (0, 20)
    assert (direct.hits, direct.misses) == (9, 11)


# -- the C cache against the Python one, on random record sequences ---------------------------

_rng = random.Random(5)
_BASE = bytes(range(256)) * 16
_NEAR = bytearray(_BASE)
_NEAR[100:104] = b"ABCD"
_FAR = bytearray(_BASE)
for _at in range(0, PAGE, 97):
    _FAR[_at] ^= 0x5A
PAGES = [bytes(PAGE), _BASE, bytes(_NEAR), bytes(_FAR), _rng.randbytes(PAGE), b"\7" * PAGE]
PAGES += [b"\7" * 1024, b"\7" * (PAGE + 1)]  # other sizes: forgotten
QEMU_DELTAS = [encode_delta(a, b) or b"" for a in PAGES[:4] for b in PAGES[:4]]
QEMU_DELTAS += [b"\x05", b"\x00\x00", bytes([0xFF, 0x7F, 1, 1])]  # refused
COMPRESSED = [zlib.compress(p) for p in PAGES[4:]] + [b"junk"]
BLOCKS = ["pc.ram", "vga.vram"]


@st.composite
def page_records(draw: st.DrawFn) -> Record:
    block = draw(st.sampled_from(BLOCKS))
    offset = draw(st.integers(0, 3)) * PAGE
    named = draw(st.booleans())
    kind = draw(st.sampled_from(["normal", "normal", "normal", "zero", "xbzrle", "compressed"]))
    if kind == "normal":
        return NormalPage(block, offset, draw(st.sampled_from(PAGES)), named)
    if kind == "zero":
        return ZeroPage(block, offset, draw(st.sampled_from([0, 7])), named)
    if kind == "xbzrle":
        return XbzrlePage(block, offset, draw(st.sampled_from(QEMU_DELTAS)), named)
    return CompressedPage(block, offset, draw(st.sampled_from(COMPRESSED)), named)


records_lists = st.lists(
    st.one_of(page_records(), st.sampled_from([SectionPart(2), EndOfSection()])), max_size=40
)


def run(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return "ok", call()
    except MigpipeError as e:
        return type(e).__name__, e.message


def state(cache: PythonPageCache) -> tuple:
    keys = cache.keys()
    counters = ("evictions", "hits", "misses", "overflows", "unchanged", "deltas")
    return keys, [cache.get(k) for k in keys], [getattr(cache, c) for c in counters]


def pair(index: str, size: int) -> list[PythonPageCache]:
    """The Python reference and the C cache with that index."""
    reference = PythonDirectCache if index == "direct" else PythonPageCache
    return [reference(size), c_cache()(size, index)]


@pytest.mark.skipif(FORCED_PYTHON, reason="MIGPIPE_XBZRLE=python: the C extension is off")
@settings(max_examples=300, deadline=None)
@given(
    st.lists(records_lists, min_size=1, max_size=4),
    st.integers(1, 5),
    st.sampled_from(["lru", "direct"]),
)
def test_c_and_python_caches_agree(batches: list[list[Record]], pages: int, index: str) -> None:
    """Encode, batch after batch, with both; decode each one's wire with both: identical
    records, errors, keys in LRU (or slot) order, pages and counters at every step."""
    encoders, decoders = pair(index, pages * PAGE), pair(index, pages * PAGE)
    for records in batches:
        py, c = (run(partial(e.encode, records, WIRE_ENCODING, DELTA_LIMIT)) for e in encoders)
        assert c == py
        if py[0] != "ok":  # a refused QEMU delta ends the stream; the counters do not matter
            assert state(encoders[1])[:2] == state(encoders[0])[:2]
            return
        assert state(encoders[1]) == state(encoders[0])
        wire = py[1]
        for decoder in decoders:
            assert decoder.decode(wire, WIRE_ENCODING) == records
        assert state(decoders[1]) == state(decoders[0])
        assert decoders[0].keys() == encoders[0].keys()


@pytest.mark.skipif(FORCED_PYTHON, reason="MIGPIPE_XBZRLE=python: the C extension is off")
@pytest.mark.parametrize("index", ["lru", "direct"])
def test_every_operation_on_a_two_page_cache(index: str) -> None:
    """Every sequence of three operations from a small set, on both: the same state after each."""
    ops: list[tuple[str, object]] = [
        ("put", (k, p)) for k in [("a", 0), ("a", PAGE)] for p in PAGES[4:7]
    ]
    ops += [("forget", ("a", 0)), ("observe", ZeroPage("a", PAGE, 1))]
    ops += [("observe", XbzrlePage("a", 0, QEMU_DELTAS[6])), ("observe", NormalPage("b", 0, _BASE))]
    ops += [
        ("observe", XbzrlePage("a", PAGE, b"\x05")),
        ("observe", CompressedPage("a", 0, COMPRESSED[1])),
    ]
    for first in ops:
        for second in ops:
            for third in ops:
                caches = pair(index, 2 * PAGE)
                for name, argument in (first, second, third):
                    args = argument if name == "put" else (argument,)
                    py, c = (run(partial(getattr(cache, name), *args)) for cache in caches)
                    assert c == py
                    assert state(caches[1]) == state(caches[0])


# -- whole wires, written by one and read by the other ----------------------------------------


def wire_of(stream: bytes) -> bytes:
    encoder = Encoder([Xbzrle(64 << 10)])
    wire = bytearray(encoder.wire.header())
    frames = []
    for at in range(0, len(stream), 100_000):
        frames += encoder.feed(stream[at : at + 100_000])
    for frame in frames + encoder.finish():
        crc = zlib.crc32(frame.records)
        qemu = (frame.qemu_length, frame.qemu_crc)
        wire += b"".join(encoder.wire.frame(frame.position, [frame.records], crc, qemu))
    return bytes(wire + encoder.wire.trailer(encoder.trailer()))


def decoded(wire: bytes) -> bytes:
    decoder = Decoder()
    decoder.feed(wire)
    decoder.close()
    out = b"".join(decoder.payload(*decoder.unfilter(frame)) for frame in decoder.next_frames())
    return out + decoder.finish()


@pytest.mark.skipif(FORCED_PYTHON, reason="MIGPIPE_XBZRLE=python: the C extension is off")
def test_wires_cross_between_the_c_and_python_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 KiB cache on a 1 MiB guest: evictions all along, deltas on the pages it keeps."""
    model = GuestModel(ram_size=1 << 20, iterations=6, dirty_share=0.5, rewrite_share=0.3)
    stream = write_records(SyntheticGuest(model).records())
    wires = {}
    for name, cache in (("python", PythonPageCache), ("c", c_cache())):
        monkeypatch.setattr(xbzrle_filter, "PageCache", cache)
        wires[name] = wire_of(stream)
    assert wires["c"] == wires["python"]
    assert wires["c"].count(bytes([WIRE_ENCODING, 0, 0])) > 10  # unchanged pages crossed
    for cache in (PythonPageCache, c_cache()):
        monkeypatch.setattr(xbzrle_filter, "PageCache", cache)
        assert decoded(wires["c"]) == stream
