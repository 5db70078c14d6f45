"""Live migrations of a real guest through `migpipe encode | migpipe decode`, on QEMU 7.2 and 10.0.

The destination must complete holding exactly what the source sent (replayed by tests/oracle.py
from the source's own stream, tee'd before migpipe touched it), and must fail, never complete,
when the wire between encode and decode is corrupted or cut.
"""

import shlex
import sys
from pathlib import Path

import oracle
import pytest
import qemuvm
from support import MIGPIPE_SHELL as MIGPIPE
from support import free_port

from migpipe.io.tlsinit import tls_init
from migpipe.keys import keygen

pytestmark = pytest.mark.qemu
MANGLE = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).with_name('mangle.py')))}"


@pytest.mark.parametrize(
    "kind,filters",
    [
        ("dirty", ""),
        ("dirty", "--compress zstd:1"),
        ("xbzrle", "--compress lz4"),
        ("xbzrle", "--filters zstd:3"),
        ("dirty", "--xbzrle"),
        ("dirty", "--filters xbzrle,zstd:1"),
        ("xbzrle", "--xbzrle --xbzrle-cache 1M --compress lz4"),
    ],
)
def test_migration_through_the_tunnel(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, kind: str, filters: str
) -> None:
    stats = tmp_path / "encode.json"
    sender = f"{MIGPIPE} encode {filters} --stats-json {stats} | {MIGPIPE} decode > {{fifo}}"
    migration = qemuvm.migrate_through(guest_elf, kind, tmp_path, sender=sender, qemu=qemu_build)
    assert migration.sender_status == 0
    replay = oracle.replay(migration.source_stream)
    assert replay.pages_resent > 0  # a live, multi-pass migration
    assert oracle.first_difference(migration.dest_memory, replay.image) is None
    assert f'"qemu_bytes": {migration.source_stream.stat().st_size}' in stats.read_text()


@pytest.mark.parametrize("mode", ["flip", "truncate"])
def test_a_damaged_wire_never_completes_a_migration(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, mode: str
) -> None:
    # Past the wire header and well inside the stream: RAM frames are flowing by then.
    sender = f"{MIGPIPE} encode | {MANGLE} {mode} 3000000 | {MIGPIPE} decode > {{fifo}}"
    with pytest.raises(qemuvm.MigrationFailed):
        qemuvm.migrate_through(
            guest_elf, "dirty", tmp_path, sender=sender, timeout=60, qemu=qemu_build
        )


def test_migration_over_a_tcp_link(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    link = free_port()
    migration = qemuvm.migrate_through(
        guest_elf,
        "dirty",
        tmp_path,
        sender=f"{MIGPIPE} encode --compress zstd:1 --connect {link}",
        incoming=f"exec:{MIGPIPE} decode --listen {link}",
        qemu=qemu_build,
    )
    assert migration.sender_status == 0
    replay = oracle.replay(migration.source_stream)
    assert replay.pages_resent > 0
    assert oracle.first_difference(migration.dest_memory, replay.image) is None


def test_encrypted_migration(guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path) -> None:
    key = tmp_path / "key"
    keygen(key)
    sender = (
        f"{MIGPIPE} encode --filters xbzrle,zstd,encrypt --key-file {key} | "
        f"{MIGPIPE} decode --key-file {key} > {{fifo}}"
    )
    migration = qemuvm.migrate_through(guest_elf, "dirty", tmp_path, sender=sender, qemu=qemu_build)
    assert migration.sender_status == 0
    replay = oracle.replay(migration.source_stream)
    assert replay.pages_resent > 0
    assert oracle.first_difference(migration.dest_memory, replay.image) is None


def test_migration_over_tls(guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path) -> None:
    creds = tmp_path / "pki"
    tls_init(creds, "migpipe test CA", ["localhost"], "source", 1)
    port = free_port().rpartition(":")[2]
    tls = f"--tls-creds {creds}"
    migration = qemuvm.migrate_through(
        guest_elf,
        "dirty",
        tmp_path,
        sender=f"{MIGPIPE} encode --filters xbzrle,lz4 --connect localhost:{port} {tls}",
        incoming=f"exec:{MIGPIPE} decode --listen 127.0.0.1:{port} {tls}",
        qemu=qemu_build,
    )
    assert migration.sender_status == 0
    replay = oracle.replay(migration.source_stream)
    assert replay.pages_resent > 0
    assert oracle.first_difference(migration.dest_memory, replay.image) is None


@pytest.mark.parametrize("wire", ["empty", "not a wire"])
def test_a_wire_that_fails_before_any_stream_byte_fails_the_load(
    qemu_build: qemuvm.QemuBuild, tmp_path: Path, wire: str
) -> None:
    """QEMU 7.2 waits for an `exec:` pipe to be readable before it starts loading, and a pipe
    closed with nothing in it never is: without a first byte QEMU would spin forever. decode
    writes NOT_A_STREAM then, and QEMU fails the load at once."""
    path = tmp_path / "wire"
    path.write_bytes(b"" if wire == "empty" else b"QEVM, but not migpipe's magic")
    uri = f"exec:{MIGPIPE} decode --in {shlex.quote(str(path))}"
    dest_vm = qemuvm.destination_vm(tmp_path, uri, qemu=qemu_build)
    with dest_vm as dest, pytest.raises(qemuvm.MigrationFailed) as e:
        qemuvm.wait_incoming(dest, timeout=30)
    assert "Not a migration stream" in dest.log_tail()
    assert "load" in str(e.value)
