"""libvirt's QEMU save image: images built here from the documented layout (struct by hand,
bodies compressed by the real gzip, bzip2, xz, lzop and zstd programs) read back to the exact
QEMU stream; damaged ones are refused with the offset; images migpipe writes decode with the
real programs, with every header field where libvirt puts it; sparse ones (QEMU's mapped-ram
file after the header) hold each page once, in its place. Real libvirts: test_libvirt.py."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
from support import migpipe

from migpipe.errors import (
    EXIT_CORRUPT,
    EXIT_INCOMPATIBLE,
    EXIT_PEER_GONE,
    EXIT_TRUNCATED,
    EXIT_USAGE,
    MigpipeError,
)
from migpipe.io.channel import FdChannel
from migpipe.save.libvirtimage import (
    PARTIAL_MAGIC,
    SAVE_MAGIC,
    LibvirtImageReader,
    LibvirtImageWriter,
    encode_prefix,
    mark_complete,
)

CODES = {"raw": 0, "gzip": 1, "bzip2": 2, "xz": 3, "lzop": 4, "zstd": 5}
COMPRESSED = [name for name in CODES if name != "raw"]
COMPRESS = {
    "gzip": ["gzip", "-c"],
    "bzip2": ["bzip2", "-c"],
    "xz": ["xz", "-c", "-3"],
    "lzop": ["lzop", "-c"],
    "zstd": ["zstd", "-c", "-q"],
}
XML = "<domain type='kvm'><name>vm-ü</name><memory unit='KiB'>8192</memory></domain>"
COOKIE = "<qemucookie><cpu mode='custom'/></qemucookie>"
PAD = 65536
ORDER = "<" if sys.byteorder == "little" else ">"
FOREIGN = ">" if ORDER == "<" else "<"


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A QEMU stream as `migpipe generate` writes it (about 5 MiB for an 8 MiB guest)."""
    path = tmp_path_factory.mktemp("stream") / "vm.stream"
    command = [sys.executable, "-m", "migpipe", "generate", "--synthetic", "--size", "8M"]
    subprocess.run([*command, "-o", str(path)], check=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def bodies(stream: bytes) -> dict[str, bytes]:
    """The stream compressed by each real program, as libvirt's `PROG -c` would."""
    found = {"raw": stream}
    for name, argv in COMPRESS.items():
        found[name] = subprocess.run(argv, input=stream, capture_output=True, check=True).stdout
    return found


def header(
    code: int,
    data_len: int,
    *,
    cookie_offset: int = 0,
    order: str = ORDER,
    magic: bytes = SAVE_MAGIC,
    version: int = 2,
    running: int = 1,
    unused: tuple = (0,) * 14,
) -> bytes:
    return magic + struct.pack(
        f"{order}5I14I", version, data_len, running, code, cookie_offset, *unused
    )


def image(body: bytes, image_format: str, *, cookie: str | None = None, **fields) -> bytes:
    """An image laid out as libvirt does: header, XML NUL, [cookie NUL], 64 KiB zeros, body."""
    text = XML.encode() + b"\0"
    cookie_offset = len(text) if cookie else 0
    if cookie:
        text += cookie.encode() + b"\0"
    fields.setdefault("cookie_offset", cookie_offset)
    return header(CODES[image_format], len(text) + PAD, **fields) + text + bytes(PAD) + body


def read_all(path: Path) -> tuple[LibvirtImageReader, bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = LibvirtImageReader(FdChannel(fd))
        parts = []
        while chunk := reader.read():
            assert len(chunk) <= 1 << 20
            parts.append(chunk)
        return reader, b"".join(parts)
    finally:
        os.close(fd)


def refusal(path: Path) -> MigpipeError:
    with pytest.raises(MigpipeError) as caught:
        read_all(path)
    return caught.value


# -- reading images built from the documented layout --------------------------------------------


@pytest.mark.parametrize("image_format", CODES)
def test_reads_each_format_to_the_exact_stream(
    tmp_path: Path, stream: bytes, bodies: dict[str, bytes], image_format: str
) -> None:
    path = tmp_path / "vm.save"
    path.write_bytes(image(bodies[image_format], image_format, cookie=COOKIE))
    reader, out = read_all(path)
    assert out == stream
    saved = reader.image
    assert (saved.xml, saved.cookie, saved.image_format) == (XML, COOKIE, image_format)
    assert saved.was_running and saved.byteorder == sys.byteorder
    expected_len = len(XML.encode()) + 1 + len(COOKIE) + 1 + PAD
    assert (saved.data_len, saved.stream_offset) == (expected_len, 92 + expected_len)


def test_foreign_byte_order_is_detected(tmp_path: Path, stream: bytes) -> None:
    path = tmp_path / "vm.save"
    path.write_bytes(image(stream, "raw", order=FOREIGN, running=0))
    reader, out = read_all(path)
    assert out == stream
    assert reader.image.byteorder != sys.byteorder
    assert not reader.image.was_running and reader.image.cookie is None


def test_header_and_xml_split_across_many_small_reads(bodies: dict[str, bytes]) -> None:
    data = image(bodies["zstd"], "zstd", cookie=COOKIE)

    class Dribble:  # a Channel that hands over 4093 bytes at a time
        def __init__(self) -> None:
            self.at = 0

        def read(self) -> bytes:
            self.at += 4093
            return data[self.at - 4093 : self.at]

    reader = LibvirtImageReader(Dribble())
    out = b"".join(iter(reader.read, b""))
    assert reader.image.xml == XML and out == bodies["raw"]


@pytest.mark.parametrize("image_format", COMPRESSED)
def test_concatenated_members_and_zero_padding(
    tmp_path: Path, stream: bytes, image_format: str
) -> None:
    """pigz/pbzip2-style multi-member bodies, then the zeros iohelper leaves on block devices."""
    half = len(stream) // 2
    argv = COMPRESS[image_format]
    parts = [
        subprocess.run(argv, input=p, capture_output=True, check=True).stdout
        for p in (stream[:half], stream[half:])
    ]
    path = tmp_path / "vm.save"
    path.write_bytes(image(b"".join(parts) + bytes(4096), image_format))
    assert read_all(path)[1] == stream


@pytest.mark.parametrize("image_format", ["gzip", "zstd"])
def test_highly_compressible_body_comes_out_in_bounded_reads(
    tmp_path: Path, image_format: str
) -> None:
    """64 MiB of zeros in a few KiB: every read() is still at most 1 MiB (read_all checks)."""
    zeros = bytes(64 << 20)
    body = subprocess.run(
        COMPRESS[image_format], input=zeros, capture_output=True, check=True
    ).stdout
    assert len(body) < 100 << 10
    path = tmp_path / "vm.save"
    path.write_bytes(image(body, image_format))
    assert read_all(path)[1] == zeros


# -- refusing damaged images --------------------------------------------------------------------

TEXT_LEN = len(XML.encode()) + 1 + PAD


@pytest.mark.parametrize(
    ("fields", "message", "offset", "status"),
    [
        (
            {"magic": PARTIAL_MAGIC},
            "save image is incomplete (libvirt marks it partial)",
            0,
            EXIT_TRUNCATED,
        ),
        ({"magic": b"LibvirtQemudXXXX"}, "bad magic", 0, EXIT_CORRUPT),
        ({"version": 3}, "version 3 is not supported", 16, EXIT_INCOMPATIBLE),
        ({"code": 7}, "unknown save image format code 7", 28, EXIT_INCOMPATIBLE),
        ({"data_len": 0}, "no domain XML", 20, EXIT_CORRUPT),
        ({"data_len": 100 << 20}, "data_len 104857600 is over 64 MiB", 20, EXIT_CORRUPT),
        (
            {"cookie_offset": TEXT_LEN + 1},
            f"cookie offset {TEXT_LEN + 1} is beyond data_len",
            32,
            EXIT_CORRUPT,
        ),
        ({"unused": (0,) * 13 + (1,)}, "unused header words are not zero", 88, EXIT_INCOMPATIBLE),
    ],
)
def test_bad_headers_are_refused(
    tmp_path: Path, fields: dict, message: str, offset: int, status: int
) -> None:
    code = fields.pop("code", 0)
    data_len = fields.pop("data_len", TEXT_LEN)
    path = tmp_path / "vm.save"
    path.write_bytes(header(code, data_len, **fields) + XML.encode() + bytes(PAD + 1) + b"QEVM")
    error = refusal(path)
    assert message in error.message
    assert (error.offset, error.status) == (offset, status)


def test_image_ending_inside_header_or_xml(tmp_path: Path, stream: bytes) -> None:
    full = image(stream, "raw")
    path = tmp_path / "vm.save"
    path.write_bytes(full[:50])
    error = refusal(path)
    assert "ends inside its 92-byte header" in error.message
    assert (error.offset, error.status) == (50, EXIT_TRUNCATED)
    path.write_bytes(full[: 92 + 1000])  # data_len says 64 KiB more than the file has
    error = refusal(path)
    assert "ends inside its domain XML" in error.message
    assert (error.offset, error.status) == (1092, EXIT_TRUNCATED)


def test_xml_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "vm.save"
    path.write_bytes(header(0, 14) + b"<domain>\xff</x>\0" + b"QEVM")
    error = refusal(path)
    assert "domain XML is not UTF-8" in error.message
    assert (error.offset, error.status) == (92 + 8, EXIT_CORRUPT)


@pytest.mark.parametrize("image_format", COMPRESSED)
def test_truncated_body_is_refused_at_its_end(
    tmp_path: Path, bodies: dict[str, bytes], image_format: str
) -> None:
    path = tmp_path / "vm.save"
    data = image(bodies[image_format], image_format)
    cut = len(data) - len(bodies[image_format]) // 2
    path.write_bytes(data[:cut])
    error = refusal(path)
    assert error.message == f"{image_format} body truncated"
    assert (error.offset, error.status) == (cut, EXIT_TRUNCATED)


@pytest.mark.parametrize("image_format", COMPRESSED)
def test_missing_body_is_refused(tmp_path: Path, image_format: str) -> None:
    path = tmp_path / "vm.save"
    data = image(b"", image_format)
    path.write_bytes(data)
    error = refusal(path)
    assert error.message.startswith(f"{image_format} body")
    assert (error.offset, error.status) == (len(data), EXIT_TRUNCATED)


@pytest.mark.parametrize("image_format", COMPRESSED)
def test_corrupt_body_is_refused(
    tmp_path: Path, bodies: dict[str, bytes], image_format: str
) -> None:
    body = bytearray(bodies[image_format])
    middle = len(body) // 2
    body[middle : middle + 8] = bytes(b ^ 0x55 for b in body[middle : middle + 8])
    path = tmp_path / "vm.save"
    data = image(bytes(body), image_format)
    path.write_bytes(data)
    error = refusal(path)
    assert error.message.startswith(f"{image_format} body is corrupt (")
    assert error.status == EXIT_CORRUPT
    if image_format != "lzop":  # the lzop program tells no offset
        assert len(data) - len(body) + middle <= error.offset <= len(data)


@pytest.mark.parametrize("image_format", ["gzip", "bzip2", "xz", "zstd"])
def test_bytes_after_the_body_are_refused(
    tmp_path: Path, bodies: dict[str, bytes], image_format: str
) -> None:
    path = tmp_path / "vm.save"
    data = image(bodies[image_format] + bytes(10), image_format) + b"junk"
    path.write_bytes(data)
    error = refusal(path)
    assert error.message == f"unexpected bytes after the {image_format} body"
    assert (error.offset, error.status) == (len(data) - 4, EXIT_CORRUPT)


def child_commands() -> list[str]:
    """The command names of this process's living children (zombies count as living)."""
    names = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, _, rest = stat.rpartition(")")
            if int(rest.split()[1]) == os.getpid():
                names.append(name.split("(", 1)[1])
    return names


def test_closing_early_ends_the_lzop_program(tmp_path: Path, bodies: dict[str, bytes]) -> None:
    path = tmp_path / "vm.save"
    path.write_bytes(image(bodies["lzop"], "lzop"))
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = LibvirtImageReader(FdChannel(fd))
        first = reader.read()
        assert first and bodies["raw"].startswith(first)
        assert "lzop" in child_commands()
        reader.close()
        assert "lzop" not in child_commands()
    finally:
        os.close(fd)


# -- writing ------------------------------------------------------------------------------------


def cli_body(path: Path, offset: int, image_format: str) -> bytes:
    """The body as libvirt's restore sees it: `dd skip=OFFSET | PROG -dc`."""
    dd = subprocess.Popen(
        ["dd", f"if={path}", "bs=1M", "iflag=skip_bytes", f"skip={offset}", "status=none"],
        stdout=subprocess.PIPE,
    )
    assert dd.stdout is not None
    if image_format == "raw":
        out = dd.stdout.read()
    else:
        argv = [image_format, "-dc"] + (["--ignore-warn"] if image_format == "lzop" else [])
        out = subprocess.run(argv, stdin=dd.stdout, capture_output=True, check=True).stdout
    dd.stdout.close()
    assert dd.wait() == 0
    return out


@pytest.mark.parametrize("image_format", CODES)
def test_written_images_decode_with_the_real_programs(
    tmp_path: Path, stream: bytes, image_format: str
) -> None:
    path = tmp_path / "vm.save"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = LibvirtImageWriter(
            FdChannel(fd), XML, was_running=True, image_format=image_format, cookie=COOKIE
        )
        view = memoryview(stream)
        for at in range(0, len(stream), 1 << 20):
            writer.write([view[at : at + (1 << 19)], view[at + (1 << 19) : at + (1 << 20)]])
        writer.finish()
        assert os.pread(fd, 16, 0) == PARTIAL_MAGIC
        mark_complete(fd)
    finally:
        os.close(fd)
    data = path.read_bytes()
    magic, version, data_len, running, code, cookie_offset, *unused = struct.unpack_from(
        f"{ORDER}16s5I14I", data
    )
    xml = XML.encode() + b"\0"
    assert (magic, version, running, code) == (SAVE_MAGIC, 2, 1, CODES[image_format])
    assert (cookie_offset, data_len) == (len(xml), len(xml) + len(COOKIE) + 1 + PAD)
    assert unused == [0] * 14
    assert data[92 : 92 + data_len] == xml + COOKIE.encode() + b"\0" + bytes(PAD)
    assert cli_body(path, 92 + data_len, image_format) == stream
    assert read_all(path)[1] == stream


def test_writer_options(tmp_path: Path, stream: bytes) -> None:
    """A complete magic from the start (for pipes), no cookie, a level, a paused guest."""
    read, write = os.pipe()
    writer = LibvirtImageWriter(
        FdChannel(write), XML, was_running=False, image_format="gzip", level=1, partial=False
    )
    path = tmp_path / "vm.save"
    with open(path, "wb") as f:
        reader = subprocess.Popen(["cat"], stdin=read, stdout=f)
        os.close(read)
        writer.write([stream])
        writer.finish()
        os.close(write)
        assert reader.wait() == 0
    data = path.read_bytes()
    assert data[:16] == SAVE_MAGIC
    _, data_len, running, code, cookie_offset = struct.unpack_from(f"{ORDER}5I", data, 16)
    assert (running, code, cookie_offset, data_len) == (0, 1, 0, len(XML.encode()) + 1 + PAD)
    assert data[92 + data_len + 8] == 4  # gzip's XFL byte: zlib marks the fastest level
    got, out = read_all(path)
    assert out == stream and got.image.cookie is None and not got.image.was_running


def test_lzop_writer_reports_a_vanished_sink(stream: bytes) -> None:
    """The sink's reader goes away after the header: the thread carrying lzop's output fails,
    lzop is killed, and the writer says why instead of waiting forever."""
    read, write = os.pipe()
    head = subprocess.Popen(["head", "-c", "100000"], stdin=read, stdout=subprocess.DEVNULL)
    os.close(read)
    writer = LibvirtImageWriter(FdChannel(write), XML, was_running=True, image_format="lzop")
    try:
        with pytest.raises(MigpipeError) as caught:
            for _ in range(20):
                writer.write([stream])
            writer.finish()
        assert caught.value.status == EXIT_PEER_GONE
        assert "lzop" not in child_commands()
    finally:
        os.close(write)
        head.wait()


def test_prefix_refuses_what_libvirt_could_not_read() -> None:
    with pytest.raises(MigpipeError) as caught:
        encode_prefix("<domain>\0</domain>", was_running=True)
    assert caught.value.status == EXIT_USAGE
    with pytest.raises(MigpipeError) as caught:
        encode_prefix(XML, was_running=True, image_format="lz4")
    assert caught.value.status == EXIT_USAGE


# -- sparse: QEMU's mapped-ram file after the header --------------------------------------------


def write_sparse(path: Path, stream: bytes) -> None:
    """A complete sparse image of `stream`, written in 64 KiB pieces."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = LibvirtImageWriter(fd, XML, was_running=True, image_format="sparse")
        for at in range(0, len(stream), 1 << 16):
            writer.write([stream[at : at + (1 << 16)]])
        writer.finish()
        mark_complete(fd)
    finally:
        os.close(fd)


def read_sparse(path: Path) -> tuple[LibvirtImageReader, bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = LibvirtImageReader(FdChannel(fd), fd, path.name)
        try:
            return reader, b"".join(iter(reader.read, b""))
        finally:
            reader.close()
    finally:
        os.close(fd)


def test_sparse_images_round_trip_with_each_page_in_its_place(
    tmp_path: Path, stream: bytes
) -> None:
    path = tmp_path / "vm.save"
    write_sparse(path, stream)
    data = path.read_bytes()
    _, version, data_len, running, code = struct.unpack_from(f"{ORDER}16s4I", data)
    assert (data[:16], version, running, code) == (SAVE_MAGIC, 2, 1, 6)
    start = 92 + data_len
    assert data[start : start + 4] == b"QEVM"  # QEMU's file, at no particular alignment
    assert b"mapped-ram" in data[start : start + 200]  # its configuration lists the capability

    reader, out = read_sparse(path)
    assert reader.image.image_format == "sparse" and reader.image.xml == XML
    expected = oracle.replay(stream)
    assert expected.pages_resent > 0  # the synthetic stream sends pages again: stored once
    replayed = oracle.replay(out)
    assert replayed.image == expected.image and replayed.pages_resent == 0
    assert reader.mapped_ram is not None
    ram = reader.mapped_ram.blocks[0]
    assert ram["name"] == "pc.ram" and ram["pages_offset"] % (1 << 20) == 0
    page = next(k for k in range(ram["pages"]) if any(expected.image[k * 4096 : k * 4096 + 4096]))
    placed = ram["pages_offset"] + (page + (1 << 20) // 4096) * 4096  # image starts at 1 MiB
    assert data[placed : placed + 4096] == expected.image[page * 4096 : (page + 1) * 4096]

    again = tmp_path / "again.save"
    write_sparse(again, out)  # what it reads back is placed the same way
    assert again.read_bytes() == data


def test_sparse_needs_a_file(tmp_path: Path, stream: bytes) -> None:
    path = tmp_path / "vm.save"
    write_sparse(path, stream)
    error = refusal(path)  # read_all gives the reader no descriptor, as a pipe gives none
    assert "cannot be read from a pipe" in error.message and error.status == EXIT_USAGE
    read, write = os.pipe()
    try:
        with pytest.raises(MigpipeError) as caught:
            LibvirtImageWriter(write, XML, was_running=True, image_format="sparse")
        assert "needs a file" in caught.value.message and caught.value.status == EXIT_USAGE
    finally:
        os.close(read)
        os.close(write)
    direct = os.open(tmp_path / "direct.save", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        with pytest.raises(MigpipeError) as caught:
            LibvirtImageWriter(direct, XML, was_running=True, image_format="sparse")
        assert caught.value.message.startswith("--direct") and caught.value.status == EXIT_USAGE
    finally:
        os.close(direct)


def test_unfinished_sparse_image_is_refused(tmp_path: Path, stream: bytes) -> None:
    """Every page placed and the bitmaps written, but the magic never made complete."""
    path = tmp_path / "vm.save"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = LibvirtImageWriter(fd, XML, was_running=True, image_format="sparse")
        writer.write([stream])
        writer.finish()
    finally:
        os.close(fd)
    with pytest.raises(MigpipeError) as caught:
        read_sparse(path)
    assert "incomplete" in caught.value.message
    assert (caught.value.offset, caught.value.status) == (0, EXIT_TRUNCATED)


def test_truncated_sparse_image_names_the_offset(tmp_path: Path, stream: bytes) -> None:
    path = tmp_path / "vm.save"
    write_sparse(path, stream)
    reader, _ = read_sparse(path)
    assert reader.mapped_ram is not None
    last = reader.mapped_ram.blocks[-1]
    os.truncate(path, last["pages_offset"] + 4096)  # the last block's pages cut short
    with pytest.raises(MigpipeError) as caught:
        read_sparse(path)
    assert caught.value.status == EXIT_TRUNCATED
    assert caught.value.offset == last["pages_offset"]
    assert "vm.save" in caught.value.message


def test_sparse_with_direct_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    xml = tmp_path / "dom.xml"
    xml.write_text(XML)
    image = tmp_path / "vm.save"
    args = ["--libvirt-xml", str(xml), "--image-format", "sparse", "--direct"]
    result = migpipe("save", str(image), *args)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.decode().count("\n") == 1 and b"--direct" in result.stderr
    assert list(tmp_path.iterdir()) == [xml]
