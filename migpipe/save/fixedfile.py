"""The fixed save layout: every RAM page has one place in the file, however often it was sent.

Guest RAM is cut into extents of EXTENT_PAGES pages of one block; each extent owns a slot of
fixed size in the file, big enough for the extent whatever the filters make of it. The extent
is stored as a small plaintext (which pages were sent, which are zero, the data of the others)
run through the byte filters (compression, encryption), so a slot usually holds far less than
its size and the rest stays a hole: the file's size is bounded by the guest's RAM plus device
state plus metadata, and its disk usage by what the filters left.

A guest that keeps dirtying memory during the save makes QEMU send pages again; the extents
being filled stay in an LRU cache, and an extent evicted and hit again is read back, unsealed,
patched and written again (read-modify-write), always to its own slot. Each write gets a new
write number, which is the filters' position, so an encrypting filter never reuses a nonce and
an old copy of a slot cannot pass for the current one. The index at the end (sealed last, with
the final flag) lists every slot's write number, length and CRC, the device state's chunks and
the stream's skeleton; the superblock at offset 0, written last of all, points at it. The
format is specified in migpipe-file(5).
"""

import json
import os
import struct
import sys
import threading
from array import array
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from isal.isal_zlib import crc32

from migpipe import chain as filters
from migpipe.chain import FilterChain, Position
from migpipe.errors import (
    CorruptError,
    IncompatibleError,
    MigpipeError,
    Stopped,
    TruncatedError,
    quoted,
)
from migpipe.io.channel import Sink, Source, as_sink, as_source
from migpipe.io.direct import DirectFile
from migpipe.keys import Secrets
from migpipe.save import DEFAULT_CACHE
from migpipe.stream import format as fmt
from migpipe.stream.format import BE32, BE64
from migpipe.stream.parser import (
    DEFAULT_MAX_VMDESC,
    StreamParser,
)
from migpipe.stream.ramimage import apply_page
from migpipe.stream.records import PAGE_KIND_NAMES, Eof, MemSize, RamBlock, Record
from migpipe.stream.skeleton import (
    Limits,
    Skeleton,
    checked_blocks,
    checked_count,
    compact_stream,
)
from migpipe.stream.writer import StreamWriter
from migpipe.tunnel.dataplane import run_interruptible
from migpipe.tunnel.pipeline import Totals, with_progress
from migpipe.tunnel.progress import Progress
from migpipe.wire.header import header_for, open_chain, parse_header

MAGIC = b"\x89MGF\r\n\x1a\n"
UNPUBLISHED = b"\x00"  # a saved file's byte 0 (not the magic's 0x89) until savefile.publish()
VERSION = 1
UNIT = 4096  # every slot, chunk and the index start at a multiple of this (O_DIRECT-friendly)
EXTENT_PAGES = 256
DEVICE_CHUNK = 1 << 20
LOCATOR = 32  # be64 index offset, length, write number; be32 CRC-32 of it; be32 CRC of these
EXTENTS_IN_FLIGHT = 4  # extents being sealed and written at once (not dataplane's queue)
SLOT_ENTRY = struct.Struct(">QII")  # write number, stored length, CRC-32
CHUNK_ENTRY = struct.Struct(">QIIQ")  # offset, stored length, CRC-32, write number
MAX_SLOTS = 1 << 24
"""The most extents a file holds: 16 TiB of RAM in 4 KiB pages, beyond the guests QEMU runs on
one host; it keeps the slot table within 256 MiB, and what a crafted index or MEM_SIZE can make
a reader or saver hold or walk."""
MAX_CHUNKS = 1 << 16  # 64 GiB of device state; a guest whose only iterative section is RAM
# has some MiB (its VM description, the largest part, is at most DEFAULT_MAX_VMDESC).
MAX_INDEX_TEXT = 4 << 20
"""The most JSON an index holds: the skeleton of a guest with the parser's 4096 RAM blocks, each
with a 255-byte name (escaped, 510), is 2.4 MiB; a real one (some tens of blocks, a few
configuration subsections and commands) takes a few KiB."""
MANIFEST_LIMITS = Limits(items=MAX_INDEX_TEXT, pages=MAX_SLOTS)  # all the JSON can hold
MAX_INDEX = 4 + MAX_INDEX_TEXT + SLOT_ENTRY.size * MAX_SLOTS + CHUNK_ENTRY.size * MAX_CHUNKS


class PlainFile:
    """A file by descriptor (not owned), with the calls DirectFile has for O_DIRECT."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write_at(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def sync(self) -> None:
        os.fdatasync(self.fd)


def _align(n: int) -> int:
    return -(-n // UNIT) * UNIT


@dataclass
class Slot:
    """Where an extent's latest copy is: its write number (0: never written), length, CRC."""

    write: int = 0
    length: int = 0
    crc: int = 0


@dataclass
class FixedCounters:
    pages_received: int = 0
    pages_stored: int = 0  # distinct pages in the file
    pages_overwritten: int = 0  # received again: stored in place of their earlier copy
    extent_writes: int = 0
    extent_rewrites: int = 0  # writes of an extent already in the file
    extent_reloads: int = 0  # read back from the file to be patched


class Layout:
    """The geometry shared by saver and restorer: block -> first slot, slot -> place and room.

    Slots are laid out block after block; a block's last extent may hold fewer pages, and its
    slot is only as large as they need, so small blocks (firmware, option ROMs) stay small.
    Only each block's first slot and offset are kept, and a slot's place is computed from them:
    a block list claiming 2^60 bytes costs what one of 4 KiB does, and the caller compares the
    slot count with what it allows before anything is made per slot.
    """

    def __init__(self, blocks: Sequence[RamBlock], page_size: int) -> None:
        self.page_size = page_size
        self.per_extent = EXTENT_PAGES * page_size
        self.room = slot_room(EXTENT_PAGES, page_size)  # a whole extent's
        self.first_slot: dict[str, int] = {}
        self.starts: list[int] = []  # each block's first slot, in the order of `blocks`
        self.offsets: list[int] = []  # and that slot's offset
        slots, offset = 0, UNIT
        for block in blocks:
            if block.name in self.first_slot:
                raise CorruptError(f"RAM block {quoted(block.name)} listed twice")
            self.first_slot[block.name] = slots
            self.starts.append(slots)
            self.offsets.append(offset)
            whole, rest = divmod(block.used_length, self.per_extent)
            slots += whole + (rest > 0)
            offset += whole * self.room
            if rest:
                offset += slot_room(-(-rest // page_size), page_size)
        self.slots = slots
        self.data_end = offset

    def block_of(self, slot: int) -> int:
        """The position in the block list of the block `slot` belongs to."""
        return bisect_right(self.starts, slot) - 1  # past blocks of no slots, which share it

    def place(self, slot: int) -> tuple[int, int]:
        """Slot `slot`'s offset and room: a whole extent's, or up to the next block's start."""
        n = self.block_of(slot)
        offset = self.offsets[n] + (slot - self.starts[n]) * self.room
        end = self.offsets[n + 1] if n + 1 < len(self.offsets) else self.data_end
        return offset, min(self.room, end - offset)


def sealed_room(plain: int) -> int:
    """The most bytes `plain` bytes can take once sealed: any compressor's worst-case growth
    (zstd and lz4 grow incompressible data by under 1/255) and an AEAD tag."""
    return plain + plain // 128 + 1024


def slot_room(pages: int, page_size: int) -> int:
    """Room for an extent of `pages`, sealed, in whole units."""
    return _align(sealed_room(EXTENT_PAGES // 4 + pages * page_size))


# -- an extent's plaintext ----------------------------------------------------------------------


class Extent:
    """One extent in memory: its pages, and which of them the stream has sent."""

    __slots__ = ("data", "present")

    def __init__(self, page_size: int) -> None:
        self.data = bytearray(EXTENT_PAGES * page_size)
        self.present = 0  # bit i: page i was sent

    def pack(self, page_size: int) -> bytes:
        """present bitmap, zero bitmap (32 bytes each, bit i = page i), then the data of every
        sent page that is not all zero, in page order."""
        zero_page = bytes(page_size)
        zero, parts = 0, []
        view = memoryview(self.data)
        for i in range(EXTENT_PAGES):
            if self.present >> i & 1:
                page = view[i * page_size : (i + 1) * page_size]
                if page == zero_page:
                    zero |= 1 << i
                else:
                    parts.append(page)
        size = EXTENT_PAGES // 8
        return b"".join(
            [self.present.to_bytes(size, "little"), zero.to_bytes(size, "little"), *parts]
        )

    @classmethod
    def unpack(cls, plain: bytes, page_size: int, where: str) -> "Extent":
        size = EXTENT_PAGES // 8
        extent = cls(page_size)
        extent.present = int.from_bytes(plain[:size], "little")
        zero = int.from_bytes(plain[size : 2 * size], "little")
        if zero & ~extent.present:
            raise CorruptError(f"{where}: zero pages that were never sent")
        pos = 2 * size
        for i in range(EXTENT_PAGES):
            if extent.present >> i & 1 and not zero >> i & 1:
                extent.data[i * page_size : (i + 1) * page_size] = plain[pos : pos + page_size]
                pos += page_size
        if pos != len(plain):
            raise CorruptError(f"{where}: {len(plain)} bytes where the bitmaps call for {pos}")
        return extent

    def pages(self, page_size: int, base: int, limit: int) -> Iterator[tuple[int, bytes]]:
        view = memoryview(self.data)
        for i in range(EXTENT_PAGES):
            if self.present >> i & 1 and base + i * page_size < limit:
                yield base + i * page_size, bytes(view[i * page_size : (i + 1) * page_size])


def encode_setup(chain: FilterChain, page_size: int) -> bytes:
    """The file's header (migpipe.wire.header), naming the chain and the geometry; it binds
    the chain, which then seals each piece (extent, chunk, index) on its own."""
    fields = {"page_size": page_size, "extent_pages": EXTENT_PAGES, "unit": UNIT}
    return header_for(MAGIC, VERSION, chain, fields)


def encode_locator(offset: int, length: int, write: int, crc: int) -> bytes:
    body = BE64.pack(offset) + BE64.pack(length) + BE64.pack(write) + BE32.pack(crc)
    return body + BE32.pack(crc32(body))


# -- save ---------------------------------------------------------------------------------------


def check_chain(chain: Sequence[filters.Filter]) -> None:
    """Refuse page filters: the fixed layout stores each page once, so deltas have no use."""
    if any(isinstance(f, filters.PageFilter) for f in chain):
        message = "the fixed layout stores each page once: xbzrle has nothing to do there"
        raise IncompatibleError(message)


class FixedSaver:
    """Records in, slots out: the synchronous core of `save --layout fixed` (one thread calls
    it; sealing and writing run on a small pool of worker threads)."""

    def __init__(
        self,
        file: "PlainFile | DirectFile",
        chain: Sequence[filters.Filter],
        totals: Totals,
        cache: int = DEFAULT_CACHE,
        published: bool = True,
    ) -> None:
        check_chain(chain)
        if isinstance(file, DirectFile) and file.direct and UNIT % file.align:
            raise IncompatibleError(
                f"O_DIRECT on this file system needs {file.align}-byte alignment, "
                f"and the fixed layout writes {UNIT}-byte units: save it without "
                "--direct"
            )
        self.file = file
        self.published = published
        self.totals = totals
        self.counters = FixedCounters()
        self.page_size = 4096
        self.chain = FilterChain(chain, totals)
        self.setup = encode_setup(self.chain, self.page_size)
        self.skeleton = Skeleton(self.page_size)
        self.writer = StreamWriter()
        self.layout: Layout | None = None
        self.table: dict[int, Slot] = {}  # the slots written so far: what the guest sent
        self.cache: OrderedDict[int, Extent] = OrderedDict()
        self.cache_extents = max(2, cache // (EXTENT_PAGES * self.page_size))
        self.in_flight: dict[int, tuple[Future, bytes]] = {}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="migpipe-seal")
        self.lock = threading.Lock()
        self.writes = 0
        self.device_state = bytearray()
        self.chunks: list[tuple[int, int, int, int]] = []  # offset, length, crc, write number
        self.ending = False  # past QEMU's EOF item: the rest is one chunk
        self.next_offset = 0

    def add(self, records: list[Record]) -> None:
        self.totals.count_pages(records)
        for record in records:
            if self.skeleton.add(record):
                if type(record) is Eof:  # the end starts the last chunk (see restore_fixed)
                    self._write_chunk()
                    self.ending = True
                self.writer.write(self.device_state, record)
                while len(self.device_state) >= DEVICE_CHUNK and not self.ending:
                    self._write_chunk(DEVICE_CHUNK)
            elif type(record) in PAGE_KIND_NAMES:
                self._page(record)
            elif type(record) is MemSize:
                self._announce(record)

    def _announce(self, record: MemSize) -> None:
        if self.layout is not None:
            raise MigpipeError(
                "a second RAM block list: the fixed layout cannot follow RAM "
                "blocks that change mid-stream"
            )
        layout = Layout(record.blocks, self.page_size)
        if layout.slots > MAX_SLOTS:  # the index could not list them
            raise IncompatibleError(
                f"{record.total} bytes of RAM: the fixed layout holds at most "
                f"{MAX_SLOTS * layout.per_extent >> 40} TiB"
            )
        self.layout = layout
        self.sizes = {b.name: b.used_length for b in record.blocks}
        self.next_offset = layout.data_end

    def _page(self, record: Record) -> None:
        size = self.sizes.get(record.block) if self.layout else None
        if size is None or record.offset + self.page_size > size:
            raise CorruptError(
                f"page 0x{record.offset:x} of RAM block {quoted(record.block)} is "
                "outside the blocks announced"
            )
        per_extent = EXTENT_PAGES * self.page_size
        slot = self.layout.first_slot[record.block] + record.offset // per_extent
        index = record.offset % per_extent // self.page_size
        extent = self._extent(slot)
        counters = self.counters
        counters.pages_received += 1
        if extent.present >> index & 1:
            counters.pages_overwritten += 1
        else:
            extent.present |= 1 << index
            counters.pages_stored += 1
        start = index * self.page_size
        with memoryview(extent.data) as view, view[start : start + self.page_size] as page:
            apply_page(record, page)

    def _extent(self, slot: int) -> Extent:
        extent = self.cache.get(slot)
        if extent is not None:
            self.cache.move_to_end(slot)
            return extent
        if len(self.cache) >= self.cache_extents:
            self._evict(*self.cache.popitem(last=False))
        if slot in self.in_flight:  # still being written: take the plaintext back
            extent = Extent.unpack(self.in_flight[slot][1], self.page_size, "extent")
        elif slot in self.table:
            self.counters.extent_reloads += 1
            extent = self._read_back(slot)
        else:
            extent = Extent(self.page_size)
        self.cache[slot] = extent
        return extent

    def _read_back(self, slot: int) -> Extent:
        entry = self.table[slot]
        offset, room = self.layout.place(slot)
        stored = self.file.read_at(offset, entry.length)
        plain = self.chain.open(stored, room, Position(entry.write, False))
        return Extent.unpack(plain, self.page_size, f"extent {slot}")

    def _number(self) -> int:
        self.writes += 1
        return self.writes

    def _evict(self, slot: int, extent: Extent) -> None:
        previous = self.in_flight.pop(slot, None)
        if previous is not None:
            previous[0].result()  # one slot's writes stay in order
        while len(self.in_flight) >= EXTENTS_IN_FLIGHT:
            oldest = next(iter(self.in_flight))
            self.in_flight.pop(oldest)[0].result()
        plain = extent.pack(self.page_size)
        write = self._number()
        future = self.pool.submit(self._seal_and_write, slot, plain, write)
        self.in_flight[slot] = (future, plain)

    def _seal_and_write(self, slot: int, plain: bytes, write: int) -> None:
        stored = self.chain.seal(plain, Position(write, False))
        offset, room = self.layout.place(slot)
        if len(stored) > room:
            raise MigpipeError(
                f"a filter made extent {slot} larger ({len(stored)} bytes) than its slot ({room})"
            )
        self.file.write_at(offset, stored)
        with self.lock:
            entry = self.table.setdefault(slot, Slot())
            self.counters.extent_writes += 1
            self.counters.extent_rewrites += entry.write != 0
            entry.write, entry.length, entry.crc = write, len(stored), crc32(stored)
            self.totals.wire_bytes += len(stored)  # written so far, for --progress

    def _write_chunk(self, size: int | None = None) -> None:
        """Seal and write the first `size` bytes of device state kept (all by default): cut
        there, not at a record's end, so that no chunk exceeds what a reader accepts."""
        if not self.device_state:
            return
        if len(self.chunks) == MAX_CHUNKS:
            raise MigpipeError(f"more than {MAX_CHUNKS} MiB of device state")
        write = self._number()
        stored = self.chain.seal(bytes(self.device_state[:size]), Position(write, False))
        del self.device_state[:size]
        self.file.write_at(self.next_offset, stored)
        self.totals.wire_bytes += len(stored)
        self.chunks.append((self.next_offset, len(stored), crc32(stored), write))
        self.next_offset = _align(self.next_offset + len(stored))

    def finish(self) -> int:
        """Write what is left, the index and the superblock; returns the file's size."""
        manifest = self.skeleton.finish()
        if self.layout is None:
            raise MigpipeError("the stream has no RAM block list")
        while self.cache:
            self._evict(*self.cache.popitem(last=False))
        for future, _ in self.in_flight.values():
            future.result()
        self.in_flight.clear()
        self.pool.shutdown()
        self._write_chunk()
        written = Counter(map(self.layout.block_of, self.table))
        for n, block in enumerate(manifest["blocks"]):  # in the order the layout has them
            block["pages_received"] = written[n]  # no extent written: no pages on restore
        index = encode_index(manifest, self.table, self.layout.slots, self.chunks)
        write = self._number()
        stored = self.chain.seal(index, Position(write, True))
        offset = self.next_offset
        self.file.write_at(offset, stored)
        end = max(offset + len(stored), self.layout.data_end)
        os.ftruncate(self.file.fd, end)  # O_DIRECT writes padded the last piece
        self.file.sync()  # everything the superblock points at is on disk before it
        superblock = self.setup + encode_locator(offset, len(stored), write, crc32(stored))
        if not self.published:  # savefile.publish() writes the magic's first byte
            superblock = UNPUBLISHED + superblock[1:]
        self.file.write_at(0, superblock.ljust(UNIT, b"\0"))
        return end

    def abort(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def encode_index(manifest: dict, table: dict[int, Slot], slots: int, chunks: list) -> bytes:
    """be32 n, n bytes of JSON (skeleton, slot and chunk counts), then 16 bytes per slot
    (be64 write number, be32 length, be32 CRC-32; zeros for a slot not in `table`), then 24 per
    device-state chunk (be64 offset, be32 length, be32 CRC-32, be64 write number)."""
    meta = {"skeleton": manifest, "slots": slots, "chunks": len(chunks)}
    text = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > MAX_INDEX_TEXT:
        raise MigpipeError(
            f"the stream's skeleton takes {len(text)} bytes of JSON, more than "
            f"an index holds ({MAX_INDEX_TEXT})"
        )
    entries = bytearray(SLOT_ENTRY.size * slots)
    for slot, s in table.items():
        SLOT_ENTRY.pack_into(entries, SLOT_ENTRY.size * slot, s.write, s.length, s.crc)
    parts = [BE32.pack(len(text)), text, entries]
    parts += [CHUNK_ENTRY.pack(*chunk) for chunk in chunks]
    return b"".join(parts)


async def save_fixed(
    source: int | Source,
    file: "PlainFile | DirectFile",
    chain: Sequence[filters.Filter],
    progress: Progress | None = None,
    cache: int = DEFAULT_CACHE,
    published: bool = True,
) -> Totals:
    """Parse the QEMU stream from `source` into the fixed layout in `file` (empty); the caller
    syncs it. Unless `published`, the superblock's first byte says it is not yet (savefile)."""
    source = as_source(source)
    totals = Totals()
    saver = FixedSaver(file, chain, totals, cache, published)
    parser = StreamParser(page_size=saver.page_size)

    def run() -> None:
        try:
            while chunk := source.read():
                totals.qemu_bytes += len(chunk)
                parser.feed(chunk)
                saver.add(parser.next_records())
            saver.add(parser.finish())
            totals.wire_bytes = saver.finish()  # what was written becomes the file's size
        except BaseException:
            saver.abort()
            raise
        totals.filter_counters["fixed"] = vars(saver.counters)

    await with_progress(progress, totals, partial(run_interruptible, run, source.interrupt))
    return totals


# -- restore ------------------------------------------------------------------------------------


class FixedReader:
    """A fixed-layout file, checked piece by piece as it is read."""

    def __init__(
        self,
        file: "PlainFile | DirectFile",
        secrets: Secrets | None,
        totals: Totals,
        stopping: threading.Event | None = None,
    ) -> None:
        self.file = file
        self.totals = totals
        self.stopping = stopping or threading.Event()  # set: a long walk raises Stopped
        head = file.read_at(0, UNIT)
        header, end = parse_header(head, MAGIC, VERSION, "migpipe fixed-layout file")
        if end + LOCATOR > UNIT:
            raise CorruptError("fixed-layout header longer than its unit", 0)
        if header is None or len(head) < end + LOCATOR:
            raise TruncatedError("file truncated in its header", len(head))
        extras = header.fields.get("extent_pages"), header.fields.get("unit"), header.page_size
        if extras != (EXTENT_PAGES, UNIT, 4096):
            raise CorruptError(f"malformed fixed-layout header (geometry {extras})", 12)
        self.page_size = header.page_size
        self.chain = open_chain(header, secrets, totals)
        locator = head[end : end + LOCATOR]
        if crc32(locator[:28]) != BE32.unpack_from(locator, 28)[0]:
            raise CorruptError("fixed-layout locator checksum mismatch", end)
        offset, length, write = (BE64.unpack_from(locator, i)[0] for i in (0, 8, 16))
        if length > sealed_room(MAX_INDEX):
            raise CorruptError(f"index of {length} bytes", end)
        self.size = os.fstat(file.fd).st_size  # every piece is checked against it, then read
        if offset + length > self.size:
            raise TruncatedError(f"file truncated: its index ends at {offset + length}", self.size)
        stored = self._read(offset, length, "the index")
        if crc32(stored) != BE32.unpack_from(locator, 24)[0]:
            raise CorruptError("index checksum mismatch", offset)
        index = self.chain.open(stored, MAX_INDEX, Position(write, True))
        try:
            self._parse_index(memoryview(index), offset)
        except (ValueError, KeyError, TypeError, struct.error, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else e
            raise CorruptError(f"malformed index ({reason})", offset) from None

    def _read(self, offset: int, length: int, what: str) -> bytes:
        data = self.file.read_at(offset, length)
        self.totals.wire_bytes += len(data)
        if len(data) != length:
            raise TruncatedError(f"file truncated in {what}", offset + len(data))
        return data

    def _parse_index(self, index: memoryview, at: int) -> None:
        """Check the index at `at` whole before anything is made from it: its sizes against
        each other and the limits, the skeleton's fields, the slot count against the block
        list, and the pieces' places: slots, then the chunks in order, then the index itself,
        so every read stays inside the file and none reads a byte twice. A malformed index
        raises ValueError, KeyError, TypeError or struct.error."""
        (n,) = BE32.unpack_from(index, 0)
        if n > MAX_INDEX_TEXT:
            raise ValueError(f"{n} bytes of JSON, more than {MAX_INDEX_TEXT}")
        meta = json.loads(index[4 : 4 + n].tobytes())
        slots = checked_count(meta["slots"], MAX_SLOTS)
        chunks = checked_count(meta["chunks"], MAX_CHUNKS)
        if not chunks:  # a genuine file has one at least: the one starting with QEMU's EOF
            raise ValueError("no device state")
        tables = 4 + n + SLOT_ENTRY.size * slots
        if tables + CHUNK_ENTRY.size * chunks != len(index):
            raise ValueError(f"{len(index)} bytes for {slots} slots and {chunks} chunks")
        self.manifest = meta["skeleton"]
        blocks = checked_blocks(self.manifest, self.page_size, MANIFEST_LIMITS)
        self.layout = Layout(blocks, self.page_size)
        if self.layout.slots != slots:
            raise ValueError(f"{slots} slots, where the RAM blocks make {self.layout.slots}")
        self.entries = index[4 + n : tables]
        self.chunks = list(CHUNK_ENTRY.iter_unpack(index[tables:]))
        end = self.layout.data_end
        for number, (offset, length, _, _) in enumerate(self.chunks):
            if length > sealed_room(_chunk_limit(number == chunks - 1)):
                raise ValueError(f"device-state chunk {number} of {length} bytes")
            if offset < end:
                raise ValueError(f"device-state chunk {number} overlaps what precedes it")
            end = offset + length
        if end > at:
            raise ValueError("the index overlaps what precedes it")
        words = array("I")  # be32 words, four a slot: write (2), length, CRC
        words.frombytes(self.entries)  # array("I", view) would make a word of each byte
        if sys.byteorder == "little":
            words.byteswap()
        stored = sum(words[2::4]) + sum(length for _, length, _, _ in self.chunks)
        self.totals.wire_expected = self.totals.wire_bytes + stored

    def slot(self, slot: int) -> Slot:
        return Slot(*SLOT_ENTRY.unpack_from(self.entries, SLOT_ENTRY.size * slot))

    def extent(self, slot: int) -> Extent | None:
        entry = self.slot(slot)
        if not entry.write:
            return None
        where = f"extent {slot}"
        offset, room = self.layout.place(slot)
        if entry.length > room:
            raise CorruptError(f"{where} longer than its slot", offset)
        stored = self._read(offset, entry.length, where)
        if crc32(stored) != entry.crc:
            raise CorruptError(f"checksum mismatch in {where}", offset)
        plain = self.chain.open(stored, room, Position(entry.write, False))
        return Extent.unpack(plain, self.page_size, where)

    def pages(self, block: RamBlock) -> Iterator[tuple[int, bytes]]:
        """The block's pages that were sent, extent by extent; each extent first looks at the
        stop flag, since a block of unwritten extents yields nothing for a long while."""
        per_extent = EXTENT_PAGES * self.page_size
        first = self.layout.first_slot[block.name]
        for n in range(-(-block.used_length // per_extent)):
            if self.stopping.is_set():
                raise Stopped
            extent = self.extent(first + n)
            if extent is not None:
                yield from extent.pages(self.page_size, n * per_extent, block.used_length)

    def device_state(self) -> Iterator[bytes]:
        """The device-state chunks, each checked before it is given out. The last one starts
        with QEMU's EOF item and holds all that follows it, so nothing QEMU could complete a
        load with is given out before every other piece has passed."""
        last = len(self.chunks) - 1
        for n, (offset, length, crc, write) in enumerate(self.chunks):
            stored = self._read(offset, length, "device state")
            if crc32(stored) != crc:
                raise CorruptError("checksum mismatch in device state", offset)
            plain = self.chain.open(stored, _chunk_limit(n == last), Position(write, False))
            if n == last and plain[:1] != bytes([fmt.ITEM_EOF]):
                raise CorruptError(
                    "the last device-state chunk does not start with the stream's EOF item", offset
                )
            yield plain

    def records(self) -> Iterator[Record]:
        return compact_stream(self.manifest, self.pages, self.device_state())

    def describe(self) -> dict:
        """What the file says about itself, for inspect."""
        writes = [write for write, _, _ in SLOT_ENTRY.iter_unpack(self.entries) if write]
        return {
            "filters": [[f.name, f.params()] for f in self.chain.byte_filters],
            "slots": self.layout.slots,
            "slots_written": len(writes),
            "writes": max(writes, default=0),
            "device_state_chunks": len(self.chunks),
        }


def _chunk_limit(last: bool) -> int:
    """The most plaintext a device-state chunk holds: the last, the EOF item and the VM
    description after it; any other, DEVICE_CHUNK (twice that for files of migpipe 0.1, which
    cut chunks only at a record's end)."""
    return DEVICE_CHUNK + DEFAULT_MAX_VMDESC if last else DEVICE_CHUNK * 2


async def restore_fixed(
    file: "PlainFile | DirectFile",
    sink: int | Sink,
    secrets: Secrets | None = None,
    progress: Progress | None = None,
) -> Totals:
    """The compact stream of a fixed-layout file; every piece is checked before it is written,
    so the stream's end (in the last device-state chunk) comes out only if all of it passed."""
    sink = as_sink(sink)
    totals = Totals()
    stopping = threading.Event()  # set when the task is cancelled: Ctrl-C, a failed job

    def run() -> None:
        reader = FixedReader(file, secrets, totals, stopping)
        writer, buffer = StreamWriter(), bytearray()
        for record in reader.records():
            writer.write(buffer, record)
            if len(buffer) >= DEVICE_CHUNK:
                if stopping.is_set():
                    raise Stopped
                sink.write([buffer])
                totals.qemu_bytes += len(buffer)
                buffer = bytearray()
        sink.write([buffer])
        totals.qemu_bytes += len(buffer)

    await with_progress(progress, totals, partial(run_interruptible, run, stopping.set))
    return totals
