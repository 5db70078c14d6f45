"""migpipe.tunnel.inplace: save --direct's framing in the O_DIRECT ring, against encode's wire
rules.

The source is a stand-in that hands the stream over in chosen pieces, so that reads end where
the framing is hardest: inside a footer whose end the parser must look past, right at the EOF
item, and one byte at a time; the ring is small, so frames span and re-use its buffers.
"""

import random
from pathlib import Path

import pytest
import trio
from test_tunnel import eof_at

from migpipe import wire
from migpipe.errors import MigpipeError, leaves
from migpipe.io.direct import DirectWriter, open_direct
from migpipe.stream.parser import StreamParser
from migpipe.stream.records import Eof, SectionFull
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.tunnel import inplace
from migpipe.tunnel.pipeline import FRAME_TARGET, decode_chunks


class Pieces:
    """A source (FdChannel's reading side) that never returns bytes across a piece's end."""

    def __init__(self, data: bytes, ends: list[int]) -> None:
        self._data, self._at = data, 0
        self._ends = sorted({e for e in ends if 0 < e < len(data)} | {len(data)})

    def _next_end(self) -> int:
        return next(e for e in self._ends if e > self._at) if self._at < len(self._data) else 0

    def readinto(self, view: memoryview) -> int:
        count = min(len(view), max(self._next_end() - self._at, 0))
        view[:count] = self._data[self._at : self._at + count]
        self._at += count
        return count

    def read(self) -> bytes:
        chunk = self._data[self._at : self._next_end() or self._at]
        self._at += len(chunk)
        return chunk

    def interrupt(self) -> None:
        pass


def guest_records(ram: int = 3 << 20) -> list:
    return list(SyntheticGuest(GuestModel(ram_size=ram, iterations=2, dirty_share=0.2)).records())


@pytest.fixture(scope="module")
def stream() -> bytes:
    return write_records(guest_records())


def save_in_place(tmp_path: Path, source: Pieces) -> bytes:
    path = tmp_path / "wire"
    with open_direct(str(path), "w", direct="try") as file:
        ring = {"buffer_size": 4 * file.align, "depth": 2}
        with DirectWriter(file, **ring) as writer:
            totals = trio.run(inplace.encode_in_place, source, writer, writer)
            assert writer.finish() == totals.wire_bytes
    return path.read_bytes()


def check_wire(wire_bytes: bytes, stream: bytes, target: int) -> None:
    """The wire gives the stream back, every data frame ends between two records and holds
    `target` bytes at least (but the last), and the final frame holds the EOF item on."""
    assert b"".join(decode_chunks([wire_bytes])) == stream
    reader = wire.WireReader()
    reader.feed(wire_bytes)
    reader.close()
    frames = [e for e in reader.next_events() if isinstance(e, wire.Frame)]
    *data, final = frames
    assert final.kind == wire.FRAME_FINAL and final.payload == stream[eof_at(stream) :]
    parser, fed = StreamParser(pages=False), 0
    for frame in data:
        assert frame.kind == wire.FRAME_DATA and frame.payload
        parser.feed(frame.payload)
        parser.mark_record_boundary()
        parser.next_records()
        fed += len(frame.payload)
        assert parser.offset == fed, f"frame {frame.sequence} ends inside a record"
    assert all(len(frame.payload) >= target for frame in data[:-1])


def test_big_reads_make_encode_frames(tmp_path: Path, stream: bytes) -> None:
    check_wire(save_in_place(tmp_path, Pieces(stream, [])), stream, FRAME_TARGET)


@pytest.mark.parametrize("around", range(-7, 9))
def test_reads_ending_near_the_eof_item(
    tmp_path: Path, stream: bytes, around: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame after every read: the footer before the EOF item is only known to end once the
    parser has seen what follows it, in a later read than the one the EOF item came in."""
    monkeypatch.setattr(inplace, "FRAME_TARGET", 1)
    eof = eof_at(stream)
    ends = [eof - 4096, eof - 9, eof + around, eof + around + 1, eof + 7]
    check_wire(save_in_place(tmp_path, Pieces(stream, ends)), stream, 1)


def test_an_eof_item_that_begins_a_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No device state: the EOF item follows a RAM footer, where a frame was just cut; the
    frame opened after it stays empty and is not written."""
    monkeypatch.setattr(inplace, "FRAME_TARGET", 1)
    records = guest_records(1 << 20)
    devices = next(i for i, r in enumerate(records) if isinstance(r, SectionFull))
    eof = next(i for i, r in enumerate(records) if isinstance(r, Eof))
    stream = write_records(records[:devices] + records[eof:])
    at = eof_at(stream)
    check_wire(save_in_place(tmp_path, Pieces(stream, [at - 100, at])), stream, 1)


def test_random_pieces(tmp_path: Path, stream: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inplace, "FRAME_TARGET", 20000)
    rng = random.Random(5)
    ends = [rng.randrange(len(stream)) for _ in range(300)] + list(range(len(stream) - 64, 0, -1))[
        :64
    ]
    check_wire(save_in_place(tmp_path, Pieces(stream, ends)), stream, 20000)


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda s: s[:-10], "truncated in the VM description"),
        (lambda s: s[: len(s) // 2], "truncated in"),
        (lambda s: b"QEVX" + s[4:], "not a QEMU migration stream"),
    ],
    ids=["in the VM description", "in RAM", "bad magic"],
)
def test_a_bad_stream_is_refused(tmp_path: Path, stream: bytes, cut, message: str) -> None:
    with pytest.raises(BaseExceptionGroup) as refused:
        save_in_place(tmp_path, Pieces(cut(stream), []))
    [error] = leaves(refused.value)
    assert isinstance(error, MigpipeError) and message in error.message
    assert error.offset is not None
