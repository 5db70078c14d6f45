#!/usr/bin/env python3
"""QEMU's multifd through migpipe against QEMU's own multifd, over loopback, in one run.

The test guest (tests/guest, 128 MiB, 64 MiB of it filled with qemuvm's mix of zero, text,
patterned and random pages: the "busy" kind, paused before the migration) migrates from one
QEMU 10.0 to another with N multifd channels (--channels, 2 and 4 by default):

  QEMU's own                    the destination's UNIX socket, straight
  migpipe                       encode --qemu | UNIX socket | decode --qemu: every channel a lane
  migpipe --connections N+1     the same, each lane on a wire connection of its own
  migpipe --compress zstd:1     the same through zstd
  migpipe --xbzrle              the same, each channel's pages against its lane's cache

For each it prints the median over --runs of: the time from `migrate` to the source QEMU's
completion, QEMU's bytes (query-migrate's transferred) per second of it, and the CPU that both
QEMUs and (through migpipe) encode and decode used, per GB of QEMU's bytes (their utime + stime
from /proc, from before `migrate` to the destination's completion). The box has 2 cores, so
CPU per GB is the figure that transfers to a larger machine; the time shows where one core's
worth of work per side is the limit.

    .venv/bin/python bench/bench_multifd_migration.py [--runs N] [--channels 2 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import qemuvm  # noqa: E402
from test_qemu_twoway import Tunnel, capabilities  # noqa: E402

# name: encode's filters (None: no migpipe), and whether the wire has a connection per channel
PATHS: dict[str, tuple[list[str] | None, bool]] = {
    "QEMU's own": (None, False),
    "migpipe": ([], False),
    "migpipe --connections N+1": ([], True),
    "migpipe --compress zstd:1": (["--compress", "zstd:1"], False),
    "migpipe --xbzrle": (["--xbzrle"], False),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes `pids` so far (their threads included)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def one_run(
    guest: Path, filters: list[str] | None, channels: int, spread: bool = False
) -> tuple[float, int, float]:
    """Seconds, QEMU's bytes and CPU seconds of one migration (`spread`: the wire over a
    connection per channel and one for the main stream)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tunnel = None
        if filters is None:
            src_uri = dst_uri = f"unix:{work / 'dst.sock'}"
        else:
            tunnel = Tunnel(work, filters, connections=channels + 1 if spread else 1)
            src_uri, dst_uri = f"unix:{tunnel.src}", f"unix:{tunnel.dst}"
        build = qemuvm.QEMU_10_0
        with (
            qemuvm.source_vm(guest, "busy", work, qemu=build) as src,
            qemuvm.Vm(work, "dest", ["-S", "-incoming", "defer"], qemu=build) as dest,
        ):
            for vm in (dest, src):
                capabilities(vm, "multifd")
                vm.qmp.execute("migrate-set-parameters", **{"multifd-channels": channels})
            dest.qmp.execute("migrate-incoming", uri=dst_uri)
            src.qmp.execute("stop")  # what it holds is what the destination must hold
            pids = [src.proc.pid, dest.proc.pid]
            if tunnel is not None:
                pids += [tunnel.encode.pid, tunnel.decode.pid]
            before = cpu_seconds(pids)
            started = time.monotonic()
            src.qmp.execute("migrate", uri=src_uri)
            src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed")
            seconds = time.monotonic() - started
            qemuvm.wait_incoming(dest)
            cpu = cpu_seconds(pids) - before
            transferred = src.qmp.execute("query-migrate")["ram"]["transferred"]
            if tunnel is not None and tunnel.statuses() != (0, 0):
                raise RuntimeError(str(tunnel.errors))
            assert dest.pmemsave(work / "d.mem") == src.pmemsave(work / "s.mem")
        return seconds, transferred, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--channels", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        guest = qemuvm.build_guest(Path(tmp))
        print(f"QEMU 10.0, paused 128 MiB guest (64 MiB filled), median of {args.runs} runs")
        print(f"{'channels':>8} {'path':28} {'seconds':>8} {'MB/s':>8} {'CPU s/GB':>9}")
        for channels in args.channels:
            for name, (filters, spread) in PATHS.items():
                runs = [one_run(guest, filters, channels, spread) for _ in range(args.runs)]
                seconds = statistics.median(r[0] for r in runs)
                rate = statistics.median(r[1] / r[0] / 1e6 for r in runs)
                per_gb = statistics.median(r[2] / (r[1] / 1e9) for r in runs)
                print(f"{channels:8} {name:28} {seconds:8.3f} {rate:8.0f} {per_gb:9.1f}")


if __name__ == "__main__":
    main()
