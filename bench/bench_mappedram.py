#!/usr/bin/env python3
"""Restoring one guest three ways: QEMU loading its own mapped-ram file, migpipe's sealed save
restored through migpipe, and that save turned into a mapped-ram file for QEMU to load.

Boots the test guest (tests/guest) on QEMU 10.0 with --ram MiB of RAM and its region of
--pages pages filled (zero, text, patterned and random pages), stops it, and saves it once
each way, as users save to files (a source each: QEMU migrates a guest once):

  qemu mapped-ram        migrate file:F, mapped-ram + multifd (2 channels)
  qemu mapped-ram 1ch    migrate file:F, mapped-ram alone
  migpipe zstd+enc       migrate exec:migpipe save F --compress zstd:1 --encrypt

Then restores each into a fresh QEMU 10.0 (-incoming defer), --runs times, the rows taking
turns (every other round in reverse), and checks the first restore of each row against the
source's memory (pmemsave from 1 MiB to the end of RAM):

  qemu mapped-ram         migrate-incoming file:F with mapped-ram + multifd 2
  qemu mapped-ram 1ch     the same without multifd
  migpipe restore         migrate-incoming exec:migpipe restore F --key-file K
  migpipe --to + qemu     migpipe restore F --to mapped-ram M, then QEMU loads M as row 1
                          (the conversion's time and the load's, and their sum)

A restore's time runs from migrate-incoming to QEMU's MIGRATION "completed" event; QEMU's
start is not in it. Files are in the page cache (just written), as a restore right after a
save finds them; the sizes are the file's length and its blocks on disk (holes not counted).
The box is shared with other jobs: read the medians, and compare rows of one run only.

    python bench/bench_mappedram.py                 # 1 GiB guest, 64 MiB filled, 5 runs
    python bench/bench_mappedram.py --quick         # the test guest's 128 MiB, 1 run
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(REPO / "tests")):
    if entry not in sys.path:  # run as a script from a checkout, migpipe not installed
        sys.path.insert(0, entry)

import qemuvm  # noqa: E402

from migpipe.keys import keygen  # noqa: E402

QEMU = qemuvm.QEMU_10_0
MIGPIPE = [sys.executable, "-m", "migpipe"]
MULTIFD = (["multifd"], {"multifd-channels": 2})
SINGLE: tuple[list[str], dict] = ([], {})
SOURCE_OF = {  # each row's file, by the save that made it
    "qemu mapped-ram multifd 2": "multifd",
    "qemu mapped-ram 1 channel": "single",
    "migpipe restore (zstd+enc)": "migpipe",
    "migpipe --to + qemu multifd 2": "migpipe",
}


def mapped_ram(vm: qemuvm.Vm, how: tuple[list[str], dict]) -> None:
    extra, parameters = how
    caps = [{"capability": name, "state": True} for name in ["mapped-ram", *extra]]
    vm.qmp.execute("migrate-set-capabilities", capabilities=caps)
    if parameters:
        vm.qmp.execute("migrate-set-parameters", **parameters)


def ram_args(ram: int) -> list[str]:
    return [] if ram == qemuvm.RAM_SIZE >> 20 else ["-m", str(ram)]


def saved(guest: Path, work: Path, ram: int, pages: int, key: Path, name: str, file: Path):
    """The guest saved one way (`name`: multifd, single or migpipe) by a source of its own
    (QEMU migrates a guest once): the seconds the save took, and the source's memory."""
    args = [*qemuvm.guest_args(guest, "idle"), "-S", *ram_args(ram)]
    args[args.index("mode=idle")] = f"mode=idle pages={pages}"
    with qemuvm.Vm(work, f"source-{name}", args, console=True, qemu=QEMU) as src:
        src.qmp.execute("cont")
        src.wait_console()
        src.qmp.execute("stop")
        src.qmp.execute(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )
        memory = src.pmemsave(work / "source.mem", size=(ram << 20) - qemuvm.IMAGE_START)
        start = time.monotonic()
        if name == "migpipe":
            command = shlex.join(
                [*MIGPIPE, "save", str(file), "--compress", "zstd:1", "--encrypt", "--key-file",
                 str(key)]
            )  # fmt: skip
            _, status = qemuvm.run_migration(src, command, qemuvm.PACINGS["idle"])
            if status != 0:
                sys.exit(f"migpipe save exited with status {status}")
        else:
            mapped_ram(src, MULTIFD if name == "multifd" else SINGLE)
            src.qmp.execute("migrate", uri=f"file:{file}")
            done = src.qmp.wait_event(
                "MIGRATION", lambda e: e["data"]["status"] in ("completed", "failed")
            )
            if done["data"]["status"] != "completed":
                sys.exit(f"QEMU's save failed: {src.log_tail(5)}")
        return time.monotonic() - start, memory


def load(work: Path, ram: int, uri: str, how: tuple[list[str], dict] | None) -> tuple[float, bytes]:
    """A fresh QEMU loads `uri`; the seconds from migrate-incoming to completed, its memory."""
    args = ["-S", "-incoming", "defer", *ram_args(ram)]
    with qemuvm.Vm(work, "dest", args, qemu=QEMU) as dest:
        dest.qmp.execute(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )
        if how is not None:
            mapped_ram(dest, how)
        start = time.monotonic()
        dest.qmp.execute("migrate-incoming", uri=uri)
        qemuvm.wait_incoming(dest)
        seconds = time.monotonic() - start
        memory = dest.pmemsave(work / "dest.mem", size=(ram << 20) - qemuvm.IMAGE_START)
    return seconds, memory


def convert(saved_file: Path, key: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    start = time.monotonic()
    subprocess.run(
        [*MIGPIPE, "restore", str(saved_file), "--key-file", str(key), "--to", "mapped-ram",
         str(out)],
        check=True,
    )  # fmt: skip
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ram", type=int, default=1024, help="guest RAM, MiB (1024)")
    parser.add_argument("--pages", type=int, default=16384, help="pages the guest fills (16384)")
    parser.add_argument("--runs", type=int, default=5, help="timed restores per row (5)")
    parser.add_argument("--quick", action="store_true", help="128 MiB, one run")
    parser.add_argument("--dir", type=Path, help="where the files go (a temporary directory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.ram, args.runs = qemuvm.RAM_SIZE >> 20, 1
    if QEMU.binary is None:
        sys.exit(QEMU.missing)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-mappedram.") as tmp:
        work = Path(tmp)
        key = work / "key"
        keygen(key)
        guest = qemuvm.build_guest(work / "guest")
        files = {
            "multifd": work / "qemu-multifd.mapped",
            "single": work / "qemu-single.mapped",
            "migpipe": work / "vm.mig",
        }
        save_seconds, sources = {}, {}
        for name, file in files.items():
            save_seconds[name], sources[name] = saved(
                guest, work, args.ram, args.pages, key, name, file
            )
        converted = work / "converted.mapped"
        restored_from = shlex.join([*MIGPIPE, "restore", str(files["migpipe"])])
        restored_from += f" --key-file {shlex.quote(str(key))}"
        rows: dict[str, Callable[[], tuple[list[float], bytes]]] = {
            "qemu mapped-ram multifd 2": lambda: one(
                load(work, args.ram, f"file:{files['multifd']}", MULTIFD)
            ),
            "qemu mapped-ram 1 channel": lambda: one(
                load(work, args.ram, f"file:{files['single']}", SINGLE)
            ),
            "migpipe restore (zstd+enc)": lambda: one(
                load(work, args.ram, f"exec:{restored_from}", None)
            ),
            "migpipe --to + qemu multifd 2": lambda: converted_row(
                convert(files["migpipe"], key, converted),
                load(work, args.ram, f"file:{converted}", MULTIFD),
            ),
        }
        times: dict[str, list[list[float]]] = {name: [] for name in rows}
        for run in range(args.runs):
            order = list(rows) if run % 2 == 0 else list(reversed(rows))
            for name in order:
                parts, memory = rows[name]()
                if run == 0 and memory != sources[SOURCE_OF[name]]:
                    sys.exit(f"{name}: the restored memory differs from the source's")
                times[name].append(parts)
        sizes = {
            "qemu mapped-ram multifd 2": files["multifd"],
            "qemu mapped-ram 1 channel": files["single"],
            "migpipe restore (zstd+enc)": files["migpipe"],
            "migpipe --to + qemu multifd 2": converted,
        }
        saves = {name: save_seconds[SOURCE_OF[name]] for name in rows}
        print(
            f"QEMU {QEMU.reported_version()}, guest {args.ram} MiB RAM, {args.pages} pages "
            f"({args.pages * 4096 >> 20} MiB) filled, stopped; median of {args.runs} restores; "
            "memory checked equal to the source's"
        )
        print(
            f"{'row':<31} {'restore s':>9} {'(convert':>9} {'+ load)':>8} {'save s':>7} "
            f"{'file MB':>8} {'disk MB':>8}"
        )
        for name in rows:
            total = statistics.median(sum(parts) for parts in times[name])
            split = ""
            if len(times[name][0]) == 2:
                convert_s = statistics.median(parts[0] for parts in times[name])
                load_s = statistics.median(parts[1] for parts in times[name])
                split = f"{convert_s:>9.3f} {load_s:>8.3f}"
            stat = sizes[name].stat()
            print(
                f"{name:<31} {total:>9.3f} {split:>18} {saves[name]:>7.3f} "
                f"{stat.st_size / 1e6:>8.1f} {stat.st_blocks * 512 / 1e6:>8.1f}"
            )
    return 0


def one(result: tuple[float, bytes]) -> tuple[list[float], bytes]:
    seconds, memory = result
    return [seconds], memory


def converted_row(convert_s: float, loaded: tuple[float, bytes]) -> tuple[list[float], bytes]:
    return [convert_s, loaded[0]], loaded[1]


if __name__ == "__main__":
    sys.exit(main())
