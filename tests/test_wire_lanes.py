"""Version 2 of the wire, sans I/O: lanes in both directions (migpipe-wire(5), VERSION 2)."""

import os
from functools import partial
from pathlib import Path

import pytest
from support import migpipe

from migpipe.chain import FilterChain
from migpipe.errors import (
    EXIT_CORRUPT,
    EXIT_TRUNCATED,
    EXIT_USAGE,
    CorruptError,
    IncompatibleError,
    MigpipeError,
)
from migpipe.running import run_trio
from migpipe.tunnel.pipeline import decode, encode
from migpipe.wire import (
    BACK,
    FRAME_DATA,
    FRAME_END,
    FRAME_FINAL,
    FRAME_OPEN,
    ONE_CONNECTION,
    Connections,
    Frame,
    LaneTally,
    LaneWriter,
    Trailer,
    WireReader,
    WireWriter,
    crc_of,
    lane_position,
)


def lane_frames(lanes: dict[int, list[bytes]], ended: bool = True) -> bytes:
    """Each of `lanes` opened, its chunks carried in DATA frames, and ended (if `ended`)."""
    others = LaneWriter()
    wire = bytearray()
    for lane, chunks in lanes.items():
        wire += others.open(lane)
        for chunk in chunks:
            others.position(lane)
            others.carried(lane, chunk)
            wire += others.data(lane, chunk) + chunk
        if ended:
            wire += others.end(lane)
    return bytes(wire)


def forward_wire(
    lanes: dict[int, list[bytes]], ended: bool = True, connections: Connections = ONE_CONNECTION
) -> bytes:
    """A version 2 wire: lane 0 with one data frame and its end, and `lanes` relayed."""
    writer = WireWriter(FilterChain([]), lanes=True, connections=connections)
    wire = bytearray(writer.header()) + lane_frames(lanes, ended)
    for final, data in ((False, b"QEVM"), (True, b"\x00")):
        parts = writer.frame(writer.position(final), [data], crc_of([data]))
        wire += b"".join(parts)
    wire += writer.trailer(writer.summary(5, 0))
    return bytes(wire)


def read_all(
    data: bytes, back: bool = False, step: int = 7, reader: WireReader | None = None
) -> list:
    """The events of `data` fed to `reader` (a forward or `back` one) in pieces of `step`."""
    reader = reader or WireReader(back=back)
    events = []
    for at in range(0, len(data), step):  # split anywhere
        reader.feed(data[at : at + step])
        events += reader.next_events()
    reader.close()
    return events + reader.next_events()


def test_lanes_cross_in_order_and_end_with_the_wire() -> None:
    events = read_all(forward_wire({1: [b"hello", b"multifd"], 2: [b"preempt"]}))
    frames = [e for e in events if isinstance(e, Frame)]
    lane_1 = [(f.kind, f.payload) for f in frames if f.lane == 1]
    assert lane_1[:3] == [(FRAME_OPEN, b""), (FRAME_DATA, b"hello"), (FRAME_DATA, b"multifd")]
    assert lane_1[3][0] == FRAME_END
    assert [f.sequence for f in frames if f.lane == 2] == [0, 1, 2]
    assert isinstance(events[-1], Trailer)


def test_a_lane_that_never_ended_is_a_truncated_wire() -> None:
    with pytest.raises(MigpipeError, match="lanes 1 never ended") as caught:
        read_all(forward_wire({1: [b"x"]}, ended=False))
    assert caught.value.status == EXIT_TRUNCATED


def test_lanes_open_in_order_and_only_by_an_open_frame() -> None:
    header = WireWriter(FilterChain([]), lanes=True).header()
    others = LaneWriter()
    skipped = header + LaneWriter().open(2)
    with pytest.raises(MigpipeError, match="lane 2, which was never opened") as caught:
        read_all(skipped)
    assert caught.value.status == EXIT_CORRUPT
    others.position(1)  # numbers the lane without opening it
    unopened = header + others.data(1, b"x") + b"x"
    with pytest.raises(MigpipeError, match="lane 1, which was never opened"):
        read_all(unopened)


def test_answers_need_no_open_but_must_end() -> None:
    answers = LaneWriter(back=True)
    wire = bytearray()
    for lane in (0, 3):
        answers.position(lane)
        answers.carried(lane, b"SHUT")
        wire += answers.data(lane, b"SHUT") + b"SHUT"
    wire += answers.end(3)
    with pytest.raises(MigpipeError, match=r"answer direction truncated \(lanes 0 never ended"):
        read_all(bytes(wire), back=True)
    wire += answers.end(0)
    frames = read_all(bytes(wire), back=True)
    assert [(f.lane, f.kind) for f in frames] == [
        (0, FRAME_DATA),
        (3, FRAME_DATA),
        (3, FRAME_END),
        (0, FRAME_END),
    ]


def test_an_end_frame_vouches_for_the_lanes_bytes() -> None:
    (end,) = read_all(forward_wire({1: [b"abc"]}))[3:4]
    assert end.kind == FRAME_END
    tally = LaneTally(1)
    tally.add(b"abc")
    tally.check(end)
    tally.add(b"d")
    with pytest.raises(CorruptError, match="lane 1 carried 4 bytes"):
        tally.check(end)


def test_positions_never_repeat_across_lanes_and_directions() -> None:
    positions = {
        lane_position(lane, sequence, back).index
        for lane in (0, 1, 63)
        for sequence in (0, 1, 2**32 - 1)
        for back in (False, True)
    }
    assert len(positions) == 3 * 3 * 2
    assert lane_position(0, 5).index == 5  # lane 0 forward: version 1's numbering
    assert max(positions) < BACK * 2 <= 2**88  # within encrypt's 11-byte nonce counter


@pytest.mark.parametrize(
    "args,message",
    [
        (["encode", "--qemu", "unix:/nonexistent/q", "--in", "x"], "--in and --qemu"),
        (["decode", "--qemu", "unix:/nonexistent/q", "--out", "x"], "--out and --qemu"),
        (["encode", "--connections", "2"], "--connections needs --qemu, and --connect"),
        (["encode", "--qemu", "unix:/nonexistent/q", "--connections", "2"], "needs --qemu, and"),
        (["encode", "--qemu", "unix:/x", "--listen", ":0", "--connections", "0"], "from 1 to 64"),
        (
            ["migrate", "--qmp", "/nonexistent", "--postcopy", "--connections", "2", "--", "true"],
            "--connections needs --postcopy or --multifd, and --connect or --listen",
        ),
    ],
)
def test_qemu_option_mistakes_are_one_line(args: list[str], message: str) -> None:
    result = migpipe(*args)
    assert result.returncode == EXIT_USAGE
    assert message in result.stderr.decode()
    assert len(result.stderr.splitlines()) == 1


def resumed_round_trip(tmp_path: Path, stream: bytes, resumed: bool) -> tuple[bytes, bytes]:
    """`stream` through encode as the two-way tunnel sends lane 0 (resumed or not), and the
    wire back through decode expecting a resumed one: the wire and what decode wrote."""
    source, wire, out = tmp_path / "in", tmp_path / "wire", tmp_path / "out"
    source.write_bytes(stream)
    sent = bytearray()
    with open(source, "rb") as i, open(os.devnull, "wb") as nowhere:

        def send(parts: list) -> None:
            sent.extend(b"".join(parts))

        run_trio(partial(encode, i.fileno(), nowhere.fileno(), [], send=send, resumed=resumed))
    wire.write_bytes(sent)
    with open(wire, "rb") as i, open(out, "wb") as o:
        run_trio(partial(decode, i.fileno(), o.fileno(), resumed=True))
    return bytes(sent), out.read_bytes()


def test_a_resumed_stream_crosses_unparsed_and_only_to_a_recovery(tmp_path: Path) -> None:
    """A resumed postcopy stream starts mid-stream (no QEVM header, sections begun on the
    broken connection): encode frames it unparsed, its FINAL frame is empty (QEMU's closing
    the connection ends it), and decode gives it only to a recovery (migrate-recover)."""
    stream = bytes(range(256)) * 1000  # no QEMU stream could start like this
    wire, out = resumed_round_trip(tmp_path, stream, resumed=True)
    assert out == stream
    events = read_all(wire, step=4096)
    assert events[0].fields["resumed"] is True  # the header says so, authenticated if sealed
    final = [e for e in events if isinstance(e, Frame) and e.kind == FRAME_FINAL]
    assert [f.payload for f in final] == [b""]
    refused = pytest.raises(IncompatibleError, match="the wire resumes a postcopy migration, where")
    with refused, open(tmp_path / "wire", "rb") as i, open(os.devnull, "wb") as o:
        run_trio(partial(decode, i.fileno(), o.fileno()))


def test_a_recovery_refuses_a_stream_from_its_start(tmp_path: Path) -> None:
    qemu = b"QEVM\x00\x00\x00\x03\x00"  # a file header and QEMU's EOF item
    with pytest.raises(IncompatibleError, match="the wire starts a migration, where a recovery"):
        resumed_round_trip(tmp_path, qemu, resumed=False)
