"""A synthetic guest whose precopy migration stream looks like QEMU 7.2's, without QEMU.

The stream has QEMU's shape (header, configuration, a `ram` START with the block list, a bulk
pass sending every page, more passes re-sending the pages the guest dirtied, the final pass in
the END section, device-state sections, EOF and a VM description), and guest memory is a mix of
zero, text-like, structured and random pages in clustered runs, re-dirtied sparsely or wholly.
Everything is a function of the seed, so tests and benchmarks can regenerate the same bytes.
"""

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from migpipe.errors import MigpipeError
from migpipe.stream import format as fmt
from migpipe.stream.records import (
    Configuration,
    EndOfSection,
    Eof,
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
    VmDescription,
    ZeroPage,
)

PAGE = fmt.DEFAULT_PAGE_SIZE
ZERO_PAGE = bytes(PAGE)
RAM_SECTION_ID = 2
PAGE_KINDS = ("zero", "text", "structured", "random")
# Small blocks every pc machine has besides guest RAM (names as QEMU 7.2 spells them).
FIRMWARE_BLOCKS = (("pc.bios", 0x40000), ("pc.rom", 0x20000), ("/rom@etc/acpi/tables", 0x20000))
DEVICES = (
    ("timer", 2, 24),
    ("cpu_common", 1, 12),
    ("cpu", 12, 1800),
    ("apic", 3, 180),
    ("i8259", 1, 48),
    ("mc146818rtc", 3, 140),
    ("globalstate", 1, 40),
)


@dataclass(frozen=True)
class GuestModel:
    """What the synthetic guest looks like and how it dirties memory."""

    ram_size: int = 64 << 20
    mix: dict[str, float] = field(
        default_factory=lambda: {"zero": 0.60, "text": 0.125, "structured": 0.13, "random": 0.145}
    )
    iterations: int = 3
    dirty_share: float = 0.05  # share of guest RAM pages re-dirtied in each later pass
    rewrite_share: float = 0.2  # share of dirtied pages rewritten whole; the rest change sparsely
    max_runs: int = 8  # a sparse change is 1..max_runs runs of 4..64 bytes
    pages_per_section: int = 2048
    seed: int = 1
    machine: str = "pc-i440fx-7.2"

    def __post_init__(self) -> None:
        if self.ram_size <= 0 or self.ram_size % PAGE:
            raise MigpipeError(f"guest RAM size {self.ram_size} is not a positive page multiple")
        if set(self.mix) - set(PAGE_KINDS) or not sum(self.mix.values()) > 0:
            given = ",".join(f"{kind}={weight:g}" for kind, weight in self.mix.items())
            raise MigpipeError(f"page mix {given} must weigh {', '.join(PAGE_KINDS)}")
        if self.iterations < 1:
            raise MigpipeError("a migration has at least one pass")
        if not (0 <= self.dirty_share <= 1 and 0 <= self.rewrite_share <= 1):
            raise MigpipeError("dirty and rewrite shares are fractions between 0 and 1")


class SyntheticGuest:
    """Generates the stream record by record; `images` holds memory as the stream leaves it."""

    def __init__(self, model: GuestModel) -> None:
        self.model = model
        self._rng = random.Random(model.seed)
        self._text = self._text_pool()
        self._structured = self._structured_pool()
        self.blocks = (("pc.ram", model.ram_size), *FIRMWARE_BLOCKS)
        self.images: dict[str, bytearray] = {}

    def records(self) -> Iterator[Record]:
        model = self.model
        yield FileHeader(fmt.VERSION)
        yield Configuration(model.machine)
        yield SectionStart(RAM_SECTION_ID, fmt.RAM_IDSTR, 0, fmt.RAM_SECTION_VERSION)
        ram_blocks = tuple(RamBlock(name, size) for name, size in self.blocks)
        yield MemSize(sum(size for _, size in self.blocks), ram_blocks)
        yield EndOfSection()
        yield SectionFooter(RAM_SECTION_ID)
        yield from self._sections(self._bulk_pass(), final=False)
        for number in range(1, model.iterations):
            yield from self._sections(self._dirty_pass(), final=number == model.iterations - 1)
        if model.iterations == 1:  # a paused guest: everything went in the bulk pass
            yield from self._sections(iter(()), final=True)
        yield from self._device_state()

    # -- memory content ---------------------------------------------------------------------------

    def _text_pool(self) -> bytes:
        rng = self._rng
        words = (
            "kernel",
            "eth0",
            "link",
            "up",
            "systemd",
            "started",
            "session",
            "user",
            "GET",
            "/api/v1/items",
            "200",
            "OK",
            "error",
            "retry",
            "timeout",
            "cache",
            "hit",
            "miss",
            "commit",
            "lock",
            "page",
            "fault",
            "ms",
            "bytes",
            "queue",
        )
        lines = []
        for i in range(6000):
            stamp = f"2026-11-21T{i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}.{i % 1000:03d}"
            body = " ".join(rng.choice(words) for _ in range(rng.randrange(4, 14)))
            lines.append(f"{stamp} host{rng.randrange(8)} {body} id={rng.randrange(1 << 20)}\n")
        text = "".join(lines).encode()
        return text + text[: 2 * PAGE]  # wrap, so any offset yields a whole page

    def _structured_pool(self) -> bytes:
        rng = self._rng
        parts = []
        for _ in range(64):
            base = 0xFFFF888000000000 + rng.randrange(1 << 30) * 64
            parts.append(b"".join((base + 64 * i).to_bytes(8, "little") for i in range(512)))
            counter = rng.randrange(1 << 20)
            parts.append(b"".join((counter + i).to_bytes(4, "little") for i in range(1024)))
            parts.append((rng.randbytes(16) + bytes(48)) * 64)
        pool = b"".join(parts)
        return pool + pool[: 2 * PAGE]

    def _page(self, kind: str) -> bytes:
        rng = self._rng
        if kind == "zero":
            return ZERO_PAGE
        if kind == "random":
            return rng.randbytes(PAGE)
        pool = self._text if kind == "text" else self._structured
        start = rng.randrange(0, len(pool) - 2 * PAGE, 8)
        return pool[start : start + PAGE]

    def _kinds(self, pages: int) -> Iterator[str]:
        """Page kinds in clustered runs (geometric lengths, mean 16 pages)."""
        kinds, weights = list(self.model.mix), list(self.model.mix.values())
        rng = self._rng
        left = 0
        kind = kinds[0]
        for _ in range(pages):
            if not left:
                kind = rng.choices(kinds, weights)[0]
                left = min(int(rng.expovariate(1 / 16)) + 1, 1024)
            left -= 1
            yield kind

    # -- passes -----------------------------------------------------------------------------------

    def _bulk_pass(self) -> Iterator[tuple[str, int, bytes]]:
        for name, size in self.blocks:
            image = self.images[name] = bytearray(size)
            for index, kind in enumerate(self._kinds(size // PAGE)):
                page = self._page(kind)
                image[index * PAGE : (index + 1) * PAGE] = page
                yield name, index * PAGE, page

    def _dirty_pass(self) -> Iterator[tuple[str, int, bytes]]:
        model, rng = self.model, self._rng
        image = self.images["pc.ram"]
        pages = model.ram_size // PAGE
        dirty = sorted(rng.sample(range(pages), int(pages * model.dirty_share)))
        for index in dirty:
            offset = index * PAGE
            if rng.random() < model.rewrite_share:
                page = self._page(rng.choice(PAGE_KINDS[1:]))
            else:
                page = bytearray(image[offset : offset + PAGE])
                for _ in range(rng.randrange(1, model.max_runs + 1)):
                    length = rng.randrange(4, 65)
                    start = rng.randrange(PAGE - length)
                    page[start : start + length] = rng.randbytes(length)
                page = bytes(page)
            image[offset : offset + PAGE] = page
            yield "pc.ram", offset, page

    def _sections(self, pages: Iterator[tuple[str, int, bytes]], final: bool) -> Iterator[Record]:
        """One pass as RAM sections: PARTs, or (for the stop-and-copy pass) the END section."""
        per_section = None if final else self.model.pages_per_section
        opener = SectionEnd if final else SectionPart
        count = 0
        for name, offset, page in pages:
            if count == 0 or (per_section and count % per_section == 0):
                if count:
                    yield EndOfSection()
                    yield SectionFooter(RAM_SECTION_ID)
                yield opener(RAM_SECTION_ID)
            count += 1
            if page == ZERO_PAGE:
                yield ZeroPage(name, offset)
            else:
                yield NormalPage(name, offset, page)
        if final and not count:
            yield SectionEnd(RAM_SECTION_ID)
        if count or final:
            yield EndOfSection()
            yield SectionFooter(RAM_SECTION_ID)

    def _device_state(self) -> Iterator[Record]:
        described = []
        for number, (idstr, version, size) in enumerate(DEVICES):
            section_id = RAM_SECTION_ID + 1 + number
            footer = bytes([fmt.ITEM_SECTION_FOOTER]) + fmt.BE32.pack(section_id)
            body = self._rng.randbytes(size)
            while footer in body:  # keep the footer unique, as it is in QEMU's own state
                body = self._rng.randbytes(size)
            yield SectionFull(section_id, idstr, 0, version)
            yield OpaqueData(body)
            yield SectionFooter(section_id)
            described.append(
                {
                    "name": idstr,
                    "instance_id": 0,
                    "vmsd_name": idstr,
                    "version": version,
                    "fields": [{"name": "state", "type": "buffer", "size": size}],
                }
            )
        yield Eof()
        yield VmDescription(json.dumps({"page_size": PAGE, "devices": described}).encode())
