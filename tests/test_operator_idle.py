"""--idle-timeout: a peer on a socket that stays connected but stops talking (or reading)
mid-stream is given up on with one line and status 10, never waited for in silence; a QEMU
that is merely quiet is not such a peer, since encode sends keepalives meanwhile.

Each peer here is a real socket that this test holds open and silent; the deadline is 1 s
(encode's keepalive then comes every 0.25 s), and each wait ends by the command's own exit.
"""

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import MIGPIPE, free_port, migpipe, synthetic_stream

from migpipe.errors import EXIT_IDLE
from migpipe.service import client as service_client

TIMEOUT = 30.0
SILENT = "nothing came for 1 s; the peer is connected but silent "
SILENT += "(--idle-timeout SECONDS; 0 waits for ever)\n"


@pytest.fixture(scope="module")
def stream() -> bytes:
    return synthetic_stream(4 << 20, 3)


@pytest.fixture(scope="module")
def wire(stream: bytes) -> bytes:
    encoded = migpipe("encode", "--filters", "zstd:1", stdin=stream)
    assert encoded.returncode == 0, encoded.stderr
    return encoded.stdout


def connect(address: str) -> socket.socket:
    """A connection to a listener that a migpipe just started (retried until it is up)."""
    host, port = address.rsplit(":", 1)
    while True:
        try:
            return socket.create_connection((host, int(port)), timeout=TIMEOUT)
        except ConnectionRefusedError:
            continue


def test_decode_gives_up_on_a_peer_that_stops_mid_stream(tmp_path: Path, wire: bytes) -> None:
    """The deadline from the config file, as an admin would set it for every decode."""
    config = tmp_path / "migpipe.conf"
    config.write_text("[decode]\nidle-timeout = 1\n")
    address = free_port()
    decode = subprocess.Popen(
        [*MIGPIPE, "decode", "--listen", address, "--out", str(tmp_path / "vm.qemu")],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MIGPIPE_CONFIG": str(config)},
    )
    with connect(address) as peer:
        peer.sendall(wire[: len(wire) // 2])  # then nothing, the connection kept open
        _, err = decode.communicate(timeout=TIMEOUT)
        host, port = peer.getsockname()[:2]
    assert decode.returncode == EXIT_IDLE
    assert err == f"migpipe decode: error: {host}:{port}: {SILENT}"
    assert not (tmp_path / "vm.qemu").exists()  # nothing half-written


def test_encode_gives_up_on_a_peer_that_stops_reading(stream: bytes) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        encode = subprocess.Popen(
            [*MIGPIPE, "encode", "--connect", address, "--idle-timeout", "1"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        conn, _ = server.accept()  # and never read from
        with conn:
            _, err = encode.communicate(stream * 4, timeout=TIMEOUT)
    assert encode.returncode == EXIT_IDLE
    assert err.decode() == (
        f"migpipe encode: error: {address}: the peer took nothing for 1 s; it is connected "
        "but not reading (--idle-timeout SECONDS; 0 waits for ever)\n"
    )


def test_restore_gives_up_on_a_socket_that_stops_mid_file(wire: bytes) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        restore = subprocess.Popen(
            [*MIGPIPE, "restore", "--idle-timeout", "1", "-"],
            stdin=theirs,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ours.sendall(wire[:20000])
        _, err = restore.communicate(timeout=TIMEOUT)
    assert restore.returncode == EXIT_IDLE
    assert err == f"migpipe restore: error: standard input (a UNIX socket): {SILENT}"


def test_serve_fails_a_job_whose_socket_peer_stops(tmp_path: Path, wire: bytes) -> None:
    """The deadline from the config file's section for every command."""
    config = tmp_path / "migpipe.conf"
    config.write_text("[migpipe]\nidle-timeout = 1\n")
    path = tmp_path / "serve.sock"
    server = subprocess.Popen(
        [*MIGPIPE, "serve", "--socket", str(path), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ours, theirs = socket.socketpair()
    write_end = os.open(os.devnull, os.O_WRONLY)  # a QEMU that takes what comes
    try:
        assert server.stdout.readline() == f"migpipe serve: listening on {path}\n"
        with service_client.connect(str(path), TIMEOUT, TIMEOUT) as session:
            session.add_fd("wire", theirs.fileno())
            session.add_fd("vm", write_end)
            theirs.close()
            os.close(write_end)
            job = session.start_job("decode", input="wire", output="vm")
            ours.sendall(wire[: len(wire) // 2])
            with pytest.raises(service_client.JobError) as failed:
                session.wait_job(job)
        assert failed.value.desc == (
            "input fd 'wire': nothing came for 1 s; the peer is connected but silent "
            "(--idle-timeout SECONDS; 0 waits for ever)"
        )
    finally:
        ours.close()
        server.terminate()
        server.communicate(timeout=TIMEOUT)


def progress_records(decode: subprocess.Popen) -> Iterator[dict]:
    for line in decode.stderr:
        assert line.startswith("{"), line  # an error instead
        yield json.loads(line)


def test_a_quiet_qemu_is_not_a_silent_peer(tmp_path: Path, stream: bytes) -> None:
    """QEMU (the test) writes half its stream, says nothing for three deadlines, then the
    rest: encode's keepalives hold decode's deadline off, and the stream arrives whole."""
    address, out = free_port(), tmp_path / "vm.qemu"
    timeout = ["--idle-timeout", "1"]
    decode = subprocess.Popen(
        [*MIGPIPE, "decode", "--listen", address, *timeout, "--out", str(out), "--progress=json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    encode = subprocess.Popen(
        [*MIGPIPE, "encode", "--connect", address, *timeout], stdin=subprocess.PIPE
    )
    try:
        encode.stdin.write(stream[: len(stream) // 2])
        encode.stdin.flush()
        records = progress_records(decode)
        arrived = next(r for r in records if r["qemu_bytes"])
        for record in records:  # until QEMU's stream has not grown for three deadlines
            if record["qemu_bytes"] != arrived["qemu_bytes"]:
                arrived = record
            elif record["elapsed"] >= arrived["elapsed"] + 3:
                break
        assert not record["done"]
        assert record["wire_bytes"] > arrived["wire_bytes"]  # keepalives came meanwhile
        encode.stdin.write(stream[len(stream) // 2 :])
        encode.stdin.close()
        assert encode.wait(timeout=TIMEOUT) == 0
        assert decode.wait(timeout=TIMEOUT) == 0, decode.stderr.read()
    finally:
        for process in (encode, decode):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert out.read_bytes() == stream
