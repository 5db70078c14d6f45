"""Save a real QEMU 7.2 guest that keeps dirtying memory, restore it into a fresh QEMU.

The destination must hold exactly what the source sent (tests/oracle.py replays the source's
own stream, tee'd before migpipe saw it), in either layout, compressed and encrypted.
"""

import subprocess
from pathlib import Path

import oracle
import pytest
import qemuvm
from support import MIGPIPE as MIGPIPE_ARGV
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


def test_restore_gives_the_stream_to_a_qemu_listening_on_a_socket(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    """restore --qemu unix:PATH connects to a destination started with -incoming unix:PATH, as
    decode --qemu does, so no socat sits between them."""
    saved, listening = tmp_path / "vm.mig", tmp_path / "in.sock"
    with qemuvm.source_vm(guest_elf, "idle", tmp_path, qemu=qemu_build) as src:
        command = f"{MIGPIPE} save {saved} --compress zstd:1"
        _, status = qemuvm.run_migration(src, command, qemuvm.PACINGS["idle"])
        assert status == 0
        with qemuvm.destination_vm(tmp_path, f"unix:{listening}", qemu=qemu_build) as dest:
            restored = subprocess.run(
                [*MIGPIPE_ARGV, "restore", str(saved), "--qemu", f"unix:{listening}"],
                capture_output=True,
                check=False,
            )
            assert restored.returncode == 0, restored.stderr
            qemuvm.wait_incoming(dest)
            assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")
