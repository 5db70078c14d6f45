"""The extracted directory: a stream's final RAM images, its device state and a manifest.

`extract` replays a stream into one raw image per RAM block (mmap'd files, so memory stays flat
however large the guest) and keeps every byte after RAM's END section (the non-RAM device
sections, EOF, the VM description) verbatim. `rebuild` turns such a directory back into a
compact single-pass stream that a QEMU of the same machine type loads.
"""

import json
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from migpipe.errors import MigpipeError
from migpipe.ramimage import RamImages
from migpipe.stream import format as fmt
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
from migpipe.stream.writer import StreamWriter

MANIFEST = "manifest.json"
DEVICE_STATE = "device-state.bin"
FORMAT = "migpipe-extract/1"
PAGES_PER_SECTION = 4096


def image_file_name(block: str) -> str:
    """A flat file name for a block (QEMU names contain '/', e.g. 0000:00:02.0/vga.vram)."""
    return block.strip("/").replace("/", "__") + ".img"


class _FileImages:
    """Creates each block image as a sparse file of its size, mapped into memory."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.maps: dict[str, mmap.mmap] = {}

    def __call__(self, name: str, size: int) -> mmap.mmap:
        path = self._directory / image_file_name(name)
        with open(path, "w+b") as f:
            f.truncate(size)
            mapping = mmap.mmap(f.fileno(), size) if size else bytearray()
        self.maps[name] = mapping
        return mapping

    def close(self) -> None:
        for mapping in self.maps.values():
            if isinstance(mapping, mmap.mmap):
                mapping.flush()
                mapping.close()


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
                f"cannot place device state ({record.idstr!r}) sent before RAM ended "
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


def extract(
    records: Iterable[Record], directory: Path, page_size: int = fmt.DEFAULT_PAGE_SIZE
) -> dict:
    """Write the directory from a whole stream's records; returns the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    files = _FileImages(directory)
    ram = RamImages(files, page_size)
    writer = StreamWriter()
    skeleton = Skeleton(page_size)
    device_bytes = bytearray()
    device_state_bytes = 0
    try:
        with open(directory / DEVICE_STATE, "wb") as device_state:
            for record in records:
                if skeleton.add(record):
                    device_bytes.clear()
                    writer.write(device_bytes, record)
                    device_state.write(device_bytes)
                    device_state_bytes += len(device_bytes)
                else:
                    ram.apply(record)
    finally:
        files.close()
    manifest = skeleton.finish()
    manifest["device_state_bytes"] = device_state_bytes
    for block in manifest["blocks"]:
        block["file"] = image_file_name(block["name"])
        block["pages_received"] = ram.pages_received[block["name"]]
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


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


def load_manifest(directory: Path) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise MigpipeError(f"{directory}: not an extracted stream directory ({e})") from None
    if manifest.get("format") != FORMAT:
        raise MigpipeError(f"{directory / MANIFEST}: unknown format {manifest.get('format')!r}")
    return manifest


def rebuild(directory: Path) -> Iterator[Record]:
    """A single-pass stream holding exactly the directory's images and device state."""
    manifest = load_manifest(directory)
    page_size = manifest["page_size"]

    def pages(block: RamBlock) -> Iterator[tuple[int, bytes]]:
        with open(directory / image_file_name(block.name), "rb") as image:
            if os.fstat(image.fileno()).st_size != block.used_length:
                raise MigpipeError(f"{image.name}: size differs from the manifest")
            for offset in range(0, block.used_length, page_size):
                yield offset, image.read(page_size)

    def device_state() -> Iterator[bytes]:
        with open(directory / DEVICE_STATE, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    return compact_stream(manifest, pages, device_state())


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
