"""The real-QEMU harness and the stream oracle, proven against plain `cat` before any test
trusts them with migpipe: what QEMU loads from a captured stream is what the oracle replays,
the captures really are multi-pass (and XBZRLE) migrations, and broken streams fail loudly; on
every build the tests run on (QEMU 7.2 and 10.0)."""

from __future__ import annotations

import os
import select
import struct
import time
from pathlib import Path

import oracle
import pytest
import qemuvm

LIVE = ("dirty", "xbzrle")


@pytest.fixture(scope="module")
def replays(build_captures: dict[str, qemuvm.Capture]) -> dict[str, oracle.Replay]:
    return {kind: oracle.replay(capture.path) for kind, capture in build_captures.items()}


def test_guest_is_a_32bit_multiboot_elf(guest_elf: Path) -> None:
    data = guest_elf.read_bytes()
    assert data[:5] == b"\x7fELF\x01", "not a 32-bit ELF"
    headers = [
        struct.unpack_from("<3I", data, off)
        for off in range(0, min(len(data), 8192) - 12, 4)
        if data[off : off + 4] == struct.pack("<I", 0x1BADB002)
    ]
    assert headers, "no multiboot header in the first 8 KiB"
    magic, flags, checksum = headers[0]
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0


@pytest.mark.parametrize("kind", qemuvm.KINDS)
def test_qemu_loads_what_the_oracle_replays(
    kind: str,
    build_captures: dict[str, qemuvm.Capture],
    replays: dict[str, oracle.Replay],
    tmp_path: Path,
) -> None:
    capture = build_captures[kind]
    loaded = qemuvm.load_stream(capture.path, tmp_path, qemu=capture.qemu)
    assert len(loaded) == qemuvm.IMAGE_SIZE
    diff = oracle.first_difference(loaded, replays[kind].image)
    assert diff is None, diff


@pytest.mark.parametrize("kind", qemuvm.KINDS)
def test_streams_carry_zero_and_normal_pages(kind: str, replays: dict[str, oracle.Replay]) -> None:
    replay = replays[kind]
    assert replay.zero_pages > 1000
    assert replay.normal_pages > 1000
    assert replay.blocks["pc.ram"] == qemuvm.RAM_SIZE
    region = replay.image[(8 << 20) - qemuvm.IMAGE_START : (40 << 20) - qemuvm.IMAGE_START]
    assert b"migration " in region, "the guest's text pages are missing"


def test_idle_capture_is_one_pass_of_the_paused_source(
    build_captures: dict[str, qemuvm.Capture], replays: dict[str, oracle.Replay]
) -> None:
    replay = replays["idle"]
    assert replay.max_sends == 1
    assert replay.pages_resent == 0
    # Paused source: its own memory is an oracle too, and the replay must agree with it.
    source = build_captures["idle"].source_memory
    assert source is not None
    diff = oracle.first_difference(replay.image, source)
    assert diff is None, diff


@pytest.mark.parametrize("kind", LIVE)
def test_live_captures_have_several_passes(
    kind: str, build_captures: dict[str, qemuvm.Capture], replays: dict[str, oracle.Replay]
) -> None:
    capture, replay = build_captures[kind], replays[kind]
    assert capture.info["status"] == "completed"
    assert capture.dirty_syncs >= 3
    assert replay.ram_sections >= 4  # START, at least two PARTs, END
    assert replay.pages_resent > 100
    assert replay.max_sends >= 3


def test_only_the_xbzrle_capture_has_xbzrle_records(replays: dict[str, oracle.Replay]) -> None:
    assert replays["xbzrle"].xbzrle_pages > 0
    assert replays["xbzrle"].xbzrle_bytes < replays["xbzrle"].xbzrle_pages * oracle.PAGE_SIZE
    assert replays["dirty"].xbzrle_pages == 0
    assert replays["idle"].xbzrle_pages == 0


def test_truncated_stream_fails_to_load(
    build_captures: dict[str, qemuvm.Capture], tmp_path: Path
) -> None:
    capture = build_captures["dirty"]
    data = capture.path.read_bytes()
    truncated = tmp_path / "truncated.stream"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(oracle.StreamError):
        oracle.replay(truncated)
    with pytest.raises(qemuvm.MigrationFailed) as failed:
        qemuvm.load_stream(truncated, tmp_path, qemu=capture.qemu)
    assert "load of migration failed" in failed.value.desc


def test_migrate_through_cat_into_a_destination(
    guest_elf: Path, tmp_path: Path, qemu_build: qemuvm.QemuBuild
) -> None:
    migration = qemuvm.migrate_through(guest_elf, "xbzrle", tmp_path, qemu=qemu_build)
    assert migration.sender_status == 0
    replay = oracle.replay(migration.source_stream)
    assert replay.max_sends >= 3
    assert replay.xbzrle_pages > 0
    diff = oracle.first_difference(migration.dest_memory, replay.image)
    assert diff is None, diff


def test_migrate_through_a_broken_pipeline_fails(
    guest_elf: Path, tmp_path: Path, qemu_build: qemuvm.QemuBuild
) -> None:
    sender = "head -c 1000000 > {fifo}"
    with pytest.raises(qemuvm.MigrationFailed) as failed:
        qemuvm.migrate_through(guest_elf, "dirty", tmp_path, sender=sender, qemu=qemu_build)
    assert "load of migration failed" in failed.value.desc


def _read_to_eof(fd: int, timeout: float = 60.0) -> bytes:
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "timed out reading the migration pipe"
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_getfd_passes_a_descriptor_to_qemu(qemu_build: qemuvm.QemuBuild, tmp_path: Path) -> None:
    """execute_with_fd (SCM_RIGHTS): a VM that never ran migrates into our pipe via fd:."""
    read_end, write_end = os.pipe()
    try:
        with qemuvm.Vm(tmp_path, "fd", ["-S"], qemu=qemu_build) as vm:
            vm.qmp.execute(
                "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
            )
            vm.qmp.execute_with_fd("getfd", write_end, fdname="out")
            os.close(write_end)
            write_end = -1
            vm.qmp.execute("migrate", uri="fd:out")
            data = _read_to_eof(read_end)
            vm.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    replay = oracle.replay(data)
    assert replay.max_sends == 1
    assert replay.image == bytes(qemuvm.IMAGE_SIZE)


# The oracle's XBZRLE decoder, on hand-made payloads (no QEMU needed).


def test_xbzrle_decoder_applies_runs_over_the_page() -> None:
    page = bytearray(b"\xaa" * oracle.PAGE_SIZE)
    # 1001 unchanged bytes, 3 new, 2 unchanged, 1 new; the trailing unchanged run is implicit.
    oracle.apply_xbzrle(page, bytes([0xE9, 0x07, 3, 1, 2, 3, 2, 1, 9]))
    expected = bytearray(b"\xaa" * oracle.PAGE_SIZE)
    expected[1001:1004] = b"\x01\x02\x03"
    expected[1006] = 9
    assert page == expected


@pytest.mark.parametrize(
    "delta",
    [
        bytes([0x80, 0x80, 0x01, 1, 1]),  # 3-byte length
        bytes([1, 1, 5, 0, 1, 5]),  # zero-length unchanged run after the first pair
        bytes([1, 0]),  # empty literal run
        bytes([0xFF, 0x1F, 2, 1, 1]),  # runs past the page end
        bytes([1, 1, 5, 3]),  # trailing unchanged run encoded
    ],
)
def test_xbzrle_decoder_rejects_what_qemu_rejects(delta: bytes) -> None:
    with pytest.raises(oracle.StreamError):
        oracle.apply_xbzrle(bytearray(oracle.PAGE_SIZE), delta)


def test_check_image_finds_a_stale_or_missing_page() -> None:
    """What check_image proves with: a mode=check guest's image whose pages hold their counts
    passes; one page a count behind (stale) or zeroed (never sent) does not."""
    pages = 64
    memory = bytearray(qemuvm.IMAGE_SIZE)
    table, region = qemuvm.CHECK_TABLE - qemuvm.IMAGE_START, (8 << 20) - qemuvm.IMAGE_START
    counts = [(page * 7) % 5 + 1 for page in range(pages)]
    struct.pack_into(f"<2I{pages}I", memory, table, sum(counts), 3, *counts)
    for page, count in enumerate(counts):
        struct.pack_into("<I", memory, region + page * 4096, count)
    assert qemuvm.check_image(bytes(memory), pages) == sum(counts)
    struct.pack_into("<I", memory, region + 3 * 4096, counts[3] + 1)  # the write in flight
    assert qemuvm.check_image(bytes(memory), pages) == sum(counts)
    for broken in (counts[9] - 1, 0):  # stale, or never arrived
        struct.pack_into("<I", memory, region + 9 * 4096, broken)
        with pytest.raises(AssertionError, match=r"page 9 .* arrived stale or not at all"):
            qemuvm.check_image(bytes(memory), pages)
