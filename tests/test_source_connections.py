"""encode --qemu sorts the source QEMU's further connections (tunnel.twoway.SourceRelay) by
their first bytes and by whether the main stream advised postcopy: a multifd channel's magic
makes a lane; another migration stream (QEMU's header) is refused and the migration goes on;
postcopy-preempt's connection, which says nothing until a page is asked for, gets its lane at
once, and keeps it for the next if it turns out to be another stream. Real UNIX sockets, a
fake source QEMU, the wire read as decode reads it."""

import logging
import socket
import struct
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from migpipe.running import run_trio
from migpipe.stream.multifd import MAGIC
from migpipe.stream.records import (
    Command,
    Configuration,
    FileHeader,
    OpaqueData,
    SectionFooter,
    SectionFull,
)
from migpipe.stream.writer import write_records
from migpipe.tunnel.twoway import encode_two_way
from migpipe.wire import FRAME_DATA, FRAME_OPEN, Frame, WireReader

QEMU_HEADER = b"QEVM\x00\x00\x00\x03"
MULTIFD_HELLO = struct.pack(">IIB", MAGIC, 1, 0) + bytes(16 + 1 + 39 + 3)  # magic first
PAGE = bytes(8) + bytes(4096)  # a postcopy page record's start: a be64 offset, no magic
PATIENCE = 10.0  # s: how long anything here may take (a failure, not a pace)


class Wire(threading.Thread):
    """The wire's forward direction, read as decode reads it: each lane's OPEN and bytes."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.reader = WireReader()
        self.opened: list[int] = []
        self.carried: dict[int, bytes] = {}
        self.changed = threading.Condition()

    def run(self) -> None:
        while chunk := self.sock.recv(1 << 16):
            self.reader.feed(chunk)
            for event in self.reader.next_events():
                if isinstance(event, Frame) and event.lane:
                    with self.changed:
                        if event.kind == FRAME_OPEN:
                            self.opened.append(event.lane)
                        elif event.kind == FRAME_DATA:
                            got = self.carried.get(event.lane, b"")
                            self.carried[event.lane] = got + event.payload
                        self.changed.notify_all()

    def until(self, done: Callable[[], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(done, PATIENCE), (self.opened, self.carried)


def refused(sock: socket.socket) -> bool:
    """Whether encode ended the connection (it sends nothing to a source QEMU of its own)."""
    sock.settimeout(PATIENCE)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def run_source(tmp_path: Path, postcopy: bool, fake: Callable[[str, Wire], None]) -> None:
    """encode --qemu on a UNIX socket whose main connection starts a stream that advises
    postcopy or not (the first section tells), then `fake(address, wire)` as the source QEMU
    opening its further connections; encode is cancelled once `fake` returned."""
    address = f"unix:{tmp_path / 'src.sock'}"
    ours, theirs = socket.socketpair()
    wire = Wire(ours)
    wire.start()
    advise = [Command(3, bytes(16))] if postcopy else []
    prologue = write_records([FileHeader(3), Configuration("pc-q35-10.0"), *advise])
    section = write_records(
        [SectionFull(3, "timer", 0, 2), OpaqueData(bytes(24)), SectionFooter(3)]
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(encode_two_way, address, PATIENCE, theirs.fileno(), []))
            qemu.connect(address.removeprefix("unix:"))
            qemu.sendall(prologue if postcopy else prologue + section)
            await trio.to_thread.run_sync(fake, address, wire)
            nursery.cancel_scope.cancel()  # the main stream still open: nothing is truncated

    with socket.socket(socket.AF_UNIX) as qemu:
        run_trio(main)
    theirs.close()


def connect(address: str, first: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address.removeprefix("unix:"))
    sock.sendall(first)
    return sock


def test_without_postcopy_only_multifd_channels_are_lanes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def fake(address: str, wire: Wire) -> None:
        assert refused(connect(address, QEMU_HEADER))
        channel = connect(address, MULTIFD_HELLO[:2])  # its magic in two writes: 2 bytes tell
        channel.sendall(MULTIFD_HELLO[2:])  # nothing, whenever encode looks
        wire.until(lambda: wire.carried.get(1) == MULTIFD_HELLO)
        assert refused(connect(address, PAGE))  # no postcopy: nothing without magic is QEMU's
        silent = connect(address)
        silent.shutdown(socket.SHUT_WR)  # closed, having said nothing
        assert refused(silent)
        channel.close()

    with caplog.at_level(logging.WARNING, "migpipe"):
        run_source(tmp_path, False, fake)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "it is another migration stream (QEMU's header): one QEMU migrates per encode",
        f"it is no connection of this migration (its first bytes are {PAGE[:4].hex()})",
        "it is no connection of this migration (it said nothing)",
    ]


def test_postcopy_preempt_lane_is_kept_for_the_real_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def fake(address: str, wire: Wire) -> None:
        intruder = connect(address)  # says nothing yet: taken for preempt's at once
        wire.until(lambda: wire.opened == [1])
        intruder.sendall(QEMU_HEADER)
        assert refused(intruder)
        preempt = connect(address)  # the real one: lane 1 again, no second OPEN
        preempt.sendall(PAGE)
        wire.until(lambda: wire.carried.get(1) == PAGE)
        channel = connect(address, MULTIFD_HELLO)  # QEMU 10.1 has multifd with postcopy
        wire.until(lambda: wire.carried.get(2) == MULTIFD_HELLO)
        assert refused(connect(address, QEMU_HEADER))
        assert wire.opened == [1, 2]
        preempt.close()
        channel.close()

    with caplog.at_level(logging.WARNING, "migpipe"):
        run_source(tmp_path, True, fake)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "it is another migration stream (QEMU's header): one QEMU migrates per encode"
    ] * 2
