"""Postcopy through migpipe against QEMU's own postcopy, over the same 30 MB/s link.

The busy guest of tests/guest (single-byte writes across 64 MiB) migrates in postcopy as libvirt
runs it: precopy until the second pass, then migrate-start-postcopy, the destination running the
guest at once and fetching the pages it touches over the return path, with postcopy-preempt (the
requested pages on a connection of their own) as libvirt 10.0+ sets it (--no-preempt: without).
The link is tests/link.py (one token bucket for every connection of the migration, ~1 ms
granularity), so migpipe's --connections 2 (the preempt lane on a wire connection of its own)
shares it as QEMU's own two connections do. For each QEMU build and path, it prints the total
time (migrate to the source's completion), the guest's real pause (the source's STOP event to
the destination's RESUME event, QMP timestamps, one host), the page requests the destination
made, how long its vCPUs waited for pages in all (QEMU's postcopy-blocktime) and that per
request: the request-to-page latency the guest feels; through migpipe also decode's own median
(--stats-json postcopy_requests: from the request read to its page off the wire, without the
destination QEMU's part). Medians of --runs.

    .venv/bin/python bench/bench_postcopy.py [--runs N] [--rate BYTES_PER_S] [--no-preempt]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import qemuvm
from link import Link
from support import MIGPIPE

PATHS = {
    "QEMU's own": None,
    "migpipe": [],
    "migpipe --connections 2": ["--connections", "2"],
    "migpipe --xbzrle --compress zstd:1": ["--xbzrle", "--compress", "zstd:1"],
    "migpipe --connections 2 --xbzrle --compress zstd:1": [
        "--connections",
        "2",
        "--xbzrle",
        "--compress",
        "zstd:1",
    ],
}


def caps(vm: qemuvm.Vm, *names: str) -> None:
    on = [{"capability": name, "state": True} for name in ("events", "postcopy-ram", *names)]
    vm.qmp.execute("migrate-set-capabilities", capabilities=on)


def until_listening(process: subprocess.Popen) -> None:
    while b"listening on" not in process.stderr.readline():
        if process.poll() is not None:
            raise RuntimeError("migpipe ended before it listened")


def one_run(
    guest: Path, build: qemuvm.QemuBuild, filters: list[str] | None, rate: float, preempt: bool
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dst, processes = f"unix:{work / 'dst.sock'}", []
        if filters is None:
            link = Link(f"unix:{work / 'link.sock'}", dst, rate=rate).start()
            uri = link.address
        else:
            wire = f"unix:{work / 'wire.sock'}"
            stats = ["--stats-json", str(work / "decode.json")]
            decode = subprocess.Popen(
                [*MIGPIPE, "-v", "decode", "--listen", wire, "--qemu", dst, *stats],
                stderr=subprocess.PIPE,
            )
            until_listening(decode)
            link = Link(f"unix:{work / 'link.sock'}", wire, rate=rate).start()
            uri = f"unix:{work / 'src.sock'}"
            encode = subprocess.Popen(
                [*MIGPIPE, "-v", "encode", "--connect", link.address, "--qemu", uri, *filters],
                stderr=subprocess.PIPE,
            )
            until_listening(encode)
            processes = [encode, decode]
        with (
            qemuvm.source_vm(guest, "busy", work, qemu=build) as src,
            qemuvm.Vm(work, "dest", ["-incoming", "defer"], qemu=build) as dest,
        ):
            both = ("postcopy-preempt",) if preempt else ()
            caps(dest, *both, "postcopy-blocktime")
            dest.qmp.execute("migrate-incoming", uri=dst)
            caps(src, *both)
            started = time.monotonic()
            src.qmp.execute("migrate", uri=uri)
            src.qmp.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 2, timeout=60)
            src.qmp.execute("migrate-start-postcopy")
            src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed")
            total = time.monotonic() - started
            stop = src.qmp.wait_event("STOP", timeout=5)
            resume = dest.qmp.wait_event("RESUME", timeout=60)
            requests = src.qmp.execute("query-migrate")["ram"]["postcopy-requests"]
            qemuvm.wait_incoming(dest)
            blocked = dest.qmp.execute("query-migrate")["postcopy-blocktime"]
        for process in processes:
            if process.wait(timeout=60):
                raise RuntimeError(process.stderr.read().decode())
        link.close()
        pause = qemuvm.event_time(resume) - qemuvm.event_time(stop)
        timed = None  # decode's own figure: a request read to its page off the wire
        if filters is not None:
            figures = json.loads((work / "decode.json").read_text()).get("postcopy_requests")
            timed = (figures or {}).get("median_ms")
        return {
            "total": total,
            "pause_ms": pause * 1000,
            "requests": requests,
            "blocked": blocked,
            "timed": timed,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=30e6)
    parser.add_argument("--no-preempt", action="store_true", help="without postcopy-preempt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        guest = qemuvm.build_guest(Path(tmp))
        print(
            f"{'QEMU':6} {'path':50} {'total s':>8} {'pause ms':>9} {'requests':>9} "
            f"{'vCPU wait ms':>12} {'ms/request':>10} {'decode ms':>9}"
        )
        for build in qemuvm.BUILDS:
            for name, filters in PATHS.items():
                runs = [
                    one_run(guest, build, filters, args.rate, not args.no_preempt)
                    for _ in range(args.runs)
                ]
                total = statistics.median(r["total"] for r in runs)
                pause = statistics.median(r["pause_ms"] for r in runs)
                requests = statistics.median(r["requests"] for r in runs)
                blocked = statistics.median(r["blocked"] for r in runs)
                per = statistics.median(r["blocked"] / max(1, r["requests"]) for r in runs)
                timed = [r["timed"] for r in runs if r["timed"] is not None]
                decoded = f"{statistics.median(timed):9.1f}" if timed else f"{'-':>9}"
                print(
                    f"{build.version:6} {name:50} {total:8.2f} {pause:9.1f} {requests:9.0f} "
                    f"{blocked:12.0f} {per:10.1f} {decoded}"
                )


if __name__ == "__main__":
    main()
