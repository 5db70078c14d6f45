"""A stream's skeleton: everything but its RAM pages, and the compact stream rebuilt around them.

`Skeleton` collects it from records (extract, save --layout fixed) into a manifest; the manifest
is JSON, so what reads one back (restore of a fixed file, generate --from) first checks every
field with `checked_blocks`; `compact_stream` then makes a single-pass stream of it, each page
once, from wherever the pages are kept.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from migpipe.errors import MigpipeError, quoted
from migpipe.stream import format as fmt
from migpipe.stream.parser import MAX_MACHINE_NAME, MAX_RAM_BLOCKS, is_page_size
from migpipe.stream.records import (
    Command,
    ConfigSubsection,
    Configuration,
    EndOfSection,
    FileHeader,
    MemSize,
    NormalPage,
    OpaqueData,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    ZeroPage,
)

FORMAT = "migpipe-extract/1"
PAGES_PER_SECTION = 4096


class Limits(NamedTuple):
    """What a manifest's reader allows: list lengths, and pages received in one block."""

    items: int
    pages: int


class Skeleton:
    """Everything of a stream but its RAM pages: what a compact stream needs around them.

    `add` takes every record in order and says which ones are device state (everything after
    RAM's END section, kept verbatim by the caller); the manifest collects the rest.
    """

    def __init__(self, page_size: int = fmt.DEFAULT_PAGE_SIZE) -> None:
        self.manifest: dict = {"format": FORMAT, "page_size": page_size, "subsections": []}
        self._ram_section: int | None = None
        self.phase = "ram"  # then "ram-end" inside RAM's END section, then "device-state"

    def add(self, record: Record) -> bool:
        """Note `record`; True when it is device state, for the caller to keep."""
        if self.phase == "device-state":
            return True
        kind, manifest = type(record), self.manifest
        if kind is FileHeader:
            manifest["version"] = record.version
        elif kind is Configuration:
            manifest["machine"] = record.machine
            manifest["subsections"] = [
                {"name": s.name, "version": s.version, "payload": s.payload.hex()}
                for s in record.subsections
            ]
        elif kind is SectionStart and record.idstr == fmt.RAM_IDSTR:
            self._ram_section = record.section_id
            manifest["ram_section"] = record._asdict()
        elif kind in (SectionStart, SectionPart, SectionEnd) and (
            record.section_id != self._ram_section
        ):
            raise MigpipeError(
                "only streams whose one iterative section is RAM can be stored page by page; "
                f"found section {record.section_id} before RAM ended"
            )
        elif kind is SectionFull:
            raise MigpipeError(
                f"cannot place device state ({quoted(record.idstr)}) sent before RAM ended "
                "(early-setup devices, QEMU 8.0+ virtio-mem)"
            )
        elif kind is Command:
            _keep_command(manifest, record)
        elif kind is SectionEnd:
            self.phase = "ram-end"
        elif kind is SectionFooter and self.phase == "ram-end":
            self.phase = "device-state"
        elif kind is MemSize:
            manifest["blocks"] = [
                {"name": b.name, "used_length": b.used_length, "addr": b.addr}
                for b in record.blocks
            ]
        return False

    def finish(self) -> dict:
        if self.phase != "device-state":
            raise MigpipeError("stream ended before RAM's END section")
        return self.manifest


# Commands that only make sense with a live return path; a stream loaded from a file has none.
_RETURN_PATH_COMMANDS = {"OPEN_RETURN_PATH", "PING"}


def _keep_command(manifest: dict, record: Command) -> None:
    """Commands before RAM's END: kept to be sent again, dropped (return path), or refused."""
    name = fmt.command_name(record.command)
    if name in _RETURN_PATH_COMMANDS:
        manifest.setdefault("dropped_commands", []).append(name)
    elif name.startswith("POSTCOPY") or name in ("PACKAGED", "ENABLE_COLO"):
        raise MigpipeError(f"extract handles precopy streams; this one has {name}")
    else:
        manifest.setdefault("commands", []).append(
            {"command": record.command, "data": record.data.hex()}
        )


def compact_stream(
    manifest: dict,
    pages: Callable[[RamBlock], Iterable[tuple[int, bytes]]],
    device_state: Iterable[bytes],
) -> Iterator[Record]:
    """A single-pass stream from a skeleton's manifest, each block's (offset, page) in order
    (only blocks that received pages are asked), and the device state's bytes."""
    page_size = manifest["page_size"]
    zero = bytes(page_size)
    section = manifest["ram_section"]
    sid = section["section_id"]
    blocks = tuple(
        RamBlock(b["name"], b["used_length"], None, b["addr"]) for b in manifest["blocks"]
    )
    yield FileHeader(manifest["version"])
    yield Configuration(
        manifest["machine"],
        tuple(
            ConfigSubsection(s["name"], s["version"], bytes.fromhex(s["payload"]))
            for s in manifest["subsections"]
        ),
    )
    yield SectionStart(sid, fmt.RAM_IDSTR, section["instance_id"], section["version_id"])
    yield MemSize(sum(b.used_length for b in blocks), blocks)
    yield EndOfSection()
    yield SectionFooter(sid)
    count = 0
    sent = {b["name"] for b in manifest["blocks"] if b["pages_received"]}
    for block in blocks:
        if block.name not in sent:  # e.g. shared memory under x-ignore-shared: not ours to write
            continue
        for offset, page in pages(block):
            if count % PAGES_PER_SECTION == 0:
                if count:
                    yield EndOfSection()
                    yield SectionFooter(sid)
                yield SectionPart(sid)
            count += 1
            yield (
                ZeroPage(block.name, offset)
                if page == zero
                else NormalPage(block.name, offset, page)
            )
    if count:
        yield EndOfSection()
        yield SectionFooter(sid)
    for command in manifest.get("commands", []):
        yield Command(command["command"], bytes.fromhex(command["data"]))
    yield SectionEnd(sid)
    yield EndOfSection()
    yield SectionFooter(sid)
    for chunk in device_state:
        yield OpaqueData(chunk)


def checked_count(value: Any, limit: int) -> int:
    """An int from 0 to `limit` (not a bool, a float or a string), or ValueError."""
    if type(value) is not int or not 0 <= value <= limit:
        raise ValueError(f"{quoted(value)} is not a count from 0 to {limit}")
    return value


def _name(value: Any, limit: int = 255) -> str:
    """A name the stream writer can write: at most `limit` Latin-1 bytes."""
    if type(value) is not str or len(value.encode("latin-1")) > limit:
        raise ValueError(f"{quoted(value)} is not a name of at most {limit} bytes")
    return value


def checked_blocks(skeleton: Any, page_size: int, limits: Limits) -> list[RamBlock]:
    """The RAM blocks of a skeleton's manifest, once every field that compact_stream and the
    stream writer use has its type and range: a crafted manifest (a saved file's index, an
    extracted directory's manifest.json) fails here with ValueError, not halfway through the
    stream (a page size of 2^36, a block name the writer cannot write)."""
    size = skeleton["page_size"] if type(skeleton) is dict else None
    if type(size) is not int or size != page_size:
        raise ValueError(f"a skeleton whose page size is not {page_size}")
    if not is_page_size(size):
        raise ValueError(f"a page size of {size}")
    checked_count(skeleton["version"], 0xFFFFFFFF)
    _name(skeleton["machine"], MAX_MACHINE_NAME)
    for subsection in _listed(skeleton["subsections"], limits.items):
        _name(subsection["name"])
        checked_count(subsection["version"], 0xFFFFFFFF)
        bytes.fromhex(subsection["payload"])
    for key in ("section_id", "instance_id", "version_id"):
        checked_count(skeleton["ram_section"][key], 0xFFFFFFFF)
    for command in _listed(skeleton.get("commands", []), limits.items):
        checked_count(command["command"], 0xFFFF)
        checked_count(len(bytes.fromhex(command["data"])), 0xFFFF)
    blocks = []
    for block in _listed(skeleton["blocks"], MAX_RAM_BLOCKS):
        checked_count(block["pages_received"], limits.pages)
        if block["addr"] is not None:
            checked_count(block["addr"], (1 << 64) - 1)
        used = checked_count(block["used_length"], (1 << 64) - 1)  # Layout counts the slots
        blocks.append(RamBlock(_name(block["name"]), used, None, block["addr"]))
    return blocks


def _listed(value: Any, limit: int) -> list:
    """A list of at most `limit` items."""
    if type(value) is not list or len(value) > limit:
        raise ValueError(f"a list of at most {limit} items expected, not {type(value).__name__}")
    return value
