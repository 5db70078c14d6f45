"""encode --connect / decode --listen over real TCP and UNIX sockets."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from migpipe.errors import EXIT_PEER_GONE, MigpipeError
from migpipe.stream.writer import write_records
from migpipe.synthetic import GuestModel, SyntheticGuest
from migpipe.transport import parse_endpoint

MIGPIPE = [sys.executable, "-m", "migpipe"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stream() -> bytes:
    return write_records(SyntheticGuest(GuestModel(ram_size=4 << 20, iterations=2)).records())


def test_endpoints() -> None:
    assert parse_endpoint("unix:/run/x.sock", listening=True) == (socket.AF_UNIX, "/run/x.sock")
    assert parse_endpoint("10.0.0.1:4444", listening=False) == (socket.AF_INET, ("10.0.0.1", 4444))
    assert parse_endpoint("[::1]:4444", listening=False) == (socket.AF_INET6, ("::1", 4444))
    assert parse_endpoint("4444", listening=True) == (socket.AF_INET, ("", 4444))
    with pytest.raises(MigpipeError, match="bad endpoint"):
        parse_endpoint("host:port", listening=False)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_wire_over_a_connection(kind: str, stream: bytes, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}" if kind == "tcp" else f"unix:{tmp_path / 'wire.sock'}"
    decoder = subprocess.Popen(
        [*MIGPIPE, "decode", "--listen", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    encoder = subprocess.run(  # started right away: --connect retries until decode listens
        [*MIGPIPE, "encode", "--compress", "zstd:1", "--connect", address],
        input=stream, capture_output=True, check=False,
    )  # fmt: skip
    out, err = decoder.communicate(timeout=60)
    assert encoder.returncode == 0, encoder.stderr
    assert decoder.returncode == 0, err
    assert out == stream
    assert not (tmp_path / "wire.sock").exists()  # the listener cleans up its socket


def test_nobody_listening_is_a_clear_failure(stream: bytes) -> None:
    result = subprocess.run(
        [*MIGPIPE, "encode", "--connect", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.2"],
        input=stream, capture_output=True, check=False,
    )  # fmt: skip
    assert result.returncode == EXIT_PEER_GONE
    assert b"cannot connect to 127.0.0.1:" in result.stderr and b"refused" in result.stderr


def test_decoder_gone_mid_stream(stream: bytes, tmp_path: Path) -> None:
    """The far side vanishing is reported as such (exit 5), not as a traceback."""
    address = f"unix:{tmp_path / 'wire.sock'}"
    big = write_records(SyntheticGuest(GuestModel(ram_size=64 << 20, iterations=2)).records())
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "wire.sock"))
        server.listen(1)
        encoder = subprocess.Popen(
            [*MIGPIPE, "encode", "--connect", address],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        conn, _ = server.accept()
        conn.recv(1 << 16)
        conn.close()  # the reader goes away after the first bytes
        _, err = encoder.communicate(big, timeout=60)
    assert encoder.returncode == EXIT_PEER_GONE, err
    assert b"Traceback" not in err and err.count(b"\n") == 1


def test_reads_take_what_is_waiting_from_pipes_sockets_files_and_devices(tmp_path: Path) -> None:
    """FdChannel reads exactly what is waiting (sized by FIONREAD, so no read's buffer is
    shrunk after the fact), up to CHUNK, and a whole CHUNK from what cannot say."""
    import os

    from migpipe.channel import CHUNK, FdChannel

    read_end, write_end = os.pipe()
    left, right = socket.socketpair()
    path = tmp_path / "file"
    path.write_bytes(b"f" * (CHUNK + 10))
    file = os.open(path, os.O_RDONLY)
    zero = os.open("/dev/zero", os.O_RDONLY)
    try:
        os.write(write_end, b"p" * 1000)
        right.sendall(b"s" * 3000)
        assert FdChannel(read_end).read() == b"p" * 1000
        assert FdChannel(left.fileno()).read() == b"s" * 3000
        reader = FdChannel(file)
        assert [len(reader.read()) for _ in range(3)] == [CHUNK, 10, 0]
        assert len(FdChannel(zero).read()) == CHUNK
        os.close(write_end)
        write_end = -1
        assert FdChannel(read_end).read() == b""
    finally:
        for fd in (read_end, write_end, file, zero):
            if fd >= 0:
                os.close(fd)
        left.close()
        right.close()
