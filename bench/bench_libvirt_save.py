#!/usr/bin/env python3
"""libvirt 11.3's `virsh save` and `virsh restore` next to `migpipe save` and `migpipe restore` of
the same guest: time and size, in one table.

The guest is tests/guest (built here) under the libvirt 11.3 that setup.sh unpacks, driving QEMU
10.0, as tests/test_libvirt.py runs them (virsh's embedded driver, no daemon): --ram MiB (128, the
tests' guest), idle after filling --pages 4 KiB pages from 8 MiB on with qemuvm's mix (about a
quarter each zero, text, patterned and random pages), so 8 MiB + 4 KiB x pages must fit in
--ram. It is built from tests/guest with its region's limit (64 MiB, 16384 pages) raised to
what --ram holds; pc's 32-bit guest, paging off, reaches at most 3072 MiB. Each round boots a
guest for each row and saves it that way, the rows taking turns (every other round in reverse
order), then restores each image:

  virsh save --image-format sparse --parallel-channels 2   QEMU's mapped-ram file, 2 channels
  virsh save --image-format zstd                           the stream through `zstd -c`
  virsh save --image-format raw                            the stream as is: libvirt's cost
  migpipe save --qmp --compress zstd:1 --direct            in-process zstd, around the cache
  migpipe save --qmp --libvirt-xml --image-format sparse   libvirt's sparse image, one stream
  migpipe save --qmp --libvirt-xml --image-format zstd     libvirt's zstd image, zstd's threads

virsh restore starts the domain's QEMU and loads the image into it (sparse with
--parallel-channels 2), migpipe's libvirt images too; for migpipe's own file, the same QEMU
10.0 starts with -incoming defer and `migpipe restore --qmp --direct` loads it, timed from
QEMU's start too. migpipe drives the guest libvirt started through a second QMP monitor, as
`migpipe save --qmp` needs one to itself (libvirt holds its own). Save
times end when the command returns (virsh: the header finalized; migpipe: the file synced and
named; virsh save also waits for the QEMU it kills to be gone, which test_libvirt's virsh
reaps at once: see its REAPER); size is the file's length and what the disk holds of it (sparse
leaves holes). Before each timed step the box is given up to --idle-wait seconds to fall idle
(others share it).

    python bench/bench_libvirt_save.py               # 3 rounds, 16384 pages (64 MiB) filled
    python bench/bench_libvirt_save.py --quick       # 1 round: a smoke test
    python bench/bench_libvirt_save.py --ram 2048 --pages 393216   # 1.5 GiB of 2 GiB filled

The last is where multifd channels and direct I/O count: its 3 rounds take ~5 minutes here (2
cores), the guest filling 1.5 GiB in a few seconds at each boot; a round's 6 images (up to 2.2
GB long, 1.2 GB on disk each) hold ~6 GB of --dir at once: check its free space first.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH), str(REPO / "tests")):
    if entry not in sys.path:  # run as a script from a checkout, migpipe not installed
        sys.path.insert(0, entry)

import qemuvm  # noqa: E402
from bench_tunnel import wait_for_idle  # noqa: E402
from support import MIGPIPE  # noqa: E402
from test_libvirt import LIBVIRT_11_3, Virsh, domain_xml, emulator, running_domain  # noqa: E402

MB = 1_000_000
PAGE = 4096
REGION_START = 8 << 20  # tests/guest/guest.c's REGION_START: where the filled pages begin
MAX_RAM = 3072  # MiB: pc keeps RAM below 4 GiB up to 3.5 GiB; the guest addresses 32 bits


@dataclass
class Row:
    """One way to save and restore, and what it measured."""

    name: str
    save: Callable[[Virsh, str, Path, Path], None]  # shell, domain, image, workdir
    restore: Callable[[Virsh, str, Path, Path], None]
    save_seconds: list[float] = field(default_factory=list)
    restore_seconds: list[float] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # length, on disk


def virsh_save(options: str) -> Callable[[Virsh, str, Path, Path], None]:
    def save(virsh: Virsh, name: str, image: Path, _workdir: Path) -> None:
        virsh.run(f"save {name} {image} {options}")

    return save


def virsh_restore(options: str) -> Callable[[Virsh, str, Path, Path], None]:
    """virsh restore with the domain's XML but for its console and second monitor (the image's
    XML would connect to the save's console socket, gone)."""

    def restore(virsh: Virsh, name: str, image: Path, workdir: Path) -> None:
        xml = workdir / "restore.xml"
        virsh.run(f"restore {image} --xml {xml} {options}")

    return restore


def migpipe_save(virsh: Virsh, name: str, image: Path, workdir: Path) -> None:
    command = ["save", "--qmp", str(monitor(workdir)), str(image), "--compress", "zstd:1"]
    run_migpipe([*command, "--direct"])


def migpipe_libvirt_save(image_format: str) -> Callable[[Virsh, str, Path, Path], None]:
    """migpipe save writing libvirt's image, for virsh restore (the domain's XML in it)."""

    def save(virsh: Virsh, name: str, image: Path, workdir: Path) -> None:
        xml = ["--libvirt-xml", str(workdir / "restore.xml"), "--image-format", image_format]
        run_migpipe(["save", "--qmp", str(monitor(workdir)), str(image), *xml])

    return save


def migpipe_restore(virsh: Virsh, name: str, image: Path, workdir: Path) -> None:
    sock = workdir / "restore.qmp"
    args = [*qemuvm.qmp_socket_args(sock), "-incoming", "defer"]
    with qemuvm.Vm(workdir, f"restore-{image.stem}", args, qemu=LIBVIRT_11_3.qemu):
        run_migpipe(["restore", "--qmp", str(sock), str(image), "--direct"])


def monitor(workdir: Path) -> Path:
    return workdir / "save.qmp"


def run_migpipe(args: list[str]) -> None:
    done = subprocess.run([*MIGPIPE, "-q", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"migpipe {shlex.join(args)}: {done.stderr.strip()}")


ROWS = (
    (
        "virsh save sparse --parallel-channels 2",
        virsh_save("--image-format sparse --parallel-channels 2"),
        virsh_restore("--parallel-channels 2"),
    ),
    ("virsh save zstd (zstd -c)", virsh_save("--image-format zstd"), virsh_restore("")),
    ("virsh save raw (libvirt's own cost)", virsh_save("--image-format raw"), virsh_restore("")),
    ("migpipe save zstd:1 --direct", migpipe_save, migpipe_restore),
    (
        "migpipe save --libvirt-xml sparse",
        migpipe_libvirt_save("sparse"),
        virsh_restore("--parallel-channels 2"),
    ),
    ("migpipe save --libvirt-xml zstd", migpipe_libvirt_save("zstd"), virsh_restore("")),
)


def build_guest(directory: Path, ram: int) -> Path:
    """tests/guest built as qemuvm.build_guest does, its region's limit (MAX_REGION_PAGES,
    64 MiB) raised to the pages `ram` MiB holds above REGION_START; pages=N within that fills N."""
    source = (qemuvm.GUEST_DIR / "guest.c").read_text()
    limit = ((ram << 20) - REGION_START) // PAGE
    patched, count = re.subn(
        r"^#define MAX_REGION_PAGES \d+u", f"#define MAX_REGION_PAGES {limit}u", source, flags=re.M
    )
    if count != 1:
        raise SystemExit("tests/guest/guest.c: no MAX_REGION_PAGES to raise")
    (directory / "guest.c").write_text(patched)
    out = directory / "guest.elf"
    ld = qemuvm.GUEST_DIR / "guest.ld"
    cmd = [str(qemuvm.CC), *qemuvm.GUEST_CFLAGS, "-T", str(ld), "-o", str(out), "guest.c"]
    done = subprocess.run(cmd, cwd=directory, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"building the guest failed: {shlex.join(cmd)}\n{done.stderr}")
    return out


def timed(step: Callable[[], None], idle_wait: float) -> float:
    wait_for_idle(idle_wait)
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def one_round(
    rows: list[Row], virsh: Virsh, guest: Path, cmdline: str, directory: Path, idle_wait: float
) -> None:
    """Save a fresh guest with each row, then restore each image."""
    for index, row in enumerate(rows):
        name = f"bench{index}"
        workdir = directory / name
        workdir.mkdir(exist_ok=True)
        image = directory / f"{name}.img"
        image.unlink(missing_ok=True)
        extra = qemuvm.qmp_socket_args(monitor(workdir))  # unused by virsh's rows
        with running_domain(virsh, name, guest, cmdline, extra):
            uuid = virsh.run(f"domuuid {name}").strip()  # what virsh restore --xml must keep
            restored = domain_xml(name, guest, cmdline, virsh.emulator)
            restored = restored.replace("</name>", f"</name><uuid>{uuid}</uuid>", 1)
            (workdir / "restore.xml").write_text(restored)
            step = partial(row.save, virsh, name, image, workdir)
            row.save_seconds.append(timed(step, idle_wait))
        stat = image.stat()
        row.sizes.append((stat.st_size, stat.st_blocks * 512))
    for index, row in enumerate(rows):
        name, workdir = f"bench{index}", directory / f"bench{index}"
        image = directory / f"{name}.img"
        step = partial(row.restore, virsh, name, image, workdir)
        row.restore_seconds.append(timed(step, idle_wait))
        virsh.destroy(name)  # a domain virsh restored; untimed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (3)")
    parser.add_argument("--ram", type=int, default=128, metavar="MIB", help="guest RAM (128)")
    parser.add_argument("--pages", type=int, default=16384, help="guest pages filled (16384)")
    parser.add_argument("--dir", default="/var/tmp", help="where the images go (/var/tmp)")
    parser.add_argument("--idle-wait", type=float, default=5.0, help="seconds (5)")
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    fits = ((args.ram << 20) - REGION_START) // PAGE
    if not 0 < args.ram <= MAX_RAM or not 0 < args.pages <= fits:
        parser.error(
            f"--pages {args.pages} of 4 KiB from 8 MiB on must fit in --ram {args.ram} MiB "
            f"(at most {max(fits, 0)} pages; --ram at most {MAX_RAM})"
        )
    # The tests' guest size, read at each use: the domains' XML (test_libvirt.domain_xml) and
    # the QEMU migpipe restores into (qemuvm.Vm's -m) get --ram, as the table's heading does.
    qemuvm.RAM_SIZE = args.ram << 20
    cmdline = f"mode=idle pages={args.pages}"
    root = Path(tempfile.mkdtemp(prefix="lvb", dir="/tmp"))  # short: libvirt's sockets are in it
    directory = Path(tempfile.mkdtemp(prefix="bench-libvirt-", dir=args.dir))
    virsh = None
    try:
        guest = build_guest(directory, args.ram)
        virsh = Virsh(LIBVIRT_11_3, root / "raw", "raw", emulator(LIBVIRT_11_3.qemu, root))
        virsh.run(f"domcapabilities --virttype qemu --emulatorbin {virsh.emulator} --machine pc")
        rows = [Row(name, save, restore) for name, save, restore in ROWS]
        for round_ in range(runs):
            order = rows if round_ % 2 == 0 else rows[::-1]
            one_round(order, virsh, guest, cmdline, directory, args.idle_wait)
        print_table(rows, args.pages, runs)
    finally:
        if virsh is not None:
            virsh.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def print_table(rows: list[Row], pages: int, runs: int) -> None:
    print(
        f"libvirt {LIBVIRT_11_3.version}, QEMU {LIBVIRT_11_3.qemu.reported_version()}: "
        f"a {qemuvm.RAM_SIZE >> 20} MiB guest, {pages} pages filled; median of {runs} "
        "(save: command to its return; restore: QEMU's start to the load's end)"
    )
    header = f"{'row':<42} {'save s':>8} {'size MB':>9} {'disk MB':>9} {'restore s':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        size = statistics.median(length for length, _ in row.sizes) / MB
        disk = statistics.median(used for _, used in row.sizes) / MB
        print(
            f"{row.name:<42} {statistics.median(row.save_seconds):>8.2f} {size:>9.1f} "
            f"{disk:>9.1f} {statistics.median(row.restore_seconds):>10.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
