#!/usr/bin/env python3
"""How many bytes migpipe holds in flight, and how late they arrive, on a rate-limited link.

QEMU stops the guest when what is left to send fits its downtime limit at the rate it has seen
the channel take bytes; whatever a tunnel parks between QEMU's write and the link must cross
during that pause (issue 21). This bench measures it: a synthetic multi-pass precopy stream from
migpipe's own generator (as bench/bench_stream.py makes it) is pushed as fast as the pipeline
accepts it, with blocking 32 KiB writes as QEMU issues them, through

  migpipe encode [F] | pv -q -L RATE | migpipe decode    F: none, --xbzrle --compress zstd:1
  cat | pv -q -L RATE | cat                              the peer: the link and kernel pipes only

at 1 Gbit/s, 30 MB/s and 10 MB/s (RATE in bytes per second: pv's k/m/g are powers of 1024). A
producer thread records (time, offset) after each write into the pipeline's stdin and a consumer
thread (time, offset) after each 32 KiB read from its stdout; from those, per run:

  in flight   stream bytes written but not yet received: the median over a 1 ms grid and the max
              while the producer writes, and what is in flight at its last write ("at stop")
  latency     from the write that completed offset X to the read that delivered it, for every
              write's end offset: median, p99, max
  tail        from the last write to the last byte received: what the guest lives through after
              QEMU stops it
  MB/s        stream bytes over the time from the first write to the last byte

pv forwards in bursts, sleeping between them, so the peer's latency p99 and max and its tail
are pv's (up to ~0.2 s): the peer row is what the link alone costs, the floor for the others.
`--link paced` puts the tests' link there instead (tests/link.py, paced every ~1 ms, as a real
link of that rate is): what is left above the peer's figures is migpipe's.

Each stream is sized to --seconds at its link's rate. Before each run the bench waits until both
ends have finished starting (asleep, their CPU time no longer growing) and only then starts pv,
so no start-up counts as latency; rows take turns over --runs, each figure is the median over
runs. Every output is checked against the stream (length and CRC-32). Standard library and
migpipe only.

    python bench/bench_latency.py            # 3 s per row at 10 MB/s, 3 runs: 2-4 minutes
    python bench/bench_latency.py --quick    # 1 s per row, one run: a smoke test, < 40 s
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH)):
    if entry not in sys.path:  # run as a script from a checkout, migpipe not installed
        sys.path.insert(0, entry)

from bench_stream import child_env, generate, guest_for, machine_facts  # noqa: E402
from bench_tunnel import BG_WARN, busy_seconds, wait_for_idle  # noqa: E402

MIB = 1 << 20
WRITE = 32 * 1024  # QEMU writes its stream in iovec batches of about this much
READ = 32 * 1024  # and the destination QEMU reads into a buffer of this size
LINKS = (("1 Gbit/s", 125_000_000), ("30 MB/s", 30_000_000), ("10 MB/s", 10_000_000))
FILTERS = (
    ("cat (peer)", None),
    ("pass-through", []),
    ("xbzrle,zstd:1", ["--xbzrle", "--compress", "zstd:1"]),
)
GRID_NS = 1_000_000  # in-flight sampling step
SETTLE = 0.1  # a stage is up once it has slept, using no CPU, this long
START_LIMIT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids: list[int]) -> int:
    """User + system clock ticks the processes have used so far (all their threads)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def all_asleep(pids: list[int]) -> bool:
    """Whether every thread of the processes is blocked (state S): none running or waiting to."""
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "S":
                    return False
    return True


def wait_started(pids: list[int]) -> None:
    """Wait until the stages sit blocked, waiting for input, and have stopped using CPU.

    A Python stage spends its first ~0.2 s importing: counted as latency, that would be the
    first bytes' delay and every run's max. Both tests are needed on a busy box, where a stage
    still importing can go without CPU for a while (state R), yet use none.
    """
    deadline = time.monotonic() + START_LIMIT
    ticks, since = cpu_ticks(pids), time.monotonic()
    while time.monotonic() - since < SETTLE:
        if time.monotonic() > deadline:
            raise SystemExit(f"the stages did not settle within {START_LIMIT:g} s")
        time.sleep(0.01)
        now = cpu_ticks(pids)
        if now != ticks or not all_asleep(pids):
            ticks, since = now, time.monotonic()


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run measured (times in ms, sizes in stream bytes)."""

    rate: float  # 10^6 stream bytes per second, first write to last byte
    inflight_median: float
    inflight_max: int
    inflight_stop: int
    latency_median: float
    latency_p99: float
    latency_max: float
    tail: float
    background: float  # share of the run's wall time other processes kept a CPU busy


def consume(fd: int, times: array, offsets: array, crc: list[int]) -> None:
    """Read the pipeline's output to its end, recording (time, offset) after each read."""
    buffer = bytearray(READ)
    view = memoryview(buffer)
    offset, value = 0, 0
    while n := os.readv(fd, [buffer]):
        times.append(time.perf_counter_ns())
        offset += n
        offsets.append(offset)
        value = zlib.crc32(view[:n], value)
    crc.append(value)


def produce(fd: int, stream: bytes, times: array, offsets: array) -> int:
    """Write the stream with blocking writes of WRITE bytes; returns the first write's start."""
    view = memoryview(stream)
    offset, total = 0, len(stream)
    started = time.perf_counter_ns()
    while offset < total:
        offset += os.write(fd, view[offset : offset + WRITE])
        times.append(time.perf_counter_ns())
        offsets.append(offset)
    os.close(fd)
    return started


def position(times: array, offsets: array, at: int) -> int:
    """Stream bytes a side had moved by time `at`."""
    index = bisect_right(times, at)
    return offsets[index - 1] if index else 0


def run_once(stages: list[list[str]], stream: bytes, crc: int, idle_wait: float) -> Run:
    """Run `sender | link | receiver` once, the bench feeding its stdin and draining its stdout.

    The link starts last, once the ends are up and the box is idle: pv -L banks the rate it has
    not used since it started and spends it in a burst, so a pv started with the Python ends
    would let their start-up's worth of stream through at full speed.
    """
    pipes = [os.pipe() for _ in range(len(stages) + 1)]

    def spawn(index: int) -> subprocess.Popen:
        stdin, stdout = pipes[index][0], pipes[index + 1][1]
        return subprocess.Popen(stages[index], stdin=stdin, stdout=stdout, env=child_env())

    sender, receiver = spawn(0), spawn(2)
    wait_started([sender.pid, receiver.pid])
    wait_for_idle(idle_wait)
    procs = [sender, spawn(1), receiver]
    (_, source_write), *_, (sink, _) = pipes
    for fd in (fd for pipe in pipes for fd in pipe if fd not in (source_write, sink)):
        os.close(fd)
    pids = [proc.pid for proc in procs]
    ticks = cpu_ticks(pids)  # their start-up, not part of the run

    write_times, write_offsets, read_times, read_offsets = (array("q") for _ in range(4))
    received: list[int] = []
    consumer = threading.Thread(
        target=consume, args=(sink, read_times, read_offsets, received), daemon=True
    )
    busy_before, self_before = busy_seconds(), time.process_time()
    wall_before = time.perf_counter()
    consumer.start()
    started = produce(source_write, stream, write_times, write_offsets)
    consumer.join()
    os.close(sink)
    results = [os.wait4(pid, 0) for pid in pids]
    wall = time.perf_counter() - wall_before
    for proc, (_, status, _) in zip(procs, results, strict=True):
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"`{' '.join(proc.args)}` exited {proc.returncode}")
    if (read_offsets[-1] if read_offsets else 0, received[0]) != (len(stream), crc):
        raise SystemExit(f"{' | '.join(stages[0])}...: the output is not the stream")
    stage_cpu = sum(u.ru_utime + u.ru_stime for _, _, u in results) - ticks / CLK_TCK
    own_cpu = time.process_time() - self_before
    background = max(0.0, busy_seconds() - busy_before - stage_cpu - own_cpu) / wall

    latencies = sorted(
        read_times[bisect_left(read_offsets, offset)] - at
        for at, offset in zip(write_times, write_offsets, strict=True)
    )
    last_write = write_times[-1]
    grid = range(started, last_write + 1, GRID_NS)
    inflight = [
        position(write_times, write_offsets, at) - position(read_times, read_offsets, at)
        for at in grid
    ]
    peak = max(
        offset - position(read_times, read_offsets, at)
        for at, offset in zip(write_times, write_offsets, strict=True)
    )
    return Run(
        rate=len(stream) / ((read_times[-1] - started) / 1e9) / 1e6,
        inflight_median=statistics.median(inflight),
        inflight_max=peak,
        inflight_stop=len(stream) - position(read_times, read_offsets, last_write),
        latency_median=statistics.median(latencies) / 1e6,
        latency_p99=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] / 1e6,
        latency_max=latencies[-1] / 1e6,
        tail=(read_times[-1] - last_write) / 1e6,
        background=background,
    )


# -- the rows -----------------------------------------------------------------------------------


@dataclass
class Row:
    link: str
    what: str
    stages: list[list[str]]
    stream: int  # index into the streams, one per link
    runs: list[Run] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(run, name) for run in self.runs)


def link_stage(kind: str, rate: float) -> list[str]:
    """The link's command: pv, or the tests' link (tests/link.py), paced every ~1 ms."""
    if kind == "pv":
        return ["pv", "-q", "-L", str(rate)]
    return [sys.executable, str(REPO / "tests" / "link.py"), "--rate", str(rate)]


def build_rows(kind: str) -> list[Row]:
    migpipe = [sys.executable, "-m", "migpipe"]
    rows = []
    for index, (link, rate) in enumerate(LINKS):
        pv = link_stage(kind, rate)
        for what, options in FILTERS:
            if options is None:
                stages = [["cat"], pv, ["cat"]]
            else:
                stages = [[*migpipe, "encode", *options], pv, [*migpipe, "decode"]]
            rows.append(Row(link, what, stages, index))
    return rows


def render(rows: list[Row]) -> list[str]:
    header = (
        f"{'link':<9} {'pipeline':<14} {'MB/s':>6}  {'in flight MiB':^20}  "
        f"{'latency ms':^20}  {'tail ms':^19} {'bg':>5}"
    )
    sub = (
        f"{'':<9} {'':<14} {'':>6}  {'median':>6} {'max':>6} {'stop':>6}  "
        f"{'median':>6} {'p99':>6} {'max':>6}  {'median':>6} {'runs':>12} {'':>5}"
    )
    lines = [header, sub, "-" * len(header)]
    for row in rows:
        tails = sorted(run.tail for run in row.runs)
        spread = f"{tails[0]:.0f}-{tails[-1]:.0f}" if len(tails) > 1 else ""
        background = max(run.background for run in row.runs)
        lines.append(
            f"{row.link:<9} {row.what:<14} {row.median('rate'):>6.1f}  "
            f"{row.median('inflight_median') / MIB:>6.2f} {row.median('inflight_max') / MIB:>6.2f} "
            f"{row.median('inflight_stop') / MIB:>6.2f}  "
            f"{row.median('latency_median'):>6.1f} {row.median('latency_p99'):>6.1f} "
            f"{row.median('latency_max'):>6.1f}  {row.median('tail'):>6.0f} {spread:>12} "
            f"{background:>4.0%}{' !' if background > BG_WARN else ''}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=None, help="stream length, in seconds at each link's rate"
    )
    parser.add_argument("--quick", action="store_true", help="1 s per row, one run: a smoke test")
    parser.add_argument("--runs", type=int, default=None, help="runs per row; medians (3, quick 1)")
    parser.add_argument("--seed", type=int, default=1, help="synthetic guest seed")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where streams are generated")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each run, wait up to this long for the box to be idle (5, --quick 0)",
    )
    parser.add_argument(
        "--link",
        choices=("pv", "paced"),
        default="pv",
        help="pv -L (100 ms slots), or tests/link.py's ~1 ms pacing, which no slot delays",
    )
    args = parser.parse_args(argv)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    runs = args.runs or (1 if args.quick else 3)
    idle_wait = args.idle_wait if args.idle_wait is not None else (0.0 if args.quick else 5.0)
    if seconds <= 0 or runs < 1:
        parser.error("--seconds and --runs must be positive")
    if args.link == "pv" and shutil.which("pv") is None:
        raise SystemExit("pv is not installed (setup.sh installs it)")

    begun = time.perf_counter()
    print(f"migpipe latency benchmark: {seconds:g} s of stream per link, median of {runs} runs")
    streams: list[tuple[bytes, int]] = []
    with tempfile.TemporaryDirectory(prefix="migpipe-bench-", dir=args.tmpdir) as tmp:
        directory = Path(tmp)
        for line in machine_facts(directory):
            print(line)
        for link, rate in LINKS:
            path = directory / "guest.stream"
            model = guest_for(int(rate * seconds), args.seed)
            generate(model, path)
            stream = path.read_bytes()
            streams.append((stream, zlib.crc32(stream)))
            print(
                f"stream for {link}: {len(stream):,} bytes, a guest of "
                f"{model.ram_size / MIB:,.0f} MiB RAM in {model.iterations} passes"
            )
    print()

    rows = build_rows(args.link)
    for _ in range(runs):  # rows take turns, so bursts of load elsewhere spread out
        for row in rows:
            stream, crc = streams[row.stream]
            row.runs.append(run_once(row.stages, stream, crc, idle_wait))
    for line in render(rows):
        print(line)
    print(
        "MB = 10^6 stream bytes. Sizes are in QEMU stream bytes at both ends, written in "
        f"{WRITE // 1024} KiB blocking writes, read {READ // 1024} KiB at a time;\n"
        "in flight: written - received (median over a 1 ms grid while writing, max, and at the "
        "last write); latency: the write of offset X to its read;\ntail: last write to last "
        f"byte; bg: the most CPU other processes used in a run, as a share of its wall time (! "
        f"above {BG_WARN:.0%}).\npass-through = `migpipe encode | LINK | migpipe decode`, "
        "xbzrle,zstd:1 the same with `encode --xbzrle --compress zstd:1`, cat (peer) = `cat | "
        f"LINK | cat`; LINK = {shlex.join(link_stage(args.link, 0)[:-1])} RATE.\n"
        f"It took {time.perf_counter() - begun:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
