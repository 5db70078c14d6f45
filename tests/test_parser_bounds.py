"""Bounded work for any input: sizes a stream declares are checked before they are used, and a
record longer than the chunks it arrives in is joined a bounded number of times, not per chunk."""

import pytest
from test_stream_parser import ram_stream

from migpipe.errors import EXIT_INCOMPATIBLE, MigpipeError
from migpipe.stream import format as fmt
from migpipe.stream import parser as parser_module
from migpipe.stream.parser import MAX_RAM_TOTAL, StreamParser, iter_records, parse_bytes
from migpipe.stream.records import (
    Command,
    ConfigSubsection,
    Configuration,
    Eof,
    FileHeader,
    MemSize,
    NormalPage,
    OpaqueData,
    RamBlock,
    SectionFooter,
    SectionStart,
)
from migpipe.stream.writer import write_records

BE32, BE64 = fmt.BE32.pack, fmt.BE64.pack
HEAD = b"QEVM" + BE32(3) + b"\x07" + BE32(13) + b"pc-i440fx-7.2"
RAM_START = b"\x01" + BE32(2) + b"\x03ram" + BE32(0) + BE32(4)


def refusal(data: bytes, **options: int) -> MigpipeError:
    with pytest.raises(MigpipeError) as caught:
        parse_bytes(data, **options)
    assert caught.value.offset is not None and "\n" not in str(caught.value)
    return caught.value


def with_page_bits(records: list, bits: int) -> list:
    subsection = ConfigSubsection(fmt.CONFIG_TARGET_PAGE_BITS, 1, BE32(bits))
    return [records[0], Configuration(records[1].machine, (subsection,)), *records[2:]]


# -- page size --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, 17, 30, 0xFFFFFFFF])
def test_target_page_bits_outside_real_targets_are_refused(bits: int) -> None:
    data = write_records(with_page_bits(ram_stream([]), bits))
    error = refusal(data)
    assert f"target-page-bits {bits} is outside 10..16" in error.message
    assert error.offset == data.index(b"target-page-bits") + len(b"target-page-bits") + 4
    assert error.status == EXIT_INCOMPATIBLE


@pytest.mark.parametrize("bits", [10, 16])
def test_target_page_bits_of_real_targets_are_accepted(bits: int) -> None:
    page = 1 << bits
    records = with_page_bits(ram_stream([]), bits)
    records[3] = MemSize(16 * page, (RamBlock("pc.ram", 16 * page),))
    at = records.index(SectionFooter(2)) + 2  # in the PART section
    records.insert(at, NormalPage("pc.ram", page, b"\x42" * page, True))
    data = write_records(records)
    assert write_records(parse_bytes(data)) == data


@pytest.mark.parametrize("size", [512, 1 << 17, 1 << 40, 3 << 12, True, 4096.0])
def test_a_callers_page_size_is_checked_alike(size: object) -> None:
    with pytest.raises(MigpipeError, match="is not a power of two from 1024 to 65536") as caught:
        StreamParser(page_size=size)  # type: ignore[arg-type]
    assert caught.value.status == EXIT_INCOMPATIBLE


# -- long records fed in small pieces ---------------------------------------------------------


def feed_counting(parser: StreamParser, data: bytes, chunk: int) -> tuple[list, int, int]:
    """Feed `data` in `chunk`-byte pieces; the records, how often the parser's buffer was
    replaced and how many bytes those buffers held (what joining them copied, at most)."""
    records, joins, copied = [], 0, 0
    held = parser._buf  # kept alive, so `is` cannot be fooled by a reused address
    for at in range(0, len(data), chunk):
        parser.feed(data[at : at + chunk])
        records += parser.next_records()
        if parser._buf is not held:
            held = parser._buf
            joins, copied = joins + 1, copied + len(held)
    return records, joins, copied


def page_stream(bits: int) -> tuple[bytes, int, int]:
    """A stream with one page of 2**bits bytes; where its record starts and ends."""
    page = 1 << bits
    records = with_page_bits(ram_stream([]), bits)
    records[3] = MemSize(16 * page, (RamBlock("pc.ram", 16 * page),))
    at = records.index(SectionFooter(2)) + 2
    records.insert(at, NormalPage("pc.ram", 0, bytes(range(256)) * (page // 256), True))
    data = write_records(records)
    start = data.index(BE64(fmt.RAM_PAGE) + b"\x06pc.ram")
    return data, start, start + 8 + 7 + page


@pytest.mark.parametrize("pages", [True, False])
def test_a_huge_page_record_in_small_chunks_is_joined_a_few_times(pages: bool) -> None:
    data, start, end = page_stream(16)
    parser = StreamParser(pages=pages)
    parser.feed(data[:start])
    before = parser.next_records()
    during, joins, copied = feed_counting(parser, data[start:end], 64)  # 1024 chunks
    assert joins <= 3 and copied <= 3 * (end - start), (joins, copied)  # was 1025, 34 MB
    parser.feed(data[end:])
    parser.close()
    after = parser.next_records()
    if pages:
        assert before + during + after == parse_bytes(data)
    assert parser.page_counts["normal"] == (0 if pages else 1)


def test_a_long_command_in_small_chunks_is_joined_a_few_times() -> None:
    records = ram_stream([])
    bitmap = Command(10, b"ram\x00" + bytes(range(256)) * 255)  # RECV_BITMAP, 65284 bytes
    records.insert(2, bitmap)
    data = write_records(records)
    start = data.index(b"\x08\x00\x0a")
    parser = StreamParser()
    parser.feed(data[:start])
    parser.next_records()
    during, joins, copied = feed_counting(parser, data[start : start + 5 + 65284], 64)
    assert during[-1] == bitmap
    assert joins <= 2 and copied <= 2 * 65289, (joins, copied)


def long_block_list(count: int, name_length: int = 100) -> MemSize:
    blocks = tuple(RamBlock(f"{n:0{name_length}d}", 1 << 20) for n in range(count))
    return MemSize(count << 20, blocks)


@pytest.mark.parametrize("count,name_length,chunk", [(2000, 100, 64), (4096, 4, 4)])
def test_a_long_block_list_in_small_chunks_is_joined_log_times(
    count: int, name_length: int, chunk: int
) -> None:
    """MEM_SIZE has no length: a long one is waited for in doubling steps, not block by block
    (which, the list being read again from its start each time, was quadratic)."""
    records = ram_stream([])
    records[3] = long_block_list(count, name_length)  # 218 KB or 53 KB
    data = write_records(records)
    parser = StreamParser()
    got, joins, copied = feed_counting(parser, data, chunk)
    parser.close()
    assert records[3] in got + parser.next_records()
    # Now 45 joins copying 0.35 MB, or 410 and 0.87 MB (the first 4 KiB block by block);
    # before, 3410 copying 372 MB, or 13352 copying 355 MB (and 30 s re-reading the list).
    assert joins <= 500 and copied <= 2 << 20, (joins, copied)


def test_a_frame_boundary_ends_the_wait_for_a_block_list() -> None:
    """Waiting for more than a record needs must not hold back one that a frame completes."""
    records = ram_stream([])
    records[3] = long_block_list(50)
    data = write_records(records[:4])
    parser = StreamParser()
    parser.feed(data[: len(data) - 300])
    assert parser.next_records()[-1] == SectionStart(2, "ram", 0, 4)
    parser.feed(data[len(data) - 300 :])
    parser.mark_record_boundary()
    assert parser.next_records() == [records[3]]


def test_a_lent_buffer_held_for_a_long_record_is_copied() -> None:
    """pages=False reads a fed memoryview in place, but keeps a copy of any it must wait on:
    here every chunk comes from the same reused buffer, as in save --direct's ring."""
    data = page_stream(16)[0]
    parser = StreamParser(pages=False)
    ring = bytearray(4096)
    for at in range(0, len(data), len(ring)):
        piece = data[at : at + len(ring)]
        ring[: len(piece)] = piece
        parser.feed(memoryview(ring)[: len(piece)])
        parser.next_records()
        ring[:] = b"\xee" * len(ring)  # the caller reuses its memory
    parser.close()
    parser.next_records()
    assert parser.done and parser.page_counts["normal"] == 1


def test_the_bytes_held_for_one_record_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parser_module, "MAX_HELD", 8192)
    records = ram_stream([])
    records[3] = long_block_list(200)
    data = write_records(records[:4])
    parser = StreamParser(max_vmdesc=1024)
    with pytest.raises(MigpipeError, match=r"unfinished record of \d+ bytes in a RAM section"):
        for at in range(0, len(data), 1024):
            parser.feed(data[at : at + 1024])
            parser.next_records()


def test_the_longest_real_block_list_is_under_the_cap() -> None:
    records = ram_stream([])
    records[3] = long_block_list(parser_module.MAX_RAM_BLOCKS, 255)
    data = write_records(records)
    start = data.index(BE64(records[3].total | fmt.RAM_MEM_SIZE))
    assert parser_module.MAX_HELD > data.index(BE64(fmt.RAM_EOS), start) - start > 1 << 20
    chunks = [data[at : at + (1 << 16)] for at in range(0, len(data), 1 << 16)]
    assert list(iter_records(chunks))[3] == records[3]


# -- RAM block sizes and names ----------------------------------------------------------------


def mem_size(blocks: list[tuple[bytes, int]], total: int | None = None) -> bytes:
    total = sum(size for _, size in blocks) if total is None else total
    out = BE64(total | fmt.RAM_MEM_SIZE)
    return out + b"".join(bytes([len(name)]) + name + BE64(size) for name, size in blocks)


def test_a_100_byte_stream_declaring_a_huge_block_is_refused_at_once() -> None:
    block = mem_size([(b"pc.ram", 1 << 60)])
    data = HEAD + RAM_START + block + BE64(fmt.RAM_EOS) + b"\x7e" + BE32(2) + b"\x00"
    assert len(data) < 100
    error = refusal(data)
    expected = "MEM_SIZE declares 0x1000000000000000 bytes of RAM (limit 0x400000000000)"
    assert error.message == expected
    assert error.offset == data.index(block)
    parser = StreamParser()  # at once: from the record's first 8 bytes, before its blocks
    parser.feed(HEAD + RAM_START + block[:8])
    with pytest.raises(MigpipeError, match="MEM_SIZE declares"):
        parser.next_records()


def test_blocks_up_to_the_ram_limit_are_accepted() -> None:
    records = ram_stream([])
    half = MAX_RAM_TOTAL // 2
    records[3] = MemSize(MAX_RAM_TOTAL, (RamBlock("pc.ram", half), RamBlock("pc.ram2", half)))
    assert parse_bytes(write_records(records))[3] == records[3]
    data = HEAD + RAM_START + mem_size([(b"pc.ram", half), (b"a", half + 4096)])
    assert "MEM_SIZE declares" in refusal(data).message


@pytest.mark.parametrize(
    "name,shown,why",
    [
        (b"pc\x00ram", '"pc\\x00ram"', "cannot be a QEMU idstr"),
        (b"", '""', "cannot be a QEMU idstr"),
        (b"pc.ram\n", '"pc.ram\\x0a"', "cannot be a QEMU idstr"),
        (b"pc.r\xe4m", '"pc.r\xe4m"', "cannot be a QEMU idstr"),
        (b"pc.ram", '"pc.ram"', "is repeated"),
    ],
)
def test_block_names_that_cannot_be_idstrs_are_refused(name: bytes, shown: str, why: str) -> None:
    blocks = mem_size([(b"pc.ram", 4096), (name, 4096)])
    data = HEAD + RAM_START + blocks + BE64(fmt.RAM_EOS)
    error = refusal(data)
    assert f"RAM block name {shown} {why}" == error.message
    assert error.offset == data.index(blocks) + 8 + 1 + 6 + 8


def test_real_block_names_round_trip() -> None:
    names = ["pc.ram", "/rom@etc/acpi/tables", "0000:00:02.0/vga.vram", "mem-dimm 1"]
    records = ram_stream([])
    records[3] = MemSize(len(names) << 16, tuple(RamBlock(n, 1 << 16) for n in names))
    data = write_records(records)
    assert write_records(parse_bytes(data)) == data


def test_a_section_name_with_a_nul_is_refused() -> None:
    data = HEAD + b"\x04" + BE32(3) + b"\x05ti\x00er" + BE32(0) + BE32(2)
    assert 'section name "ti\\x00er" cannot be a QEMU idstr' in refusal(data).message


# -- counts the stream decides ----------------------------------------------------------------


def test_a_repeated_configuration_subsection_is_refused() -> None:
    uuid = ConfigSubsection(fmt.CONFIG_UUID, 1, bytes(16))
    records = ram_stream([])
    records[1] = Configuration(records[1].machine, (uuid, uuid))
    assert '"configuration/uuid" repeated' in refusal(write_records(records)).message


def test_iterative_sections_are_counted() -> None:
    limit = parser_module.MAX_LIVE_SECTIONS
    sections = []
    for sid in range(1, limit + 2):
        sections += [SectionStart(sid, "block", 0, 1), OpaqueData(b"\x01\x02"), SectionFooter(sid)]
    data = write_records([FileHeader(3), Configuration("pc", ()), *sections, Eof()])
    assert f"more than {limit} iterative sections" in refusal(data).message
