"""A multifd lane's pages through xbzrle (migpipe.tunnel.multifdcodec): sans-IO roundtrips of
synthetic channels, byte for byte however QEMU's bytes were split, and the payloads' refusals."""

import struct

import pytest
from migpipe_filters.xbzrle import Xbzrle

from migpipe.chain import FilterChain
from migpipe.errors import CorruptError, MigpipeError, TruncatedError
from migpipe.stream.multifd import (
    ChannelHello,
    DeviceStatePacket,
    RamPacket,
    write_channel,
)
from migpipe.tunnel.lanecodec import Verbatim, codec_for
from migpipe.tunnel.multifdcodec import AS_IS, PAGES, MultifdXbzrle, lane_counters

PAGE = 4096
CHAIN = FilterChain([Xbzrle(1 << 20)])


def page(fill: int, tweak: int = 0) -> bytes:
    """A page of `fill`, its byte `tweak` changed when not 0: a delta of a few bytes."""
    raw = bytearray([fill]) * PAGE
    if tweak:
        raw[tweak] ^= 0xFF
    return bytes(raw)


def passes() -> list:
    """Two passes over the same pages with a SYNC between (the second's pages dirtied a little,
    one made zero, one random enough to overflow), beside what must cross as it is: a
    compressed chunk, a device-state buffer, 7.2's stale spare slots and reserved words."""
    stale = struct.pack(">3Q", 0x1000, 0x2000, 0x3000) + bytes(8 * 125)
    noise = bytes((i * 7919 + i // 13) & 0xFF for i in range(PAGE))
    first = [page(i + 1) for i in range(4)]
    return [
        ChannelHello(bytes(range(16)), 1),
        RamPacket(
            0, 1, "pc.ram", (0, 0x1000, 0x2000), (0x9000,), b"".join(first[:3]), 128, 3 * PAGE
        ),
        RamPacket(0, 2, "pc.ram", (0x3000,), (), first[3], 128, PAGE, stale[8:]),
        RamPacket(4, 3, "pc.ram", (0x7000,), (), b"\x28\xb5\x2f\xfd zstd", 128, 9),
        DeviceStatePacket("0000:00:02.0/vfio", 3, b"state"),
        RamPacket(1, 4, "pc.ram", (), (), b"", 128, 3 * PAGE, stale, b"\x01" + bytes(27)),
        RamPacket(
            0,
            5,
            "pc.ram",
            (0x1000, 0, 0x3000),
            (0x2000,),
            page(2, 9) + page(1, 100) + noise,
            128,
            3 * PAGE,
        ),
        RamPacket(0, 6, "pc.ram", (0x2000,), (), page(0, 5), 128, PAGE),
        RamPacket(1, 7, "", (), (), b"", 0, 0),
    ]


CHANNEL = write_channel(passes())


def carried(chunks: list[bytes]) -> tuple[bytes, MultifdXbzrle, list[bytes]]:
    """QEMU's bytes in `chunks` through one lane's encode and decode: what decode gives QEMU,
    the encoder, and the payloads that crossed. (The relay chooses by its first read, which a
    first read of fewer than 4 bytes makes Verbatim: here, by the channel's first 4 bytes.)"""
    encoder = codec_for(b"".join(chunks[:4])[:4], CHAIN)
    assert isinstance(encoder, MultifdXbzrle)
    payloads = [bytes(p) for chunk in chunks for p in encoder.encode(chunk)]
    payloads += [bytes(p) for p in encoder.finish()]
    decoder = codec_for(payloads[0][:4], CHAIN)
    return b"".join(bytes(decoder.decode(p)) for p in payloads), encoder, payloads


def test_a_channel_crosses_byte_for_byte_with_its_second_pass_as_deltas() -> None:
    out, encoder, payloads = carried([CHANNEL])
    assert out == CHANNEL
    assert payloads[0] == CHANNEL[:64]  # the initial message as it is: decode chooses by it
    assert [p[0] for p in payloads[1:]] == [PAGES, PAGES, AS_IS, AS_IS, PAGES, PAGES, PAGES, PAGES]
    counters = encoder.counters()
    # pass 2: two small deltas, the noise page too large as one, the page zeroed in pass 1
    # (then held as zeros) a delta too; pass 1's four pages missed
    assert (counters["hits"], counters["misses"], counters["overflows"]) == (3, 4, 1)
    assert sum(map(len, payloads)) < len(CHANNEL) - 3 * (PAGE - 20)  # each delta a few bytes


def cuts() -> list[int]:
    """Every byte of the first packet's header, a stride through the rest, and each byte
    around every record's end."""
    ends, at = [], 0
    for record in passes():
        at += len(write_channel([record])) if type(record) is not ChannelHello else 64
        ends.append(at)
    around = {e + d for e in ends for d in (-2, -1, 1, 2)}
    return sorted({*range(1, 64 + 1400), *range(64, len(CHANNEL), 509), *around} - {0})


def test_split_anywhere_the_bytes_and_payloads_are_the_same() -> None:
    whole = carried([CHANNEL])[2]
    for cut in cuts():
        if cut >= len(CHANNEL):
            continue
        out, _, payloads = carried([CHANNEL[:cut], CHANNEL[cut:]])
        assert out == CHANNEL, cut
        assert payloads == whole, cut
    byte_by_byte = carried([CHANNEL[i : i + 1] for i in range(len(CHANNEL))])
    assert byte_by_byte[0] == CHANNEL


def test_a_channel_cut_inside_a_packet_fails_at_finish() -> None:
    encoder = codec_for(CHANNEL[:4], CHAIN)
    encoder.encode(CHANNEL[:-1])
    with pytest.raises(TruncatedError):
        encoder.finish()


def test_the_lanes_caches_are_their_own() -> None:
    """The second pass on another lane finds nothing: no delta crosses, yet bytes are exact."""
    records = passes()
    one = write_channel(records[:5])
    other = write_channel([records[0], *records[5:]])
    for channel in (one, other):
        out, encoder, _ = carried([channel])
        assert out == channel
    assert encoder.counters()["hits"] == 0


def test_codec_for_takes_multifd_with_xbzrle_only() -> None:
    assert type(codec_for(CHANNEL[:4], FilterChain([]))) is Verbatim
    assert type(codec_for(b"QEVM", CHAIN)) is Verbatim
    assert type(codec_for(CHANNEL[:3], CHAIN)) is Verbatim


def decoded_until(payloads: list[bytes], bad: bytes) -> None:
    decoder = codec_for(CHANNEL[:4], CHAIN)
    for payload in payloads:
        decoder.decode(payload)
    decoder.decode(bad)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: p[:-1],  # a page short
        lambda p: p + b"\0",  # a byte beyond the pages
        lambda p: bytes([7]) + p[1:],  # an unknown kind
        lambda p: p[:1345] + b"\x05" + p[1346:],  # an unknown page entry
        lambda p: p[:1345] + b"\x01\x00\x03" + p[1348:],  # a delta against a page not held
        lambda p: p[:12] + b"\x04" + p[13:],  # pages of a packet its header says is zstd
    ],
)
def test_bad_payloads_are_refused(mangle) -> None:
    _, _, payloads = carried([CHANNEL])
    with pytest.raises(CorruptError):
        decoded_until(payloads[:1], mangle(payloads[1]))


def test_a_payload_that_is_not_the_next_record_is_refused() -> None:
    _, _, payloads = carried([CHANNEL])
    with pytest.raises(MigpipeError, match="unknown packet flags"):  # decode's parser says
        decoded_until(payloads[:1], bytes([AS_IS]) + CHANNEL[:64])  # a second initial message
    with pytest.raises(MigpipeError, match="not a multifd channel"):
        decoded_until([], payloads[1])  # no initial message first


def test_encode_reports_the_lanes_counters_summed() -> None:
    one, other = carried([CHANNEL])[1], carried([CHANNEL])[1]
    figures = lane_counters([Verbatim(), one, other])["multifd-xbzrle"]
    assert figures["lanes"] == 2
    assert (figures["hits"], figures["misses"]) == (6, 8)
    assert lane_counters([Verbatim()]) == {}
