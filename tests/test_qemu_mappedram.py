"""QEMU 10.0's own mapped-ram files through migpipe, and migpipe's loaded by QEMU 10.0.

The source is stopped before it saves (as users do for files, and as QEMU's documentation
advises for mapped-ram), so its memory afterwards is the oracle: every destination must hold
exactly that, from 1 MiB to the end of RAM (qemuvm.IMAGE_START). Mapped-ram is QEMU 9.0's, so
only the 10.0 build runs these.
"""

import json
import shlex
from pathlib import Path

import oracle
import pytest
import qemuvm
from support import MIGPIPE_SHELL as MIGPIPE
from support import migpipe

from migpipe.keys import keygen

pytestmark = pytest.mark.qemu
QEMU = qemuvm.QEMU_10_0
# How QEMU writes or loads the file: capabilities and parameters beside mapped-ram.
MODES = {
    "plain": ([], {}),
    "multifd": (["multifd"], {"multifd-channels": 2}),
    "multifd direct-io": (["multifd"], {"multifd-channels": 2, "direct-io": True}),
}


@pytest.fixture(scope="module")
def qemu10(guest_elf: Path) -> qemuvm.QemuBuild:
    if QEMU.binary is None:
        pytest.fail(QEMU.missing)
    return QEMU


def mapped_ram(vm: qemuvm.Vm, mode: str) -> None:
    """Turn on mapped-ram, and what `mode` adds, on a source or an `-incoming defer` VM."""
    extra, parameters = MODES[mode]
    caps = [{"capability": name, "state": True} for name in ["mapped-ram", *extra]]
    vm.qmp.execute("migrate-set-capabilities", capabilities=caps)
    if parameters:
        vm.qmp.execute("migrate-set-parameters", **parameters)


def saved_by_qemu(
    guest_elf: Path, workdir: Path, path: Path, mode: str, args: tuple[str, ...] = ()
) -> bytes:
    """QEMU 10.0 saves the stopped guest with `migrate file:PATH`; its memory is returned."""
    with qemuvm.source_vm(guest_elf, "idle", workdir, qemu=QEMU, args=args) as src:
        mapped_ram(src, mode)
        src.qmp.execute("migrate", uri=f"file:{path}")
        done = src.qmp.wait_event(
            "MIGRATION", lambda e: e["data"]["status"] in ("completed", "failed")
        )
        assert done["data"]["status"] == "completed", src.log_tail()
        return src.pmemsave(workdir / "source.mem")


def loaded(
    workdir: Path,
    uri: str,
    mode: str | None = None,
    qemu: qemuvm.QemuBuild = QEMU,
    args: tuple[str, ...] = (),
) -> bytes:
    """A fresh QEMU (10.0) loads `uri` (with mapped-ram and `mode` when given); its memory."""
    with qemuvm.Vm(workdir, "dest", ["-S", "-incoming", "defer", *args], qemu=qemu) as dest:
        dest.qmp.execute(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )
        if mode is not None:
            mapped_ram(dest, mode)
        dest.qmp.execute("migrate-incoming", uri=uri)
        qemuvm.wait_incoming(dest)
        return dest.pmemsave(workdir / "dest.mem")


@pytest.mark.parametrize(
    ("mode", "layout"), [*zip(MODES, ["stream", "fixed", "stream"], strict=True)]
)
def test_qemus_mapped_ram_file_is_inspected_restored_and_saved(
    qemu10: qemuvm.QemuBuild, guest_elf: Path, tmp_path: Path, mode: str, layout: str
) -> None:
    """inspect shows it, restore gives a stream any -incoming loads, save stores it (zstd,
    encrypted, in either layout) and that save restores: each to the source's memory."""
    file, saved, key = tmp_path / "vm.mapped", tmp_path / "vm.mig", tmp_path / "key"
    source = saved_by_qemu(guest_elf, tmp_path, file, mode)

    report = json.loads(migpipe("inspect", "--json", str(file)).stdout)
    assert report["error"] is None and report["machine"] == QEMU.machine
    blocks = {block["name"]: block for block in report["file"]["mapped_ram"]}
    assert 0 < blocks["pc.ram"]["present"] < blocks["pc.ram"]["pages"]
    assert report["pages"]["normal"] == sum(block["present"] for block in blocks.values())

    restored = loaded(tmp_path, f"exec:{MIGPIPE} restore {shlex.quote(str(file))}")
    assert oracle.first_difference(restored, source) is None

    keygen(key)
    with open(file, "rb") as stdin:
        done = migpipe(
            "save", str(saved), "--layout", layout, "--compress", "zstd:1", "--encrypt",
            "--key-file", str(key), stdin=stdin,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert saved.stat().st_blocks < file.stat().st_blocks  # compressed
    uri = f"exec:{MIGPIPE} restore {shlex.quote(str(saved))} --key-file {shlex.quote(str(key))}"
    assert oracle.first_difference(loaded(tmp_path, uri), source) is None


@pytest.mark.parametrize("mode", ["plain", "multifd direct-io"])
def test_a_sealed_migpipe_save_restores_as_mapped_ram_qemu_loads(
    qemu10: qemuvm.QemuBuild, guest_elf: Path, tmp_path: Path, mode: str
) -> None:
    """restore --to mapped-ram of a zstd, encrypted save: QEMU 10.0 loads the file itself
    (in parallel, O_DIRECT with direct-io), holes where the guest had zero pages."""
    saved, key, out = tmp_path / "vm.mig", tmp_path / "key", tmp_path / "vm.mapped"
    keygen(key)
    sealed = f"--compress zstd:1 --encrypt --key-file {shlex.quote(str(key))}"
    with qemuvm.source_vm(guest_elf, "idle", tmp_path, qemu=QEMU) as src:
        command = f"{MIGPIPE} save {shlex.quote(str(saved))} {sealed}"
        _, status = qemuvm.run_migration(src, command, qemuvm.PACINGS["idle"])
        assert status == 0
        source = src.pmemsave(tmp_path / "source.mem")
    done = migpipe("restore", str(saved), "--key-file", str(key), "--to", "mapped-ram", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_blocks * 512 < out.stat().st_size / 2  # the zero pages are holes
    assert oracle.first_difference(loaded(tmp_path, f"file:{out}", mode), source) is None


# QEMU 10.0 running the machine type of 7.2 writes what 7.2 loads, and loads what 7.2 wrote.
MACHINE_7_2 = ("-machine", qemuvm.QEMU_7_2.machine)


def test_qemu_10_0s_mapped_ram_file_restores_into_qemu_7_2(
    qemu10: qemuvm.QemuBuild, guest_elf: Path, tmp_path: Path
) -> None:
    """7.2 has no mapped-ram: the ordinary stream migpipe gives is all it needs."""
    file = tmp_path / "vm.mapped"
    source = saved_by_qemu(guest_elf, tmp_path, file, "plain", MACHINE_7_2)
    uri = f"exec:{MIGPIPE} restore {shlex.quote(str(file))}"
    assert oracle.first_difference(loaded(tmp_path, uri, qemu=qemuvm.QEMU_7_2), source) is None


def test_a_qemu_7_2_save_restores_as_mapped_ram_qemu_10_0_loads(
    qemu10: qemuvm.QemuBuild, guest_elf: Path, tmp_path: Path
) -> None:
    """7.2's stream lists no capability: the file gets the subsection QEMU 10.0 checks."""
    saved, out = tmp_path / "vm.mig", tmp_path / "vm.mapped"
    with qemuvm.source_vm(guest_elf, "idle", tmp_path, qemu=qemuvm.QEMU_7_2) as src:
        command = f"{MIGPIPE} save {shlex.quote(str(saved))} --compress lz4"
        _, status = qemuvm.run_migration(src, command, qemuvm.PACINGS["idle"])
        assert status == 0
        source = src.pmemsave(tmp_path / "source.mem")
    done = migpipe("restore", str(saved), "--to", "mapped-ram", str(out))
    assert done.returncode == 0, done.stderr
    memory = loaded(tmp_path, f"file:{out}", "multifd", args=MACHINE_7_2)
    assert oracle.first_difference(memory, source) is None
