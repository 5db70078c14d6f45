"""Turns records back into QEMU migration stream bytes: the parser's mirror image.

For every record the parser produces, writing it gives back exactly the bytes it was parsed from.
Records built by hand (the generator, filters) may leave `named` False everywhere: the writer
names a RAM block whenever its own output has not named it last, so CONTINUE is always correct.

write_all() writes runs of page records with the C extension `migpipe.stream._pages` when it
was built (it is optional; PAGES_IMPLEMENTATION says which is in use, MIGPIPE_PAGES=python
forces the Python methods, which write the same bytes and every record the C leaves to them).
"""

import os
from collections.abc import Callable, Iterable
from typing import Literal

from migpipe.errors import quoted
from migpipe.stream import format as fmt
from migpipe.stream.records import (
    Command,
    CompressedPage,
    Configuration,
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    MultifdFlush,
    NormalPage,
    OpaqueData,
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

try:
    if os.environ.get("MIGPIPE_PAGES") == "python":
        raise ImportError("MIGPIPE_PAGES=python")
    from migpipe.stream._pages import write_pages
except ImportError:
    write_pages = None

PAGES_IMPLEMENTATION: Literal["c", "python"] = "python" if write_pages is None else "c"
_HEADER_TYPES = {SectionStart: fmt.ITEM_SECTION_START, SectionFull: fmt.ITEM_SECTION_FULL}
_ID_TYPES = {
    SectionPart: fmt.ITEM_SECTION_PART,
    SectionEnd: fmt.ITEM_SECTION_END,
    SectionFooter: fmt.ITEM_SECTION_FOOTER,
}
_FLAG_WORDS = {
    EndOfSection: BE64.pack(fmt.RAM_EOS),
    MultifdFlush: BE64.pack(fmt.RAM_MULTIFD_FLUSH),
}


def _counted(text: str) -> bytes:
    raw = text.encode("latin-1")
    if len(raw) > 255:
        raise ValueError(f"name longer than 255 bytes: {quoted(text)}")
    return bytes([len(raw)]) + raw


class StreamWriter:
    """Appends the encoding of records to a bytearray; keeps the output's CONTINUE state."""

    def __init__(self) -> None:
        self._last_block: str | None = None
        self._block_names: dict[str, bytes] = {}
        self._writers: dict[type, Callable[[bytearray, Record], None]] = {
            FileHeader: self._file_header,
            Configuration: self._configuration,
            SectionStart: self._section_header,
            SectionFull: self._section_header,
            SectionPart: self._section_id_only,
            SectionEnd: self._section_id_only,
            SectionFooter: self._section_id_only,
            OpaqueData: self._opaque,
            MemSize: self._mem_size,
            ZeroPage: self._zero_page,
            NormalPage: self._normal_page,
            XbzrlePage: self._xbzrle_page,
            CompressedPage: self._compressed_page,
            MultifdFlush: self._flag_only,
            EndOfSection: self._flag_only,
            Command: self._command,
            Eof: self._eof,
            VmDescription: self._vmdescription,
        }

    def write(self, out: bytearray, record: Record) -> None:
        self._writers[type(record)](out, record)

    def write_all(self, out: bytearray, records: Iterable[Record]) -> None:
        writers = self._writers
        if write_pages is None or type(out) is not bytearray:
            for record in records:
                writers[type(record)](out, record)
            return
        if type(records) is not list:
            records = list(records)
        at, end = 0, len(records)
        while at < end:
            at, self._last_block = write_pages(out, records, at, self._last_block)
            if at < end:  # a record the C leaves to the methods
                record = records[at]
                writers[type(record)](out, record)
                at += 1

    def encode(self, record: Record) -> bytes:
        out = bytearray()
        self.write(out, record)
        return bytes(out)

    # -- stream structure -------------------------------------------------------------------------

    @staticmethod
    def _file_header(out: bytearray, record: FileHeader) -> None:
        out += BE32.pack(fmt.MAGIC) + BE32.pack(record.version)

    @staticmethod
    def _configuration(out: bytearray, record: Configuration) -> None:
        machine = record.machine.encode("latin-1")
        out.append(fmt.ITEM_CONFIGURATION)
        out += BE32.pack(len(machine)) + machine
        for sub in record.subsections:
            out.append(fmt.ITEM_SUBSECTION)
            out += _counted(sub.name) + BE32.pack(sub.version) + sub.payload

    def _section_header(self, out: bytearray, record: SectionStart | SectionFull) -> None:
        out.append(_HEADER_TYPES[type(record)])
        out += BE32.pack(record.section_id) + _counted(record.idstr)
        out += BE32.pack(record.instance_id) + BE32.pack(record.version_id)

    def _section_id_only(self, out: bytearray, record: SectionPart) -> None:
        out.append(_ID_TYPES[type(record)])
        out += BE32.pack(record.section_id)

    @staticmethod
    def _opaque(out: bytearray, record: OpaqueData) -> None:
        out += record.data

    @staticmethod
    def _command(out: bytearray, record: Command) -> None:
        out.append(fmt.ITEM_COMMAND)
        out += BE16.pack(record.command) + BE16.pack(len(record.data)) + record.data

    @staticmethod
    def _eof(out: bytearray, record: Eof) -> None:
        out.append(fmt.ITEM_EOF)

    @staticmethod
    def _vmdescription(out: bytearray, record: VmDescription) -> None:
        out.append(fmt.ITEM_VMDESCRIPTION)
        out += BE32.pack(len(record.json)) + record.json

    # -- RAM ------------------------------------------------------------------------------------

    def _mem_size(self, out: bytearray, record: MemSize) -> None:
        out += BE64.pack(record.total | fmt.RAM_MEM_SIZE)
        for block in record.blocks:
            out += _counted(block.name) + BE64.pack(block.used_length)
            if block.page_size is not None:
                out += BE64.pack(block.page_size)
            if block.addr is not None:
                out += BE64.pack(block.addr)
            if block.mapped_ram is not None:
                out += block.mapped_ram

    def _flag_only(self, out: bytearray, record: EndOfSection | MultifdFlush) -> None:
        out += _FLAG_WORDS[type(record)]

    def _page_word(self, out: bytearray, record: ZeroPage, flag: int) -> None:
        """The record word, plus the block name unless CONTINUE is both asked for and correct."""
        block = record.block
        if record.named or block != self._last_block:
            name = self._block_names.get(block)
            if name is None:
                name = self._block_names[block] = _counted(block)
            out += BE64.pack(record.offset | flag)
            out += name
            self._last_block = block
        else:
            out += BE64.pack(record.offset | flag | fmt.RAM_CONTINUE)

    def _zero_page(self, out: bytearray, record: ZeroPage) -> None:
        self._page_word(out, record, fmt.RAM_ZERO)
        out.append(record.fill)

    def _normal_page(self, out: bytearray, record: NormalPage) -> None:
        self._page_word(out, record, fmt.RAM_PAGE)
        out += record.data

    def _xbzrle_page(self, out: bytearray, record: XbzrlePage) -> None:
        self._page_word(out, record, fmt.RAM_XBZRLE)
        out.append(record.encoding)
        out += BE16.pack(len(record.data)) + record.data

    def _compressed_page(self, out: bytearray, record: CompressedPage) -> None:
        self._page_word(out, record, fmt.RAM_COMPRESS_PAGE)
        out += BE32.pack(len(record.data)) + record.data


def write_records(records: Iterable[Record]) -> bytes:
    out = bytearray()
    StreamWriter().write_all(out, records)
    return bytes(out)
