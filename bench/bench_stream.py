#!/usr/bin/env python3
"""How fast migpipe parses and rewrites a QEMU migration stream, next to `cat`.

Generates a synthetic multi-pass precopy stream with migpipe's own generator and writer into a
temporary directory on disk, warms it in the page cache, then times on that same file:

  cat FILE > /dev/null, cat FILE | cat > /dev/null   (the byte-moving ceilings)
  a Python read loop, migpipe parse, migpipe parse + write, `python -m migpipe inspect`

and reports the median of --runs runs in MB/s (10^6 stream bytes per wall second) with the ratio
to `cat | cat`. It also measures the peak RSS of a parse + write child process for two stream
lengths, to show that memory does not grow with the stream. Standard library and migpipe only.

    python bench/bench_stream.py            # about 1 GiB of stream
    python bench/bench_stream.py --quick    # 64 MiB, a smoke test that runs in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout, migpipe not installed
    sys.path.insert(0, str(REPO))

from migpipe import __version__  # noqa: E402
from migpipe.cli.options import size_argument  # noqa: E402
from migpipe.io.files import read_chunks  # noqa: E402
from migpipe.stream.parser import StreamParser  # noqa: E402
from migpipe.stream.writer import StreamWriter  # noqa: E402
from migpipe.tools.synthetic import FIRMWARE_BLOCKS, PAGE, GuestModel, SyntheticGuest  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
QUICK_SIZE = 64 * MIB
# Guest shape: 4 passes, each later pass re-dirtying 20% of RAM. With the default page mix
# (40% non-zero) that makes the stream about as long as guest RAM.
ITERATIONS = 4
DIRTY_SHARE = 0.2
WORD = 8  # a RAM record's be64 word


# -- the stream -------------------------------------------------------------------------------


def guest_for(stream_bytes: int, seed: int) -> GuestModel:
    """A synthetic guest whose stream is about `stream_bytes` long.

    The bulk pass sends every page: a non-zero page costs the page plus its record word, a zero
    page the word plus one fill byte. Each later pass re-sends DIRTY_SHARE of RAM as whole pages.
    """
    mix = GuestModel().mix
    nonzero = 1 - mix["zero"] / sum(mix.values())
    per_page = (
        nonzero * (PAGE + WORD)
        + (1 - nonzero) * (WORD + 1)
        + (ITERATIONS - 1) * DIRTY_SHARE * (PAGE + WORD)
    )
    firmware = sum(size for _, size in FIRMWARE_BLOCKS)
    pages = max(16, round((stream_bytes / per_page) - firmware / PAGE))
    return GuestModel(
        ram_size=pages * PAGE, iterations=ITERATIONS, dirty_share=DIRTY_SHARE, seed=seed
    )


class Composition:
    """Records and bytes of a generated stream, by record kind."""

    def __init__(self) -> None:
        self.records: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.total = 0
        self.seconds = 0.0

    def render(self) -> list[str]:
        order = sorted(self.bytes, key=lambda kind: -self.bytes[kind])
        lines = [f"  {'record kind':<16} {'records':>12} {'bytes':>16} {'share':>7}"]
        for kind in order:
            share = self.bytes[kind] / self.total
            lines.append(
                f"  {kind:<16} {self.records[kind]:>12,} {self.bytes[kind]:>16,} {share:>7.2%}"
            )
        lines.append(f"  {'total':<16} {sum(self.records.values()):>12,} {self.total:>16,}")
        return lines


def generate(model: GuestModel, path: Path) -> Composition:
    """Write the guest's stream to `path` with migpipe's writer, counting what goes in."""
    composition = Composition()
    writer, buffer = StreamWriter(), bytearray()
    started = time.perf_counter()
    guest = SyntheticGuest(model)
    with open(path, "wb") as out:
        for record in guest.records():
            before = len(buffer)
            writer.write(buffer, record)
            kind = type(record).__name__
            composition.records[kind] += 1
            composition.bytes[kind] += len(buffer) - before
            if len(buffer) >= MIB:
                out.write(buffer)
                composition.total += len(buffer)
                buffer.clear()
        out.write(buffer)
        composition.total += len(buffer)
    composition.seconds = time.perf_counter() - started
    del guest  # its RAM images are as large as the guest
    return composition


# -- the measured operations ----------------------------------------------------------------


def python_read(path: Path) -> int:
    """Read the file in 1 MiB chunks and do nothing else: Python's own I/O floor."""
    total = 0
    with open(path, "rb") as f:
        for chunk in read_chunks(f):
            total += len(chunk)
    return total


def parse_only(path: Path) -> int:
    """Feed 1 MiB chunks to a StreamParser and drop the records; returns records parsed."""
    parser, records = StreamParser(), 0
    with open(path, "rb") as f:
        for chunk in read_chunks(f):
            parser.feed(chunk)
            records += len(parser.next_records())
    parser.close()
    records += len(parser.next_records())
    if not parser.done:
        raise RuntimeError("the parser did not reach the end of the stream")
    return records


def parse_write(path: Path) -> int:
    """Parser -> StreamWriter.write_all into one reused bytearray; returns bytes written."""
    parser, writer, out, written = StreamParser(), StreamWriter(), bytearray(), 0
    with open(path, "rb") as f:
        for chunk in read_chunks(f):
            parser.feed(chunk)
            writer.write_all(out, parser.next_records())
            written += len(out)
            out.clear()
    parser.close()
    writer.write_all(out, parser.next_records())
    return written + len(out)


def shell(command: str) -> Callable[[], None]:
    """A shell command to time; its failure stops the benchmark."""

    def run() -> None:
        subprocess.run(command, shell=True, check=True, env=child_env())

    return run


def child_env() -> dict[str, str]:
    """The environment for child Pythons: this checkout's migpipe first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def warm(path: Path) -> None:
    """Pull the file into the page cache (idle file cache is paged out here within a minute)."""
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(4 * MIB)
        while f.readinto(buffer):
            pass


def timed(path: Path, operation: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    """Median wall seconds of `runs` runs, the file re-warmed before each."""
    seconds = []
    for _ in range(runs):
        warm(path)
        started = time.perf_counter()
        operation()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), seconds


# -- memory -----------------------------------------------------------------------------------


def peak_rss_kib() -> int:
    """This process's peak resident set in KiB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_rss(path: Path | None) -> int:
    """Peak RSS (KiB) of a fresh child running parse + write over `path` (None: imports only)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child-rss", str(path or "")]
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=child_env())
    return int(result.stdout.split()[-1])


def run_child(path: str) -> None:
    """The child side of child_rss: do the work, print the peak RSS."""
    if path:
        size = os.path.getsize(path)
        written = parse_write(Path(path))
        if written != size:
            raise SystemExit(f"parse + write gave {written} bytes for a {size}-byte stream")
    print(peak_rss_kib())


# -- report -----------------------------------------------------------------------------------


def machine_facts(directory: Path) -> list[str]:
    """What about this machine matters to the numbers below."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        pipe_max = Path("/proc/sys/fs/pipe-max-size").read_text().strip()
    except OSError:
        pipe_max = "?"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"machine: nproc {os.cpu_count()} (usable {affinity}), {cpu}, "
        f"{platform.system()} {platform.release()} {platform.machine()}",
        f"python:  {platform.python_implementation()} {platform.python_version()}, "
        f"migpipe {__version__}, pipe-max-size {pipe_max}, load average {load}",
        f"disk:    {directory} ({filesystem_of(directory)})",
    ]


def filesystem_of(directory: Path) -> str:
    """The type of the filesystem holding `directory`, from /proc/mounts."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                mount = fields[1]
                inside = str(directory) == mount or str(directory).startswith(
                    mount.rstrip("/") + "/"
                )
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


@contextlib.contextmanager
def synthetic_stream(
    title: str, size: int, seed: int, runs: int, tmpdir: Path | None
) -> Iterator[tuple[Path, GuestModel, Path, Composition]]:
    """A temporary directory with a synthetic stream of about `size` bytes; prints the banner."""
    with tempfile.TemporaryDirectory(prefix="migpipe-bench-", dir=tmpdir) as tmp:
        directory = Path(tmp).resolve()
        print(
            f"migpipe {title} benchmark: about {size / MIB:,.0f} MiB of stream, "
            f"median of {runs} runs"
        )
        for line in machine_facts(directory):
            print(line)
        print()
        model = guest_for(size, seed)
        stream = directory / "guest.stream"
        yield directory, model, stream, generate(model, stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--size", type=size_argument, default=GIB, help="stream bytes, e.g. 256M or 2G (default 1G)"
    )
    parser.add_argument("--quick", action="store_true", help="a 64 MiB stream, for smoke tests")
    parser.add_argument("--runs", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--seed", type=int, default=1, help="synthetic guest seed")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the stream is written")
    parser.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_rss is not None:
        run_child(args.child_rss)
        return 0
    if args.runs < 1 or args.size <= 0:
        parser.error("--runs and --size must be positive")
    size = QUICK_SIZE if args.quick else args.size

    with synthetic_stream("stream", size, args.seed, args.runs, args.tmpdir) as prepared:
        directory, model, stream, composition = prepared
        print(
            f"stream: {composition.total:,} bytes from a synthetic guest of "
            f"{model.ram_size / MIB:,.0f} MiB RAM ({model.iterations} passes, "
            f"{model.dirty_share:.0%} of RAM re-dirtied per later pass, seed {model.seed}); "
            f"generated in {composition.seconds:.1f} s "
            f"({composition.total / composition.seconds / 1e6:,.0f} MB/s)"
        )
        for line in composition.render():
            print(line)
        print()

        quoted = shlex.quote(str(stream))
        python = shlex.quote(sys.executable)
        rows: list[tuple[str, Callable[[], object]]] = [
            ("cat FILE > /dev/null", shell(f"cat {quoted} > /dev/null")),
            ("cat FILE | cat > /dev/null", shell(f"cat {quoted} | cat > /dev/null")),
            ("python read, 1 MiB chunks", lambda: python_read(stream)),
            ("migpipe parse", lambda: parse_only(stream)),
            ("migpipe parse + write", lambda: parse_write(stream)),
            (
                "python -m migpipe inspect FILE > /dev/null",
                shell(f"{python} -m migpipe inspect {quoted} > /dev/null"),
            ),
        ]
        written = parse_write(stream)
        if written != composition.total:
            raise SystemExit(f"parse + write gave {written} bytes, expected {composition.total}")
        results = []
        for name, operation in rows:
            median, _ = timed(stream, operation, args.runs)
            results.append((name, median))
        reference = dict(results)["cat FILE | cat > /dev/null"]
        print(f"{'what':<44} {'median s':>9} {'MB/s':>9} {'vs cat|cat':>11}")
        for name, median in results:
            rate = composition.total / median / 1e6
            print(f"{name:<44} {median:>9.3f} {rate:>9,.0f} {reference / median:>11.2f}")
        print(
            "MB = 10^6 stream bytes; wall clock; the file is re-warmed in the page cache before "
            "each run.\n`cat | cat` goes through a default 64 KiB pipe, which is bimodal on "
            "this VM (see perf-anchors.md)."
        )
        print()

        quarter = directory / "quarter.stream"
        quarter_bytes = generate(guest_for(size // 4, args.seed), quarter).total
        baseline = child_rss(None)
        memory = [(f"{quarter_bytes:,} bytes", child_rss(quarter))]
        memory.append((f"{composition.total:,} bytes", child_rss(stream)))
        print("peak RSS of a parse + write child process (1 MiB chunks, output discarded)")
        print(f"  {'interpreter + migpipe imports only':<36} {baseline / 1024:>8.1f} MiB")
        for name, kib in memory:
            print(f"  {'stream of ' + name:<36} {kib / 1024:>8.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
