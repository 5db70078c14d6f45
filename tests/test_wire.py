"""migpipe's wire against every single-byte flip and every cut, in-process.

A small wire of a few frames (plain, zstd, encrypted) is decoded through the sans-IO decoder
(migpipe.wire.WireDecoder under pipeline.decode_chunks) once per damaged copy: each must be
refused with a MigpipeError, and never after the stream's end was released, since that is what
lets a destination QEMU complete a load. The unmodified wire must come back exactly, however
it is cut into chunks.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from support import PAGE, decode_wire

from migpipe.chain import parse_chain
from migpipe.errors import MigpipeError
from migpipe.keys import Secrets, keygen
from migpipe.stream.records import (
    Configuration,
    EndOfSection,
    Eof,
    FileHeader,
    MemSize,
    OpaqueData,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VmDescription,
    ZeroPage,
)
from migpipe.stream.writer import write_records
from migpipe.tunnel.pipeline import encode
from migpipe.wire import FRAME_FINAL, Frame, WireReader
from migpipe.wire.header import Header

CHUNKINGS = (1, 7, None)  # None: the whole wire at once
READ = 40  # what the source hands encode at a time: with FRAME_TARGET below, a few frames


class Source:
    """A stream read in READ-byte pieces (a Channel's reading half)."""

    def __init__(self, data: bytes) -> None:
        self._pieces = iter(data[at : at + READ] for at in range(0, len(data), READ))

    def read(self) -> bytes:
        return next(self._pieces, b"")

    def interrupt(self) -> None:
        pass


class Sink:
    """Collects what encode writes (a Channel's writing half)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, parts) -> None:
        for part in parts:
            self.data += part


@pytest.fixture(scope="module")
def stream() -> bytes:
    """Two passes over a 16-page guest, then some device state. Zero pages only: a normal page
    would be 4 KiB, and every byte of the wire costs a decode per flip, cut and chunking."""
    first = [ZeroPage("pc.ram", n * PAGE, n, n == 0) for n in range(16)]
    again = [ZeroPage("pc.ram", n * PAGE, 0xFF - n, n == 3) for n in range(3, 16, 3)]
    records = [
        FileHeader(3),
        Configuration("pc-i440fx-7.2"),
        SectionStart(2, "ram", 0, 4),
        MemSize(16 * PAGE, (RamBlock("pc.ram", 16 * PAGE),)),
        EndOfSection(),
        SectionFooter(2),
        SectionPart(2),
        *first,
        EndOfSection(),
        SectionFooter(2),
        SectionEnd(2),
        *again,
        EndOfSection(),
        SectionFooter(2),
        SectionFull(3, "timer", 0, 2),
        OpaqueData(bytes(range(48))),
        SectionFooter(3),
        Eof(),
        VmDescription(b'{"page_size": 4096, "devices": []}'),
    ]
    return write_records(records)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "key"
    keygen(path)
    return path


@pytest.fixture(scope="module", params=["", "zstd:1", "encrypt", "zstd:1,encrypt"])
def case(request: pytest.FixtureRequest, stream: bytes, key: Path) -> tuple[bytes, Secrets]:
    """A wire of `stream` through the chain, and the secrets that open it."""
    secrets = Secrets(key_file=str(key))
    sink = Sink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("migpipe.tunnel.pipeline.FRAME_TARGET", 2 * READ)
        trio.run(encode, Source(stream), sink, parse_chain(request.param, secrets))
    return bytes(sink.data), secrets if "encrypt" in request.param else Secrets()


def chunked(data: bytes, size: int | None) -> Iterator[bytes]:
    if size is None:
        yield data
    else:
        yield from (data[at : at + size] for at in range(0, len(data), size))


def decoded(data: bytes, size: int | None, secrets: Secrets) -> tuple[bytes, MigpipeError | None]:
    """What decode would write of `data` fed in `size`-byte chunks, and its error."""
    return decode_wire(chunked(data, size), secrets)


def refused(data: bytes, size: int | None, secrets: Secrets, tail: bytes, what: str) -> None:
    out, error = decoded(data, size, secrets)
    assert error is not None, f"{what} decoded without an error"
    assert not out.endswith(tail), f"{what} released the stream's end ({error})"


def test_the_wire_has_a_few_frames(case: tuple[bytes, Secrets], stream: bytes) -> None:
    wire, _ = case
    reader = WireReader()
    reader.feed(wire)
    reader.close()
    events = reader.next_events()
    assert type(events[0]) is Header
    frames = [e for e in events if type(e) is Frame]
    assert 3 <= len(frames) <= 12 and frames[-1].kind == FRAME_FINAL
    assert len(wire) < 1200  # every flip and cut below stays quick


@pytest.mark.parametrize("size", CHUNKINGS)
def test_round_trip(case: tuple[bytes, Secrets], stream: bytes, size: int | None) -> None:
    wire, secrets = case
    assert decoded(wire, size, secrets) == (stream, None)


@pytest.mark.parametrize("size", CHUNKINGS)
def test_every_flip_is_refused(case: tuple[bytes, Secrets], stream: bytes, size: int | None):
    """Each byte XOR 0x01, and the header's bytes XOR 0xFF too."""
    wire, secrets = case
    tail = stream[-16:]
    header_size = len(_header(wire).encoded)
    for at in range(len(wire)):
        for mask in (0x01, 0xFF) if at < header_size else (0x01,):
            damaged = bytearray(wire)
            damaged[at] ^= mask
            refused(bytes(damaged), size, secrets, tail, f"byte {at} ^ 0x{mask:02x}")


@pytest.mark.parametrize("size", CHUNKINGS)
def test_every_cut_is_refused(case: tuple[bytes, Secrets], stream: bytes, size: int | None):
    """The wire cut before each of its bytes: from nothing to all but the last."""
    wire, secrets = case
    tail = stream[-16:]
    for cut in range(len(wire)):
        refused(wire[:cut], size, secrets, tail, f"the wire cut at {cut}")


def _header(wire: bytes) -> Header:
    reader = WireReader()
    reader.feed(wire)
    (header, *_) = reader.next_events()
    return header


@pytest.mark.parametrize(
    "params",
    [{"level": 30}, {"level": "3"}, {"level": 3, "window": 1}],
    ids=["range", "type", "extra"],
)
def test_a_header_whose_filter_refuses_its_parameters_is_incompatible(params: dict) -> None:
    """The same refusal as an unknown filter (status 6, before any frame): the wire asks for
    something this migpipe cannot follow; on the command line `zstd:30` is a plain error."""
    from migpipe import wire
    from migpipe.errors import EXIT_INCOMPATIBLE
    from migpipe.wire.header import encode_header

    fields = {"filters": [["zstd", params]], "page_size": PAGE}
    data = encode_header(wire.MAGIC, wire.VERSION, fields) + wire.encode_trailer(
        0, wire.Trailer(0, 0, 0, 0)
    )
    out, error = decode_wire([data], Secrets())
    assert out == b"" and error is not None and error.status == EXIT_INCOMPATIBLE
