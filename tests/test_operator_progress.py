"""xbzrle's hits and misses in encode's progress while the stream crosses, not only at its end.

encode runs as a user runs it, its input fed in two parts from here: the first part holds
passes that re-send pages (hits), and the second is written only once progress has shown
them, so the figures seen are a running encode's, never the final line's.
"""

import json
import re
import select
import subprocess
import time
from pathlib import Path

from support import MIGPIPE, synthetic_stream

DEADLINE = 30.0  # seconds a progress record may take to show the hits


def running_encode(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, bytes]:
    """encode --xbzrle with progress `mode` on stderr, half its input fed, and the rest."""
    stream = synthetic_stream(8 << 20, 4, dirty_share=0.5)
    encode = subprocess.Popen(
        [*MIGPIPE, "encode", "--xbzrle", mode, "--out", str(tmp_path / "wire")],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cut = len(stream) * 3 // 4
    encode.stdin.write(stream[:cut])
    encode.stdin.flush()
    return encode, stream[cut:]


def stderr_until(encode: subprocess.Popen, wanted: re.Pattern[bytes]) -> bytes:
    """What encode wrote on stderr, read until `wanted` matches it (or the deadline fails)."""
    seen = b""
    deadline = time.monotonic() + DEADLINE
    while not (match := wanted.search(seen)):
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted.pattern!r} on encode's stderr: {seen[-400:]!r}"
        if select.select([encode.stderr], [], [], left)[0]:
            chunk = encode.stderr.read1(1 << 16)
            assert chunk, f"encode ended first: {seen[-400:]!r}"
            seen += chunk
    return match.group(0)


def finish(encode: subprocess.Popen, rest: bytes) -> bytes:
    encode.stdin.write(rest)
    encode.stdin.close()
    tail = encode.stderr.read()
    assert encode.wait() == 0, tail
    return tail


def test_json_progress_carries_xbzrle_counters_while_running(tmp_path: Path) -> None:
    encode, rest = running_encode(tmp_path, "--progress=json")
    hits = re.compile(rb'\{"command": "encode", "done": false[^\n]*"hits": [1-9][^\n]*\}\n')
    record = json.loads(stderr_until(encode, hits))
    xbzrle = record["filters"]["xbzrle"]
    assert xbzrle["misses"] > 0  # the first pass: nothing cached yet
    assert record["qemu_bytes"] > 0
    last = json.loads(finish(encode, rest).splitlines()[-1])
    assert last["done"] is True
    assert last["filters"]["xbzrle"]["hits"] >= xbzrle["hits"]


def test_progress_line_shows_xbzrle_hits_while_running(tmp_path: Path) -> None:
    encode, rest = running_encode(tmp_path, "--progress")
    shown = stderr_until(encode, re.compile(rb"\rencode: [^\r]*xbzrle hits [1-9][\d,]* misses"))
    assert b"done in" not in shown  # a redraw, not the final line
    final = finish(encode, rest).split(b"\r")[-1]
    assert final.startswith(b"encode: done in ")
    assert b"xbzrle hits " in final
