"""An incremental, sans-IO parser for QEMU migration streams.

Feed it bytes in chunks of any size, split anywhere; ask it for the records it can now complete.
It never does I/O, never blocks and never guesses: when a record is incomplete it waits for more
bytes, and when the input is closed before the stream ended it raises a truncation error.

RAM is parsed record by record. Device-state bodies have no length in QEMU's format, so they are
carried as opaque bytes whose end is found by the section footer (0x7E + section id) followed by
something that can only be the next top-level item (see migpipe-stream(5) for the exact rule).

A consumer that needs the stream's structure but not its pages (pass-through encode) asks for
StreamParser(pages=False): page records are then checked exactly as always but only counted, and
runs of them are skipped by the C extension `migpipe.stream._scan` when it was built (it is
optional; SKIP_IMPLEMENTATION says which is in use, MIGPIPE_SCAN=python forces the Python loop).
A consumer that wants the page records (page filters) gets the runs of them made by the C
extension `migpipe.stream._pages` when it was built (optional too; PAGES_IMPLEMENTATION says
which is in use, MIGPIPE_PAGES=python forces the Python loop).

A mapped-ram stream (QEMU 9.0+, `migrate file:` with that capability) is refused unless the
consumer asks for it (mapped_ram=True): its pages lie in the file outside the stream, between
the entries of MEM_SIZE's block list. Such a parser reads each block's 28-byte header, checks
it, and then discards the block's bitmap and page area up to where the stream goes on: a
consumer reading a file seeks there instead (skip_to, skip()), and reads the areas itself
(migpipe.stream.mappedram).
"""

import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Literal

from migpipe.errors import (
    EXIT_ERROR,
    EXIT_INCOMPATIBLE,
    IncompatibleError,
    MigpipeError,
    TruncatedError,
    quoted,
)
from migpipe.stream import format as fmt
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
    MultifdFlush,
    NormalPage,
    OpaqueData,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VmDescription,
    XbzrlePage,
    ZeroPage,
)

BE16, BE32, BE64 = fmt.BE16, fmt.BE32, fmt.BE64

MAX_MACHINE_NAME = 256
MAX_CAPABILITIES = 64
MAX_RAM_BLOCKS = 4096
MAX_LIVE_SECTIONS = 1024  # iterative sections (ram, block, dirty bitmaps, each VFIO device)
DEFAULT_MAX_VMDESC = 64 << 20
# QEMU's targets have pages of 1 KiB (arm's legacy minimum) to 64 KiB (the largest any
# defines): a larger page would make every page record, and the bytes held for it, larger.
MIN_PAGE_BITS, MAX_PAGE_BITS = 10, 16

PAGE_SIZES = frozenset(1 << bits for bits in range(MIN_PAGE_BITS, MAX_PAGE_BITS + 1))
MAX_RAM_TOTAL = 1 << 46
"""The most RAM a MEM_SIZE record may declare (the sum of its blocks' used lengths, so also
the most any one block may have): 64 TiB, beyond any guest QEMU runs today (the largest have
some tens of TiB), so only a crafted stream reaches it. Without a bound a 100-byte stream could
make a consumer that lays RAM out block by block (the fixed layout, extract) allocate or loop
for 2^64 bytes."""
MAX_HELD = 2 << 20
"""The most bytes of one unfinished record the parser holds (the VM description has its own
limit, max_vmdesc): the longest other record, a MEM_SIZE of MAX_RAM_BLOCKS blocks with
255-byte names, is 1.1 MiB. Past it the input is refused, not buffered."""

# A block list up to this long (real guests' have 1-2 KiB) is waited for block by block; being
# read again from its start after each, one this long costs 0.1 s of CPU at most.
_EXACT_MEM_SIZE_WAIT = 4096

MAPPED_RAM_REFUSED = (
    "a QEMU mapped-ram stream, whose RAM lies in its file outside the stream, each block's "
    "pages before the next block is named: migpipe reads it by offset from the file itself "
    "(its path; save also takes < FILE), not in order from a pipe, a socket or -"
)

_CONFIG_PAYLOAD_SIZES = {fmt.CONFIG_TARGET_PAGE_BITS: 4, fmt.CONFIG_UUID: 16}
_PAGE_KINDS = frozenset({fmt.RAM_ZERO, fmt.RAM_PAGE, fmt.RAM_XBZRLE, fmt.RAM_COMPRESS_PAGE})
_KIND_NAMES = {
    fmt.RAM_ZERO: PAGE_KIND_NAMES[ZeroPage],
    fmt.RAM_PAGE: PAGE_KIND_NAMES[NormalPage],
    fmt.RAM_XBZRLE: PAGE_KIND_NAMES[XbzrlePage],
    fmt.RAM_COMPRESS_PAGE: PAGE_KIND_NAMES[CompressedPage],
}
_NORMAL_CONTINUE = fmt.RAM_PAGE | fmt.RAM_CONTINUE
_ZERO_CONTINUE = fmt.RAM_ZERO | fmt.RAM_CONTINUE


def is_page_size(value: object) -> bool:
    """Whether `value` is a target page size QEMU can have (an int, not 1024.0 or True):
    a header, a manifest or a caller may say otherwise, and none of them is trusted to."""
    return type(value) is int and value in PAGE_SIZES


def skip_pages_py(buf: bytes, pos: int, page_size: int, block_length: int) -> tuple[int, int, int]:
    """Skip the CONTINUE NORMAL and ZERO page records from `pos` whose offsets are below
    `block_length`; return where it stopped and how many of each kind (normal, zero) it skipped.

    It stops, without judging, at anything else (other kinds, named blocks, bad offsets, a
    record cut by the end of `buf`): the parser's loop reads that record, so every error comes
    from one place. migpipe/_scan.c is the same loop in C.
    """
    mask, end, unpack = page_size - 1, len(buf), BE64.unpack_from
    normal_size = 8 + page_size
    start, normal = pos, 0
    while end - pos >= 8:
        (word,) = unpack(buf, pos)
        flags = word & mask
        if word ^ flags >= block_length:
            break
        if flags == _NORMAL_CONTINUE:
            if end - pos < normal_size:
                break
            pos += normal_size
            normal += 1
        elif flags == _ZERO_CONTINUE:
            if end - pos < 9:
                break
            pos += 9
        else:
            break
    return pos, normal, (pos - start - normal * normal_size) // 9


try:
    if os.environ.get("MIGPIPE_SCAN") == "python":
        raise ImportError("MIGPIPE_SCAN=python")
    from migpipe.stream._scan import skip_pages
except ImportError:
    skip_pages = skip_pages_py

SKIP_IMPLEMENTATION: Literal["c", "python"] = "python" if skip_pages is skip_pages_py else "c"

# Runs of CONTINUE page records made into records in C (migpipe/stream/_pages.c), when built;
# without it the loop of _step_ram makes every record itself, the same ones.
try:
    if os.environ.get("MIGPIPE_PAGES") == "python":
        raise ImportError("MIGPIPE_PAGES=python")
    from migpipe.stream._pages import parse_pages
except ImportError:
    parse_pages = None

PAGES_IMPLEMENTATION: Literal["c", "python"] = "python" if parse_pages is None else "c"

# A step parses what it can, appends records and returns whether it made progress.
_Step = Callable[[list[Record]], bool]


class StreamParser:
    """Turns QEMU migration stream bytes into records (see migpipe.stream.records)."""

    def __init__(
        self,
        *,
        page_size: int = fmt.DEFAULT_PAGE_SIZE,
        max_vmdesc: int = DEFAULT_MAX_VMDESC,
        xbzrle_encodings: frozenset[int] = frozenset({fmt.XBZRLE_ENCODING_FLAG}),
        pages: bool = True,
        mapped_ram: bool = False,
        origin: int = 0,
    ) -> None:
        """`xbzrle_encodings` beyond QEMU's own are for migpipe's wire, where filters add theirs.

        With `pages` false, page records are checked but not produced, only counted (see
        page_counts): the fast mode for consumers that need the records around the pages.
        `mapped_ram` accepts mapped-ram streams; `origin` is the file offset of the first byte
        fed, against which their headers' absolute offsets are checked.
        """
        self._set_page_size(page_size, None)
        self._pages = pages
        self._page_tally = dict.fromkeys(_PAGE_KINDS, 0)
        self._max_vmdesc = max_vmdesc
        self._max_held = max(MAX_HELD, max_vmdesc + 5)
        self._xbzrle_encodings = xbzrle_encodings
        self._xbzrle_table = bytes(i in xbzrle_encodings for i in range(256))  # for parse_pages
        self._buf = b""  # immutable, so a page is copied out once, by slicing
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._rest: tuple[bytes, int] | None = None  # a chunk and where _buf bridges to it
        self._pos = 0
        self._base = 0  # absolute stream offset of _buf[0]
        self._wanted = 0  # absolute offset the next record needs to reach, when known
        self._closed = False
        self._step: _Step = self._step_header
        self._where = "the file header"  # what a truncation would have cut
        self._live_sections: dict[int, str] = {}  # sections opened by START: PART/END follow
        self._section_id = 0  # the section whose body or footer comes next
        self._blocks: dict[str, int] = {}
        self._last_block: str | None = None
        self._last_block_length = 0
        self._ignore_shared = False
        self._postcopy_huge_pages = False
        self._accept_mapped_ram = mapped_ram
        self._origin = origin
        self._mapped_ram = False  # the stream has the capability
        self._mapped_blocks: list[RamBlock] = []  # MEM_SIZE's list so far, with their headers
        self._mapped_total = 0
        self._mapped_left = 0
        self._skip_to: int | None = None  # the end of the block area being discarded
        self.postcopy = False  # a package came: the destination runs, no VM description follows
        # Whether QEMU may switch to postcopy-ram: its ADVISE comes before the first section or
        # never, so the answer is known early (None until then). encode's two-way tunnel asks,
        # to tell postcopy-preempt's connection, which says nothing until a page is asked for.
        self.postcopy_advised: bool | None = None
        self._opaque_left = 0
        self._scan_from = 0
        self.done = False
        self.eof_offset: int | None = None  # where the EOF item starts, once parsed
        self._boundary = -1  # absolute offset known to fall between records

    # -- public API -------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Absolute offset of the first byte not yet turned into a record."""
        return self._base + self._pos

    @property
    def page_counts(self) -> dict[str, int]:
        """Page records so far by kind, in PAGE_KIND_NAMES' words; counted only with pages=False."""
        counted = self._page_tally
        return {name: counted[kind] for kind, name in _KIND_NAMES.items()}

    @property
    def skip_to(self) -> int | None:
        """In a mapped-ram block's bitmap and pages, the offset (in the bytes fed, as `offset`)
        where the stream goes on: none of the bytes before it are needed. None elsewhere."""
        return self._skip_to

    @property
    def mapped_blocks(self) -> tuple[RamBlock, ...]:
        """The blocks of a mapped-ram MEM_SIZE read so far, each with its 28-byte header."""
        return tuple(self._mapped_blocks)

    def skip(self) -> None:
        """Declare, right after next_records() left skip_to set, that the bytes up to skip_to
        will not be fed: the next byte fed is the one at skip_to (the caller seeked there)."""
        if self._skip_to is None or self._pending or self._rest is not None:
            raise MigpipeError("skip() outside a mapped-ram block area, or with bytes fed")
        self._buf, self._pos, self._scan_from = b"", 0, 0
        self._base = self._skip_to

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` for next_records(). With pages=False a memoryview is not copied: it is
        read in place by the next next_records(), which keeps none of it, and makes no record
        of it, when it returns; so the caller may reuse that memory from then on."""
        if self._closed:
            raise MigpipeError("data fed to the parser after the input was closed")
        if data:
            if type(data) is memoryview and not self._pages:
                data = data.cast("B")
                if not self._reaches_wanted(len(data)):  # held past the next next_records()
                    data = bytes(data)  # by a long record: a copy of our own
            else:
                data = bytes(data)
            self._pending.append(data)
            self._pending_size += len(data)

    def close(self) -> None:
        """Declare the end of the input; an unfinished stream then raises on next_records()."""
        self._closed = True

    def finish(self) -> list[Record]:
        """Close the input and return the last records of a stream that must be whole: one that
        did not reach its EOF item raises (truncated), as next_records() does after close()."""
        self.close()
        records = self.next_records()
        if self.eof_offset is None:
            raise TruncatedError("QEMU stream ended without its EOF item", self.offset)
        return records

    def mark_record_boundary(self) -> None:
        """Declare that the bytes fed so far end between two records.

        migpipe's wire frames do. A device-state footer right at that point is then taken as
        the footer without looking ahead at the next item, so the records of one frame come
        out with that frame, not with the next.
        """
        self._boundary = self._base + len(self._buf) + self._pending_size

    def next_records(self) -> list[Record]:
        """Every record that the bytes fed so far complete (an empty list means: feed more)."""
        if not (self._closed or self._reaches_wanted(0)):
            return []  # a long record is still arriving: do not re-join for nothing
        self._take_pending()
        out: list[Record] = []
        while True:
            while self._own_unless_ram() and self._step(out):
                pass
            if not self._take_rest():
                break
        held = len(self._buf) - self._pos
        if held > self._max_held:
            limit = self._max_held
            self._fail(
                f"unfinished record of {held} bytes in {self._where} (limit {limit})", self._pos
            )
        if type(self._buf) is memoryview:  # the caller's memory: keep a copy of the rest
            self._own()
        if self._closed and not self.done:
            at = self._base + self._pos
            raise TruncatedError(f"stream truncated in {self._where}", at)
        return out

    # -- buffer helpers ---------------------------------------------------------------------

    def _reaches_wanted(self, more: int) -> bool:
        """Whether the bytes fed, with `more`, reach what the unfinished record needs, or end
        where a record must (mark_record_boundary): parsing can then make progress."""
        fed = self._base + len(self._buf) + self._pending_size + more
        return fed >= self._wanted or fed == self._boundary

    def _take_pending(self) -> None:
        """Drop parsed bytes and append fed ones (one copy of each fed byte at most).

        In the common case, one large chunk fed while the unparsed tail is at most one record,
        the chunk is not copied: _buf becomes the tail and just enough of the chunk's head to
        finish the record they straddle (a bridge), and parsing goes on in the chunk itself
        once past the tail (_take_rest). That is the same as being fed the chunk in two parts.
        """
        if not self._pending:
            return
        pos, chunk = self._pos, self._pending[0]
        tail, bridge = len(self._buf) - pos, self._bridge
        if len(self._pending) > 1 or self._closed or tail > bridge or len(chunk) < 2 * bridge:
            self._buf = b"".join([self._buf[pos:], *self._pending])
        elif tail:
            self._buf = self._buf[pos:] + chunk[:bridge]
            self._rest = chunk, tail
        else:
            self._buf = chunk
        self._pending.clear()
        self._pending_size = 0
        self._drop(pos)

    def _own_unless_ram(self) -> bool:
        """Outside RAM sections, their headers and footers (the bulk of a stream, read in
        place), work on bytes of our own: records there hold slices of the bytes, which must
        not be views of the caller's memory, and device state is searched. Always true."""
        if type(self._buf) is memoryview and self._step.__func__ not in _READ_IN_PLACE:
            self._own()
        return True

    def _own(self) -> None:
        """Replace a fed memoryview by a copy of its unparsed rest. (Never while a bridge is
        pending: the bridge is then _buf, and bytes already.)"""
        self._buf = bytes(self._buf[self._pos :])
        self._drop(self._pos)

    def _drop(self, count: int) -> None:
        """The first `count` bytes of _buf are gone: offsets into it move back by as many."""
        self._base += count
        self._pos -= count
        self._scan_from = max(0, self._scan_from - count)

    def _take_rest(self) -> bool:
        """Go on in the chunk a bridge was cut from; whether there was one."""
        if self._rest is None:
            return False
        (chunk, at), self._rest = self._rest, None  # chunk[0] is _buf[at]
        pos = self._pos
        if pos >= at:  # past the tail: the unparsed bytes are chunk[pos - at:]
            self._buf, drop = chunk, at
        else:  # a record longer than the bridge: join as _take_pending would have
            self._buf, drop = self._buf[pos:at] + chunk, pos
        self._drop(drop)
        return True

    def _set_page_size(self, page_size: int, at: int | None) -> None:
        """The target page size: from the caller (a wire header's), or the stream's."""
        low, high = 1 << MIN_PAGE_BITS, 1 << MAX_PAGE_BITS
        if not is_page_size(page_size):
            message = (
                f"target page size {quoted(page_size)} is not a power of two from {low} to {high}"
            )
            raise IncompatibleError(message, None if at is None else self._base + at)
        self._page_size = page_size
        self._page_mask = page_size - 1
        # The longest page record (word, block name, compressed length and page) fits a bridge.
        self._bridge = 8 + 256 + 4 + fmt.zlib_bound(page_size)

    def _fail(self, message: str, at: int, status: int = EXIT_ERROR) -> None:
        raise MigpipeError(message, self._base + at, status)

    def _have(self, n: int) -> bool:
        return len(self._buf) - self._pos >= n

    def _counted(self, at: int) -> tuple[str, int] | None:
        """A counted string (length byte + bytes) at `at`, and the offset after it."""
        buf = self._buf
        if at >= len(buf):
            return None
        end = at + 1 + buf[at]
        if end > len(buf):
            return None
        return str(buf[at + 1 : end], "latin-1"), end  # str(): a memoryview has no decode

    # -- header and configuration -------------------------------------------------------------

    def _step_header(self, out: list[Record]) -> bool:
        if not self._have(8):
            return False
        (magic,) = BE32.unpack_from(self._buf, self._pos)
        (version,) = BE32.unpack_from(self._buf, self._pos + 4)
        if magic != fmt.MAGIC:
            self._fail(f"not a QEMU migration stream: bad magic 0x{magic:08x}", self._pos)
        if version != fmt.VERSION:
            why = "obsolete" if version == fmt.VERSION_OBSOLETE else "unsupported"
            self._fail(f"{why} stream version {version} (only 3 is understood)", self._pos + 4)
        out.append(FileHeader(version))
        self._pos += 8
        self._step, self._where = self._step_configuration, "the configuration"
        return True

    def _step_configuration(self, out: list[Record]) -> bool:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return False
        if buf[pos] != fmt.ITEM_CONFIGURATION:  # send-configuration=off (machine types <= 2.3)
            self._step, self._where = self._step_item, "a section header"
            return True
        if not self._have(5):
            return False
        (length,) = BE32.unpack_from(buf, pos + 1)
        if length > MAX_MACHINE_NAME:
            self._fail(f"machine name of {length} bytes is implausible", pos + 1)
        p = pos + 5 + length
        if p > len(buf):
            return False
        machine = buf[pos + 5 : p].decode("latin-1")
        subsections = []
        while True:
            if p >= len(buf):
                return False  # the byte after decides whether another subsection follows
            if buf[p] != fmt.ITEM_SUBSECTION:
                break
            parsed = self._config_subsection(p)
            if parsed is None:
                return False
            subsection, end = parsed
            if any(s.name == subsection.name for s in subsections):  # else no end to them
                self._fail(f"configuration subsection {quoted(subsection.name)} repeated", p)
            subsections.append(subsection)
            p = end
        out.append(Configuration(machine, tuple(subsections)))
        self._pos = p
        self._step, self._where = self._step_item, "a section header"
        return True

    def _config_subsection(self, at: int) -> tuple[ConfigSubsection, int] | None:
        buf = self._buf
        named = self._counted(at + 1)
        if named is None:
            return None
        name, p = named
        if p + 4 > len(buf):
            return None
        (version,) = BE32.unpack_from(buf, p)
        p += 4
        if name == fmt.CONFIG_CAPABILITIES:
            end = self._capabilities_end(p)
        elif name in _CONFIG_PAYLOAD_SIZES:
            end = p + _CONFIG_PAYLOAD_SIZES[name]
        else:
            self._fail(f"unknown configuration subsection {quoted(name)}", at)
        if end is None or end > len(buf):
            return None
        payload = buf[p:end]
        if name == fmt.CONFIG_CAPABILITIES:
            self._apply_capabilities(payload, p)
        elif name == fmt.CONFIG_TARGET_PAGE_BITS:
            (bits,) = BE32.unpack(payload)
            if not MIN_PAGE_BITS <= bits <= MAX_PAGE_BITS:
                self._fail(
                    f"target-page-bits {bits} is outside {MIN_PAGE_BITS}..{MAX_PAGE_BITS} "
                    "(the 1 KiB to 64 KiB pages of QEMU's targets)",
                    p,
                    EXIT_INCOMPATIBLE,
                )
            self._set_page_size(1 << bits, p)
        return ConfigSubsection(name, version, payload), end

    def _capabilities_end(self, at: int) -> int | None:
        buf = self._buf
        if at + 4 > len(buf):
            return None
        (count,) = BE32.unpack_from(buf, at)
        if count > MAX_CAPABILITIES:
            self._fail(f"{count} validated capabilities is implausible", at)
        p = at + 4
        for _ in range(count):
            if p >= len(buf):
                return None
            p += 1 + buf[p]
        return p

    def _apply_capabilities(self, payload: bytes, at: int) -> None:
        names = capability_names(payload)
        if fmt.CAPABILITY_MAPPED_RAM in names:
            if not self._accept_mapped_ram:
                self._fail(MAPPED_RAM_REFUSED, at, EXIT_INCOMPATIBLE)
            self._mapped_ram = True
        self._ignore_shared = "x-ignore-shared" in names

    # -- top-level items ------------------------------------------------------------------------

    def _step_item(self, out: list[Record]) -> bool:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return False
        kind = buf[pos]
        if kind != fmt.ITEM_COMMAND and self.postcopy_advised is None:
            self.postcopy_advised = False  # a section or the EOF item came first
        if kind in (fmt.ITEM_SECTION_START, fmt.ITEM_SECTION_FULL):
            return self._section_header(out, kind)
        if kind in (fmt.ITEM_SECTION_PART, fmt.ITEM_SECTION_END):
            if not self._have(5):
                return False
            (sid,) = BE32.unpack_from(buf, pos + 1)
            idstr = self._live_sections.get(sid)
            if idstr is None:
                self._fail(f"section id {sid} was never started", pos)
            record = SectionPart(sid) if kind == fmt.ITEM_SECTION_PART else SectionEnd(sid)
            out.append(record)
            self._pos = pos + 5
            self._enter_body(sid, idstr)
            return True
        if kind == fmt.ITEM_COMMAND:
            return self._command(out)
        if kind == fmt.ITEM_EOF:
            self.eof_offset = self._base + pos
            out.append(Eof())
            self._pos = pos + 1
            self._step, self._where = self._step_after_eof, "the VM description"
            return True
        self._fail(f"unknown section type 0x{kind:02x}", pos)
        return False  # unreachable; _fail raises

    def _section_header(self, out: list[Record], kind: int) -> bool:
        buf, pos = self._buf, self._pos
        if not self._have(6):
            return False
        (sid,) = BE32.unpack_from(buf, pos + 1)
        named = self._counted(pos + 5)
        if named is None:
            return False
        idstr, p = named
        if p + 8 > len(buf):
            return False
        instance_id, version_id = BE32.unpack_from(buf, p)[0], BE32.unpack_from(buf, p + 4)[0]
        is_start = kind == fmt.ITEM_SECTION_START
        if not _is_idstr(idstr):
            self._fail(f"section name {quoted(idstr)} cannot be a QEMU idstr", pos + 5)
        live = self._live_sections
        if is_start and sid not in live and len(live) >= MAX_LIVE_SECTIONS:
            self._fail(f"more than {MAX_LIVE_SECTIONS} iterative sections", pos)
        if idstr == fmt.RAM_IDSTR and not is_start:
            self._fail("RAM sent as a full (non-iterative) section", pos)
        if idstr == fmt.RAM_IDSTR and version_id != fmt.RAM_SECTION_VERSION:
            self._fail(f"ram section version {version_id} (only 4 is understood)", p + 4)
        header = SectionStart if is_start else SectionFull
        out.append(header(sid, idstr, instance_id, version_id))
        if is_start:
            self._live_sections[sid] = idstr
        self._pos = p + 8
        self._enter_body(sid, idstr)
        return True

    def _enter_body(self, sid: int, idstr: str) -> None:
        self._section_id = sid
        if idstr == fmt.RAM_IDSTR:
            self._step, self._where = self._step_ram, "a RAM section"
        else:
            self._scan_from = self._pos
            self._step = self._step_device_state
            self._where = f"the device state of section {sid} ({quoted(idstr)})"

    def _command(self, out: list[Record]) -> bool:
        buf, pos = self._buf, self._pos
        if not self._have(5):
            return False
        cmd, length = BE16.unpack_from(buf, pos + 1)[0], BE16.unpack_from(buf, pos + 3)[0]
        if not self._command_plausible(cmd, length):
            name = fmt.command_name(cmd)
            self._fail(f"invalid migration command {name} with {length} payload bytes", pos)
        if not self._have(5 + length):
            self._wanted = self._base + pos + 5 + length
            return False
        data = bytes(buf[pos + 5 : pos + 5 + length])  # buf may be the caller's memory
        out.append(Command(cmd, data))
        self._pos = pos + 5 + length
        if cmd == fmt.CMD_POSTCOPY_ADVISE and length == 16:  # postcopy-ram's (16: its page sizes)
            if self.postcopy_advised is None:
                self.postcopy_advised = True
            summary, target = BE64.unpack_from(data, 0)[0], BE64.unpack_from(data, 8)[0]
            self._postcopy_huge_pages = summary != target
        if cmd == fmt.CMD_PACKAGED:
            self.postcopy = True
            self._opaque_left = BE32.unpack_from(data)[0]
            self._step, self._where = self._step_packaged, "a postcopy package"
        return True

    @staticmethod
    def _command_plausible(cmd: int, length: int) -> bool:
        entry = fmt.COMMANDS.get(cmd)
        if entry is None:
            return False
        fixed = entry[1]
        if fixed is not None:
            return length == fixed
        if cmd == fmt.CMD_POSTCOPY_ADVISE:
            return length in (0, 16)
        return True

    def _step_packaged(self, out: list[Record]) -> bool:
        """The PACKAGED blob: a nested stream of device state, carried as is."""
        available = len(self._buf) - self._pos
        take = min(available, self._opaque_left)
        if self._opaque_left and not take:
            return False
        if take:
            out.append(OpaqueData(self._buf[self._pos : self._pos + take]))
            self._pos += take
            self._opaque_left -= take
        if not self._opaque_left:
            self._step, self._where = self._step_item, "a section header"
        return True

    # -- device state ---------------------------------------------------------------------------

    def _step_device_state(self, out: list[Record]) -> bool:
        """Carry a body we cannot parse up to its footer, emitting what is certainly body."""
        buf, pos = self._buf, self._pos
        needle = bytes([fmt.ITEM_SECTION_FOOTER]) + BE32.pack(self._section_id)
        at = buf.find(needle, max(pos, self._scan_from))
        while at >= 0:
            verdict = self._next_item_plausible(at + 5)
            if verdict is None and not self._closed:
                self._emit_opaque(out, at)  # wait for the bytes that decide
                self._scan_from = self._pos
                return at > pos
            if verdict is not False:
                self._emit_opaque(out, at)
                self._step, self._where = self._step_footer, "a section footer"
                return True
            at = buf.find(needle, at + 1)
        keep = len(buf)
        if self._base + keep != self._boundary:  # else nothing straddles: records end there
            keep = max(pos, keep - len(needle) + 1)  # a footer may straddle the next chunk
        self._scan_from = keep
        if keep > pos:
            self._emit_opaque(out, keep)
            return True
        return False

    def _emit_opaque(self, out: list[Record], upto: int) -> None:
        if upto > self._pos:
            out.append(OpaqueData(self._buf[self._pos : upto]))
            self._pos = upto

    def _next_item_plausible(self, at: int) -> bool | None:
        """Whether `at` can start the item after a footer; None when the bytes are not here yet."""
        buf = self._buf
        end = len(buf)
        if at >= end:
            return True if self._base + at == self._boundary else None
        kind = buf[at]
        if kind == fmt.ITEM_EOF:
            if at + 1 == end:
                return True if self._closed else None
            if at + 7 > end:
                return None if not self._closed else False
            return buf[at + 1] == fmt.ITEM_VMDESCRIPTION and buf[at + 6] == ord("{")
        if kind in (fmt.ITEM_SECTION_START, fmt.ITEM_SECTION_FULL):
            if at + 6 > end:
                return None
            n = buf[at + 5]
            if at + 6 + n + 8 > end:
                return None
            idstr = buf[at + 6 : at + 6 + n]
            return n > 0 and all(0x20 <= c < 0x7F for c in idstr)
        if kind in (fmt.ITEM_SECTION_PART, fmt.ITEM_SECTION_END):
            if at + 5 > end:
                return None
            return BE32.unpack_from(buf, at + 1)[0] in self._live_sections
        if kind == fmt.ITEM_COMMAND:
            if at + 5 > end:
                return None
            cmd, length = BE16.unpack_from(buf, at + 1)[0], BE16.unpack_from(buf, at + 3)[0]
            return self._command_plausible(cmd, length)
        return False

    def _step_footer(self, out: list[Record]) -> bool:
        buf, pos = self._buf, self._pos
        if not self._have(5):
            return False
        (sid,) = BE32.unpack_from(buf, pos + 1)
        if buf[pos] != fmt.ITEM_SECTION_FOOTER or sid != self._section_id:
            self._fail(
                f"bad section footer: expected 7e {self._section_id:08x}, "
                f"found {buf[pos : pos + 5].hex(' ')}",
                pos,
            )
        out.append(SectionFooter(sid))
        self._pos = pos + 5
        self._step, self._where = self._step_item, "a section header"
        return True

    # -- RAM ----------------------------------------------------------------------------------

    def _step_ram(self, out: list[Record]) -> bool:
        """The hot loop: one RAM record per iteration, locals only, no per-record calls.

        With pages=False, runs of plain pages are skipped by skip_pages and page records are
        counted instead of made; otherwise parse_pages, when built, makes the records of runs
        of CONTINUE pages. Either way the records that stop a run go through the same checks.
        """
        buf = self._buf
        pos = start = self._pos
        end = len(buf)
        mask = self._page_mask
        page_size = self._page_size
        blocks = self._blocks
        last, last_length = self._last_block, self._last_block_length
        append = out.append
        unpack64 = BE64.unpack_from
        # tuple.__new__ skips the NamedTuple constructor's Python frame: ~100 ns a page.
        new_normal = partial(tuple.__new__, NormalPage)
        new_zero = partial(tuple.__new__, ZeroPage)
        emit, counted = self._pages, self._page_tally
        mapped = self._mapped_ram  # no page records: every record goes through the loop
        skip = None if emit or mapped else skip_pages
        parse = parse_pages if emit and not mapped else None
        encodings = self._xbzrle_table
        q = pos  # the end of the record read last; past `end` when the bytes ran out in it
        try:
            while end - pos >= 8:
                if skip is not None:
                    pos, normal, zero = skip(buf, pos, page_size, last_length)
                    counted[fmt.RAM_PAGE] += normal
                    counted[fmt.RAM_ZERO] += zero
                    if end - pos < 8:
                        break
                elif parse is not None and last is not None:
                    pos = parse(buf, pos, page_size, last, last_length, encodings, out)
                    if end - pos < 8:
                        break
                (word,) = unpack64(buf, pos)
                flags = word & mask
                kind = flags & ~fmt.RAM_CONTINUE
                p = pos + 8
                if kind in _PAGE_KINDS:
                    if mapped:
                        self._fail(f"{_KIND_NAMES[kind]} page record in a mapped-ram stream", pos)
                    if flags & fmt.RAM_CONTINUE:
                        if last is None:
                            self._fail("CONTINUE page record before any RAM block was named", pos)
                        name, length, named = last, last_length, False
                    else:
                        if p >= end:
                            break
                        q = p + 1 + buf[p]
                        if q > end:
                            break
                        name = str(buf[p + 1 : q], "latin-1")
                        length = blocks.get(name)
                        if length is None:
                            self._fail(f"page for RAM block {quoted(name)}, never announced", pos)
                        p, named = q, True
                    offset = word ^ flags
                    if offset >= length:
                        self._fail(
                            f"page offset 0x{offset:x} is beyond RAM block {quoted(name)} "
                            f"of 0x{length:x} bytes",
                            pos,
                        )
                    if kind == fmt.RAM_PAGE:
                        q = p + page_size
                        if q > end:
                            break
                        if emit:
                            append(new_normal((name, offset, buf[p:q], named)))
                    elif kind == fmt.RAM_ZERO:
                        if p >= end:
                            break
                        q = p + 1
                        if emit:
                            append(new_zero((name, offset, buf[p], named)))
                    elif kind == fmt.RAM_XBZRLE:
                        if p + 3 > end:
                            break
                        if buf[p] not in self._xbzrle_encodings:
                            self._fail(f"XBZRLE page with unknown encoding 0x{buf[p]:02x}", pos)
                        q = p + 3 + ((buf[p + 1] << 8) | buf[p + 2])
                        if q - p - 3 > page_size:
                            self._fail(f"XBZRLE page of {q - p - 3} bytes (limit {page_size})", pos)
                        if q > end:
                            break
                        if emit:
                            append(XbzrlePage(name, offset, buf[p + 3 : q], named, buf[p]))
                    else:
                        if p + 4 > end:
                            break
                        (clen,) = BE32.unpack_from(buf, p)
                        if clen > fmt.zlib_bound(page_size):
                            self._fail(f"compressed page of {clen} bytes is too large", pos)
                        q = p + 4 + clen
                        if q > end:
                            break
                        if emit:
                            append(CompressedPage(name, offset, buf[p + 4 : q], named))
                    if not emit:
                        counted[kind] += 1
                    last, last_length, pos = name, length, q
                    continue
                if flags & fmt.RAM_CONTINUE:
                    self._fail(f"CONTINUE flag on a RAM record of flags 0x{flags:x}", pos)
                if kind == fmt.RAM_EOS:
                    if word != fmt.RAM_EOS:
                        self._fail("end-of-section record with an address", pos)
                    append(EndOfSection())
                    pos = p
                    self._step, self._where = self._step_footer, "a section footer"
                    return True
                if kind == fmt.RAM_MEM_SIZE and mapped:
                    self._begin_mapped_ram(pos, word ^ flags)
                    pos = p
                    return True
                if kind == fmt.RAM_MEM_SIZE:
                    parsed = self._mem_size(pos, word ^ flags)
                    if parsed is None:
                        break
                    record, pos = parsed
                    blocks = self._blocks
                    append(record)
                elif kind == fmt.RAM_MULTIFD_FLUSH:
                    if mapped:
                        self._fail("multifd flush record in a mapped-ram stream", pos)
                    if word != kind:
                        self._fail("multifd flush record with an address", pos)
                    append(MultifdFlush())
                    pos = p
                elif kind == fmt.RAM_HOOK:
                    self._fail("RDMA hook RAM records are not supported", pos)
                elif kind == fmt.RAM_FULL:
                    self._fail("obsolete RAM_SAVE_FLAG_FULL record", pos)
                else:
                    self._fail(f"unknown RAM record flags 0x{flags:x}", pos)
            if q > end:  # wait for the whole record, not re-joining the bytes at every feed
                self._wanted = self._base + q
            return pos > start
        finally:
            self._pos = pos
            self._last_block, self._last_block_length = last, last_length

    def _check_ram_total(self, at: int, total: int) -> None:
        """QEMU writes as MEM_SIZE's total the sum of the used lengths of the blocks it lists,
        so checking it against MAX_RAM_TOTAL, before any block is read, bounds every block."""
        if total > MAX_RAM_TOTAL:
            self._fail(
                f"MEM_SIZE declares 0x{total:x} bytes of RAM (limit 0x{MAX_RAM_TOTAL:x})", at
            )

    def _mem_size(self, at: int, total: int) -> tuple[MemSize, int] | None:
        """The MEM_SIZE record: the block list, whose lengths must add up to `total`."""
        self._check_ram_total(at, total)
        buf = self._buf
        p = at + 8
        remaining = total
        blocks: list[RamBlock] = []
        names: set[str] = set()
        fields = 16 if self._ignore_shared else 8  # used length, and the address with it
        while remaining > 0:
            if len(blocks) >= MAX_RAM_BLOCKS:
                self._fail(f"more than {MAX_RAM_BLOCKS} RAM blocks", at)
            if p >= len(buf):
                return self._wait_mem_size(at, p + 1)
            need = p + 1 + buf[p] + fields
            if need > len(buf):
                return self._wait_mem_size(at, need)
            name = str(buf[p + 1 : p + 1 + buf[p]], "latin-1")
            if name in names or not _is_idstr(name):
                why = "is repeated" if name in names else "cannot be a QEMU idstr"
                self._fail(f"RAM block name {quoted(name)} {why}", p)
            names.add(name)
            (used,) = BE64.unpack_from(buf, need - fields)
            addr = BE64.unpack_from(buf, need - 8)[0] if self._ignore_shared else None
            p = need
            if self._postcopy_huge_pages:
                self._fail("postcopy with huge-page-backed RAM blocks is not supported", at)
            if used > remaining:
                self._fail(
                    f"RAM block list exceeds the MEM_SIZE total 0x{total:x} "
                    f"at block {quoted(name)}",
                    at,
                )
            remaining -= used
            blocks.append(RamBlock(name, used, None, addr, None))
        self._blocks = {block.name: block.used_length for block in blocks}
        return MemSize(total, tuple(blocks)), p

    # -- mapped-ram's block list ------------------------------------------------------------

    def _begin_mapped_ram(self, at: int, total: int) -> None:
        """MEM_SIZE of a mapped-ram stream: its entries come one by one, a block area after each."""
        self._check_ram_total(at, total)
        if self._postcopy_huge_pages:
            self._fail("postcopy with huge-page-backed RAM blocks is not supported", at)
        self._mapped_blocks, self._mapped_total, self._mapped_left = [], total, total
        self._step, self._where = self._step_mapped_entry, "a mapped-ram block list"

    def _step_mapped_entry(self, out: list[Record]) -> bool:
        """One entry of the list (name, used length, address with x-ignore-shared, header),
        checked; or, once the lengths add up, the whole list as one MemSize record."""
        blocks = self._mapped_blocks
        if self._mapped_left == 0:
            out.append(MemSize(self._mapped_total, tuple(blocks)))
            self._blocks = {block.name: block.used_length for block in blocks}
            self._step, self._where = self._step_ram, "a RAM section"
            return True
        buf, pos = self._buf, self._pos
        fields = (16 if self._ignore_shared else 8) + fmt.MAPPED_RAM_HEADER.size
        if pos >= len(buf) or pos + 1 + buf[pos] + fields > len(buf):
            return False
        if len(blocks) >= MAX_RAM_BLOCKS:
            self._fail(f"more than {MAX_RAM_BLOCKS} RAM blocks", pos)
        p = pos + 1 + buf[pos]
        end = p + fields
        name = str(buf[pos + 1 : p], "latin-1")
        if not _is_idstr(name) or any(block.name == name for block in blocks):
            why = "is repeated" if _is_idstr(name) else "cannot be a QEMU idstr"
            self._fail(f"RAM block name {quoted(name)} {why}", pos)
        (used,) = BE64.unpack_from(buf, p)
        addr = BE64.unpack_from(buf, p + 8)[0] if self._ignore_shared else None
        if used > self._mapped_left:
            self._fail(
                f"RAM block list exceeds the MEM_SIZE total 0x{self._mapped_total:x} "
                f"at block {quoted(name)}",
                pos,
            )
        at = end - fmt.MAPPED_RAM_HEADER.size
        header = bytes(buf[at:end])
        pages_offset = self._check_mapped_header(name, used, header, at)
        blocks.append(RamBlock(name, used, None, addr, header))
        self._mapped_left -= used
        self._pos = end
        self._skip_to = pages_offset + used - self._origin
        self._step = self._step_mapped_area
        self._where = f"the bitmap and pages of RAM block {quoted(name)}"
        return True

    def _check_mapped_header(self, name: str, used: int, header: bytes, at: int) -> int:
        """What QEMU's loader relies on: version 1, the stream's page size, the bitmap right
        after the header (where QEMU puts it) and the page area, page-aligned, after that.
        Returns where the page area starts."""
        version, page_size, bitmap_offset, pages_offset = fmt.MAPPED_RAM_HEADER.unpack(header)
        block = f"RAM block {quoted(name)}"
        if version != fmt.MAPPED_RAM_VERSION:
            why = f"mapped-ram header version {version} of {block} (only 1 is understood)"
            self._fail(why, at, EXIT_INCOMPATIBLE)
        if page_size != self._page_size:
            why = f"mapped-ram page size {page_size} of {block}, not the stream's {self._page_size}"
            self._fail(why, at + 4, EXIT_INCOMPATIBLE)
        here = self._origin + self._base + at + len(header)
        if bitmap_offset != here:
            why = f"mapped-ram bitmap of {block} at file offset {bitmap_offset}, not {here}"
            self._fail(why + " (right after its header)", at + 12)
        bitmap_end = bitmap_offset + fmt.mapped_ram_bitmap_size(used // page_size)
        if pages_offset < bitmap_end or pages_offset % page_size or used % page_size:
            why = (
                f"mapped-ram pages of {block} ({used} bytes) at file offset {pages_offset}: "
                f"not whole pages, page-aligned after its bitmap (which ends at {bitmap_end})"
            )
            self._fail(why, at + 20)
        return pages_offset

    def _step_mapped_area(self, out: list[Record]) -> bool:
        """Discard a block's bitmap and pages (or the bytes fed of them): the stream's next
        entry, or its next record, is at skip_to."""
        buf, pos = self._buf, self._pos
        target = self._skip_to - self._base
        if target > len(buf):
            self._pos = len(buf)
            return pos < len(buf)
        self._pos, self._skip_to = target, None
        self._step, self._where = self._step_mapped_entry, "a mapped-ram block list"
        return True

    def _wait_mem_size(self, at: int, need: int) -> None:
        """Wait for the bytes up to `need` that the unfinished MEM_SIZE record at `at` needs
        next, and once it is longer than real guests' lists, for twice its bytes: the record
        has no length and is read again from its start each time, so waiting block by block
        would make a crafted list fed in small pieces cost quadratic time. (Waiting for bytes
        beyond the record is harmless where it can happen: QEMU sends the RAM right after.)"""
        held = len(self._buf) - at
        if held > _EXACT_MEM_SIZE_WAIT:
            need = max(need, at + 2 * held)
        self._wanted = self._base + need

    # -- after EOF --------------------------------------------------------------------------------

    def _step_after_eof(self, out: list[Record]) -> bool:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            # QEMU sends no VM description in postcopy (nor for suppress-vmdesc machines, which
            # only the end of the input tells)
            if self._closed or self.postcopy:
                self.done = True
            return False
        if buf[pos] != fmt.ITEM_VMDESCRIPTION:
            self._fail(f"unexpected byte 0x{buf[pos]:02x} after the end-of-stream marker", pos)
        if not self._have(5):
            return False
        (length,) = BE32.unpack_from(buf, pos + 1)
        if length > self._max_vmdesc:
            limit = self._max_vmdesc
            self._fail(f"VM description of {length} bytes exceeds the {limit}-byte limit", pos)
        if not self._have(5 + length):
            self._wanted = self._base + pos + 5 + length
            return False
        out.append(VmDescription(buf[pos + 5 : pos + 5 + length]))
        self._pos = pos + 5 + length
        self._step, self._where = self._step_done, "nothing"
        self.done = True
        return True

    def _step_done(self, out: list[Record]) -> bool:
        if self._pos < len(self._buf):
            self._fail("trailing bytes after the end of the stream", self._pos)
        return False


def _is_idstr(name: str) -> bool:
    """Whether `name` can be a QEMU idstr (of a section or a RAM block): a non-empty C string of
    printable ASCII, such as "pc.ram", "/rom@etc/acpi/tables" or "0000:00:02.0/vga.vram"."""
    return name.isascii() and name.isprintable() and name != ""


# The steps that may read a fed memoryview in place: what they make holds no slice of it.
_READ_IN_PLACE = frozenset(
    {
        StreamParser._step_ram,
        StreamParser._step_item,
        StreamParser._step_footer,
        StreamParser._step_mapped_area,
    }
)


def capability_names(payload: bytes) -> list[str]:
    """The capability names listed in a configuration/capabilities subsection payload."""
    (count,) = BE32.unpack_from(payload)
    names, p = [], 4
    for _ in range(count):
        n = payload[p]
        names.append(payload[p + 1 : p + 1 + n].decode("latin-1"))
        p += 1 + n
    return names


def iter_records(chunks: Iterable[bytes], **options: int) -> Iterator[Record]:
    """Every record of a whole stream given as chunks; raises MigpipeError on bad input."""
    parser = StreamParser(**options)
    for chunk in chunks:
        parser.feed(chunk)
        yield from parser.next_records()
    parser.close()
    yield from parser.next_records()


def parse_bytes(data: bytes, **options: int) -> list[Record]:
    return list(iter_records([data], **options))
