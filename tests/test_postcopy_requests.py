"""Postcopy's page requests and their pages, sans I/O (migpipe.stream.postcopy): the
destination's return path, the postcopy-preempt channel's records, and the times between."""

import struct

import pytest

from migpipe.errors import CorruptError
from migpipe.stream import format as fmt
from migpipe.stream.postcopy import (
    BITMAP_END,
    PreemptReader,
    Request,
    RequestTimes,
    ReturnPathReader,
)


def message(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


def req_pages_id(start: int, length: int, block: str) -> bytes:
    name = block.encode()
    return message(3, struct.pack(">QIB", start, length, len(name)) + name)


def req_pages(start: int, length: int) -> bytes:
    return message(4, struct.pack(">QI", start, length))


def recv_bitmap(block: str, bitmap: bytes) -> bytes:
    name = block.encode()
    trailer = struct.pack(">Q", len(bitmap)) + bitmap + struct.pack(">Q", BITMAP_END)
    return message(5, bytes([len(name)]) + name) + trailer


def read_split(reader, data: bytes, step: int) -> list:
    out = []
    for at in range(0, len(data), step):
        out += reader.feed(data[at : at + step])
    return out


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_page_requests_come_out_of_the_return_path_split_anywhere(step: int) -> None:
    path = (
        message(2, b"\0\0\0\1")  # PONG
        + req_pages_id(0x5000, 4096, "pc.ram")
        + req_pages(0x9000, 4096)
        + recv_bitmap("pc.ram", bytes(range(16)) * 3)  # a recovery's bitmap, skipped whole
        + req_pages_id(0x2000, 2 << 20, "other")
        + req_pages(0, 4096)
        + message(7)  # SWITCHOVER_ACK
        + message(1, b"\0\0\0\0")  # SHUT
    )
    assert read_split(ReturnPathReader(), path, step) == [
        Request("pc.ram", 0x5000, 4096),
        Request("pc.ram", 0x9000, 4096),
        Request("other", 0x2000, 2 << 20),
        Request("other", 0, 4096),
    ]


@pytest.mark.parametrize(
    "path,message_",
    [
        (req_pages(0, 4096), "before any block was named"),
        (message(3, struct.pack(">QIB", 0, 4096, 9) + b"short"), "block name does not fit"),
        (message(4, bytes(513)), "return-path message of 513 bytes"),
        (message(5, b"\3ram") + struct.pack(">Q", 1 << 41), "bitmap of"),
    ],
)
def test_a_return_path_it_cannot_follow_is_an_error(path: bytes, message_: str) -> None:
    with pytest.raises(CorruptError, match=message_):
        ReturnPathReader().feed(path)


def record(offset: int, flags: int, block: str | None = None, page: bytes = b"") -> bytes:
    word = struct.pack(">Q", offset | flags | (0 if block else fmt.RAM_CONTINUE))
    named = bytes([len(block)]) + block.encode() if block else b""
    return word + named + page


@pytest.mark.parametrize("step", [1, 5, 4096, 10000])
def test_the_preempt_channels_pages_are_named_by_block_and_offset(step: int) -> None:
    channel = (
        record(0x7000, fmt.RAM_PAGE, "pc.ram", bytes(range(256)) * 16)
        + record(0x8000, fmt.RAM_ZERO, page=b"\0")
        + record(0x3000, fmt.RAM_PAGE, "vga.vram", b"\xff" * 4096)
        + record(0, fmt.RAM_EOS)
    )
    reader = PreemptReader()
    assert read_split(reader, channel, step) == [
        ("pc.ram", 0x7000),
        ("pc.ram", 0x8000),
        ("vga.vram", 0x3000),
    ]
    assert reader.ended


@pytest.mark.parametrize(
    "channel,message_",
    [
        (record(0x1000, fmt.RAM_XBZRLE, "pc.ram"), "flags 0x40"),
        (record(0x1000, fmt.RAM_PAGE, page=bytes(4096)), "continues no block"),
    ],
)
def test_a_preempt_channel_it_cannot_follow_is_an_error(channel: bytes, message_: str) -> None:
    with pytest.raises(CorruptError, match=message_):
        PreemptReader().feed(channel)


def test_each_request_is_timed_to_its_own_page() -> None:
    times = RequestTimes()
    assert times.figures() is None
    times.requested(Request("pc.ram", 0x1000, 4096), 10.000)
    times.requested(Request("pc.ram", 0x2000, 4096), 10.001)
    times.requested(Request("pc.ram", 0x1000, 4096), 10.002)  # asked again: timed from the first
    times.arrived("pc.ram", 0x3000, 10.003)  # a page nobody asked for
    times.arrived("pc.ram", 0x2000, 10.005)
    times.arrived("pc.ram", 0x1000, 10.009)
    times.requested(Request("pc.ram", 0x4000, 4096), 10.010)  # never answered
    figures = times.figures()
    assert figures == {
        "requests": 4,
        "answered": 2,
        "median_ms": pytest.approx(6.5),
        "p90_ms": pytest.approx(9.0),
        "max_ms": pytest.approx(9.0),
    }
