"""How a lane's bytes become its frames' payloads and back (see tunnel.twoway): as QEMU wrote
them, or re-encoded for what the lane carries (a multifd channel's pages through the page
filters, issue 18's work).

Both ends choose a lane's codec alike, from the lane's first four bytes as QEMU wrote them and
the wire's filter chain: encode before encoding, decode from the first payload of the lane,
which every codec begins with QEMU's first four bytes unchanged. So the choice costs no byte on
the wire, and a lane whose first read brought fewer than four bytes is carried verbatim.
"""

from typing import Protocol

from migpipe.chain import Buffer, FilterChain
from migpipe.stream.multifd import ChannelKind, classify
from migpipe.tunnel.multifdcodec import MultifdXbzrle

XBZRLE = "xbzrle"  # the page filter whose cache a multifd lane's pages go through
FIRST = 4  # the bytes a codec is chosen by: QEMU's stream magic, multifd's, or neither


class LaneCodec(Protocol):
    """One lane's, in one direction; stateful, called by one thread in the lane's order."""

    def encode(self, data: Buffer) -> list[Buffer]:
        """QEMU's next bytes on the connection in, the payloads for the lane's next frames out
        (none while it holds an unfinished record)."""
        ...

    def finish(self) -> list[Buffer]:
        """At the connection's end: the payloads of what it held; raises when QEMU's bytes
        ended inside a record."""
        ...

    def decode(self, payload: Buffer) -> Buffer:
        """A payload back into QEMU's bytes, in the lane's order."""
        ...


class Verbatim:
    """A lane carried as QEMU wrote it: each read one payload."""

    def encode(self, data: Buffer) -> list[Buffer]:
        return [data]

    def finish(self) -> list[Buffer]:
        return []

    def decode(self, payload: Buffer) -> Buffer:
        return payload


def codec_for(first: Buffer, chain: FilterChain) -> LaneCodec:
    """The codec for a lane whose first payload (or QEMU's first read) begins with `first`."""
    xbzrle = [f for f in chain.page_filters if f.name == XBZRLE]  # the plug-in, by its name
    if xbzrle and len(first) == FIRST and classify(first) == ChannelKind.MULTIFD:
        return MultifdXbzrle(xbzrle[0])
    return Verbatim()
