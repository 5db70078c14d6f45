"""TLS for the wire's connection: real sockets, real handshakes, and every way a setup goes wrong.

Credentials come from `tls-init` (the CLI, so the command is tested too); bad ones are built with
cryptography directly, signed by the same CA, so that only the one thing under test is wrong.
Each failure must be one clear line with status EXIT_TLS on both ends where both can tell, and
nothing may reach the reading end.
"""

import contextlib
import datetime
import itertools
import os
import random
import select
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio
from blocking import READ_WAITS, wait_until_blocked, watches_syscalls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from migpipe.errors import EXIT_TLS, EXIT_USAGE, IdleError, MigpipeError, Stopped
from migpipe.io import idle, tls, tlsinit, transport
from migpipe.io.channel import CHUNK
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest
from migpipe.tunnel.pipeline import decode, encode
from migpipe.wire import WireReader, encode_header

MIGPIPE = [sys.executable, "-m", "migpipe"]
JOIN = 60  # seconds a test waits for its other end before calling it hung


def tls_init(directory: Path, *more: str) -> subprocess.CompletedProcess:
    argv = [
        *MIGPIPE,
        "tls-init",
        str(directory),
        "--ca",
        "Test CA",
        "--server-name",
        "localhost,127.0.0.1",
        "--client-name",
        "source",
        *more,
    ]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls") / "creds"
    result = tls_init(directory)
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture
def creds(made: Path, tmp_path: Path) -> Path:
    """A private copy of a good set, for a test to spoil."""
    return Path(shutil.copytree(made, tmp_path / "creds"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete set from another CA, with the same names."""
    directory = tmp_path_factory.mktemp("tls") / "other"
    assert tls_init(directory).returncode == 0
    return directory


# -- two ends over a real loopback connection ----------------------------------------------------


class End(threading.Thread):
    """One end of the connection in a thread: what `work` returned, or what it raised."""

    def __init__(self, work: Callable[[socket.socket], object], sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.work, self.sock = work, sock
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.sock:
                self.result = self.work(self.sock)
        except BaseException as e:  # handed to the test thread
            self.error = e


def connected(
    server: Callable[[socket.socket], object], client: Callable[[socket.socket], object]
) -> tuple[End, End]:
    """Run `server` on the accepted end and `client` on the connecting end, to completion."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_end = End(client, socket.create_connection(listener.getsockname()))
        client_end.start()
        server_end = End(server, listener.accept()[0])
        server_end.start()
    for end in (server_end, client_end):
        end.join(JOIN)
        assert not end.is_alive(), "an end hung"
    return server_end, client_end


def read_all(channel: tls.TlsChannel) -> list[bytes]:
    chunks = []
    while chunk := channel.read():
        chunks.append(chunk)
    return chunks


def serve(creds: Path | tls.TlsContext, *, tls12: bool = False, write: Sequence[bytes] = ()):
    """A TLS listening end: writes `write` (then finishes), or else reads everything."""

    def work(sock: socket.socket) -> object:
        context = (
            creds if isinstance(creds, tls.TlsContext) else tls.server_context(creds, tls12=tls12)
        )
        with tls.wrap_server(sock, context) as channel:
            if write:
                channel.write(write)
                channel.finish()
                return None
            return read_all(channel)

    return work


def dial(creds: Path | tls.TlsContext, host: str = "localhost", *, write=(b"x",), tls12=False):
    """A TLS connecting end: writes `write` (then finishes), or reads everything if empty."""

    def work(sock: socket.socket) -> object:
        context = (
            creds if isinstance(creds, tls.TlsContext) else tls.client_context(creds, tls12=tls12)
        )
        with tls.wrap_client(sock, context, host) as channel:
            if not write:
                return read_all(channel)
            version = channel.socket.version()
            channel.write(write)
            channel.finish()
            return version

    return work


def assert_tls_error(end: End, *words: str) -> None:
    assert isinstance(end.error, MigpipeError), repr(end.error)
    assert end.error.status == EXIT_TLS, end.error
    message = str(end.error)
    assert message.startswith("TLS: ") and "\n" not in message
    for word in words:
        assert word in message, message


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed) & 0xFF for i in range(256)) * (size // 256)


# -- data through TlsChannel --------------------------------------------------------------------


def test_round_trip_client_to_server(creds: Path) -> None:
    parts = [b"h" * 17, payload(3 << 20), memoryview(payload(5000, 1)), b"t" * 28]
    server, client = connected(serve(creds), dial(creds, write=parts))
    assert client.error is None and client.result == "TLSv1.3"
    assert server.error is None
    chunks = server.result
    assert b"".join(chunks) == b"".join(parts)
    assert max(len(c) for c in chunks) <= CHUNK


def test_round_trip_server_to_client(creds: Path) -> None:
    """encode --listen / decode --connect: the connecting end reads."""
    parts = [payload(2 << 20, 2), b"end"]
    server, client = connected(serve(creds, write=parts), dial(creds, write=()))
    assert server.error is None and client.error is None
    assert b"".join(client.result) == b"".join(parts)


def test_an_answer_after_the_end_of_the_wire(creds: Path) -> None:
    """finish() ends one direction only: the writer can still read the reader's answer."""

    def reader(sock: socket.socket) -> object:
        with tls.wrap_server(sock, tls.server_context(creds)) as channel:
            received = read_all(channel)
            channel.write([b"stream received"])
            channel.finish()
            return received

    def writer(sock: socket.socket) -> object:
        with tls.wrap_client(sock, tls.client_context(creds), "localhost") as channel:
            channel.write([payload(1 << 20)])
            channel.finish()
            return read_all(channel)

    server, client = connected(reader, writer)
    assert server.error is None and client.error is None
    assert b"".join(server.result) == payload(1 << 20)
    assert client.result == [b"stream received"]


def test_an_answer_that_came_before_the_end_is_not_lost(creds: Path) -> None:
    """The destination may answer before the source has ended its direction (a quick load, a
    slow source thread): finish() must not swallow that answer. It did when it sent
    close_notify, whose second SSL_shutdown read and discarded the records already there."""

    def reader(sock: socket.socket) -> object:
        with tls.wrap_server(sock, tls.server_context(creds)) as channel:
            channel.write([b"completed\n"])
            received = read_all(channel)
            channel.finish()
            return received

    def writer(sock: socket.socket) -> object:
        with tls.wrap_client(sock, tls.client_context(creds), "localhost") as channel:
            channel.write([b"the wire"])
            select.select([channel.socket], [], [], JOIN)  # the answer is here (a failsafe)
            channel.finish()
            return read_all(channel)

    server, client = connected(reader, writer)
    assert server.error is None and client.error is None
    assert server.result == [b"the wire"]
    assert b"".join(client.result) == b"completed\n"


def test_read_gathers_every_record_already_there(creds: Path) -> None:
    """Many 16 KiB records in one read, not one record per call; then a clean end."""
    parts = [b"h" * 17, payload(40 << 10), b"x" * 100, payload(50 << 10, 3)]
    sent = b"".join(parts)

    def reader(sock: socket.socket) -> object:
        with tls.wrap_server(sock, tls.server_context(creds)) as channel:
            poller = select.poll()  # the writer's FIN follows its data: all of it is here then
            poller.register(channel.socket, select.POLLRDHUP)
            assert poller.poll(JOIN * 1000)
            return channel.read(), channel.read()

    server, client = connected(reader, dial(creds, write=parts))
    assert client.error is None and server.error is None
    first, second = server.result
    assert first == sent and len(sent) > 5 * tls.RECORD
    assert second == b""


def test_the_real_pipeline_over_tls(creds: Path, tmp_path: Path) -> None:
    """encode into a TlsChannel and decode out of one, as --connect/--listen with TLS will."""
    stream = write_records(SyntheticGuest(GuestModel(ram_size=8 << 20, iterations=2)).records())
    source, sink = tmp_path / "stream", tmp_path / "out"
    source.write_bytes(stream)

    def decoding(sock: socket.socket) -> object:
        with tls.wrap_server(sock, tls.server_context(creds)) as wire, open(sink, "wb") as out:
            return trio.run(decode, wire, out.fileno())

    def encoding(sock: socket.socket) -> object:
        with tls.wrap_client(sock, tls.client_context(creds), "localhost") as wire:
            with open(source, "rb") as f:
                totals = trio.run(encode, f.fileno(), wire, [])
            wire.finish()
            return totals

    server, client = connected(decoding, encoding)
    assert client.error is None and server.error is None
    assert sink.read_bytes() == stream
    assert server.result.digest == client.result.digest


def test_one_channel_read_and_written_by_two_threads_at_once(creds: Path) -> None:
    """The two-way tunnel reads a wire's answers in one thread while another writes frames, on
    both ends, and ends its direction (finish()) while answers still come. Here each end writes
    48 MiB (frame-sized parts and small ones) and finishes in one thread while another reads
    the other end's to its end, both directions at once, byte for byte. It hung when a read
    made the socket non-blocking under a blocking sendall (SSLWantWrite)."""
    size = 48 << 20

    def both_ways(channel: tls.TlsChannel, mine: bytes) -> bytes:
        writer = End(lambda _: write_and_finish(channel, mine), socket.socket())
        writer.start()
        received = b"".join(read_all(channel))
        writer.join(JOIN)
        assert not writer.is_alive(), "the writing thread hung"
        if writer.error is not None:
            raise writer.error
        return received

    sent = {"server": random.Random(1).randbytes(size), "client": random.Random(2).randbytes(size)}

    def server_end(sock: socket.socket) -> object:
        with tls.wrap_server(sock, tls.server_context(creds)) as channel:
            return both_ways(channel, sent["server"])

    def client_end(sock: socket.socket) -> object:
        with tls.wrap_client(sock, tls.client_context(creds), "localhost") as channel:
            return both_ways(channel, sent["client"])

    server, client = connected(server_end, client_end)
    assert server.error is None and client.error is None
    assert server.result == sent["client"]
    assert client.result == sent["server"]


def write_and_finish(channel: tls.TlsChannel, data: bytes) -> None:
    """`data` as frames go out (a 17-byte header and up to 1 MiB of payload, or a short one),
    then the end of this direction."""
    view, sizes = memoryview(data), itertools.cycle([CHUNK, 300, 70 << 10, 40, CHUNK // 2])
    while view:
        size = next(sizes)
        channel.write([view[:17], view[17:size]])
        view = view[size:]
    channel.finish()


def test_a_write_the_peer_does_not_take_ends_at_the_idle_deadline(creds: Path) -> None:
    """--idle-timeout on a TLS wire: the channel's socket is non-blocking, so its sends ignore
    SO_SNDTIMEO; a write whose peer takes nothing still gives up once that deadline passed."""
    done = threading.Event()

    def still(sock: socket.socket) -> object:
        with tls.wrap_server(sock, tls.server_context(creds)):
            return done.wait(JOIN)  # connected, reading nothing

    def writer(sock: socket.socket) -> object:
        with tls.wrap_client(sock, tls.client_context(creds), "localhost") as channel:
            idle.watch(channel.socket.fileno(), 0.5, writing=True)
            try:
                with pytest.raises(IdleError) as raised:
                    while True:
                        channel.write([payload(1 << 20)])
            finally:
                done.set()
            return str(raised.value)

    server, client = connected(still, writer)
    assert server.error is None and client.error is None
    assert "the peer took nothing for 0.5 s; it is connected but not reading" in client.result


@watches_syscalls
def test_interrupt_ends_a_read_waiting_for_a_silent_peer(creds: Path) -> None:
    """A stopping pipeline wakes a TLS read as it wakes a pipe's, and the peer still connected
    is not mistaken for one that ended its stream, nor sent an alert (the client's handshake,
    still reading the server's ticket, would fail on one)."""
    finished, handshaken = threading.Event(), threading.Event()

    def reader(sock: socket.socket) -> object:
        with tls.wrap_server(sock, tls.server_context(creds)) as channel:
            waiting = threading.get_native_id()
            interrupter = threading.Thread(target=interrupt_when_blocked, args=(channel, waiting))
            interrupter.start()
            try:
                outcomes = [read_or_stopped(channel), read_or_stopped(channel)]
            finally:
                interrupter.join(JOIN)
                handshaken.wait(JOIN)  # closing before the client's handshake ended fails it
                finished.set()
            return outcomes

    def silent(sock: socket.socket) -> object:
        with tls.wrap_client(sock, tls.client_context(creds), "localhost") as channel:
            handshaken.set()
            assert finished.wait(JOIN)  # connected, saying nothing
            return channel.read()  # what the server's end brought: no alert, just the end

    server, client = connected(reader, silent)
    assert server.error is None and client.error is None
    assert server.result == ["stopped", "stopped"]
    assert client.result == b""


def interrupt_when_blocked(channel: tls.TlsChannel, thread: int) -> None:
    wait_until_blocked(os.getpid(), READ_WAITS, thread)
    channel.interrupt()


def read_or_stopped(channel: tls.TlsChannel) -> object:
    try:
        return channel.read()
    except Stopped:
        return "stopped"


# -- handshakes that must fail ------------------------------------------------------------------


def test_server_from_another_ca(creds: Path, other_ca: Path) -> None:
    server, client = connected(serve(other_ca), dial(creds))
    assert_tls_error(
        client,
        "the server certificate for localhost is not signed by the CA in",
        str(creds / "ca-cert.pem"),
    )
    assert_tls_error(
        server,
        "the connecting end (--connect) refused our certificate",
        str(other_ca / "server-cert.pem"),
        "not signed by the CA",
    )
    assert server.result is None  # nothing was read


def test_client_from_another_ca(creds: Path, other_ca: Path) -> None:
    """TLS 1.3 lets the client finish first: it must still hear the server's refusal."""
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy2(other_ca / name, creds / name)
    server, client = connected(serve(creds), dial(creds))
    assert_tls_error(
        server, "the client certificate is not signed by the CA in", str(creds / "ca-cert.pem")
    )
    assert_tls_error(
        client,
        "the listening end (--listen) refused our certificate",
        str(creds / "client-cert.pem"),
        "not signed by the CA",
    )
    assert server.result is None


def issue(
    creds: Path,
    role: tls.Role,
    names: Sequence[str] = ("localhost",),
    days=(-1, 365),
    *,
    purpose: bool = True,
) -> x509.Certificate:
    """Replace `role`'s certificate and key in `creds` with one signed by the same CA; without
    an extended key usage if not `purpose`."""
    ca_key = serialization.load_pem_private_key((creds / tlsinit.CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((creds / tls.CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = (
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        if role is tls.SERVER
        else (x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([tlsinit.san_entry(n) for n in names]), False)
    )
    if purpose:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    tlsinit.write_file(creds / role.cert, tlsinit.pem_cert(cert), 0o644, force=True)
    tlsinit.write_file(creds / role.key, tlsinit.pem_key(key), 0o600, force=True)
    return cert


def test_expired_server_certificate(creds: Path) -> None:
    issue(creds, tls.SERVER, days=(-30, -1))
    server, client = connected(serve(creds), dial(creds))
    assert_tls_error(client, "the server certificate for localhost has expired", "renew it")
    assert_tls_error(server, "refused our certificate", "it has expired")
    assert server.result is None


def test_expired_client_certificate(creds: Path) -> None:
    issue(creds, tls.CLIENT, ["source"], days=(-30, -1))
    server, client = connected(serve(creds), dial(creds))
    assert_tls_error(server, "the client certificate has expired")
    assert_tls_error(
        client, "the listening end (--listen) refused our certificate", "it has expired"
    )
    assert server.result is None


def test_hostname_mismatch(creds: Path) -> None:
    server, client = connected(serve(creds), dial(creds, "b.example"))
    assert_tls_error(
        client, "the server certificate does not carry the name b.example", "--tls-hostname"
    )
    assert_tls_error(server, "refused our certificate")
    assert server.result is None


def test_ip_address_needs_an_ip_san(creds: Path) -> None:
    """A certificate that names the host only by DNS does not vouch for its address."""
    issue(creds, tls.SERVER, ["localhost"])
    server, client = connected(serve(creds), dial(creds, "127.0.0.1"))
    assert_tls_error(client, "does not carry the IP address 127.0.0.1", "--tls-hostname")
    assert server.result is None
    issue(creds, tls.SERVER, ["localhost", "127.0.0.1"])  # tls-init --server-name may list it
    server, client = connected(serve(creds), dial(creds, "127.0.0.1"))
    assert client.error is None and server.result == [b"x"]


def test_server_name_comes_from_the_connect_address() -> None:
    assert tls.server_name("dst.example:4444", None) == "dst.example"
    assert tls.server_name("[fd00::2]:4444", None) == "fd00::2"
    assert tls.server_name("10.0.0.2:4444", "dst.example") == "dst.example"
    assert tls.server_name("unix:/run/wire.sock", "dst.example") == "dst.example"
    with pytest.raises(MigpipeError, match="UNIX socket needs --tls-hostname") as failure:
        tls.server_name("unix:/run/wire.sock", None)
    assert failure.value.status == EXIT_USAGE


def test_revoked_server_certificate(creds: Path) -> None:
    cert = issue(creds, tls.SERVER, ["localhost"])
    ca_key = serialization.load_pem_private_key((creds / tlsinit.CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((creds / tls.CA_CERT).read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    revoked = x509.RevokedCertificateBuilder(cert.serial_number, now).build()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(days=1))
        .next_update(now + datetime.timedelta(days=30))
        .add_revoked_certificate(revoked)
        .sign(ca_key, hashes.SHA256())
    )
    (creds / tls.CA_CRL).write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    server, client = connected(serve(creds), dial(creds))
    assert_tls_error(
        client, "the server certificate for localhost is revoked in", str(creds / tls.CA_CRL)
    )
    assert_tls_error(server, "refused our certificate", "revoked")
    assert server.result is None


def test_client_without_a_certificate(creds: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts the CA, has no certificate
    context.load_verify_locations(str(creds / tls.CA_CERT))
    server, client = connected(serve(creds), dial(tls.TlsContext(context, creds, tls.CLIENT)))
    assert_tls_error(server, "the client sent no certificate", "client-cert.pem")
    assert_tls_error(client, "requires a client certificate and this end sent none")
    assert server.result is None


def test_plain_client_to_a_tls_listener(creds: Path) -> None:
    """migpipe encode without --tls-creds: its wire header is not a TLS ClientHello."""

    def plain_encode(sock: socket.socket) -> object:
        sock.sendall(encode_header(()))
        return sock.recv(100)  # the listener's answer: it closes

    server, client = connected(serve(creds), plain_encode)
    assert_tls_error(
        server, "the connecting end (--connect) does not speak TLS", "without --tls-creds"
    )
    assert server.result is None
    assert client.error is not None or client.result == b""  # a reset, or an end: no reply


def test_tls_client_to_a_plain_listener(creds: Path) -> None:
    """A plain decode takes the ClientHello for a wire, finds no magic, and hangs up."""

    def plain_decode(sock: socket.socket) -> object:
        reader = WireReader()
        with pytest.raises(MigpipeError, match="bad magic"):
            reader.feed(sock.recv(1 << 16))
            reader.next_events()
        return "refused"

    server, client = connected(plain_decode, dial(creds))
    assert server.error is None and server.result == "refused"
    assert_tls_error(
        client,
        "the listening end (--listen) closed the connection during the handshake",
        "--tls-creds",
    )


def test_a_silent_listener_times_out(creds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "HANDSHAKE_TIMEOUT", 0.2)
    release = threading.Event()

    def silent(sock: socket.socket) -> object:
        return release.wait(JOIN)  # accepts, never answers, until the client gave up

    def client(sock: socket.socket) -> object:
        try:
            return dial(creds)(sock)
        finally:
            release.set()

    _, client_end = connected(silent, client)
    assert_tls_error(client_end, "no TLS handshake from the listening end (--listen) within 0.2 s")


def test_tls12_only_when_both_ends_ask(creds: Path) -> None:
    def tls12_client(sock: socket.socket) -> object:
        context = tls.client_context(creds, tls12=True)
        context.context.maximum_version = ssl.TLSVersion.TLSv1_2  # an old peer
        return dial(context)(sock)

    server, client = connected(serve(creds), tls12_client)
    for end in (server, client):
        assert_tls_error(end, "no TLS version this end accepts", "--tls12")
    assert server.result is None
    server, client = connected(serve(creds, tls12=True), tls12_client)
    assert client.error is None and client.result == "TLSv1.2"
    assert server.error is None and server.result == [b"x"]


# -- credentials that are refused before any connection --------------------------------------------


def test_private_key_readable_by_others_is_refused(creds: Path) -> None:
    (creds / "server-key.pem").chmod(0o644)
    with pytest.raises(
        MigpipeError,
        match=r"server-key.pem can be read by its group or others "
        r"\(mode 0644\); chmod 600 it",
    ):
        tls.server_context(creds)
    tls.client_context(creds)  # the client's own key is still fine


@pytest.mark.parametrize(
    ("spoil", "side", "words"),
    [
        (lambda d: (d / "ca-cert.pem").unlink(), "client", "cannot read {d}/ca-cert.pem"),
        (lambda d: (d / "client-cert.pem").unlink(), "client", "{d}/client-cert.pem is missing"),
        (lambda d: (d / "server-key.pem").unlink(), "server", "{d}/server-key.pem: No such"),
        (lambda d: (d / "ca-cert.pem").write_text("junk\n"), "server", "{d}/ca-cert.pem holds no"),
        (
            lambda d: shutil.copy2(d / "client-key.pem", d / "server-key.pem"),
            "server",
            "{d}/server-key.pem is not the key of {d}/server-cert.pem",
        ),
        (lambda d: shutil.rmtree(d), "client", "credentials directory {d} does not exist"),
    ],
)
def test_bad_credentials_are_named(creds: Path, spoil, side: str, words: str) -> None:
    spoil(creds)
    make = tls.client_context if side == "client" else tls.server_context
    with pytest.raises(MigpipeError) as failure:
        make(creds)
    assert words.format(d=creds) in str(failure.value)


# -- tls-init --------------------------------------------------------------------------------------


def test_tls_init_modes_and_instructions(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "creds"
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        result = tls_init(directory)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in tlsinit.FILES:
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), name
    assert sorted(p.name for p in directory.iterdir()) == sorted(tlsinit.FILES)  # no leftovers
    assert "listening end (--listen)" in result.stdout and "server-key.pem" in result.stdout
    assert f"keep {tlsinit.CA_KEY} off both hosts" in result.stdout
    server = x509.load_pem_x509_certificate((directory / "server-cert.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client = x509.load_pem_x509_certificate((directory / "client-cert.pem").read_bytes())
    assert client.subject.rfc4514_string() == "CN=source"


def test_tls_init_never_overwrites_without_force(made: Path, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(made, tmp_path / "creds"))
    (directory / "client-key.pem").unlink()  # even a partial set is kept
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    result = tls_init(directory)
    assert result.returncode == EXIT_USAGE
    assert "ca-cert.pem exists; tls-init never replaces credentials without --force" in (
        result.stderr
    )
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    result = tls_init(directory, "--force", "--days", "30")
    assert result.returncode == 0, result.stderr
    assert (directory / "ca-cert.pem").read_bytes() != before["ca-cert.pem"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(tlsinit.FILES)


def test_tls_init_refuses_what_is_not_a_host_name(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    argv = [
        *MIGPIPE,
        "tls-init",
        str(directory),
        "--ca",
        "CA",
        "--server-name",
        "dst,my host",
        "--client-name",
        "source host",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == EXIT_USAGE
    assert '"my host" is neither a host name nor an IP address' in result.stderr
    assert not directory.exists()


def test_tls_hostname_on_a_listener_is_a_usage_error(made: Path) -> None:
    """It names the server to check; a listener checks only the client: silently ignoring it
    would let a user believe a name is checked that is not."""
    argv = [
        *MIGPIPE,
        "decode",
        "--listen",
        "127.0.0.1:0",
        "--tls-creds",
        str(made),
        "--tls-hostname",
        "dst",
    ]
    result = subprocess.run(argv, capture_output=True, check=False)
    assert result.returncode == EXIT_USAGE
    assert b"--tls-hostname names the server to check" in result.stderr
    assert result.stderr.count(b"\n") == 1


def test_tls_peer_needs_tls_creds() -> None:
    result = subprocess.run(
        [*MIGPIPE, "decode", "--listen", "127.0.0.1:0", "--tls-peer", "src"],
        capture_output=True,
        check=False,
    )
    assert result.returncode == EXIT_USAGE
    assert b"--tls-hostname, --tls-peer and --tls12 need --tls-creds" in result.stderr


# -- who may be the other end: --tls-peer ------------------------------------------------------


def test_tls_peer_on_the_connecting_end(creds: Path) -> None:
    """The server's certificate must carry one of the names, as its CN, a DNS or an IP SAN."""
    for name in ("LOCALHOST", "127.0.0.1"):
        client = tls.client_context(creds, peers=["dst.example", name])
        server, end = connected(serve(creds), dial(client))
        assert end.error is None and server.result == [b"x"], end.error
    client = tls.client_context(creds, peers=["dst.example", "10.0.0.2"])
    server, end = connected(serve(creds), dial(client))
    assert_tls_error(
        end,
        "the server certificate carries none of the --tls-peer names "
        "(dst.example, 10.0.0.2); it carries '127.0.0.1', 'localhost'",
    )
    assert server.result == []  # the server read an end, and not one byte


def test_tls_peer_on_the_listening_end(creds: Path) -> None:
    """A client from the same CA under another name is refused after its handshake, as
    QEMU's tls-authz refuses it; a listed one is let in, by its CN alone if need be."""
    issue(creds, tls.CLIENT, ["intruder.example"])
    server, client = connected(serve(tls.server_context(creds, peers=["source"])), dial(creds))
    assert_tls_error(
        server,
        "the client certificate carries none of the --tls-peer names "
        "(source); it carries 'intruder.example'",
    )
    assert server.result is None
    issue(creds, tls.CLIENT, ["source"])
    server, client = connected(serve(tls.server_context(creds, peers=["source"])), dial(creds))
    assert client.error is None and server.result == [b"x"]


def test_a_certificate_without_extended_key_usage_serves_either_end(creds: Path) -> None:
    """RFC 5280: no extended key usage means any use. OpenSSL, GnuTLS, QEMU and libvirt take
    it so, and so does migpipe, with or without --tls-peer: the names decide who, not the EKU."""
    issue(creds, tls.CLIENT, ["source"], purpose=False)
    issue(creds, tls.SERVER, ["localhost"], purpose=False)
    server, client = connected(
        serve(tls.server_context(creds, peers=["source"])),
        dial(tls.client_context(creds, peers=["localhost"])),
    )
    assert client.error is None and server.result == [b"x"], (client.error, server.error)


# -- a TLS listener, strays, and the real source, through the CLI ---------------------------------


def stray(address: str, work: Callable[[socket.socket], object]) -> int:
    """Our port, after `work` ran on a new connection to the listener at `address` (retried
    until it is up) and saw it refused: a failed handshake, or the connection closed on it."""
    with transport.connect(address, JOIN) as sock:
        port = sock.getsockname()[1]
        with contextlib.suppress(MigpipeError, OSError):
            work(sock)
    return port


def plain_request(sock: socket.socket) -> object:
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    sock.shutdown(socket.SHUT_WR)
    return sock.recv(1 << 16)  # an alert, then the end; or a reset


def tls_client(creds: Path) -> Callable[[socket.socket], object]:
    """A TLS client with the credentials in `creds`, waiting for the end the listener gives."""
    return lambda sock: read_all(tls.wrap_client(sock, tls.client_context(creds), "localhost"))


def test_a_tls_listener_outlives_strays_and_refused_peers(
    made: Path, other_ca: Path, tmp_path: Path
) -> None:
    """A plain request, a client of another CA, and one of the same CA whose name is not a
    --tls-peer are each refused with one line; the listener goes on, and the source that
    comes next gets through, past a connection that never speaks."""
    foreign = Path(shutil.copytree(made, tmp_path / "foreign"))
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy2(other_ca / name, foreign / name)
    intruder = Path(shutil.copytree(made, tmp_path / "intruder"))
    issue(intruder, tls.CLIENT, ["intruder.example"])
    stream = write_records(SyntheticGuest(GuestModel(ram_size=4 << 20, iterations=2)).records())
    address = f"127.0.0.1:{free_port()}"
    decoder = subprocess.Popen(
        [*MIGPIPE, "decode", "--listen", address, "--tls-creds", str(made), "--tls-peer", "source"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    ports = [
        stray(address, work) for work in (plain_request, tls_client(foreign), tls_client(intruder))
    ]
    source = tmp_path / "stream"
    source.write_bytes(stream)
    with transport.connect(address, JOIN):  # silent, while the source comes and goes
        encoder = subprocess.Popen(
            [*MIGPIPE, "encode", "--tls-creds", str(made), "--connect", address, "--in", source],
            stderr=subprocess.PIPE,
        )
        out, err = decoder.communicate(timeout=JOIN)  # read as it comes: migpipe holds little
        assert encoder.wait(timeout=JOIN) == 0, encoder.stderr.read()
    assert decoder.returncode == 0, err
    assert out == stream
    reasons = [
        "TLS: the connecting end (--connect) does not speak TLS; is it running without "
        "--tls-creds?",
        f"TLS: the client certificate is not signed by the CA in {made / tls.CA_CERT}",
        "TLS: the client certificate carries none of the --tls-peer names (source); it "
        "carries 'intruder.example'",
    ]
    assert err.decode().splitlines() == [
        f"migpipe decode: refused a connection on {address} from 127.0.0.1:{port}: {reason}"
        for port, reason in zip(ports, reasons, strict=True)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
