"""QEMU's mapped-ram layout without QEMU: migpipe writes a stream as one and reads it back, and
every way a file can be cut or corrupted is one line naming the offset.

The files QEMU 10.0 itself writes and loads are tests/test_qemu_mappedram.py's."""

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from support import migpipe, synthetic_stream

from migpipe.errors import (
    EXIT_ERROR,
    EXIT_INCOMPATIBLE,
    EXIT_TRUNCATED,
    MigpipeError,
)
from migpipe.stream import format as fmt
from migpipe.stream.mappedram import BITMAP_PIECE, Header, MappedRamReader, MappedRamWriter
from migpipe.stream.parser import MAPPED_RAM_REFUSED, StreamParser, parse_bytes
from migpipe.stream.ramimage import RamImages, in_memory
from migpipe.stream.records import (
    Configuration,
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    NormalPage,
    RamBlock,
    SectionFooter,
    SectionStart,
    XbzrlePage,
    ZeroPage,
)
from migpipe.stream.writer import write_records
from migpipe.stream.xbzrle import encode_delta

PAGE = fmt.DEFAULT_PAGE_SIZE
STREAM = synthetic_stream(4 << 20, iterations=3)  # 60% zero pages, later passes re-send some


def written(stream: bytes, path: Path, chunk: int = 65536) -> Path:
    """`stream` written as a mapped-ram file at `path`, fed in `chunk`-byte pieces."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = MappedRamWriter(fd)
        for at in range(0, len(stream), chunk):
            writer.write([stream[at : at + chunk]])
        writer.finish()
    finally:
        os.close(fd)
    return path


def read_back(path: Path) -> list:
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(MappedRamReader(fd, name=str(path)).records())
    finally:
        os.close(fd)


def memory(records) -> dict[str, bytes]:
    images = RamImages(in_memory)
    for record in records:
        images.apply(record)
    return {name: bytes(image) for name, image in images.images.items()}


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return written(STREAM, tmp_path_factory.mktemp("mapped") / "vm.mapped")


def mapped_blocks(path: Path, origin: int = 0) -> tuple[RamBlock, ...]:
    """The block list of the mapped-ram stream at `origin` in `path`, headers included."""
    parser = StreamParser(mapped_ram=True, origin=origin)
    parser.feed(path.read_bytes()[origin:])
    parser.close()
    return next(r for r in parser.next_records() if type(r) is MemSize).blocks


def headers(path: Path) -> list[tuple[RamBlock, Header, int]]:
    """Each block, its header and the header's file offset, as the parser reads them."""
    out = []
    for block in mapped_blocks(path):
        header = Header.of(block)
        out.append((block, header, header.bitmap_offset - fmt.MAPPED_RAM_HEADER.size))
    return out


def test_a_stream_reads_back_as_its_final_memory_each_page_once(mapped: Path) -> None:
    records = read_back(mapped)
    assert memory(records) == memory(parse_bytes(STREAM))
    pages = Counter((r.block, r.offset) for r in records if type(r) in (NormalPage, ZeroPage))
    (size,) = [r for r in records if type(r) is MemSize]
    assert len(pages) == sum(b.used_length for b in size.blocks) // PAGE
    assert set(pages.values()) == {1}
    assert all(block.mapped_ram is None for block in size.blocks)  # an ordinary stream
    assert Eof() in parse_bytes(write_records(records))  # whole, for any ordinary parser


def test_zero_pages_are_holes_and_blocks_sit_where_qemu_puts_them(mapped: Path) -> None:
    (block, header, at), *_ = headers(mapped)
    assert header.bitmap_offset == at + 28
    assert header.pages_offset % (1 << 20) == 0
    assert header.pages_offset >= header.bitmap_offset + (block.used_length // PAGE + 63) // 64 * 8
    records = read_back(mapped)
    present = sum(type(r) is NormalPage for r in records)
    assert 0 < present < block.used_length // PAGE  # the rest are zero pages, in the stream...
    assert mapped.stat().st_blocks * 512 <= present * PAGE + (64 << 10)  # ...and holes here


def test_the_writer_is_the_readers_mirror(mapped: Path, tmp_path: Path) -> None:
    """Read as an ordinary stream and written again, a file comes back byte for byte."""
    again = written(write_records(read_back(mapped)), tmp_path / "again", chunk=1 << 20)
    assert again.read_bytes() == mapped.read_bytes()


def test_xbzrle_and_zero_pages_land_as_a_destination_applies_them(tmp_path: Path) -> None:
    old = bytes(range(256)) * 16
    new = old[:100] + b"changed" + old[107:]
    sparse = bytes(200) + b"written" + bytes(PAGE - 207)
    records = [
        FileHeader(3),
        Configuration("pc-i440fx-10.0"),
        SectionStart(2, "ram", 0, 4),
        MemSize(5 * PAGE, (RamBlock("pc.ram", 5 * PAGE),)),
        NormalPage("pc.ram", 0, old),
        NormalPage("pc.ram", PAGE, old),
        XbzrlePage("pc.ram", 0, encode_delta(old, new)),
        ZeroPage("pc.ram", PAGE),
        XbzrlePage("pc.ram", 2 * PAGE, encode_delta(bytes(PAGE), sparse)),
        NormalPage("pc.ram", 3 * PAGE, sparse),
        XbzrlePage("pc.ram", 3 * PAGE, encode_delta(sparse, bytes(PAGE))),
        NormalPage("pc.ram", 4 * PAGE, bytes(PAGE)),
        EndOfSection(),
        SectionFooter(2),
        Eof(),
    ]
    path = written(write_records(records), tmp_path / "f")
    back = read_back(path)
    assert memory(back) == {"pc.ram": new + bytes(PAGE) + sparse + bytes(2 * PAGE)}
    kinds = [type(r) for r in back if r.__class__ in (NormalPage, ZeroPage)]
    assert kinds == [NormalPage, ZeroPage, NormalPage, ZeroPage, ZeroPage]  # zeros: holes
    assert path.stat().st_blocks * 512 <= 2 * PAGE + 8192  # two pages and the stream


def test_an_ordinary_parser_refuses_mapped_ram_in_one_line(mapped: Path) -> None:
    with pytest.raises(MigpipeError) as caught:
        parse_bytes(mapped.read_bytes())
    assert caught.value.message == MAPPED_RAM_REFUSED
    assert caught.value.status == EXIT_INCOMPATIBLE


def test_a_pipe_is_refused_saying_why(mapped: Path) -> None:
    with open(mapped, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        done = migpipe("restore", "-", stdin=cat.stdout)
        cat.stdout.close()  # cat then dies of SIGPIPE
        cat.wait()
    assert done.returncode == EXIT_INCOMPATIBLE
    (line,) = done.stderr.decode().splitlines()
    assert "mapped-ram" in line and "not in order from a pipe" in line
    assert done.stdout == b"MGP!"  # a QEMU reading the output fails at once (stream_sink)


def corrupt(path: Path, at: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[at : at + len(data)] = data
    path.write_bytes(raw)
    return path


def damaged(mapped: Path, tmp_path: Path, how: str) -> tuple[Path, int | None, int, str]:
    """A copy of `mapped` damaged `how`: the copy, the offset (None: where the record the cut
    ends in starts) and status expected, and words the message must have."""
    copy = tmp_path / "damaged"
    copy.write_bytes(mapped.read_bytes())
    blocks = headers(mapped)
    block, header, at = blocks[-1]
    if how == "version 2":
        return corrupt(copy, at, fmt.BE32.pack(2)), at, EXIT_INCOMPATIBLE, "version 2"
    if how == "bitmap moved":
        moved = fmt.BE64.pack(header.bitmap_offset + 8)
        return corrupt(copy, at + 12, moved), at + 12, EXIT_ERROR, "bitmap"
    if how == "pages unaligned":
        moved = fmt.BE64.pack(header.pages_offset + 1)
        return corrupt(copy, at + 20, moved), at + 20, EXIT_ERROR, "page-aligned"
    if how == "page size":
        return corrupt(copy, at + 4, fmt.BE64.pack(65536)), at + 4, EXIT_INCOMPATIBLE, "65536"
    if how == "bitmap past the end":
        os.truncate(copy, header.bitmap_offset + 1)
        return copy, header.bitmap_offset, EXIT_TRUNCATED, "bitmap"
    if how == "pages outside the file":
        os.truncate(copy, header.pages_offset + 1)
        return copy, header.pages_offset, EXIT_TRUNCATED, "outside the file"
    # the device state after the last block's area
    end = header.pages_offset + block.used_length
    os.truncate(copy, end + 100)
    return copy, None, EXIT_TRUNCATED, "truncated"


DAMAGE = (
    "version 2",
    "bitmap moved",
    "pages unaligned",
    "page size",
    "bitmap past the end",
    "pages outside the file",
    "device state cut",
)


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_file_is_one_error_naming_its_offset(
    mapped: Path, tmp_path: Path, how: str
) -> None:
    copy, offset, status, words = damaged(mapped, tmp_path, how)
    with pytest.raises(MigpipeError) as caught:
        read_back(copy)
    if offset is None:
        offset = caught.value.offset
        assert offset is not None and offset < copy.stat().st_size
    assert (caught.value.offset, caught.value.status) == (offset, status)
    assert words in caught.value.message and str(copy) in caught.value.message


@pytest.mark.parametrize("how", ["version 2", "pages outside the file", "device state cut"])
def test_restore_of_a_damaged_file_never_gives_a_stream_its_end(
    mapped: Path, tmp_path: Path, how: str
) -> None:
    copy, offset, status, _ = damaged(mapped, tmp_path, how)
    done = migpipe("restore", str(copy))
    assert done.returncode == status
    (line,) = done.stderr.decode().splitlines()
    assert f"at byte offset {'' if offset is None else offset}" in line
    with pytest.raises(MigpipeError):
        parse_bytes(done.stdout)  # whatever went out ends before its EOF item


def test_restore_to_mapped_ram_publishes_nothing_from_a_truncated_stream(tmp_path: Path) -> None:
    cut = tmp_path / "cut.qemu"
    cut.write_bytes(STREAM[: len(STREAM) - 50])
    out = tmp_path / "out.mapped"
    done = migpipe("restore", str(cut), "--to", "mapped-ram", str(out))
    assert done.returncode == EXIT_TRUNCATED
    assert len(done.stderr.decode().splitlines()) == 1
    assert not out.exists() and os.listdir(tmp_path) == ["cut.qemu"]


def test_restore_to_takes_only_mapped_ram_and_no_existing_file(mapped: Path, tmp_path: Path):
    source = tmp_path / "vm.qemu"
    source.write_bytes(STREAM)
    done = migpipe("restore", str(source), "--to", "raw", str(tmp_path / "x"))
    assert done.returncode == 2 and b"mapped-ram" in done.stderr
    done = migpipe("restore", str(source), "--to", "mapped-ram", str(mapped))
    assert done.returncode != 0 and len(done.stderr.splitlines()) == 1
    done = migpipe("restore", str(source), "--to", "mapped-ram", str(tmp_path / "y"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "y").read_bytes() == mapped.read_bytes()


def test_inspect_shows_the_layout(mapped: Path) -> None:
    done = migpipe("inspect", str(mapped))
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    block, header, _ = headers(mapped)[0]
    present = sum(type(r) is NormalPage and r.block == block.name for r in read_back(mapped))
    assert "QEMU mapped-ram file" in text
    assert f"pages at {header.pages_offset:,}: {present:,} of {block.used_length // PAGE:,}" in text
    report = json.loads(migpipe("inspect", "--json", str(mapped)).stdout)
    assert report["file"]["layout"] == "mapped-ram"
    assert report["file"]["mapped_ram"][0]["present"] == present


def test_a_stream_after_a_header_of_another_format_keeps_absolute_offsets(
    tmp_path: Path,
) -> None:
    """libvirt's sparse image: its own header first, QEMU's stream at `origin` (file:,offset=)."""
    prefix = b"a header of 4133 bytes".ljust(4133, b"\0")
    path = tmp_path / "image"
    path.write_bytes(prefix)
    fd = os.open(path, os.O_RDWR)
    try:
        writer = MappedRamWriter(fd, origin=len(prefix))
        writer.write([STREAM])
        writer.finish()
        records = list(MappedRamReader(fd, len(prefix), "image").records())
    finally:
        os.close(fd)
    assert path.read_bytes()[: len(prefix)] == prefix
    assert memory(records) == memory(parse_bytes(STREAM))
    pages_offsets = [Header.of(block).pages_offset for block in mapped_blocks(path, len(prefix))]
    assert all(offset % (1 << 20) == 0 for offset in pages_offsets)  # of the file, not the stream


def test_extract_takes_the_memory_out_of_one(mapped: Path, tmp_path: Path) -> None:
    done = migpipe("extract", str(mapped), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    images = {
        block["name"]: (tmp_path / "out" / block["file"]).read_bytes()
        for block in manifest["blocks"]
    }
    assert images == memory(parse_bytes(STREAM))


def test_a_block_whose_bitmap_is_read_in_pieces(tmp_path: Path) -> None:
    """A block of more than 2 GiB has a bitmap of more than one BITMAP_PIECE: a page on each
    side of the seam is read from its place, and the file holds little more than them."""
    size = BITMAP_PIECE * 8 * PAGE + (1 << 20)
    last, seam = size - PAGE, BITMAP_PIECE * 8 * PAGE
    pages = {0: b"a" * PAGE, seam - PAGE: b"b" * PAGE, seam: b"c" * PAGE, last: b"d" * PAGE}
    records = [
        FileHeader(3),
        Configuration("pc-i440fx-10.0"),
        SectionStart(2, "ram", 0, 4),
        MemSize(size, (RamBlock("pc.ram", size),)),
        *(NormalPage("pc.ram", offset, data) for offset, data in pages.items()),
        EndOfSection(),
        SectionFooter(2),
        Eof(),
    ]
    path = written(write_records(records), tmp_path / "big")
    back = {r.offset: r.data for r in read_back(path) if type(r) is NormalPage}
    assert back == pages
    assert path.stat().st_blocks * 512 < (1 << 20)


def test_restore_direct_reads_one_as_without(mapped: Path) -> None:
    """--direct opens the file O_DIRECT, which the reader's unaligned reads would fail on."""
    plain, direct = migpipe("restore", str(mapped)), migpipe("restore", str(mapped), "--direct")
    assert (plain.returncode, direct.returncode) == (0, 0), direct.stderr
    assert direct.stdout == plain.stdout and Eof() in parse_bytes(plain.stdout)


def tiny_records(*ram: object) -> list:
    """A stream of one 2-page block, `ram` records after its block list."""
    return [
        FileHeader(3),
        Configuration("pc-i440fx-10.0"),
        SectionStart(2, "ram", 0, 4),
        MemSize(2 * PAGE, (RamBlock("pc.ram", 2 * PAGE),)),
        NormalPage("pc.ram", 0, b"x" * PAGE),
        *ram,
        EndOfSection(),
        SectionFooter(2),
        Eof(),
    ]


def test_a_block_list_sent_again_but_other_is_refused(tmp_path: Path) -> None:
    other = MemSize(2 * PAGE, (RamBlock("pc.ram", PAGE), RamBlock("vga", PAGE)))
    with pytest.raises(MigpipeError) as caught:
        written(write_records(tiny_records(other)), tmp_path / "f")
    assert "not the first" in caught.value.message


def test_a_block_list_sent_again_is_laid_out_once(tmp_path: Path) -> None:
    again = MemSize(2 * PAGE, (RamBlock("pc.ram", 2 * PAGE),))
    stream = write_records(tiny_records(again, NormalPage("pc.ram", PAGE, b"y" * PAGE)))
    path = written(stream, tmp_path / "f")
    assert memory(read_back(path)) == {"pc.ram": b"x" * PAGE + b"y" * PAGE}


def test_a_block_of_part_of_a_page_is_refused(tmp_path: Path) -> None:
    records = tiny_records()
    blocks = (RamBlock("pc.ram", PAGE + 512), RamBlock("vga", PAGE - 512))
    records[3:5] = [MemSize(2 * PAGE, blocks)]
    with pytest.raises(MigpipeError) as caught:
        written(write_records(records), tmp_path / "f")
    assert "not whole pages" in caught.value.message


@pytest.mark.parametrize(
    ("record", "words"),
    [
        (fmt.BE64.pack(fmt.RAM_ZERO) + b"\x06pc.ram\x00", "zero page record in a mapped-ram"),
        (fmt.BE64.pack(fmt.RAM_PAGE) + b"\x06pc.ram" + bytes(PAGE), "normal page record in a"),
        (fmt.BE64.pack(fmt.RAM_MULTIFD_FLUSH), "multifd flush record in a mapped-ram"),
    ],
    ids=["zero", "page", "multifd flush"],
)
def test_a_record_qemus_loader_refuses_in_mapped_ram_is_refused(
    tmp_path: Path, record: bytes, words: str
) -> None:
    """The stream after the last block's area starts with RAM's EOS: the record goes first."""
    path = written(write_records(tiny_records()), tmp_path / "f")
    ((block, header, _),) = headers(path)
    at = header.pages_offset + block.used_length
    data = path.read_bytes()
    path.write_bytes(data[:at] + record + data[at:])
    with pytest.raises(MigpipeError) as caught:
        read_back(path)
    assert words in caught.value.message and caught.value.offset == at
