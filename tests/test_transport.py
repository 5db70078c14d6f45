"""encode --connect / decode --listen over real TCP and UNIX sockets."""

import contextlib
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from migpipe.errors import EXIT_PEER_GONE, EXIT_USAGE, MigpipeError
from migpipe.io import transport
from migpipe.io.transport import parse_endpoint
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.wire import MAGIC

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
    source = tmp_path / "stream"
    source.write_bytes(stream)
    encoder = subprocess.Popen(  # started right away: --connect retries until decode listens
        [*MIGPIPE, "encode", "--compress", "zstd:1", "--connect", address, "--in", str(source)],
        stderr=subprocess.PIPE,
    )
    out, err = decoder.communicate(timeout=60)  # read as it comes: migpipe holds little
    assert encoder.wait(timeout=60) == 0, encoder.stderr.read()
    assert decoder.returncode == 0, err
    assert out == stream
    assert not (tmp_path / "wire.sock").exists()  # the listener cleans up its socket


def test_nobody_listening_is_a_clear_failure(stream: bytes) -> None:
    result = subprocess.run(
        [*MIGPIPE, "encode", "--connect", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.2"],
        input=stream,
        capture_output=True,
        check=False,
    )
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
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
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

    from migpipe.io.channel import CHUNK, FdChannel

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


# -- a listener and the strays that reach it first ----------------------------------------------


def refused(address: str, send: bytes = b"", *, hang_up: bool = True) -> int:
    """Connect to a listener (retrying until it is up), send `send` (then end our side if
    `hang_up`), and return our port once the listener has closed the connection on us."""
    with transport.connect(address, 30.0) as sock:
        port = sock.getsockname()[1]
        sock.sendall(send)
        with contextlib.suppress(OSError):  # reset, or not connected any more: closed
            if hang_up:
                sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        return port


def test_strays_do_not_end_a_decoding_listener(stream: bytes, tmp_path: Path) -> None:
    """Without TLS, a stray shows in its first bytes: they are not the wire's magic. The stray
    is refused and logged, the listener goes on, and the source after it gets through, past
    one that connected and says nothing."""
    address = f"127.0.0.1:{free_port()}"
    decoder = subprocess.Popen(
        [*MIGPIPE, "decode", "--listen", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    http = refused(address, b"GET / HTTP/1.0\r\n\r\n")
    empty = refused(address)
    short = refused(address, MAGIC[:3])
    source = tmp_path / "stream"
    source.write_bytes(stream)
    with transport.connect(address, 30.0):  # silent, open while the source comes and goes
        encoder = subprocess.Popen(
            [*MIGPIPE, "encode", "--connect", address, "--in", str(source)],
            stderr=subprocess.PIPE,
        )
        out, err = decoder.communicate(timeout=60)  # read as it comes: migpipe holds little
        assert encoder.wait(timeout=60) == 0, encoder.stderr.read()
    assert decoder.returncode == 0, err
    assert out == stream
    assert err.decode().splitlines() == [
        f"migpipe decode: refused a connection on {address} from 127.0.0.1:{http}: "
        'not a migpipe wire (it began with "GET / HT")',
        f"migpipe decode: refused a connection on {address} from 127.0.0.1:{empty}: "
        "closed without sending anything",
        f"migpipe decode: refused a connection on {address} from 127.0.0.1:{short}: "
        "closed after 3 bytes",
    ]


def test_listen_gives_up_after_accept_timeout() -> None:
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [*MIGPIPE, "decode", "--listen", address, "--accept-timeout", "0.5"],
        capture_output=True,
        check=False,
    )
    assert result.returncode == EXIT_PEER_GONE
    assert result.stderr.decode() == (
        f"migpipe decode: error: no connection on {address} within 0.5 s\n"
    )
    assert result.stdout == b"MGP!"  # QEMU, behind decode, fails its load at once
    for bad in ("-1", "nan", "soon"):
        result = subprocess.run(
            [*MIGPIPE, "encode", "--listen", address, "--accept-timeout", bad],
            capture_output=True,
            check=False,
        )
        assert result.returncode == EXIT_USAGE
        assert f'"{bad}" is not a number of seconds' in result.stderr.decode()


class Listener(threading.Thread):
    """transport.listen with the wire's gate, in a thread: what it admitted, and its log."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(daemon=True)
        self.address, self.options = address, options
        self.lines: list[str] = []
        self.received: bytes | BaseException = b""

    def run(self) -> None:
        gate = transport.first_bytes(MAGIC)
        try:
            with transport.listen(self.address, gate, log=self.lines.append, **self.options) as s:
                self.received = s.recv(len(MAGIC), socket.MSG_WAITALL)
        except BaseException as e:  # handed to the test thread
            self.received = e


def test_refusals_are_logged_at_a_bounded_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "LOG_EVERY", 3600.0)  # no line comes back during the test
    listener = Listener(address := f"127.0.0.1:{free_port()}")
    listener.start()
    for _ in range(transport.LOG_BURST + 5):
        refused(address, b"x" * 8)
    with transport.connect(address, 30.0) as source:
        source.sendall(MAGIC)
        listener.join(60)
    assert listener.received == MAGIC  # the wire's first bytes, still there to be read
    lines = listener.lines
    assert len(lines) == transport.LOG_BURST + 1
    assert all(
        re.fullmatch(
            rf"refused a connection on {address} from 127\.0\.0\.1:\d+: not a "
            r'migpipe wire \(it began with "xxxxxxxx"\)',
            line,
        )
        for line in lines[:-1]
    )
    assert lines[-1] == "5 more refused connections not logged"


def test_a_silent_connection_is_dropped_after_its_patience() -> None:
    listener = Listener(address := f"127.0.0.1:{free_port()}", patience=0.2)
    listener.start()
    port = refused(address, MAGIC[:3], hang_up=False)  # a beginning, then nothing
    with transport.connect(address, 30.0) as source:
        source.sendall(MAGIC)
        listener.join(60)
    assert listener.received == MAGIC
    assert listener.lines == [
        f"refused a connection on {address} from 127.0.0.1:{port}: no 8 bytes of a wire in time"
    ]


def test_a_flood_of_silent_connections_pushes_out_the_oldest_not_the_source() -> None:
    listener = Listener(address := f"127.0.0.1:{free_port()}")
    listener.start()
    with contextlib.ExitStack() as silent:
        ports = [
            silent.enter_context(transport.connect(address, 30.0)).getsockname()[1]
            for _ in range(transport.MAX_PENDING)
        ]
        with transport.connect(address, 30.0) as source:
            source.sendall(MAGIC)
            listener.join(60)
    assert listener.received == MAGIC
    assert listener.lines == [
        f"refused a connection on {address} from 127.0.0.1:{ports[0]}: "
        "pushed out by newer connections"
    ]


def test_further_connections_arriving_together_are_each_admitted_and_strays_refused() -> None:
    """A wire spread over several connections (encode --connections): the listener takes the
    further ones on the socket it kept, checking each one's first bytes. Connections that
    arrive at once are all kept while one is handed over; a stray, or one of another wire,
    is refused in a line and the wait goes on, as for the first connection."""
    from migpipe.wire import JOIN_SIZE, Join, parse_join

    session = bytes(range(16))

    def ours(first: bytes) -> None:
        join = parse_join(first)
        if join.session != session:
            raise MigpipeError("a connection joined from another session")

    spec = f"127.0.0.1:{free_port()}"
    refused: list[str] = []
    with transport.listening(spec) as server:
        acceptor = transport.Acceptor(server, spec, None, None, 10.0, refused.append)
        try:
            peers = [socket.create_connection(("127.0.0.1", int(spec.split(":")[1])))]
            peers[0].sendall(Join(bytes(16), 1, 3).encode())  # another wire's
            for index in (1, 2):
                peers.append(socket.create_connection(("127.0.0.1", int(spec.split(":")[1]))))
                peers[-1].sendall(Join(session, index, 3).encode() + b"frames")
            channels = [acceptor.open((JOIN_SIZE, ours)) for _ in range(2)]
            firsts = {bytes(c.read()) for c in channels}
            assert firsts == {Join(session, i, 3).encode() + b"frames" for i in (1, 2)}
            assert len(refused) == 1 and "another session" in refused[0], refused
            acceptor.interrupt()  # a failure elsewhere: the next wait ends at once
            with pytest.raises(transport.Stopped):
                acceptor.open((JOIN_SIZE, ours))
        finally:
            acceptor.close()
            for peer in peers:
                peer.close()


def test_a_further_connection_that_never_comes_is_one_line_in_time() -> None:
    spec = f"127.0.0.1:{free_port()}"
    with transport.listening(spec) as server:
        acceptor = transport.Acceptor(server, spec, None, None, 0.3)
        with pytest.raises(MigpipeError, match=r"^no further connection on .* within 0.3 s$"):
            acceptor.open()
        acceptor.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_a_further_connection_that_overtakes_the_first_is_kept_for_later(
    tmp_path: Path, family: str
) -> None:
    """A relay that lost a wire's first connection on its way, or was slower with it, can
    deliver a further connection first: the listener keeps it (it is not the first, nor a
    stray) and takes the first when it comes; open() then hands the early one over."""
    from migpipe.chain import FilterChain
    from migpipe.wire import FIRST_SIZE, Join, WireWriter, starts_wire

    spec = f"127.0.0.1:{free_port()}" if family == "tcp" else f"unix:{tmp_path / 'w.sock'}"
    header = WireWriter(FilterChain([]), lanes=True).header()
    join = Join(bytes(16), 1, 2).encode()

    def connect() -> socket.socket:
        if family == "unix":
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(spec[5:])
            return peer
        return socket.create_connection(("127.0.0.1", int(spec.rsplit(":", 1)[1])))

    with transport.listening(spec) as server:
        acceptor = transport.Acceptor(server, spec, None, None, 10.0)
        try:
            further, first = connect(), connect()
            further.sendall(join)
            first.sendall(header)
            taken = acceptor.first((FIRST_SIZE, starts_wire))
            assert taken.recv(len(header)) == header
            taken.close()
            assert bytes(acceptor.open().read()) == join
        finally:
            acceptor.close()
            further.close()
            first.close()
