"""The records a QEMU migration stream is made of.

The parser turns bytes into these and the writer turns them back into the same bytes, so every
field needed for a byte-identical rewrite is kept (for example whether a page record named its
RAM block or used CONTINUE). They are NamedTuples: immutable, and cheap enough to make one per
page at gigabytes per second.
"""

from typing import NamedTuple


class FileHeader(NamedTuple):
    version: int


class ConfigSubsection(NamedTuple):
    name: str
    version: int
    payload: bytes


class Configuration(NamedTuple):
    machine: str
    subsections: tuple[ConfigSubsection, ...] = ()


class SectionStart(NamedTuple):
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


class SectionFull(NamedTuple):
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


class SectionPart(NamedTuple):
    section_id: int


class SectionEnd(NamedTuple):
    section_id: int


class SectionFooter(NamedTuple):
    section_id: int


class OpaqueData(NamedTuple):
    """Bytes migpipe carries without interpreting: device-state bodies, packaged blobs.

    One body may arrive as several of these; their concatenation is the body.
    """

    data: bytes


class RamBlock(NamedTuple):
    """One block of MEM_SIZE's list. `page_size` and `mapped_ram` are always None today (the
    parser refuses streams that carry them), but the writer emits them, so the block list of a
    huge-page or mapped-ram stream is rewritten byte for byte once the parser takes one."""

    name: str
    used_length: int
    page_size: int | None = None  # only for huge-page blocks under postcopy
    addr: int | None = None  # only with x-ignore-shared
    mapped_ram: bytes | None = None  # the 28-byte mapped-ram header (QEMU 9.0+)


class MemSize(NamedTuple):
    """The RAM section's block list; total is the sum of the used lengths."""

    total: int
    blocks: tuple[RamBlock, ...]


class ZeroPage(NamedTuple):
    block: str
    offset: int
    fill: int = 0
    named: bool = False  # the record spelled out the block name instead of CONTINUE


class NormalPage(NamedTuple):
    block: str
    offset: int
    data: bytes
    named: bool = False


class XbzrlePage(NamedTuple):
    """A delta against the destination's current copy of the page (see migpipe-stream(5)).

    QEMU's encoding byte is always 1; migpipe's xbzrle filter uses its own value on the wire.
    """

    block: str
    offset: int
    data: bytes
    named: bool = False
    encoding: int = 1


class CompressedPage(NamedTuple):
    """A zlib-compressed page from QEMU's (pre-9.1) `compress` capability."""

    block: str
    offset: int
    data: bytes
    named: bool = False


class MultifdFlush(NamedTuple):
    pass


class EndOfSection(NamedTuple):
    """RAM's end-of-section record (EOS), closing one ram section body."""


class Command(NamedTuple):
    command: int
    data: bytes


class Eof(NamedTuple):
    pass


class VmDescription(NamedTuple):
    json: bytes


Record = (
    FileHeader
    | Configuration
    | SectionStart
    | SectionFull
    | SectionPart
    | SectionEnd
    | SectionFooter
    | OpaqueData
    | MemSize
    | ZeroPage
    | NormalPage
    | XbzrlePage
    | CompressedPage
    | MultifdFlush
    | EndOfSection
    | Command
    | Eof
    | VmDescription
)
# The words QEMU's query-migrate uses where they mean the same (normal, xbzrle; zero pages are
# its "duplicate").
PAGE_KIND_NAMES = {
    ZeroPage: "zero",
    NormalPage: "normal",
    XbzrlePage: "xbzrle",
    CompressedPage: "compressed",
}


def _same_record(self: tuple, other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)


def _different_record(self: tuple, other: object) -> bool:
    return not _same_record(self, other)


# NamedTuples compare as plain tuples, which would make Eof() == EndOfSection() and
# SectionPart(2) == SectionFooter(2); records of different kinds must never be equal.
for _record_type in Record.__args__:
    _record_type.__eq__ = _same_record
    _record_type.__ne__ = _different_record
    _record_type.__hash__ = tuple.__hash__
