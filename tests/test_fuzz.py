"""Mutated streams: the parser accepts (and then rewrites byte-identically) or raises MigpipeError.

Mutations are bit flips, truncations, splices and insertions, aimed both anywhere and at the
structure-dense parts of a stream (its head and its device-state tail). The corpus is a small
synthetic stream plus, where QEMU exists, small streams a real QEMU wrote.

Wires (migpipe-wire(5)) made by the real encoder are mutated too, in their bytes, their frames
and their header's JSON, and then every checksum is fixed up, so that what is fuzzed is decode's
checks past the CRCs; and libvirt save images, in their header's words, their XML and their body.
"""

# Before a release, a longer run (the wire and libvirt targets take about 15 s per 3000 examples
# each; where QEMU is installed, the real-stream target takes far longer):
#   FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py tests/test_fixed_fuzz.py \
#       -p no:timeout

import functools
import json
import operator
import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isal.isal_zlib import crc32
from test_libvirtimage import COMPRESS, COOKIE, image
from test_tunnel import eof_at

from migpipe import wire
from migpipe.chain import parse_chain
from migpipe.errors import MigpipeError
from migpipe.io.channel import CHUNK
from migpipe.keys import Secrets, keygen
from migpipe.save.libvirtimage import HEADER_SIZE, MAX_DATA_LEN, LibvirtImageReader
from migpipe.stream import format as fmt
from migpipe.stream.parser import StreamParser
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.tunnel.pipeline import decode_chunks, encode
from migpipe.wire import FRAME_HEADER_SIZE
from migpipe.wire.header import SEALED, TAG_SIZE

SYNTHETIC = write_records(
    SyntheticGuest(GuestModel(ram_size=256 << 10, iterations=3, dirty_share=0.3)).records()
)
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 250)),
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
def small_qemu_streams(every_build_streams: list[Path]) -> list[bytes]:
    return [path.read_bytes() for path in every_build_streams]


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


# -- wires: mutated, then every checksum fixed up -----------------------------------------------

WIRE_CHAINS = ["", "zstd:1", "lz4", "xbzrle", "xbzrle,zstd", "encrypt", "xbzrle,zstd:1,encrypt"]
WIRE_STREAM = write_records(
    SyntheticGuest(GuestModel(ram_size=64 << 10, iterations=2, dirty_share=0.5)).records()
)
WIRE_TAIL = WIRE_STREAM[eof_at(WIRE_STREAM) :]  # what the final frame carries
# A damaged frame decodes to at most what it announces, a few records more than the frame it
# was: four mutations (a repeated frame at most each) stay far below twice the stream.
WIRE_OUTPUT_LIMIT = 2 * len(WIRE_STREAM)
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 3, 1023, 4096, 4097, 1 << 16, 1 << 30, 1 << 31, 1 << 64]),
    st.floats(),
    st.text(max_size=8),
)
JSON_EDITS = st.one_of(
    JSON_VALUES,
    st.lists(JSON_VALUES, max_size=3),
    st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=2),
)
DELETE, NEST, DIGITS = object(), object(), object()  # edits that are not a value to put
SPLICED = "\ue000"  # stands for raw text: the value nested deep, or a number of 5000 digits


class Corpus:
    """What mutations start from; its repr stays short in Hypothesis's failure reports."""

    def __init__(self, items: list[bytes], key: Path | None = None) -> None:
        self.items, self.key = items, key

    def __repr__(self) -> str:
        return f"Corpus({len(self.items)} items)"


@pytest.fixture(scope="module")
def wires(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """WIRE_STREAM through the real encoder in each chain of WIRE_CHAINS, and the key file.

    Frames of about 8 KiB (not 1 MiB) give each wire a dozen or so to drop, repeat and swap.
    """
    directory = tmp_path_factory.mktemp("wires")
    key, source, sink = directory / "key", directory / "stream", directory / "wire"
    keygen(key)
    source.write_bytes(WIRE_STREAM)
    found = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("migpipe.tunnel.pipeline.FRAME_TARGET", 8 << 10)
        patch.setattr("migpipe.io.channel.CHUNK", 8 << 10)
        for chain in WIRE_CHAINS:
            with open(source, "rb") as i, open(sink, "wb") as o:
                filters = parse_chain(chain, Secrets(key_file=str(key)))
                trio.run(encode, i.fileno(), o.fileno(), filters)
            found.append(sink.read_bytes())
    return Corpus(found, key)


def header_end(wire: bytes | bytearray) -> int | None:
    """Where the header ends, going by its length and flags; None when the wire is shorter."""
    if len(wire) < 12:
        return None
    end = 12 + fmt.BE16.unpack_from(wire, 10)[0] + (TAG_SIZE if wire[9] & SEALED else 0) + 4
    return end if end <= len(wire) else None


def frame_spans(wire: bytes | bytearray, start: int) -> list[tuple[int, int]]:
    """(start, end) of each frame from `start` on, going by their length fields; the last may
    end past the end of `wire`."""
    spans = []
    while start + FRAME_HEADER_SIZE <= len(wire):
        end = start + FRAME_HEADER_SIZE + fmt.BE32.unpack_from(wire, start + 5)[0]
        spans.append((start, end))
        start = end
    return spans


def with_checksums_fixed(wire: bytearray, renumber: bool) -> bytes:
    """`wire` with every CRC made to agree with its bytes as they are now: the header's, and
    each frame's payload and header CRCs (the trailer's too), the frames numbered in order if
    `renumber`. Only the checks past the CRCs can then refuse it."""
    end = header_end(wire)
    if end is None:
        return bytes(wire)
    wire[end - 4 : end] = fmt.BE32.pack(crc32(wire[: end - 4]))
    for sequence, (start, stop) in enumerate(frame_spans(wire, end)):
        if renumber:
            wire[start + 1 : start + 5] = fmt.BE32.pack(sequence)
        if stop <= len(wire):
            wire[start + 9 : start + 13] = fmt.BE32.pack(
                crc32(wire[start + FRAME_HEADER_SIZE : stop])
            )
        wire[start + 13 : start + 17] = fmt.BE32.pack(crc32(wire[start : start + 13]))
    return bytes(wire)


def json_paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path (keys and indices) of `value` and of everything in it."""
    yield path
    items = (
        value.items() if type(value) is dict else enumerate(value) if type(value) is list else ()
    )
    for key, inner in items:
        yield from json_paths(inner, (*path, key))


def replaced(value: Any, path: tuple, new: Any) -> Any:
    """A copy of `value` with what `path` leads to replaced by `new` (or removed: DELETE)."""
    if not path:
        return new
    copy = value.copy()
    if len(path) == 1 and new is DELETE:
        del copy[path[0]]
    else:
        copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


def edit_header_text(draw: st.DrawFn, wire: bytearray) -> None:
    """Replace one value of the header's JSON: by a number or a value of another type, by
    itself nested up to 30000 deep, or by nothing; the length field follows the text."""
    if header_end(wire) is None:
        return
    text_end = 12 + fmt.BE16.unpack_from(wire, 10)[0]
    try:
        fields = json.loads(wire[12:text_end])
    except (ValueError, RecursionError):  # an earlier edit nested it deep, or broke it
        return
    path = draw(st.sampled_from(list(json_paths(fields))))
    new = draw(st.one_of(JSON_EDITS, st.sampled_from([DELETE, NEST, DIGITS])))
    if new is DELETE and not path:
        new = {}
    raw = None
    if new is NEST:
        depth = draw(st.integers(1, 30000))
        node = json.dumps(functools.reduce(operator.getitem, path, fields))
        raw = "[" * depth + node + "]" * depth
    elif new is DIGITS:
        raw = "9" * 5000  # more digits than int() takes from text
    text = json.dumps(replaced(fields, path, SPLICED if raw else new))
    if raw:
        text = text.replace(json.dumps(SPLICED), raw)
    encoded = text.encode()[:0xFFFF]
    wire[10:text_end] = fmt.BE16.pack(len(encoded)) + encoded


BYTE_MUTATIONS = ["flip", "byte", "truncate", "insert", "delete"]


def mutate_at(draw: st.DrawFn, data: bytearray, kind: str, where: int, values: list[int]) -> None:
    """One of BYTE_MUTATIONS at `where` (or the end): flip a bit, set a byte to one of
    `values`, cut `data` short, insert or delete up to 16 bytes."""
    where = min(where, len(data))
    if kind == "truncate":
        del data[where:]
    elif kind == "insert":
        data[where:where] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del data[where : where + draw(st.integers(1, 16))]
    elif where < len(data) and kind == "flip":
        data[where] ^= 1 << draw(st.integers(0, 7))
    elif where < len(data):
        data[where] = draw(st.sampled_from(values))


@st.composite
def wire_mutations(draw: st.DrawFn, wires: list[bytes]) -> tuple[bytes, int]:
    """A wire of `wires` changed one to four times, its checksums fixed up, and the size of
    the chunks it arrives in."""
    data = bytearray(wires[draw(st.integers(0, len(wires) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        start = header_end(data) or len(data)
        spans = frame_spans(data, start)
        whole = [span for span in spans if span[1] <= len(data)]
        kind = draw(st.sampled_from([*BYTE_MUTATIONS, "header", "repeat", "drop", "swap"]))
        if kind == "header":
            edit_header_text(draw, data)
            continue
        if kind in ("repeat", "drop", "swap"):
            if whole:
                first, second = sorted(
                    draw(st.lists(st.sampled_from(whole), min_size=2, max_size=2))
                )
                if kind == "repeat":
                    data[first[1] : first[1]] = data[first[0] : first[1]]
                elif kind == "drop":
                    del data[first[0] : first[1]]
                elif first != second:
                    data[first[0] : second[1]] = (
                        data[second[0] : second[1]]
                        + data[first[1] : second[0]]
                        + data[first[0] : first[1]]
                    )
            continue
        where = draw(
            st.one_of(
                st.integers(min(8, start), start),  # the header, past its magic
                st.sampled_from(spans or [(0, 0)]).flatmap(  # a frame's header
                    lambda span: st.integers(span[0], span[0] + FRAME_HEADER_SIZE - 1)
                ),
                st.integers(0, len(data)),
            )
        )
        mutate_at(draw, data, kind, where, [0x00, 0x01, 0x44, 0x46, 0x54, 0x7F, 0x80, 0xFF])
    chunk = draw(st.sampled_from([1 << 20, 4096, 333, 17]))
    return with_checksums_fixed(data, draw(st.booleans())), chunk


def decode_or_refuse(data: bytes, chunk: int, secrets: Secrets | None) -> None:
    """The property: the exact stream, or MigpipeError before the stream's end was released;
    nothing else, and never more output than WIRE_OUTPUT_LIMIT."""
    out = bytearray()
    try:
        chunks = (data[at : at + chunk] for at in range(0, len(data), chunk))
        for piece in decode_chunks(chunks, secrets):
            out += piece
            assert len(out) <= WIRE_OUTPUT_LIMIT, f"{len(out)} bytes decoded"
    except MigpipeError as e:
        if "no final frame" not in e.message:  # a final frame relabelled: migpipe-wire(5) BUGS
            assert not out.endswith(WIRE_TAIL), "a damaged wire released the stream's end"
        return
    assert out == WIRE_STREAM


@FUZZ
@given(data=st.data())
def test_mutated_wires(wires: Corpus, data: st.DataObject) -> None:
    """Decoded without a key, with the key, and with the key and --allow-unencrypted."""
    wire, chunk = data.draw(wire_mutations(wires.items))
    assert len(wire) <= 2 * max(map(len, wires.items)) + (64 << 10)  # bounded time per case
    key = str(wires.key)
    for secrets in (
        None,
        Secrets(key_file=key),
        Secrets(key_file=key, allow_unencrypted=True),
    ):
        decode_or_refuse(wire, chunk, secrets)


def tiny_wire(chain: str, frames: list[tuple[int, bytes]]) -> bytes:
    """A wire of `frames` (kind, payload) whose trailer counts them, every checksum right."""
    data = wire.encode_header(parse_chain(chain))
    for sequence, (kind, payload) in enumerate(frames):
        data += wire.encode_frame(kind, sequence, [payload]) + payload
    qemu = b"".join(payload for _, payload in frames)
    totals = wire.Trailer(len(qemu), 0, len(frames), 0)
    return data + wire.encode_trailer(len(frames), totals)


def test_page_filter_error_offsets_count_from_the_wire() -> None:
    """Found by test_mutated_wires: with a page filter, a fault in a frame's records is
    reported at its offset in the rebuilt payloads, not in the wire (migpipe-wire(5))."""
    payload = b"QEVM\x00\x00\x00\x03\x99"  # an unknown section type at payload byte 8
    data = tiny_wire("xbzrle", [(wire.FRAME_DATA, payload), (wire.FRAME_FINAL, b"\x00")])
    with pytest.raises(MigpipeError, match="unknown section type") as caught:
        b"".join(decode_chunks([data]))
    assert caught.value.offset == data.index(payload) + 8


# -- libvirt save images: header words, XML and body mutated ------------------------------------

# A raw body is the rest of the file; a compressed one, the stream and what a few changed bytes
# can add to it (a block or two repeated), far less than the stream again.
LIBVIRT_OUTPUT_EXTRA = len(WIRE_STREAM)
HEADER_WORDS = 19  # after the magic: version, data_len, was_running, format, cookie offset, unused


@pytest.fixture(scope="module")
def libvirt_images() -> Corpus:
    """WIRE_STREAM in an image of each format, the body made by the real program as libvirt's
    `PROG -c` makes it; half of them with a cookie."""
    bodies = {"raw": WIRE_STREAM} | {
        name: subprocess.run(argv, input=WIRE_STREAM, capture_output=True, check=True).stdout
        for name, argv in COMPRESS.items()
    }
    return Corpus(
        [
            image(body, name, cookie=COOKIE if index % 2 else None)
            for index, (name, body) in enumerate(bodies.items())
        ]
    )


@st.composite
def libvirt_mutations(draw: st.DrawFn, images: list[bytes]) -> tuple[bytes, int]:
    """An image of `images` changed one to four times (a header word, the XML, the body, its
    length), and the size of the chunks it arrives in."""
    data = bytearray(images[draw(st.integers(0, len(images) - 1))])
    order = "<" if sys.byteorder == "little" else ">"
    (data_len,) = struct.unpack_from(order + "I", data, 20)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([*BYTE_MUTATIONS, "word", "swap"]))
        if kind == "word" and len(data) >= HEADER_SIZE:
            at = 16 + 4 * draw(st.one_of(st.integers(0, 4), st.integers(0, HEADER_WORDS - 1)))
            value = draw(
                st.one_of(
                    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 255, 0x02000000, 1 << 31, 0xFFFFFFFF]),
                    st.sampled_from([data_len - 1, data_len + 1, len(data), MAX_DATA_LEN + 1]),
                    st.integers(0, 0xFFFFFFFF),
                )
            )
            data[at : at + 4] = struct.pack(draw(st.sampled_from("<>")) + "I", value)
        elif kind == "swap" and len(data) >= HEADER_SIZE:  # every word in the other byte order
            words = struct.unpack_from(f"{order}{HEADER_WORDS}I", data, 16)
            data[16:HEADER_SIZE] = struct.pack(
                f"{'<' if order == '>' else '>'}{HEADER_WORDS}I", *words
            )
        if not data or kind in ("word", "swap"):
            continue
        where = draw(
            st.one_of(
                st.integers(HEADER_SIZE, HEADER_SIZE + 128),  # the XML and its NUL
                st.integers(HEADER_SIZE + data_len, HEADER_SIZE + data_len + 64),  # body start
                st.integers(0, len(data)),
            )
        )
        mutate_at(draw, data, kind, where, [0x00, 0x01, 0x7F, 0x80, 0xC3, 0xFF])
    return bytes(data), draw(st.sampled_from([1 << 20, 4093, 97]))


class Pieces:
    """A Channel that hands out `data` `size` bytes at a time."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data, self._size, self._at = data, size, 0

    def read(self) -> bytes:
        self._at += self._size
        return self._data[self._at - self._size : self._at]


def read_or_refuse(data: bytes, chunk: int) -> None:
    """The property: a stream, read in bounded pieces, or MigpipeError; nothing else. A raw
    body is the stream itself: every byte after the XML, as it is."""
    out = bytearray()
    reader = None
    try:
        reader = LibvirtImageReader(Pieces(data, chunk))
        while piece := reader.read():
            assert len(piece) <= CHUNK
            out += piece
            assert len(out) <= len(data) + LIBVIRT_OUTPUT_EXTRA, f"{len(out)} bytes read"
    except MigpipeError as e:
        assert e.offset is None or 0 <= e.offset <= len(data)
        return
    finally:
        if reader is not None:
            reader.close()  # ends lzop
    if reader.image.image_format == "raw":
        assert out == data[reader.image.stream_offset :]


@FUZZ
@given(data=st.data())
def test_mutated_libvirt_images(libvirt_images: Corpus, data: st.DataObject) -> None:
    read_or_refuse(*data.draw(libvirt_mutations(libvirt_images.items)))
