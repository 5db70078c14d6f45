#!/usr/bin/env python3
"""How fast `migpipe encode` and `migpipe encode | migpipe decode` move a QEMU stream, next to C.

Generates a synthetic multi-pass precopy stream with migpipe's own generator (as
bench/bench_stream.py does) into a temporary directory on disk, warms it in the page cache, then
times, on that same file and as pipe stages:

  cat FILE | migpipe encode [C] > /dev/null
  cat FILE | migpipe encode [C] | migpipe decode > /dev/null
      C: none, lz4, zstd:1, zstd:3, xbzrle, xbzrle,zstd:1, encrypt, zstd:1,encrypt
  dd if=FILE bs=1M | dd bs=1M of=/dev/null       (with the default 64 KiB pipe, and with 1 MiB)
  cat FILE | X > /dev/null    X: zstd -1 -T0 -c, zstd -3 -T0 -c, lz4 -1 -c, lzop -1 -c, gzip -1 -c

Each row is run once untimed (it warms up, measures the output size for the ratio, and checks
that decode gives back the file byte for byte), then --runs times, the rows taking turns so that
a burst of load elsewhere does not land on one row only; before each timed run it waits, up to
--idle-wait seconds, for the box to be idle, as the harness of perf-anchors.md did. It prints one
table: MB/s (10^6 uncompressed stream bytes per wall second, median), ratio (stream bytes /
output bytes), the peak RSS of the encode and decode processes (by /usr/bin/time, whose own small
footprint is the floor: a child's peak RSS starts at its parent's), the CPU seconds of the whole
pipeline and the CPU that other processes on the box used meanwhile; then the ratios the project
targets. Standard library and migpipe only.

    python bench/bench_tunnel.py            # about 1 GiB of stream
    python bench/bench_tunnel.py --quick    # 32 MiB and one timed run: a smoke test, < 40 s
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH)):
    if entry not in sys.path:  # run as a script from a checkout, migpipe not installed
        sys.path.insert(0, entry)

from bench_stream import child_env, synthetic_stream, warm  # noqa: E402

from migpipe.cli.options import size_argument  # noqa: E402
from migpipe.keys import keygen  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
QUICK_SIZE = 32 * MIB
TIME = "/usr/bin/time"  # GNU time, for the peak RSS of one stage (its %M)
PIPE_1M = 1 << 20
BG_WARN = 0.15  # flag rows where other processes used more than this share of the wall time
IDLE = 0.10  # before a timed run, wait (up to --idle-wait s) until the box is at most this busy
IDLE_WINDOW = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")

Argv = list[str]


# -- running a pipeline -------------------------------------------------------------------------


@dataclass
class Run:
    """One run of a pipeline: wall seconds, per-stage peak RSS (KiB) and CPU, output."""

    seconds: float
    rss_kib: dict[int, int]  # stage index -> peak RSS, for the stages asked for
    cpu_seconds: float
    background: float  # CPU seconds other processes used during the run
    output_bytes: int = 0
    output_crc: int = 0


def busy_seconds() -> float:
    """CPU seconds the whole box has spent busy since boot (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_for_idle(limit: float) -> float:
    """Wait until the whole box is at most IDLE busy over IDLE_WINDOW, or `limit` s have passed.

    Other jobs share this machine (see perf-anchors.md); returns the seconds waited.
    """
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before, window_start = busy_seconds(), time.monotonic()
        time.sleep(IDLE_WINDOW)
        share = (busy_seconds() - before) / (time.monotonic() - window_start) / os.cpu_count()
        if share <= IDLE:
            break
    return time.monotonic() - started


def run_pipeline(
    stages: list[Argv],
    pipe_size: int | None = None,
    capture: bool = False,
    rss_of: tuple[int, ...] = (),
    scratch: Path | None = None,
) -> Run:
    """Run `stages` joined by pipes, the last one's output to /dev/null (or read, to count it).

    Pipes are the kernel's default 64 KiB unless `pipe_size` (migpipe enlarges its own pipes to
    1 MiB whatever this says, as it does in real use). The stages in `rss_of` run under GNU
    time, which writes their peak RSS into `scratch`: wait4's ru_maxrss would not do, since a
    child starts with its parent's peak (this process's, tens of MiB). Every stage must exit 0.
    """
    env = child_env()
    procs: list[subprocess.Popen] = []
    rss_files: dict[int, Path] = {}
    if scratch is not None and os.access(TIME, os.X_OK):
        for index in rss_of:
            rss_files[index] = scratch / f"rss.{index}"
            stages = [*stages]
            stages[index] = [TIME, "-f", "%M", "-o", str(rss_files[index]), *stages[index]]
    busy_before = busy_seconds()
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        upstream = None
        for index, argv in enumerate(stages):
            last = index == len(stages) - 1
            read_end = write_end = None
            if not last:
                read_end, write_end = os.pipe()
                if pipe_size:
                    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, pipe_size)
            stdout = write_end if not last else (subprocess.PIPE if capture else devnull)
            procs.append(subprocess.Popen(argv, stdin=upstream, stdout=stdout, env=env))
            if upstream is not None:
                os.close(upstream)
            if write_end is not None:
                os.close(write_end)
            upstream = read_end
        output_bytes = output_crc = 0
        if capture:
            out = procs[-1].stdout
            buffer = bytearray(4 * MIB)
            view = memoryview(buffer)
            while n := out.readinto(buffer):
                output_bytes += n
                output_crc = zlib.crc32(view[:n], output_crc)
            out.close()
        results = [os.wait4(proc.pid, 0) for proc in procs]
    seconds = time.perf_counter() - started
    for proc, (_, status, _) in zip(procs, results, strict=True):
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            command = " | ".join(shlex.join(argv) for argv in stages)
            raise SystemExit(f"`{shlex.join(proc.args)}` exited {proc.returncode} in: {command}")
    cpu = sum(usage.ru_utime + usage.ru_stime for _, _, usage in results)
    background = max(0.0, busy_seconds() - busy_before - cpu)
    rss = {index: int(path.read_text().split()[-1]) for index, path in rss_files.items()}
    return Run(seconds, rss, cpu, background, output_bytes, output_crc)


# -- the rows -----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    stages: list[Argv]
    pipe_size: int | None = None
    rss_stages: dict[str, int] = field(default_factory=dict)  # label -> stage index to report
    roundtrip: bool = False  # the output must be the input file, byte for byte
    runs: list[Run] = field(default_factory=list)
    output_bytes: int = 0

    def median(self) -> Run:
        """The run with the median wall time (the upper one of an even count)."""
        ordered = sorted(self.runs, key=lambda run: run.seconds)
        return ordered[len(ordered) // 2]

    def peak_rss(self, label: str) -> int | None:
        values = [run.rss_kib.get(self.rss_stages[label]) for run in self.runs]
        return None if None in values else max(values)


def build_rows(stream: Path) -> list[Row]:
    path = str(stream)
    migpipe = [sys.executable, "-m", "migpipe"]
    rows: list[Row] = []
    key = stream.with_name("key")
    if not key.exists():
        keygen(key)
    keyed = ["--key-file", str(key)]
    codecs: list[tuple[str, Argv]] = [("pass-through", [])]
    codecs += [(codec, ["--compress", codec]) for codec in ("lz4", "zstd:1", "zstd:3")]
    codecs += [(chain, ["--filters", chain]) for chain in ("xbzrle", "xbzrle,zstd:1")]
    codecs += [(chain, ["--filters", chain, *keyed]) for chain in ("encrypt", "zstd:1,encrypt")]
    for label, options in codecs:
        encode = [*migpipe, "encode", *options]
        rows.append(
            Row(f"migpipe encode {label}", [["cat", path], encode], rss_stages={"encode": 1})
        )
    for label, options in codecs:
        encode = [*migpipe, "encode", *options]
        decode = [*migpipe, "decode", *(keyed if "encrypt" in label else [])]
        rows.append(
            Row(
                f"migpipe encode | decode {label}",
                [["cat", path], encode, decode],
                rss_stages={"encode": 1, "decode": 2},
                roundtrip=True,
            )
        )
    dd_in = ["dd", f"if={path}", "bs=1M", "status=none"]
    dd_out = ["dd", "of=/dev/null", "bs=1M", "status=none"]
    rows.append(Row("dd bs=1M | dd bs=1M (64 KiB pipe)", [dd_in, dd_out], rss_stages={"": 1}))
    rows.append(
        Row("dd bs=1M | dd bs=1M (1 MiB pipe)", [dd_in, dd_out], PIPE_1M, rss_stages={"": 1})
    )
    for command in ("zstd -1 -T0 -c", "zstd -3 -T0 -c", "lz4 -1 -c", "lzop -1 -c", "gzip -1 -c"):
        argv = command.split()
        if shutil.which(argv[0]) is None:
            print(f"note: {argv[0]} is not installed; its row is skipped")
            continue
        rows.append(Row(f"{command}", [["cat", path], argv], rss_stages={"": 1}))
    return rows


def startup_seconds(runs: int) -> float:
    """Median wall time of a child Python importing what `migpipe encode` imports."""
    imports = "migpipe.cli, migpipe.tunnel.pipeline, migpipe_filters.zstd, migpipe_filters.lz4"
    argv = [sys.executable, "-c", f"import {imports}"]
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, env=child_env())
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


# -- report -------------------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def render(rows: list[Row], total: int) -> list[str]:
    header = (
        f"{'what (input: cat FILE | ..., output > /dev/null)':<44} {'MB/s':>7} {'ratio':>6} "
        f"{'median s':>9} {'runs s':>17} {'CPU s':>6} {'bg s':>6}  peak RSS MiB"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        median = row.median()
        runs = "/".join(f"{run.seconds:.2f}" for run in row.runs)
        ratio = total / row.output_bytes if row.output_bytes else float("nan")
        warn = " !" if median.background > BG_WARN * median.seconds else "  "
        rss = ", ".join(
            f"{label + ' ' if label else ''}{mib(row.peak_rss(label))}" for label in row.rss_stages
        )
        ratio_text = "  -" if row.roundtrip or row.name.startswith("dd ") else f"{ratio:6.2f}"
        lines.append(
            f"{row.name:<44} {total / median.seconds / 1e6:>7,.0f} {ratio_text:>6} "
            f"{median.seconds:>9.3f} {runs:>17} {median.cpu_seconds:>6.2f} "
            f"{median.background:>6.2f}{warn}{rss}"
        )
    return lines


def targets(rows: list[Row], total: int) -> list[str]:
    by_name = {row.name: row for row in rows}

    def rate(name: str) -> float | None:
        row = by_name.get(name)
        return None if row is None else total / row.median().seconds / 1e6

    def ratio(name: str) -> float | None:
        row = by_name.get(name)
        return None if row is None or not row.output_bytes else total / row.output_bytes

    lines = []
    comparisons = [
        (
            "pass-through vs dd|dd (64 KiB pipe)",
            "migpipe encode pass-through",
            "dd bs=1M | dd bs=1M (64 KiB pipe)",
            0.5,
            False,
        ),
        (
            "pass-through vs dd|dd (1 MiB pipe)",
            "migpipe encode pass-through",
            "dd bs=1M | dd bs=1M (1 MiB pipe)",
            0.5,
            False,
        ),
        ("zstd:1 vs zstd -1 -T0", "migpipe encode zstd:1", "zstd -1 -T0 -c", 1.5, True),
        ("lz4 vs lz4 -1", "migpipe encode lz4", "lz4 -1 -c", 2.0, True),
        # encryption may cost at most 10% of encode's wall time: speed >= 1/1.1 of without
        (
            "encrypt vs pass-through",
            "migpipe encode encrypt",
            "migpipe encode pass-through",
            0.91,
            False,
        ),
        (
            "zstd:1,encrypt vs zstd:1",
            "migpipe encode zstd:1,encrypt",
            "migpipe encode zstd:1",
            0.91,
            False,
        ),
    ]
    for label, ours, theirs, goal, same_ratio in comparisons:
        mine, peer = rate(ours), rate(theirs)
        if mine is None or peer is None:
            lines.append(f"  {label:<38} (not measured)")
            continue
        speed = mine / peer
        verdict = "met" if speed >= goal else "NOT met"
        text = f"  {label:<38} {speed:5.2f}x  (target >= {goal}x: {verdict})"
        if same_ratio:
            mine_ratio, peer_ratio = ratio(ours), ratio(theirs)
            as_good = mine_ratio >= peer_ratio * 0.995  # within half a percent counts as "same"
            text += (
                f"; ratio {mine_ratio:.3f} vs {peer_ratio:.3f} "
                f"({'same or better' if as_good else 'WORSE'})"
            )
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--size", type=size_argument, default=GIB, help="stream bytes, e.g. 256M or 2G (default 1G)"
    )
    parser.add_argument("--quick", action="store_true", help="a 64 MiB stream, for smoke tests")
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per row; median shown (3, --quick 1)"
    )
    parser.add_argument("--seed", type=int, default=1, help="synthetic guest seed")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the stream is written")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"before each timed run, wait up to this long for the box to be <= {IDLE:.0%}% busy "
        "(10, --quick 0)",
    )
    args = parser.parse_args(argv)
    if args.idle_wait is None:
        args.idle_wait = 0.0 if args.quick else 10.0
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1 or args.size <= 0:
        parser.error("--runs and --size must be positive")
    size = QUICK_SIZE if args.quick else args.size

    with synthetic_stream("tunnel", size, args.seed, args.runs, args.tmpdir) as prepared:
        directory, model, stream, composition = prepared
        total = composition.total
        with open(stream, "rb") as f:
            expected_crc = 0
            while chunk := f.read(4 * MIB):
                expected_crc = zlib.crc32(chunk, expected_crc)
        print(
            f"stream: {total:,} bytes from a synthetic guest of {model.ram_size / MIB:,.0f} MiB "
            f"RAM ({model.iterations} passes, {model.dirty_share:.0%} of RAM re-dirtied per later "
            f"pass, seed {model.seed}); generated in {composition.seconds:.1f} s"
        )
        print(
            f"child Python start + migpipe imports: {startup_seconds(3):.3f} s "
            "(in every migpipe row, once per process)"
        )
        print()

        rows = build_rows(stream)
        started = time.perf_counter()
        for row in rows:  # untimed: warm up, size the output, check the round trip
            warm(stream)
            check = run_pipeline(row.stages, row.pipe_size, capture=True)  # (its RSS is not kept)
            row.output_bytes = check.output_bytes
            if row.roundtrip and (check.output_bytes, check.output_crc) != (total, expected_crc):
                raise SystemExit(
                    f"{row.name}: decode gave {check.output_bytes:,} bytes with CRC-32 "
                    f"{check.output_crc:08x}; the stream is {total:,} bytes, {expected_crc:08x}"
                )
        waited = 0.0
        for _ in range(args.runs):  # rows take turns, so bursts of load elsewhere spread out
            for row in rows:
                waited += wait_for_idle(args.idle_wait)
                warm(stream)
                rss_of = tuple(row.rss_stages.values())
                row.runs.append(
                    run_pipeline(row.stages, row.pipe_size, rss_of=rss_of, scratch=directory)
                )
        for line in render(rows, total):
            print(line)
        print(
            f"MB = 10^6 uncompressed stream bytes; wall clock of the whole pipeline, child "
            f"start-up included; the file is re-warmed in the page cache before each run.\n"
            f"ratio = stream bytes / output bytes (wire bytes for encode). CPU s = user + system "
            f"of every stage of the median run; bg s = CPU other processes used meanwhile "
            f"(! above {BG_WARN:.0%} of the wall time).\nEvery encode | decode output was "
            f"checked equal to the stream, byte for byte. Before each timed run the benchmark "
            f"waited up to {args.idle_wait:g} s for the box to be <= {IDLE:.0%} busy "
            f"({waited:.0f} s in all);\nit took {time.perf_counter() - started:.0f} s after "
            "generation."
        )
        print()
        print("project targets (speed ratio of the median runs):")
        for line in targets(rows, total):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
