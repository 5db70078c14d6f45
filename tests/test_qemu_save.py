"""Save a real QEMU 7.2 guest that keeps dirtying memory, restore it into a fresh QEMU.

The destination must hold exactly what the source sent (tests/oracle.py replays the source's
own stream, tee'd before migpipe saw it), in either layout, compressed and encrypted.
"""

from pathlib import Path

import oracle
import pytest
import qemuvm
from support import MIGPIPE_SHELL as MIGPIPE

from migpipe.keys import keygen

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize(
    ("layout", "sealed"),
    [("stream", True), ("fixed", True), ("stream", False)],
    ids=["stream zstd+encrypt", "fixed zstd+encrypt", "stream O_DIRECT, no filters"],
)
def test_save_and_restore_a_dirtying_guest(
    guest_elf: Path, tmp_path: Path, layout: str, sealed: bool
) -> None:
    """Sealed: compressed and encrypted. Unsealed: the stream read straight into the O_DIRECT
    ring and framed there (migpipe.tunnel.inplace), around QEMU's own footers and EOF item."""
    key = tmp_path / "key"
    keygen(key)
    saved = tmp_path / "vm.mig"
    options = f"--compress zstd:1 --encrypt --key-file {key}" if sealed else "--direct=try"
    restoring = f"--key-file {key}" if sealed else "--direct=try"
    sender = (
        f"{MIGPIPE} save {saved} --layout {layout} {options} --cache 8M && "
        f"{MIGPIPE} restore {saved} {restoring} > {{fifo}}"
    )
    migration = qemuvm.migrate_through(guest_elf, "dirty", tmp_path, sender=sender)
    assert migration.sender_status == 0
    replay = oracle.replay(migration.source_stream)
    assert replay.pages_resent > 0  # the guest dirtied memory while it was being saved
    assert oracle.first_difference(migration.dest_memory, replay.image) is None
    if layout == "fixed":
        ram = sum(replay.blocks.values())
        assert saved.stat().st_size <= ram * 1.02 + (1 << 20)  # each page stored once
        assert saved.stat().st_blocks * 512 < migration.source_stream.stat().st_size
