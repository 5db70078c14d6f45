"""The xbzrle page filter: deltas for re-sent pages, mirrored caches, byte-identical output."""

import json
import mmap
import tracemalloc
import zlib
from pathlib import Path

import pytest
from migpipe_filters.xbzrle import MAX_CACHE, WIRE_ENCODING, PageCache, Xbzrle
from support import PAGE, migpipe

from migpipe import chain as filters
from migpipe.errors import EXIT_ERROR, EXIT_INCOMPATIBLE, MigpipeError
from migpipe.keys import Secrets
from migpipe.stream.parser import parse_bytes
from migpipe.stream.records import CompressedPage, NormalPage, XbzrlePage, ZeroPage
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest


@pytest.fixture(scope="module")
def stream() -> bytes:
    model = GuestModel(ram_size=16 << 20, iterations=5, dirty_share=0.2, rewrite_share=0.1)
    return write_records(SyntheticGuest(model).records())


def test_round_trip_and_savings(stream: bytes, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    plain = migpipe("encode", stdin=stream)
    encoded = migpipe("encode", "--xbzrle", "--stats-json", str(stats), stdin=stream)
    assert encoded.returncode == 0, encoded.stderr
    decoded = migpipe("decode", stdin=encoded.stdout)
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout == stream
    counters = json.loads(stats.read_text())["filters"]["xbzrle"]
    assert counters["hits"] > 1000 and counters["misses"] > 0
    # 80% of re-dirtied pages change sparsely: their deltas are far smaller than pages
    assert len(encoded.stdout) < 0.85 * len(plain.stdout)


def test_composes_with_compression(stream: bytes) -> None:
    encoded = migpipe("encode", "--filters", "xbzrle,zstd:1", stdin=stream)
    assert encoded.returncode == 0, encoded.stderr
    assert migpipe("decode", stdin=encoded.stdout).stdout == stream
    refused = migpipe("encode", "--filters", "zstd,xbzrle", stdin=stream)
    assert refused.returncode == 6 and b"then compression" in refused.stderr


def test_a_tiny_cache_evicts_but_stays_correct(stream: bytes) -> None:
    encoded = migpipe("encode", "--xbzrle-cache", "64K", stdin=stream)
    assert encoded.returncode == 0, encoded.stderr
    assert migpipe("decode", stdin=encoded.stdout).stdout == stream


@pytest.mark.parametrize("cache", [1e300, 1 << 45, MAX_CACHE + 1, True, 4096.0, 4095, "64M"])
def test_a_wire_headers_cache_size_is_refused_before_any_mapping(
    cache: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header is not authenticated yet when the decoder maps its cache: a size it names
    must be a whole number of bytes within MAX_CACHE, or the header is refused (status 6)."""

    def no_mapping(*args: object) -> None:
        raise AssertionError(f"mmap{args} for a refused cache size")

    monkeypatch.setattr(mmap, "mmap", no_mapping)
    with pytest.raises(MigpipeError, match="xbzrle") as caught:
        filters.create("xbzrle", {"cache": cache}).decoder()
    assert caught.value.status == EXIT_INCOMPATIBLE


def test_the_encoders_cache_argument_has_the_decoders_bounds() -> None:
    direct = {"index": "direct"}
    assert Xbzrle.from_argument("1G", Secrets()).params() == {"cache": MAX_CACHE, **direct}
    assert Xbzrle.from_argument("4K", Secrets()).params() == {"cache": 4096, **direct}
    for too_large in ("1025M", "2G", "16T"):
        with pytest.raises(MigpipeError, match="is not from 4096 to 1073741824") as caught:
            Xbzrle.from_argument(too_large, Secrets())
        assert caught.value.status == EXIT_ERROR  # a filter argument out of range


def test_new_wires_are_direct_mapped_and_old_ones_still_lru(stream: bytes) -> None:
    """A header without "index" (every wire before it) is an LRU; a new writer's says "direct";
    an LRU filter writes no "index", so that older decoders still read its wires."""
    assert Xbzrle().params() == {"cache": 64 << 20, "index": "direct"}
    assert Xbzrle(4096, "lru").params() == {"cache": 4096}
    old = filters.create("xbzrle", {"cache": 1 << 20})
    assert isinstance(old, Xbzrle) and old.index == "lru"
    assert filters.create("xbzrle", {"cache": 1 << 20, "index": "direct"}).index == "direct"
    with pytest.raises(MigpipeError, match='index "mru" is not one of lru, direct') as caught:
        filters.create("xbzrle", {"cache": 1 << 20, "index": "mru"})
    assert caught.value.status == EXIT_INCOMPATIBLE
    records = parse_bytes(stream)
    for index in ("lru", "direct"):
        wire = Xbzrle(256 << 10, index).encoder().transform(records)
        decoder = filters.create("xbzrle", Xbzrle(256 << 10, index).params()).decoder()
        assert decoder.transform(wire) == records
    scan = [NormalPage("pc.ram", n * PAGE, bytes([n]) * PAGE) for n in range(5)] * 2
    direct_wire = Xbzrle(4 * PAGE, "direct").encoder().transform(scan)
    with pytest.raises(MigpipeError, match="not in the cache"):  # so the header must say
        Xbzrle(4 * PAGE, "lru").decoder().transform(direct_wire)


def test_an_older_decoder_refuses_the_index_in_one_line(
    stream: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder from before "index" (its Xbzrle took `cache` alone) refuses a new wire with
    status 6 and one line naming the parameter, before it decodes anything."""

    class OldXbzrle(Xbzrle):
        def __init__(self, cache: int = 64 << 20) -> None:
            super().__init__(cache, "lru")

        @classmethod
        def from_params(cls, params: dict, secrets: Secrets) -> "OldXbzrle":
            return cls(**params)  # as Filter.from_params did then, without the "lru" default

    monkeypatch.setattr(filters, "load", lambda name: OldXbzrle)
    with pytest.raises(MigpipeError) as caught:
        filters.create("xbzrle", Xbzrle().params())
    assert caught.value.status == EXIT_INCOMPATIBLE
    assert "\n" not in caught.value.message and "'index'" in caught.value.message
    assert caught.value.message.startswith('bad parameters for filter "xbzrle"')
    assert isinstance(filters.create("xbzrle", Xbzrle(4096, "lru").params()), OldXbzrle)


def test_compressed_pages_are_inflated_to_a_page_at_most() -> None:
    """Both caches inflate QEMU's compressed pages; one that is not exactly a page (a
    decompression bomb, or not zlib at all) is forgotten on both ends, never inflated whole."""
    cache = PageCache(4 * PAGE)
    bomb = zlib.compress(bytes(8 << 20))  # 8 KiB of input, 8 MiB of output
    tracemalloc.start()
    try:
        cache.observe(CompressedPage("pc.ram", 0, bomb, True))
        cache.observe(CompressedPage("pc.ram", PAGE, b"not zlib", True))
        cache.observe(CompressedPage("pc.ram", 2 * PAGE, zlib.compress(b"\7" * PAGE)[:-2], True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert all(("pc.ram", n * PAGE) not in cache for n in range(3))
    cache.observe(CompressedPage("pc.ram", 0, zlib.compress(b"\7" * PAGE) + b"tail", True))
    assert cache.get(("pc.ram", 0)) == b"\7" * PAGE  # as zlib.decompress() always read it


def records_for(*pages: bytes) -> list:
    return [NormalPage("pc.ram", 0, page, i == 0) for i, page in enumerate(pages)]


def test_encoder_and_decoder_mirror_each_other() -> None:
    old = bytes(range(256)) * 16
    new = bytearray(old)
    new[100:104] = b"ABCD"
    sparse = bytearray(PAGE)
    sparse[10:14] = b"WXYZ"  # a few bytes over the zero page the cache now holds
    records = [
        *records_for(old, bytes(new), bytes(new)),
        ZeroPage("pc.ram", 0),
        NormalPage("pc.ram", 0, bytes(sparse)),
    ]
    encoder, decoder = Xbzrle().encoder(), Xbzrle().decoder()
    wire = encoder.transform(records)
    kinds = [(type(r).__name__, getattr(r, "encoding", None)) for r in wire]
    assert kinds == [
        ("NormalPage", None),
        ("XbzrlePage", WIRE_ENCODING),
        ("XbzrlePage", WIRE_ENCODING),
        ("ZeroPage", None),
        ("XbzrlePage", WIRE_ENCODING),
    ]
    assert wire[2].data == b""  # unchanged: an empty delta
    assert decoder.transform(wire) == records
    assert encoder.counters()["unchanged"] == 1


def test_random_pages_stay_whole() -> None:
    import random

    rng = random.Random(3)
    records = records_for(rng.randbytes(PAGE), rng.randbytes(PAGE))
    wire = Xbzrle().encoder().transform(records)
    assert wire == records  # the delta would be larger than the page


def test_delta_for_an_uncached_page_is_corruption() -> None:
    bogus = [XbzrlePage("pc.ram", 0, b"", True, WIRE_ENCODING)]
    with pytest.raises(MigpipeError, match="not in the cache"):
        Xbzrle().decoder().transform(bogus)


def test_cache_is_bounded_lru() -> None:
    cache = PageCache(3 * PAGE)
    for offset in range(5):
        cache.put(("b", offset * PAGE), bytes([offset]) * PAGE)
    cache.get(("b", 2 * PAGE))
    cache.put(("b", 2 * PAGE), b"\x22" * PAGE)  # used again: now the most recent
    cache.put(("b", 5 * PAGE), b"\x05" * PAGE)
    assert [cache.get(("b", n * PAGE)) for n in range(6)] == [
        None,
        None,
        b"\x22" * PAGE,
        None,
        b"\x04" * PAGE,
        b"\x05" * PAGE,
    ]
    assert cache.evictions == 3


def test_cache_gives_copies_and_forgets_pages_of_another_size() -> None:
    cache = PageCache(2 * PAGE)
    cache.put(("b", 0), b"a" * PAGE)
    old = cache.get(("b", 0))
    cache.put(("b", 0), b"b" * PAGE)  # refills the slot `old` came from
    assert old == b"a" * PAGE and cache.get(("b", 0)) == b"b" * PAGE
    cache.put(("b", 0), b"c" * 1024)  # not a 4 KiB page: not kept, on either end
    assert ("b", 0) not in cache and cache.get(("b", 0)) is None
    for offset in range(2):  # its slot is free again: no eviction to fill two
        cache.put(("b", (offset + 1) * PAGE), b"d" * PAGE)
    assert cache.evictions == 0


def test_qemu_xbzrle_records_pass_through(stream: bytes) -> None:
    """A stream that already carries QEMU's own XBZRLE records keeps them, byte for byte."""
    records = parse_bytes(stream)
    first = next(i for i, r in enumerate(records) if isinstance(r, NormalPage))
    page = records[first]
    records.insert(first + 1, XbzrlePage(page.block, page.offset, b"\x00\x01\x55", False))
    data = write_records(records)
    encoded = migpipe("encode", "--xbzrle", stdin=data)
    assert encoded.returncode == 0, encoded.stderr
    assert migpipe("decode", stdin=encoded.stdout).stdout == data


def test_every_frame_rebuilds_exactly_its_own_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Input chunks ending anywhere in the device state before EOF (a bug seen live: a frame
    ended in a device-state body, and decode gave its last 4 bytes out with the next frame)."""
    import zlib

    from migpipe.tunnel.pipeline import Decoder, Encoder

    monkeypatch.setattr("migpipe.tunnel.pipeline.FRAME_TARGET", 1)  # every chunk ends a frame

    model = GuestModel(ram_size=256 << 10, iterations=3, dirty_share=0.3)
    stream = write_records(SyntheticGuest(model).records())
    chain = [Xbzrle()]
    eof = stream.rindex(b"\x00\x06\x00\x00")
    device_state = stream.rindex(b"\x04\x00\x00\x00\x03")  # the first FULL section
    splits = {*range(device_state - 8, eof + 8, 7), *range(eof - 64, eof + 8)}
    for split in sorted(splits):
        encoder = Encoder(chain)
        wire = bytearray(encoder.wire.header())
        frames = encoder.feed(stream[:split]) + encoder.feed(stream[split:]) + encoder.finish()
        qemu, at = [], 0
        for frame in frames:  # what the pipeline's writer makes of them as they go out
            qemu.append(stream[at : at + frame.qemu_length])
            at += frame.qemu_length
            assert frame.qemu_crc == zlib.crc32(qemu[-1])
            qemu_bytes = (frame.qemu_length, frame.qemu_crc)
            crc = zlib.crc32(frame.records)
            wire += b"".join(encoder.wire.frame(frame.position, [frame.records], crc, qemu_bytes))
        assert at == len(stream)
        wire += encoder.wire.trailer(encoder.trailer())
        decoder = Decoder()
        decoder.feed(bytes(wire))
        decoder.close()
        wire_frames = decoder.next_frames()
        for frame, wire_frame, frame_qemu in zip(frames, wire_frames, qemu, strict=True):
            rebuilt = decoder.payload(*decoder.unfilter(wire_frame))
            if frame.position.final:
                rebuilt = decoder.finish()
            assert rebuilt == frame_qemu, f"split {split}, frame {frame.position.index}"
