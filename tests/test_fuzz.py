"""Mutated streams: the parser accepts (and then rewrites byte-identically) or raises MigpipeError.

Mutations are bit flips, truncations, splices and insertions, aimed both anywhere and at the
structure-dense parts of a stream (its head and its device-state tail). The corpus is a small
synthetic stream plus, where QEMU exists, small streams a real QEMU wrote.
"""

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migpipe.errors import MigpipeError
from migpipe.stream import format as fmt
from migpipe.stream.parser import StreamParser
from migpipe.stream.writer import write_records
from migpipe.synthetic import GuestModel, SyntheticGuest

SYNTHETIC = write_records(
    SyntheticGuest(GuestModel(ram_size=256 << 10, iterations=3, dirty_share=0.3)).records()
)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def parse_or_refuse(data: bytes, chunk: int) -> None:
    """The property: MigpipeError or a byte-identical rewrite; nothing else, and it ends."""
    parser = StreamParser()
    records = []
    try:
        for at in range(0, len(data), chunk):
            parser.feed(data[at : at + chunk])
            records += parser.next_records()
        parser.close()
        records += parser.next_records()
    except MigpipeError as e:
        assert e.offset is None or 0 <= e.offset <= len(data)
        return
    assert write_records(records) == data


@st.composite
def mutations(draw: st.DrawFn, streams: list[bytes]) -> tuple[bytes, int]:
    data = bytearray(streams[draw(st.integers(0, len(streams) - 1))])  # an index: short reprs
    for _ in range(draw(st.integers(1, 4))):
        head = min(len(data), 1 << 16)
        where = draw(
            st.one_of(
                st.integers(0, head - 1),  # header, configuration, block list, first pages
                st.integers(max(0, len(data) - 8192), len(data) - 1),  # device state, vmdesc
                st.integers(0, len(data) - 1),
            )
        )
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "byte"]))
        if kind == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[where] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x04, 0x05, 0x7E, 0xFF]))
        elif kind == "truncate":
            del data[where:]
        elif kind == "splice":
            length = draw(st.integers(1, 64))
            source = draw(st.integers(0, max(0, len(data) - length)))
            data[where : where + length] = data[source : source + length]
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            break
    chunk = draw(st.sampled_from([1 << 20, 4096, 333, 1]))
    return bytes(data), chunk if chunk > 1 or len(data) < 100_000 else 4096


@FUZZ
@given(mutations([SYNTHETIC]))
def test_mutated_synthetic_streams(case: tuple[bytes, int]) -> None:
    parse_or_refuse(*case)


@pytest.mark.qemu
@FUZZ
@given(data=st.data())
def test_mutated_real_streams(small_qemu_streams: list[bytes], data: st.DataObject) -> None:
    parse_or_refuse(*data.draw(mutations(small_qemu_streams)))


@pytest.fixture(scope="module")
def small_qemu_streams(qemu_streams: dict[str, Path]) -> list[bytes]:
    return [path.read_bytes() for path in qemu_streams.values()]


def header_then(*items: bytes) -> bytes:
    return b"QEVM" + fmt.BE32.pack(3) + b"".join(items)


CONFIG = b"\x07" + fmt.BE32.pack(13) + b"pc-i440fx-7.2"
RAM_START = b"\x01" + fmt.BE32.pack(2) + b"\x03ram" + fmt.BE32.pack(0) + fmt.BE32.pack(4)
HOSTILE_LENGTHS = {
    "machine name": header_then(b"\x07\xff\xff\xff\xff"),
    "capabilities count": header_then(
        CONFIG, b"\x05\x1aconfiguration/capabilities", fmt.BE32.pack(1), b"\xff\xff\xff\xff"
    ),
    "packaged blob": header_then(CONFIG, b"\x08\x00\x07\x00\x04\xff\xff\xff\xff"),
    "vm description": header_then(CONFIG, b"\x00\x06\xff\xff\xff\xff"),
    "mem size total": header_then(CONFIG, RAM_START, fmt.BE64.pack((1 << 63) | 4)),
    "compressed page": header_then(
        CONFIG,
        RAM_START,
        fmt.BE64.pack(0x1000 | 4) + b"\x06pc.ram" + fmt.BE64.pack(0x1000),
        fmt.BE64.pack(0x100) + b"\x06pc.ram\xff\xff\xff\xff",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LENGTHS))
def test_untrusted_lengths_never_drive_allocation(name: str) -> None:
    """A length field of 4 GiB (or 2^63) is refused or waited for, never allocated."""
    data = HOSTILE_LENGTHS[name]
    tracemalloc.start()
    try:
        parser = StreamParser()
        parser.feed(data)
        try:
            parser.next_records()
            parser.feed(bytes(1 << 16))  # more bytes arrive, but far fewer than announced
            parser.next_records()
            parser.close()
            parser.next_records()
            raise AssertionError("a stream with a hostile length was accepted")
        except MigpipeError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{name}: {peak} bytes allocated"
