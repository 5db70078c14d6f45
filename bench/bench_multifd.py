#!/usr/bin/env python3
"""How fast migpipe parses and rewrites one QEMU multifd channel, next to `cat` of the same file.

Writes a synthetic channel with migpipe's multifd writer into a temporary directory: the initial
message, then RAM packets as QEMU 10.x sends them (128 slots, 96 normal pages and 32 zero pages
in three packets of four, all 128 normal in the fourth), a SYNC packet every 64. Then times, on
that same file warmed in the page cache:

  cat FILE > /dev/null                          (the peer: moving the bytes and nothing else)
  parse                                         (MultifdParser, 1 MiB reads)
  parse + rewrite, writev to /dev/null          (header and payload as MultifdWriter.parts)

and prints the median of --runs runs in MB/s (10^6 channel bytes per wall second) and as a share
of cat's. Standard library and migpipe only.

    python bench/bench_multifd.py            # a 1 GiB channel
    python bench/bench_multifd.py --quick    # 64 MiB, a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout, migpipe not installed
    sys.path.insert(0, str(REPO))

from migpipe.stream.multifd import (  # noqa: E402
    ChannelHello,
    MultifdParser,
    MultifdWriter,
    RamPacket,
)

MIB, GIB = 1 << 20, 1 << 30
PAGE, SLOTS = 4096, 128
READ = 1 * MIB
SYNC_EVERY = 64


def write_channel_file(path: Path, size: int) -> int:
    """A channel of about `size` bytes; returns its packet count."""
    writer = MultifdWriter()
    pool = os.urandom(SLOTS * PAGE + PAGE)  # pages vary by where they start in the pool
    packets = 0
    with open(path, "wb") as f:
        f.write(writer.encode(ChannelHello(bytes(16), 0)))
        while f.tell() < size:
            packets += 1
            if packets % SYNC_EVERY == 0:
                f.write(writer.encode(RamPacket(1, packets, "", (), (), b"", 0, 0)))
                continue
            normal = SLOTS if packets % 4 == 0 else 96
            base = (packets * SLOTS * PAGE) % (1 << 34)
            offsets = tuple(base + i * PAGE for i in range(SLOTS))
            start = (packets * 64) % PAGE
            pages = pool[start : start + normal * PAGE]
            record = RamPacket(
                0, packets, "pc.ram", offsets[:normal], offsets[normal:], pages, SLOTS, len(pages)
            )
            head, payload = writer.parts(record)
            f.write(head)
            f.write(payload)
    return packets


def parse(path: Path) -> int:
    parser = MultifdParser()
    count = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ):
            parser.feed(chunk)
            count += len(parser.next_records())
    return count + len(parser.finish())


def parse_and_rewrite(path: Path) -> int:
    parser, writer = MultifdParser(), MultifdWriter()
    out = os.open(os.devnull, os.O_WRONLY)
    written = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(READ):
                parser.feed(chunk)
                for record in parser.next_records():
                    written += os.writev(out, writer.parts(record))
        for record in parser.finish():
            written += os.writev(out, writer.parts(record))
    finally:
        os.close(out)
    return written


def cat(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def timed(path: Path, operation: Callable[[Path], object], runs: int) -> float:
    """Median wall seconds of `runs` runs, the file read once before (page cache)."""
    cat(path)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        operation(path)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=int, default=GIB, help="channel bytes (default 1 GiB)")
    parser.add_argument("--quick", action="store_true", help="a 64 MiB channel")
    parser.add_argument("--runs", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the channel is written")
    args = parser.parse_args()
    size = 64 * MIB if args.quick else args.size
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        path = Path(tmp) / "channel.bin"
        packets = write_channel_file(path, size)
        total = path.stat().st_size
        assert parse_and_rewrite(path) == total  # the rewrite is the same length (and bytes:
        # tests/test_multifd_format.py checks those)
        rows = [
            ("cat FILE > /dev/null", timed(path, cat, args.runs)),
            ("parse", timed(path, parse, args.runs)),
            ("parse + rewrite (writev to /dev/null)", timed(path, parse_and_rewrite, args.runs)),
        ]
    print(
        f"multifd channel: {total / MIB:.0f} MiB, {packets} packets; Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs; median of {args.runs} runs"
    )
    peer = rows[0][1]
    print(f"{'what':<40} {'median s':>9} {'MB/s':>9} {'vs cat':>7}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds:>9.3f} {total / seconds / 1e6:>9.0f} {peer / seconds:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
