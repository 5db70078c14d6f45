"""The sans-IO core: parse -> write is byte-identical in any chunking; bad input is refused."""

import random

import pytest
from test_scan import assert_modes_agree

from migpipe.errors import EXIT_INCOMPATIBLE, MigpipeError
from migpipe.stream import format as fmt
from migpipe.stream.parser import StreamParser, parse_bytes
from migpipe.stream.records import (
    Command,
    ConfigSubsection,
    Configuration,
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    NormalPage,
    OpaqueData,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VmDescription,
    XbzrlePage,
    ZeroPage,
)
from migpipe.stream.writer import StreamWriter, write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest

PAGE = 4096


def synthetic_stream(**model: object) -> bytes:
    defaults: dict[str, object] = {"ram_size": 1 << 20, "iterations": 3, "dirty_share": 0.2}
    return write_records(SyntheticGuest(GuestModel(**{**defaults, **model})).records())


def ram_stream(pages: list, *, capabilities: tuple[str, ...] = (), tail: list | None = None):
    """A minimal stream: one RAM block 'pc.ram' of 16 pages, `pages` in one PART, then END."""
    subsections: tuple[ConfigSubsection, ...] = ()
    if capabilities:
        payload = fmt.BE32.pack(len(capabilities)) + b"".join(
            bytes([len(c)]) + c.encode() for c in capabilities
        )
        subsections = (ConfigSubsection(fmt.CONFIG_CAPABILITIES, 1, payload),)
    addr = 0 if "x-ignore-shared" in capabilities else None
    records = [
        FileHeader(3),
        Configuration("pc-i440fx-7.2", subsections),
        SectionStart(2, "ram", 0, 4),
        MemSize(16 * PAGE, (RamBlock("pc.ram", 16 * PAGE, None, addr),)),
        EndOfSection(),
        SectionFooter(2),
        SectionPart(2),
        *pages,
        EndOfSection(),
        SectionFooter(2),
        SectionEnd(2),
        EndOfSection(),
        SectionFooter(2),
        *(tail or []),
        SectionFull(3, "timer", 0, 2),
        OpaqueData(b"\x01" * 24),
        SectionFooter(3),
        Eof(),
        VmDescription(b'{"page_size": 4096, "devices": []}'),
    ]
    return records


def parse_in_chunks(data: bytes, sizes: list[int]) -> list:
    parser = StreamParser()
    records, at, index = [], 0, 0
    while at < len(data):
        size = sizes[index % len(sizes)]
        parser.feed(data[at : at + size])
        records += parser.next_records()
        at += size
        index += 1
    parser.close()
    return records + parser.next_records()


def merge_opaque(records: list) -> list:
    """Opaque bodies may arrive in several pieces, depending on chunking; join neighbours."""
    merged: list = []
    for record in records:
        if isinstance(record, OpaqueData) and merged and isinstance(merged[-1], OpaqueData):
            merged[-1] = OpaqueData(merged[-1].data + record.data)
        else:
            merged.append(record)
    return merged


# -- round trips --------------------------------------------------------------------------------


def test_synthetic_stream_rewrites_byte_identical() -> None:
    data = synthetic_stream()
    records = parse_bytes(data)
    assert write_records(records) == data
    kinds = {type(r) for r in records}
    assert {ZeroPage, NormalPage, SectionPart, SectionEnd, SectionFull, VmDescription} <= kinds


@pytest.mark.parametrize("sizes", [[1], [3, 5], [7, 4096, 1], [4095, 4097], [1 << 20]])
def test_any_chunking_gives_the_same_records(sizes: list[int]) -> None:
    data = synthetic_stream(ram_size=256 << 10, iterations=2)
    whole = parse_bytes(data)
    chunked = parse_in_chunks(data, sizes)
    assert merge_opaque(chunked) == merge_opaque(whole)
    assert write_records(chunked) == data


def test_random_split_points() -> None:
    data = synthetic_stream(ram_size=512 << 10)
    rng = random.Random(7)
    for _ in range(5):
        sizes = [rng.choice((1, 2, 9, 100, 4105, 70000)) for _ in range(50)]
        assert write_records(parse_in_chunks(data, sizes)) == data


def test_configuration_subsections_and_ignore_shared_round_trip() -> None:
    uuid = ConfigSubsection(fmt.CONFIG_UUID, 1, bytes(range(16)))
    records = ram_stream(
        [NormalPage("pc.ram", PAGE, b"\xaa" * PAGE, True)], capabilities=("x-ignore-shared",)
    )
    config = records[1]
    records[1] = Configuration(config.machine, (*config.subsections, uuid))
    data = write_records(records)
    parsed = parse_bytes(data)
    assert parsed[1].subsections[1] == uuid
    assert parsed[3].blocks[0].addr == 0  # the x-ignore-shared field was read, not skipped
    assert write_records(parsed) == data


def test_commands_and_packaged_blob_are_carried() -> None:
    blob = b"\x04\x00\x00\x00\x09" + bytes(40)
    tail = [Command(2, fmt.BE32.pack(1)), Command(7, fmt.BE32.pack(len(blob))), OpaqueData(blob)]
    records = ram_stream([ZeroPage("pc.ram", 0, 0, True)], tail=tail)
    data = write_records(records)
    parsed = parse_bytes(data)
    assert parsed == records
    assert write_records(parse_in_chunks(data, [3])) == data


def test_qemu_10_switchover_start_round_trips() -> None:
    """QEMU 10.0 (10.0 machine types) sends SWITCHOVER_START after the last PART and before the
    END sections; after another live handler's opaque body it must end that body's search."""
    records = ram_stream([ZeroPage("pc.ram", 0, 0, True)])
    records[1] = Configuration("pc-i440fx-10.0")
    end = records.index(SectionEnd(2))
    records[end:end] = [SectionPart(4), OpaqueData(b"\x7e" * 9), SectionFooter(4), Command(11, b"")]
    first_part = records.index(SectionPart(2))
    records[first_part:first_part] = [
        SectionStart(4, "dirty-bitmap", 0, 1),
        OpaqueData(b"\x00"),
        SectionFooter(4),
    ]
    data = write_records(records)
    assert merge_opaque(parse_bytes(data)) == records
    assert write_records(parse_in_chunks(data, [1])) == data


@pytest.mark.parametrize(
    ("commands", "advised"),
    [
        ([], False),  # precopy: the first section comes with nothing said
        ([Command(1, b""), Command(2, fmt.BE32.pack(1))], False),  # a return path, no postcopy
        ([Command(1, b""), Command(3, bytes(16))], True),  # postcopy-ram's ADVISE
        ([Command(3, b"")], False),  # dirty bitmaps' postcopy: no postcopy-ram, no preempt
    ],
)
def test_postcopy_advised_is_known_before_the_first_section(commands, advised) -> None:
    records = ram_stream([ZeroPage("pc.ram", 0, 0, True)])
    records[2:2] = commands
    data = write_records(records)
    parser = StreamParser()
    start = data.index(b"\x01\x00\x00\x00\x02\x03ram")  # the RAM section's START
    parser.feed(data[:start])
    parser.next_records()
    assert parser.postcopy_advised is (True if advised else None)
    parser.feed(data[start:])
    parser.next_records()
    assert parser.postcopy_advised is advised


def test_device_state_with_a_fake_footer_inside() -> None:
    """A footer pattern followed by bytes that cannot start an item is body, not footer."""
    body = b"\x7e\x00\x00\x00\x03" + b"\xee" * 20 + b"\x7e\x00\x00\x00\x03\x01\x00\x00\x00\x09\x00"
    records = ram_stream([ZeroPage("pc.ram", 0, 0, True)])
    at = records.index(OpaqueData(b"\x01" * 24))
    records[at] = OpaqueData(body)
    data = write_records(records)
    assert merge_opaque(parse_bytes(data)) == records
    assert merge_opaque(parse_in_chunks(data, [1])) == records


def test_stream_without_vmdescription_completes() -> None:
    records = ram_stream([ZeroPage("pc.ram", 0, 0, True)])[:-1]
    assert parse_bytes(write_records(records))[-1] == Eof()


def test_writer_names_a_block_when_continue_would_be_wrong() -> None:
    records = ram_stream([])
    records[3] = MemSize(32 * PAGE, (RamBlock("pc.ram", 16 * PAGE), RamBlock("pc.rom", 16 * PAGE)))
    pages = [ZeroPage("pc.ram", 0), ZeroPage("pc.ram", PAGE), ZeroPage("pc.rom", 0)]
    at = records.index(SectionPart(2)) + 1
    records[at:at] = pages
    parsed = parse_bytes(write_records(records))
    assert [(p.block, p.named) for p in parsed if isinstance(p, ZeroPage)] == [
        ("pc.ram", True),
        ("pc.ram", False),
        ("pc.rom", True),
    ]


def test_writer_output_is_reproducible_by_a_fresh_writer() -> None:
    records = parse_bytes(synthetic_stream())
    first, second = bytearray(), bytearray()
    StreamWriter().write_all(first, records)
    StreamWriter().write_all(second, records)
    assert first == second


# -- refusals -------------------------------------------------------------------------------------


def expect_error(data: bytes, fragment: str) -> MigpipeError:
    with pytest.raises(MigpipeError) as caught:
        parse_bytes(data)
    assert fragment in caught.value.message, caught.value.message
    assert caught.value.offset is not None
    error = caught.value
    # Counting pages instead of making them (StreamParser(pages=False)) refuses it the same way.
    assert assert_modes_agree(data, [len(data)])[-1] == ("refused", *error.args, error.status)
    return error


def test_every_truncation_is_refused() -> None:
    data = write_records(
        ram_stream(
            [
                NormalPage("pc.ram", 0, b"\x11" * PAGE, True),
                XbzrlePage("pc.ram", 0, b"\x00\x01\x22"),
            ]
        )
    )
    vmdesc_start = data.rindex(b"\x06\x00\x00\x00")
    for cut in range(vmdesc_start + 1):  # anything before the VM description is incomplete
        if cut == vmdesc_start:
            continue  # EOF with no VM description is a complete stream (suppress-vmdesc)
        with pytest.raises(MigpipeError) as caught:
            parse_bytes(data[:cut])
        assert "truncated" in caught.value.message
        assert caught.value.offset <= cut
    for cut in range(vmdesc_start + 1, len(data)):
        with pytest.raises(MigpipeError):
            parse_bytes(data[:cut])


def test_bad_magic() -> None:
    error = expect_error(b"QEVX" + bytes(20), "bad magic")
    assert error.offset == 0


@pytest.mark.parametrize("version,why", [(2, "obsolete"), (4, "unsupported")])
def test_bad_version(version: int, why: str) -> None:
    assert expect_error(b"QEVM" + fmt.BE32.pack(version), why).offset == 4


def test_unknown_section_type() -> None:
    data = bytearray(write_records(ram_stream([])))
    at = data.index(b"\x04\x00\x00\x00\x03")  # the timer FULL section
    data[at] = 0x09
    assert expect_error(bytes(data), "unknown section type 0x09").offset == at


def page_word_offset(data: bytes) -> int:
    """Where the first record of the PART section starts."""
    return data.index(b"\x02\x00\x00\x00\x02") + 5


@pytest.mark.parametrize("flags", [0x0A, 0x400 - 1, 0x001, 0x080])
def test_unknown_or_unsupported_page_flags(flags: int) -> None:
    data = bytearray(write_records(ram_stream([ZeroPage("pc.ram", 0, 0, True)])))
    at = page_word_offset(data)
    data[at : at + 8] = fmt.BE64.pack(flags)
    error = expect_error(bytes(data), "")
    assert error.offset == at
    assert any(w in error.message for w in ("flags", "obsolete", "RDMA", "CONTINUE"))


def test_page_for_a_block_never_announced() -> None:
    data = write_records(ram_stream([ZeroPage("vga.vram", 0, 0, True)]))
    expect_error(data, "never announced")


def test_page_offset_beyond_its_block() -> None:
    data = write_records(ram_stream([ZeroPage("pc.ram", 16 * PAGE, 0, True)]))
    assert expect_error(data, "beyond RAM block").offset == page_word_offset(data)


def test_continue_before_any_named_block() -> None:
    data = bytearray(write_records(ram_stream([ZeroPage("pc.ram", 0, 0, True)])))
    at = page_word_offset(data)
    data[at : at + 8 + 7 + 1] = fmt.BE64.pack(fmt.RAM_ZERO | fmt.RAM_CONTINUE) + b"\x00" * 8
    expect_error(bytes(data), "CONTINUE page record before")


def test_bad_footer() -> None:
    data = bytearray(write_records(ram_stream([])))
    at = data.index(b"\x7e\x00\x00\x00\x02")
    data[at + 4] = 0x07
    assert expect_error(bytes(data), "bad section footer").offset == at


def test_xbzrle_payload_over_a_page() -> None:
    data = bytearray(write_records(ram_stream([XbzrlePage("pc.ram", 0, b"\x00\x01\x22", True)])))
    at = page_word_offset(data)
    length_at = at + 8 + 7 + 1
    data[length_at : length_at + 2] = fmt.BE16.pack(PAGE + 1)
    expect_error(bytes(data), "XBZRLE page of 4097 bytes")


def test_part_for_a_section_never_started() -> None:
    data = bytearray(write_records(ram_stream([])))
    at = data.index(b"\x02\x00\x00\x00\x02")
    data[at + 4] = 0x05
    expect_error(bytes(data), "never started")


def test_mem_size_total_must_match_the_block_list() -> None:
    records = ram_stream([])
    records[3] = MemSize(8 * PAGE, records[3].blocks)
    expect_error(write_records(records), "exceeds the MEM_SIZE total")


def test_trailing_bytes_after_the_stream() -> None:
    expect_error(write_records(ram_stream([])) + b"\x00", "trailing bytes")


def test_vmdescription_length_is_bounded() -> None:
    data = write_records(ram_stream([])[:-1]) + b"\x06\xff\xff\xff\xff{"
    expect_error(data, "exceeds the")


def test_mapped_ram_is_refused_clearly() -> None:
    """Unless the consumer reads a file by offset (migpipe.stream.mappedram; its tests are
    tests/test_mappedram.py)."""
    data = write_records(ram_stream([], capabilities=("mapped-ram",)))
    assert expect_error(data, "not in order from a pipe").status == EXIT_INCOMPATIBLE


def test_continue_after_a_repeated_block_list_round_trips() -> None:
    """QEMU's receiver keeps its last block across MEM_SIZE; so must parser and writer."""
    records = ram_stream([ZeroPage("pc.ram", 0, 0, True)])
    at = records.index(SectionPart(2)) + 2
    records[at:at] = [records[3], ZeroPage("pc.ram", PAGE, 0, False)]
    data = write_records(records)
    assert write_records(parse_bytes(data)) == data


def test_target_page_bits_sets_the_page_size() -> None:
    records = ram_stream([NormalPage("pc.ram", 8192, b"\x42" * 8192, True)])
    bits = ConfigSubsection(fmt.CONFIG_TARGET_PAGE_BITS, 1, fmt.BE32.pack(13))
    records[1] = Configuration(records[1].machine, (bits,))
    data = write_records(records)
    pages = [r for r in parse_bytes(data) if isinstance(r, NormalPage)]
    assert len(pages[0].data) == 8192
    assert write_records(parse_bytes(data)) == data


def test_part_for_a_full_section_is_refused() -> None:
    data = bytearray(write_records(ram_stream([])))
    at = data.index(b"\x02\x00\x00\x00\x02")
    data[at + 4] = 0x03
    expect_error(bytes(data), "never started")
