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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import trio
from isal.isal_zlib import crc32

from migpipe import chain as filters
from migpipe.chain import Position
from migpipe.errors import EXIT_CORRUPT, EXIT_TRUNCATED, MigpipeError
from migpipe.io.channel import Channel, as_channel, stream_sink
from migpipe.keys import Secrets
from migpipe.stream.format import BE32, BE64, XBZRLE_ENCODING_FLAG
from migpipe.stream.parser import StreamParser
from migpipe.stream.records import PAGE_KIND_NAMES, Eof, Record
from migpipe.stream.writer import StreamWriter
from migpipe.tunnel.dataplane import run_ordered
from migpipe.tunnel.progress import Progress
from migpipe.wire import (
    FRAME_DATA,
    FRAME_FINAL,
    FRAME_HEADER_SIZE,
    MAX_FRAME,
    Frame,
    Trailer,
    WireReader,
    crc_of,
    encode_frame,
    encode_header,
    encode_trailer,
)
from migpipe.wire.header import Header, open_chain

FRAME_TARGET = 1 << 20

Pieces = list[memoryview]
T = TypeVar("T")


@dataclass
class Totals:
    """What crossed: the QEMU stream's size, pages and digest, the wire's size, filter time."""

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
        }

    def count_parsed(self, parser: StreamParser) -> None:
        """Take the page counts of a parser that only counts its pages (pages=False)."""
        self.pages.update(parser.page_counts)
        self.page_records = sum(self.pages.values())

    def trailer(self) -> Trailer:
        return Trailer(self.qemu_bytes, self.page_records, self.frames, self.digest)

    def count_frame(self, qemu_length: int, crc: int, wire_length: int) -> int:
        """Count a data or final frame sent (its QEMU bytes' length and CRC-32, its size on
        the wire); returns its sequence number."""
        self.frames += 1
        self.chain(qemu_length, crc)
        self.wire_bytes += wire_length
        return self.frames - 1

    def chain(self, length: int, crc: int) -> None:
        """Fold one frame's QEMU bytes (their length and CRC-32) into the stream digest."""
        self.digest = crc32(BE64.pack(length) + BE32.pack(crc), self.digest)


@dataclass
class Outgoing:
    """A frame on its way: its QEMU bytes, or the records page filters rewrote them into.

    With page filters the QEMU bytes are only checksummed (qemu_crc), at once, so that the
    chunks they were read in are freed now, not after the frame is written: the xbzrle cache
    is what bounds the memory then, and the chunks were another 7 MiB beside it.
    """

    kind: int
    sequence: int
    qemu: Pieces  # the QEMU bytes as the payload; empty when `records` is
    records: bytearray | None  # serialised filtered records
    qemu_length: int
    qemu_crc: int | None  # None: the workers compute it from `qemu`


def finish_parsing(parser: StreamParser, length: int) -> list[Record]:
    """The last records of a stream of `length` bytes, or the error of one that ended early."""
    parser.close()
    records = parser.next_records()
    if parser.eof_offset is None:
        raise MigpipeError("QEMU stream ended without its EOF item", length)
    return records


class Encoder:
    """QEMU stream bytes in, frames out; everything from the EOF item on goes in the FINAL frame.

    Frames end where the parser has reached, so each frame holds whole records; without page
    filters a frame's payload is its QEMU bytes, unchanged (only parsed, to check them), so the
    parser then only counts the page records instead of making them.
    """

    def __init__(
        self, chain: Sequence[filters.Filter], page_size: int = 4096, totals: Totals | None = None
    ) -> None:
        self.totals = totals or Totals()
        self._transforms = [f.encoder() for f in chain if isinstance(f, filters.PageFilter)]
        self._parser = StreamParser(page_size=page_size, pages=bool(self._transforms))
        self._writer = StreamWriter()
        self._pieces: Pieces = []  # QEMU bytes read, not yet in a frame
        self._pieces_start = 0  # stream offset of the first of them
        self._records = bytearray()  # page-filter mode: serialised records of the next frame
        self._final_records = bytearray()
        self._sequence = 0

    def feed(self, chunk: bytes) -> list[Outgoing]:
        self.totals.qemu_bytes += len(chunk)
        self._pieces.append(memoryview(chunk))
        self._parser.feed(chunk)
        self._take(self._parser.next_records())
        boundary = self._parser.eof_offset
        if boundary is None:
            boundary = self._parser.offset
        elif self._pieces_start < boundary:
            return [self._frame(FRAME_DATA, boundary)]  # the last data before the EOF item
        else:
            return []  # from EOF on, everything waits for the FINAL frame
        if boundary - self._pieces_start >= FRAME_TARGET:
            return [self._frame(FRAME_DATA, boundary)]
        return []

    def finish(self) -> list[Outgoing]:
        self._take(finish_parsing(self._parser, self.totals.qemu_bytes))
        eof = self._parser.eof_offset
        frames = [self._frame(FRAME_DATA, eof)] if self._pieces_start < eof else []
        self._records = self._final_records
        frames.append(self._frame(FRAME_FINAL, self.totals.qemu_bytes))
        return frames

    def trailer(self) -> Trailer:
        for transform in self._transforms:
            self.totals.filter_counters[transform.name] = transform.counters()
        return self.totals.trailer()

    def _take(self, records: list[Record]) -> None:
        if not self._transforms:  # no page records: the parser counted them
            self.totals.count_parsed(self._parser)
            return
        self.totals.count_pages(records)
        for transform in self._transforms:
            records = self.totals.timed(transform.name, transform.transform, records)
        at = next((i for i, r in enumerate(records) if type(r) is Eof), None)
        if at is not None:
            self._writer.write_all(self._records, records[:at])
            records = records[at:]
        target = self._final_records if self._parser.eof_offset is not None else self._records
        self._writer.write_all(target, records)

    def _frame(self, kind: int, upto: int) -> Outgoing:
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
        if self._transforms:
            records, self._records = self._records, bytearray()  # handed on, not copied
            frame = Outgoing(kind, self._sequence, [], records, length, crc_of(qemu))
        else:
            frame = Outgoing(kind, self._sequence, qemu, None, length, None)
        self._sequence += 1
        return frame


class Decoder:
    """Frame payloads in, QEMU stream bytes out; the FINAL part is released only by finish()."""

    def __init__(
        self, header: Header, totals: Totals | None = None, secrets: Secrets | None = None
    ) -> None:
        self.chain = chain = open_chain(header, secrets)
        self.byte_filters = [f for f in chain if isinstance(f, filters.ByteFilter)]
        self._transforms = [f.decoder() for f in chain if isinstance(f, filters.PageFilter)]
        self._transforms.reverse()
        self._parser = None
        if self._transforms:
            encodings = frozenset({XBZRLE_ENCODING_FLAG}).union(
                *(f.wire_encodings for f in chain if isinstance(f, filters.PageFilter))
            )
            self._parser = StreamParser(page_size=header.page_size, xbzrle_encodings=encodings)
        self._writer = StreamWriter()
        self._parsed = 0  # unfiltered payload bytes fed to the parser: its offsets count them
        self._held: bytes | bytearray | None = None
        self.totals = totals or Totals()

    def unfilter(self, frame: Frame) -> tuple[Frame, int | None]:
        """Check and undo one frame (thread-safe: the workers call it, in parallel).

        Returns the frame with its QEMU bytes, and their CRC-32 when it is known here (without
        page filters); with page filters it is computed after rebuilding, in order.
        """
        crc = frame.verified()
        data = frame.payload
        position = Position(frame.sequence, frame.kind == FRAME_FINAL)
        for byte_filter in reversed(self.byte_filters):
            data = self.totals.timed(
                byte_filter.name, byte_filter.decode, data, MAX_FRAME, position
            )
        if self._parser is not None:
            return replace(frame, payload=data), None
        if self.byte_filters:
            crc = crc32(data)
        return replace(frame, payload=data), crc

    def payload(self, frame: Frame, crc: int | None) -> bytes | bytearray:
        """The QEMU bytes to write now for one frame, in frame order."""
        if self._held is not None:
            raise MigpipeError("data frame after the final frame", status=EXIT_CORRUPT)
        data = frame.payload
        if self._parser is not None:
            records = self._records_of(frame)
            for transform in self._transforms:
                records = self.totals.timed(transform.name, transform.transform, records)
            self.totals.count_pages(records)
            data = bytearray()
            self._writer.write_all(data, records)
            crc = crc32(data)
        self.totals.frames += 1
        self.totals.qemu_bytes += len(data)
        self.totals.chain(len(data), crc)
        if frame.kind == FRAME_FINAL:
            if not data.startswith(b"\x00"):
                raise MigpipeError(
                    "final frame does not start with QEMU's EOF item", status=EXIT_CORRUPT
                )
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
            if self.byte_filters or not 0 <= within < len(frame.payload):
                where = f"{e.message} (byte {within} of frame {frame.sequence}'s records)"
                raise MigpipeError(where, frame.offset, e.status) from None
            raise MigpipeError(e.message, frame.offset + FRAME_HEADER_SIZE + within,
                               e.status) from None  # fmt: skip

    def finish(self, trailer: Trailer | None) -> bytes | bytearray:
        """Check the totals against the trailer; only then release the stream's end."""
        if trailer is None:
            raise MigpipeError("wire ended without a trailer", status=EXIT_CORRUPT)
        if self._parser is not None:
            self._parser.close()
            if self._parser.next_records():
                raise MigpipeError("wire ended inside a record", status=EXIT_CORRUPT)
        for transform in self._transforms:
            self.totals.filter_counters[transform.name] = transform.counters()
        t = self.totals
        problems = []
        if self._held is None:
            problems.append("no final frame")
        if (t.qemu_bytes, t.digest) != (trailer.qemu_bytes, trailer.qemu_digest):
            problems.append(
                f"rebuilt {t.qemu_bytes} bytes with digest {t.digest:08x}, the encoder read "
                f"{trailer.qemu_bytes} with {trailer.qemu_digest:08x}"
            )
        if t.frames != trailer.data_frames:
            problems.append(f"{t.frames} data frames, the encoder sent {trailer.data_frames}")
        if self._parser is not None and t.page_records != trailer.page_records:
            problems.append(f"{t.page_records} pages, the encoder read {trailer.page_records}")
        if problems:
            message = "wire totals do not match: " + "; ".join(problems)
            raise MigpipeError(message, status=EXIT_CORRUPT)
        return self._held


def decode_chunks(
    chunks: Iterable[bytes], secrets: Secrets | None = None, described: dict | None = None
) -> Iterator[bytes]:
    """The QEMU stream from wire bytes, synchronously, in one thread (for inspect and tests);
    the same checks as decode, and the stream's end only after the trailer matched.
    `described` (if given) receives the header's filters and the wire's totals."""
    reader, decoder, trailer = WireReader(), None, None
    wire_bytes = 0
    for chunk in itertools.chain(chunks, [b""]):  # b"": the end
        wire_bytes += len(chunk)
        if chunk:
            reader.feed(chunk)
        else:
            reader.close()
        for event in reader.next_events():
            if isinstance(event, Header):
                decoder = Decoder(event, secrets=secrets)
                if described is not None:
                    described["filters"] = [[name, params] for name, params in event.filters]
            elif isinstance(event, Frame):
                yield decoder.payload(*decoder.unfilter(event))
            else:
                trailer = event
    if decoder is None:
        raise MigpipeError("wire ended before its header", status=EXIT_TRUNCATED)
    yield decoder.finish(trailer)
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
    source: int | Channel,
    wire: int | Channel,
    chain: Sequence[filters.Filter],
    progress: Progress | None = None,
    before_frame: Callable[[bool], None] | None = None,
) -> Totals:
    """The wire of the QEMU stream from `source`. `before_frame(final)` is called in the writer
    thread before each data or FINAL frame goes out, and may stop the stream by raising:
    without the FINAL frame and the trailer no decoder ever gives QEMU the stream's end."""
    source, wire = as_channel(source), as_channel(wire)
    encoder = Encoder(chain)
    totals = encoder.totals
    byte_filters = [f for f in chain if isinstance(f, filters.ByteFilter)]

    def frame(out: Outgoing) -> tuple[list, int, int, bool]:
        qemu_length, qemu_crc = out.qemu_length, out.qemu_crc
        if qemu_crc is None:
            qemu_crc = crc_of(out.qemu)
        payload: Sequence = out.qemu if out.records is None else [out.records]
        payload_crc = qemu_crc if out.records is None else None  # the same bytes: CRC once
        if byte_filters:
            data = _joined(payload)
            position = Position(out.sequence, out.kind == FRAME_FINAL)
            for byte_filter in byte_filters:
                data = totals.timed(byte_filter.name, byte_filter.encode, data, position)
            if isinstance(data, memoryview):  # a filter gave its input back: not ours to keep
                data = bytes(data)
            payload, payload_crc = [data], None
        head = encode_frame(out.kind, out.sequence, payload, payload_crc)
        return [head, *payload], qemu_length, qemu_crc, out.kind == FRAME_FINAL

    head = encode_header(chain)

    def produce(submit: Callable[[Outgoing], None]) -> None:
        while chunk := source.read():
            for out in encoder.feed(chunk):
                submit(out)
        for out in encoder.finish():
            submit(out)

    def write(item: tuple[list, int, int, bool]) -> None:
        parts, qemu_length, qemu_crc, final = item
        if before_frame is not None:
            before_frame(final)
        totals.count_frame(qemu_length, qemu_crc, sum(len(p) for p in parts))
        wire.write(parts)

    await trio.to_thread.run_sync(wire.write, [head])
    totals.wire_bytes += len(head)
    run = partial(run_ordered, produce, frame, write, interrupt=source.interrupt)
    await with_progress(progress, totals, run)
    trailer = encode_trailer(totals.frames, encoder.trailer())
    await trio.to_thread.run_sync(wire.write, [trailer])
    totals.wire_bytes += len(trailer)
    return totals


async def decode(
    wire: int | Channel,
    sink: int | Channel,
    progress: Progress | None = None,
    secrets: Secrets | None = None,
    opened: Callable[[Sequence[filters.Filter]], None] | None = None,
) -> Totals:
    """The QEMU stream from the wire; its end only once every check passed. `opened` is
    called with the filter chain once the header was read (and authenticated, if sealed)."""
    with stream_sink(sink) as qemu:
        return await _decode(as_channel(wire), qemu, progress, secrets, opened)


async def _decode(
    wire: Channel,
    sink: Channel,
    progress: Progress | None,
    secrets: Secrets | None,
    opened: Callable[[Sequence[filters.Filter]], None] | None,
) -> Totals:
    reader = WireReader()
    decoder: Decoder | None = None
    totals = Totals()  # until the header names the filters; then the decoder's
    trailer: Trailer | None = None

    def produce(submit: Callable[[Frame], None]) -> None:
        nonlocal decoder, trailer
        finished = False
        while not finished:
            chunk = wire.read()
            totals.wire_bytes += len(chunk)
            if chunk:
                reader.feed(chunk)
            else:
                reader.close()
                finished = True
            for event in reader.next_events():
                if isinstance(event, Header):
                    decoder = Decoder(event, totals, secrets)  # before any frame reaches a worker
                    if opened is not None:
                        opened(decoder.chain)
                elif isinstance(event, Frame):
                    submit(event)
                else:
                    trailer = event

    def unfilter(frame: Frame) -> tuple[Frame, int | None]:
        return decoder.unfilter(frame)

    def write(item: tuple[Frame, int | None]) -> None:
        if data := decoder.payload(*item):
            sink.write([data])

    run = partial(run_ordered, produce, unfilter, write, interrupt=wire.interrupt)
    await with_progress(progress, totals, run)
    if decoder is None:
        raise MigpipeError("wire ended before its header", status=EXIT_TRUNCATED)
    final = decoder.finish(trailer)  # raises unless every check passed
    await trio.to_thread.run_sync(sink.write, [final])
    return totals
