"""What a migration stream holds: sections, RAM blocks, pages by kind, passes, device state.

StreamStats consumes records in stream order and keeps counters only, so it works on streams of
any length in bounded memory, and still has everything up to the fault when a stream is corrupt.
Words follow QEMU's own `query-migrate` where they mean the same thing (normal, duplicate = zero
pages, xbzrle).
"""

from dataclasses import dataclass, field

from migpipe.stream import format as fmt
from migpipe.stream.parser import capability_names
from migpipe.stream.records import (
    PAGE_KIND_NAMES,
    Command,
    Configuration,
    MemSize,
    OpaqueData,
    Record,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VmDescription,
    ZeroPage,
)
from migpipe.stream.writer import StreamWriter

GLOBALSTATE = "globalstate"  # QEMU's section holding the run state a stream was saved in
GLOBALSTATE_SIZE = 104  # be32 length, then a 100-byte buffer for the run state's name
_CHUNK_PAGES = 256  # re-send counters are kept per 1 MiB of guest RAM actually seen


@dataclass
class SectionStats:
    section_id: int
    idstr: str
    instance_id: int = 0
    version_id: int = 0
    headers: dict[str, int] = field(default_factory=dict)  # start/part/end/full counts
    bytes: int = 0


class StreamStats:
    """Counters over a stream's records; feed every record to `add`, in order."""

    def __init__(self, page_size: int = fmt.DEFAULT_PAGE_SIZE) -> None:
        self._writer = StreamWriter()  # for exact on-wire sizes of each record
        self._page_size = page_size
        self.total_bytes = 0
        self.machine: str | None = None
        self._globalstate = bytearray()  # its body: the run state the guest was saved in
        self.capabilities: list[str] = []
        self.sections: dict[int, SectionStats] = {}
        self.blocks: dict[str, int] = {}
        self.pages: dict[str, int] = dict.fromkeys(PAGE_KIND_NAMES.values(), 0)
        self.page_bytes: dict[str, int] = dict.fromkeys(PAGE_KIND_NAMES.values(), 0)
        self.commands: dict[str, int] = {}
        self.ram_bytes = 0
        self.device_bytes = 0
        self.other_bytes = 0
        self.vmdesc_bytes = 0
        self.passes = 0
        self.pages_resent = 0  # pages sent more than once (counted once per page)
        self.max_sends = 0
        self._sends: dict[tuple[str, int], bytearray] = {}
        self._block_order: dict[str, int] = {}
        self._position = (-1, -1)
        self._section: SectionStats | None = None

    def add(self, record: Record) -> None:
        size = len(self._writer.encode(record))
        self.total_bytes += size
        kind = type(record)
        name = PAGE_KIND_NAMES.get(kind)
        if name is not None:
            self.pages[name] += 1
            self.page_bytes[name] += size
            self._count_send(record)
        elif kind in (SectionStart, SectionFull, SectionPart, SectionEnd):
            self._open_section(record)
        elif kind is MemSize:
            self.blocks.update((block.name, block.used_length) for block in record.blocks)
            self._block_order = {name: index for index, name in enumerate(self.blocks)}
        elif kind is Configuration:
            self.machine = record.machine
            for sub in record.subsections:
                if sub.name == fmt.CONFIG_CAPABILITIES:
                    self.capabilities = capability_names(sub.payload)
        elif kind is Command:
            command = fmt.command_name(record.command)
            self.commands[command] = self.commands.get(command, 0) + 1
        elif kind is VmDescription:
            self.vmdesc_bytes = size
        section = self._section
        if kind is OpaqueData and section is not None and section.idstr == GLOBALSTATE:
            self._globalstate += record.data[: GLOBALSTATE_SIZE - len(self._globalstate)]
        if section is None:
            self.other_bytes += size
            return
        section.bytes += size
        if section.idstr == fmt.RAM_IDSTR:
            self.ram_bytes += size
        else:
            self.device_bytes += size
        if kind is SectionFooter:
            self._section = None

    def _open_section(self, record: SectionStart | SectionFull | SectionPart | SectionEnd) -> None:
        sid = record.section_id
        section = self.sections.get(sid)
        if section is None or isinstance(record, SectionStart | SectionFull):
            section = self.sections[sid] = SectionStats(
                sid, record.idstr, record.instance_id, record.version_id
            )
        header = type(record).__name__.removeprefix("Section").lower()
        section.headers[header] = section.headers.get(header, 0) + 1
        self._section = section

    def _count_send(self, record: ZeroPage) -> None:
        """Re-sends and passes: a page earlier in RAM order than the last one starts a pass."""
        page = record.offset // self._page_size
        position = (self._block_order.get(record.block, -1), page)
        if position <= self._position or not self.passes:
            self.passes += 1
        self._position = position
        chunk_key = (record.block, page // _CHUNK_PAGES)
        chunk = self._sends.get(chunk_key)
        if chunk is None:
            chunk = self._sends[chunk_key] = bytearray(_CHUNK_PAGES)
        index = page % _CHUNK_PAGES
        sends = chunk[index] + 1
        if sends <= 255:
            chunk[index] = sends
        if sends == 2:
            self.pages_resent += 1
        self.max_sends = max(self.max_sends, sends)

    @property
    def runstate(self) -> str | None:
        """What QEMU's globalstate section says the guest was doing when it was saved
        ("running", "paused", ...): be32 length with its NUL, then the name, in 100 bytes."""
        body = bytes(self._globalstate)
        if len(body) < 5:
            return None
        length = min(int.from_bytes(body[:4], "big"), len(body) - 4)
        name = body[4 : 4 + length].split(b"\0")[0].decode("latin-1")
        return name if name.isascii() and name.isprintable() and name else None

    def as_dict(self) -> dict:
        return {
            "bytes": self.total_bytes,
            "machine": self.machine,
            "runstate": self.runstate,
            "capabilities": self.capabilities,
            "ram_blocks": [{"name": n, "used_length": s} for n, s in self.blocks.items()],
            "pages": self.pages,
            "page_bytes": self.page_bytes,
            "passes": self.passes,
            "pages_resent": self.pages_resent,
            "max_sends_of_a_page": self.max_sends,
            "ram_bytes": self.ram_bytes,
            "device_state_bytes": self.device_bytes,
            "other_bytes": self.other_bytes,
            "vmdescription_bytes": self.vmdesc_bytes,
            "commands": self.commands,
            "sections": [
                {
                    "section_id": s.section_id,
                    "idstr": s.idstr,
                    "instance_id": s.instance_id,
                    "version_id": s.version_id,
                    "headers": s.headers,
                    "bytes": s.bytes,
                }
                for s in self.sections.values()
            ],
        }

    def render(self) -> str:
        """A human-readable report: sections, then RAM, then totals."""
        lines = [
            f"{'id':>4}  {'section':<32} {'inst':>4} {'ver':>3}  {'headers':<30} {'bytes':>14}"
        ]
        for s in self.sections.values():
            headers = " ".join(f"{k}:{v}" for k, v in s.headers.items())
            lines.append(
                f"{s.section_id:>4}  {s.idstr:<32} {s.instance_id:>4} {s.version_id:>3}  "
                f"{headers:<30} {s.bytes:>14,}"
            )
        lines.append("")
        capabilities = ", ".join(self.capabilities) or "-"
        lines.append(
            f"machine: {self.machine or 'not given'}   run state: {self.runstate or 'not given'}"
            f"   capabilities: {capabilities}"
        )
        for name, size in self.blocks.items():
            pages = size // self._page_size
            lines.append(f"RAM block {name:<32} {size:>14,} bytes ({pages:,} pages)")
        kinds = "  ".join(f"{k} {v:,}" for k, v in self.pages.items())
        lines.append(f"pages: {kinds}")
        lines.append(
            f"passes over RAM: {self.passes}   pages sent more than once: {self.pages_resent:,}"
            f"   most sends of one page: {self.max_sends}"
        )
        ratio = self.device_bytes / self.ram_bytes if self.ram_bytes else 0.0
        lines.append(
            f"bytes: total {self.total_bytes:,}   RAM {self.ram_bytes:,}   device state "
            f"{self.device_bytes:,} ({ratio:.4%} of RAM)   other {self.other_bytes:,}"
        )
        if self.commands:
            lines.append("commands: " + ", ".join(f"{k} x{v}" for k, v in self.commands.items()))
        return "\n".join(lines)
