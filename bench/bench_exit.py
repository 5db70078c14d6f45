#!/usr/bin/env python3
"""What a command costs after its last output byte: the time until it has exited, and the CPU
it uses meanwhile.

At the end of a live migration the guest is paused until the destination QEMU has loaded the
last pages. encode, the link and decode end in that window, on hosts whose cores the QEMUs
share, so whatever a stage burns on its way out is taken from the destination QEMU (issue 21:
traced, the test link's Python finalization ran a core for 11 ms of a 21 ms tail). migpipe
leaves with os._exit once its output is flushed (migpipe.cli.run); each row "Python's own exit"
runs the same main() as migpipe did before (gc.freeze(), then sys.exit and Python's
finalization), so the difference is measured in the same run. The peers are cat and the zstd
and lz4 tools over the same input.

Each command reads a synthetic precopy stream (bench/bench_stream.py's generator) from a pipe
that a thread fills, as QEMU's writes do, and writes to a pipe this bench reads. At each read the
bench notes the time and the command's CPU so far (the run time of its threads, in ns, from
/proc/PID/task/*/schedstat); "exit" is from the last output byte to the command's exit (its
wait() returning), "CPU" is its whole CPU (getrusage of the child) less what it had used at the
last byte. A thread that ended before the last byte is missing from the sum, so a multithreaded
command's figure is an upper bound. Medians over --runs, rows taking turns.

    python bench/bench_exit.py            # 16 MiB stream, 7 runs: ~30 s
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH)):
    if entry not in sys.path:  # run as a script from a checkout, migpipe not installed
        sys.path.insert(0, entry)

from bench_stream import child_env, generate, guest_for, machine_facts  # noqa: E402

MIB = 1 << 20
WRITE = 32 * 1024  # QEMU writes its stream in batches of about this much
MIGPIPE = [sys.executable, "-m", "migpipe"]
BEFORE = "import gc, sys; from migpipe.cli import main; s = main(); gc.freeze(); sys.exit(s)"
PYTHONS_EXIT = [sys.executable, "-c", BEFORE]  # migpipe's way out before os._exit
XBZRLE = ["--xbzrle", "--compress", "zstd:1"]


def rows(wire: Path) -> list[tuple[str, list[str], str]]:
    """(label, argv, input): the stream, or `wire` for decode."""
    table = [("cat (peer)", ["cat"], "stream")]
    for tool, level in (("zstd", "-1"), ("lz4", "-1")):
        if shutil.which(tool):
            table.append((f"{tool} {level} (peer)", [tool, level, "-c"], "stream"))
    table += [
        ("migpipe encode", [*MIGPIPE, "encode"], "stream"),
        ("  Python's own exit", [*PYTHONS_EXIT, "encode"], "stream"),
        ("migpipe encode --xbzrle --compress zstd:1", [*MIGPIPE, "encode", *XBZRLE], "stream"),
        ("  Python's own exit ", [*PYTHONS_EXIT, "encode", *XBZRLE], "stream"),
        ("migpipe decode (of that wire)", [*MIGPIPE, "decode"], "wire"),
        ("  Python's own exit  ", [*PYTHONS_EXIT, "decode"], "wire"),
    ]
    return table


def cpu_ns(pid: int) -> int | None:
    """The run time so far of the process's live threads; None once it has gone."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):  # ending: the last reading stands
        return None
    return total


def one_run(argv: list[str], data: bytes) -> tuple[float, float]:
    """(ms from the last output byte to exit, ms of CPU meanwhile)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env())
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        view = memoryview(data)
        for at in range(0, len(view), WRITE):
            proc.stdin.write(view[at : at + WRITE])
        proc.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    last, used = 0.0, 0
    while os.read(proc.stdout.fileno(), MIB):
        last = time.monotonic()
        used = cpu_ns(proc.pid) or used
    status = proc.wait()
    exited = time.monotonic()
    feeder.join()
    if status != 0:
        raise SystemExit(f"{argv}: exit status {status}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return (exited - last) * 1000, total * 1000 - used / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16, help="stream size (16)")
    parser.add_argument("--runs", type=int, default=7, help="runs per row (7)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-exit-") as tmp:
        stream_path, wire_path = Path(tmp) / "stream", Path(tmp) / "wire"
        generate(guest_for(args.mib * MIB, seed=1), stream_path)
        with open(stream_path, "rb") as stream_in, open(wire_path, "wb") as wire_out:
            argv = [*MIGPIPE, "encode", *XBZRLE]
            subprocess.run(argv, stdin=stream_in, stdout=wire_out, check=True, env=child_env())
        inputs = {"stream": stream_path.read_bytes(), "wire": wire_path.read_bytes()}
        table = rows(wire_path)
        results: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in table}
        for _ in range(args.runs):
            for label, argv, source in table:
                results[label].append(one_run(argv, inputs[source]))
        for fact in machine_facts(Path(tmp)):
            print(fact)
    print(f"stream {args.mib} MiB, {args.runs} runs, medians (min-max)")
    print(f"{'command':<44} {'exit ms':>18} {'CPU ms':>18}")
    for label, _, _ in table:
        exits = [r[0] for r in results[label]]
        cpus = [r[1] for r in results[label]]
        shown = [f"{statistics.median(v):6.1f} ({min(v):.1f}-{max(v):.1f})" for v in (exits, cpus)]
        print(f"{label:<44} {shown[0]:>18} {shown[1]:>18}")


if __name__ == "__main__":
    main()
