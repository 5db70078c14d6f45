"""migpipe's wire format: a header naming the filter chain, checksummed frames, a trailer.

Sans-IO, like the stream parser: WireWriter makes the wire and WireReader reads it back, from the
encode functions and into events; WireDecoder adds what a decoder checks against the trailer.
The format is specified in migpipe-wire(5); in short:

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

from migpipe.chain import Buffer, Filter, FilterChain, Position, Timer
from migpipe.errors import (
    EXIT_CORRUPT,
    EXIT_TRUNCATED,
    CorruptError,
    MigpipeError,
    TruncatedError,
)
from migpipe.keys import Secrets
from migpipe.stream.format import BE32, BE64
from migpipe.wire.header import Header, header_for, open_chain, parse_header

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
    """A frame whose header was checked; its payload CRC is checked by `checked_crc()`.

    The payload check is separate so that it runs in the worker threads, in parallel, and so
    that without byte filters the same CRC serves as the CRC of the QEMU bytes.
    """

    kind: int
    sequence: int
    payload: bytes
    crc: int
    offset: int  # of the frame in the wire, for error messages

    def checked_crc(self) -> int:
        """The payload's CRC-32, after checking it against the header's."""
        crc = crc32(self.payload)
        if crc != self.crc:
            raise CorruptError(f"checksum mismatch in frame {self.sequence}", self.offset)
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


def encode_header(chain: Sequence[Filter] | FilterChain, page_size: int = 4096) -> bytes:
    """The wire header naming `chain`, which is bound to it (sealed when it ends in encrypt;
    see migpipe.wire.header)."""
    if not isinstance(chain, FilterChain):
        chain = FilterChain(chain)
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


def fold(digest: int, length: int, crc: int) -> int:
    """The trailer's digest with one more frame's QEMU bytes (their length and CRC-32)."""
    return crc32(BE64.pack(length) + BE32.pack(crc), digest)


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
        frame.checked_crc()
        if length != TRAILER_SIZE:
            self._fail(f"trailer of {length} bytes (expected {TRAILER_SIZE})", pos)
        self.trailer = Trailer(
            BE64.unpack_from(payload, 0)[0],
            BE64.unpack_from(payload, 8)[0],
            BE64.unpack_from(payload, 16)[0],
            BE32.unpack_from(payload, 24)[0],
        )
        return self.trailer, end


class WireWriter:
    """Makes the wire, the mirror of WireReader: the header, then frames, then the trailer.

    Sans-IO: it returns bytes (a frame's header, before the payload pieces it was given, which
    are written uncopied) and never writes. It owns what the trailer vouches for: the frames'
    sequence numbers, their count and the digest over their QEMU bytes.

    Threads: header() first; position() by the one thread that cuts frames, in stream order;
    frame() or frame_header() by the one thread that writes them, in the same order (encode's
    reader and writer threads; the in-place framer's one thread does both); summary() and
    trailer() last. It keeps no buffer: the payload stays the caller's.
    """

    def __init__(self, chain: FilterChain, page_size: int = 4096) -> None:
        self.chain = chain
        self.page_size = page_size
        self._cut = 0  # positions handed out: the cutting thread's
        self.frames = 0  # data and final frames made, the next one's number: the writing thread's
        self.digest = 0

    def header(self) -> bytes:
        """The wire header, which binds the chain: call it before sealing any payload."""
        return encode_header(self.chain, self.page_size)

    def position(self, final: bool) -> Position:
        """The next frame's place in the wire, which the byte filters bind its payload to."""
        position = Position(self._cut, final)
        self._cut += 1
        return position

    def frame(
        self,
        position: Position,
        payload: Sequence[Buffer],
        crc: int,
        qemu: tuple[int, int] | None = None,
    ) -> list[Buffer]:
        """The frame at `position` as pieces to write: its header, then `payload`'s pieces
        (their CRC-32 is `crc`; see frame_header for `qemu`)."""
        return [self.frame_header(position, sum(map(len, payload)), crc, qemu), *payload]

    def frame_header(
        self, position: Position, length: int, crc: int, qemu: tuple[int, int] | None = None
    ) -> bytes:
        """The FRAME_HEADER_SIZE bytes before the payload at `position`, of `length` bytes whose
        CRC-32 is `crc`. `qemu` is the length and CRC-32 of the QEMU bytes the payload carries,
        when filters made it something else; the digest covers those."""
        if position.index != self.frames:
            raise ValueError(f"frame {position.index} made where frame {self.frames} is due")
        qemu_length, qemu_crc = qemu or (length, crc)
        self.digest = fold(self.digest, qemu_length, qemu_crc)
        self.frames += 1
        kind = FRAME_FINAL if position.final else FRAME_DATA
        return frame_header(kind, position.index, length, crc)

    def summary(self, qemu_bytes: int, page_records: int) -> Trailer:
        """What the trailer says, once every frame was made: the QEMU stream's size and page
        records as the caller counted them, the frames and digest as made here."""
        return Trailer(qemu_bytes, page_records, self.frames, self.digest)

    def trailer(self, summary: Trailer) -> bytes:
        """The trailer frame, which ends the wire; `summary` is summary()'s."""
        return encode_trailer(self.frames, summary)


class WireDecoder:
    """Wire bytes in, checked frames out; at the end, the trailer's check of what they rebuilt.

    Sans-IO, over WireReader. The header opens the filter chain (a sealed one authenticated
    first, with the user's key), so `chain` is there before the first frame comes out; the
    trailer is kept for finish(). Whoever rebuilds the QEMU stream from the frames
    (migpipe.tunnel.pipeline.Decoder) reports each one's QEMU bytes (rebuilt()) in order, and
    calls finish() before it releases the stream's end.

    Threads: feed(), close() and next_frames() by one thread (the reader); open_frame() by
    any number at once, once `chain` is set; rebuilt() and finish() by one (the writer).
    """

    def __init__(self, secrets: Secrets | None = None, timer: Timer | None = None) -> None:
        self._reader = WireReader()
        self._secrets = secrets
        self._timer = timer
        self.header: Header | None = None
        self.chain: FilterChain | None = None
        self.frames = 0  # data and final frames rebuilt, with their QEMU bytes and digest
        self.qemu_bytes = 0
        self.digest = 0
        self._final = False

    def feed(self, data: Buffer) -> None:
        self._reader.feed(data)

    def close(self) -> None:
        """The wire ended: next_frames() then raises unless its trailer came."""
        self._reader.close()

    def next_frames(self) -> list[Frame]:
        """The frames the bytes so far complete; raises MigpipeError on any fault."""
        frames = []
        for event in self._reader.next_events():
            if type(event) is Frame:
                frames.append(event)
            elif type(event) is Header:
                self.chain = open_chain(event, self._secrets, self._timer)
                self.header = event
        return frames

    def open_frame(self, frame: Frame) -> tuple[Buffer, int | None]:
        """A frame's payload, checked and run back through the byte filters; and its CRC-32
        when that is known here (without byte filters, the wire's CRC is the payload's)."""
        crc = frame.checked_crc()
        position = Position(frame.sequence, frame.kind == FRAME_FINAL)
        data = self.chain.open(frame.payload, MAX_FRAME, position)
        return data, None if self.chain.byte_filters else crc

    def rebuilt(self, length: int, crc: int, final: bool) -> None:
        """The QEMU bytes rebuilt from the next frame (their length and CRC-32)."""
        self.frames += 1
        self.qemu_bytes += length
        self.digest = fold(self.digest, length, crc)
        self._final |= final

    def finish(self, page_records: int | None = None) -> None:
        """Raise unless the trailer vouches for every frame rebuilt: their count, bytes and
        digest, and `page_records` when the caller counted the pages it rebuilt."""
        trailer = self._reader.trailer
        if self.header is None:
            raise TruncatedError("wire ended before its header")
        if trailer is None:
            raise CorruptError("wire ended without a trailer")
        problems = []
        if not self._final:
            problems.append("no final frame")
        if (self.qemu_bytes, self.digest) != (trailer.qemu_bytes, trailer.qemu_digest):
            problems.append(
                f"rebuilt {self.qemu_bytes} bytes with digest {self.digest:08x}, the encoder "
                f"read {trailer.qemu_bytes} with {trailer.qemu_digest:08x}"
            )
        if self.frames != trailer.data_frames:
            problems.append(f"{self.frames} data frames, the encoder sent {trailer.data_frames}")
        if page_records is not None and page_records != trailer.page_records:
            problems.append(f"{page_records} pages, the encoder read {trailer.page_records}")
        if problems:
            message = "wire totals do not match: " + "; ".join(problems)
            raise CorruptError(message)
