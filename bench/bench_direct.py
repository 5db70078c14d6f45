#!/usr/bin/env python3
"""How fast `migpipe save --direct` and migpipe's O_DIRECT writer and reader move a save image,
next to dd.

Writes a synthetic QEMU stream (--size, about 2 GiB; bench_stream's guest) into a temporary
directory on the disk under test (--dir), warms it in the page cache as the stream a save reads
from QEMU would be, then times, on those same bytes:

  write  dd if=SRC of=DST oflag=direct bs=4M                      the issue's reference
         migpipe save --direct DST < SRC                           the command, reading SRC as dd
         cat SRC | migpipe save --direct DST                       the command, fed by a pipe
         cat SRC | DirectWriter.write(1 MiB chunks)                its writer alone
         cat SRC | migpipe iohelper DST 1                          DST open O_DIRECT on stdout
         cat SRC | dd of=DST oflag=direct bs=4M iflag=fullblock   dd fed from a pipe
         cat SRC | dd of=DST oflag=direct bs=1M iflag=fullblock   libvirt_iohelper's serial loop
  read   dd if=DST iflag=direct bs=4M of=/dev/null                the disk alone
         dd if=DST iflag=direct bs=4M | cat > /dev/null           dd into a pipe
         migpipe iohelper DST 0 | cat > /dev/null                  DST open O_DIRECT on stdin
         DirectReader.read() | cat > /dev/null                     restore's reader alone
         migpipe restore --direct DST.mig | cat > /dev/null        the command (a saved file)

Each row runs once untimed (a warm-up that also checks the bytes written, or for save the
stream restore gives back, and how much of DST the page cache holds afterwards, by fincore),
then --runs times, the rows taking turns (every other round in reverse order); before each
write DST is removed and the disk synced, and before each timed run the box is given up to
--idle-wait seconds to fall idle (other jobs share it; see bench_tunnel.py). The table gives
MB/s (10^6 stream bytes per wall second, median), the ratio to the first row of its kind, the
CPU seconds of the row's processes (median), the cached share of DST after the write, and the
KiB the disk moved per request (median; /proc/diskstats: the block layer splits a call whose
buffer spans more pieces of memory than the device takes at once). Then the target: `migpipe
save --direct` of a raw stream >= 0.9x dd oflag=direct bs=4M, as the median of the two rows'
ratio in each round, where they run one after the other (a box others share swings more than
that from one minute to the next): judged on the save that reads SRC itself, as dd does; the
save fed by `cat` (as QEMU feeds it, through a pipe) is compared with dd fed by `cat` the same
way. Every migpipe row includes its final fdatasync; dd's rows have none (O_DIRECT data is on
the device already).

    python bench/bench_direct.py                  # 2 GiB
    python bench/bench_direct.py --quick          # 128 MiB, one timed run: a smoke test
    python bench/bench_direct.py --target --runs 11   # only the two rows the target compares
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH)):
    if entry not in sys.path:  # run as a script from a checkout, migpipe not installed
        sys.path.insert(0, entry)

from migpipe.cli.options import size_argument  # noqa: E402
from migpipe.io.direct import DirectReader, DirectWriter, alignment, open_direct  # noqa: E402
from migpipe.io.files import enlarge_pipe  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
QUICK_SIZE = 128 * MIB
TARGET = 0.9  # save --direct >= 0.9x dd oflag=direct bs=4M (the number)
PYTHON = sys.executable
MIGPIPE = [PYTHON, "-m", "migpipe"]
SELF = [PYTHON, str(Path(__file__).resolve())]

CHILD_ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
)
Row = Callable[[Path, Path], None]


# -- the children that run migpipe's writer and reader in-process -----------------------------


def child_write(path: str) -> None:
    """stdin to `path` through DirectWriter.write, in the 1 MiB pieces a pipeline hands it."""
    enlarge_pipe(0)  # as migpipe does for every pipe it reads
    with open_direct(path, "w") as file, DirectWriter(file) as writer:
        while chunk := os.read(0, MIB):
            writer.write([chunk])
        writer.finish()


def child_read(path: str) -> None:
    """`path` to stdout through DirectReader.read, as a pipeline reads a Channel."""
    enlarge_pipe(1)
    with open_direct(path, "r") as file, DirectReader(file) as reader:
        while chunk := reader.read():
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view) :]


# -- the rows ---------------------------------------------------------------------------------


def run(*stages: list[str], stdin: int | None = None, stdout: int | None = None) -> None:
    """A pipeline of `stages`, the first reading `stdin`, the last writing `stdout`."""
    processes: list[subprocess.Popen[bytes]] = []
    source = stdin
    for i, argv in enumerate(stages):
        last = i == len(stages) - 1
        sink = stdout if last else subprocess.PIPE
        processes.append(subprocess.Popen(argv, stdin=source, stdout=sink, env=CHILD_ENV))
        if processes[-1].stdout is not None:
            source = processes[-1].stdout.fileno()
    for process in processes:
        if process.stdout is not None:
            process.stdout.close()
    for argv, process in zip(stages, processes, strict=True):
        if process.wait() != 0:
            raise SystemExit(f"failed ({process.returncode}): {' '.join(argv)}")


def opened(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o644)


def dd_write(src: Path, dst: Path) -> None:
    run(["dd", f"if={src}", f"of={dst}", "oflag=direct", "bs=4M", "status=none"])


def dd_pipe_write(bs: str) -> Row:
    def row(src: Path, dst: Path) -> None:
        dd = ["dd", f"of={dst}", "oflag=direct", f"bs={bs}", "iflag=fullblock", "status=none"]
        run(["cat", str(src)], dd)

    return row


def iohelper_write(src: Path, dst: Path) -> None:
    fd = opened(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    try:
        run(["cat", str(src)], [*MIGPIPE, "iohelper", str(dst), "1"], stdout=fd)
    finally:
        os.close(fd)


def writer_write(src: Path, dst: Path) -> None:
    run(["cat", str(src)], [*SELF, "--child-write", str(dst)])


def save_write(src: Path, dst: Path) -> None:
    run(["cat", str(src)], [*MIGPIPE, "save", str(dst), "--force", "--direct"])


def save_from_file(src: Path, dst: Path) -> None:
    fd = opened(src, os.O_RDONLY)
    try:
        run([*MIGPIPE, "save", str(dst), "--force", "--direct"], stdin=fd)
    finally:
        os.close(fd)


def null_sink() -> int:
    return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


def dd_read(src: Path, dst: Path) -> None:
    run(["dd", f"if={dst}", "iflag=direct", "bs=4M", "of=/dev/null", "status=none"])


def dd_pipe_read(src: Path, dst: Path) -> None:
    sink = null_sink()
    try:
        run(["dd", f"if={dst}", "iflag=direct", "bs=4M", "status=none"], ["cat"], stdout=sink)
    finally:
        os.close(sink)


def iohelper_read(src: Path, dst: Path) -> None:
    fd, sink = opened(dst, os.O_RDONLY | os.O_DIRECT), null_sink()
    try:
        run([*MIGPIPE, "iohelper", str(dst), "0"], ["cat"], stdin=fd, stdout=sink)
    finally:
        os.close(fd)
        os.close(sink)


def restore_read(src: Path, dst: Path) -> None:
    sink = null_sink()
    try:
        run([*MIGPIPE, "restore", str(dst.with_suffix(".mig")), "--direct"], ["cat"], stdout=sink)
    finally:
        os.close(sink)


def reader_read(src: Path, dst: Path) -> None:
    sink = null_sink()
    try:
        run([*SELF, "--child-read", str(dst)], ["cat"], stdout=sink)
    finally:
        os.close(sink)


DD_ROW, DD_PIPE_ROW = "dd if=SRC of=DST oflag=direct bs=4M", "cat SRC | dd oflag=direct bs=4M"
SAVE_ROW, SAVE_PIPE_ROW = "migpipe save --direct DST < SRC", "cat SRC | migpipe save --direct DST"
WRITES: list[tuple[str, Row]] = [
    (DD_ROW, dd_write),
    (SAVE_ROW, save_from_file),
    (SAVE_PIPE_ROW, save_write),
    ("cat SRC | DirectWriter.write", writer_write),
    ("cat SRC | migpipe iohelper DST 1", iohelper_write),
    (DD_PIPE_ROW, dd_pipe_write("4M")),
    ("cat SRC | dd oflag=direct bs=1M (libvirt)", dd_pipe_write("1M")),
]
READS: list[tuple[str, Row]] = [
    ("dd if=DST iflag=direct bs=4M of=/dev/null", dd_read),
    ("dd if=DST iflag=direct bs=4M | cat", dd_pipe_read),
    ("migpipe iohelper DST 0 | cat", iohelper_read),
    ("DirectReader.read | cat", reader_read),
    ("migpipe restore --direct DST | cat", restore_read),
]


# -- measuring ----------------------------------------------------------------------------------


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def disk_counters(directory: Path) -> Callable[[], tuple[int, int]] | None:
    """Requests and 512-byte sectors the device holding `directory` completed so far (reads and
    writes together; /proc/diskstats), or None where that is no block device."""
    device = os.stat(directory).st_dev
    wanted = (str(os.major(device)), str(os.minor(device)))

    def counters() -> tuple[int, int]:
        with open("/proc/diskstats") as f:
            for line in f:
                fields = line.split()
                if tuple(fields[:2]) == wanted:
                    return int(fields[3]) + int(fields[7]), int(fields[5]) + int(fields[9])
        raise LookupError(wanted)

    try:
        counters()
    except (OSError, LookupError):
        return None
    return counters


def timed(
    row: Row, src: Path, dst: Path, disk: Callable[[], tuple[int, int]] | None
) -> tuple[float, float, float]:
    """Wall and CPU seconds of one run, and the KiB a request to the disk moved on average."""
    requests, sectors = disk() if disk else (0, 0)
    cpu, start = children_cpu(), time.monotonic()
    row(src, dst)
    wall, cpu = time.monotonic() - start, children_cpu() - cpu
    if disk is None:
        return wall, cpu, float("nan")
    requests_after, sectors_after = disk()
    return wall, cpu, (sectors_after - sectors) / 2 / max(1, requests_after - requests)


def cached_share(path: Path) -> float:
    """The share of `path` in the page cache, by fincore(1)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip()) / max(1, path.stat().st_size)


def crc_of(path: Path) -> int:
    """The CRC of a file, read without leaving it in the page cache."""
    crc = 0
    with open_direct(str(path), "r") as file, DirectReader(file) as reader:
        while chunk := reader.read():
            crc = zlib.crc32(chunk, crc)
    return crc


def write_source(path: Path, size: int) -> int:
    """A QEMU stream of about `size` bytes (bench_stream's synthetic guest: what save reads
    from QEMU, and plain bytes to every other row); its CRC."""
    from bench_stream import generate, guest_for

    generate(guest_for(size, seed=1), path)
    with open(path, "rb") as f:
        return zlib.crc32(f.read())


def stream_crc(saved: Path) -> int:
    """The CRC of the QEMU stream `migpipe restore` gives back from a saved file."""
    restore = subprocess.run([*MIGPIPE, "restore", str(saved)], capture_output=True, check=True)
    return zlib.crc32(restore.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=size_argument, default=2 * GIB, help="bytes to move (2G)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per row (3)")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk under test")
    parser.add_argument("--quick", action="store_true", help="128 MiB, one timed run")
    parser.add_argument(
        "--target", action="store_true", help="only the target's two rows (dd, save < SRC)"
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each timed run, wait up to this long for the box to be idle (10, --quick 0)",
    )
    parser.add_argument("--child-write", help=argparse.SUPPRESS)
    parser.add_argument("--child-read", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_write:
        child_write(args.child_write)
        return 0
    if args.child_read:
        child_read(args.child_read)
        return 0
    if args.quick:
        args.size, args.runs = QUICK_SIZE, 1
    if args.idle_wait is None:
        args.idle_wait = 0.0 if args.quick else 10.0
    measure(args.size, args.runs, args.dir, args.idle_wait, args.target)
    return 0


def measure(
    size: int, runs: int, where: Path | None, idle_wait: float, target_only: bool = False
) -> None:
    """Run the rows and print the table (the children above import nothing of this);
    `target_only`: only the two rows the target compares."""
    from bench_stream import machine_facts, warm
    from bench_tunnel import wait_for_idle

    for package in ("migpipe", "filters"):  # as installed: no child compiles edited modules
        compileall.compile_dir(REPO / package, quiet=1)
    with tempfile.TemporaryDirectory(prefix="migpipe-bench-", dir=where) as tmp:
        directory = Path(tmp).resolve()
        src, dst = directory / "source", directory / "image"
        print(f"migpipe O_DIRECT benchmark: {size / MIB:,.0f} MiB, median of {runs} runs")
        for line in machine_facts(directory):
            print(line)
        crc = write_source(src, size)
        size = src.stat().st_size
        os.sync()  # its write-back would otherwise share the disk with the first rows
        fd = os.open(src, os.O_RDONLY)
        print(f"O_DIRECT alignment there: {alignment(fd)} bytes")
        os.close(fd)
        print()

        writes, reads = (WRITES[:2], []) if target_only else (WRITES, READS)
        results: dict[str, list[tuple[float, float, float]]] = {}
        disk = disk_counters(directory)
        cached: dict[str, float] = {}
        for name, row in writes:  # warm-up: check the bytes and the cache
            warm(src)
            dst.unlink(missing_ok=True)
            row(src, dst)
            cached[name] = cached_share(dst)
            if name in (SAVE_ROW, SAVE_PIPE_ROW):
                same = stream_crc(dst) == crc
                dst.replace(dst.with_suffix(".mig"))  # for the restore row
            else:
                same = dst.stat().st_size == size and crc_of(dst) == crc
            if not same:
                raise SystemExit(f"{name}: the image differs from the source")
        for _, row in reads:
            row(src, dst)
        for round_ in range(runs):
            # every other round backwards: no row always runs right after the same other one
            for name, row in writes if round_ % 2 == 0 else writes[::-1]:
                warm(src)
                dst.unlink(missing_ok=True)
                os.sync()
                wait_for_idle(idle_wait)
                results.setdefault(name, []).append(timed(row, src, dst, disk))
            for name, row in reads:
                wait_for_idle(idle_wait)
                results.setdefault(name, []).append(timed(row, src, dst, disk))

    def mb_s(name: str) -> float:
        return size / statistics.median(wall for wall, _, _ in results[name]) / 1e6

    print(f"{'':<44} {'MB/s':>8} {'ratio':>6} {'CPU s':>6} {'cached':>7} {'KiB/req':>8}")
    for kind, rows in (("write", writes), ("read", reads)):
        if not rows:
            continue
        print(kind)
        reference = mb_s(rows[0][0])
        for name, _ in rows:
            cpu = statistics.median(c for _, c, _ in results[name])
            request = statistics.median(r for _, _, r in results[name])
            share = f"{cached[name]:>6.1%}" if name in cached else ""
            print(
                f"  {name:<42} {mb_s(name):>8,.0f} {mb_s(name) / reference:>6.2f} {cpu:>6.2f} "
                f"{share:>7} {request:>8,.0f}"
            )

    # The rows of a pair ran one after the other in each round: each ratio shares one moment's load.
    def ratios(reference: str, name: str) -> list[float]:
        rounds = zip(results[reference], results[name], strict=True)
        return [ref / ours for (ref, _, _), (ours, _, _) in rounds]

    judged = ratios(DD_ROW, SAVE_ROW)
    ratio = statistics.median(judged)
    verdict = "met" if ratio >= TARGET else "NOT met"
    each = ", ".join(f"{r:.2f}" for r in judged)
    print(
        f"\ntarget: migpipe save --direct >= {TARGET}x dd oflag=direct bs=4M of the same "
        f"stream: {ratio:.2f}x, {verdict} (median of the rounds' ratios: {each})"
    )
    if not target_only:
        piped = statistics.median(ratios(DD_PIPE_ROW, SAVE_PIPE_ROW))
        print(f"both fed by cat, through a pipe: save --direct {piped:.2f}x dd")


if __name__ == "__main__":
    sys.exit(main())
