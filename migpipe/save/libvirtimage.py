"""libvirt's QEMU save image ("LibvirtQemudSave"): what `virsh save` writes, `virsh restore` reads.

Layout (libvirt's virQEMUSaveHeader, 92 bytes, every word in the writing host's byte order):
16-byte magic, then u32 version (2), data_len, was_running, format, cookieOffset and 14 unused
words; then data_len bytes holding the domain XML, a NUL, an optional cookie and its NUL, and
zeros (room for `virsh save-image-edit` to grow the XML in place); then the QEMU migration
stream, compressed whole by the program the format code names (libvirt runs `PROG -c` and
`PROG -dc`), so any standard container of that format is readable by libvirt. The sparse
format (6, libvirt 11.2+) instead holds QEMU's mapped-ram file from there on (`file:` at that
offset, every page in its place, absent ones as holes), so it is read and written by offset,
through migpipe.stream.mappedram: from a file, never a pipe.

libvirt writes the magic "LibvirtQemudPart" first and rewrites it to "LibvirtQemudSave" only
after the whole image is on disk; a reader refuses the first, so a crashed save never restores.

The header codec is plain code over bytes. The body codecs wrap I/O: LibvirtImageReader gives
the QEMU stream of an image it reads from an Input, LibvirtImageWriter writes one to a Sink
(both through the file's descriptor for sparse).
gzip, bzip2, xz and zstd run in-process (zlib, bz2, lzma and zstandard release the GIL); lzop
has no Python module, so it runs the `lzop` program, as libvirt does.
"""

import bz2
import fcntl
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard

from migpipe.errors import (
    CorruptError,
    IncompatibleError,
    MigpipeError,
    TruncatedError,
    UsageError,
    quoted,
)
from migpipe.io.channel import CHUNK, FdChannel, Sink
from migpipe.save import LIBVIRT_FORMATS
from migpipe.stream.mappedram import MappedRamReader, MappedRamWriter

SAVE_MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
FINAL_MAGIC_OFFSET = 0  # where SAVE_MAGIC replaces PARTIAL_MAGIC once the image is complete
VERSION = 2
HEADER_SIZE = 92
XML_PADDING = 64 << 10  # libvirt's room for the XML to grow
MAX_DATA_LEN = 64 << 20  # read whole into memory, as libvirt does; real images hold ~70 KiB

FORMAT_CODES = LIBVIRT_FORMATS  # on-disk codes, by position; libvirt never renumbers them
SPARSE = "sparse"
SPARSE_DIRECT = (
    "--direct: a sparse libvirt image is written page by page at each page's place, "
    "through the page cache"
)
# What libvirt's `PROG -c` gives (libvirt passes -3 to xz only); zstd also uses every core.
DEFAULT_LEVELS = {"gzip": 6, "bzip2": 9, "xz": 3, "lzop": 3, "zstd": 3}


class Input(Protocol):
    """What an image is read from: a Source's read() alone (FdChannel, DirectReader, or
    savefile.Reading). The reader never stops it; the stage that owns the Source does."""

    def read(self) -> bytes | bytearray:
        """As Source.read: some bytes, b"" at the end."""
        ...


_WORDS = struct.Struct("5I14I")  # the header after the magic, in one byte order or the other
_ORDERS = {"little": "<", "big": ">"}


@dataclass(frozen=True)
class SaveImage:
    """The header and XML of an image; the QEMU stream starts at `stream_offset`."""

    xml: str
    was_running: bool
    image_format: str
    cookie: str | None
    data_len: int  # bytes of XML, cookie and padding after the header
    byteorder: str  # the writing host's, "little" or "big"

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len


# -- the header codec (no I/O) ------------------------------------------------------------------


def parse_header(head: bytes) -> tuple[SaveImage, int]:
    """The first 92 bytes: an image without its XML yet, and the cookie offset within the data.

    Words are read in this host's order first; a version above 2 means the other order, the
    same guess libvirt makes (version 2 read the wrong way round is 0x02000000).
    """
    magic = head[:16]
    if magic == PARTIAL_MAGIC:
        raise TruncatedError("save image is incomplete (libvirt marks it partial)", 0)
    if len(head) < HEADER_SIZE and SAVE_MAGIC.startswith(magic):
        raise TruncatedError(f"save image ends inside its {HEADER_SIZE}-byte header", len(head))
    if magic != SAVE_MAGIC:
        raise CorruptError("not a libvirt QEMU save image (bad magic)", 0)
    byteorder = sys.byteorder
    words = struct.unpack_from(_ORDERS[byteorder] + _WORDS.format, head, 16)
    if words[0] > VERSION:
        byteorder = "big" if byteorder == "little" else "little"
        swapped = struct.unpack_from(_ORDERS[byteorder] + _WORDS.format, head, 16)
        if swapped[0] > VERSION:
            raise IncompatibleError(
                f"save image version {words[0]} is not supported (only {VERSION})", 16
            )
        words = swapped
    version, data_len, was_running, code, cookie_offset, *unused = words
    if version != VERSION:
        raise IncompatibleError(
            f"save image version {version} is not supported (only {VERSION})", 16
        )
    if code >= len(FORMAT_CODES):
        raise IncompatibleError(f"unknown save image format code {code}", 28)
    for index, word in enumerate(unused):
        if word:
            raise IncompatibleError(
                "unused header words are not zero (a newer or foreign image)", 36 + 4 * index
            )
    if not data_len:
        raise CorruptError("save image has no domain XML (data_len is 0)", 20)
    if data_len > MAX_DATA_LEN:
        raise CorruptError(f"save image data_len {data_len} is over {MAX_DATA_LEN >> 20} MiB", 20)
    if cookie_offset > data_len:
        raise CorruptError(f"cookie offset {cookie_offset} is beyond data_len {data_len}", 32)
    image = SaveImage("", bool(was_running), FORMAT_CODES[code], None, data_len, byteorder)
    return image, cookie_offset


def parse_data(image: SaveImage, cookie_offset: int, data: bytes) -> SaveImage:
    """The image with its XML and cookie, from the data_len bytes after the header."""
    xml = _text(data[: cookie_offset or len(data)], "domain XML", HEADER_SIZE)
    if not xml:
        raise CorruptError("save image has no domain XML", HEADER_SIZE)
    cookie = None
    if cookie_offset:
        cookie = _text(data[cookie_offset:], "cookie", HEADER_SIZE + cookie_offset) or None
    return SaveImage(
        xml, image.was_running, image.image_format, cookie, image.data_len, image.byteorder
    )


def _text(region: bytes, what: str, offset: int) -> str:
    """The NUL-terminated UTF-8 text at the start of `region`."""
    try:
        return region.split(b"\0", 1)[0].decode()
    except UnicodeDecodeError as e:
        raise CorruptError(f"the {what} is not UTF-8", offset + e.start) from None


def encode_prefix(
    xml: str,
    *,
    was_running: bool,
    image_format: str = "raw",
    cookie: str | None = None,
    partial: bool = True,
) -> bytes:
    """Header, XML, cookie and padding, in this host's order as libvirt writes them.

    `partial` writes PARTIAL_MAGIC: the image is marked complete by writing SAVE_MAGIC at
    FINAL_MAGIC_OFFSET after the body, which needs a seekable file; for a pipe pass False.
    """
    if image_format not in LIBVIRT_FORMATS:
        raise UsageError(f"unknown save image format {quoted(image_format)}")
    xml_bytes, cookie_bytes = xml.encode(), (cookie or "").encode()
    if not xml_bytes or b"\0" in xml_bytes + cookie_bytes:
        raise UsageError("the domain XML is empty or holds a NUL byte")
    text = xml_bytes + b"\0" + (cookie_bytes + b"\0" if cookie_bytes else b"")
    data_len = len(text) + XML_PADDING
    if data_len > MAX_DATA_LEN:
        raise UsageError(f"domain XML and padding are over {MAX_DATA_LEN >> 20} MiB")
    cookie_offset = len(xml_bytes) + 1 if cookie_bytes else 0
    words = _WORDS.pack(
        VERSION,
        data_len,
        int(was_running),
        FORMAT_CODES.index(image_format),
        cookie_offset,
        *[0] * 14,
    )
    magic = PARTIAL_MAGIC if partial else SAVE_MAGIC
    return magic + words + text + bytes(XML_PADDING)


def read_prefix(source: Input) -> tuple[SaveImage, bytes]:
    """Read header and XML from `source`: the image, and what was read of the body after them."""
    buffer = _read_at_least(source, b"", HEADER_SIZE)
    image, cookie_offset = parse_header(buffer[:HEADER_SIZE])
    buffer = _read_at_least(source, buffer, image.stream_offset)
    if len(buffer) < image.stream_offset:
        raise TruncatedError(
            f"save image ends inside its domain XML (data_len {image.data_len})", len(buffer)
        )
    image = parse_data(image, cookie_offset, buffer[HEADER_SIZE : image.stream_offset])
    return image, buffer[image.stream_offset :]


def _read_at_least(source: Input, buffer: bytes, size: int) -> bytes:
    """`buffer` and more from `source` until it holds `size` bytes or the source ends."""
    parts = [buffer]
    have = len(buffer)
    while have < size and (chunk := source.read()):
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


# -- reading the body ---------------------------------------------------------------------------

Member = Any  # a zlib/bz2/lzma/zstandard decompression object: .eof, .unused_data
Step = Callable[[Member, memoryview, int], tuple[bytes, int]]


def _zlib_step(member: Member, data: memoryview, room: int) -> tuple[bytes, int]:
    out = member.decompress(data, room)
    return out, len(data) - len(member.unconsumed_tail)


def _buffered_step(member: Member, data: memoryview, room: int) -> tuple[bytes, int]:
    """bz2 and lzma keep input they could not yet expand; feed them more only when they ask."""
    if not member.needs_input:
        return member.decompress(b"", room), 0
    return member.decompress(data, room), len(data)


ZSTD_SLICE = 1 << 10  # zstandard has no output limit: 1 KiB expands to at most ~32 MiB


def _zstd_step(member: Member, data: memoryview, room: int) -> tuple[bytes, int]:
    data = data[:ZSTD_SLICE]
    return member.decompress(data), len(data)


_DECOMPRESSORS: dict[str, tuple[Callable[[], Member], Step]] = {
    "gzip": (lambda: zlib.decompressobj(wbits=31), _zlib_step),
    "bzip2": (bz2.BZ2Decompressor, _buffered_step),
    "xz": (lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), _buffered_step),
    "zstd": (lambda: zstandard.ZstdDecompressor().decompressobj(), _zstd_step),
}
_CORRUPT = (zlib.error, OSError, lzma.LZMAError, zstandard.ZstdError)  # OSError: bz2
SLICE = 64 << 10  # input per call: bounds how far past a fault its reported offset can be


class Inflater:
    """A compressed body in (feed), the QEMU stream out (read), in bounded memory.

    It holds what it was fed (a chunk a Source read, 1 MiB) and what read() asked for; for zstd,
    which has no output limit, one 1 KiB slice can also leave up to ~32 MiB waiting.

    Like `PROG -dc`, it reads members (streams, frames) one after another, and takes zero
    bytes after the last as padding (iohelper leaves up to 64 KiB of them on block devices).
    Offsets in errors are file offsets; for a corrupt body, how far the decompressor had read
    when it noticed.
    """

    def __init__(self, image_format: str, start: int) -> None:
        self.name = image_format
        self._new, self._step = _DECOMPRESSORS[image_format]
        self._member: Member | None = None
        self._members = 0
        self._input = memoryview(b"")
        self._offset = start  # file offset of _input[0]
        self._padding = False
        self._overflow = memoryview(b"")  # output beyond what read() was asked for (zstd only)

    def feed(self, data: bytes) -> None:
        self._input = memoryview(bytes(self._input) + data if self._input else data)

    def read(self, size: int = CHUNK) -> bytes:
        """Up to `size` bytes of the stream; b"" when it needs more input."""
        parts, have = [self._overflow], len(self._overflow)
        while have < size and (out := self._decompress(size - have)) is not None:
            parts.append(out)
            have += len(out)
        data = b"".join(parts)
        if len(data) <= size:
            self._overflow = memoryview(b"")
            return data
        self._overflow = memoryview(data)[size:]
        return data[:size]

    def close(self) -> None:
        """The input has ended: refuse a body cut off inside a member."""
        end = self._offset + len(self._input)
        if self._member is not None:
            raise TruncatedError(f"{self.name} body truncated", end)
        if not self._members:
            raise TruncatedError(f"{self.name} body is missing", end)

    def _decompress(self, room: int) -> bytes | None:
        """One call into the decompressor: its output, or None when it needs input."""
        if self._member is None:
            if not self._input:
                return None
            if self._padding or self._input[0] == 0:
                self._skip_padding()
                return None
            self._member, self._members = self._new(), self._members + 1
        data = self._input[:SLICE]
        try:
            out, used = self._step(self._member, data, room)
        except _CORRUPT as e:
            raise CorruptError(
                f"{self.name} body is corrupt ({e})", self._offset + len(data)
            ) from None
        self._input, self._offset = self._input[used:], self._offset + used
        if self._member.eof:
            rest = self._member.unused_data
            self._input = memoryview(bytes(rest) + bytes(self._input))
            self._offset -= len(rest)
            self._member = None
        elif not out and not used:
            return None
        return out

    def _skip_padding(self) -> None:
        self._padding = True
        data = bytes(self._input)
        zeros = len(data) - len(data.lstrip(b"\0"))
        if zeros < len(data):
            raise CorruptError(f"unexpected bytes after the {self.name} body", self._offset + zeros)
        self._input, self._offset = memoryview(b""), self._offset + len(data)


class _InflatingBody:
    def __init__(self, inflater: Inflater, source: Input, rest: bytes) -> None:
        self._inflater, self._source, self._ended = inflater, source, False
        inflater.feed(rest)

    def read(self) -> bytes:
        while not (out := self._inflater.read()) and not self._ended:
            chunk = self._source.read()
            if chunk:
                self._inflater.feed(chunk)
            else:
                self._ended = True
                self._inflater.close()
        return out

    def close(self) -> None:
        pass


class _RawBody:
    def __init__(self, source: Input, rest: bytes) -> None:
        self._source, self._rest = source, rest

    def read(self) -> bytes:
        rest, self._rest = self._rest, b""
        return rest or self._source.read()

    def close(self) -> None:
        pass


class _Program:
    """A compressor program, run as libvirt runs it, between one of our ends and a thread.

    The thread either feeds the program's stdin (`feed`, reading) or drains its stdout
    (`drain`, writing); `channel` is the other pipe, ours. Each side closes only its own pipe,
    and a failure in the thread kills the program, so neither side waits forever.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        feed: Callable[[], bytes] | None = None,
        drain: Callable[[bytes], object] | None = None,
    ) -> None:
        self.name = argv[0]
        path = shutil.which(self.name)
        if path is None:
            message = f"{self.name} images need the {self.name} program (apt-get install it)"
            raise IncompatibleError(message)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- closed once the program ends
        self.process = subprocess.Popen(
            [path, *argv[1:]],
            bufsize=0,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        self._ours, theirs = (stdout, stdin) if feed else (stdin, stdout)
        self.channel = FdChannel(self._ours.fileno())
        self._error: BaseException | None = None
        self._complaint: str | None = None

        def pump() -> None:
            try:
                if feed is not None:
                    to_program = FdChannel(stdin.fileno())
                    while chunk := feed():
                        to_program.write([chunk])
                elif drain is not None:
                    from_program = FdChannel(stdout.fileno())
                    while chunk := from_program.read():
                        drain(chunk)
            except BaseException as e:  # raised again by wait(), in the caller's thread
                self._error = e
                self.process.kill()
            finally:
                theirs.close()

        self._thread = threading.Thread(target=pump, name=f"migpipe-{self.name}", daemon=True)
        self._thread.start()

    def wait(self) -> str | None:
        """Close our pipe, wait for the thread and the program: its complaint, if it failed."""
        self._ours.close()
        self._thread.join()
        status = self.process.wait()
        if not self._stderr.closed:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
            self._stderr.close()
            if status > 0:
                self._complaint = lines[-1] if lines else f"exit status {status}"
        if self._complaint is None and self._error is not None:
            raise self._error
        if self._complaint is None and status:
            self._complaint = f"killed by signal {-status}"
        return self._complaint

    def abort(self) -> None:
        """Stop early. The thread may be stuck in a read of ours; it ends on its own."""
        self.process.kill()
        self._ours.close()
        self.process.wait()
        self._stderr.close()


class _ProgramBody:
    """The body through `lzop -dc --ignore-warn`, libvirt's command."""

    def __init__(self, source: Input, rest: bytes, start: int) -> None:
        self._end = start  # file offset up to which the body went to lzop
        self._tail = b""  # its last 4 bytes: a whole lzop file ends with a zero word
        self._whole = False  # lzop was given the whole body
        pending = [rest]

        def feed() -> bytes:
            chunk = pending.pop() if pending else source.read()
            self._end += len(chunk)
            self._tail = (self._tail + chunk)[-4:]
            self._whole = not chunk
            return chunk

        self._program = _Program(["lzop", "-dc", "--ignore-warn"], feed=feed)

    def read(self) -> bytes:
        out = self._program.channel.read()
        if not out:
            complaint = self._program.wait()
            if complaint is not None and self._whole and self._tail != bytes(4):
                raise TruncatedError("lzop body truncated", self._end)
            if complaint is not None:
                raise CorruptError(f"lzop body is corrupt ({complaint})")
        return out

    def close(self) -> None:
        self._program.abort()


class _MappedRamBody:
    """sparse: the ordinary stream of the mapped-ram file after the XML, read by offset through
    a descriptor of its own: the caller's may be O_DIRECT (restore --direct), which refuses
    the unaligned reads of a stream that starts after the XML."""

    def __init__(self, fd: int | None, origin: int, name: str) -> None:
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(
                f"{name}: a sparse libvirt image holds QEMU's mapped-ram file, whose pages are "
                "found by offset: it cannot be read from a pipe; give its path"
            )
        self._fd: int | None = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        self.reader = MappedRamReader(self._fd, origin, name)
        self._chunks = self.reader.chunks()

    def read(self) -> bytes:
        return next(self._chunks, b"")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LibvirtImageReader:
    """The QEMU stream inside a libvirt save image, given by read() as a Source's; it has no
    interrupt(): close() stops it early, and the Source behind its Input ends a waiting read.

    Creating it reads the header and XML from `source` (it blocks: call it from a worker
    thread); `image` then describes them. read() gives the stream, decompressed, and raises
    MigpipeError at the end of a truncated or corrupt body. close() stops early. A sparse
    image is read through `fd`, the file `source` reads (None: a pipe, which cannot carry
    one); `name` is what messages call it.
    """

    def __init__(self, source: Input, fd: int | None = None, name: str = "the image") -> None:
        self.image, rest = read_prefix(source)
        image_format, start = self.image.image_format, self.image.stream_offset
        self.mapped_ram: MappedRamReader | None = None  # sparse: its blocks, for inspect
        if image_format == "raw":
            self._body: _RawBody | _InflatingBody | _ProgramBody | _MappedRamBody = _RawBody(
                source, rest
            )
        elif image_format == SPARSE:
            self._body = _MappedRamBody(fd, start, name)
            self.mapped_ram = self._body.reader
        elif image_format == "lzop":
            self._body = _ProgramBody(source, rest, start)
        else:
            self._body = _InflatingBody(Inflater(image_format, start), source, rest)

    def read(self) -> bytes:
        return self._body.read()

    def close(self) -> None:
        self._body.close()


# -- writing ------------------------------------------------------------------------------------


class _Identity:
    """raw: the compressor interface, doing nothing."""

    def compress(self, data: bytes | memoryview) -> bytes | memoryview:
        return data

    def flush(self) -> bytes:
        return b""


_COMPRESSORS: dict[str, Callable[[int], Any]] = {
    "gzip": lambda level: zlib.compressobj(level, zlib.DEFLATED, 31),
    "bzip2": bz2.BZ2Compressor,
    "xz": lambda level: lzma.LZMACompressor(lzma.FORMAT_XZ, preset=level),
    "zstd": lambda level: zstandard.ZstdCompressor(
        level=level, threads=-1, write_checksum=True
    ).compressobj(),
}


class _CompressingBody:
    def __init__(self, sink: Sink, compressor: Any) -> None:
        self._sink, self._compressor = sink, compressor

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        out = [self._compressor.compress(part) for part in parts]
        self._sink.write([piece for piece in out if len(piece)])

    def finish(self) -> None:
        self._sink.write([self._compressor.flush()])

    def close(self) -> None:
        pass


class _ProgramWriterBody:
    """The body through `lzop -c`; a thread carries lzop's output to the sink."""

    def __init__(self, sink: Sink, level: int) -> None:
        self._program = _Program(["lzop", "-c", f"-{level}"], drain=lambda out: sink.write([out]))

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        try:
            self._program.channel.write(parts)
        except MigpipeError:
            self.finish()  # lzop's own complaint, or the sink's, says more than a broken pipe
            raise

    def finish(self) -> None:
        complaint = self._program.wait()
        if complaint is not None:
            raise MigpipeError(f"lzop -c failed ({complaint})")

    def close(self) -> None:
        self._program.abort()


class _MappedRamWriterBody:
    """sparse: the stream placed as QEMU's mapped-ram file after the XML (MappedRamWriter)."""

    def __init__(self, fd: int, origin: int) -> None:
        self._writer = MappedRamWriter(fd, origin)

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        self._writer.write(parts)

    def finish(self) -> None:
        self._writer.finish()

    def close(self) -> None:
        pass


Body = _CompressingBody | _ProgramWriterBody | _MappedRamWriterBody


class LibvirtImageWriter:
    """A libvirt save image written to `target`: a Sink one writes the QEMU stream to, or the
    descriptor of a regular file, which the sparse format needs (it is written by offset).

    The first write() (or finish()) writes the header, XML and padding; finish() completes the
    body (the sparse one's bitmaps, then its length). The image is then complete but for its
    magic when `partial` (the default): the caller, holding the file, calls mark_complete()
    on it before syncing.
    """

    def __init__(
        self,
        target: Sink | int,
        xml: str,
        *,
        was_running: bool,
        image_format: str = "raw",
        cookie: str | None = None,
        level: int | None = None,
        partial: bool = True,
    ) -> None:
        self._prefix = encode_prefix(
            xml, was_running=was_running, image_format=image_format, cookie=cookie, partial=partial
        )
        if image_format == SPARSE:
            _check_sparse_target(target)
        self._target, self._format = target, image_format
        self._level = DEFAULT_LEVELS.get(image_format, 0) if level is None else level
        self._body: Body | None = None

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        self._started().write(parts)

    def finish(self) -> None:
        self._started().finish()

    def close(self) -> None:
        """Stop early (on an error elsewhere): end any compressor program."""
        if self._body is not None:
            self._body.close()

    def _started(self) -> Body:
        if self._body is not None:
            return self._body
        target = self._target
        if isinstance(target, int) and self._format == SPARSE:
            _write_all_at(target, self._prefix, 0)
            self._body = _MappedRamWriterBody(target, len(self._prefix))
            return self._body
        sink = FdChannel(target) if isinstance(target, int) else target
        sink.write([self._prefix])
        if self._format == "lzop":
            self._body = _ProgramWriterBody(sink, self._level)
        elif self._format == "raw":
            self._body = _CompressingBody(sink, _Identity())
        else:
            self._body = _CompressingBody(sink, _COMPRESSORS[self._format](self._level))
        return self._body


def _check_sparse_target(target: Sink | int) -> None:
    """A sparse image is QEMU's mapped-ram file: written by offset, page by page where each
    page goes, so into a regular file, through the page cache (O_DIRECT takes only aligned
    blocks; QEMU's own direct-io is the way around the cache for it)."""
    if not (isinstance(target, int) and stat.S_ISREG(os.fstat(target).st_mode)):
        raise UsageError("a sparse libvirt image is written by offset: it needs a file, not a pipe")
    if fcntl.fcntl(target, fcntl.F_GETFL) & os.O_DIRECT:
        raise UsageError(SPARSE_DIRECT)


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    """pwrite() all of `data`: it may write less than asked, as write() may."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def mark_complete(fd: int) -> None:
    """Write SAVE_MAGIC over a written image's PARTIAL_MAGIC; the caller then syncs the file."""
    try:
        os.pwrite(fd, SAVE_MAGIC, FINAL_MAGIC_OFFSET)
    except OSError as e:
        raise MigpipeError(f"cannot mark the save image complete: {e.strerror}") from None
