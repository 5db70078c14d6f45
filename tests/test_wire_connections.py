"""Version 2 of the wire spread over several connections, sans I/O (migpipe-wire(5),
"Connections"): the header's count and session, each further connection's JOIN, and which
lanes each connection may carry."""

import pytest
from test_wire_lanes import forward_wire, lane_frames
from test_wire_lanes import read_all as lanes_read_all

from migpipe.chain import FilterChain
from migpipe.errors import EXIT_CORRUPT, EXIT_TRUNCATED, CorruptError, MigpipeError
from migpipe.wire import (
    FRAME_DATA,
    FRAME_END,
    FRAME_OPEN,
    JOIN_SIZE,
    MAX_CONNECTIONS,
    SESSION_SIZE,
    Connections,
    Join,
    Trailer,
    WireReader,
    WireWriter,
    lane_connection,
    parse_join,
)

SESSION = bytes(range(SESSION_SIZE))
THREE = Connections(3, SESSION)


def read_all(data: bytes, reader: WireReader) -> list:
    return lanes_read_all(data, step=5, reader=reader)


def main_connection(connections: Connections, lanes: dict[int, list[bytes]] | None = None) -> bytes:
    """The first connection of a spread wire: the header, lane 0's frames, the trailer, and
    (wrongly, when given) other lanes."""
    return forward_wire(lanes or {}, connections=connections)


def further_connection(lanes: dict[int, list[bytes]], join: Join | None) -> bytes:
    """A further connection: its JOIN (when given), then each lane opened, carried, ended."""
    return (join.encode() if join else b"") + lane_frames(lanes)


def test_lanes_spread_the_main_stream_alone_on_the_first() -> None:
    assert [lane_connection(lane, 1) for lane in range(4)] == [0, 0, 0, 0]
    assert [lane_connection(lane, 2) for lane in range(4)] == [0, 1, 1, 1]
    assert [lane_connection(lane, 3) for lane in range(6)] == [0, 1, 2, 1, 2, 1]
    assert [lane_connection(lane, 5) for lane in range(1, 5)] == [1, 2, 3, 4]  # 4 channels


def test_the_header_names_count_and_session_and_one_connection_is_the_old_wire() -> None:
    events = read_all(main_connection(THREE), WireReader())
    assert events[0].fields["connections"] == 3
    assert Connections.of(events[0]) == THREE
    assert isinstance(events[-1], Trailer)
    plain = WireWriter(FilterChain([]), lanes=True).header()
    assert b"connections" not in plain and b"session" not in plain


def test_a_further_connection_joins_and_carries_its_own_lanes() -> None:
    join = Join(SESSION, 2, 3)
    data = further_connection({2: [b"multifd 1"], 4: [b"multifd 3", b"more"]}, join)
    reader = WireReader(joined=True)
    events = read_all(data, reader)
    assert events[0] == join and reader.place == join
    frames = [(e.lane, e.kind, e.payload) for e in events[1:]]
    assert frames[:2] == [(2, FRAME_OPEN, b""), (2, FRAME_DATA, b"multifd 1")]
    assert [f[:2] for f in frames[2:]] == [
        (2, FRAME_END),
        (4, FRAME_OPEN),
        (4, FRAME_DATA),
        (4, FRAME_DATA),
        (4, FRAME_END),
    ]
    join.check(THREE)


def test_the_dialing_side_knows_its_place_without_a_join() -> None:
    place = Join(SESSION, 1, 2)
    events = read_all(
        further_connection({1: [b"page"], 2: [b"page"]}, None), WireReader(place=place)
    )
    assert [(e.lane, e.kind) for e in events if e.kind != FRAME_DATA] == [
        (1, FRAME_OPEN),
        (1, FRAME_END),
        (2, FRAME_OPEN),
        (2, FRAME_END),
    ]


@pytest.mark.parametrize(
    ("data", "reader", "message"),
    [
        # lane 1 travels on connection 1 of 3, never on the first
        (main_connection(THREE, {1: [b"x"]}), WireReader(), "lane 1 on connection 0, not on 1"),
        # connection 2 of 3 carries lanes 2, 4, ...: lane 3 is connection 1's
        (
            further_connection({3: [b"x"]}, Join(SESSION, 2, 3)),
            WireReader(joined=True),
            "lane 3 on connection 2, not on 1",
        ),
        # its lanes open in order: 4 before 2 skips one
        (
            further_connection({4: [b"x"]}, Join(SESSION, 2, 3)),
            WireReader(joined=True),
            "lane 4, which was never opened",
        ),
        # no lane 0 on a further connection
        (
            further_connection({0: [b"x"]}, Join(SESSION, 1, 3)),
            WireReader(joined=True),
            "lane 0 on connection 1, not on 0",
        ),
    ],
)
def test_lanes_on_the_wrong_connection_are_refused(
    data: bytes, reader: WireReader, message: str
) -> None:
    with pytest.raises(MigpipeError, match=message) as caught:
        read_all(data, reader)
    assert caught.value.status == EXIT_CORRUPT


def test_a_further_connection_cut_short_is_truncated_not_complete() -> None:
    data = further_connection({1: [b"page"]}, Join(SESSION, 1, 2))
    with pytest.raises(MigpipeError, match=r"connection 1 truncated \(lanes 1 never ended") as c:
        read_all(data[:-20], WireReader(joined=True))
    assert c.value.status == EXIT_TRUNCATED
    with pytest.raises(MigpipeError, match="truncated in its preamble") as c:
        read_all(data[: JOIN_SIZE - 1], WireReader(joined=True))
    assert c.value.status == EXIT_TRUNCATED
    assert read_all(data[:JOIN_SIZE], WireReader(joined=True)) == [Join(SESSION, 1, 2)]


@pytest.mark.parametrize("at", range(JOIN_SIZE - 4))
def test_every_byte_of_a_join_is_checked(at: int) -> None:
    data = bytearray(Join(SESSION, 1, 2).encode())
    data[at] ^= 0x20
    with pytest.raises(CorruptError):
        parse_join(data)


@pytest.mark.parametrize(
    ("join", "message"),
    [
        (Join(bytes(SESSION_SIZE), 1, 3), "another session"),
        (Join(SESSION, 1, 2), "joined 2 connections, the header says 3"),
    ],
)
def test_a_join_from_another_wire_is_refused(join: Join, message: str) -> None:
    with pytest.raises(CorruptError, match=message):
        join.check(THREE)


@pytest.mark.parametrize(("index", "count"), [(0, 2), (2, 2), (1, 1), (1, MAX_CONNECTIONS + 1)])
def test_a_join_outside_its_count_is_refused(index: int, count: int) -> None:
    head = Join(SESSION, index, count).encode()
    with pytest.raises(CorruptError, match=f"joined as {index} of {count}"):
        parse_join(head)


@pytest.mark.parametrize(
    "fields",
    [
        {"connections": 0, "session": SESSION.hex()},
        {"connections": MAX_CONNECTIONS + 1, "session": SESSION.hex()},
        {"connections": "2", "session": SESSION.hex()},
        {"connections": 2},
        {"connections": 2, "session": "zz" * SESSION_SIZE},
        {"connections": 2, "session": SESSION.hex()[:-2]},
    ],
)
def test_a_header_with_nonsense_connections_is_refused(fields: dict) -> None:
    from migpipe.wire import MAGIC, VERSION_LANES
    from migpipe.wire.header import encode_header

    header = encode_header(MAGIC, VERSION_LANES, {"filters": [], "page_size": 4096, **fields})
    with pytest.raises(CorruptError, match="malformed wire header"):
        read_all(header, WireReader())


def test_a_listener_tells_a_wires_first_connection_from_the_others() -> None:
    from migpipe.wire import FIRST_SIZE, starts_wire

    header = WireWriter(FilterChain([]), lanes=True, connections=THREE).header()
    assert starts_wire(header[:FIRST_SIZE])
    assert not starts_wire(Join(SESSION, 1, 3).encode()[:FIRST_SIZE])
    with pytest.raises(MigpipeError, match="not a migpipe wire"):
        starts_wire(b"GET / HTTP")


def test_decode_refuses_a_spread_wire_it_cannot_take_in_one_line(tmp_path) -> None:
    """A wire whose header says it is spread over connections, handed to decode --qemu on its
    stdin (a pipe has no further connections): one line, and QEMU gets nothing of the stream
    but what fails its load at once (NOT_A_STREAM)."""
    import socket
    import subprocess

    from support import MIGPIPE

    from migpipe.errors import EXIT_USAGE
    from migpipe.io.channel import NOT_A_STREAM

    qemu = tmp_path / "qemu.sock"
    with socket.socket(socket.AF_UNIX) as listener:  # the destination QEMU, listening
        listener.bind(str(qemu))
        listener.listen(1)
        result = subprocess.run(
            [*MIGPIPE, "decode", "--qemu", f"unix:{qemu}"],
            input=main_connection(THREE),
            capture_output=True,
            timeout=60,
        )
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            assert conn.recv(1 << 16) == NOT_A_STREAM
    lines = result.stderr.decode().splitlines()
    assert result.returncode not in (0, EXIT_USAGE), result
    assert lines == [
        "migpipe decode: error: the wire is spread over 3 connections: decode takes them "
        "with --listen or --connect"
    ], lines
