"""The multifd channel format (migpipe.stream.multifd): parse -> write is byte-exact in any
chunking, hostile bytes end in one clean error, and real QEMU 7.2 and 10.0 channels, recorded
by tests/link.py between two QEMUs migrating over UNIX sockets, parse, rewrite and keep their
sync points with the main stream."""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import qemuvm
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from link import Link

from migpipe.errors import (
    EXIT_CORRUPT,
    EXIT_ERROR,
    EXIT_INCOMPATIBLE,
    EXIT_TRUNCATED,
    MigpipeError,
)
from migpipe.stream import multifd
from migpipe.stream.multifd import (
    ChannelHello,
    ChannelKind,
    DeviceStatePacket,
    MultifdParser,
    MultifdWriter,
    RamPacket,
    classify,
    parse_channel,
    write_channel,
)
from migpipe.stream.parser import StreamParser
from migpipe.stream.records import EndOfSection, MultifdFlush

PAGE = 4096
UUID = bytes(range(16))
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE


def sample_records() -> list[multifd.ChannelRecord]:
    """A channel with one of everything: 10.0-style packets (zeroed spare slots, zero pages,
    an empty SYNC), 7.2-style ones (stale slots and block name in a SYNC with a stale
    next_packet_size, reserved words set), a compressed chunk and a device-state buffer."""
    stale = struct.pack(">3Q", 0x1000, 0x2000, 0x3000) + bytes(8 * 125)
    return [
        ChannelHello(UUID, 1),
        RamPacket(0, 7, "pc.ram", (0, 0x5000), (0x9000,), page(1) + page(2), 128, 2 * PAGE),
        RamPacket(1, 9, "", (), (), b"", 0, 0),
        RamPacket(1, 10, "pc.ram", (), (), b"", 128, 3 * PAGE, stale, b"\x01" + bytes(27)),
        RamPacket(4, 11, "pc.ram", (0x7000, 0x8000), (), b"\x28\xb5\x2f\xfd zstd", 128, 9),
        RamPacket(0, 12, "/rom@etc/acpi/tables", (0x1000,), (), page(3), 128, PAGE),
        DeviceStatePacket("0000:00:02.0/vfio", 3, b"\x00" * 5 + b"state"),
    ]


SAMPLE = write_channel(sample_records())


def parsed_in(chunks: list[bytes]) -> list[multifd.ChannelRecord]:
    parser = MultifdParser()
    records = []
    for chunk in chunks:
        parser.feed(chunk)
        records += parser.next_records()
    return records + parser.finish()


def test_sample_roundtrips_at_every_split() -> None:
    """Every way to cut the sample in two (and, for a spread of points, in three) gives the
    same records, and writing them gives back the same bytes."""
    expected = sample_records()
    assert parse_channel(SAMPLE) == expected
    for cut in range(len(SAMPLE) + 1):
        assert parsed_in([SAMPLE[:cut], SAMPLE[cut:]]) == expected, cut
    for a, b in itertools.combinations(range(0, len(SAMPLE), 211), 2):
        assert parsed_in([SAMPLE[:a], SAMPLE[a:b], SAMPLE[b:]]) == expected, (a, b)
    assert write_channel(parsed_in([SAMPLE[i : i + 1] for i in range(len(SAMPLE))])) == SAMPLE


def test_a_cut_anywhere_inside_a_record_is_truncation_however_fed() -> None:
    """Every prefix of the sample that ends inside a record, fed whole or in two pieces split
    anywhere before its end, raises a truncation at the start of that record."""
    writer = MultifdWriter()
    starts = list(itertools.accumulate(len(writer.encode(r)) for r in sample_records()))
    starts = [0, *starts[:-1]]
    for cut in range(len(SAMPLE)):
        if cut in starts[1:]:
            continue
        record_start = max(s for s in starts if s <= cut)
        for split in {0, cut // 2, max(cut - 1, 0), record_start}:
            parser = MultifdParser()
            parser.feed(SAMPLE[:split])
            parser.next_records()
            parser.feed(SAMPLE[split:cut])
            with pytest.raises(MigpipeError) as caught:
                parser.finish()
            assert (caught.value.status, caught.value.offset) == (EXIT_TRUNCATED, record_start)


def test_pages_are_views_of_the_fed_bytes() -> None:
    """A packet's pages are not copied: its payload is a memoryview of the bytes fed."""
    records = parse_channel(SAMPLE)
    payload = records[1].payload
    assert isinstance(payload, memoryview) and payload.obj is SAMPLE
    assert bytes(payload) == page(1) + page(2)


def test_fed_memory_the_caller_reuses_is_copied() -> None:
    """A bytearray or memoryview fed is copied: the caller may reuse it at once."""
    buffer = bytearray(SAMPLE)
    parser = MultifdParser()
    parser.feed(memoryview(buffer))
    buffer[:] = bytes(len(buffer))
    assert parser.finish() == sample_records()


def test_writer_parts_are_header_and_payload() -> None:
    """parts() is what write() joins: a header and the payload object itself (for writev)."""
    writer = MultifdWriter()
    for record in parse_channel(SAMPLE)[1:]:
        head, payload = writer.parts(record)
        assert payload is record.payload
        assert len(head) == (1344 if type(record) is RamPacket else 276)


def test_classify_by_first_four_bytes() -> None:
    assert classify(b"QEVM\x00\x00\x00\x03") is ChannelKind.MAIN
    assert classify(SAMPLE[:4]) is ChannelKind.MULTIFD
    # postcopy-preempt's channel: a page record's word (offset | flags), no magic
    assert classify(struct.pack(">Q", 0x7FF000 | 0x28)) is ChannelKind.OTHER
    with pytest.raises(ValueError, match="4 bytes"):
        classify(b"QEV")


# -- hostile input: one clean error, naming the offset ----------------------------------------

HELLO = SAMPLE[:64]
RAM = 64  # the first RAM packet's offset in SAMPLE


def patched(at: int, fmt: str, value: int | bytes) -> bytes:
    data = bytearray(SAMPLE)
    struct.pack_into(fmt, data, at, value)
    return bytes(data)


def device_packet(**fields: object) -> bytes:
    """The hello, then a device-state packet with the given header fields."""
    values = {"flags": 0x40, "idstr": b"dev", "instance": 0, "size": 4, "payload": b"abcd"}
    values.update(fields)
    head = struct.pack(">III256sII", 0x11223344, 1, values["flags"], values["idstr"], 0, 0)
    head = head[:268] + struct.pack(">II", values["instance"], values["size"])
    return HELLO + head + values["payload"]


HOSTILE = {
    "empty channel": (b"", EXIT_TRUNCATED, 0, "ended in its initial message"),
    "cut hello": (HELLO[:63], EXIT_TRUNCATED, 0, "ended in its initial message"),
    "cut header": (SAMPLE[: RAM + 11], EXIT_TRUNCATED, RAM, "channel 1 ended in a packet"),
    "cut pages": (SAMPLE[: RAM + 1344 + 5], EXIT_TRUNCATED, RAM, "ended in a packet"),
    "main stream": (b"QEVM" + SAMPLE[4:], EXIT_ERROR, 0, "main stream, not a multifd"),
    "bad magic": (b"XXXX" + SAMPLE[4:], EXIT_ERROR, 0, 'bad magic "XXXX"'),
    "hello version": (patched(4, ">I", 2), EXIT_INCOMPATIBLE, 4, "multifd version 2"),
    "packet magic": (patched(RAM, ">I", 0x11223345), EXIT_CORRUPT, RAM, "packet magic"),
    "packet version": (patched(RAM + 4, ">I", 0), EXIT_INCOMPATIBLE, RAM + 4, "version 0"),
    "unknown flag": (patched(RAM + 8, ">I", 0x80), EXIT_INCOMPATIBLE, RAM + 8, "flags 0x80"),
    "compression 3": (patched(RAM + 8, ">I", 6), EXIT_INCOMPATIBLE, RAM + 8, "flags 0x6"),
    "pages_alloc": (patched(RAM + 12, ">I", 129), EXIT_CORRUPT, RAM + 12, "pages_alloc 129"),
    "normal pages": (patched(RAM + 16, ">I", 129), EXIT_CORRUPT, RAM + 16, "129 normal pages"),
    "zero pages": (patched(RAM + 32, ">I", 127), EXIT_CORRUPT, RAM + 32, "127 zero pages"),
    "unaligned": (patched(RAM + 328, ">Q", 0x5001), EXIT_CORRUPT, RAM + 328, "offset 0x5001"),
    "offset past RAM": (patched(RAM + 320, ">Q", 1 << 62), EXIT_CORRUPT, RAM + 320, "0x4000"),
    "no NUL": (patched(RAM + 64, ">256s", b"x" * 256), EXIT_CORRUPT, RAM + 64, "NUL-ended"),
    "junk after NUL": (patched(RAM + 72, ">B", 1), EXIT_CORRUPT, RAM + 64, "block name"),
    "unnamed pages": (patched(RAM + 64, ">6s", bytes(6)), EXIT_CORRUPT, RAM + 64, '""'),
    "page size": (patched(RAM + 20, ">I", 3 * PAGE), EXIT_CORRUPT, RAM + 20, "next_packet_size"),
    "device sync": (device_packet(flags=0x41), EXIT_CORRUPT, 72, "flags 0x41"),
    "device zlib": (device_packet(flags=0x42), EXIT_CORRUPT, 72, "SYNC or compression"),
    "device empty": (device_packet(size=0, payload=b""), EXIT_CORRUPT, 64 + 272, "0 bytes"),
    "device huge": (device_packet(size=1 << 30), EXIT_CORRUPT, 64 + 272, "payload of"),
    "device name": (device_packet(idstr=b"d" * 256), EXIT_CORRUPT, 64 + 12, "device idstr"),
    "device cut": (device_packet()[:-1], EXIT_TRUNCATED, 64, "ended in a packet"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=str)
def test_hostile_input_is_one_clean_error(case: str) -> None:
    data, status, offset, words = HOSTILE[case]
    with pytest.raises(MigpipeError) as caught:
        parse_channel(data)
    error = caught.value
    assert (error.status, error.offset) == (status, offset), str(error)
    assert words in str(error) and f"(at byte offset {offset})" in str(error)
    assert "\n" not in str(error) and "b'" not in str(error)


def test_compressed_payload_is_bounded() -> None:
    """A compressed chunk is at most twice a packet's pages (QEMU's receive buffer)."""
    at = RAM + 1344 + 2 * PAGE + 1344 + 1344  # the zstd packet
    data = bytearray(SAMPLE)
    struct.pack_into(">I", data, at + 20, (1 << 20) + 1)
    with pytest.raises(MigpipeError, match="compressed payload of 1048577") as caught:
        parse_channel(bytes(data))
    assert caught.value.offset == at + 20


def test_a_channel_ending_between_packets_is_whole() -> None:
    """A channel has no end marker: ending after any packet is not a truncation (the main
    stream's sync points tell whether packets are missing)."""
    records = parse_channel(SAMPLE[: RAM + 1344 + 2 * PAGE])
    assert records == sample_records()[:2]


# -- fuzzing -----------------------------------------------------------------------------------

offsets_of = st.lists(st.integers(0, (1 << 34) - 1).map(lambda n: n * PAGE), max_size=6)
names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=255)


@st.composite
def ram_packets(draw: st.DrawFn) -> RamPacket:
    normal = tuple(draw(offsets_of))
    zero = tuple(draw(offsets_of))
    compression = draw(st.sampled_from(sorted(multifd.COMPRESSIONS)))
    flags = compression | draw(st.sampled_from([0, 1]))
    if compression and normal:
        payload = draw(st.binary(max_size=300))
        size = len(payload)
    else:
        payload = b"".join(page(draw(st.integers(0, 255))) for _ in normal)
        size = len(payload) if normal else draw(st.integers(0, 2**32 - 1))
    block = draw(names) if normal or zero else draw(st.sampled_from(["", "pc.ram"]))
    used = len(normal) + len(zero)
    spare = draw(st.sampled_from([b"", b"\x01" * (8 * (128 - used))]))
    reserved = draw(st.sampled_from([b"", bytes(27) + b"\x05"]))
    alloc = draw(st.integers(used, 128))
    return RamPacket(
        flags, draw(st.integers(0, 2**64 - 1)), block, normal, zero, payload, alloc, size,
        spare, reserved,
    )  # fmt: skip


# (lambdas: st.builds would also draw the fields that have defaults)
device_packets = st.builds(
    lambda idstr, instance, payload: DeviceStatePacket(idstr, instance, payload),
    names,
    st.integers(0, 2**32 - 1),
    st.binary(min_size=1, max_size=300),
)
hellos = st.builds(
    lambda uuid, channel: ChannelHello(uuid, channel),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 255),
)
channels = st.tuples(
    hellos,
    st.lists(st.one_of(ram_packets(), device_packets), max_size=6),
).map(lambda t: [t[0], *t[1]])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=channels, cuts=st.lists(st.integers(0, 1 << 20), max_size=8))
def test_any_channel_roundtrips_in_any_chunking(
    records: list[multifd.ChannelRecord], cuts: list[int]
) -> None:
    data = write_channel(records)
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    parsed = parsed_in(chunks)
    assert parsed == records
    assert write_channel(parsed) == data


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_channels_parse_or_fail_cleanly(data: st.DataObject) -> None:
    """Flipped, cut, inserted or overwritten bytes: the channel either parses (and rewrites
    to the same bytes) or raises one MigpipeError with an offset inside the input."""
    raw = bytearray(SAMPLE)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "word"]))
        if kind == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            raw[at : at + 4] = data.draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        if not raw:
            raw = bytearray(SAMPLE[:1])
    mutated = bytes(raw)
    try:
        records = parse_channel(mutated)
    except MigpipeError as exc:
        assert exc.offset is not None and 0 <= exc.offset <= len(mutated)
        assert exc.status in (EXIT_ERROR, EXIT_CORRUPT, EXIT_INCOMPATIBLE, EXIT_TRUNCATED)
    else:
        assert write_channel(records) == mutated


# -- real QEMU: multifd over UNIX sockets through tests/link.py --------------------------------

CHANNELS = 2


def migrate_multifd(
    guest_elf: Path, workdir: Path, qemu: qemuvm.QemuBuild, compression: str
) -> Path:
    """Live-migrate the dirtying guest with multifd (CHANNELS channels, QEMU's
    multifd-compression `compression`) from a source to a destination QEMU through the link,
    recording; returns the recordings' directory."""
    record = workdir / "record"
    dest_sock = workdir / "dest.sock"
    multifd_on = {"capability": "multifd", "state": True}
    channels = {"multifd-channels": CHANNELS, "multifd-compression": compression}
    pacing = qemuvm.PACINGS["dirty"]
    args = ["-S", "-incoming", "defer"]
    with qemuvm.Vm(workdir, "dest", args, qemu=qemu) as dest:
        events = {"capability": "events", "state": True}
        dest.qmp.execute("migrate-set-capabilities", capabilities=[events, multifd_on])
        dest.qmp.execute("migrate-set-parameters", **channels)
        dest.qmp.execute("migrate-incoming", uri=f"unix:{dest_sock}")
        with Link(f"unix:{workdir}/link.sock", f"unix:{dest_sock}", record=record) as link:
            with qemuvm.source_vm(guest_elf, "dirty", workdir, qemu=qemu) as src:
                src.qmp.execute("migrate-set-capabilities", capabilities=[multifd_on])
                src.qmp.execute("migrate-set-parameters", **channels)
                src.qmp.execute("migrate", uri=link.address)
                wait_source(src, pacing)
                qemuvm.wait_incoming(dest)
            relayed = link.close()
    assert len(relayed) == 1 + CHANNELS
    return record


def wait_source(src: qemuvm.Vm, pacing: qemuvm.Pacing) -> None:
    """Follow the source to completion, lifting the downtime limit at the pacing's pass (as
    qemuvm.run_migration does for exec: migrations), so there are a few passes to sync."""
    while True:
        event = src.qmp.wait_event(("MIGRATION", "MIGRATION_PASS"), timeout=60)
        if event["event"] == "MIGRATION_PASS":
            if event["data"]["pass"] == pacing.switchover_pass:
                limit = {"downtime-limit": pacing.final_downtime_ms}
                src.qmp.execute("migrate-set-parameters", **limit)
            continue
        status = event["data"]["status"]
        if status in ("failed", "cancelled"):
            desc = src.qmp.execute("query-migrate").get("error-desc", status)
            raise src.failure(f"multifd migration {status}", desc)
        if status == "completed":
            return


def recordings(record: Path) -> Iterator[tuple[ChannelKind, bytes]]:
    for path in sorted(record.glob("*.fwd"), key=lambda p: int(p.stem)):
        data = path.read_bytes()
        yield classify(data[:4]), data


# Each channel's compressor is one stream, flushed at the end of every packet.
INFLATERS: dict[str, Callable[[], Callable[[bytes], bytes]]] = {
    "zlib": lambda: zlib.decompressobj().decompress,
    "zstd": lambda: zstandard.ZstdDecompressor().decompressobj().decompress,
}


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_qemu_multifd_channels_parse_rewrite_and_sync(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, compression: str
) -> None:
    """QEMU migrating with 2 multifd channels: both channels parse to their end and rewrite
    byte-exactly, they are channels 0 and 1 of one migration, and each carries one SYNC
    packet per sync point of the main stream (MULTIFD_FLUSH from 8.1, EOS on 7.2)."""
    record = migrate_multifd(guest_elf, tmp_path, qemu_build, compression)
    captured = list(recordings(record))
    kinds = [kind for kind, _ in captured]
    assert kinds == [ChannelKind.MAIN] + [ChannelKind.MULTIFD] * CHANNELS  # main first
    main = StreamParser(pages=False)
    main.feed(captured[0][1])
    stream = main.finish()
    flushes = sum(type(r) is MultifdFlush for r in stream)
    ends = sum(type(r) is EndOfSection for r in stream)
    sync_points = flushes if qemu_build is not qemuvm.QEMU_7_2 else ends
    assert (flushes == 0) == (qemu_build is qemuvm.QEMU_7_2)
    hellos, numbers, pages = [], [], 0
    for _, data in captured[1:]:
        records = parse_channel(data)
        assert write_channel(records) == data
        odd = 65521  # a prime: packets start anywhere in the chunks
        assert parsed_in([data[i : i + odd] for i in range(0, len(data), odd)]) == records
        hello, packets = records[0], records[1:]
        assert type(hello) is ChannelHello
        hellos.append(hello)
        assert all(type(p) is RamPacket for p in packets)
        syncs = [p for p in packets if p.sync]
        assert len(syncs) == sync_points > 2
        numbers += [p.packet_num for p in packets]
        assert [p.packet_num for p in packets] == sorted(p.packet_num for p in packets)
        pages += sum(len(p.normal) + len(p.zero) for p in packets)
        inflate = INFLATERS[compression]() if compression in INFLATERS else bytes
        for packet in packets:
            if packet.normal:  # its chunk inflates, in channel order, to its pages exactly
                assert packet.compression == compression
                assert len(inflate(packet.payload)) == PAGE * len(packet.normal)
    assert sorted(h.channel for h in hellos) == list(range(CHANNELS))
    assert len({h.uuid for h in hellos}) == 1
    if qemu_build is not qemuvm.QEMU_7_2:  # 7.2 can send a packet's number twice (a race)
        assert sorted(numbers) == list(range(len(numbers))), "one counter for all channels"
    pages += sum(main.page_counts.values())  # 7.2 sends zero pages on the main stream
    assert pages >= qemuvm.RAM_SIZE // PAGE  # every page of RAM went, once at least
