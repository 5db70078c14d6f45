"""QEMU's mapped-ram files (`migrate file:` with that capability), read as an ordinary stream and
written from one. The layout is in migpipe-stream(5).

Such a file is a QEMU stream whose RAM lies outside it: after each entry of MEM_SIZE's block
list, a 28-byte header gives the file offsets of the block's bitmap (one bit a page, set when
the page is in the file) and of its page area (page k at pages_offset + k * page_size; absent
pages are holes); the stream goes on after the area. No page record is in the stream.

MappedRamReader reads one through a descriptor, the stream parsed by StreamParser (which checks
each header and tells where to seek), and gives the records of the ordinary stream an
`-incoming` QEMU loads: the capability left out of the configuration, the block list without
headers, and right after it every page once, present ones as pages, the others as zero pages.
MappedRamWriter is its mirror: a Sink taking an ordinary stream, which it places in a file
QEMU loads with `migrate-incoming file:`. Both take the file offset where the stream starts
(`file:PATH,offset=N`; libvirt's "sparse" image puts it after its header).

What a reader reads of a file is its data: the stream, the bitmaps and the pages present,
never the holes of absent pages nor the padding before a page area (hole_size(), for
progress and --stats-json).
"""

import ctypes
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import NamedTuple

from migpipe.errors import MigpipeError, TruncatedError, quoted
from migpipe.stream import format as fmt
from migpipe.stream.parser import StreamParser, capability_names
from migpipe.stream.ramimage import apply_page
from migpipe.stream.records import (
    PAGE_KIND_NAMES,
    ConfigSubsection,
    Configuration,
    Eof,
    MemSize,
    MultifdFlush,
    NormalPage,
    RamBlock,
    Record,
    ZeroPage,
)
from migpipe.stream.writer import StreamWriter

READ_CHUNK = 1 << 20  # the stream's bytes read at a time, and the pages read at a time
BITMAP_PIECE = 1 << 16  # bitmap bytes read at a time: 2 GiB of 4 KiB pages
HEAD = 4096  # enough of a file to see its configuration (a machine name is 256 bytes at most)
_new_normal = partial(tuple.__new__, NormalPage)
_new_zero = partial(tuple.__new__, ZeroPage)


class Header(NamedTuple):
    """A block's mapped-ram header; offsets are absolute in the file."""

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    @classmethod
    def of(cls, block: RamBlock) -> "Header":
        return cls._make(fmt.MAPPED_RAM_HEADER.unpack(block.mapped_ram))

    def bitmap_size(self, used_length: int) -> int:
        return fmt.mapped_ram_bitmap_size(used_length // self.page_size)


def place(used_length: int, header_offset: int, page_size: int) -> Header:
    """Where QEMU puts a block whose header is written at `header_offset`: its bitmap right
    after the header, its pages from the next 1 MiB boundary after that."""
    bitmap_offset = header_offset + fmt.MAPPED_RAM_HEADER.size
    bitmap_end = bitmap_offset + fmt.mapped_ram_bitmap_size(used_length // page_size)
    align = fmt.MAPPED_RAM_ALIGNMENT
    pages_offset = (bitmap_end + align - 1) // align * align
    return Header(fmt.MAPPED_RAM_VERSION, page_size, bitmap_offset, pages_offset)


def present_pages(bitmap: bytes | bytearray, pages: int) -> int:
    """How many of the first `pages` bits of a mapped-ram bitmap (or of a piece of one,
    starting at a byte) are set: the pages of them the file holds."""
    whole, rest = divmod(pages, 8)
    count = int.from_bytes(bitmap[:whole], "little").bit_count()
    if rest:
        count += (bitmap[whole] & ((1 << rest) - 1)).bit_count()
    return count


def hole_size(areas: Iterable[tuple[Header, int, int]]) -> int:
    """The bytes of blocks' areas in a mapped-ram file that hold no data, which a reader never
    reads: in each, the padding between its bitmap and its pages, and the pages absent
    (holes). `areas`: each block's header, used length and pages present. The rest of the
    file from where its stream starts, the stream, the bitmaps and the pages present, is
    its data."""
    holes = 0
    for header, used_length, present in areas:
        bitmap_end = header.bitmap_offset + header.bitmap_size(used_length)
        holes += header.pages_offset - bitmap_end + used_length - present * header.page_size
    return holes


def stream_size(origin: int, end: int, areas: Iterable[tuple[int, int]]) -> int:
    """The bytes of a mapped-ram file's stream from `origin` to `end`: all but those of the
    blocks' areas (`areas`: where each starts and ends, its bitmap, padding and pages)."""
    inside = sum(max(0, min(end, stop) - start) for start, stop in areas)
    return end - origin - inside


def with_capability(config: Configuration, present: bool) -> Configuration:
    """The configuration with the mapped-ram capability listed or not. QEMU sends the
    capabilities subsection only when it lists one, after target-page-bits, before uuid."""
    subsections = list(config.subsections)
    at = next((i for i, sub in enumerate(subsections) if sub.name == fmt.CONFIG_CAPABILITIES), None)
    names = [] if at is None else capability_names(subsections[at].payload)
    names = [name for name in names if name != fmt.CAPABILITY_MAPPED_RAM]
    if present:
        names.append(fmt.CAPABILITY_MAPPED_RAM)
    if at is not None:
        del subsections[at]
    else:
        at = sum(sub.name == fmt.CONFIG_TARGET_PAGE_BITS for sub in subsections)
    if names:
        payload = fmt.BE32.pack(len(names)) + b"".join(
            bytes([len(name)]) + name.encode("latin-1") for name in names
        )
        subsections.insert(at, ConfigSubsection(fmt.CONFIG_CAPABILITIES, 1, payload))
    return config._replace(subsections=tuple(subsections))


def is_mapped_ram(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a mapped-ram stream (its configuration
    lists the capability). Bytes that are no stream are not: their reader says what they are."""
    parser = StreamParser(mapped_ram=True)
    parser.feed(head)
    try:
        records = parser.next_records()
    except MigpipeError:
        return False
    return any(type(record) is Configuration and _lists_mapped_ram(record) for record in records)


def _lists_mapped_ram(config: Configuration) -> bool:
    return any(
        sub.name == fmt.CONFIG_CAPABILITIES
        and fmt.CAPABILITY_MAPPED_RAM in capability_names(sub.payload)
        for sub in config.subsections
    )


def is_mapped_ram_file(fd: int) -> bool:
    """Whether `fd` is a regular file holding a mapped-ram stream from its start."""
    return stat.S_ISREG(os.fstat(fd).st_mode) and is_mapped_ram(os.pread(fd, HEAD, 0))


class MappedRamReader:
    """A mapped-ram file read through `fd` (a regular file: it is read by offset, never
    moved), its QEMU stream starting at `origin`; `name` is what messages call it.

    `data_bytes` is what it will read of the file from `origin`, its data (all but the
    hole_size() of its blocks' areas), known once the block list is read, before the first
    page; `read_bytes` what it has read of that so far, counted as the stream goes out (the
    stream's own bytes once parsed, a block's bitmap and each page present as its records are
    given), so it never passes `data_bytes` and ends equal to it."""

    def __init__(
        self,
        fd: int,
        origin: int = 0,
        name: str = "the file",
        page_size: int = fmt.DEFAULT_PAGE_SIZE,
    ) -> None:
        self._fd, self._origin, self._name = fd, origin, name
        self._page_size = page_size
        self._size = os.fstat(fd).st_size
        self.blocks: list[dict] = []  # what inspect shows of each block
        self.device_state_offset: int | None = None  # where the stream goes on after RAM
        self.data_bytes: int | None = None
        self.read_bytes = 0
        self._holes = 0

    def records(self) -> Iterator[Record]:
        """The ordinary stream's records; MigpipeError (with the file offset) on bad input."""
        origin = self._origin
        parser = StreamParser(page_size=self._page_size, mapped_ram=True, origin=origin)
        at = origin
        areas: dict[int, int] = {}  # each block's bitmap offset: where its area ends
        counted = 0  # of the stream's own bytes read, those in read_bytes
        while True:
            chunk = os.pread(self._fd, READ_CHUNK, at)
            if chunk:
                parser.feed(chunk)
                at += len(chunk)
            else:
                parser.close()
            try:
                records = parser.next_records()
            except MigpipeError as e:
                raise self._in_file(e) from None
            for block in parser.mapped_blocks:  # the areas in what was read are known now
                header = Header.of(block)
                areas[header.bitmap_offset] = header.pages_offset + block.used_length
            stream = stream_size(origin, at, areas.items())
            self.read_bytes += stream - counted
            counted = stream
            for record in records:
                yield from self._ordinary(record)
            if not chunk:
                return
            if parser.skip_to is not None:
                self._check_area(parser.mapped_blocks[-1])
                at = origin + parser.skip_to
                parser.skip()

    def chunks(self) -> Iterator[bytearray]:
        """The ordinary stream's bytes, about READ_CHUNK at a time (each chunk is new: the
        consumer may keep it)."""
        writer, out = StreamWriter(), bytearray()
        batch: list[Record] = []
        for record in self.records():
            batch.append(record)
            if len(batch) >= 1024:
                writer.write_all(out, batch)
                batch.clear()
                if len(out) >= READ_CHUNK:
                    chunk, out = out, bytearray()
                    yield chunk
        writer.write_all(out, batch)
        if out:
            yield out

    def _in_file(self, error: MigpipeError) -> MigpipeError:
        """The parser's error with its offset in the file, not in the bytes fed."""
        offset = None if error.offset is None else error.offset + self._origin
        return type(error)(f"{self._name}: {error.message}", offset, error.status)

    def _check_area(self, block: RamBlock) -> None:
        header, size = Header.of(block), self._size
        bitmap_end = header.bitmap_offset + header.bitmap_size(block.used_length)
        what = f"{self._name}: RAM block {quoted(block.name)}"
        if bitmap_end > size:
            raise TruncatedError(
                f"{what}: its mapped-ram bitmap ends at {bitmap_end}, past the end of the "
                f"file ({size} bytes)",
                header.bitmap_offset,
            )
        pages_end = header.pages_offset + block.used_length
        if pages_end > size:
            raise TruncatedError(
                f"{what}: its pages end at {pages_end}, outside the file ({size} bytes)",
                header.pages_offset,
            )

    def _ordinary(self, record: Record) -> Iterator[Record]:
        kind = type(record)
        if kind is Configuration:
            yield with_capability(record, False)
        elif kind is MemSize:
            if record.blocks:
                last = record.blocks[-1]
                self.device_state_offset = Header.of(last).pages_offset + last.used_length
            # Each list has areas of its own (QEMU sends one; a second is read as it is).
            areas = [(Header.of(b), b.used_length, self._present(b)) for b in record.blocks]
            self._holes += hole_size(areas)
            self.data_bytes = self._size - self._origin - self._holes
            blocks = tuple(block._replace(mapped_ram=None) for block in record.blocks)
            yield MemSize(record.total, blocks)
            for block in record.blocks:
                yield from self._pages(block)
        else:
            yield record

    def _bitmap_pieces(self, header: Header, pages: int) -> Iterator[tuple[int, int, bytes]]:
        """A block's bitmap a piece at a time (a huge sparse file must not make one huge
        read): each piece's first and end page, and its bytes."""
        for base in range(0, pages, BITMAP_PIECE * 8):
            end = min(base + BITMAP_PIECE * 8, pages)
            yield (
                base,
                end,
                os.pread(self._fd, (end - base + 7) // 8, header.bitmap_offset + base // 8),
            )

    def _present(self, block: RamBlock) -> int:
        """How many of `block`'s pages the file holds, from its bitmap."""
        header = Header.of(block)
        pages = block.used_length // header.page_size
        return sum(
            present_pages(piece, end - base)
            for base, end, piece in self._bitmap_pieces(header, pages)
        )

    def _pages(self, block: RamBlock) -> Iterator[Record]:
        """Every page of `block`, once: present ones read from its area, in runs."""
        header, name = Header.of(block), block.name
        page_size = header.page_size  # the stream's, as the parser checked
        pages = block.used_length // page_size
        window = READ_CHUNK // page_size  # a multiple of 8: whole bitmap bytes; BITMAP_PIECE's
        present = 0
        self.read_bytes += header.bitmap_size(block.used_length)
        for base, end, piece in self._bitmap_pieces(header, pages):
            for first in range(base, end, window):
                count = min(window, end - first)
                bits = piece[(first - base) // 8 : (first - base + count + 7) // 8]
                if not any(bits):
                    for k in range(first, first + count):
                        yield _new_zero((name, k * page_size, 0, False))
                    continue
                start = header.pages_offset + first * page_size
                data = os.pread(self._fd, count * page_size, start)
                if len(data) != count * page_size:  # the file shrank since it was checked
                    where = f"{self._name}: pages of RAM block {quoted(name)}"
                    raise TruncatedError(where, start)
                self.read_bytes += present_pages(bits, count) * page_size
                for i in range(count):
                    offset = (first + i) * page_size
                    if bits[i >> 3] >> (i & 7) & 1:
                        present += 1
                        page = data[i * page_size : (i + 1) * page_size]
                        yield _new_normal((name, offset, page, False))
                    else:
                        yield _new_zero((name, offset, 0, False))
        self.blocks.append(
            {
                "name": name,
                "used_length": block.used_length,
                "bitmap_offset": header.bitmap_offset,
                "pages_offset": header.pages_offset,
                "pages": pages,
                "present": present,
            }
        )


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the file system back a page that became zero (fallocate(2)); where holes cannot
    be punched, zeros are written: the file reads the same either way."""
    flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, flags, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        os.pwrite(fd, bytes(length), offset)


class MappedRamSource:
    """A mapped-ram file as a Source of the ordinary stream (save, restore)."""

    def __init__(self, fd: int, origin: int = 0, name: str = "the file") -> None:
        self.reader = MappedRamReader(fd, origin, name)  # what it read of the file (progress)
        self._chunks = self.reader.chunks()

    def read(self) -> bytes | bytearray:
        return next(self._chunks, b"")

    def interrupt(self) -> None:
        """Reads of a regular file never wait for a peer: nothing to interrupt."""


class _Area:
    """A block's place in the file being written, and its bitmap so far."""

    def __init__(self, header: Header, pages: int) -> None:
        self.header = header
        self.bitmap = bytearray(fmt.mapped_ram_bitmap_size(pages))

    def has(self, page: int) -> bool:
        return bool(self.bitmap[page >> 3] >> (page & 7) & 1)

    def mark(self, page: int, present: bool) -> None:
        if present:
            self.bitmap[page >> 3] |= 1 << (page & 7)
        else:
            self.bitmap[page >> 3] &= ~(1 << (page & 7)) & 0xFF


class MappedRamWriter:
    """A Sink that writes the ordinary QEMU stream given to it as a mapped-ram file through `fd`
    (empty, or holding what comes before `origin`), as QEMU 10.0 would have written it: every
    page at its place (the last record of it wins), zero pages as holes, no page record in the
    stream, the bitmaps written once the stream is complete (finish())."""

    def __init__(self, fd: int, origin: int = 0, page_size: int = fmt.DEFAULT_PAGE_SIZE) -> None:
        self._fd, self._page_size = fd, page_size
        self._parser = StreamParser(page_size=page_size)
        self._writer = StreamWriter()
        self._main = bytearray()  # stream bytes not yet written, from _cursor
        self._cursor = origin
        self._areas: dict[str, _Area] = {}
        self._laid_out: list[tuple[str, int]] = []  # the block list, as laid out
        self._run: list[bytes] = []  # consecutive pages of one block, not yet written
        self._run_at = 0  # the file offset of the run's first page
        self._zeros = bytes(page_size)
        self.pages_written = 0

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        parser = self._parser
        for part in parts:
            parser.feed(part)
        for record in parser.next_records():
            self._place(record)

    def finish(self) -> None:
        """Place the stream's last records (TruncatedError if it did not reach its end), then
        the bitmaps, and cut the file where the stream ends. The caller syncs."""
        for record in self._parser.finish():
            self._place(record)
        self._flush_run()
        self._flush_main()
        for area in self._areas.values():
            os.pwrite(self._fd, area.bitmap, area.header.bitmap_offset)
        os.ftruncate(self._fd, self._cursor)

    def _place(self, record: Record) -> None:
        kind = type(record)
        if kind is NormalPage and record.data != self._zeros:
            self._page(record)
        elif kind is NormalPage or (kind is ZeroPage and record.fill == 0):
            self._zero(record)
        elif kind is MemSize:
            self._mem_size(record)
        elif kind is Configuration:
            self._writer.write(self._main, with_capability(record, True))
        elif kind is MultifdFlush:
            pass  # QEMU's loader refuses it in a mapped-ram stream; it syncs nothing here
        elif kind in PAGE_KIND_NAMES:
            self._rebuilt_page(record)
        else:
            self._writer.write(self._main, record)
            if kind is Eof or len(self._main) >= READ_CHUNK:
                self._flush_main()

    def _mem_size(self, record: MemSize) -> None:
        """The block list, each entry followed by its header, then the stream going on after
        the block's area, as QEMU writes it."""
        if self._areas:  # a list sent again (QEMU's loader takes it): the same, or refused
            if [(b.name, b.used_length) for b in record.blocks] != self._laid_out:
                raise MigpipeError("a second MEM_SIZE block list, not the first's")
            return
        self._laid_out = [(block.name, block.used_length) for block in record.blocks]
        page_size = self._page_size
        self._main += fmt.BE64.pack(record.total | fmt.RAM_MEM_SIZE)
        for block in record.blocks:
            if block.used_length % page_size:
                raise MigpipeError(f"RAM block {quoted(block.name)} is not whole pages")
            bare = self._writer.encode(MemSize(0, (block._replace(mapped_ram=None),)))[8:]
            header = place(block.used_length, self._cursor + len(self._main) + len(bare), page_size)
            self._main += bare + fmt.MAPPED_RAM_HEADER.pack(*header)
            self._flush_main()
            self._areas[block.name] = _Area(header, block.used_length // page_size)
            self._cursor = header.pages_offset + block.used_length

    def _page(self, record: NormalPage) -> None:
        area = self._areas[record.block]
        area.mark(record.offset // self._page_size, True)
        at = area.header.pages_offset + record.offset
        run = self._run
        if run and (at != self._run_at + len(run) * self._page_size or len(run) >= 256):
            self._flush_run()
        if not run:
            self._run_at = at
        run.append(record.data)

    def _zero(self, record: ZeroPage | NormalPage) -> None:
        """A zero page (or a page of zeros, however sent) is a hole: its bit cleared, and the
        page it had punched out."""
        area = self._areas[record.block]
        page_number = record.offset // self._page_size
        if area.has(page_number):
            self._flush_run()
            punch_hole(self._fd, area.header.pages_offset + record.offset, self._page_size)
            area.mark(page_number, False)

    def _rebuilt_page(self, record: Record) -> None:
        """A page made from the one before (XBZRLE), or inflated, or filled: read back."""
        self._flush_run()
        area = self._areas[record.block]
        page_number = record.offset // self._page_size
        at = area.header.pages_offset + record.offset
        page = bytearray(self._page_size)
        if area.has(page_number):
            page[:] = os.pread(self._fd, self._page_size, at)
        apply_page(record, memoryview(page))
        if page == self._zeros:
            self._zero(record)
            return
        area.mark(page_number, True)
        os.pwrite(self._fd, page, at)
        self.pages_written += 1

    def _flush_run(self) -> None:
        if self._run:
            os.pwritev(self._fd, self._run, self._run_at)
            self.pages_written += len(self._run)
            self._run.clear()

    def _flush_main(self) -> None:
        if self._main:
            os.pwrite(self._fd, self._main, self._cursor)
            self._cursor += len(self._main)
            self._main.clear()
