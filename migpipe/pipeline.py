"""encode and decode: a QEMU stream to migpipe's wire and back, as a pipeline.

The state of each direction (Encoder, Decoder) is plain synchronous code over bytes. The
pipeline around it is trio: one task reads and parses, WORKERS tasks run the byte filters in
worker threads (zstd, lz4 and the checksums release the GIL, so both cores work), one task
writes frames in order. Bounded channels between them give backpressure and bound memory to
about IN_FLIGHT frames per stage.
"""

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from migpipe import filter as filters
from migpipe.errors import EXIT_CORRUPT, EXIT_PEER_GONE, MigpipeError
from migpipe.stream.parser import StreamParser
from migpipe.stream.records import PAGE_RECORD_TYPES, Eof, Record
from migpipe.stream.writer import StreamWriter
from migpipe.wire import (
    FRAME_DATA,
    FRAME_FINAL,
    MAX_FRAME,
    Frame,
    Trailer,
    WireHeader,
    WireReader,
    encode_frame,
    encode_header,
    encode_trailer,
)

CHUNK = 1 << 20
FRAME_TARGET = 1 << 20
IN_FLIGHT = 4
WORKERS = 2


@dataclass
class Totals:
    """What crossed: the QEMU stream's size, pages, CRC-32, and the wire's size."""

    qemu_bytes: int = 0
    page_records: int = 0
    frames: int = 0
    wire_bytes: int = 0
    crc32: int = 0

    def count_pages(self, records: list[Record]) -> None:
        self.page_records += sum(1 for r in records if type(r) in PAGE_RECORD_TYPES)


def _count(totals: Totals, data: bytes | bytearray) -> None:
    totals.qemu_bytes += len(data)
    totals.crc32 = zlib.crc32(data, totals.crc32)


class Encoder:
    """QEMU stream bytes in, frame payloads out; everything from the EOF item on is FINAL.

    Without page filters the payloads are the QEMU bytes themselves (only parsed, to check
    them and find EOF); with page filters they are the filtered records, re-serialised.
    """

    def __init__(self, chain: Sequence[filters.Filter], page_size: int = 4096) -> None:
        self.totals = Totals()
        self._parser = StreamParser(page_size=page_size)
        self._transforms = [f.encoder() for f in chain if isinstance(f, filters.PageFilter)]
        self._writer = StreamWriter()
        self._raw = bytearray()  # received, not yet parsed (raw mode only)
        self._raw_start = 0  # stream offset of _raw[0]
        self._payload = bytearray()
        self._final = bytearray()
        self._in_final = False

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        _count(self.totals, chunk)
        self._parser.feed(chunk)
        if not self._transforms:
            self._raw += chunk
        self._take(self._parser.next_records())
        return self._ready(FRAME_TARGET)

    def finish(self) -> list[tuple[int, bytes]]:
        self._parser.close()
        self._take(self._parser.next_records())
        if not self._in_final:
            raise MigpipeError("QEMU stream ended without its EOF item", self.totals.qemu_bytes)
        payloads = self._ready(1)
        payloads.append((FRAME_FINAL, bytes(self._final)))
        return payloads

    def trailer(self) -> Trailer:
        t = self.totals
        return Trailer(t.qemu_bytes, t.page_records, t.frames, t.crc32)

    def _take(self, records: list[Record]) -> None:
        self.totals.count_pages(records)
        if not self._transforms:
            self._take_raw()
            return
        for transform in self._transforms:
            records = transform.transform(records)
        if not self._in_final and any(type(r) is Eof for r in records):
            at = next(i for i, r in enumerate(records) if type(r) is Eof)
            self._writer.write_all(self._payload, records[:at])
            self._in_final = True
            records = records[at:]
        self._writer.write_all(self._final if self._in_final else self._payload, records)

    def _take_raw(self) -> None:
        """Move parsed bytes to the payload, splitting at the EOF item."""
        eof = self._parser.eof_offset
        if self._in_final:
            self._final += self._raw
            self._raw.clear()
            return
        upto = (eof if eof is not None else self._parser.offset) - self._raw_start
        self._payload += self._raw[:upto]
        del self._raw[:upto]
        self._raw_start += upto
        if eof is not None:
            self._in_final = True
            self._final += self._raw
            self._raw.clear()

    def _ready(self, minimum: int) -> list[tuple[int, bytes]]:
        if len(self._payload) < minimum:
            return []
        payload = bytes(self._payload)
        self._payload.clear()
        return [(FRAME_DATA, payload)]


class Decoder:
    """Frame payloads in, QEMU stream bytes out; the FINAL part is released only by finish()."""

    def __init__(self, header: WireHeader) -> None:
        chain = [filters.create(name, params) for name, params in header.filters]
        filters.check_order(chain)
        self.byte_filters = [f for f in chain if isinstance(f, filters.ByteFilter)]
        self._transforms = [f.decoder() for f in chain if isinstance(f, filters.PageFilter)]
        self._transforms.reverse()
        self._parser = StreamParser(page_size=header.page_size) if self._transforms else None
        self._writer = StreamWriter()
        self._held: bytes | None = None
        self.totals = Totals()

    def unfilter(self, data: bytes) -> bytes:
        """Undo the byte filters (thread-safe: called from the worker threads)."""
        for byte_filter in reversed(self.byte_filters):
            data = byte_filter.decode(data, MAX_FRAME)
        return data

    def payload(self, kind: int, payload: bytes) -> bytes:
        """The QEMU bytes to write now for one frame, in frame order."""
        if self._held is not None:
            raise MigpipeError("data frame after the final frame", status=EXIT_CORRUPT)
        self.totals.frames += 1
        if self._parser is not None:
            self._parser.feed(payload)
            records = self._parser.next_records()
            for transform in self._transforms:
                records = transform.transform(records)
            self.totals.count_pages(records)
            out = bytearray()
            self._writer.write_all(out, records)
            payload = bytes(out)
        _count(self.totals, payload)
        if kind == FRAME_FINAL:
            if not payload.startswith(b"\x00"):
                raise MigpipeError(
                    "final frame does not start with QEMU's EOF item", status=EXIT_CORRUPT
                )
            self._held = payload
            return b""
        return payload

    def finish(self, trailer: Trailer) -> bytes:
        """Check the totals against the trailer; only then release the stream's end."""
        if self._parser is not None:
            self._parser.close()
            self._parser.next_records()
        t = self.totals
        problems = []
        if self._held is None:
            problems.append("no final frame")
        if (t.qemu_bytes, t.crc32) != (trailer.qemu_bytes, trailer.qemu_crc32):
            problems.append(
                f"rebuilt {t.qemu_bytes} bytes with CRC-32 {t.crc32:08x}, the encoder read "
                f"{trailer.qemu_bytes} with {trailer.qemu_crc32:08x}"
            )
        if t.frames != trailer.data_frames:
            problems.append(f"{t.frames} data frames, the encoder sent {trailer.data_frames}")
        if self._parser is not None and t.page_records != trailer.page_records:
            problems.append(f"{t.page_records} pages, the encoder read {trailer.page_records}")
        if problems:
            raise MigpipeError(
                "wire totals do not match: " + "; ".join(problems), status=EXIT_CORRUPT
            )
        return self._held


# -- the I/O edge -------------------------------------------------------------------------------


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, CHUNK)
    except ConnectionResetError as e:
        raise MigpipeError(
            f"input connection reset ({e.strerror})", status=EXIT_PEER_GONE
        ) from None


def _write(fd: int, *parts: bytes | bytearray) -> None:
    try:
        for part in parts:
            with memoryview(part) as view:
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
    except (BrokenPipeError, ConnectionResetError):
        raise MigpipeError(
            "output closed by the reader (broken pipe)", status=EXIT_PEER_GONE
        ) from None


async def _ordered(produce, work, write) -> None:
    """Run producer -> WORKERS parallel workers -> in-order writer, with bounded channels."""
    work_send, work_recv = trio.open_memory_channel(IN_FLIGHT)
    order_send, order_recv = trio.open_memory_channel(IN_FLIGHT)

    async def submit(item: object) -> None:
        done_send, done_recv = trio.open_memory_channel(1)
        await order_send.send(done_recv)
        await work_send.send((item, done_send))

    async def worker(recv: trio.MemoryReceiveChannel) -> None:
        async with recv:
            async for item, done in recv:
                await done.send(await trio.to_thread.run_sync(work, item))

    async def writer() -> None:
        async with order_recv:
            async for done in order_recv:
                await write(await done.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        async with work_recv:
            for _ in range(WORKERS):
                nursery.start_soon(worker, work_recv.clone())
        async with work_send, order_send:
            await produce(submit)


async def encode(in_fd: int, out_fd: int, chain: Sequence[filters.Filter]) -> Totals:
    encoder = Encoder(chain)
    byte_filters = [f for f in chain if isinstance(f, filters.ByteFilter)]
    header = WireHeader(tuple((f.name, f.params()) for f in chain))
    sequence = 0

    def read_and_parse() -> tuple[list[tuple[int, bytes]], bool]:
        chunk = _read(in_fd)
        return (encoder.feed(chunk), False) if chunk else (encoder.finish(), True)

    def frame(item: tuple[int, int, bytes]) -> tuple[bytes, bytes]:
        kind, seq, payload = item
        for byte_filter in byte_filters:
            payload = byte_filter.encode(payload)
        return encode_frame(kind, seq, payload), payload

    async def produce(submit) -> None:
        nonlocal sequence
        head = encode_header(header)
        encoder.totals.wire_bytes += len(head)
        await trio.to_thread.run_sync(_write, out_fd, head)
        finished = False
        while not finished:
            payloads, finished = await trio.to_thread.run_sync(read_and_parse)
            for kind, payload in payloads:
                await submit((kind, sequence, payload))
                sequence += 1
                encoder.totals.frames += 1

    async def write(parts: tuple[bytes, bytes]) -> None:
        encoder.totals.wire_bytes += len(parts[0]) + len(parts[1])
        await trio.to_thread.run_sync(_write, out_fd, *parts)

    await _ordered(produce, frame, write)
    trailer = encode_trailer(sequence, encoder.trailer())
    await trio.to_thread.run_sync(_write, out_fd, trailer)
    encoder.totals.wire_bytes += len(trailer)
    return encoder.totals


async def decode(in_fd: int, out_fd: int) -> Totals:
    reader = WireReader()
    decoder: Decoder | None = None
    trailer: Trailer | None = None
    wire_bytes = 0

    def read_frames() -> tuple[list, bool]:
        nonlocal wire_bytes
        chunk = _read(in_fd)
        wire_bytes += len(chunk)
        if chunk:
            reader.feed(chunk)
        else:
            reader.close()
        return reader.next_events(), not chunk

    def unfilter(frame: Frame) -> tuple[int, bytes]:
        return frame.kind, decoder.unfilter(frame.payload)

    async def produce(submit) -> None:
        nonlocal decoder, trailer
        finished = False
        while not finished:
            events, finished = await trio.to_thread.run_sync(read_frames)
            for event in events:
                if isinstance(event, WireHeader):
                    decoder = Decoder(event)
                elif isinstance(event, Frame):
                    await submit(event)
                else:
                    trailer = event

    async def write(item: tuple[int, bytes]) -> None:
        data = decoder.payload(*item)
        if data:
            await trio.to_thread.run_sync(_write, out_fd, data)

    await _ordered(produce, unfilter, write)
    final = decoder.finish(trailer)  # raises unless every check passed
    await trio.to_thread.run_sync(_write, out_fd, final)
    decoder.totals.wire_bytes = wire_bytes
    return decoder.totals
