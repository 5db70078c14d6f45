"""encode | decode over real pipes: byte-identical, and never a complete stream from a bad wire."""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from blocking import POLL, wait_until_blocked, watches_syscalls
from support import MIGPIPE, migpipe, synthetic_stream

from migpipe import wire
from migpipe.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from migpipe.errors import EXIT_CORRUPT, EXIT_INCOMPATIBLE, EXIT_TRUNCATED
from migpipe.io.channel import NOT_A_STREAM
from migpipe.io.idle import KEEPALIVE
from migpipe.wire.header import encode_header

FAILSAFE = 30.0  # seconds; never a wait, only a bound on a hang
CHAINS = [[], ["--compress", "zstd:1"], ["--compress", "lz4"], ["--filters", "zstd:3"]]


@pytest.fixture(scope="module")
def stream() -> bytes:
    return synthetic_stream(8 << 20, 3, dirty_share=0.1, seed=1)


@pytest.fixture(scope="module", params=CHAINS, ids=lambda c: " ".join(c) or "pass-through")
def encoded(request: pytest.FixtureRequest, stream: bytes) -> bytes:
    result = migpipe("encode", *request.param, stdin=stream)
    assert result.returncode == 0, result.stderr
    return result.stdout


def decode(wire_bytes: bytes) -> subprocess.CompletedProcess:
    return migpipe("decode", stdin=wire_bytes)


def eof_at(stream: bytes) -> int:
    """Where QEMU's EOF item starts: just before the VM description."""
    return stream.rindex(b"\x00\x06\x00\x00")


def assert_never_complete(result: subprocess.CompletedProcess, stream: bytes) -> None:
    """Whatever decode wrote must stop before the EOF item: QEMU cannot finish loading it
    (NOT_A_STREAM when it failed before the stream's first byte)."""
    assert result.returncode != 0
    assert len(result.stdout) <= eof_at(stream)
    assert stream.startswith(result.stdout) or result.stdout == NOT_A_STREAM
    message = result.stderr.decode().strip()
    assert message.count("\n") == 0 and "Traceback" not in message, message


def test_round_trip_is_byte_identical(encoded: bytes, stream: bytes) -> None:
    result = decode(encoded)
    assert result.returncode == 0, result.stderr
    assert result.stdout == stream


def test_compression_shrinks_the_wire(stream: bytes) -> None:
    sizes = {
        codec: len(migpipe("encode", "--compress", codec, stdin=stream).stdout)
        for codec in ("zstd:1", "lz4")
    }
    assert all(size < len(stream) * 0.8 for size in sizes.values()), sizes


def test_every_flipped_frame_byte_is_caught(encoded: bytes, stream: bytes) -> None:
    positions = range(0, len(encoded), max(1, len(encoded) // 12))
    for at in [*positions, len(encoded) - 1]:
        corrupt = bytearray(encoded)
        corrupt[at] ^= 0x10
        assert_never_complete(decode(bytes(corrupt)), stream)


def test_truncated_wire_never_completes(encoded: bytes, stream: bytes) -> None:
    for cut in [
        0,
        5,
        40,
        len(encoded) // 2,
        len(encoded) - wire.TRAILER_SIZE - 14,
        len(encoded) - 1,
    ]:
        result = decode(encoded[:cut])
        assert_never_complete(result, stream)
        assert result.returncode in (EXIT_TRUNCATED, EXIT_CORRUPT)
    assert decode(encoded[: len(encoded) - 1]).returncode == EXIT_TRUNCATED


def test_the_end_goes_out_at_the_trailer_and_bytes_after_it_are_refused(
    encoded: bytes, stream: bytes
) -> None:
    """decode writes the stream's end as soon as the trailer vouched for it, before its input
    ends: in a live migration the guest is paused until QEMU has it. Bytes after the trailer
    still end decode with status 3 and one line (what QEMU got is whole)."""
    proc = subprocess.Popen(
        [*MIGPIPE, "decode"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    feeding = threading.Thread(target=proc.stdin.write, args=(encoded,))
    feeding.start()
    out = bytearray()
    while len(out) < len(stream) and select.select([proc.stdout], [], [], FAILSAFE)[0]:
        out += os.read(proc.stdout.fileno(), 1 << 20)
        assert proc.poll() is None  # the input has not ended
    feeding.join()
    assert out == stream
    proc.stdin.write(b"junk")
    proc.stdin.close()
    assert proc.wait(FAILSAFE) == EXIT_CORRUPT
    message = proc.stderr.read().decode().strip()
    assert message.count("\n") == 0 and "trailing bytes after the end of the wire" in message
    assert proc.stdout.read() == b""


def test_frames_out_of_order_are_refused(stream: bytes) -> None:
    encoded = migpipe("encode", stdin=stream).stdout
    header_end = encoded.index(b"}") + 5
    first_length = int.from_bytes(encoded[header_end + 5 : header_end + 9], "big")
    first_end = header_end + wire.FRAME_HEADER_SIZE + first_length
    second_length = int.from_bytes(encoded[first_end + 5 : first_end + 9], "big")
    second_end = first_end + wire.FRAME_HEADER_SIZE + second_length
    swapped = (
        encoded[:header_end]
        + encoded[first_end:second_end]
        + encoded[header_end:first_end]
        + encoded[second_end:]
    )
    result = decode(swapped)
    assert_never_complete(result, stream)
    assert b"frame 1 where frame 0 was due" in result.stderr


def test_unknown_filter_and_newer_version(stream: bytes) -> None:
    fields = {"filters": [["rot13", {}]], "page_size": 4096}
    header = encode_header(wire.MAGIC, wire.VERSION, fields)
    result = decode(header + wire.encode_trailer(0, wire.Trailer(0, 0, 0, 0)))
    assert result.returncode == EXIT_INCOMPATIBLE
    assert b'unknown filter "rot13"' in result.stderr
    newer = bytearray(migpipe("encode", stdin=stream).stdout)
    newer[8] = max(wire.VERSIONS) + 1
    result = decode(bytes(newer))
    assert result.returncode == EXIT_INCOMPATIBLE and result.stdout == NOT_A_STREAM


def test_encode_refuses_bad_qemu_input_and_unknown_filters(stream: bytes) -> None:
    result = migpipe("encode", stdin=stream[: len(stream) // 2])
    assert result.returncode == EXIT_TRUNCATED and b"truncated" in result.stderr
    result = migpipe("encode", "--filters", "rot13", stdin=stream)
    assert result.returncode == EXIT_INCOMPATIBLE and b"unknown filter" in result.stderr


def test_decode_output_file_appears_only_when_complete(encoded: bytes, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    result = migpipe("decode", "--out", str(out), stdin=encoded[:-3])
    assert result.returncode != 0 and not out.exists()
    assert not list(tmp_path.iterdir())


def test_stats_json_and_progress(stream: bytes, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    result = migpipe(
        "encode", "--compress", "zstd:1", "--progress", "--stats-json", str(stats), stdin=stream
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(stats.read_text())
    assert figures["qemu_bytes"] == len(stream)
    assert figures["wire_bytes"] == len(result.stdout)
    assert figures["pages"]["zero"] > 0 and figures["pages"]["normal"] > 0
    assert figures["filter_seconds"]["zstd"] > 0
    assert figures["wall_seconds"] > 0
    progress = result.stderr.decode()
    assert progress.startswith("\rencode: ") and progress.endswith("\n")
    assert f"{len(stream) / 2**20:,.1f} MiB stream" in progress.rsplit("\r", 1)[-1]
    quiet = migpipe("encode", stdin=stream)  # stderr is not a terminal: no progress by default
    assert quiet.stderr == b""


def test_hostile_compressed_payloads_are_refused() -> None:
    """An lz4 frame without a content size, or junk after a zstd frame: corrupt, exit 3."""
    import lz4.frame
    import zstandard
    from migpipe_filters.lz4 import Lz4
    from migpipe_filters.zstd import Zstd

    from migpipe.chain import Position
    from migpipe.errors import MigpipeError

    bomb = lz4.frame.compress(bytes(100 << 20), store_size=False)  # 400 KB -> 100 MiB
    with pytest.raises(MigpipeError) as caught:
        Lz4().decode(bomb, wire.MAX_FRAME, Position(0, False))
    assert caught.value.status == EXIT_CORRUPT
    padded = zstandard.ZstdCompressor().compress(b"page" * 1024) + b"junk"
    with pytest.raises(MigpipeError) as caught:
        Zstd().decode(padded, wire.MAX_FRAME, Position(0, False))
    assert caught.value.status == EXIT_CORRUPT


def test_header_flags_and_page_size_are_checked(stream: bytes) -> None:
    encoded = bytearray(migpipe("encode", stdin=stream).stdout)
    flagged = bytearray(encoded)
    flagged[9] = 0x80
    end = flagged.index(b"}") + 1
    flagged[end : end + 4] = zlib.crc32(flagged[:end]).to_bytes(4, "big")
    result = decode(bytes(flagged))
    assert result.returncode == EXIT_INCOMPATIBLE and b"flags" in result.stderr
    header = encode_header(wire.MAGIC, wire.VERSION, {"filters": [], "page_size": 3})
    assert decode(header).returncode == EXIT_CORRUPT


def test_conflicting_wire_options_are_a_usage_error(stream: bytes) -> None:
    result = migpipe("encode", "--out", "x", "--connect", "127.0.0.1:1", stdin=stream)
    assert result.returncode == 2 and b"--out and --connect/--listen" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["decode", "--in", "/nonexistent/wire"],
        ["decode", "--listen", "127.0.0.1:0", "--tls-creds", "/nonexistent/pki"],
        ["restore", "/nonexistent/vm.mig"],
    ],
    ids=["missing wire", "missing TLS credentials", "missing saved file"],
)
def test_a_stream_that_cannot_start_fails_qemus_load(args: list[str]) -> None:
    """Failing before the wire or file is even open writes NOT_A_STREAM too: QEMU 7.2 waits on
    an `exec:` pipe closed empty forever (tests/test_qemu_tunnel.py shows both sides of that)."""
    result = migpipe(*args, stdin=b"")
    assert result.returncode != 0
    assert result.stdout == NOT_A_STREAM
    message = result.stderr.decode()
    assert message.startswith(f"migpipe {args[0]}: error: ") and message.count("\n") == 1, message


@pytest.mark.parametrize(
    "command",
    [
        ["encode", "--compress", "zstd:1"],
        ["decode"],
        ["save", "{file}"],
        ["save", "{file}", "--direct=try"],  # no filters: read straight into the O_DIRECT ring
        ["save", "--layout", "fixed", "--direct=try", "{file}"],
    ],
    ids=" ".join,
)
@watches_syscalls
@pytest.mark.parametrize(
    "stop,status",
    [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_ends_a_command_whose_input_is_silent(
    command: list[str], stop: signal.Signals, status: int, tmp_path: Path
) -> None:
    """QEMU paused or the peer idle: Ctrl-C or SIGTERM must not wait for the next byte, and a
    stopped save leaves nothing behind, not even its temporary file."""
    argv = [*MIGPIPE, *(a.format(file=tmp_path / "vm.mig") for a in command)]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        wait_until_blocked(proc.pid, frozenset({POLL}))  # its read waits on the open, idle pipe
        proc.send_signal(stop)
        try:
            # sooner than encode's keepalive: a poll the signal did not end would last as long
            assert proc.wait(KEEPALIVE / 2) == status, proc.stderr.read()
        finally:
            proc.stdin.close()  # ends the read of a migpipe that ignored the signal
    assert list(tmp_path.iterdir()) == []


def signal_masks(pid: int) -> dict[str, int]:
    """A process's SigIgn and SigCgt masks (proc(5): bit n-1 is signal n)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        k: int(v, 16)
        for k, v in (line.split(":\t") for line in status)
        if k in ("SigIgn", "SigCgt")
    }


@watches_syscalls
def test_a_job_started_with_sigint_ignored_keeps_it_ignored() -> None:
    """`migpipe ... &` in a script starts with SIGINT ignored, as a job Ctrl-C is not meant for:
    migpipe leaves it so, and SIGTERM, which it could only pass on as SIGINT, kills at once."""
    script = 'trap "" INT; exec "$0" -m migpipe decode'
    with subprocess.Popen(
        ["sh", "-c", script, sys.executable],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        wait_until_blocked(proc.pid, frozenset({POLL}))  # started up, reading the idle pipe
        masks = signal_masks(proc.pid)
        assert masks["SigIgn"] & 1 << signal.SIGINT - 1
        assert not masks["SigCgt"] & 1 << signal.SIGTERM - 1
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == -signal.SIGTERM
        finally:
            proc.stdin.close()
