"""StreamParser(pages=False): the same stream, the same checks, pages counted instead of made.

Every comparison runs the parser in its three ways: producing page records, counting them with
the C skipper (migpipe.stream._scan) and counting them with the Python one. After each
next_records() call all three must stand at the same offset with the same non-page records and
page counts, and on bad input raise the same error (message, offset, exit status). Also here: the
bridge that spares the parser a copy of each fed chunk, and pass-through encode's page totals.
"""

import contextlib
import os
import random
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import PAGE
from test_fuzz import FUZZ, SYNTHETIC, mutations

from migpipe.errors import MigpipeError
from migpipe.stream import format as fmt
from migpipe.stream import parser as parser_module
from migpipe.stream.parser import SKIP_IMPLEMENTATION, StreamParser, parse_bytes, skip_pages_py
from migpipe.stream.records import (
    PAGE_KIND_NAMES,
    Command,
    CompressedPage,
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
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.tunnel.pipeline import Encoder

FORCED_PYTHON = os.environ.get("MIGPIPE_SCAN") == "python"
try:
    from migpipe.stream import _scan
except ImportError:
    _scan = None  # type: ignore[assignment]

Skipper = Callable[[bytes, int, int, int], tuple[int, int, int]]
SKIPPERS: dict[str, Skipper] = {"python": skip_pages_py}
if _scan is not None:
    SKIPPERS["c"] = _scan.skip_pages
NO_SCAN = pytest.mark.skipif(_scan is None, reason="migpipe.stream._scan is not built")
NORMAL_CONTINUE = fmt.RAM_PAGE | fmt.RAM_CONTINUE
ZERO_CONTINUE = fmt.RAM_ZERO | fmt.RAM_CONTINUE


# -- the three ways agree --------------------------------------------------------------------------


@contextlib.contextmanager
def skipping_with(skip: Skipper) -> Iterator[None]:
    """Make counting parsers use `skip` (the module-level choice the parser reads each step)."""
    saved = parser_module.skip_pages
    parser_module.skip_pages = skip
    try:
        yield
    finally:
        parser_module.skip_pages = saved


def chunks_of(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    at, index = 0, 0
    while at < len(data):
        size = sizes[index % len(sizes)]
        yield data[at : at + size]
        at, index = at + size, index + 1


def trace(data: bytes, sizes: list[int], pages: bool, borrowed: bool = False) -> list[tuple]:
    """After each next_records(): offset, non-page records, pages so far by kind; then the
    error (message, offset, status) if the stream was refused.

    `borrowed`: each chunk is fed as a memoryview of one scratch buffer, which is scribbled
    over after each next_records(), as save --direct reuses its ring: what the parser kept of
    it, or made records of, would show."""
    parser = StreamParser(pages=pages)
    scratch = bytearray(max(sizes))
    counts: Counter[str] = Counter(dict.fromkeys(PAGE_KIND_NAMES.values(), 0))
    steps: list[tuple] = []

    def step() -> None:
        records = parser.next_records()
        others = [r for r in records if type(r) not in PAGE_KIND_NAMES]
        if pages:
            counts.update(PAGE_KIND_NAMES[type(r)] for r in records if type(r) in PAGE_KIND_NAMES)
        else:
            assert others == records, "a page record came out of a counting parser"
            counts.clear()
            counts.update(parser.page_counts)
        steps.append((parser.offset, others, dict(counts)))

    try:
        for chunk in chunks_of(data, sizes):
            if borrowed:
                scratch[: len(chunk)] = chunk
                parser.feed(memoryview(scratch)[: len(chunk)])
            else:
                parser.feed(chunk)
            step()
            scratch[:] = b"\xa5" * len(scratch)
        parser.close()
        step()
    except MigpipeError as e:
        steps.append(("refused", e.message, e.offset, e.status))
    return steps


def assert_modes_agree(data: bytes, sizes: list[int]) -> list[tuple]:
    """The three ways give the same trace; returns it."""
    expected = trace(data, sizes, pages=True)
    for name, skip in SKIPPERS.items():
        with skipping_with(skip):
            assert trace(data, sizes, pages=False) == expected, f"counting with the {name} skipper"
            in_place = trace(data, sizes, pages=False, borrowed=True)
            assert in_place == expected, f"counting in place with the {name} skipper"
    return expected


def test_the_c_skipper_is_in_use() -> None:
    """CI builds the extension, so a missing build (or a broken import) fails here."""
    expected = "python" if FORCED_PYTHON else "c"
    assert expected == SKIP_IMPLEMENTATION
    assert parser_module.skip_pages is (skip_pages_py if FORCED_PYTHON else _scan.skip_pages)


@pytest.mark.parametrize("sizes", [[1 << 20], [4096], [333, 7], [20000, 1], [70000]])
def test_a_synthetic_stream_in_every_mode(sizes: list[int]) -> None:
    data = SYNTHETIC
    steps = assert_modes_agree(data, sizes)
    assert steps[-1][0] == len(data)  # parsed to the end, not refused
    records = parse_bytes(data)
    expected = Counter(PAGE_KIND_NAMES[type(r)] for r in records if type(r) in PAGE_KIND_NAMES)
    assert steps[-1][2] == {name: expected[name] for name in PAGE_KIND_NAMES.values()}
    assert expected["normal"] and expected["zero"]


def every_page_kind() -> list:
    """Named and CONTINUE pages of all four kinds in two blocks, commands between sections."""
    blocks = (RamBlock("pc.ram", 32 * PAGE), RamBlock("vga.vram", 4 * PAGE))
    pages = [
        NormalPage("pc.ram", 0, b"\x11" * PAGE, True),
        ZeroPage("pc.ram", PAGE, 0, False),
        NormalPage("pc.ram", 2 * PAGE, b"\x22" * PAGE, False),
        XbzrlePage("pc.ram", 2 * PAGE, b"\x00\x01\x23", False),
        ZeroPage("vga.vram", 0, 0, True),
        CompressedPage("vga.vram", PAGE, b"\x78\x9c\x03\x00\x00\x00\x00\x01", False),
        NormalPage("vga.vram", 3 * PAGE, b"\x33" * PAGE, False),
        NormalPage("pc.ram", 31 * PAGE, b"\x44" * PAGE, True),
        *(ZeroPage("pc.ram", n * PAGE, 0, False) for n in range(8, 12)),
        *(NormalPage("pc.ram", n * PAGE, bytes([n]) * PAGE, False) for n in range(12, 20)),
    ]
    return [
        FileHeader(3),
        Configuration("pc-i440fx-7.2"),
        SectionStart(2, "ram", 0, 4),
        MemSize(36 * PAGE, blocks),
        EndOfSection(),
        SectionFooter(2),
        SectionPart(2),
        *pages,
        EndOfSection(),
        SectionFooter(2),
        Command(2, fmt.BE32.pack(7)),
        Command(10, b"\x05" * 20000),  # a record longer than a bridge
        SectionEnd(2),
        *pages[:3],
        EndOfSection(),
        SectionFooter(2),
        SectionFull(3, "timer", 0, 2),
        OpaqueData(b"\x7e\x00\x00\x00\x03" + b"\x01" * 9000),
        SectionFooter(3),
        Eof(),
        VmDescription(b'{"page_size": 4096}'),
    ]


EVERY_KIND_RECORDS = every_page_kind()
EVERY_KIND = write_records(EVERY_KIND_RECORDS)
# Where each page record (its be64 word) starts: the writer's output for a prefix is a prefix.
PAGE_WORDS = [
    len(write_records(EVERY_KIND_RECORDS[:i]))
    for i, record in enumerate(EVERY_KIND_RECORDS)
    if type(record) in PAGE_KIND_NAMES
]


def test_every_page_kind_and_every_truncation_in_every_mode() -> None:
    steps = assert_modes_agree(EVERY_KIND, [len(EVERY_KIND)])
    assert steps[-1][2] == {"zero": 7, "normal": 14, "xbzrle": 1, "compressed": 1}
    complete_without_vmdesc = EVERY_KIND.rindex(b"\x00\x06")
    for cut in [*range(0, len(EVERY_KIND), 97), *PAGE_WORDS, *(at + 9 for at in PAGE_WORDS)]:
        steps = assert_modes_agree(EVERY_KIND[:cut], [len(EVERY_KIND)])
        accepted = steps[-1][0] != "refused"
        assert accepted == (cut == complete_without_vmdesc + 1), cut


def test_every_page_record_word_mangled_in_every_mode() -> None:
    """Flags, offsets and CONTINUE bits changed in the page records' words: same verdicts."""
    verdicts: Counter[str] = Counter()
    rng = random.Random(3)
    for _ in range(300):
        mangled = bytearray(EVERY_KIND)
        at = rng.choice(PAGE_WORDS)
        word = fmt.BE64.unpack_from(mangled, at)[0]
        word ^= rng.choice([1 << rng.randrange(64), fmt.RAM_CONTINUE, 0x3F, 0x17 << 12])
        mangled[at : at + 8] = fmt.BE64.pack(word)
        steps = assert_modes_agree(bytes(mangled), [rng.choice([1 << 20, 4096, 20000])])
        verdicts[steps[-1][1].split(" 0x")[0] if steps[-1][0] == "refused" else "accepted"] += 1
    assert len(verdicts) >= 6, verdicts  # the mangling reached many different checks


@FUZZ
@given(mutations([SYNTHETIC, EVERY_KIND]), st.sampled_from([[7, 4096, 333], [20000, 1], [70000]]))
def test_mutated_streams_in_every_mode(case: tuple[bytes, int], sizes: list[int]) -> None:
    """test_fuzz's corpus and mutations: the three ways agree, in its chunking (1-byte chunks
    made 61: three parsers fed byte by byte cost seconds an example) and in ours."""
    data, chunk = case
    assert_modes_agree(data, [max(chunk, 61)])
    assert_modes_agree(data, sizes)


@pytest.mark.qemu
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_mutated_real_streams_in_every_mode(
    small_qemu_streams: list[bytes], data: st.DataObject
) -> None:
    """Real streams are tens of MB: fewer examples, in chunks of at least 20000 bytes."""
    stream, chunk = data.draw(mutations(small_qemu_streams))
    assert_modes_agree(stream, [max(chunk, 20000)])


@pytest.fixture(scope="module")
def small_qemu_streams(every_build_streams: list[Path]) -> list[bytes]:
    return [path.read_bytes() for path in every_build_streams]


# -- the skipper itself ----------------------------------------------------------------------------


STOPPERS = [
    fmt.RAM_PAGE,  # named
    fmt.RAM_ZERO,
    fmt.RAM_XBZRLE | fmt.RAM_CONTINUE,
    fmt.RAM_EOS,
    NORMAL_CONTINUE | fmt.RAM_ZERO,
    ZERO_CONTINUE | 0x400,  # a flag bit for 4 KiB pages, part of the offset for 1 KiB ones
]


def record_run(rng: random.Random, page_size: int, length: int) -> tuple[bytes, list[int]]:
    """Page records as QEMU writes them, mixed with every kind of record a run must stop at;
    and where each record starts."""
    out, starts = bytearray(), []
    for _ in range(rng.randint(0, 30)):
        starts.append(len(out))
        offset = rng.randrange(0, max(length, page_size), page_size)
        choice = rng.randrange(10)
        if choice < 4:
            out += fmt.BE64.pack(offset | NORMAL_CONTINUE) + rng.randbytes(page_size)
        elif choice < 7:
            out += fmt.BE64.pack(offset | ZERO_CONTINUE) + bytes([rng.choice([0, 0, 7])])
        elif choice == 7:  # at or beyond the block's end, or far beyond (top bits set)
            offset = rng.choice([length, length + page_size, (1 << 64) - 1])
            offset = offset % (1 << 64) & ~(page_size - 1)
            out += fmt.BE64.pack(offset | rng.choice([NORMAL_CONTINUE, ZERO_CONTINUE]))
        elif choice == 8:  # a named block, XBZRLE, EOS, mixed-up flags
            flags = rng.choice(STOPPERS)
            out += fmt.BE64.pack(offset | flags) + b"\x06pc.ram" + bytes(9)
        else:  # a page size's worth of anything
            out += rng.randbytes(rng.choice([1, 8, 9, page_size]))
    return bytes(out), starts


@NO_SCAN
def test_c_and_python_skippers_agree() -> None:
    rng = random.Random(1)
    stops: Counter[str] = Counter()
    for _ in range(3000):
        page_size = rng.choice([1024, 4096, 65536])
        length = rng.choice([0, page_size, 16 * page_size, (1 << 64) - 1])
        data, starts = record_run(rng, page_size, length)
        cut = rng.choice([rng.randint(0, len(data)), rng.choice([*starts, len(data)])])
        data = data[:cut]
        pos = rng.randint(0, len(data))
        if rng.random() < 0.8:  # a record's start, mostly
            pos = rng.choice([at for at in starts if at <= len(data)] or [0])
        expected = skip_pages_py(data, pos, page_size, length)
        assert _scan.skip_pages(data, pos, page_size, length) == expected
        assert _scan.skip_pages(bytearray(data), pos, page_size, length) == expected
        end, normal, zero = expected
        stops["at the end" if end == len(data) else "before it"] += 1
        stops["skipped pages"] += normal + zero > 0
    assert min(stops.values()) > 300, stops


@NO_SCAN
def test_the_c_skipper_refuses_bad_arguments_rather_than_read_out_of_bounds() -> None:
    run = fmt.BE64.pack(NORMAL_CONTINUE) + bytes(PAGE)
    assert _scan.skip_pages(run, 0, PAGE, PAGE) == (len(run), 1, 0)
    for pos in (-1, len(run) + 1):
        with pytest.raises(ValueError, match="outside the buffer"):
            _scan.skip_pages(run, pos, PAGE, PAGE)
    for page_size in (0, 3000, -4096):
        with pytest.raises(ValueError, match="power of two"):
            _scan.skip_pages(run, 0, page_size, PAGE)
    with pytest.raises(OverflowError):
        _scan.skip_pages(run, 0, PAGE, -1)
    with pytest.raises(TypeError):
        _scan.skip_pages("text", 0, PAGE, PAGE)


# -- the bridge: a fed chunk is not copied ---------------------------------------------------------


def test_a_chunk_is_not_copied_when_a_record_straddles_it() -> None:
    """Parsing a 4 MiB chunk that starts inside a page allocates a page or two, not 4 MiB."""
    data = write_records(SyntheticGuest(GuestModel(ram_size=8 << 20, iterations=1)).records())
    first = data.index(b"\x02\x00\x00\x00\x02") + 5 + 100  # inside the first page of a PART
    chunk = data[first : first + (4 << 20)]
    parser = StreamParser(pages=False)
    parser.feed(data[:first])
    parser.next_records()
    tracemalloc.start()
    try:
        parser.feed(chunk)
        parser.next_records()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parser.offset > first + len(chunk) - 5000  # it parsed the chunk up to its last page
    assert sum(parser.page_counts.values()) > 500
    assert peak < 64 << 10, f"{peak} bytes allocated"


def test_closing_right_after_the_last_chunk_gives_the_records_of_the_whole() -> None:
    """A device-state footer and the EOF item near wherever a bridge may end: what follows
    them must be read before they are judged, also when the input is already closed."""
    for length in range(3000, 6000):
        records = [
            FileHeader(3),
            Configuration("pc-i440fx-7.2"),
            SectionFull(3, "timer", 0, 2),
            OpaqueData(b"\x01" * length),
            SectionFooter(3),
            Eof(),
            VmDescription(b"{" + b" " * 12000 + b"}"),
        ]
        data = write_records(records)
        parser = StreamParser()
        parser.feed(data[:100])
        parsed = parser.next_records()
        parser.feed(data[100:])
        parser.close()
        parsed += parser.next_records()
        assert write_records(parsed) == data, length
        assert [r for r in parsed if type(r) is not OpaqueData] == records[:3] + records[4:]


@pytest.mark.parametrize("page_bits", [12, 13])
def test_bridges_give_the_records_of_one_whole_chunk(page_bits: int) -> None:
    """Chunkings that bridge, fall back to a join (a record longer than the bridge) and change
    the page size inside a bridge (target-page-bits) all give the records of the whole."""
    page = 1 << page_bits
    bits = ConfigSubsection(fmt.CONFIG_TARGET_PAGE_BITS, 1, fmt.BE32.pack(page_bits))
    records = [
        FileHeader(3),
        Configuration("pc-i440fx-7.2", (bits,)),
        SectionStart(2, "ram", 0, 4),
        MemSize(64 * page, (RamBlock("pc.ram", 64 * page),)),
        EndOfSection(),
        SectionFooter(2),
        Command(10, b"\x05" * 30000),
        SectionEnd(2),
        *(NormalPage("pc.ram", n * page, bytes([n]) * page, n == 0) for n in range(64)),
        EndOfSection(),
        SectionFooter(2),
        Eof(),
    ]
    data = write_records(records)
    rng = random.Random(page_bits)
    splits = [[20, len(data)], [30001], [20000, 5], [70000, 3]]
    splits += [[rng.choice([1, 100, 20000, 30007, 50000]) for _ in range(9)] for _ in range(3)]
    for sizes in splits:
        parsed = []
        parser = StreamParser()
        for chunk in chunks_of(data, sizes):
            parser.feed(chunk)
            parsed += parser.next_records()
        parser.close()
        assert parsed + parser.next_records() == records, sizes
        assert_modes_agree(data, sizes)


# -- pass-through encode counts the pages it no longer makes ---------------------------------------


def test_pass_through_encode_counts_pages_by_kind() -> None:
    data = write_records(
        SyntheticGuest(GuestModel(ram_size=2 << 20, iterations=3, dirty_share=0.3)).records()
    )
    encoder = Encoder([])
    frames = []
    for chunk in chunks_of(data, [1 << 20, 70000]):
        frames += encoder.feed(chunk)
    frames += encoder.finish()
    assert b"".join(b"".join(frame.qemu) for frame in frames) == data
    records = parse_bytes(data)
    expected = Counter(PAGE_KIND_NAMES[type(r)] for r in records if type(r) in PAGE_KIND_NAMES)
    assert encoder.totals.pages == {name: expected[name] for name in PAGE_KIND_NAMES.values()}
    assert encoder.trailer().page_records == expected.total() > 500
