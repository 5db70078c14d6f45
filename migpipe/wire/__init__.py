"""migpipe's wire format: a header naming the filter chain, checksummed frames, a trailer.

Sans-IO, like the stream parser: WireWriter makes the wire and WireReader reads it back, from the
encode functions and into events; WireDecoder adds what a decoder checks against the trailer.
The format is specified in migpipe-wire(5); in short:

    header  = magic(8) version(1) flags(1) be16 n, n bytes of JSON, [tag(32)], be32 CRC-32
              (migpipe.wire.header, shared with the fixed save layout)
    frame   = type(1) be32 sequence be32 length be32 CRC-32(payload) be32 CRC-32(bytes 0..12),
              payload                                                         (version 1)
            = type(1) lane(1) be32 sequence be32 length be32 CRC-32(payload)
              be32 CRC-32(bytes 0..13), payload                                (version 2)
    trailer = a frame of type TRAILER whose payload holds the totals of the QEMU stream

Version 2 carries several of QEMU's connections (lanes) and both directions: lane 0 is QEMU's
main stream forward, as version 1 carries it; further lanes are QEMU's other connections
(postcopy-preempt, multifd), opened with an OPEN frame and ended with an END frame; the answer
direction (decode to encode, no header) carries each connection's bytes back (QEMU's return
path) in frames of the same form. Sequence numbers count each lane's frames in each direction.

Version 2 may spread the lanes over several connections (migpipe-wire(5) "Connections"): the
header says how many and names the session; each further connection starts with a JOIN
preamble from the side that opened it, and carries a fixed share of the lanes (lane_connection)
in both directions, so that a lane is never queued behind another connection's bytes.

A FINAL frame carries the end of the QEMU stream (its EOF item and what follows), so a decoder
can withhold it until the trailer has confirmed everything: a destination never sees a complete
stream unless the whole stream arrived intact.
"""

import json
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
    printable,
)
from migpipe.keys import Secrets
from migpipe.stream.format import BE16, BE32, BE64
from migpipe.wire.header import Header, header_for, open_chain, parse_header

MAGIC = b"\x89MGP\r\n\x1a\n"  # high bit and CR/LF/^Z catch 7-bit and text-mode mangling
VERSION = 1  # one QEMU stream, one way
VERSION_LANES = 2  # QEMU's connections (lanes), both ways
VERSIONS = (VERSION, VERSION_LANES)
FRAME_DATA = 0x44  # 'D'
FRAME_FINAL = 0x46  # 'F'
FRAME_TRAILER = 0x54  # 'T'
FRAME_OPEN = 0x4F  # 'O': version 2, a lane's first frame (QEMU opened another connection)
FRAME_END = 0x45  # 'E': version 2, a lane's last frame in its direction (its connection ended)
FRAME_TYPES = {
    FRAME_DATA: "data",
    FRAME_FINAL: "final",
    FRAME_TRAILER: "trailer",
    FRAME_OPEN: "open",
    FRAME_END: "end",
}
FRAME_HEADER_SIZE = 17  # version 1's; version 2's has a lane byte more
FRAME_HEADER_SIZES = {VERSION: FRAME_HEADER_SIZE, VERSION_LANES: FRAME_HEADER_SIZE + 1}
FRAME_JOIN = 0x4A  # 'J': version 2, the preamble of a further connection (see Join)
MAX_LANES = 64  # QEMU opens at most 1 + multifd's 255 channels + 1; 64 bounds what a peer costs
LANE_END_SIZE = 12  # an END frame's payload: be64 bytes, be32 digest of the lane's bytes
BACK = 1 << 80  # the answer direction's positions, apart from the forward ones (see lane_position)
MAX_FRAME = 65 << 20  # the largest VM description the parser accepts (64 MiB) fits one frame
TRAILER_SIZE = 28
SESSION_SIZE = 16
JOIN_SIZE = 8 + 2 + SESSION_SIZE + 2 + 2 + 4
MAX_CONNECTIONS = MAX_LANES  # more connections than lanes would carry nothing


@dataclass(frozen=True)
class Connections:
    """How many connections a version 2 wire spreads its lanes over, and the session that ties
    them together (random, chosen by encode; its header names it, each JOIN repeats it)."""

    count: int = 1
    session: bytes = bytes(SESSION_SIZE)

    def fields(self) -> dict[str, object]:
        """The header fields that say so (none for one connection, the wire as it always was)."""
        if self.count == 1:
            return {}
        return {"connections": self.count, "session": self.session.hex()}

    @classmethod
    def of(cls, header: Header) -> "Connections":
        """A header's connections; raises CorruptError on fields that make no sense."""
        count = header.fields.get("connections", 1)
        if count == 1:
            return ONE_CONNECTION
        session = header.fields.get("session")
        if type(count) is not int or not 2 <= count <= MAX_CONNECTIONS:
            raise CorruptError(f"malformed wire header (connections {json.dumps(count)})", 12)
        try:
            key = bytes.fromhex(session) if type(session) is str else b""
        except ValueError:
            key = b""
        if len(key) != SESSION_SIZE:
            raise CorruptError(f"malformed wire header (session {json.dumps(session)})", 12)
        return cls(count, key)


ONE_CONNECTION = Connections()  # the wire as version 1 always was, and most are


def lane_connection(lane: int, count: int) -> int:
    """Which of `count` connections carries `lane`, both ways: lane 0 (QEMU's main stream and
    its return path) the first; every other lane one of the rest, in turn, so that
    postcopy-preempt's lane, or each multifd channel's, has a connection of its own when there
    are enough."""
    if lane == 0 or count == 1:
        return 0
    return 1 + (lane - 1) % (count - 1)


@dataclass(frozen=True)
class Join:
    """The preamble of a further connection: whose session, which connection of how many."""

    session: bytes
    index: int
    count: int

    def encode(self) -> bytes:
        head = (
            MAGIC
            + bytes([VERSION_LANES, FRAME_JOIN])
            + self.session
            + BE16.pack(self.index)
            + BE16.pack(self.count)
        )
        return head + BE32.pack(crc32(head))

    def check(self, connections: Connections, offset: int = 0) -> None:
        """Raise unless it joins the wire whose header said `connections`."""
        if self.session != connections.session:
            raise CorruptError("a connection joined from another session", offset + 10)
        if self.count != connections.count:
            said = connections.count
            message = f"a connection joined {self.count} connections, the header says {said}"
            raise CorruptError(message, offset + 26)


FIRST_SIZE = 10  # what a listener peeks to tell a wire's first connection from the others


def starts_wire(first: bytes) -> bool:
    """Whether the FIRST_SIZE bytes `first` start a wire (its header) rather than a further
    connection (its JOIN); MigpipeError for a stray's bytes."""
    if first[:8] != MAGIC:
        raise MigpipeError(f"not a migpipe wire (it began with {printable(first[:8])})")
    return not (first[8] == VERSION_LANES and first[9] == FRAME_JOIN)


def parse_join(buf: Buffer, base: int = 0) -> Join | None:
    """The JOIN preamble at the start of `buf`, or None while it holds less of it."""
    if len(buf) < JOIN_SIZE:
        if not (MAGIC + bytes([VERSION_LANES, FRAME_JOIN])).startswith(bytes(buf[:10])):
            raise CorruptError("not a migpipe connection joining a wire (bad preamble)", base)
        return None
    head = bytes(buf[: JOIN_SIZE - 4])
    if head[:10] != MAGIC + bytes([VERSION_LANES, FRAME_JOIN]):
        raise CorruptError("not a migpipe connection joining a wire (bad preamble)", base)
    if crc32(head) != BE32.unpack_from(buf, JOIN_SIZE - 4)[0]:
        raise CorruptError("checksum mismatch in a connection's preamble", base)
    session = head[10 : 10 + SESSION_SIZE]
    (index,) = BE16.unpack_from(head, 10 + SESSION_SIZE)
    (count,) = BE16.unpack_from(head, 12 + SESSION_SIZE)
    if not 1 <= index < count <= MAX_CONNECTIONS:
        raise CorruptError(f"a connection joined as {index} of {count}", base + 10 + SESSION_SIZE)
    return Join(session, index, count)


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
    lane: int = 0  # version 2: which of QEMU's connections it carries

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


def encode_header(
    chain: Sequence[Filter] | FilterChain,
    page_size: int = 4096,
    version: int = VERSION,
    resumed: bool = False,
    connections: Connections = ONE_CONNECTION,
) -> bytes:
    """The wire header naming `chain`, which is bound to it (sealed when it ends in encrypt;
    see migpipe.wire.header). Version 2's: `resumed`, lane 0 is a resumed postcopy stream;
    `connections`, the lanes are spread over several."""
    if not isinstance(chain, FilterChain):
        chain = FilterChain(chain)
    fields: dict[str, object] = {"page_size": page_size, **connections.fields()}
    if resumed:
        fields["resumed"] = True
    return header_for(MAGIC, version, chain, fields)


def lane_position(lane: int, sequence: int, back: bool = False) -> Position:
    """Where a version 2 frame of lane `lane` sits, for the byte filters that bind payloads to
    their place: lane 0 forward numbers its frames as version 1 does; every other lane, and
    the answer direction, number theirs in ranges of their own, so that no two payloads of one
    stream share a position (encrypt's nonce is made of it)."""
    return Position((BACK if back else 0) | lane << 64 | sequence, False)


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


def frame_header(kind: int, sequence: int, length: int, crc: int, lane: int | None = None) -> bytes:
    """The bytes before a payload of `length` bytes whose CRC-32 is `crc`: version 1's
    FRAME_HEADER_SIZE, or with `lane` version 2's, one more."""
    kinds = bytes([kind]) if lane is None else bytes([kind, lane])
    head = kinds + BE32.pack(sequence) + BE32.pack(length) + BE32.pack(crc)
    return head + BE32.pack(crc32(head))


def fold(digest: int, length: int, crc: int) -> int:
    """The trailer's digest with one more frame's QEMU bytes (their length and CRC-32)."""
    return crc32(BE64.pack(length) + BE32.pack(crc), digest)


def encode_trailer(sequence: int, trailer: Trailer, lane: int | None = None) -> bytes:
    payload = (
        BE64.pack(trailer.qemu_bytes)
        + BE64.pack(trailer.page_records)
        + BE64.pack(trailer.data_frames)
        + BE32.pack(trailer.qemu_digest)
    )
    return frame_header(FRAME_TRAILER, sequence, len(payload), crc32(payload), lane) + payload


class WireReader:
    """Turns wire bytes into a Header, then Frames, then a Trailer; checks every byte.

    Version 2 frames name their lane: lane 0 carries the QEMU stream as version 1 does, up to
    its trailer; a lane above it starts with an OPEN frame (lanes open in order) and ends with
    an END frame; the wire ends once lane 0's trailer came and every lane opened has ended.
    `back` reads the answer direction instead: no header, version 2 frames, DATA and END
    only, for lane 0 and the lanes the forward direction opened (the caller checks which),
    read up to the connection's end, by which every lane that answered, and lane 0, ended.

    A further connection of a wire spread over several (see Connections) has no header and no
    lane 0: `joined`, it starts with a JOIN preamble (an event) that says which connection it
    is, else `place` says so; forward, it carries its own lanes (lane_connection) and ends,
    like the answer direction, at the connection's end, every lane it opened ended.
    """

    def __init__(self, back: bool = False, joined: bool = False, place: Join | None = None) -> None:
        self._buf = bytearray()
        self._base = 0
        self._closed = False
        self._back = back
        self._joining = joined  # a JOIN preamble comes first, and says `place`
        self.place = place  # a further connection's: which lanes it carries
        self._sequences: dict[int, int] = {}  # each lane's next frame number
        self._open: set[int] = set()  # lanes not ended yet
        self._next_lane = 1  # forward: the lane the next OPEN must name
        if place is None and not joined:
            self._sequences, self._open = {0: 0}, {0}
        else:
            self._join(place)
        self.version = VERSION_LANES if back or self._further else None
        self.header: Header | None = None
        self.connections = ONE_CONNECTION
        self.trailer: Trailer | None = None

    @property
    def _further(self) -> bool:
        """Whether this reads a further connection (no header, no lane 0)."""
        return self._joining or self.place is not None

    def _join(self, place: Join | None) -> None:
        self.place = place
        if place is not None:
            self._next_lane = place.index

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def close(self) -> None:
        self._closed = True

    @property
    def ended(self) -> bool:
        """Whether the wire has said all it will: every lane ended, and lane 0's trailer came."""
        if self._back or self._further:  # answers may come after lane 0's end: read to EOF
            return self._closed and not (self._open or self._joining)
        return self.trailer is not None and self._open <= {0}

    def _fail(self, message: str, at: int = 0, status: int = EXIT_CORRUPT) -> None:
        raise MigpipeError(message, self._base + at, status)

    def next_events(self) -> list[Header | Frame | Trailer]:
        """Everything the bytes so far complete; raises MigpipeError on any fault."""
        events: list[Header | Frame | Trailer] = []
        pos = 0
        try:
            while True:
                if self._joining:
                    parsed = self._parse_join()  # the preamble starts the connection: pos is 0
                elif self.version is None:
                    parsed = self._parse_header()  # the header starts the wire: pos is 0
                elif not self.ended:
                    parsed = self._parse_frame(pos)
                else:
                    if pos < len(self._buf):
                        self._fail("trailing bytes after the end of the wire", pos)
                    break
                if parsed is None:
                    break
                event, pos = parsed
                events.append(event)
        finally:
            del self._buf[:pos]
            self._base += pos
        if self._closed and not self.ended:
            self._fail(self._truncation(), len(self._buf), EXIT_TRUNCATED)
        return events

    def _truncation(self) -> str:
        if self._joining:
            return "connection truncated in its preamble"
        if self.version is None:
            return "wire stream truncated in header (no trailer: the encoder did not finish)"
        if self._back or self._further:
            lanes = ", ".join(map(str, sorted(self._open)))
            what = "answer direction" if self._back else f"connection {self.place.index}"
            return f"{what} truncated (lanes {lanes} never ended)"
        if self.trailer is None:
            what = f"frame {self._sequences[0]}"
            return f"wire stream truncated in {what} (no trailer: the encoder did not finish)"
        lanes = ", ".join(map(str, sorted(self._open - {0})))
        return f"wire stream truncated (lanes {lanes} never ended: the encoder did not finish)"

    def _parse_header(self) -> tuple[Header, int] | None:
        header, size = parse_header(self._buf, MAGIC, VERSIONS, "migpipe wire stream", self._base)
        if header is None:
            return None
        self.header, self.version = header, self._buf[8]
        self.connections = Connections.of(header)
        return header, size

    def _parse_join(self) -> tuple[Join, int] | None:
        join = parse_join(self._buf, self._base)
        if join is None:
            return None
        self._joining = False
        self._join(join)
        return join, JOIN_SIZE

    def _parse_frame(self, pos: int) -> tuple[Frame | Trailer, int] | None:
        buf = self._buf
        size = FRAME_HEADER_SIZES[self.version]
        if len(buf) - pos < size:
            return None
        (header_crc,) = BE32.unpack_from(buf, pos + size - 4)
        if crc32(buf[pos : pos + size - 4]) != header_crc:
            which = f"frame {self._sequences[0]}" if self.version == VERSION else "a frame"
            self._fail(f"checksum mismatch in the header of {which}", pos)
        kind, lane = buf[pos], 0
        at = pos + 1
        if self.version == VERSION_LANES:
            lane, at = buf[at], at + 1
        (sequence,) = BE32.unpack_from(buf, at)
        (length,) = BE32.unpack_from(buf, at + 4)
        (crc,) = BE32.unpack_from(buf, at + 8)
        if kind not in FRAME_TYPES:
            self._fail(f"bad frame type 0x{kind:02x}", pos)
        self._check_lane(kind, lane, sequence, pos)
        if length > MAX_FRAME:
            self._fail(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit", pos)
        end = pos + size + length
        if len(buf) < end:
            return None
        self._sequences[lane] += 1
        with memoryview(buf) as view:
            payload = bytes(view[pos + size : end])
        frame = Frame(kind, sequence, payload, crc, self._base + pos, lane)
        if kind == FRAME_END:
            self._open.discard(lane)
            frame.checked_crc()
            if length != LANE_END_SIZE:
                self._fail(f"end of lane {lane} of {length} bytes (not {LANE_END_SIZE})", pos)
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

    def _check_lane(self, kind: int, lane: int, sequence: int, pos: int) -> None:
        """Frames of a lane come in order, of the kinds its place allows."""
        due = self._sequences.get(lane)
        if due is None:  # forward: the next lane, opened by its first frame; back: any answer
            if not self._back:
                self._check_opening(kind, lane, pos)
            if lane >= MAX_LANES:
                self._fail(f"lane {lane} is past the {MAX_LANES}-lane limit", pos)
            self._sequences[lane], self._open, due = 0, self._open | {lane}, 0
        elif lane not in self._open or (lane == 0 and self.trailer is not None):
            self._fail(f"frame for lane {lane} after its end", pos)
        if sequence != due:
            where = f" of lane {lane}" if self.version == VERSION_LANES else ""
            self._fail(f"frame {sequence}{where} where frame {due} was due", pos)
        if self._back:
            allowed = (FRAME_DATA, FRAME_END)
        elif lane == 0 and not self._further:
            allowed = (FRAME_DATA, FRAME_FINAL, FRAME_TRAILER)
        else:
            allowed = (FRAME_OPEN,) if sequence == 0 else (FRAME_DATA, FRAME_END)
        if kind not in allowed:
            self._fail(f"{FRAME_TYPES[kind]} frame in lane {lane}", pos)

    def _check_opening(self, kind: int, lane: int, pos: int) -> None:
        """A forward lane's first frame: an OPEN, for the next lane this connection carries
        (every lane on one connection; else see lane_connection)."""
        count = self.place.count if self.place is not None else self.connections.count
        here = self.place.index if self.place is not None else 0
        if lane < MAX_LANES and lane_connection(lane, count) != here:
            where = lane_connection(lane, count)
            self._fail(f"frame for lane {lane} on connection {here}, not on {where}", pos)
        if lane != self._next_lane or kind != FRAME_OPEN:
            self._fail(f"frame for lane {lane}, which was never opened", pos)
        self._next_lane += 1 if count == 1 else count - 1


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

    def __init__(
        self,
        chain: FilterChain,
        page_size: int = 4096,
        lanes: bool = False,
        resumed: bool = False,
        connections: Connections = ONE_CONNECTION,
    ) -> None:
        self.chain = chain
        self.page_size = page_size
        self.version = VERSION_LANES if lanes else VERSION
        self.resumed = resumed
        self.connections = connections
        self._lane = 0 if lanes else None  # the lane byte of version 2's frame headers
        self._cut = 0  # positions handed out: the cutting thread's
        self.frames = 0  # data and final frames made, the next one's number: the writing thread's
        self.digest = 0

    def header(self) -> bytes:
        """The wire header, which binds the chain: call it before sealing any payload."""
        return encode_header(
            self.chain, self.page_size, self.version, self.resumed, self.connections
        )

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
        return frame_header(kind, position.index, length, crc, self._lane)

    def summary(self, qemu_bytes: int, page_records: int) -> Trailer:
        """What the trailer says, once every frame was made: the QEMU stream's size and page
        records as the caller counted them, the frames and digest as made here."""
        return Trailer(qemu_bytes, page_records, self.frames, self.digest)

    def trailer(self, summary: Trailer) -> bytes:
        """The trailer frame, which ends the wire; `summary` is summary()'s."""
        return encode_trailer(self.frames, summary, self._lane)


class LaneWriter:
    """Version 2's frames of the lanes above 0 (forward) or of every lane (the answer direction):
    each lane's sequence numbers, and the END frame that vouches for the bytes it carried.

    Sans-IO and not thread-safe for one lane: the caller makes and writes each lane's frames
    under one lock (its wire connection's), so that they leave in the order they were numbered;
    lanes under different locks touch different entries only.
    """

    def __init__(self, back: bool = False) -> None:
        self.back = back
        self._sequences: dict[int, int] = {}
        self._tallies: dict[int, LaneTally] = {}

    def open(self, lane: int) -> bytes:
        """The OPEN frame that starts a forward lane (its payload is empty)."""
        self._sequences[lane], self._tallies[lane] = 0, LaneTally(lane)
        return self._header(FRAME_OPEN, lane, b"")

    def position(self, lane: int) -> Position:
        """Where the lane's next frame sits, for the byte filters (see lane_position)."""
        self._begun(lane)
        return lane_position(lane, self._sequences[lane], self.back)

    def carried(self, lane: int, qemu: Buffer) -> None:
        """Count QEMU's next bytes on the lane (what its END frame vouches for)."""
        self._begun(lane)
        self._tallies[lane].add(qemu)

    def _begun(self, lane: int) -> None:
        if lane not in self._sequences:  # the answer direction's lanes need no OPEN
            self._sequences[lane], self._tallies[lane] = 0, LaneTally(lane)

    def data(self, lane: int, payload: Buffer) -> bytes:
        """The header of a DATA frame carrying `payload` (made at position(lane))."""
        return self._header(FRAME_DATA, lane, payload)

    def end(self, lane: int) -> bytes:
        """The END frame of a lane: how many bytes it carried, and their digest."""
        self._begun(lane)
        payload = self._tallies.pop(lane).summary()
        return self._header(FRAME_END, lane, payload) + payload

    def _header(self, kind: int, lane: int, payload: Buffer) -> bytes:
        sequence = self._sequences[lane]
        self._sequences[lane] = sequence + 1
        return frame_header(kind, sequence, len(payload), crc32(payload), lane)


class LaneTally:
    """A lane's bytes as they were read (or rebuilt): their count and a CRC-32 over them,
    which the lane's END frame carries and the reader checks."""

    def __init__(self, lane: int) -> None:
        self.lane = lane
        self.bytes = 0
        self.crc = 0

    def add(self, data: Buffer) -> None:
        self.bytes += len(data)
        self.crc = crc32(data, self.crc)

    def summary(self) -> bytes:
        return BE64.pack(self.bytes) + BE32.pack(self.crc)

    def check(self, end: Frame) -> None:
        """Raise unless the END frame `end` vouches for the bytes added here."""
        if end.payload != self.summary():
            sent, crc = BE64.unpack_from(end.payload)[0], BE32.unpack_from(end.payload, 8)[0]
            raise CorruptError(
                f"lane {self.lane} carried {self.bytes} bytes with CRC-32 {self.crc:08x}, "
                f"its sender {sent} with {crc:08x}",
                end.offset,
            )


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

    @property
    def lanes(self) -> bool:
        """Whether the wire is version 2, which may carry lanes besides lane 0."""
        return self._reader.version == VERSION_LANES

    @property
    def resumed(self) -> bool:
        """Whether lane 0 resumes a postcopy migration (the header says so): QEMU's stream
        from where a broken connection left it, without the stream's own header."""
        return self.header is not None and self.header.fields.get("resumed") is True

    @property
    def connections(self) -> Connections:
        """What the header says of the wire's connections."""
        return self._reader.connections

    @property
    def trailer_came(self) -> bool:
        """Whether lane 0's trailer came (on version 2 the wire may go on for other lanes)."""
        return self._reader.trailer is not None

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
