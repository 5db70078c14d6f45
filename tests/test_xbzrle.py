"""The XBZRLE encoder and decoder: QEMU's exact output and overflow decisions, in C and Python.

The oracle is `reference_encode`, a byte-at-a-time transcription of the encoder described in the
project's format reference (section 3.2), which reproduced real QEMU 7.2 payloads byte for byte.
Both migpipe implementations must match it, and each other, bytes and overflow decisions alike.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from types import ModuleType

import pytest
import qemuvm
from hypothesis import given, settings
from hypothesis import strategies as st
from support import PAGE

from migpipe.errors import MigpipeError
from migpipe.stream import xbzrle
from migpipe.stream.xbzrle import (
    IMPLEMENTATION,
    apply_delta,
    apply_delta_py,
    encode_delta,
    encode_delta_py,
    encode_deltas,
    encode_deltas_py,
)

FORCED_PYTHON = os.environ.get("MIGPIPE_XBZRLE") == "python"


def c_module() -> ModuleType:
    """The C extension; importing it fails the test where it was not built (CI builds it)."""
    from migpipe.stream import _xbzrle

    return _xbzrle


def uleb(value: int) -> bytes:
    return bytes([value]) if value < 0x80 else bytes([(value & 0x7F) | 0x80, value >> 7])


def reference_encode(old: bytes, new: bytes, limit: int | None = None) -> bytes | None:
    """Section 3.2 of the format reference, one byte at a time: slow, obviously right."""
    size, i, out = len(new), 0, bytearray()
    limit = size if limit is None else limit
    while i < size:
        if len(out) + 2 > limit:  # A
            return None
        zrun = 0
        while i + zrun < size and old[i + zrun] == new[i + zrun]:
            zrun += 1
        if zrun == size:
            return b""
        i += zrun
        if i == size:
            break
        out += uleb(zrun)
        if len(out) + 2 > limit:  # B
            return None
        literal = 0
        while i + literal < size and old[i + literal] != new[i + literal]:
            literal += 1
        out += uleb(literal)
        if len(out) + literal > limit:  # C
            return None
        out += new[i : i + literal]
        i += literal
    return bytes(out)


Encoder = Callable[..., bytes | None]


def encoders() -> list[Encoder]:
    """Every single-page encoder under test: the public one and both implementations."""
    found = [encode_delta, encode_delta_py]
    if not FORCED_PYTHON:
        found.append(c_module().encode)
    return found


def decoded(delta: bytes, old: bytes) -> bytes:
    page = bytearray(old)
    apply_delta(delta, page)
    return bytes(page)


# -- page pairs -------------------------------------------------------------------------------


def sparse_pair(rng: random.Random, size: int = PAGE) -> tuple[bytes, bytes]:
    """A dirty page as the benchmarks model it: 1-8 runs of 4-64 bytes changed."""
    old = rng.randbytes(size)
    new = bytearray(old)
    for _ in range(rng.randint(1, 8)):
        length = min(rng.randint(4, 64), size)
        at = rng.randrange(0, size - length + 1)
        for k in range(at, at + length):
            new[k] ^= rng.randint(1, 255)
    return old, bytes(new)


def any_pair(rng: random.Random) -> tuple[bytes, bytes]:
    """Page pairs of every shape that matters: sparse, dense, random (overflow), long runs
    (two-byte lengths), alternating bytes, changes at the very start and end, odd sizes."""
    kind = rng.randrange(9)
    size = PAGE if kind < 7 else rng.choice([1, 2, 7, 8, 9, 31, 33, 255, 257, 1000, 8191])
    old = rng.randbytes(size)
    new = bytearray(old)
    if kind == 0:
        return sparse_pair(rng, size)
    if kind == 1:  # random replacement: overflows
        return old, rng.randbytes(size)
    if kind == 2:  # many short runs, sometimes right around the limit
        step = rng.choice([2, 3, 4, 5, 6])
        for k in range(rng.randrange(step), size, step):
            new[k] ^= 0xFF
    elif kind == 3:  # a few long runs: lengths >= 128 take two bytes
        for _ in range(rng.randint(1, 3)):
            length = rng.randint(100, 2000)
            at = rng.randrange(0, size - length)
            new[at : at + length] = bytes(b ^ 0x5A for b in old[at : at + length])
    elif kind == 4:  # the first and/or the last bytes change
        if rng.random() < 0.7:
            new[0] ^= 1
        tail = rng.randint(1, 40)
        new[-tail:] = rng.randbytes(tail)
        new[-1] = old[-1] ^ 0x80
    elif kind == 5:  # zero pages getting a little data, as guests do
        old = bytes(size)
        new = bytearray(size)
        for _ in range(rng.randint(1, 20)):
            at = rng.randrange(size)
            length = min(rng.randint(1, 200), size - at)
            new[at : at + length] = rng.randbytes(length)
    elif kind == 6:  # identical
        pass
    else:  # odd sizes: the scanners' word tails
        for _ in range(rng.randint(0, 4)):
            new[rng.randrange(size)] ^= rng.randint(1, 255)
    return bytes(old), bytes(new)


# -- the C extension is there ------------------------------------------------------------------


def test_the_c_extension_is_in_use() -> None:
    """CI builds the extension, so a missing build (or a broken import) fails here."""
    expected = "python" if FORCED_PYTHON else "c"
    assert expected == IMPLEMENTATION
    if not FORCED_PYTHON:
        assert c_module().MAX_PAGE == xbzrle.MAX_PAGE


# -- QEMU's examples and edge cases ------------------------------------------------------------

DOCS_DELTA = bytes([0xE9, 0x07, 0x0F, *range(1, 16), 0x03, 0x01, 0x67, 0x01, 0x01, 0x69])


@pytest.mark.parametrize("encode", encoders())
def test_docs_example(encode: Encoder) -> None:
    """docs/xbzrle.txt: 1001 unchanged bytes, 15 changed, 3 unchanged, 1, 1 unchanged, 1."""
    old = bytes(PAGE)
    new = bytearray(PAGE)
    new[1001:1016] = bytes(range(1, 16))
    new[1019] = 0x67
    new[1021] = 0x69
    assert encode(old, new) == DOCS_DELTA
    assert len(DOCS_DELTA) == 24
    assert decoded(DOCS_DELTA, old) == new


@pytest.mark.parametrize("encode", encoders())
def test_identical_pages_encode_to_nothing(encode: Encoder) -> None:
    page = random.Random(1).randbytes(PAGE)
    assert encode(page, page) == b""
    assert encode(bytearray(page), memoryview(page)) == b""
    assert encode(b"", b"") == b""
    # QEMU checks for room for a zero run (check A) before it looks at the page at all
    assert encode(page, page, 1) is None
    assert encode(page, page, 2) == b""


def boundary_pair(zrun: int) -> tuple[bytes, bytes]:
    """`zrun` equal bytes, then a literal to the page end: 1 or 2 + 2 + (4096 - zrun) bytes."""
    old = bytes(PAGE)
    new = bytes(zrun) + b"\x01" * (PAGE - zrun)
    return old, new


@pytest.mark.parametrize("encode", encoders())
def test_overflow_exactly_at_the_limit(encode: Encoder) -> None:
    fits = encode(*boundary_pair(3))  # 1 + 2 + 4093 = 4096
    assert fits is not None and len(fits) == PAGE
    assert fits == reference_encode(*boundary_pair(3))
    assert decoded(fits, bytes(PAGE)) == boundary_pair(3)[1]
    assert encode(*boundary_pair(2)) is None  # 1 + 2 + 4094 = 4097: check C

    # Many pairs: 100 x (zrun 1, literal 1) cost 300 bytes for 200 page bytes; then a zero run
    # of z < 128 and a literal to the page end cost 1 + 2 + (3896 - z): 4096 bytes for z = 103.
    old = bytes(PAGE)
    for zrun, fits in ((103, True), (102, False)):
        new = bytearray(PAGE)
        new[1:200:2] = b"\x01" * 100
        new[200 + zrun :] = b"\x02" * (PAGE - 200 - zrun)
        expected = reference_encode(old, bytes(new))
        assert encode(old, new) == expected
        if fits:
            assert expected is not None and len(expected) == PAGE
            assert decoded(expected, old) == new
        else:
            assert expected is None


@pytest.mark.parametrize("encode", encoders())
def test_trailing_zero_run_needs_two_spare_bytes(encode: Encoder) -> None:
    """QEMU checks for room before the implied trailing zero run too (check A), so a delta of
    4095 or 4096 bytes followed by unchanged bytes overflows; 4094 bytes does not."""
    for delta_len, fits in ((4094, True), (4095, False), (4096, False)):
        literal = delta_len - 3  # zrun 0 (1 byte), literal length (2 bytes), literal
        old = bytes(PAGE)
        new = b"\x01" * literal + bytes(PAGE - literal)
        result = encode(old, new)
        assert result == reference_encode(old, new)
        assert (result is not None) == fits
        if fits:
            assert len(result) == delta_len


@pytest.mark.parametrize("encode", encoders())
def test_limit_argument(encode: Encoder) -> None:
    rng = random.Random(7)
    for _ in range(50):
        old, new = sparse_pair(rng)
        delta = encode(old, new)
        assert delta == reference_encode(old, new)
        assert delta is not None
        trailing = new[-1] == old[-1]
        room = len(delta) + (2 if trailing else 0)
        assert encode(old, new, room) == delta
        assert encode(old, new, limit=room - 1) is None
        assert encode(old, new, 10**9) == delta


@pytest.mark.parametrize("encode", encoders())
def test_bad_arguments(encode: Encoder) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        encode(bytes(PAGE), bytes(PAGE - 1))
    with pytest.raises(ValueError, match="too long"):
        encode(bytes(0x4000), bytes(0x4000))
    with pytest.raises(ValueError, match="negative"):
        encode(bytes(PAGE), bytes(PAGE), -1)
    with pytest.raises(TypeError):
        encode("text", "text")


def test_batch_bad_arguments() -> None:
    for encode_batch in (encode_deltas, encode_deltas_py):
        with pytest.raises(ValueError, match="new pages"):
            encode_batch([bytes(PAGE)], [], None)
        with pytest.raises(ValueError, match="differ in length"):
            encode_batch([bytes(PAGE), bytes(PAGE)], [bytes(PAGE), bytes(8)], None)
        pages = [bytes(PAGE)] * 600  # past the C loop's first GIL-free stretch
        with pytest.raises(ValueError, match="differ in length"):
            encode_batch(pages, [*pages[:500], bytes(8), *pages[501:]], None)
        with pytest.raises(TypeError):
            encode_batch(pages, [*pages[:599], 7], None)


def test_max_page_is_encodable() -> None:
    old = bytes(xbzrle.MAX_PAGE)
    new = b"\x01" * xbzrle.MAX_PAGE
    for encode in encoders():
        assert encode(old, new, 1 << 20) == b"\x00" + uleb(xbzrle.MAX_PAGE) + new


# -- round trips (hypothesis) ------------------------------------------------------------------


@st.composite
def page_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    size = draw(st.sampled_from([PAGE, PAGE, PAGE, 64, 100, 4095]))
    old = bytearray(rng.randbytes(size) if draw(st.booleans()) else bytes(size))
    new = bytearray(old)
    edits = draw(
        st.lists(
            st.tuples(
                st.integers(0, size - 1),
                st.one_of(st.integers(1, 64), st.integers(65, 600)),
                st.booleans(),
            ),
            max_size=40,
        )
    )
    for at, length, xor in edits:
        stop = min(size, at + length)
        if xor:  # every byte changes
            new[at:stop] = bytes(b ^ rng.randint(1, 255) for b in old[at:stop])
        else:  # new content: some bytes may happen to equal the old ones
            new[at:stop] = bytes(rng.choice((0, 1, 0xFF)) for _ in range(stop - at))
    return bytes(old), bytes(new)


@settings(max_examples=300, deadline=None)
@given(page_pairs(), st.sampled_from([None, None, 0, 1, 2, 3, 100, 1000, 3000, 4094, 1 << 16]))
def test_round_trip(pair: tuple[bytes, bytes], limit: int | None) -> None:
    old, new = pair
    expected = reference_encode(old, new, limit)
    for encode in encoders():
        assert encode(old, new, limit) == expected
    if expected is not None:
        assert decoded(expected, old) == new
        page = bytearray(old)
        apply_delta_py(expected, page)
        assert page == new


# -- C and Python agree on everything ----------------------------------------------------------


@pytest.mark.skipif(FORCED_PYTHON, reason="MIGPIPE_XBZRLE=python: the C extension is off")
def test_c_and_python_encoders_agree() -> None:
    """Thousands of page pairs, overflows included, one page at a time and batched."""
    c = c_module()
    rng = random.Random(2024)
    pairs = [any_pair(rng) for _ in range(3000)]
    olds = [old for old, _ in pairs]
    news = [new for _, new in pairs]
    outcomes = {"empty": 0, "delta": 0, "overflow": 0}
    for limit in (None, 2048, 4096):
        expect = [encode_delta_py(old, new, limit) for old, new in pairs]
        assert [c.encode(old, new, limit) for old, new in pairs] == expect
        assert c.encode_batch(olds, news, limit) == expect
        assert encode_deltas_py(olds, news, limit) == expect
        for (old, new), delta in zip(pairs, expect, strict=True):
            if delta is None:
                outcomes["overflow"] += 1
            elif delta == b"":
                outcomes["empty"] += 1
                assert old == new
            else:
                outcomes["delta"] += 1
                assert decoded(delta, old) == new
    assert min(outcomes.values()) > 300, outcomes
    for old, new in pairs[:200]:  # the slow oracle, on a sample
        assert encode_delta_py(old, new) == reference_encode(old, new)


def test_batches_take_any_buffers() -> None:
    rng = random.Random(3)
    pairs = [sparse_pair(rng) for _ in range(20)]
    expect = [encode_delta_py(old, new) for old, new in pairs]
    olds = [bytearray(old) for old, _ in pairs]
    news = tuple(memoryview(new) for _, new in pairs)
    assert encode_deltas(olds, news) == expect
    assert encode_deltas(olds, news, None) == expect
    assert encode_deltas([], []) == []


def test_two_threads_encode_at_once() -> None:
    """encode_batch gives up the GIL while encoding: results stay right with threads racing."""
    rng = random.Random(4)
    pairs = [sparse_pair(rng) for _ in range(300)]
    olds, news = [o for o, _ in pairs], [n for _, n in pairs]
    expect = encode_deltas_py(olds, news, PAGE)
    results: list[list[bytes | None]] = []

    def work() -> None:
        for _ in range(20):
            results.append(encode_deltas(olds, news, PAGE))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(r == expect for r in results)


# -- decoding: the C decoder refuses what QEMU refuses, in the same words -------------------------

REJECTED = [
    (bytes([0x00]), "truncated zero run"),
    (bytes([0x00, 0x01, 0xAA, 0x00, 0x01, 0xBB]), "empty zero run"),
    (bytes([0x00, 0x00, 0x00]), "literal run empty"),
    (bytes([0x80, 0x80, 0x01, 0x01]), "longer than two bytes"),
    (bytes([0x00, 0x81, 0x80, 0x01]), "longer than two bytes"),
    (bytes([0xFF, 0x1F, 0x02, 0xAA, 0xBB]), "past the page"),
    (bytes([0x81, 0x20, 0x01, 0xAA]), "zero run past the page"),  # zrun 4097
    (bytes([0x80, 0x20, 0x01, 0xAA]), "literal run empty or past"),  # zrun 4096, then a literal
    (bytes([0x00, 0x05, 0xAA]), "past the page"),
    (bytes([0x00, 0x01, 0xAA, 0x05]), "truncated zero run"),
    (bytes([0x05]), "truncated zero run"),
    (bytes([0x05, 0x01]), "zero run past the page or delta end"),  # zrun without a literal
]


@pytest.mark.parametrize("delta,why", REJECTED)
def test_decoders_reject_what_qemu_rejects(delta: bytes, why: str) -> None:
    for decode in (apply_delta, apply_delta_py):
        with pytest.raises(MigpipeError, match=why):
            decode(delta, bytearray(PAGE))


def test_decoders_accept_what_qemu_accepts() -> None:
    page = bytearray(PAGE)
    apply_delta(b"\x00" + uleb(4093) + b"\x07" * 4093, page)  # exactly 4096 bytes
    assert page[:4093] == b"\x07" * 4093 and page[4093:] == bytes(3)
    apply_delta(b"\x00\x02\x01\x01\x02\x02\x05\x05", page)  # non-maximal runs are fine
    assert page[:6] == b"\x01\x01\x07\x07\x05\x05"
    view = memoryview(bytearray(3 * PAGE))
    apply_delta(DOCS_DELTA, view[PAGE : 2 * PAGE])  # a slice of a larger image, as ramimage does
    assert bytes(view[PAGE + 1001 : PAGE + 1016]) == bytes(range(1, 16))
    with pytest.raises((TypeError, BufferError)):  # C: BufferError, Python: TypeError
        apply_delta(DOCS_DELTA, bytes(PAGE))  # type: ignore[arg-type]


@pytest.mark.skipif(FORCED_PYTHON, reason="MIGPIPE_XBZRLE=python: the C extension is off")
def test_c_and_python_decoders_agree_on_damaged_deltas() -> None:
    c = c_module()
    rng = random.Random(5)
    for _ in range(3000):
        old, new = sparse_pair(rng)
        delta = bytearray(encode_delta_py(old, new) or b"")
        for _ in range(rng.randint(0, 3)):  # damage: flip, cut, insert
            op = rng.randrange(3)
            if op == 0 and delta:
                delta[rng.randrange(len(delta))] = rng.randrange(256)
            elif op == 1:
                del delta[rng.randrange(len(delta) + 1) :]
            else:
                delta.insert(rng.randrange(len(delta) + 1), rng.choice((0, 1, 0x7F, 0x80, 0xFF)))
        py_page, c_page = bytearray(old), bytearray(old)
        try:
            apply_delta_py(bytes(delta), py_page)
            py_error = None
        except MigpipeError as e:
            py_error = str(e)
        try:
            c.decode(bytes(delta), c_page)
            c_error = None
        except ValueError as e:
            c_error = str(e)
        assert c_error == py_error
        assert c_page == py_page  # including the pairs applied before an error


# -- decoding: the destination's acceptance rules, through apply_delta alone ---------------------


def test_xbzrle_example_from_qemu_docs() -> None:
    page = bytearray(PAGE)
    apply_delta(bytes([0xE9, 0x07, 0x0F, *range(1, 16)]), page)  # 1001 unchanged, 15 new
    assert page[1001:1016] == bytes(range(1, 16))
    assert page.count(0) == PAGE - 15


def test_xbzrle_empty_delta_leaves_the_page() -> None:
    page = bytearray(b"\x55" * PAGE)
    apply_delta(b"", page)
    assert page == b"\x55" * PAGE


@pytest.mark.parametrize(
    "delta,why",
    [
        (bytes([0x00]), "truncated zero run"),  # fewer than two bytes before a zero run
        (bytes([0x00, 0x01, 0xAA, 0x00, 0x01, 0xBB]), "empty zero run"),  # zrun 0 after the first
        (bytes([0x00, 0x00, 0x00]), "literal run empty"),  # nzrun 0
        (bytes([0x80, 0x80, 0x01, 0x01]), "longer than two bytes"),  # 3-byte ULEB
        (bytes([0xFF, 0x1F, 0x02, 0xAA, 0xBB]), "past the page"),  # 4095 + 2 > 4096
        (bytes([0x00, 0x05, 0xAA]), "past the page"),  # literal longer than the delta
        (bytes([0x00, 0x01, 0xAA, 0x05]), "truncated zero run"),  # trailing zero run alone
    ],
)
def test_xbzrle_deltas_qemu_rejects(delta: bytes, why: str) -> None:
    with pytest.raises(MigpipeError, match=why):
        apply_delta(delta, bytearray(PAGE))


# -- real QEMU payloads ------------------------------------------------------------------------


@pytest.mark.qemu
def test_reencoding_qemu_payloads_gives_the_same_bytes(
    build_captures: dict[str, qemuvm.Capture],
) -> None:
    """Replay the XBZRLE capture; the page before and after each XBZRLE record, re-encoded,
    must give exactly the payload QEMU sent (QEMU's cache equals the destination's page)."""
    from migpipe.stream.parser import iter_records
    from migpipe.stream.ramimage import RamImages, in_memory
    from migpipe.stream.records import XbzrlePage

    ram = RamImages(in_memory)
    payloads = 0
    with open(build_captures["xbzrle"].path, "rb") as f:
        for record in iter_records(iter(lambda: f.read(1 << 20), b"")):
            if type(record) is XbzrlePage:
                image = ram.images[record.block]
                old = bytes(image[record.offset : record.offset + PAGE])
                ram.apply(record)
                new = bytes(image[record.offset : record.offset + PAGE])
                for encode in encoders():
                    assert encode(old, new) == record.data
                payloads += 1
            else:
                ram.apply(record)
    assert payloads > 0, "the capture has no XBZRLE records"
    print(f"{payloads} QEMU payloads re-encoded identically")
