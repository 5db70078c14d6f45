"""migpipe's wire format: a header naming the filter chain, checksummed frames, a trailer.

Sans-IO, like the stream parser: WireReader turns bytes into events, the encode functions turn
events into bytes. The format is specified in migpipe-wire(5); in short:

    header  = magic(8) version(1) flags(1) be16 n, n bytes of JSON, [tag(32)], be32 CRC-32
              (migpipe.wire.header, shared with the fixed save layout)
    frame   = type(1) be32 sequence be32 length be32 CRC-32(payload) be32 CRC-32(bytes 0..12),
              payload
    trailer = a frame of type TRAILER whose payload holds the totals of the QEMU stream

A FINAL frame carries the end of the QEMU stream (its EOF item and what follows), so a decoder
can withhold it until the trailer has confirmed everything: a destination never sees a complete
stream unless the whole stream arrived intact.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from isal.isal_zlib import crc32  # zlib's CRC-32, ~3x as fast (see pyproject.toml)

from migpipe.chain import Filter
from migpipe.errors import EXIT_CORRUPT, EXIT_TRUNCATED, MigpipeError
from migpipe.stream.format import BE32, BE64
from migpipe.wire.header import Header, header_for, parse_header

MAGIC = b"\x89MGP\r\n\x1a\n"  # high bit and CR/LF/^Z catch 7-bit and text-mode mangling
VERSION = 1
FRAME_DATA = 0x44  # 'D'
FRAME_FINAL = 0x46  # 'F'
FRAME_TRAILER = 0x54  # 'T'
FRAME_TYPES = {FRAME_DATA: "data", FRAME_FINAL: "final", FRAME_TRAILER: "trailer"}
FRAME_HEADER_SIZE = 17
MAX_FRAME = 65 << 20  # the largest VM description the parser accepts (64 MiB) fits one frame
TRAILER_SIZE = 28


@dataclass(frozen=True)
class Frame:
    """A frame whose header was checked; its payload CRC is checked by `verified()`.

    The payload check is separate so that it runs in the worker threads, in parallel, and so
    that without byte filters the same CRC serves as the CRC of the QEMU bytes.
    """

    kind: int
    sequence: int
    payload: bytes
    crc: int
    offset: int  # of the frame in the wire, for error messages

    def verified(self) -> int:
        """The payload's CRC-32, after checking it against the header's."""
        crc = crc32(self.payload)
        if crc != self.crc:
            raise MigpipeError(f"checksum mismatch in frame {self.sequence}", self.offset,
                               EXIT_CORRUPT)  # fmt: skip
        return crc


@dataclass(frozen=True)
class Trailer:
    """Totals of the QEMU stream as the encoder read it.

    qemu_digest is a CRC-32 chained over every data and final frame's (be64 length, be32 CRC-32
    of its QEMU bytes): decode recomputes it from the bytes it rebuilt.
    """

    qemu_bytes: int
    page_records: int
    data_frames: int
    qemu_digest: int


def encode_header(chain: Sequence[Filter], page_size: int = 4096) -> bytes:
    """The wire header naming `chain`, which is bound to it (sealed when it ends in encrypt;
    see migpipe.wire.header)."""
    return header_for(MAGIC, VERSION, chain, {"page_size": page_size})


def crc_of(pieces: Sequence[bytes | memoryview]) -> int:
    """The CRC-32 of the concatenation of `pieces`, without concatenating them."""
    crc = 0
    for piece in pieces:
        crc = crc32(piece, crc)
    return crc


def encode_frame(
    kind: int, sequence: int, payload: Sequence[bytes | memoryview], crc: int | None = None
) -> bytes:
    """The frame header for a payload given in pieces (written after it, uncopied).

    `crc` is the payload's CRC-32 when the caller has it already.
    """
    if crc is None:
        crc = crc_of(payload)
    return frame_header(kind, sequence, sum(len(p) for p in payload), crc)


def frame_header(kind: int, sequence: int, length: int, crc: int) -> bytes:
    """The FRAME_HEADER_SIZE bytes before a payload of `length` bytes whose CRC-32 is `crc`."""
    head = bytes([kind]) + BE32.pack(sequence) + BE32.pack(length) + BE32.pack(crc)
    return head + BE32.pack(crc32(head))


def encode_trailer(sequence: int, trailer: Trailer) -> bytes:
    payload = (
        BE64.pack(trailer.qemu_bytes)
        + BE64.pack(trailer.page_records)
        + BE64.pack(trailer.data_frames)
        + BE32.pack(trailer.qemu_digest)
    )
    return encode_frame(FRAME_TRAILER, sequence, [payload]) + payload


class WireReader:
    """Turns wire bytes into a Header, then Frames, then a Trailer; checks every byte."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0
        self._closed = False
        self._sequence = 0
        self.header: Header | None = None
        self.trailer: Trailer | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def close(self) -> None:
        self._closed = True

    def _fail(self, message: str, at: int = 0, status: int = EXIT_CORRUPT) -> None:
        raise MigpipeError(message, self._base + at, status)

    def next_events(self) -> list[Header | Frame | Trailer]:
        """Everything the bytes so far complete; raises MigpipeError on any fault."""
        events: list[Header | Frame | Trailer] = []
        pos = 0
        try:
            while True:
                if self.header is None:
                    parsed = self._parse_header()  # the header starts the wire: pos is 0
                elif self.trailer is None:
                    parsed = self._parse_frame(pos)
                else:
                    if pos < len(self._buf):
                        self._fail("trailing bytes after the wire trailer", pos)
                    break
                if parsed is None:
                    break
                event, pos = parsed
                events.append(event)
        finally:
            del self._buf[:pos]
            self._base += pos
        if self._closed and self.trailer is None:
            what = "header" if self.header is None else f"frame {self._sequence}"
            message = f"wire stream truncated in {what} (no trailer: the encoder did not finish)"
            self._fail(message, len(self._buf), EXIT_TRUNCATED)
        return events

    def _parse_header(self) -> tuple[Header, int] | None:
        header, size = parse_header(self._buf, MAGIC, VERSION, "migpipe wire stream", self._base)
        if header is None:
            return None
        self.header = header
        return header, size

    def _parse_frame(self, pos: int) -> tuple[Frame | Trailer, int] | None:
        buf = self._buf
        if len(buf) - pos < FRAME_HEADER_SIZE:
            return None
        (header_crc,) = BE32.unpack_from(buf, pos + 13)
        if crc32(buf[pos : pos + 13]) != header_crc:
            self._fail(f"checksum mismatch in the header of frame {self._sequence}", pos)
        kind = buf[pos]
        (sequence,) = BE32.unpack_from(buf, pos + 1)
        (length,) = BE32.unpack_from(buf, pos + 5)
        (crc,) = BE32.unpack_from(buf, pos + 9)
        if kind not in FRAME_TYPES:
            self._fail(f"bad frame type 0x{kind:02x}", pos)
        if sequence != self._sequence:
            self._fail(f"frame {sequence} where frame {self._sequence} was due", pos)
        if length > MAX_FRAME:
            self._fail(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit", pos)
        end = pos + FRAME_HEADER_SIZE + length
        if len(buf) < end:
            return None
        self._sequence += 1
        with memoryview(buf) as view:
            payload = bytes(view[pos + FRAME_HEADER_SIZE : end])
        frame = Frame(kind, sequence, payload, crc, self._base + pos)
        if kind != FRAME_TRAILER:
            return frame, end  # its payload is checked by the worker that unfilters it
        frame.verified()
        if length != TRAILER_SIZE:
            self._fail(f"trailer of {length} bytes (expected {TRAILER_SIZE})", pos)
        self.trailer = Trailer(
            BE64.unpack_from(payload, 0)[0],
            BE64.unpack_from(payload, 8)[0],
            BE64.unpack_from(payload, 16)[0],
            BE32.unpack_from(payload, 24)[0],
        )
        return self.trailer, end
