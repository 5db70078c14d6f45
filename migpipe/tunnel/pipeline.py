"""encode and decode: a QEMU stream to migpipe's wire and back, as a pipeline.

The state of each direction (Encoder, Decoder) is plain synchronous code over bytes. Around it
runs migpipe.tunnel.dataplane: one thread reads and parses, WORKERS threads run the byte filters and
checksums (zstd, lz4 and CRC-32 release the GIL, so both cores work), one thread writes frames
in order; a bounded queue between them gives backpressure and bounds memory to a few frames.

Bytes are copied as little as possible: this VM pays dearly for first-touched memory, so a
frame's QEMU bytes stay views of the chunks they were read in until the frame is written
(without page filters: with them the records are the payload, see Outgoing).

End to end, each frame's QEMU bytes get a CRC-32 (computed by the workers, in parallel, or by
the reader at once with page filters), and the trailer carries a digest chained over every
frame's (length, CRC-32): decode recomputes it from what it rebuilt, so a filter that went
wrong is caught as surely as a flipped wire bit.
"""

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import trio
from isal.isal_zlib import crc32

from migpipe import chain as filters
from migpipe.chain import Buffer, FilterChain, Position
from migpipe.errors import (
    CorruptError,
    IncompatibleError,
    MigpipeError,
)
from migpipe.io import idle
from migpipe.io.channel import FdChannel, Sink, Source, as_sink, as_source, stream_sink
from migpipe.io.latency import PipeBuffer
from migpipe.keys import Secrets
from migpipe.stream.format import XBZRLE_ENCODING_FLAG
from migpipe.stream.parser import StreamParser
from migpipe.stream.records import PAGE_KIND_NAMES, Eof, Record
from migpipe.stream.writer import StreamWriter
from migpipe.tunnel.dataplane import IN_FLIGHT, run_ordered
from migpipe.tunnel.progress import Progress
from migpipe.wire import (
    FRAME_FINAL,
    FRAME_HEADER_SIZE,
    ONE_CONNECTION,
    Connections,
    Frame,
    Trailer,
    WireDecoder,
    WireWriter,
    crc_of,
)
from migpipe.wire.header import Header

FRAME_TARGET = 1 << 20  # the most QEMU bytes in one frame: fewer is slower on a fast link
MIN_FRAME = 16 << 10  # the least, unless the input goes quiet: 4 ms below 4 MB/s
QUIET = 0.002  # seconds without input after which encode sends what it has (see Encoder.flush)
END_QUIET = 0.05  # after an EOF item, how long a VM description may take to follow (two-way)

Pieces = list[memoryview]
T = TypeVar("T")


@dataclass
class Totals:
    """What crossed: the QEMU stream's size, pages and digest, the wire's size, filter time.

    Figures only, for progress and --stats-json: the counts the trailer vouches for are kept
    by WireWriter and WireDecoder, and `frames` and `digest` are copied from them at the end.
    """

    qemu_bytes: int = 0
    page_records: int = 0
    frames: int = 0
    wire_bytes: int = 0
    wire_expected: int | None = None  # when a reader knows what it will read (progress's ETA)
    digest: int = 0
    pages: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(PAGE_KIND_NAMES.values(), 0)
    )
    filter_seconds: dict[str, float] = field(default_factory=dict)
    filter_counters: dict[str, dict[str, int]] = field(default_factory=dict)
    running: Sequence[filters.RecordTransform] = ()  # page filters whose counters progress shows
    postcopy: dict | None = None  # decode --qemu: page requests timed (see twoway.PageTimer)
    trailer_sent: float = 0.0  # encode: when the trailer went out (time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_pages(self, records: list[Record]) -> None:
        pages, names = self.pages, PAGE_KIND_NAMES
        for record in records:
            name = names.get(type(record))
            if name is not None:
                pages[name] += 1
        self.page_records = sum(pages.values())

    def timed(self, name: str, function: Callable[..., T], *args: object) -> T:
        """Call a filter's `function`, adding its time to the filter's; thread-safe."""
        started = time.perf_counter()
        result = function(*args)
        seconds = time.perf_counter() - started
        with self._lock:
            self.filter_seconds[name] = self.filter_seconds.get(name, 0.0) + seconds
        return result

    def counters(self) -> dict[str, dict[str, int]]:
        """The filters' counters now, read while they run (xbzrle's hits for progress): a
        transform's figures are plain ints its thread adds to, so a read is at worst a frame
        behind; the final ones, once set, win."""
        return {**{t.name: t.counters() for t in self.running}, **self.filter_counters}

    def figures(self, seconds: float) -> dict:
        """The final figures, in QEMU's query-migrate words where they exist: what
        `--stats-json` writes, and what the service's JOB_COMPLETED carries."""
        return {
            "qemu_bytes": self.qemu_bytes,
            "wire_bytes": self.wire_bytes,
            "ratio": round(self.qemu_bytes / self.wire_bytes, 4) if self.wire_bytes else None,
            "pages": self.pages,
            "frames": self.frames,
            "qemu_digest": f"{self.digest:08x}",
            "filter_seconds": {k: round(v, 4) for k, v in self.filter_seconds.items()},
            "filters": self.filter_counters,
            "wall_seconds": round(seconds, 4),
            **({"postcopy_requests": self.postcopy} if self.postcopy else {}),
        }

    def count_parsed(self, parser: "StreamParser | ResumedStream") -> None:
        """Take the page counts of a parser that only counts its pages (pages=False)."""
        self.pages.update(parser.page_counts)
        self.page_records = sum(self.pages.values())


@dataclass
class Outgoing:
    """A frame on its way: its QEMU bytes, or the records page filters rewrote them into.

    With page filters the QEMU bytes are only checksummed (qemu_crc), at once, so that the
    chunks they were read in are freed now, not after the frame is written: the xbzrle cache
    is what bounds the memory then, and the chunks were another 7 MiB beside it.
    """

    position: Position  # from WireWriter.position()
    qemu: Pieces  # the QEMU bytes as the payload; empty when `records` is
    records: bytearray | None  # serialised filtered records
    qemu_length: int
    qemu_crc: int | None  # None: the workers compute it from `qemu`


class ResumedStream:
    """What encode knows of a resumed postcopy stream, in the StreamParser's place: nothing.

    QEMU resumes a broken postcopy migration on a new connection from where the old one left
    off, without the stream's header and in sections whose starts crossed on the old one, so
    its bytes cannot be parsed: they are framed as they come, and the stream ends when QEMU
    closes the connection, which it does once the destination said it loaded everything (its
    SHUT), so nothing needs to be held back for the trailer."""

    page_counts: dict[str, int] = {}  # noqa: RUF012 (never written: no pages are seen)
    postcopy_advised = True  # only postcopy resumes

    def __init__(self) -> None:
        self.offset = 0
        self.eof_offset: int | None = None
        self.done = False

    def feed(self, data: Buffer) -> None:
        self.offset += len(data)

    def next_records(self) -> list[Record]:
        return []

    def finish(self) -> list[Record]:
        self.eof_offset = self.offset
        return []


class Encoder:
    """QEMU stream bytes in, frames out; everything from the EOF item on goes in the FINAL frame.

    Frames end where the parser has reached, so each frame holds whole records; without page
    filters a frame's payload is its QEMU bytes, unchanged (only parsed, to check them), so the
    parser then only counts the page records instead of making them. Frames are numbered by
    `wire`, which encode writes them with. A frame holds `frame_size` QEMU bytes, which the
    I/O edge sets to a few milliseconds at the measured rate (io.latency), so that the frames
    in flight are a bounded time, not a bounded size, of the guest's pause.
    """

    frame_size = FRAME_TARGET

    def __init__(
        self,
        chain: Sequence[filters.Filter],
        page_size: int = 4096,
        totals: Totals | None = None,
        lanes: bool = False,
        resumed: bool = False,
        connections: Connections = ONE_CONNECTION,
    ) -> None:
        self.totals = totals or Totals()
        self.chain = FilterChain(chain, self.totals)
        self.wire = WireWriter(self.chain, page_size, lanes, resumed, connections)
        self._transforms = self.totals.running = self.chain.encoders()
        self._parser: StreamParser | ResumedStream
        if resumed:
            if self._transforms:
                raise ValueError("a resumed stream cannot be parsed for page filters")
            self._parser = ResumedStream()
        else:
            self._parser = StreamParser(page_size=page_size, pages=bool(self._transforms))
        self._writer = StreamWriter()
        self._pieces: Pieces = []  # QEMU bytes read, not yet in a frame
        self._pieces_start = 0  # stream offset of the first of them
        self._records = bytearray()  # page-filter mode: serialised records of the next frame
        self._final_records = bytearray()

    def feed(self, chunk: Buffer) -> list[Outgoing]:
        """The frame the stream's bytes so far complete, if any: at most one per call, so the
        caller feeds a long read in slices of frame_size."""
        self.totals.qemu_bytes += len(chunk)
        self._pieces.append(memoryview(chunk))
        self._parser.feed(chunk)
        self._take(self._parser.next_records())
        boundary = self._parser.eof_offset
        if boundary is None:
            boundary = self._parser.offset
        elif self._pieces_start < boundary:
            return [self._frame(False, boundary)]  # the last data before the EOF item
        else:
            return []  # from EOF on, everything waits for the FINAL frame
        if boundary - self._pieces_start >= self.frame_size:
            return [self._frame(False, boundary)]
        return []

    @property
    def complete(self) -> bool:
        """Whether the stream ended by its own structure: its VM description, or in postcopy its
        EOF item, came. QEMU on a socket keeps it open after that, waiting for its return path
        (the destination's SHUT), which only comes once the destination has the stream's end."""
        return self._parser.done

    @property
    def postcopy_advised(self) -> bool | None:
        """Whether QEMU may switch to postcopy-ram (None: not known yet; see StreamParser)."""
        return self._parser.postcopy_advised

    @property
    def at_eof_item(self) -> bool:
        """Whether the EOF item came and nothing after it yet (a VM description may follow)."""
        return self._parser.eof_offset is not None and self._parser.offset == self.totals.qemu_bytes

    @property
    def holding(self) -> bool:
        """Whether whole records wait for their frame to fill (flush() would send them)."""
        return self._parser.eof_offset is None and self._parser.offset > self._pieces_start

    def flush(self, keepalive: bool = False) -> list[Outgoing]:
        """The whole records read so far as a frame now, when the input went quiet (QEMU
        between two passes, throttled, or stopped for its last pass): holding them until a
        frame fills would hold them until QEMU writes again. With `keepalive`, an empty frame
        when none are held, so that decode's --idle-timeout hears from us (io.idle)."""
        if self.holding or (keepalive and self._parser.eof_offset is None):
            return [self._frame(False, self._parser.offset)]
        return []

    def finish(self) -> list[Outgoing]:
        self._take(self._parser.finish())
        eof = self._parser.eof_offset
        frames = [self._frame(False, eof)] if self._pieces_start < eof else []
        self._records = self._final_records
        frames.append(self._frame(True, self.totals.qemu_bytes))
        return frames

    def trailer(self) -> Trailer:
        """What the trailer says, once `wire` made every frame; the figures are final then."""
        for transform in self._transforms:
            self.totals.filter_counters[transform.name] = transform.counters()
        self.totals.frames, self.totals.digest = self.wire.frames, self.wire.digest
        return self.wire.summary(self.totals.qemu_bytes, self.totals.page_records)

    def _take(self, records: list[Record]) -> None:
        if not self._transforms:  # no page records: the parser counted them
            self.totals.count_parsed(self._parser)
            return
        self.totals.count_pages(records)
        records = self.chain.transform(self._transforms, records)
        at = next((i for i, r in enumerate(records) if type(r) is Eof), None)
        if at is not None:
            self._writer.write_all(self._records, records[:at])
            records = records[at:]
        target = self._final_records if self._parser.eof_offset is not None else self._records
        self._writer.write_all(target, records)

    def _frame(self, final: bool, upto: int) -> Outgoing:
        """The QEMU bytes up to stream offset `upto` (and their records) as the next frame."""
        qemu: Pieces = []
        left = upto - self._pieces_start
        while left:
            piece = self._pieces[0]
            if len(piece) <= left:
                qemu.append(self._pieces.pop(0))
                left -= len(piece)
            else:
                qemu.append(piece[:left])
                self._pieces[0] = piece[left:]
                left = 0
        length, self._pieces_start = upto - self._pieces_start, upto
        position = self.wire.position(final)
        if self._transforms:
            records, self._records = self._records, bytearray()  # handed on, not copied
            return Outgoing(position, [], records, length, crc_of(qemu))
        return Outgoing(position, qemu, None, length, None)


class Decoder:
    """Wire bytes in, QEMU stream bytes out; the FINAL part is released only by finish().

    The wire's side (frames, the chain, the trailer's totals) is `wire`'s; this adds QEMU's:
    the page filters' transforms, the records they need, and holding the stream's end back.
    Threads: feed(), close() and next_frames() by the reader; unfilter() by the workers, in
    parallel; payload() and finish() by the writer, in frame order.
    """

    def __init__(
        self,
        totals: Totals | None = None,
        secrets: Secrets | None = None,
        opened: Callable[[Header, FilterChain], None] | None = None,
    ) -> None:
        self.totals = totals or Totals()
        self.wire = WireDecoder(secrets, self.totals)
        self._opened = opened
        self._transforms: list[filters.RecordTransform] = []
        self._parser: StreamParser | None = None
        self._writer = StreamWriter()
        self._parsed = 0  # unfiltered payload bytes fed to the parser: its offsets count them
        self._held: bytes | bytearray | None = None

    def feed(self, data: bytes) -> None:
        self.wire.feed(data)

    def close(self) -> None:
        self.wire.close()

    def next_frames(self) -> list[Frame]:
        """The frames the wire so far completes, for unfilter(); the header opens the chain
        (and calls `opened`) before the first of them is handed on."""
        opening = self.wire.chain is None
        frames = self.wire.next_frames()
        if opening and self.wire.chain is not None:
            self._open(self.wire.header, self.wire.chain)
        return frames

    def _open(self, header: Header, chain: FilterChain) -> None:
        self._transforms = chain.decoders()
        if self._transforms:
            encodings = frozenset({XBZRLE_ENCODING_FLAG}).union(
                *(f.wire_encodings for f in chain.page_filters)
            )
            self._parser = StreamParser(page_size=header.page_size, xbzrle_encodings=encodings)
        if self._opened is not None:
            self._opened(header, chain)

    def unfilter(self, frame: Frame) -> tuple[Frame, int | None]:
        """Check and undo one frame (thread-safe: the workers call it, in parallel).

        Returns the frame with its QEMU bytes, and their CRC-32 when it is known here (without
        page filters); with page filters it is computed after rebuilding, in order.
        """
        data, crc = self.wire.open_frame(frame)
        if self._parser is not None:
            return replace(frame, payload=data), None
        if crc is None:
            crc = crc32(data)
        return replace(frame, payload=data), crc

    def payload(self, frame: Frame, crc: int | None) -> bytes | bytearray:
        """The QEMU bytes to write now for one frame, in frame order."""
        if self._held is not None:
            raise CorruptError("data frame after the final frame")
        data = frame.payload
        if self._parser is not None:
            records = self.wire.chain.transform(self._transforms, self._records_of(frame))
            self.totals.count_pages(records)
            data = bytearray()
            self._writer.write_all(data, records)
            crc = crc32(data)
        self.totals.qemu_bytes += len(data)
        final = frame.kind == FRAME_FINAL
        self.wire.rebuilt(len(data), crc, final)
        if final:
            if self.wire.resumed:  # its end is QEMU's closing the connection: nothing is held
                if data:
                    raise CorruptError("final frame of a resumed stream is not empty")
            elif not data.startswith(b"\x00"):
                raise CorruptError("final frame does not start with QEMU's EOF item")
            self._held = data
            return b""
        return data

    def _records_of(self, frame: Frame) -> list[Record]:
        """The records of a frame's unfiltered payload; a fault in them is reported where it
        is in the wire (in the frame's payload without byte filters, else at the frame)."""
        start, self._parsed = self._parsed, self._parsed + len(frame.payload)
        self._parser.feed(frame.payload)
        self._parser.mark_record_boundary()  # frames end between records
        try:
            return self._parser.next_records()
        except MigpipeError as e:
            within = (e.offset or 0) - start
            if self.wire.chain.byte_filters or not 0 <= within < len(frame.payload):
                where = f"{e.message} (byte {within} of frame {frame.sequence}'s records)"
                raise MigpipeError(where, frame.offset, e.status) from None
            raise MigpipeError(
                e.message, frame.offset + FRAME_HEADER_SIZE + within, e.status
            ) from None

    def finish(self) -> bytes | bytearray:
        """Check the totals against the trailer; only then release the stream's end."""
        if self._parser is not None:
            self._parser.close()
            if self._parser.next_records():
                raise CorruptError("wire ended inside a record")
        for transform in self._transforms:
            self.totals.filter_counters[transform.name] = transform.counters()
        self.totals.frames, self.totals.digest = self.wire.frames, self.wire.digest
        pages = self.totals.page_records if self._parser is not None else None
        self.wire.finish(pages)  # raises unless every check passed
        return self._held


def decode_chunks(
    chunks: Iterable[bytes], secrets: Secrets | None = None, described: dict | None = None
) -> Iterator[bytes]:
    """The QEMU stream from wire bytes, synchronously, in one thread (for inspect and tests);
    the same checks as decode, and the stream's end only after the trailer matched.
    `described` (if given) receives the header's filters and the wire's totals."""

    def opened(header: Header, chain: FilterChain) -> None:
        if described is not None:
            described["filters"] = [[name, params] for name, params in header.filters]

    decoder = Decoder(secrets=secrets, opened=opened)
    wire_bytes = 0
    for chunk in itertools.chain(chunks, [b""]):  # b"": the end
        wire_bytes += len(chunk)
        if chunk:
            decoder.feed(chunk)
        else:
            decoder.close()
        for frame in decoder.next_frames():
            yield decoder.payload(*decoder.unfilter(frame))
    yield decoder.finish()
    if described is not None:
        described.update(wire_bytes=wire_bytes, frames=decoder.totals.frames)


# -- the I/O edge -------------------------------------------------------------------------------


async def with_progress(progress: Progress | None, totals: Totals, pipeline) -> None:
    """Run the pipeline, redrawing progress beside it when asked to."""
    if progress is None:
        await pipeline()
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress.run, totals)
        await pipeline()
        nursery.cancel_scope.cancel()
    progress.finish(totals)


_scratch = threading.local()  # each worker thread's buffer for _joined


def _joined(pieces: Sequence[bytes | memoryview]) -> bytes | memoryview:
    """The pieces as one buffer for the byte filters, copied into this thread's reused buffer:
    a fresh megabyte per frame (b"".join) costs more in page faults here than the copy itself.

    The view is valid until this thread's next call: what a filter returns is kept, so a view
    (its input given back) is copied out by the caller.
    """
    if len(pieces) == 1:
        return pieces[0]
    size = sum(len(p) for p in pieces)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _scratch.buffer = memoryview(bytearray(size))
    at = 0
    for piece in pieces:
        buffer[at : at + len(piece)] = piece
        at += len(piece)
    return buffer[:size]


async def encode(
    source: int | Source,
    wire: int | Sink,
    chain: Sequence[filters.Filter],
    progress: Progress | None = None,
    before_frame: Callable[[bool], None] | None = None,
    send: Callable[[Sequence[Buffer]], None] | None = None,
    resumed: bool = False,
    connections: Connections = ONE_CONNECTION,
    advised: Callable[[bool], None] | None = None,
) -> Totals:
    """The wire of the QEMU stream from `source`. `before_frame(final)` is called in the writer
    thread before each data or FINAL frame goes out, and may stop the stream by raising:
    without the FINAL frame and the trailer no decoder ever gives QEMU the stream's end.

    With `send`, the two-way tunnel's (see tunnel.twoway): the wire is version 2, its frames
    go out through `send` beside other lanes', the stream ends by its structure (QEMU keeps
    its connection open), and the wire's writing direction is the caller's to end; `resumed`:
    the stream is QEMU's resumed postcopy stream (see ResumedStream), which ends at its end;
    `connections`, what the header says of the wire's connections (the caller's to open);
    `advised(postcopy)`, called once in the reading thread as soon as the stream tells whether
    QEMU may switch to postcopy-ram (see StreamParser.postcopy_advised)."""
    source, wire = as_source(source), as_sink(wire)
    lanes = send is not None
    send = send or wire.write
    encoder = Encoder(chain, lanes=lanes, resumed=resumed, connections=connections)
    smallest = min(MIN_FRAME, FRAME_TARGET)
    encoder.frame_size = smallest  # until the rate is known
    totals, writer, sealing = encoder.totals, encoder.wire, encoder.chain
    inbound, outbound = PipeBuffer(source), PipeBuffer(wire)
    quiet = getattr(source, "quiet", None)  # FdChannel's, serve's LoopSource's
    keepalive = idle.keepalive(wire)

    def frame(out: Outgoing) -> tuple[Position, list, int, tuple[int, int]]:
        qemu_crc = out.qemu_crc
        if qemu_crc is None:
            qemu_crc = crc_of(out.qemu)
        payload: Sequence = out.qemu if out.records is None else [out.records]
        if sealing.byte_filters:
            data = sealing.seal(_joined(payload), out.position)
            if isinstance(data, memoryview):  # a filter gave its input back: not ours to keep
                data = bytes(data)
            payload = [data]
        crc = qemu_crc if payload is out.qemu else crc_of(payload)  # the same bytes: CRC once
        return out.position, payload, crc, (out.qemu_length, qemu_crc)

    def ended() -> bool:
        if not lanes:
            return False  # over a pipe QEMU's end is the stream's: read up to it
        return encoder.complete or (encoder.at_eof_item and quiet(END_QUIET))

    def produce(submit: Callable[[Outgoing], None]) -> None:
        told = advised
        while not ended():
            if quiet is not None and encoder.holding and quiet(QUIET):
                for out in encoder.flush():
                    submit(out)
            while quiet is not None and quiet(keepalive):  # QEMU silent: the peer hears us
                for out in encoder.flush(keepalive=True):
                    submit(out)
            chunk = source.read()
            if not chunk:
                break
            if inbound.moved(len(chunk)):
                # the frames in flight together hold a buffer's time, not each of them
                in_flight = inbound.rate.budget(smallest * IN_FLIGHT, FRAME_TARGET * IN_FLIGHT)
                encoder.frame_size = in_flight // IN_FLIGHT
            view, size = memoryview(chunk), encoder.frame_size
            for at in range(0, len(chunk), size):  # a read of a slow link's QEMU: frames
                for out in encoder.feed(view[at : at + size]):
                    submit(out)
            if told is not None and encoder.postcopy_advised is not None:
                told(encoder.postcopy_advised)
                told = None
        for out in encoder.finish():
            submit(out)

    def write(item: tuple[Position, list, int, tuple[int, int]]) -> None:
        position, payload, crc, qemu = item
        if before_frame is not None:
            before_frame(position.final)
        parts = writer.frame(position, payload, crc, qemu)
        size = sum(len(p) for p in parts)
        totals.wire_bytes += size
        if position.final:
            # The trailer in the same write: the guest is paused until decode has it, and
            # ending the threads first to send it from trio cost ~5 ms on a busy machine.
            parts.append(trailer := writer.trailer(encoder.trailer()))
            totals.wire_bytes += len(trailer)
        send(parts)
        if position.final:
            totals.trailer_sent = time.monotonic()
        outbound.moved(size)
        outbound.expands(size, qemu[0], inbound.rate)  # decode makes QEMU's bytes of it again

    head = writer.header()
    await trio.to_thread.run_sync(send, [head])
    totals.wire_bytes += len(head)
    run = partial(run_ordered, produce, frame, write, interrupt=source.interrupt)
    await with_progress(progress, totals, run)
    if isinstance(wire, FdChannel) and not lanes:
        wire.finish()  # decode may release the stream's end now (a socket, a pipe)
    return totals


async def decode(
    wire: int | Source,
    sink: int | Sink,
    progress: Progress | None = None,
    secrets: Secrets | None = None,
    opened: Callable[[Sequence[filters.Filter], Connections], None] | None = None,
    take: Callable[[Frame], None] | None = None,
    resumed: bool = False,
    hold: int = 0,
) -> Totals:
    """The QEMU stream from the wire; its end only once every check passed. `opened` is
    called with the filter chain and the wire's connections once the header was read (and
    authenticated, if sealed).

    A version 2 wire may carry QEMU's other connections (lanes above 0): their frames go to
    `take`, the two-way tunnel's (see tunnel.twoway), in the reading thread. The stream's end
    is released once lane 0's trailer vouched for it, and the other lanes are read on
    until the wire ends; up to `hold` bytes of lane 0 may wait for QEMU meanwhile (QEMU 7.2's
    destination reads its main stream on only once every multifd channel reached a sync
    point, and those channels' frames may be behind lane 0's on the wire). The wire must
    resume a postcopy migration if and only if `resumed`: a resumed stream given to a QEMU
    that expects a whole one fails it in obscure ways."""
    sink = as_sink(sink)
    outbound = PipeBuffer(sink)
    with stream_sink(sink) as qemu:
        return await _decode(
            as_source(wire), qemu, outbound, progress, secrets, opened, take, resumed, hold
        )


def _no_lanes(frame: Frame) -> None:
    raise MigpipeError(
        f"the wire carries QEMU connection {frame.lane} besides its main stream: "
        "decode needs --qemu ADDR to give it to the destination QEMU",
        frame.offset,
    )


async def _decode(
    wire: Source,
    sink: Sink,
    outbound: PipeBuffer,
    progress: Progress | None,
    secrets: Secrets | None,
    opened: Callable[[Sequence[filters.Filter], Connections], None] | None,
    take: Callable[[Frame], None] | None,
    resumed: bool,
    hold: int,
) -> Totals:
    totals = Totals()

    def opening(header: Header, chain: FilterChain) -> None:
        if decoder.wire.resumed != resumed:
            said = "resumes a postcopy migration" if decoder.wire.resumed else "starts a migration"
            wanted = "a recovery" if resumed else "a migration from its start"
            raise IncompatibleError(f"the wire {said}, where {wanted} was expected", 0)
        if opened is not None:
            opened(chain.filters, decoder.wire.connections)

    decoder = Decoder(totals, secrets, opening)
    inbound = PipeBuffer(wire)
    carried: deque[int] = deque()  # each lane 0 frame's wire payload, from reader to writer
    take = take or _no_lanes

    def produce(submit: Callable[[Frame | None], None]) -> None:
        """Read the wire to its end: lane 0's frames to `submit`, and None once its trailer
        came, the other lanes' to `take`."""
        trailer_came = False
        while chunk := wire.read():
            totals.wire_bytes += len(chunk)
            inbound.moved(len(chunk))
            decoder.feed(chunk)
            for frame in decoder.next_frames():  # the chain is open before one reaches a worker
                if frame.lane:
                    take(frame)
                else:
                    carried.append(len(frame.payload))
                    submit(frame)
            if decoder.wire.trailer_came and not trailer_came:
                trailer_came = True
                submit(None)
        decoder.close()
        decoder.next_frames()  # raises unless the wire ended where it may

    def unfilter(frame: Frame | None) -> tuple[Frame | None, int | None]:
        return (None, None) if frame is None else decoder.unfilter(frame)

    def write(item: tuple[Frame | None, int | None]) -> None:
        if item[0] is None:
            # The trailer: the stream's end goes to QEMU as soon as it vouched for every
            # frame (finish raises unless every check passed), from this thread. The reader
            # reads on to the wire's end meanwhile: other lanes' bytes QEMU may wait for
            # first (its main thread waits for every multifd channel's last SYNC packet).
            sink.write([decoder.finish()])
            return
        wire_size = carried.popleft()
        if data := decoder.payload(*item):
            sink.write([data])
            outbound.moved(len(data))
            inbound.expands(wire_size, len(data), outbound.rate)

    slack = (hold, lambda frame: len(frame.payload) if frame else 0)
    run = partial(run_ordered, produce, unfilter, write, interrupt=wire.interrupt, slack=slack)
    await with_progress(progress, totals, run)
    return totals
