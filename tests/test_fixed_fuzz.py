"""Mutated fixed-layout files: restore reads them or raises MigpipeError, within bounds.

A genuine small unencrypted fixed save is mutated: its index (fields of the JSON, entries of
the slot and chunk tables), then any byte of the file, its length too. Every checksum a
mutation broke is then fixed up (the header's, each slot's and chunk's in the index, the
index's and the locator's own), so what is fuzzed is the reader's checks past the CRCs. Each
case must end in a stream or a MigpipeError, read no byte of the file twice, and write a stream
bounded by what it read. FUZZ_EXAMPLES=20000 makes a longer run, for before a release.
"""

import json
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isal.isal_zlib import crc32

from migpipe.errors import MigpipeError
from migpipe.save.fixedfile import (
    CHUNK_ENTRY,
    LOCATOR,
    SLOT_ENTRY,
    UNIT,
    FixedReader,
    FixedSaver,
    Layout,
    PlainFile,
    encode_locator,
)
from migpipe.stream.format import BE16, BE32, BE64
from migpipe.stream.records import RamBlock, Record
from migpipe.stream.writer import StreamWriter
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.tunnel.pipeline import Totals

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 250)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def memory_file(size: int = 0) -> Iterator[int]:
    fd = os.memfd_create("fixed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        yield fd
    finally:
        os.close(fd)


def fixed_save(records: Iterable[Record]) -> bytes:
    """The file FixedSaver makes of `records`, unencrypted."""
    with memory_file() as fd:
        saver = FixedSaver(PlainFile(fd), [], Totals())
        saver.add(list(records))
        size = saver.finish()
        return os.pread(fd, size, 0)


GENUINE = fixed_save(
    SyntheticGuest(GuestModel(ram_size=256 << 10, iterations=2, dirty_share=0.3)).records()
)


# -- taking a file apart and putting it back, checksums fixed up --------------------------------


def locator_at(image: bytes | bytearray) -> int:
    """Where the locator starts: after the setup header (an unencrypted one has no tag)."""
    (n,) = BE16.unpack_from(image, 10)
    return 16 + n


def read_index(image: bytes | bytearray) -> tuple[int, dict, list[list[int]], list[list[int]]]:
    """The index of a file whose index is well formed: offset, JSON, slot and chunk entries."""
    at = locator_at(image)
    offset, length = BE64.unpack_from(image, at)[0], BE64.unpack_from(image, at + 8)[0]
    index = bytes(image[offset : offset + length])
    (n,) = BE32.unpack_from(index, 0)
    meta = json.loads(index[4 : 4 + n])
    tables = 4 + n + SLOT_ENTRY.size * meta["slots"]
    slots = [list(e) for e in SLOT_ENTRY.iter_unpack(index[4 + n : tables])]
    chunks = [list(e) for e in CHUNK_ENTRY.iter_unpack(index[tables:])]
    return offset, meta, slots, chunks


def encode_index(meta: Any, slots: list[list[int]], chunks: list[list[int]]) -> bytes:
    """An index from parts as the mutations left them (`meta` as JSON, or bytes to take as
    they are): field values wrap to their width."""
    text = (
        meta
        if type(meta) is bytes
        else json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    )
    wrap = [(1 << 64) - 1, (1 << 32) - 1, (1 << 32) - 1, (1 << 64) - 1]
    packed = [SLOT_ENTRY.pack(*(v & m for v, m in zip(e, wrap[:3], strict=True))) for e in slots]
    packed += [CHUNK_ENTRY.pack(*(v & m for v, m in zip(e, wrap, strict=True))) for e in chunks]
    return BE32.pack(len(text)) + text + b"".join(packed)


def with_index(image: bytes, meta: Any, slots: list, chunks: list) -> bytearray:
    """`image` with another index in place of its own, at the same offset."""
    offset = read_index(image)[0]
    out = bytearray(image[:offset]) + encode_index(meta, slots, chunks)
    write = BE64.unpack_from(image, locator_at(image) + 16)[0]
    fix_checksums(out, offset, write)
    return out


def fix_checksums(image: bytearray, offset: int, write: int) -> None:
    """Make every checksum of `image` match what is there now, as far as its parts still parse:
    the header's, the slots' and chunks' (in the index), the index's and the locator's."""
    at = locator_at(image)
    if at + LOCATOR > len(image):
        return
    image[at - 4 : at] = BE32.pack(crc32(image[: at - 4]))
    index = bytearray(image[offset:])
    try:
        (n,) = BE32.unpack_from(index, 0)
        meta = json.loads(index[4 : 4 + n])
        blocks = [RamBlock(b["name"], b["used_length"]) for b in meta["skeleton"]["blocks"]]
        layout, tables = Layout(blocks, 4096), 4 + n + SLOT_ENTRY.size * meta["slots"]
        for slot in range(min(layout.slots, meta["slots"])):
            entry = 4 + n + SLOT_ENTRY.size * slot
            write_, length, _ = SLOT_ENTRY.unpack_from(index, entry)
            start = layout.place(slot)[0]
            crc = crc32(image[start : start + length])
            SLOT_ENTRY.pack_into(index, entry, write_, length, crc)
        for entry in range(tables, len(index) - CHUNK_ENTRY.size + 1, CHUNK_ENTRY.size):
            place, length, _, write_ = CHUNK_ENTRY.unpack_from(index, entry)
            crc = crc32(image[place : place + length])
            CHUNK_ENTRY.pack_into(index, entry, place, length, crc, write_)
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        struct.error,
        RecursionError,
        MigpipeError,
    ):
        pass  # a part that no longer parses keeps its checksum: the reader refuses it anyway
    image[offset:] = index
    image[at : at + LOCATOR] = encode_locator(offset, len(index), write, crc32(index))


# -- the property --------------------------------------------------------------------------------


class CountingFile(PlainFile):
    """A PlainFile that counts the bytes read through it."""

    bytes_read = 0

    def read_at(self, offset: int, length: int) -> bytes:
        data = super().read_at(offset, length)
        self.bytes_read += len(data)
        return data


def restore(file: PlainFile) -> int:
    """Read the file as restore does (and inspect), the stream's bytes counted, not kept; a
    MigpipeError goes through."""
    reader = FixedReader(file, None, Totals())
    reader.describe()
    writer, buffer, written = StreamWriter(), bytearray(), 0
    for record in reader.records():
        writer.write(buffer, record)
        written += len(buffer)
        buffer.clear()
    return written


def restore_or_refuse(image: bytes, size: int) -> None:
    """The property: a stream or a MigpipeError, no byte read twice, a bounded stream."""
    with memory_file(size) as fd:
        os.pwrite(fd, image[:size], 0)
        file = CountingFile(fd)
        try:
            written = restore(file)
        except MigpipeError:
            written = 0
    assert file.bytes_read <= size  # every piece inside the file, none overlapping
    assert written <= 2 * file.bytes_read + (64 << 10)  # pages, and the records around them


# -- the mutations -------------------------------------------------------------------------------

NUMBERS = [0, 1, -1, 7, 4095, 4096, 4097, 1 << 20, 1 << 31, 1 << 32, 1 << 36, 1 << 60, 1 << 64]
VALUES = st.sampled_from([*NUMBERS, 1.5, True, None, "", "x" * 300, "\u0100", [], {}, [[[]]]])
INTS = st.sampled_from([0, 1, 4096, 1 << 20, 2 << 20, len(GENUINE), (1 << 32) - 1, (1 << 64) - 1])


def leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every path into a JSON value, containers included."""
    yield path
    items = (
        value.items() if type(value) is dict else enumerate(value) if type(value) is list else ()
    )
    for key, item in items:
        yield from leaves(item, (*path, key))


def edit_meta(draw: st.DrawFn, meta: dict) -> None:
    path = draw(st.sampled_from(list(leaves(meta))[1:]))
    *parents, last = path
    parent = meta
    for key in parents:
        parent = parent[key]
    kind = draw(st.sampled_from(["set", "set", "shift", "delete", "repeat"]))
    if kind == "shift" and type(parent[last]) is int:
        parent[last] += draw(st.sampled_from([-4096, -1, 1, 4096, 1 << 20]))
    elif kind == "delete":
        del parent[last]
    elif kind == "repeat" and type(parent) is list:
        parent.append(parent[last])
    else:
        parent[last] = draw(VALUES)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, int]:
    """A file and the size to give it (shorter or longer than the bytes)."""
    offset, meta, slots, chunks = read_index(GENUINE)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["meta", "meta", "entry", "entry", "drop", "repeat"]))
        if kind == "meta":
            edit_meta(draw, meta)
            continue
        entries = draw(st.sampled_from([slots, chunks]))
        if not entries:
            continue
        n = draw(st.integers(0, len(entries) - 1))
        if kind == "entry":
            entries[n][draw(st.integers(0, len(entries[n]) - 1))] = draw(INTS)
        elif kind == "drop":
            del entries[n]
        else:
            entries.append(list(entries[n]))
    image = with_index(GENUINE, meta, slots, chunks)
    regions = [(8, locator_at(image) + LOCATOR), (UNIT, offset), (offset, len(image))]
    for _ in range(draw(st.integers(0, 3))):
        start, end = draw(st.sampled_from(regions))  # header but magic, slots+chunks, index
        where = draw(st.integers(start, end - 1))
        image[where] = draw(st.one_of(st.integers(0, 255), st.just(image[where] ^ 1)))
    fix_checksums(image, offset, BE64.unpack_from(GENUINE, locator_at(GENUINE) + 16)[0])
    size = len(image)
    resize = draw(st.sampled_from(["no", "no", "no", "cut", "extend"]))
    if resize == "cut":
        size = draw(st.integers(0, size))
    elif resize == "extend":
        size = draw(st.integers(size, size + (64 << 20)))
    return bytes(image), size


def test_the_genuine_file_restores() -> None:
    """The control: unmutated, the file reads whole and gives a stream."""
    with memory_file(len(GENUINE)) as fd:
        os.pwrite(fd, GENUINE, 0)
        file = CountingFile(fd)
        written = restore(file)
    assert file.bytes_read > len(GENUINE) // 8 and written > 128 << 10


def test_fixing_up_checksums_changes_nothing_in_a_genuine_file() -> None:
    """What makes the fuzzer reach past the checksums: the fix-up of an intact file is exact."""
    _, meta, slots, chunks = read_index(GENUINE)
    assert with_index(GENUINE, meta, slots, chunks) == GENUINE


@FUZZ
@given(mutated())
def test_mutated_fixed_files(case: tuple[bytes, int]) -> None:
    restore_or_refuse(*case)
