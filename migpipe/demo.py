"""The built-in example: a synthetic guest's migration stream through migpipe, checked.

It generates a multi-pass precopy stream, parses and rewrites it (which must give the very same
bytes), replays it into RAM images (which must equal the guest's memory), and prints what it saw.
"""

import filecmp
import mmap
import tempfile
import time
from pathlib import Path

from migpipe.extracted import extract, image_file_name
from migpipe.files import read_chunks
from migpipe.inspect import StreamStats
from migpipe.stream.parser import StreamParser, iter_records
from migpipe.stream.writer import StreamWriter
from migpipe.synthetic import GuestModel, SyntheticGuest


def _write_stream(records, path: Path) -> None:
    writer, buffer = StreamWriter(), bytearray()
    with open(path, "wb") as out:
        for record in records:
            writer.write(buffer, record)
            if len(buffer) >= 1 << 20:
                out.write(buffer)
                buffer.clear()
        out.write(buffer)


def _round_trip(source: Path, target: Path) -> float:
    """parse -> write, chunk by chunk as a pipeline does; returns seconds taken."""
    parser, writer, buffer = StreamParser(), StreamWriter(), bytearray()
    started = time.perf_counter()
    with open(source, "rb") as f, open(target, "wb") as out:
        for chunk in read_chunks(f):
            parser.feed(chunk)
            writer.write_all(buffer, parser.next_records())
            out.write(buffer)
            buffer.clear()
        parser.close()
        writer.write_all(buffer, parser.next_records())
        out.write(buffer)
    return time.perf_counter() - started


def run_demo(size: int, iterations: int, seed: int) -> int:
    model = GuestModel(ram_size=size, iterations=iterations, seed=seed)
    guest = SyntheticGuest(model)
    with tempfile.TemporaryDirectory(prefix="migpipe-demo-") as tmp:
        work = Path(tmp)
        original, rewritten = work / "guest.stream", work / "rewritten.stream"
        _write_stream(guest.records(), original)
        seconds = _round_trip(original, rewritten)
        identical = filecmp.cmp(original, rewritten, shallow=False)
        stats = StreamStats()
        with open(rewritten, "rb") as f:
            records = iter_records(read_chunks(f))
            extract((stats.add(r) or r for r in records), work / "extracted")
        mismatched = []
        for name, image in guest.images.items():
            with open(work / "extracted" / image_file_name(name), "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if mapped[:] != image:
                    mismatched.append(name)
                mapped.close()
        stream_bytes = original.stat().st_size
    rows = [
        ("synthetic guest", f"{size >> 20} MiB RAM, {iterations} passes, seed {seed}"),
        ("stream", f"{stream_bytes:,} bytes"),
        ("pages", ", ".join(f"{k} {v:,}" for k, v in stats.pages.items() if v)),
        ("passes over RAM", f"{stats.passes}"),
        ("pages sent more than once", f"{stats.pages_resent:,} (up to {stats.max_sends}x)"),
        ("device state", f"{stats.device_bytes:,} bytes"),
        ("parse + write", f"{stream_bytes / seconds / 1e6:,.0f} MB/s"),
        ("rewritten stream", "byte-identical" if identical else "DIFFERENT"),
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
