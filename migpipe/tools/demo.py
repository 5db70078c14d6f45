"""The built-in example: a synthetic guest's migration stream through the tunnel, checked.

It generates a multi-pass precopy stream, encodes it to migpipe's wire with XBZRLE deltas and
zstd, decodes it again (which must give the very same bytes), replays the result into RAM
images (which must equal the guest's memory), and prints what it saw.
"""

import filecmp
import mmap
import tempfile
import time
from pathlib import Path

from migpipe.chain import parse_chain
from migpipe.io.files import read_chunks, write_stream
from migpipe.running import run_trio
from migpipe.stream.parser import iter_records
from migpipe.tools.extracted import extract, image_file_name
from migpipe.tools.stats import StreamStats
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.tunnel.pipeline import Totals, decode, encode

CHAIN = "xbzrle,zstd:1"


def _through(function, source: Path, target: Path, *args) -> tuple[Totals, float]:
    started = time.perf_counter()
    with open(source, "rb") as f, open(target, "wb") as out:
        totals = run_trio(function, f.fileno(), out.fileno(), *args)
    return totals, time.perf_counter() - started


def _mismatched_images(guest: SyntheticGuest, directory: Path) -> list[str]:
    mismatched = []
    for name, image in guest.images.items():
        with open(directory / image_file_name(name), "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if mapped[:] != image:
                mismatched.append(name)
            mapped.close()
    return mismatched


def run_demo(size: int, iterations: int, seed: int) -> int:
    guest = SyntheticGuest(GuestModel(ram_size=size, iterations=iterations, seed=seed))
    with tempfile.TemporaryDirectory(prefix="migpipe-demo-") as tmp:
        work = Path(tmp)
        original, wire, decoded = work / "guest.stream", work / "wire", work / "decoded.stream"
        with open(original, "wb") as out:
            write_stream(guest.records(), out)
        encoded, encode_seconds = _through(encode, original, wire, parse_chain(CHAIN))
        _, decode_seconds = _through(decode, wire, decoded)
        identical = filecmp.cmp(original, decoded, shallow=False)
        stats = StreamStats()
        with open(decoded, "rb") as f:
            records = (stats.add(r) or r for r in iter_records(read_chunks(f)))
            extract(records, work / "extracted")
        mismatched = _mismatched_images(guest, work / "extracted")
    stream_bytes = encoded.qemu_bytes
    rows = [
        ("synthetic guest", f"{size >> 20} MiB RAM, {iterations} passes, seed {seed}"),
        ("QEMU stream", f"{stream_bytes:,} bytes"),
        ("pages", ", ".join(f"{k} {v:,}" for k, v in stats.pages.items() if v)),
        ("passes over RAM", f"{stats.passes}"),
        ("pages sent more than once", f"{stats.pages_resent:,} (up to {stats.max_sends}x)"),
        ("device state", f"{stats.device_bytes:,} bytes"),
        (
            f"wire ({CHAIN})",
            f"{encoded.wire_bytes:,} bytes, ratio {stream_bytes / encoded.wire_bytes:.2f}",
        ),
        ("encode", f"{stream_bytes / encode_seconds / 1e6:,.0f} MB/s"),
        ("decode", f"{stream_bytes / decode_seconds / 1e6:,.0f} MB/s"),
        ("decoded stream", "byte-identical" if identical else "DIFFERENT"),
        (
            "replayed RAM",
            "equals the guest's memory"
            if not mismatched
            else f"DIFFERS in {', '.join(mismatched)}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if identical and not mismatched else 1
