#!/usr/bin/env python3
"""How fast the wire's bytes cross a loopback connection through TLS, next to plain TCP.

One writer thread sends frames as the pipeline does (a 17-byte frame header, then 1 MiB of
payload, as one write call) through a Channel; one reader thread reads them back until the end.
The connection is made by migpipe.io.transport (so its socket tuning applies), the TLS by
migpipe.io.tls with credentials from `migpipe tls-init` in a temporary directory:

  plain TCP       FdChannel   -> FdChannel     what --connect/--listen carry today
  TLS 1.3         TlsChannel  -> TlsChannel    AES-256-GCM, the default
  TLS 1.2         TlsChannel  -> TlsChannel    both ends --tls12, the peer capped at 1.2

Every row first moves --check bytes untimed and compares the CRC-32 of what arrived with what
was sent; then --runs timed runs of --size bytes, the rows taking turns, each after waiting (up
to --idle-wait s) for the box to be idle. It prints MB/s (10^6 bytes per wall second, median),
the CPU seconds of the writer and reader threads, the average read, the cipher, and the CPU
other processes used meanwhile. The issue's target: >= 1 GB/s through TLS.

    python bench/bench_tls.py             # 2 GiB per run, 3 runs
    python bench/bench_tls.py --quick     # 256 MiB, 1 run: a smoke test
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH)):
    if entry not in sys.path:  # run as a script from a checkout, migpipe not installed
        sys.path.insert(0, entry)

from bench_tunnel import IDLE, busy_seconds, wait_for_idle  # noqa: E402

from migpipe.cli.options import size_argument  # noqa: E402
from migpipe.io import tls, transport  # noqa: E402
from migpipe.io.channel import CHUNK, Channel, FdChannel  # noqa: E402
from migpipe.io.tlsinit import tls_init  # noqa: E402

MIB = 1 << 20
FRAME_HEAD = b"\x44" * 17

Wrap = Callable[[socket.socket], Channel]


@dataclass
class Run:
    seconds: float
    writer_cpu: float
    reader_cpu: float
    reads: int
    background: float
    crc: int = 0


@dataclass
class Row:
    name: str
    server: Wrap  # the reading end, on the accepted socket
    client: Wrap  # the writing end, on the connecting socket
    cipher: str = "-"
    runs: list[Run] = field(default_factory=list)

    def median(self) -> Run:
        return sorted(self.runs, key=lambda r: r.seconds)[len(self.runs) // 2]


def plain(sock: socket.socket) -> Channel:
    return FdChannel(sock.fileno())


def rows(creds: Path) -> list[Row]:
    def tls_row(name: str, tls12: bool) -> Row:
        server_context = tls.server_context(creds, tls12=tls12)
        client_context = tls.client_context(creds, tls12=tls12)
        if tls12:
            client_context.context.maximum_version = ssl.TLSVersion.TLSv1_2
        return Row(
            name,
            lambda sock: tls.wrap_server(sock, server_context),
            lambda sock: tls.wrap_client(sock, client_context, "localhost"),
        )

    return [
        Row("plain TCP", plain, plain),
        tls_row("TLS 1.3", tls12=False),
        tls_row("TLS 1.2 (--tls12)", tls12=True),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def move(row: Row, size: int, *, check: bool) -> Run:
    """`size` bytes from a writer thread to a reader thread over one new connection."""
    payload = memoryview(bytes(range(256)) * (CHUNK // 256))
    address = f"127.0.0.1:{free_port()}"
    result: dict[str, object] = {}

    def reader() -> None:
        try:
            with transport.listen(address) as sock:
                channel = row.server(sock)
                started, reads, crc = time.thread_time(), 0, 0
                while chunk := channel.read():
                    reads += 1
                    if check:
                        crc = zlib.crc32(chunk, crc)
                result.update(cpu=time.thread_time() - started, reads=reads, crc=crc)
                result["end"] = time.perf_counter()
                if isinstance(channel, tls.TlsChannel):
                    channel.close()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=reader)
    thread.start()
    busy, own = busy_seconds(), sum(os.times()[:2])
    with transport.connect(address, 30.0) as sock:
        channel = row.client(sock)
        if isinstance(channel, tls.TlsChannel):
            row.cipher = channel.socket.cipher()[0]
        started, cpu, crc = time.perf_counter(), time.thread_time(), 0
        for _ in range(size // CHUNK):
            channel.write([FRAME_HEAD, payload])
            if check:
                crc = zlib.crc32(payload, zlib.crc32(FRAME_HEAD, crc))
        cpu = time.thread_time() - cpu
        if isinstance(channel, tls.TlsChannel):
            channel.finish()
            channel.close()
        else:
            sock.shutdown(socket.SHUT_WR)
        thread.join()
    if "error" in result:
        raise SystemExit(f"{row.name}: the reader failed: {result['error']!r}")
    if check and result["crc"] != crc:
        raise SystemExit(f"{row.name}: the bytes read are not the bytes written")
    background = busy_seconds() - busy - (sum(os.times()[:2]) - own)
    return Run(result["end"] - started, cpu, result["cpu"], result["reads"], max(background, 0))


def render(table: list[Row], size: int) -> list[str]:
    wire = size // CHUNK * (CHUNK + len(FRAME_HEAD))
    base = table[0].median().seconds
    lines = [
        f"{'path':<20} {'MB/s':>7} {'vs TCP':>7} {'writer CPU s':>13} {'reader CPU s':>13} "
        f"{'avg read':>9}  {'cipher':<30} {'bg s':>5}",
    ]
    for row in table:
        run = row.median()
        lines.append(
            f"{row.name:<20} {wire / run.seconds / 1e6:>7,.0f} {base / run.seconds:>7.2f} "
            f"{run.writer_cpu:>13.2f} {run.reader_cpu:>13.2f} "
            f"{wire / run.reads / 1024:>6.0f} KiB  {row.cipher:<30} {run.background:>5.1f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=size_argument, default=2 << 30, help="bytes per run (2G)")
    parser.add_argument("--check", type=size_argument, default=64 * MIB, help="checked bytes (64M)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per row (3)")
    parser.add_argument("--quick", action="store_true", help="256 MiB and one run")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"wait up to this long for the box to be <= {IDLE:.0%}% busy (10, --quick 0)",
    )
    args = parser.parse_args(argv)
    size = 256 * MIB if args.quick else args.size
    runs = args.runs or (1 if args.quick else 3)
    idle_wait = args.idle_wait if args.idle_wait is not None else (0.0 if args.quick else 10.0)
    if size < CHUNK or runs < 1:
        parser.error("--size must be at least 1M and --runs positive")

    with tempfile.TemporaryDirectory(prefix="bench-tls-") as scratch:
        creds = Path(scratch) / "creds"
        tls_init(creds, "bench CA", ["localhost"], "bench client")
        table = rows(creds)
        for row in table:
            move(row, args.check, check=True)
        waited = 0.0
        for _ in range(runs):  # rows take turns, so bursts of load elsewhere spread out
            for row in table:
                waited += wait_for_idle(idle_wait)
                row.runs.append(move(row, size, check=False))
    print(
        f"{size:,} bytes per run as {size // CHUNK:,} frames of 1 MiB + 17 bytes, over TCP "
        f"loopback; median of {runs} run(s); {ssl.OPENSSL_VERSION}"
    )
    for line in render(table, size):
        print(line)
    print(
        f"MB = 10^6 wire bytes per wall second, from the first write to the reader's end. "
        f"CPU s = thread time of the writer and reader; bg s = CPU other processes used "
        f"meanwhile.\nEvery row first moved {args.check:,} bytes with CRC-32 checked. Waited "
        f"{waited:.0f} s in all for the box to be <= {IDLE:.0%} busy."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
