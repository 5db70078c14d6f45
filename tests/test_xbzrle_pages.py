"""The xbzrle page path's C in the parser and the writer (migpipe.stream._pages) against their
Python loops: the same records after every next_records(), the same errors at the same offsets,
the same bytes, whatever the stream, its chunking, its page size or the records written.
"""

import contextlib
import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import PAGE
from test_fuzz import FUZZ, SYNTHETIC, mutations
from test_scan import EVERY_KIND, PAGE_WORDS, chunks_of

from migpipe.errors import MigpipeError
from migpipe.stream import format as fmt
from migpipe.stream import parser as parser_module
from migpipe.stream import writer as writer_module
from migpipe.stream.parser import StreamParser
from migpipe.stream.records import (
    CompressedPage,
    ConfigSubsection,
    Configuration,
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    NormalPage,
    RamBlock,
    Record,
    SectionFooter,
    SectionPart,
    SectionStart,
    XbzrlePage,
    ZeroPage,
)
from migpipe.stream.writer import StreamWriter, write_records

FORCED_PYTHON = os.environ.get("MIGPIPE_PAGES") == "python"
WIRE_ENCODINGS = frozenset({fmt.XBZRLE_ENCODING_FLAG, 2})  # QEMU's and the xbzrle filter's


def c_module():  # -> ModuleType
    """The C extension; importing it fails the test where it was not built (CI builds it)."""
    from migpipe.stream import _pages

    return _pages


def test_the_c_is_in_use() -> None:
    expected = "python" if FORCED_PYTHON else "c"
    assert parser_module.PAGES_IMPLEMENTATION == writer_module.PAGES_IMPLEMENTATION == expected
    if not FORCED_PYTHON:
        assert parser_module.parse_pages is c_module().parse_pages
        assert writer_module.write_pages is c_module().write_pages


@contextlib.contextmanager
def without_c() -> Iterator[None]:
    """The parser's and the writer's Python loops alone (the module-level choice they read)."""
    saved = parser_module.parse_pages, writer_module.write_pages
    parser_module.parse_pages = writer_module.write_pages = None
    try:
        yield
    finally:
        parser_module.parse_pages, writer_module.write_pages = saved


# -- the parser ------------------------------------------------------------------------------


def trace(data: bytes, sizes: list[int], encodings: frozenset[int]) -> list:
    """The records after each next_records(), then the error if the stream was refused."""
    parser = StreamParser(xbzrle_encodings=encodings)
    steps: list = []
    try:
        for chunk in chunks_of(data, sizes):
            parser.feed(chunk)
            steps.append(parser.next_records())
        parser.close()
        steps.append(parser.next_records())
    except MigpipeError as e:
        steps.append(("refused", e.message, e.offset, e.status))
    return steps


def refusal(steps: list) -> tuple | None:
    """The error a trace ends with, if it does."""
    return steps[-1] if isinstance(steps[-1], tuple) else None


def assert_parsers_agree(
    data: bytes, sizes: list[int], encodings: frozenset[int] = WIRE_ENCODINGS
) -> list:
    """With and without the C, the same trace; returns it."""
    with_c = trace(data, sizes, encodings)
    with without_c():
        assert trace(data, sizes, encodings) == with_c
    return with_c


def page_stream(rng: random.Random, page_bits: int) -> tuple[bytes, list[int]]:
    """Page records of every kind, mostly CONTINUE, in two blocks of a stream of 2^page_bits
    pages, deltas of every length up to a page; and where each page record starts."""
    page = 1 << page_bits
    bits = ConfigSubsection(fmt.CONFIG_TARGET_PAGE_BITS, 1, fmt.BE32.pack(page_bits))
    blocks = {"pc.ram": 16 * page, "vga.vram": 2 * page}
    records: list[Record] = [
        FileHeader(3),
        Configuration("pc-i440fx-7.2", (bits,)),
        SectionStart(2, "ram", 0, 4),
        MemSize(sum(blocks.values()), tuple(RamBlock(n, s) for n, s in blocks.items())),
        EndOfSection(),
        SectionFooter(2),
        SectionPart(2),
    ]
    first = len(records)
    block = "pc.ram"
    for _ in range(rng.randint(1, 60)):
        if rng.random() < 0.1:
            block = rng.choice(list(blocks))
        offset = rng.randrange(0, blocks[block], page)
        named = rng.random() < 0.1
        kind = rng.randrange(8)
        if kind < 3:
            records.append(NormalPage(block, offset, rng.randbytes(page), named))
        elif kind < 5:
            records.append(ZeroPage(block, offset, rng.choice([0, 0, 9]), named))
        elif kind < 7:
            delta = rng.randbytes(rng.choice([0, 3, 200, min(page, 0xFFFF)]))
            records.append(XbzrlePage(block, offset, delta, named, rng.choice([1, 2])))
        else:
            records.append(CompressedPage(block, offset, rng.randbytes(rng.randint(0, 40)), named))
    starts = [len(write_records(records[:i])) for i in range(first, len(records))]
    records += [EndOfSection(), SectionFooter(2), Eof()]
    return write_records(records), starts


@pytest.mark.parametrize("sizes", [[1 << 20], [4096], [333, 7], [20000, 1], [70000]])
def test_streams_in_any_chunking(sizes: list[int]) -> None:
    for data in (SYNTHETIC, EVERY_KIND):
        assert refusal(assert_parsers_agree(data, sizes)) is None


@pytest.mark.parametrize("page_bits", [10, 12, 16])
def test_every_page_size_cut_and_mangled(page_bits: int) -> None:
    """Runs of every kind, cut anywhere, words and lengths mangled: the same verdicts, and the
    mangling reaches the parser's checks on the records that stop a C run."""
    rng = random.Random(page_bits)
    verdicts: set[str] = set()
    for _ in range(100):
        stream, starts = page_stream(rng, page_bits)
        data = bytearray(stream)
        for _ in range(rng.randint(0, 2)):  # a bit of a record's word or of the 3 bytes after
            at = rng.choice(starts) + rng.randrange(11)
            data[at] ^= 1 << rng.randrange(8)
        cut = rng.choice([len(data), rng.randrange(starts[0], len(data)), *starts])
        data = bytes(data[:cut])
        refused = refusal(assert_parsers_agree(data, [rng.choice([1 << 20, 4096, 333])]))
        if refused:
            verdicts.add(refused[1].split(" 0x")[0].split(" of ")[0])
    assert len(verdicts) >= 6, verdicts


def test_xbzrle_encodings_not_taken_are_refused_alike() -> None:
    """migpipe's deltas (encoding 2) on a parser that takes QEMU's only: the C stops there and
    the parser refuses, where it always did."""
    data, _ = page_stream(random.Random(5), 12)
    steps = assert_parsers_agree(data, [1 << 20], frozenset({fmt.XBZRLE_ENCODING_FLAG}))
    assert "unknown encoding 0x02" in refusal(steps)[1]


def test_every_page_record_word_mangled() -> None:
    rng = random.Random(3)
    for _ in range(200):
        mangled = bytearray(EVERY_KIND)
        at = rng.choice(PAGE_WORDS)
        word = fmt.BE64.unpack_from(mangled, at)[0]
        word ^= rng.choice([1 << rng.randrange(64), fmt.RAM_CONTINUE, 0x3F, 0x17 << 12])
        mangled[at : at + 8] = fmt.BE64.pack(word)
        assert_parsers_agree(bytes(mangled), [rng.choice([1 << 20, 4096, 20000])])


@FUZZ
@given(mutations([SYNTHETIC, EVERY_KIND]), st.sampled_from([[7, 4096, 333], [20000, 1], [70000]]))
def test_mutated_streams(case: tuple[bytes, int], sizes: list[int]) -> None:
    data, chunk = case
    assert_parsers_agree(data, [max(chunk, 61)])
    assert_parsers_agree(data, sizes)


@pytest.mark.skipif(FORCED_PYTHON, reason="MIGPIPE_PAGES=python: the C extension is off")
def test_parse_pages_refuses_bad_arguments_rather_than_read_out_of_bounds() -> None:
    parse = c_module().parse_pages
    run = fmt.BE64.pack(fmt.RAM_PAGE | fmt.RAM_CONTINUE) + bytes(PAGE)
    table = bytes(256)
    out: list[Record] = []
    assert parse(run, 0, PAGE, "pc.ram", PAGE, table, out) == len(run)
    assert out == [NormalPage("pc.ram", 0, bytes(PAGE))]
    assert parse(run, 0, PAGE, "pc.ram", 0, table, out) == 0  # past the block: not taken
    for pos in (-1, len(run) + 1):
        with pytest.raises(ValueError, match="outside the buffer"):
            parse(run, pos, PAGE, "pc.ram", PAGE, table, out)
    for page_size in (0, 3000, -4096):
        with pytest.raises(ValueError, match="power of two"):
            parse(run, 0, page_size, "pc.ram", PAGE, table, out)
    with pytest.raises(TypeError, match="256 bytes"):
        parse(run, 0, PAGE, "pc.ram", PAGE, b"\1", out)
    with pytest.raises(TypeError):
        parse(run, 0, PAGE, None, PAGE, table, out)


# -- the writer ------------------------------------------------------------------------------

ODD_FIELDS: list[Record] = [
    ZeroPage("pc.ram", PAGE, True),  # a bool fill: the methods write it as 1
    NormalPage("pc.ram", 2 * PAGE, bytearray(b"\5" * PAGE)),
    NormalPage("pc.ram", 3 * PAGE, memoryview(b"\6" * 100)),
    XbzrlePage("pc.ram", 0, b"\0\1\2", 1, 2),  # named 1: truthy
    XbzrlePage("pc.ram", 0, b"\0" * 70000),  # too long for its length field
    ZeroPage("pc.ram", 0, 256),
    ZeroPage("pc.ram", PAGE + 5, 0),  # an offset with flag bits: written as given
    NormalPage("pc.ram", -PAGE, b""),
    NormalPage("pc.ram", 1 << 64, b""),
    ZeroPage("x" * 256, 0, 0, True),  # a name too long
    ZeroPage("\u0100", 0, 0),  # a name latin-1 cannot spell
    ZeroPage("caf\xe9", 0, 0),  # one it can
    CompressedPage("vga.vram", PAGE, b"\x78\x9c", False),
    SectionPart(2),
    EndOfSection(),
]


def written(records: list[Record], last_block: str | None) -> tuple[str, bytes]:
    writer = StreamWriter()
    writer._last_block = last_block  # as left by what it wrote before
    out = bytearray()
    try:
        writer.write_all(out, records)
    except Exception as e:  # whichever the methods raise, both must raise it
        return type(e).__name__, bytes(out)
    return str(writer._last_block), bytes(out)


@st.composite
def page_lists(draw: st.DrawFn) -> list[Record]:
    blocks = st.sampled_from(["pc.ram", "vga.vram", "caf\xe9"])
    offsets = st.integers(0, 8).map(lambda n: n * PAGE)
    normal = st.builds(
        NormalPage, blocks, offsets, st.sampled_from([b"", b"\1" * PAGE]), st.booleans()
    )
    zero = st.builds(ZeroPage, blocks, offsets, st.integers(0, 255), st.booleans())
    xbzrle = st.builds(
        XbzrlePage, blocks, offsets, st.binary(max_size=20), st.booleans(), st.sampled_from([1, 2])
    )
    compressed = st.builds(CompressedPage, blocks, offsets, st.binary(max_size=20), st.booleans())
    kinds = st.one_of(normal, zero, xbzrle, compressed, st.sampled_from(ODD_FIELDS))
    return draw(st.lists(kinds, max_size=30))


@given(page_lists(), st.sampled_from([None, "pc.ram", "vga.vram"]))
def test_the_writer_writes_the_same_bytes(records: list[Record], last_block: str | None) -> None:
    expected = written(records, last_block)
    with without_c():
        assert written(records, last_block) == expected


def test_the_writer_takes_any_iterable_and_any_bytearray() -> None:
    class Output(bytearray):
        pass

    records = [FileHeader(3), NormalPage("pc.ram", 0, b"\1" * PAGE), ZeroPage("pc.ram", PAGE)]
    expected = bytearray()
    StreamWriter().write_all(expected, records)
    for out, given_records in ((bytearray(), iter(records)), (Output(), records)):
        StreamWriter().write_all(out, given_records)
        assert out == expected
