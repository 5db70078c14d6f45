"""inspect of a named FIFO (`mkfifo f; ssh host cat vm.mig > f & migpipe inspect f`): read in
order as a pipe, as `-` is, not sized or seeked as a file."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import migpipe, synthetic_stream


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen]]]:
    """A FIFO, and the writers a test starts on it (stopped at the end if still running)."""
    path = tmp_path / "vm.fifo"
    os.mkfifo(path)
    writers: list[subprocess.Popen] = []
    yield path, writers
    for writer in writers:
        writer.kill()
        writer.wait()


def feed(fifo: tuple[Path, list[subprocess.Popen]], data: Path) -> None:
    """`cat DATA > FIFO` in the background, as a user's shell would."""
    path, writers = fifo
    writers.append(subprocess.Popen(["sh", "-c", 'cat "$1" > "$2"', "sh", str(data), str(path)]))


def test_inspect_reads_a_wire_from_a_named_fifo(tmp_path: Path, fifo) -> None:
    stream = synthetic_stream(4 << 20, 2)
    wire = tmp_path / "vm.wire"
    encoded = migpipe("encode", "--filters", "xbzrle,zstd:1", "--out", str(wire), stdin=stream)
    assert encoded.returncode == 0, encoded.stderr
    feed(fifo, wire)
    result = migpipe("inspect", str(fifo[0]), timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"file: stream layout, xbzrle, zstd; {wire.stat().st_size:,} bytes;" in (
        result.stdout.decode()
    )
    assert b"on disk" not in result.stdout  # a pipe has no blocks to count


def test_inspect_reads_a_bare_qemu_stream_from_a_named_fifo(tmp_path: Path, fifo) -> None:
    bare = tmp_path / "vm.qemu"
    bare.write_bytes(synthetic_stream(4 << 20, 2))
    feed(fifo, bare)
    result = migpipe("inspect", "--json", str(fifo[0]), timeout=60)
    assert result.returncode == 0, result.stderr
    assert b'"error": null' in result.stdout
    assert b'"ram"' in result.stdout
