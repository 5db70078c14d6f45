"""A sans-IO parser and writer for one QEMU multifd channel (migpipe-stream(5), MULTIFD CHANNELS).

With the `multifd` capability QEMU sends RAM pages over N connections beside the main stream.
Each one starts with a 64-byte initial message (the source's uuid, the channel's id) and then
carries packets: RAM packets (a header naming one RAM block and up to 128 page offsets, then the
pages, or one compressed chunk when a compression flag is set) and, from QEMU 10.0, device-state
packets (a device's idstr and instance id, then an opaque buffer). The layout is the same from
7.2 to 10.x: 7.2's reserved words hold zero where 9.0 put `zero_pages`.

Feed the parser bytes split anywhere and ask it for the records they complete; pages come out as
memoryview slices of the fed bytes, copied only when a packet straddles two chunks. A channel
has no end marker of its own (QEMU closes the connection): finish() only says the input did not
stop inside a record, and the main stream's sync points say whether every packet arrived.

The writer gives back every byte a record was parsed from, including what QEMU leaves in the
fields it does not fill: 7.2 reuses one buffer per channel, so a packet's unused offset slots
(and a SYNC packet's block name) still hold the previous packet's values.
"""

import enum
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from migpipe.errors import (
    CorruptError,
    IncompatibleError,
    MigpipeError,
    TruncatedError,
    printable,
    quoted,
)
from migpipe.stream import format as fmt
from migpipe.stream.parser import MAX_RAM_TOTAL, _is_idstr, is_page_size

MAGIC = 0x11223344  # MULTIFD_MAGIC: the initial message's and every packet's
VERSION = 1  # MULTIFD_VERSION: QEMU's receivers take no other
PACKET_BYTES = 512 << 10  # MULTIFD_PACKET_SIZE: the pages one RAM packet may carry, in bytes

FLAG_SYNC = 0x01
COMPRESSION_MASK = 0x1F << 1
FLAG_DEVICE_STATE = 0x40  # 10.0+: a device-state packet, not a RAM packet
COMPRESSIONS = {
    0x00: "none",
    0x02: "zlib",
    0x04: "zstd",
    0x08: "qpl",  # 9.1+
    0x10: "uadk",  # 9.1+
    0x20: "qatzip",  # 9.2+
}
KNOWN_FLAGS = FLAG_SYNC | COMPRESSION_MASK | FLAG_DEVICE_STATE

MAX_COMPRESSED = 2 * PACKET_BYTES
"""The largest compressed chunk a RAM packet may carry: QEMU's receivers read it into a buffer
of twice the packet's pages (zlib, zstd, qatzip) and refuse more."""
MAX_DEVICE_STATE = 16 << 20
"""The largest device-state buffer taken. QEMU 10.0 allocates whatever the packet says; its one
sender, VFIO, sends buffers of at most 1 MiB (its data_buffer_size) and a small config blob."""

INIT_SIZE = 64
HEADER_SIZE = 12  # magic, version, flags: read first, they say which packet follows
RAM_FIXED_SIZE = 320  # a RAM packet's header before its offset array
DEVICE_STATE_SIZE = 276
NAME_SIZE = 256
RESERVED_SIZE = 28  # unused32[1] + unused64[3] (7.2: unused[4] less the zero_pages word)
INIT_UNUSED_SIZE = 39  # unused1[7] + unused2[4]

_BE32, _BE64 = fmt.BE32, fmt.BE64
_INIT = struct.Struct(">II16sB39s")
_HEADER = struct.Struct(">III")
_RAM = struct.Struct(f">IIIIIIQI{RESERVED_SIZE}s{NAME_SIZE}s")
_DEVICE = struct.Struct(f">III{NAME_SIZE}sII")


class ChannelKind(enum.Enum):
    """What a connection to a migration destination carries, by its first 4 bytes."""

    MAIN = "main"  # the QEMU stream ("QEVM")
    MULTIFD = "multifd"  # a multifd channel's initial message
    OTHER = "other"  # neither: postcopy-preempt's channel starts with a page record, no magic


def classify(first_bytes: bytes) -> ChannelKind:
    """The kind of connection whose first bytes are `first_bytes` (at least 4 of them).

    A postcopy-preempt channel starts with a page record's be64 word, whose top 4 bytes are the
    high half of a page offset: neither magic is one below 2^62 bytes of RAM.
    """
    if len(first_bytes) < 4:
        raise ValueError("classify() needs a connection's first 4 bytes")
    (magic,) = _BE32.unpack_from(first_bytes)
    if magic == fmt.MAGIC:
        return ChannelKind.MAIN
    if magic == MAGIC:
        return ChannelKind.MULTIFD
    return ChannelKind.OTHER


class ChannelHello(NamedTuple):
    """The initial message: which migration (the source's -uuid, checked by the destination)
    and which channel (its id, from 0) this connection is."""

    uuid: bytes
    channel: int
    unused: bytes = b""  # the 39 reserved bytes, kept only when QEMU left any non-zero


class RamPacket(NamedTuple):
    """One RAM packet: pages of one RAM block.

    `payload` is the `normal` pages in order (page_size bytes each) when the compression bits
    are 0, else one chunk of the channel's compressor, which keeps its state from packet to
    packet (zlib, zstd): it decompresses only in order, on this channel. `zero` pages carry no
    bytes (9.0+). A SYNC packet pairs with a sync point of the main stream (MULTIFD_FLUSH, or
    EOS before 8.1) and has no pages from 9.0 on.
    """

    flags: int
    packet_num: int  # QEMU's counter across all channels
    block: str  # the RAM block's idstr; "" (or the last one's, on 7.2) with no pages
    normal: tuple[int, ...]  # byte offsets in the block of the pages in payload
    zero: tuple[int, ...] = ()
    payload: bytes | memoryview = b""
    pages_alloc: int = 128  # the sender's slots; 0 in 9.0+'s SYNC packets
    next_packet_size: int = 0  # payload bytes; QEMU 7.2 leaves the last one in empty packets
    spare: bytes = b""  # the unused offset slots, kept only when not all zero
    reserved: bytes = b""  # bytes 36-63, kept only when not all zero

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def compression(self) -> str:
        return COMPRESSIONS[self.flags & COMPRESSION_MASK]


class DeviceStatePacket(NamedTuple):
    """One buffer of a device's state sent on a multifd channel (QEMU 10.0+, VFIO): opaque."""

    idstr: str
    instance_id: int
    payload: bytes | memoryview
    flags: int = FLAG_DEVICE_STATE


ChannelRecord = ChannelHello | RamPacket | DeviceStatePacket


def _c_string(field: bytes) -> str | None:
    """A NUL-terminated name padded with NULs, as QEMU fills a 256-byte name; None if not."""
    end = field.find(0)
    if end < 0 or field.count(0, end) != len(field) - end:
        return None
    return str(field[:end], "latin-1")


def _kept(raw: bytes | memoryview) -> bytes:
    """Bytes QEMU leaves unfilled: b"" when all zero (so records built by hand compare equal),
    else a copy of them."""
    raw = bytes(raw)
    return raw if raw.count(0) != len(raw) else b""


class MultifdParser:
    """Turns one multifd channel's bytes into records (see the module's docstring)."""

    def __init__(self, *, page_size: int = fmt.DEFAULT_PAGE_SIZE) -> None:
        if not is_page_size(page_size):
            raise IncompatibleError(f"target page size {quoted(page_size)} is not one of QEMU's")
        self._page_size = page_size
        self._slots = PACKET_BYTES // page_size
        self._ram_size = RAM_FIXED_SIZE + 8 * self._slots
        self._buf = memoryview(b"")  # of immutable bytes: records hold slices of it
        self._pos = 0
        self._base = 0  # channel offset of _buf[0]
        self._pending: deque[memoryview] = deque()  # fed, after _buf
        self._pending_size = 0
        self._need = INIT_SIZE  # bytes from _pos the next step needs
        self._step = self._step_hello
        self._packet: RamPacket | DeviceStatePacket | None = None  # waiting for its payload
        self._at = 0  # where the record being read starts
        self._closed = False
        self.name = "multifd channel"  # "multifd channel N" once the initial message says N

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data`; bytes are kept as they are, anything else is copied."""
        if self._closed:
            raise MigpipeError("data fed to the multifd parser after the input was closed")
        if data:
            chunk = memoryview(data if type(data) is bytes else bytes(data)).cast("B")
            self._pending.append(chunk)
            self._pending_size += len(chunk)

    def close(self) -> None:
        """Declare the end of the channel; one cut inside a record raises on next_records()."""
        self._closed = True

    def finish(self) -> list[ChannelRecord]:
        """close(), then the last records: raises if the channel ended inside a record."""
        self.close()
        return self.next_records()

    def next_records(self) -> list[ChannelRecord]:
        """Every record the bytes fed so far complete (an empty list means: feed more)."""
        out: list[ChannelRecord] = []
        while True:
            if len(self._buf) - self._pos < self._need:
                if len(self._buf) - self._pos + self._pending_size < self._need:
                    break
                self._join()
            self._step(out)
        held = len(self._buf) - self._pos + self._pending_size
        if self._closed and (held or self._step != self._step_header):
            what = "its initial message" if self._step == self._step_hello else "a packet"
            raise TruncatedError(f"{self.name} ended in {what}", self._base + self._at)
        return out

    def _join(self) -> None:
        """Make _buf start at the first unparsed byte and hold the _need bytes the next step
        reads (they have been fed). A fed chunk that holds them becomes _buf as it is; only a
        record cut by the end of a chunk is copied, with just enough of the chunks after it."""
        rest, need, pending = self._buf[self._pos :], self._need, self._pending
        self._base += self._pos
        self._at -= self._pos
        self._pos = 0
        if not rest:
            rest = pending.popleft()
            self._pending_size -= len(rest)
        parts, have = [rest], len(rest)
        while have < need:
            chunk = pending[0]
            take = min(len(chunk), need - have)
            parts.append(chunk[:take])
            have += take
            if take == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[take:]
            self._pending_size -= take
        self._buf = rest if len(parts) == 1 else memoryview(b"".join(parts))

    def _fail(self, error: type[MigpipeError], message: str, at: int) -> None:
        raise error(f"{self.name}: {message}", self._base + at)

    # -- steps: each reads self._need bytes at self._pos -------------------------------------

    def _step_hello(self, out: list[ChannelRecord]) -> None:
        buf, pos = self._buf, self._pos
        magic, version, uuid, channel, unused = _INIT.unpack_from(buf, pos)
        if magic != MAGIC:
            if magic == fmt.MAGIC:
                self._fail(MigpipeError, "a QEMU main stream, not a multifd channel", pos)
            shown = printable(buf[pos : pos + 4])
            self._fail(MigpipeError, f"not a multifd channel: bad magic {shown}", pos)
        if version != VERSION:
            self._fail(IncompatibleError, f"multifd version {version} (only 1 exists)", pos + 4)
        self.name = f"multifd channel {channel}"
        out.append(ChannelHello(uuid, channel, _kept(unused)))
        self._pos = self._at = pos + INIT_SIZE
        self._expect(HEADER_SIZE, self._step_header)

    def _expect(self, need: int, step: Callable[[list[ChannelRecord]], None]) -> None:
        self._need, self._step = need, step

    def _step_header(self, out: list[ChannelRecord]) -> None:
        pos = self._pos
        magic, version, flags = _HEADER.unpack_from(self._buf, pos)
        if magic != MAGIC:
            self._fail(CorruptError, f"bad packet magic 0x{magic:08x}", pos)
        if version != VERSION:
            self._fail(IncompatibleError, f"packet version {version} (only 1 exists)", pos + 4)
        if flags & ~KNOWN_FLAGS or (flags & COMPRESSION_MASK) not in COMPRESSIONS:
            self._fail(IncompatibleError, f"unknown packet flags 0x{flags:x}", pos + 8)
        if flags & FLAG_DEVICE_STATE:
            if flags != FLAG_DEVICE_STATE:
                why = f"device-state packet with flags 0x{flags:x} (SYNC or compression)"
                self._fail(CorruptError, why, pos + 8)
            self._expect(DEVICE_STATE_SIZE, self._step_device_state)
        else:
            self._expect(self._ram_size, self._step_ram)

    def _step_ram(self, out: list[ChannelRecord]) -> None:
        buf, pos = self._buf, self._pos
        fields = _RAM.unpack_from(buf, pos)
        flags, pages_alloc, normal_count, next_size, packet_num, zero_count = fields[2:8]
        reserved, name_field = fields[8:]
        if pages_alloc > self._slots:
            why = f"pages_alloc {pages_alloc} above the {self._slots} pages a packet holds"
            self._fail(CorruptError, why, pos + 12)
        if normal_count > pages_alloc:
            why = f"{normal_count} normal pages in a packet of {pages_alloc}"
            self._fail(CorruptError, why, pos + 16)
        if zero_count > pages_alloc - normal_count:
            why = (
                f"{zero_count} zero pages beside {normal_count} normal in a packet of {pages_alloc}"
            )
            self._fail(CorruptError, why, pos + 32)
        block = _c_string(name_field)
        used = normal_count + zero_count
        if block is None or (used and not _is_idstr(block)):
            shown = printable(name_field.rstrip(b"\0")[:64])
            self._fail(CorruptError, f"RAM block name {shown} is not a NUL-ended idstr", pos + 64)
        at = pos + RAM_FIXED_SIZE
        offsets = struct.unpack_from(f">{used}Q", buf, at)
        mask, top = self._page_size - 1, MAX_RAM_TOTAL - self._page_size
        for i, offset in enumerate(offsets):
            if offset & mask or offset > top:
                why = f"page offset 0x{offset:x} in {quoted(block)} is not a page of RAM"
                self._fail(CorruptError, why, at + 8 * i)
        compression = flags & COMPRESSION_MASK
        if not normal_count:
            size = 0  # whatever next_packet_size says: QEMU reads no payload
        elif compression:
            if next_size > MAX_COMPRESSED:
                why = f"compressed payload of {next_size} bytes (at most {MAX_COMPRESSED})"
                self._fail(CorruptError, why, pos + 20)
            size = next_size
        else:
            size = normal_count * self._page_size
            if next_size != size:
                why = f"next_packet_size {next_size} for {normal_count} pages of {self._page_size}"
                self._fail(CorruptError, why, pos + 20)
        self._packet = RamPacket(
            flags,
            packet_num,
            block,
            offsets[:normal_count],
            offsets[normal_count:],
            b"",
            pages_alloc,
            next_size,
            _kept(buf[at + 8 * used : pos + self._ram_size]),
            _kept(reserved),
        )
        self._pos = pos + self._ram_size
        self._expect(size, self._step_payload)

    def _step_device_state(self, out: list[ChannelRecord]) -> None:
        pos = self._pos
        flags, name_field, instance_id, size = _DEVICE.unpack_from(self._buf, pos)[2:]
        idstr = _c_string(name_field)
        if idstr is None or not _is_idstr(idstr):
            shown = printable(name_field.rstrip(b"\0")[:64])
            self._fail(CorruptError, f"device idstr {shown} is not a NUL-ended idstr", pos + 12)
        if not 0 < size <= MAX_DEVICE_STATE:
            why = f"device-state payload of {size} bytes (1 to {MAX_DEVICE_STATE})"
            self._fail(CorruptError, why, pos + 272)
        self._packet = DeviceStatePacket(idstr, instance_id, b"", flags)
        self._pos = pos + DEVICE_STATE_SIZE
        self._expect(size, self._step_payload)

    def _step_payload(self, out: list[ChannelRecord]) -> None:
        pos, end = self._pos, self._pos + self._need
        payload = self._buf[pos:end] if end > pos else b""
        out.append(self._packet._replace(payload=payload))
        self._packet = None
        self._pos = self._at = end
        self._expect(HEADER_SIZE, self._step_header)


class MultifdWriter:
    """Turns records back into a multifd channel's bytes: the parser's mirror image."""

    def __init__(self, *, page_size: int = fmt.DEFAULT_PAGE_SIZE) -> None:
        if not is_page_size(page_size):
            raise IncompatibleError(f"target page size {quoted(page_size)} is not one of QEMU's")
        self._slots = PACKET_BYTES // page_size

    def parts(self, record: ChannelRecord) -> tuple[bytes, bytes | memoryview]:
        """The record's header and its payload, apart, for a vectored write without a copy."""
        if type(record) is RamPacket:
            return self._ram_header(record), record.payload
        if type(record) is DeviceStatePacket:
            name = _name_field(record.idstr)
            size = len(record.payload)
            head = _DEVICE.pack(MAGIC, VERSION, record.flags, name, record.instance_id, size)
            return head, record.payload
        if type(record) is ChannelHello:
            unused = _sized(record.unused, INIT_UNUSED_SIZE)
            return _INIT.pack(MAGIC, VERSION, record.uuid, record.channel, unused), b""
        raise TypeError(f"not a multifd record: {type(record).__name__}")

    def _ram_header(self, record: RamPacket) -> bytes:
        used = len(record.normal) + len(record.zero)
        if used > self._slots:
            raise ValueError(f"{used} pages in a packet of {self._slots}")
        head = _RAM.pack(
            MAGIC,
            VERSION,
            record.flags,
            record.pages_alloc,
            len(record.normal),
            record.next_packet_size,
            record.packet_num,
            len(record.zero),
            _sized(record.reserved, RESERVED_SIZE),
            _name_field(record.block),
        )
        offsets = struct.pack(f">{used}Q", *record.normal, *record.zero)
        return b"".join([head, offsets, _sized(record.spare, 8 * (self._slots - used))])

    def write(self, out: bytearray, record: ChannelRecord) -> None:
        head, payload = self.parts(record)
        out += head
        out += payload

    def encode(self, record: ChannelRecord) -> bytes:
        out = bytearray()
        self.write(out, record)
        return bytes(out)


def _sized(kept: bytes, size: int) -> bytes:
    """A field the parser kept (see _kept): zeros for b"", else exactly `size` bytes."""
    if not kept:
        return bytes(size)
    if len(kept) != size:
        raise ValueError(f"{len(kept)} bytes for a field of {size}")
    return kept


def _name_field(name: str) -> bytes:
    raw = name.encode("latin-1")
    if len(raw) >= NAME_SIZE:
        raise ValueError(f"name longer than {NAME_SIZE - 1} bytes: {quoted(name)}")
    return raw  # struct's "256s" pads with NULs


def write_channel(records: Iterable[ChannelRecord], *, page_size: int = 4096) -> bytes:
    out = bytearray()
    writer = MultifdWriter(page_size=page_size)
    for record in records:
        writer.write(out, record)
    return bytes(out)


def parse_channel(data: bytes, *, page_size: int = 4096) -> list[ChannelRecord]:
    """Every record of a whole channel; raises MigpipeError on bad or truncated input."""
    parser = MultifdParser(page_size=page_size)
    parser.feed(data)
    return parser.finish()
