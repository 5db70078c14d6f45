"""The filter interface and the registry that finds filters by name.

Two kinds of filters, applied in this order on encode and in reverse on decode:
- page filters see RAM records in stream order and may replace them (XBZRLE deltas);
- byte filters see one frame payload at a time, independently, so frames are processed by
  several worker threads at once (compression, encryption).

Filters are found through the `migpipe.filters` entry-point group, where migpipe's own filters
are registered too, so a third-party package adds one without touching migpipe.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from migpipe.errors import IncompatibleError, MigpipeError, quoted
from migpipe.keys import Secrets
from migpipe.stream.records import Record

ENTRY_POINT_GROUP = "migpipe.filters"
T = TypeVar("T")
Buffer = bytes | bytearray | memoryview


class Filter:
    """Common to both kinds: a name, parameters that travel in the wire header, a CLI form."""

    name: ClassVar[str]
    stage: ClassVar[int]  # chains run in stage order: pages, then compression, then encryption
    # A sealing filter authenticates with the user's key: it ends a chain, tags the header
    # (migpipe.wire.header) and is what a reader given a key insists on.
    seals: ClassVar[bool] = False

    @classmethod
    def from_argument(cls, argument: str | None, secrets: Secrets) -> "Filter":
        """The filter for `NAME` or `NAME:ARGUMENT` on the command line."""
        if argument is not None:
            raise MigpipeError(
                f"filter {quoted(cls.name)} takes no argument (got {quoted(argument)})"
            )
        return cls()

    @classmethod
    def from_params(cls, params: dict[str, Any], secrets: Secrets) -> "Filter":
        """The filter a wire header describes (`params()` of the encoder's instance). A value
        its constructor refuses is a header this migpipe cannot follow (status 6), where the
        same value on the command line is a plain error."""
        try:
            return cls(**params)
        except MigpipeError as e:
            raise IncompatibleError(f"wire header: {e.message}") from None

    def params(self) -> dict[str, Any]:
        """What the decoder needs to rebuild this filter; written into the wire header."""
        return {}

    def bind(self, header: bytes) -> None:
        """Called with the encoded wire (or file) header before the first payload, on both
        ends, so that a filter which authenticates can cover the header too."""

    def header_tag(self, signed: bytes) -> bytes:
        """A sealing filter's tag over the header's first bytes (migpipe.wire.header.TAG_SIZE)."""
        raise NotImplementedError

    def check_header_tag(self, signed: bytes, tag: bytes) -> None:
        """Raise MigpipeError unless `tag` is this filter's tag of `signed`."""
        raise NotImplementedError

    def seal_reply(self, plain: bytes, index: int) -> bytes:
        """A sealing filter's seal on the destination's line number `index` back to the source
        about this stream, which the source opens with open_reply (bound to the header, on
        both ends)."""
        raise NotImplementedError

    def open_reply(self, sealed: bytes, index: int) -> bytes:
        """The line seal_reply sealed; MigpipeError if it was not sealed for this stream, at
        this place."""
        raise NotImplementedError


def number_argument(name: str, what: str, argument: str) -> int:
    """`3` in `zstd:3`, as an int, or a clear error naming the filter."""
    try:
        return int(argument)
    except ValueError:
        raise MigpipeError(f"{name} {what} must be a number, not {quoted(argument)}") from None


class Position(NamedTuple):
    """Where a payload sits: its number in the wire (or file), and whether it ends the stream.

    Filters that authenticate bind each payload to its position, so that reordered, repeated,
    dropped or foreign payloads, and a stream cut short, are detected.
    """

    index: int
    final: bool


class ByteFilter(Filter):
    """Transforms frame payloads. Both methods are called from several threads at once."""

    stage = 1

    def encode(self, payload: bytes, position: Position) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, limit: int, position: Position) -> bytes:
        """The payload back; more than `limit` bytes is corruption (never allocate past it)."""
        raise NotImplementedError


class PageFilter(Filter):
    """Transforms the record sequence; one encoder or decoder instance per stream, in order."""

    stage = 0

    # XBZRLE encoding bytes this filter puts on the wire besides QEMU's own (see XbzrlePage).
    wire_encodings: ClassVar[frozenset[int]] = frozenset()

    def encoder(self) -> "RecordTransform":
        raise NotImplementedError

    def decoder(self) -> "RecordTransform":
        raise NotImplementedError


class RecordTransform:
    """One direction of a page filter for one stream: records in, records out, in order."""

    name: str  # the filter's name, for --stats-json

    def transform(self, records: list[Record]) -> list[Record]:
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Figures for --stats-json (hits, misses, ...)."""
        return {}


class Timer(Protocol):
    """Where a chain adds each filter's time (migpipe.tunnel.pipeline.Totals); called from
    several threads at once, so it must be thread-safe."""

    def timed(self, name: str, function: Callable[..., T], *args: Any) -> T: ...


class FilterChain:
    """One stream's filters, in order: the page filters' transforms, and the byte filters run
    over one payload (frame, extent, chunk, index) at a time, each timed into `timer`.

    Encode, decode and the fixed layout all go through it, so the order (seal in stage order,
    open in reverse, with the reader's `limit`) is written once. Threads: bind() is called
    once, by one thread, before any payload; seal() and open() by any number of threads at
    once (byte filters are thread-safe); each transform from encoders() or decoders() by one
    thread, in stream order. It keeps no buffers: what seal() and open() return is the
    caller's, except that a filter may give its input back (see seal()).
    """

    def __init__(self, filters: Sequence[Filter], timer: Timer | None = None) -> None:
        self.filters = tuple(filters)
        self.byte_filters = tuple(f for f in self.filters if isinstance(f, ByteFilter))
        self.page_filters = tuple(f for f in self.filters if isinstance(f, PageFilter))
        self.timer = timer

    def bind(self, header: bytes) -> None:
        """Bind every filter to the encoded wire (or file) header (see Filter.bind)."""
        for f in self.filters:
            f.bind(header)

    def seal(self, payload: Buffer, position: Position) -> Buffer:
        """`payload` through the byte filters, in stage order. The result may be `payload`
        itself (no byte filters, or a filter that keeps some input as it is): a caller whose
        buffer is reused copies a memoryview it gets back."""
        timed = self._timed
        for f in self.byte_filters:
            payload = timed(f.name, f.encode, payload, position)
        return payload

    def open(self, data: Buffer, limit: int, position: Position) -> Buffer:
        """What seal() made of a payload, back, through the byte filters in reverse; a result
        of more than `limit` bytes is corruption, and no filter allocates past it."""
        timed = self._timed
        for f in reversed(self.byte_filters):
            data = timed(f.name, f.decode, data, limit, position)
        return data

    def encoders(self) -> "list[RecordTransform]":
        """A fresh encoding transform per page filter, in the order they run."""
        return [f.encoder() for f in self.page_filters]

    def decoders(self) -> "list[RecordTransform]":
        """A fresh decoding transform per page filter, in the order they run (reversed)."""
        return [f.decoder() for f in reversed(self.page_filters)]

    def transform(self, transforms: "list[RecordTransform]", records: list[Record]) -> list[Record]:
        """`records` through `transforms` (from encoders() or decoders()), each timed."""
        for transform in transforms:
            records = self._timed(transform.name, transform.transform, records)
        return records

    def _timed(self, name: str, function: Callable[..., T], *args: Any) -> T:
        if self.timer is None:
            return function(*args)
        return self.timer.timed(name, function, *args)


def _registered(**match: str):  # -> importlib.metadata.EntryPoints
    """The filters' entry points. importlib.metadata is imported here, not with the module:
    it is 15 ms of the start of every command, most of which name no filter."""
    from importlib.metadata import entry_points

    return entry_points(group=ENTRY_POINT_GROUP, **match)


def installed() -> list[str]:
    return sorted({entry.name for entry in _registered()})


@functools.cache  # scanning the installed distributions' entry points takes milliseconds
def load(name: str) -> type[Filter]:
    """The filter class registered as `name`; only that plugin is imported."""
    for entry in _registered(name=name):
        try:
            return entry.load()
        except Exception as e:  # a broken plugin must fail clearly, and only when used
            raise MigpipeError(f"filter plugin {quoted(name)} failed to load: {e}") from None
    message = f"unknown filter {quoted(name)} (installed: {', '.join(installed())})"
    raise IncompatibleError(message, None)


def create(name: str, params: dict[str, Any], secrets: Secrets | None = None) -> Filter:
    """A filter from a wire header entry."""
    cls = load(name)
    try:
        return cls.from_params(params, secrets or Secrets())
    except TypeError as e:
        message = f"bad parameters for filter {quoted(name)}: {e}"
        raise IncompatibleError(message, None) from None


def parse_chain(text: str, secrets: Secrets | None = None) -> list[Filter]:
    """`xbzrle,zstd:3` -> filters, page filters first (they must see records, not bytes)."""
    chain: list[Filter] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, argument = item.partition(":")
        chain.append(load(name).from_argument(argument or None, secrets or Secrets()))
    check_order(chain)
    return chain


def check_order(chain: Sequence[Filter]) -> None:
    stages = [f.stage for f in chain]
    if stages != sorted(stages):
        message = (
            "filters run in this order: page filters (xbzrle), then compression (zstd, lz4), "
            "then encryption (encrypt)"
        )
        raise IncompatibleError(message, None)
