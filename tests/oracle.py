"""The tests' oracle: an independent replay of the RAM pages a QEMU migration stream carries.

What a destination must hold after a live migration is what the source *sent*, not the source's
memory (QEMU 7.2 under TCG can miss guest writes between dirty syncs), so tests compare a
destination's `pmemsave` with this replay of the source's stream. It shares no code with migpipe
on purpose: a parser bug must not be able to confirm itself.

It is deliberately minimal and strict. It walks the header, the configuration item (and its
subsections), COMMAND items and the `ram` section's START/PART/END records (MEM_SIZE, ZERO,
PAGE, XBZRLE, EOS, CONTINUE) and stops after ram's END section: for the test guests ram is the
first START section and the only section with START/PART bodies, and everything after ram's END
is device state. Anything else raises StreamError. QEMU 10.0's streams differ from 7.2's before
ram's END only by a SWITCHOVER_START command (11, no payload), skipped like every command but
PACKAGED; its section ids differ too, which is why ram's id is read, never assumed.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PAGE_SIZE = 4096
IMAGE_BLOCK = "pc.ram"
IMAGE_START = 1 << 20  # the range qemuvm.load_stream returns: pc.ram from 1 MiB to its end

MAGIC = 0x5145564D
VERSION = 3

EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SUBSECTION = 0x05
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E
CMD_PACKAGED = 7

RAM_ZERO = 0x002
RAM_MEM_SIZE = 0x004
RAM_PAGE = 0x008
RAM_EOS = 0x010
RAM_CONTINUE = 0x020
RAM_XBZRLE = 0x040
XBZRLE_ENCODING = 0x01

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class StreamError(ValueError):
    """The stream is malformed, truncated, or outside what this oracle understands."""


@dataclass
class Replay:
    """The replayed image plus counts that say what kind of migration the stream was."""

    image: bytes = field(repr=False)  # pc.ram from IMAGE_START to its end, starting from zeros
    blocks: dict[str, int]  # RAM block name -> used_length, from MEM_SIZE
    zero_pages: int = 0
    normal_pages: int = 0
    xbzrle_pages: int = 0
    ram_sections: int = 0  # START + PART + END sections of ram
    pages_resent: int = 0  # distinct pages sent more than once
    max_sends: int = 0  # most times any single page was sent
    xbzrle_bytes: int = 0  # encoded payload bytes of all XBZRLE records

    @property
    def pages_by_kind(self) -> dict[str, int]:
        return {"zero": self.zero_pages, "page": self.normal_pages, "xbzrle": self.xbzrle_pages}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise StreamError(f"truncated: need {n} bytes at offset {self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise StreamError(f"truncated at offset {self.pos}")
        self.pos += 1
        return self.data[self.pos - 1]

    def _unpack(self, st: struct.Struct) -> int:
        if self.pos + st.size > len(self.data):
            raise StreamError(f"truncated: need {st.size} bytes at offset {self.pos}")
        (value,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return value

    def be16(self) -> int:
        return self._unpack(_BE16)

    def be32(self) -> int:
        return self._unpack(_BE32)

    def be64(self) -> int:
        return self._unpack(_BE64)

    def counted(self) -> str:
        return self.take(self.u8()).decode("latin-1")

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None


def _uleb(delta: bytes, pos: int) -> tuple[int, int]:
    """QEMU's restricted ULEB128: at most 2 bytes, the second without a continuation bit."""
    first = delta[pos]
    if first < 0x80:
        return first, pos + 1
    if pos + 1 >= len(delta) or delta[pos + 1] >= 0x80:
        raise StreamError("bad XBZRLE length encoding")
    return (first & 0x7F) | (delta[pos + 1] << 7), pos + 2


def apply_xbzrle(page: bytearray, delta: bytes) -> None:
    """Apply an XBZRLE payload in place: (zero-run, literal-run + new bytes) pairs.

    Rejects what QEMU's decoder rejects: fewer than 2 bytes left before a run length, a zero
    run of 0 after the first pair, an empty literal run, or runs past the page end.
    """
    pos = 0
    offset = 0
    while pos < len(delta):
        if len(delta) - pos < 2:
            raise StreamError("XBZRLE: dangling bytes")
        zrun, pos = _uleb(delta, pos)
        if zrun == 0 and pos > 1:
            raise StreamError("XBZRLE: empty unchanged run after the first pair")
        offset += zrun
        if len(delta) - pos < 2:
            raise StreamError("XBZRLE: unchanged run without a literal run")
        nzrun, pos = _uleb(delta, pos)
        if nzrun == 0 or offset + nzrun > len(page) or pos + nzrun > len(delta):
            raise StreamError("XBZRLE: bad literal run")
        page[offset : offset + nzrun] = delta[pos : pos + nzrun]
        offset += nzrun
        pos += nzrun


class _RamReplay:
    def __init__(self) -> None:
        self.blocks: dict[str, int] = {}
        self.memory: dict[str, bytearray] = {}
        self.sends: Counter[tuple[str, int]] = Counter()
        self.last_block: str | None = None
        self.counts: Counter[str] = Counter()

    def body(self, r: _Reader, *, start: bool) -> None:
        """One section body: records up to and including EOS."""
        while True:
            word = r.be64()
            flags = word & (PAGE_SIZE - 1)
            addr = word & ~(PAGE_SIZE - 1)
            kind = flags & ~RAM_CONTINUE
            if kind == RAM_EOS:
                return
            if kind == RAM_MEM_SIZE:
                if not start or flags != RAM_MEM_SIZE:
                    raise StreamError("MEM_SIZE outside the START section")
                self._mem_size(r, addr)
                continue
            if kind not in (RAM_ZERO, RAM_PAGE, RAM_XBZRLE):
                raise StreamError(f"unsupported RAM record flags {flags:#x} at {r.pos - 8}")
            if flags & RAM_CONTINUE:
                if self.last_block is None:
                    raise StreamError("CONTINUE before any named block")
            else:
                self.last_block = r.counted()
            name = self.last_block
            if name not in self.memory:
                raise StreamError(f"unknown RAM block {name!r}")
            mem = self.memory[name]
            if addr + PAGE_SIZE > len(mem):
                raise StreamError(f"offset {addr:#x} outside block {name!r}")
            if kind == RAM_ZERO:
                fill = r.u8()
                mem[addr : addr + PAGE_SIZE] = bytes([fill]) * PAGE_SIZE
                self.counts["zero"] += 1
            elif kind == RAM_PAGE:
                mem[addr : addr + PAGE_SIZE] = r.take(PAGE_SIZE)
                self.counts["page"] += 1
            else:
                if r.u8() != XBZRLE_ENCODING:
                    raise StreamError("XBZRLE: wrong encoding flag")
                length = r.be16()
                if length > PAGE_SIZE:
                    raise StreamError("XBZRLE: payload longer than a page")
                page = mem[addr : addr + PAGE_SIZE]
                apply_xbzrle(page, r.take(length))
                mem[addr : addr + PAGE_SIZE] = page
                self.counts["xbzrle"] += 1
                self.counts["xbzrle_bytes"] += length
            self.sends[(name, addr)] += 1

    def _mem_size(self, r: _Reader, total: int) -> None:
        while total > 0:
            name = r.counted()
            length = r.be64()
            if length % PAGE_SIZE or length > total:
                raise StreamError(f"bad MEM_SIZE entry {name!r} {length:#x}")
            self.blocks[name] = length
            self.memory[name] = bytearray(length)
            total -= length


def _configuration(r: _Reader) -> None:
    if r.u8() != CONFIGURATION:
        raise StreamError("no configuration item after the header")
    r.take(r.be32())  # machine name
    while r.peek() == SUBSECTION:
        r.u8()
        name = r.counted()
        r.be32()  # version
        if name == "configuration/target-page-bits":
            r.be32()
        elif name == "configuration/capabilities":
            for _ in range(r.be32()):
                r.counted()
        elif name == "configuration/uuid":
            r.take(16)
        else:
            raise StreamError(f"unknown configuration subsection {name!r}")


def _footer(r: _Reader, section_id: int) -> None:
    if r.u8() != SECTION_FOOTER or r.be32() != section_id:
        raise StreamError(f"bad footer for section {section_id} at {r.pos - 5}")


def replay(stream: Path | bytes) -> Replay:
    """Replay a stream's RAM pages into an image of pc.ram from 1 MiB, starting from zeros."""
    data = Path(stream).read_bytes() if isinstance(stream, Path | str) else bytes(stream)
    r = _Reader(data)
    if r.be32() != MAGIC or r.be32() != VERSION:
        raise StreamError("not a QEMU migration stream (magic/version)")
    _configuration(r)
    ram = _RamReplay()
    ram_id: int | None = None
    sections = 0
    while True:
        item = r.u8()
        if item == COMMAND:
            cmd = r.be16()
            if cmd == CMD_PACKAGED:
                raise StreamError("postcopy PACKAGED command is not supported")
            r.take(r.be16())
        elif item == SECTION_START:
            section_id = r.be32()
            idstr = r.counted()
            r.be32()  # instance id
            version = r.be32()
            if idstr != "ram" or ram_id is not None or version != 4:
                raise StreamError(f"unexpected START section {idstr!r} v{version}")
            ram_id = section_id
            ram.body(r, start=True)
            _footer(r, section_id)
            sections += 1
        elif item in (SECTION_PART, SECTION_END):
            section_id = r.be32()
            if ram_id is None or section_id != ram_id:
                raise StreamError(f"PART/END for section {section_id}, not ram")
            ram.body(r, start=False)
            _footer(r, section_id)
            sections += 1
            if item == SECTION_END:
                break
        else:
            raise StreamError(f"unexpected item type {item:#x} before ram's END at {r.pos - 1}")
    if IMAGE_BLOCK not in ram.memory:
        raise StreamError(f"no {IMAGE_BLOCK} block")
    sends = ram.sends.values()
    return Replay(
        image=bytes(ram.memory[IMAGE_BLOCK][IMAGE_START:]),
        blocks=ram.blocks,
        zero_pages=ram.counts["zero"],
        normal_pages=ram.counts["page"],
        xbzrle_pages=ram.counts["xbzrle"],
        ram_sections=sections,
        pages_resent=sum(1 for n in sends if n > 1),
        max_sends=max(sends, default=0),
        xbzrle_bytes=ram.counts["xbzrle_bytes"],
    )


def first_difference(actual: bytes, expected: bytes, base: int = IMAGE_START) -> str | None:
    """None if the images are equal, else a short description (never a 127 MiB diff).

    `base` is the guest-physical address of the images' first byte.
    """
    if actual == expected:
        return None
    if len(actual) != len(expected):
        return f"sizes differ: {len(actual)} bytes, expected {len(expected)}"
    a, e = memoryview(actual), memoryview(expected)
    pages = [n for n in range(0, len(a), PAGE_SIZE) if a[n : n + PAGE_SIZE] != e[n : n + PAGE_SIZE]]
    first = pages[0]
    offset = next(i for i in range(first, first + PAGE_SIZE) if a[i] != e[i])
    return (
        f"{len(pages)} of {len(a) // PAGE_SIZE} pages differ; first byte at guest-physical "
        f"{base + offset:#x}: {a[offset]:#04x}, expected {e[offset]:#04x}"
    )
