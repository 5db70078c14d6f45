"""QEMU's socket migrations through the two-way tunnel (`encode --qemu`, `decode --qemu`), on
QEMU 7.2 and 10.0: the return path, switchover-ack and postcopy, whose messages travel from the
destination QEMU back to the source through the wire's answer direction.

The source migrates to `unix:` where encode listens; decode connects to the destination's
`migrate-incoming unix:`; the wire between them is a UNIX socket. Memory is compared where it can
be known: a source paused before the migration holds exactly what the destination must hold.
"""

import subprocess
from pathlib import Path

import pytest
import qemuvm
from support import MIGPIPE

pytestmark = pytest.mark.qemu


def start_tunnel(tmp_path: Path, filters: list[str], reader: list[str] = ()) -> tuple:
    """encode listening for the source QEMU, decode for encode's wire, both running."""
    wire, src, dst = tmp_path / "wire.sock", tmp_path / "src.sock", tmp_path / "dst.sock"
    decode = subprocess.Popen(
        [*MIGPIPE, "decode", "--listen", f"unix:{wire}", "--qemu", f"unix:{dst}", *reader],
        stderr=subprocess.PIPE,
    )
    encode = subprocess.Popen(
        [*MIGPIPE, "encode", "--connect", f"unix:{wire}", "--qemu", f"unix:{src}", *filters],
        stderr=subprocess.PIPE,
    )
    return encode, decode, src, dst


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=60)
    return process.returncode, err.decode()


def capabilities(vm: qemuvm.Vm, *names: str) -> None:
    caps = [{"capability": name, "state": True} for name in ("events", *names)]
    vm.qmp.execute("migrate-set-capabilities", capabilities=caps)


@pytest.mark.parametrize("filters", [[], ["--xbzrle", "--compress", "zstd:1"]])
@pytest.mark.parametrize("caps", [("return-path",), ("postcopy-ram",)])
def test_a_paused_guest_with_the_return_path(
    guest_elf: Path,
    qemu_build: qemuvm.QemuBuild,
    tmp_path: Path,
    caps: tuple[str, ...],
    filters: list[str],
) -> None:
    encode, decode, src_sock, dst_sock = start_tunnel(tmp_path, filters)
    with (
        qemuvm.source_vm(guest_elf, "idle", tmp_path, qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-S", "-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        capabilities(dest, *caps)
        dest.qmp.execute("migrate-incoming", uri=f"unix:{dst_sock}")
        capabilities(src, *caps)
        src.qmp.execute("migrate", uri=f"unix:{src_sock}")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=60)
        qemuvm.wait_incoming(dest)
        assert finish(encode)[0] == 0
        assert finish(decode)[0] == 0
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")
