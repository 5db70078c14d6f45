"""A multifd channel's pages through xbzrle, on its lane (issue 18; migpipe-wire(5), VERSION 2,
Multifd lanes through xbzrle).

QEMU refuses its own xbzrle beside multifd; here each lane keeps a mirrored xbzrle cache of the
pages that crossed on it (filters.xbzrle's, C or Python), and a page sent again on the same lane
crosses as a delta against it when that is smaller. The cache is per lane: QEMU hands packets to
whichever channel is free, so a page often comes back on another lane and misses, but each end
updates a lane's cache in that lane's order alone, which needs no barrier between lanes.

Each payload is one record of the channel: the initial message as QEMU wrote it (so decode
chooses this codec from its first four bytes), then one packet each. Both ends parse QEMU's
bytes with the same MultifdParser, so decode's parser vouches for what it rebuilt.
"""

from collections.abc import Iterable

from migpipe.chain import Buffer, PageFilter, RecordTransform
from migpipe.errors import CorruptError
from migpipe.stream import format as fmt
from migpipe.stream import multifd
from migpipe.stream.multifd import ChannelHello, MultifdParser, MultifdWriter, RamPacket
from migpipe.stream.records import NormalPage, Record, XbzrlePage, ZeroPage

AS_IS = 0x00  # a payload of the packet's bytes as QEMU wrote them
PAGE = fmt.DEFAULT_PAGE_SIZE  # the only page size xbzrle's cache keeps
PAGES = 0x01  # a payload of the packet's header, then each page as ENTRY_PAGE or ENTRY_DELTA
ENTRY_PAGE = 0x00  # the page's bytes follow
ENTRY_DELTA = 0x01  # be16 length, then an XBZRLE delta against the lane's cached copy
_NORMAL_AT = 16  # where a RAM packet's header holds its count of normal pages (be32)
_ZEROS = memoryview(bytes(multifd.PACKET_BYTES))  # stand-in pages for decode's parser


class MultifdXbzrle:
    """The LaneCodec of one multifd channel with the xbzrle page filter (one end's, one lane's)."""

    def __init__(self, xbzrle: PageFilter) -> None:
        self._xbzrle = xbzrle
        (self._encoding,) = xbzrle.wire_encodings  # its deltas' encoding byte
        self._transform: RecordTransform | None = None  # the filter's, on first use: the
        # codec is chosen alike on both ends, its first call says which end it is
        self._parser = MultifdParser(page_size=PAGE)
        self._writer = MultifdWriter(page_size=PAGE)
        self._header = multifd.RAM_FIXED_SIZE + 8 * (multifd.PACKET_BYTES // PAGE)
        self._opened = False  # decode: the initial message came

    # -- encode -----------------------------------------------------------------------------

    def encode(self, data: Buffer) -> list[Buffer]:
        self._parser.feed(data)
        return [self._payload(record) for record in self._parser.next_records()]

    def finish(self) -> list[Buffer]:
        return [self._payload(record) for record in self._parser.finish()]

    def _payload(self, record: multifd.ChannelRecord) -> Buffer:
        head, body = self._writer.parts(record)
        if type(record) is ChannelHello:
            return head
        if type(record) is not RamPacket or record.compression != "none":
            return b"".join([bytes([AS_IS]), head, body])
        out = bytearray([PAGES])
        out += head
        size = len(record.normal)
        pages = [
            NormalPage(record.block, o, body[i * PAGE : (i + 1) * PAGE], True)
            for i, o in enumerate(record.normal)
        ]
        self._transform = self._transform or self._xbzrle.encoder()
        sent = self._transform.transform([*pages, *self._zeros(record)])
        for page in sent[:size]:
            if type(page) is XbzrlePage:
                out.append(ENTRY_DELTA)
                out += fmt.BE16.pack(len(page.data))
            else:
                out.append(ENTRY_PAGE)
            out += page.data
        return out

    @staticmethod
    def _zeros(record: RamPacket) -> list[Record]:
        """The packet's zero pages, which update a cached copy on both ends alike."""
        return [ZeroPage(record.block, offset) for offset in record.zero]

    # -- decode -----------------------------------------------------------------------------

    def decode(self, payload: Buffer) -> Buffer:
        view = memoryview(payload).cast("B")
        if not self._opened:  # the lane's first payload: the initial message
            self._check([ChannelHello], view)
            self._opened = True
            return payload
        kind, body = view[0] if view else None, view[1:]
        if kind == AS_IS:
            self._check([RamPacket, multifd.DeviceStatePacket], body)
            return body
        if kind != PAGES or len(body) < self._header:
            raise CorruptError(f"multifd lane payload of kind {kind} and {len(body)} bytes")
        head = body[: self._header]
        (count,) = fmt.BE32.unpack_from(head, _NORMAL_AT)
        (packet,) = self._check([RamPacket], head, _ZEROS[: count * PAGE])
        if packet.compression != "none":
            raise CorruptError(f"multifd lane payload of pages for a {packet.compression} packet")
        records, at = [], self._header
        for offset in packet.normal:
            entry, at = body[at : at + 1], at + 1
            if entry == bytes([ENTRY_DELTA]) and at + 2 <= len(body):
                (size,) = fmt.BE16.unpack_from(body, at)
                delta = body[at + 2 : at + 2 + size]
                records.append(XbzrlePage(packet.block, offset, delta, True, self._encoding))
                at += 2 + size
            elif entry == bytes([ENTRY_PAGE]):
                records.append(NormalPage(packet.block, offset, body[at : at + PAGE], True))
                at += PAGE
            else:
                raise CorruptError(f"multifd lane payload: bad page entry at byte {at}")
        if at != len(body) or any(len(r.data) != PAGE for r in records if type(r) is NormalPage):
            raise CorruptError(f"multifd lane payload of {len(body)} bytes, its pages {at}")
        self._transform = self._transform or self._xbzrle.decoder()
        pages = self._transform.transform([*records, *self._zeros(packet)])
        return b"".join([head, *(page.data for page in pages[: len(packet.normal)])])

    def _check(self, kinds: list[type], *parts: Buffer) -> list[multifd.ChannelRecord]:
        """Feed decode's parser what QEMU is to be given: it must complete one record of
        `kinds`, which is returned (its payload, for PAGES, the stand-in zeros)."""
        for part in parts:
            self._parser.feed(part)
        records = self._parser.next_records()
        if len(records) != 1 or type(records[0]) not in kinds:
            raise CorruptError("multifd lane payload is not one record of the channel")
        return records

    def counters(self) -> dict[str, int]:
        """The xbzrle filter's counters of this end (encode's hits, misses...; decode's
        deltas), none before the first packet of pages."""
        return self._transform.counters() if self._transform is not None else {}


def lane_counters(codecs: Iterable[object]) -> dict[str, dict[str, int]]:
    """encode's figures for --stats-json: the multifd lanes' xbzrle counters summed, apart from
    the main stream's "xbzrle" (with multifd, its pages cross on the lanes); none without."""
    lanes = [codec.counters() for codec in codecs if type(codec) is MultifdXbzrle]
    if not lanes:
        return {}
    summed: dict[str, int] = {"lanes": len(lanes)}
    for figures in lanes:
        for name, value in figures.items():
            summed[name] = summed.get(name, 0) + value
    return {"multifd-xbzrle": summed}
