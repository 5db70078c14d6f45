"""Buffers bounded in time (migpipe.io.latency, issue 21): what the tunnel holds between QEMU
and the link is what a stopped guest waits for, so it follows the measured rate."""

import fcntl
import os
import select
import socket
import subprocess
import threading

import pytest
from support import MIGPIPE, decode_wire, synthetic_stream

from migpipe.io import latency
from migpipe.io.channel import FdChannel
from migpipe.io.latency import MAX_PIPE, MIN_PIPE, MIN_WIRE_PIPE, PipeBuffer, Rate
from migpipe.io.transport import UNSENT, connect, listen
from migpipe.keys import Secrets
from migpipe.wire import Frame, WireReader


class Clock:
    """time.monotonic for io.latency, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(latency.time, "monotonic", clock)
    return clock


def rate_of(clock: Clock, per_second: float) -> Rate:
    rate = Rate()
    clock.now += 0.1  # two windows
    assert rate.add(int(per_second * 0.1))
    return rate


def move(clock: Clock, buffer: PipeBuffer, per_second: float) -> None:
    """Two windows' worth of bytes at `per_second` through `buffer`."""
    clock.now += 0.1
    assert buffer.moved(int(per_second * 0.1))


def test_a_rate_is_known_once_a_window_closed(clock: Clock) -> None:
    rate = Rate()
    assert rate.per_second is None and rate.budget(10, 1000) == 10  # small until known
    assert not rate.add(1000)
    clock.now += 0.03
    assert not rate.add(1000) and rate.per_second is None
    clock.now += 0.03
    assert rate.add(3000)
    assert rate.per_second == pytest.approx(5000 / 0.06)
    clock.now += 0.1  # the next window starts where the last one closed
    assert rate.add(0)
    assert rate.per_second == 0


@pytest.mark.parametrize(
    "per_second,expected",
    [(1e6, 64 << 10), (30e6, 120_000), (100e6, 400_000), (1e9, 1 << 20)],
)
def test_a_budget_is_buffer_time_at_the_rate_within_bounds(
    clock: Clock, per_second: float, expected: int
) -> None:
    assert rate_of(clock, per_second).budget(64 << 10, 1 << 20) == expected


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


@pytest.mark.parametrize(
    "per_second,expected",
    [(1e6, MIN_PIPE), (10e6, 64 << 10), (30e6, 128 << 10), (100e6, 512 << 10), (1e9, MAX_PIPE)],
)
def test_a_pipe_holds_buffer_time_at_the_rate_through_it(
    clock: Clock, per_second: float, expected: int
) -> None:
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)  # as open_output left it
        buffer = PipeBuffer(FdChannel(write_end))
        assert pipe_size(read_end) == MIN_PIPE  # small until the rate is known
        move(clock, buffer, per_second)
        assert pipe_size(read_end) == expected
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_full_pipe_keeps_its_size_until_it_can_shrink(clock: Clock) -> None:
    read_end, write_end = os.pipe()
    try:
        buffer = PipeBuffer(FdChannel(write_end))
        move(clock, buffer, 1e9)
        os.write(write_end, bytes(512 << 10))
        move(clock, buffer, 1e6)  # EBUSY: more is in it than 16 KiB
        assert pipe_size(read_end) == MAX_PIPE
        os.read(read_end, 1 << 20)
        move(clock, buffer, 1e6)
        assert pipe_size(read_end) == MIN_PIPE
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_pipe_whose_bytes_expand_holds_wire_time_of_what_they_become(clock: Clock) -> None:
    """decode's wire in: xbzrle deltas become pages many times their size, so the pipe holds
    no more than WIRE_TIME of the rate the pages go on at, in wire bytes at the latest frames'
    expansion, at once (not its own rate's, which lags while the expansion grows), in a pipe
    as small as a page."""
    read_end, write_end = os.pipe()
    try:
        buffer = PipeBuffer(FdChannel(read_end))
        move(clock, buffer, 30e6)  # the link's rate: 4 ms is 128 KiB
        assert pipe_size(read_end) == 128 << 10
        pages = rate_of(clock, 100e6)  # rebuilt and loaded: 1 ms is 100 KB of pages
        buffer.expands(4 << 10, 1 << 20, pages)  # 1 wire byte in 256: 390 bytes of wire
        assert pipe_size(read_end) == MIN_WIRE_PIPE
        pages = rate_of(clock, 1.5e9)  # 1 ms is 1.5 MB of pages
        for _ in range(8):  # 1 in 16 now: 94 KB of wire, the largest power of two below
            buffer.expands(64 << 10, 1 << 20, pages)
        assert pipe_size(read_end) == 64 << 10
        for _ in range(8):  # frames of whole pages again: the link's rate bounds it
            buffer.expands(1 << 20, 1 << 20, pages)
        assert pipe_size(read_end) == 128 << 10
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("per_second,expected", [(1e6, MIN_PIPE), (30e6, 128 << 10)])
def test_a_unix_socket_holds_buffer_time_at_the_rate_through_it(
    clock: Clock, per_second: float, expected: int
) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        buffer = PipeBuffer(FdChannel(ours.fileno()))
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == MIN_PIPE
        move(clock, buffer, per_second)
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == expected


def test_a_tcp_socket_keeps_the_kernels_buffers(clock: Clock) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as sock:
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        move(clock, PipeBuffer(FdChannel(sock.fileno())), 1e6)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before


def test_a_file_is_left_alone(clock: Clock, tmp_path) -> None:
    with open(tmp_path / "f", "wb") as f:
        move(clock, PipeBuffer(FdChannel(f.fileno())), 1e9)  # no error, nothing to size


def test_encode_sends_what_it_holds_when_qemu_goes_quiet() -> None:
    """QEMU between two passes: the records encode read must not wait for the next pass."""
    stream = synthetic_stream(4 << 20, 2, seed=3)
    part = stream[:40_000]  # less than the smallest frame, and QEMU keeps its end open
    proc = subprocess.Popen([*MIGPIPE, "encode"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdin.write(part)
        proc.stdin.flush()
        reader, wire, carried = WireReader(), bytearray(), 0
        while carried == 0:
            ready, _, _ = select.select([proc.stdout], [], [], 30)  # a failsafe, not a wait
            assert ready, "encode held the records it read while its input was quiet"
            chunk = os.read(proc.stdout.fileno(), 1 << 20)
            wire += chunk
            reader.feed(chunk)
            frames = [e for e in reader.next_events() if type(e) is Frame]
            carried += sum(len(frame.payload) for frame in frames)  # no filters: QEMU's bytes
        assert 0 < carried <= len(part)  # whole records, nothing invented
        rest, _ = proc.communicate(stream[len(part) :], timeout=60)
        assert proc.returncode == 0
        assert decode_wire([bytes(wire + rest)], Secrets()) == (stream, None)
    finally:
        proc.kill()
        proc.wait()


def test_a_tcp_connection_keeps_little_unsent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        spec = f"127.0.0.1:{probe.getsockname()[1]}"
    accepted: list[int] = []

    def serve() -> None:
        with listen(spec, timeout=30) as conn:
            accepted.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT))

    server = threading.Thread(target=serve)
    server.start()
    with connect(spec, timeout=30) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == UNSENT
    server.join(30)
    assert accepted == [UNSENT]
