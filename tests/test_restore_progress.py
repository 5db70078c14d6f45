"""restore's progress and --stats-json count what restore reads of each kind of file.

A file read in order (either layout's stream, a libvirt image, a bare QEMU stream) is read
whole; a mapped-ram file, alone or in a sparse libvirt image after the header, is read by
offset, and only its data: its stream, its bitmaps and the pages present, never the holes of
the pages absent nor the padding before a page area. The expected total is that, known from
the stream's first byte out; the bytes read never pass it and end equal to it, so the share
shown ends at exactly 100%.
"""

import json
import os
import re
import struct
from pathlib import Path

import pytest
import trio
from support import migpipe, synthetic_stream

from migpipe.save.savefile import restore
from migpipe.stream import format as fmt
from migpipe.stream.mappedram import Header, MappedRamWriter, hole_size, present_pages
from migpipe.stream.parser import StreamParser, parse_bytes
from migpipe.stream.records import Eof, MemSize
from migpipe.tunnel.progress import Progress

PAGE = fmt.DEFAULT_PAGE_SIZE
STREAM = synthetic_stream(16 << 20, iterations=3)  # 60% zero pages: holes in a mapped-ram file
XML = "<domain type='kvm'><name>vm</name><memory unit='KiB'>16384</memory></domain>"
WHOLE = ["stream", "qemu", "libvirt-raw", "libvirt-gzip"]  # read in order, every byte
MAPPED = ["mapped-ram", "libvirt-sparse"]  # read by offset, holes left out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """STREAM saved as every kind of file restore reads."""
    where = tmp_path_factory.mktemp("saved")
    (where / "dom.xml").write_text(XML)
    made = {"qemu": where / "vm.qemu"}
    made["qemu"].write_bytes(STREAM)
    saves = {
        "stream": [],
        "fixed": ["--layout", "fixed"],
        "libvirt-raw": ["--libvirt-xml", str(where / "dom.xml")],
        "libvirt-gzip": ["--libvirt-xml", str(where / "dom.xml"), "--image-format", "gzip"],
        "libvirt-sparse": ["--libvirt-xml", str(where / "dom.xml"), "--image-format", "sparse"],
    }
    for kind, options in saves.items():
        made[kind] = where / f"vm.{kind}"
        done = migpipe("save", str(made[kind]), *options, stdin=STREAM)
        assert done.returncode == 0, done.stderr
    made["mapped-ram"] = where / "vm.mapped"
    fd = os.open(made["mapped-ram"], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = MappedRamWriter(fd)
        writer.write([STREAM])
        writer.finish()
    finally:
        os.close(fd)
    return made


def data_size(path: Path) -> int:
    """The bytes of a mapped-ram file (or sparse image) that hold data, worked out from the
    file as its layout says, bit by bit: its size less, in each block's area, the padding
    after the bitmap and the pages whose bit is clear."""
    data = path.read_bytes()
    origin = 0
    if data.startswith(b"LibvirtQemudSave"):
        (data_len,) = struct.unpack_from("=I", data, 20)  # the host's order, as it wrote it
        origin = 92 + data_len
    parser = StreamParser(mapped_ram=True, origin=origin)
    parser.feed(data[origin:])
    parser.close()
    (blocks,) = [r.blocks for r in parser.next_records() if type(r) is MemSize]
    holes = 0
    for block in blocks:
        _, page_size, bitmap_offset, pages_offset = fmt.MAPPED_RAM_HEADER.unpack(block.mapped_ram)
        pages = block.used_length // page_size
        bitmap_end = bitmap_offset + (pages + 63) // 64 * 8
        bits = "".join(f"{byte:08b}"[::-1] for byte in data[bitmap_offset:bitmap_end])[:pages]
        holes += pages_offset - bitmap_end + bits.count("0") * page_size
    assert holes > 4 << 20  # the zero pages are holes: the file's size is not what is read
    return len(data) - holes


class Watched(Progress):
    """A progress that keeps the live totals it is given (as the service's JobProgress)."""

    def __init__(self) -> None:
        super().__init__("restore", stream=open(os.devnull, "w"))  # noqa: SIM115
        self.totals = None

    async def run(self, totals) -> None:
        self.totals = totals
        await trio.sleep_forever()

    def finish(self, totals) -> None:
        self.totals = totals


class Taking:
    """The destination: keeps the stream and, at each write, what progress would show."""

    def __init__(self, shown: Watched) -> None:
        self.shown, self.stream, self.seen = shown, bytearray(), []

    def write(self, parts) -> None:
        totals = self.shown.totals
        self.seen.append((totals.wire_bytes, self.shown.wire_expected(totals)))
        for part in parts:
            self.stream += part


def restored(path: Path) -> tuple[Watched, Taking]:
    shown = Watched()
    taking = Taking(shown)
    trio.run(restore, path, taking, None, shown)
    return shown, taking


@pytest.mark.parametrize("kind", [*WHOLE, *MAPPED, "fixed"])
def test_the_expected_total_is_what_restore_reads(files: dict[str, Path], kind: str) -> None:
    shown, taking = restored(files[kind])
    totals = shown.totals
    expected = shown.wire_expected(totals)
    if kind in MAPPED:
        assert expected == data_size(files[kind])
    elif kind in WHOLE:
        assert expected == files[kind].stat().st_size
    else:  # fixed: its header, index and what its slots and chunks hold
        assert expected is not None and expected <= files[kind].stat().st_size
    assert totals.wire_bytes == expected
    assert len(taking.seen) > 3  # written a piece at a time, each seen
    for done, then in taking.seen:  # from the first byte out: the same total, never passed
        assert then == expected and done <= expected
    assert totals.qemu_bytes == len(taking.stream) and Eof() in parse_bytes(taking.stream)
    shown.sample(totals)
    shares = re.findall(r"(\d+)%", shown.line(totals, None))
    assert shares == ["100"]


@pytest.mark.parametrize("kind", MAPPED)
def test_json_progress_and_stats_count_the_data_not_the_holes(
    files: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    stats = tmp_path / "stats.json"
    done = migpipe("restore", str(files[kind]), "--progress=json", "--stats-json", str(stats))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    read = data_size(files[kind])
    assert records[-1]["done"] is True
    assert records[-1]["wire_bytes"] == records[-1]["wire_expected"] == read
    for record in records:
        assert record["wire_expected"] in (None, read) and record["wire_bytes"] <= read
    figures = json.loads(stats.read_text())
    assert figures["wire_bytes"] == read < files[kind].stat().st_size
    assert figures["qemu_bytes"] == len(done.stdout)
    assert figures["ratio"] == round(len(done.stdout) / read, 4)


def test_present_pages_counts_only_the_pages_asked_about() -> None:
    assert present_pages(b"\xff\xff", 16) == 16
    assert present_pages(b"\xff\xff", 12) == 12  # the last byte's high bits are past the end
    assert present_pages(b"\x01\x80\x00", 16) == 2
    assert present_pages(b"\x01\x80", 15) == 1
    assert present_pages(b"", 0) == 0


def test_hole_size_is_the_padding_and_the_absent_pages() -> None:
    header = Header(1, PAGE, 1000, 1 << 20)  # bitmap at 1000, pages from 1 MiB
    used = 64 * PAGE  # a bitmap of one long: it ends at 1008
    assert hole_size([(header, used, 64)]) == (1 << 20) - 1008
    assert hole_size([(header, used, 10)]) == (1 << 20) - 1008 + 54 * PAGE
    assert hole_size([(header, used, 10), (header, used, 64)]) == 2 * ((1 << 20) - 1008) + 54 * PAGE
