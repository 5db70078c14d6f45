"""TLS for the wire's connection: mutual x509 authentication, and a Channel that is fast enough.

Credentials live in one directory, in the layout QEMU's `tls-creds-x509` and libvirt use, so an
existing /etc/pki/qemu can serve: `ca-cert.pem` (the CA that both ends trust), optional
`ca-crl.pem` (revoked certificates), `server-cert.pem`/`server-key.pem` for the listening end
and `client-cert.pem`/`client-key.pem` for the connecting end. `migpipe tls-init` makes a set.

Both ends verify each other: a migration stream is a guest's whole memory, so the listener must
know who sends it as surely as the sender must know who receives it. TLS 1.3 only, unless both
ends ask for 1.2 (then forward-secret AEAD suites only). Private keys that their group or
others can read are refused, as ssh refuses them.

A CA vouches for every host it signed (libvirt's /etc/pki/qemu CA typically signs them all), so
`--tls-peer NAME` narrows who may be the other end, as QEMU's tls-authz does: after the
handshake, the peer certificate's subject CN or one of its DNS or IP subject alternative names
must be one of the names. A certificate without an extended key usage is valid for both ends,
as RFC 5280 says and OpenSSL, GnuTLS, QEMU and libvirt agree; with one, it must name the use.

Every handshake failure becomes one MigpipeError line saying what to fix, with status EXIT_TLS.
The data moves through the standard library's ssl module in the pipeline's worker threads,
which release the GIL inside OpenSSL: the two directions and the filters use both cores, where
trio's SSLStream (one task doing everything) measured three to four times slower here.
"""

import contextlib
import errno
import functools
import ipaddress
import select
import socket
import ssl
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from migpipe.errors import (
    CorruptError,
    MigpipeError,
    PeerGoneError,
    TlsError,
    UsageError,
)
from migpipe.io import idle
from migpipe.io.channel import CHUNK, Readable
from migpipe.io.files import read_private_file
from migpipe.io.transport import parse_endpoint

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
HANDSHAKE_TIMEOUT = 30.0  # a peer that accepted the connection but never speaks TLS
RECORD = 16 << 10  # the most plaintext one TLS record carries, so one SSL_read returns
COALESCE = 64 << 10  # parts smaller than this are joined before SSL_write: one record, not many
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.3's own suites are all AEAD already


@dataclass(frozen=True)
class Role:
    """One end's certificate and key file names, and what the other end calls it."""

    name: str
    cert: str
    key: str
    end: str


SERVER = Role("server", "server-cert.pem", "server-key.pem", "listening end (--listen)")
CLIENT = Role("client", "client-cert.pem", "client-key.pem", "connecting end (--connect)")


@dataclass(frozen=True)
class TlsContext:
    """An ssl context with the directory its files came from, so messages can name them, and
    the names the other end's certificate must carry one of (--tls-peer; none: any)."""

    context: ssl.SSLContext
    directory: Path
    role: Role
    peers: tuple[str, ...] = ()


def client_context(
    creds_dir: Path, *, tls12: bool = False, peers: Sequence[str] = ()
) -> TlsContext:
    """For --connect: verifies the server against ca-cert.pem, presents client-cert.pem."""
    return _context(Path(creds_dir), CLIENT, tls12, peers)


def server_context(
    creds_dir: Path, *, tls12: bool = False, peers: Sequence[str] = ()
) -> TlsContext:
    """For --listen: presents server-cert.pem, requires a client certificate from the CA."""
    return _context(Path(creds_dir), SERVER, tls12, peers)


def _context(directory: Path, role: Role, tls12: bool, peers: Sequence[str]) -> TlsContext:
    if not directory.is_dir():
        raise MigpipeError(
            f"TLS: credentials directory {directory} does not exist "
            "(make one with `migpipe tls-init`)"
        )
    protocol = ssl.PROTOCOL_TLS_CLIENT if role is CLIENT else ssl.PROTOCOL_TLS_SERVER
    context = ssl.SSLContext(protocol)  # the client one checks host names
    context.verify_mode = ssl.CERT_REQUIRED  # on the server: mutual authentication
    context.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12 else ssl.TLSVersion.TLSv1_3
    context.options |= ssl.OP_NO_RENEGOTIATION
    # A direction that ends without close_notify (TlsChannel.finish while the other is being
    # read) ends that direction only, as close_notify would: OpenSSL 3 would otherwise make it
    # a fatal decode_error for both. The wire's own checks judge where the stream ended.
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if tls12:
        context.set_ciphers(TLS12_CIPHERS)
    if role is SERVER:
        context.num_tickets = 1  # the client waits for it: see _await_acceptance
    _load(context.load_verify_locations, directory / CA_CERT, "CA certificate")
    crl = directory / CA_CRL
    if crl.exists():
        _load(context.load_verify_locations, crl, "certificate revocation list")
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    _load_identity(context, directory, role)
    return TlsContext(context, directory, role, tuple(peers))


def _load(load, path: Path, what: str) -> None:
    try:
        load(str(path))
    except OSError as e:
        if isinstance(e, ssl.SSLError):
            raise MigpipeError(f"TLS: {path} holds no valid PEM {what} ({_reason(e)})") from None
        raise MigpipeError(f"TLS: cannot read {path}: {e.strerror}") from None


def _load_identity(context: ssl.SSLContext, directory: Path, role: Role) -> None:
    """This end's certificate and its key; the key must be private and unencrypted."""
    cert, key = directory / role.cert, directory / role.key
    if not cert.exists():
        raise MigpipeError(
            f"TLS: {cert} is missing: the {role.end} needs its own certificate and key"
        )
    data = read_private_file(str(key), "TLS private key")
    if b"ENCRYPTED" in data:  # OpenSSL would ask for a passphrase on the terminal
        raise MigpipeError(f"TLS: private key {key} is encrypted; migpipe needs it unencrypted")
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            message = f"TLS: {key} is not the key of {cert}"
        else:
            message = f"TLS: {cert} and {key} are not a PEM certificate and key ({_reason(e)})"
        raise MigpipeError(message) from None
    except OSError as e:
        raise MigpipeError(f"TLS: cannot read {cert}: {e.strerror}") from None


def server_name(connect: str, tls_hostname: str | None) -> str:
    """The name the server's certificate must carry: --tls-hostname, else the --connect host.

    A host given as an IP address must be in the certificate as an IP address SAN; over a UNIX
    socket there is no host, so --tls-hostname is required.
    """
    if tls_hostname:
        return tls_hostname
    if connect.startswith("unix:"):
        raise UsageError(
            "TLS over a UNIX socket needs --tls-hostname NAME (a name in the server certificate)",
        )
    _, (host, _) = parse_endpoint(connect, listening=False)
    return host or "localhost"  # where ":PORT" connects


def wrap_client(sock: socket.socket, tls: TlsContext, hostname: str) -> "TlsChannel":
    """TLS over a connected socket, as the client; returns once the server accepted us.

    The socket's descriptor passes to the returned channel (the ssl module detaches it from
    `sock`), which closes it when closed or used as a context manager.
    """
    wrap = tls.context.wrap_socket
    ssl_sock = wrap(sock, server_hostname=hostname, do_handshake_on_connect=False)
    with _closed_on_error(ssl_sock):
        early = _handshake(ssl_sock, tls, hostname)
        check_peer(ssl_sock, tls)
    return TlsChannel(ssl_sock, early)


def admit(sock: socket.socket, tls: TlsContext) -> Generator[int, None, ssl.SSLSocket]:
    """The listening end's handshake and --tls-peer check, as a gate of transport.listen: one
    step per poll, so that the listener checks other connections meanwhile. A failure is
    handshake_error's line; a TimeoutError thrown in becomes one too.

    The check comes after the handshake, as QEMU's tls-authz does: the ssl module has no
    verify callback. The refused client sees the connection closed after its handshake.
    """
    sock.setblocking(False)
    ssl_sock = tls.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    with _closed_on_error(ssl_sock):
        while True:
            try:
                ssl_sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            except (OSError, EOFError) as e:
                raise handshake_error(e, tls, None) from None
            try:
                yield events
            except TimeoutError as e:
                raise handshake_error(e, tls, None) from None
        check_peer(ssl_sock, tls)
        ssl_sock.setblocking(True)
    return ssl_sock


def wrap_server(sock: socket.socket, tls: TlsContext) -> "TlsChannel":
    """admit() on a socket accepted by other means, waiting: returns once the client is
    verified, or raises handshake_error's line."""
    steps = admit(sock, tls)
    fd = sock.fileno()  # admit() moves it to its SSLSocket
    poller = select.poll()
    try:
        events = next(steps)
        while True:
            poller.register(fd, events)
            if poller.poll(HANDSHAKE_TIMEOUT * 1000):
                events = next(steps)
            else:
                events = steps.throw(TimeoutError(errno.ETIMEDOUT, "no handshake"))
    except StopIteration as done:
        return TlsChannel(done.value)


def check_peer(ssl_sock: ssl.SSLSocket, tls: TlsContext) -> None:
    """--tls-peer: the other end's certificate must carry one of the names, as its subject CN
    or as a DNS or IP subject alternative name. Names are compared exactly (DNS names without
    regard to case, IP addresses by value): a wildcard certificate matches only its pattern."""
    if not tls.peers:
        return
    carried = certificate_names(ssl_sock.getpeercert() or {})
    if carried & {_normal(name) for name in tls.peers}:
        return
    other = CLIENT if tls.role is SERVER else SERVER
    shown = ", ".join(repr(name) for name in sorted(carried)) or "no name"
    raise TlsError(
        f"TLS: the {other.name} certificate carries none of the --tls-peer names "
        f"({', '.join(tls.peers)}); it carries {shown}",
    )


def certificate_names(cert: dict) -> set[str]:
    """The subject CNs and the DNS and IP subject alternative names of a verified certificate,
    as the ssl module decodes it, normalised for comparison."""
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {v for kind, v in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")}
    return {_normal(name) for name in names}


def _normal(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


@contextlib.contextmanager
def _closed_on_error(ssl_sock: ssl.SSLSocket):
    try:
        yield
    except BaseException:
        ssl_sock.close()
        raise


def _handshake(ssl_sock: ssl.SSLSocket, tls: TlsContext, host: str) -> bytes:
    """Run the client's handshake, bounded by HANDSHAKE_TIMEOUT; the application data that came
    with it."""
    ssl_sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        ssl_sock.do_handshake()
        early = _await_acceptance(ssl_sock)
    except (OSError, EOFError) as e:
        raise handshake_error(e, tls, host) from None
    ssl_sock.settimeout(None)
    return early


def _await_acceptance(ssl_sock: ssl.SSLSocket) -> bytes:
    """Wait until the server has accepted our certificate; the application data read meanwhile.

    In TLS 1.3 the client's handshake ends before the server has checked the client's
    certificate, so a refusal would only show up as a reset at some later write. The server
    sends its session ticket only after the check passed (migpipe's server sends exactly one),
    so waiting for the ticket turns a refusal into the server's alert, read here.
    """
    if ssl_sock.version() != "TLSv1.3":
        return b""  # TLS 1.2: the server's Finished, already read, came after the check
    received = bytearray()
    poller = select.poll()
    poller.register(ssl_sock, select.POLLIN)
    ssl_sock.setblocking(False)
    try:
        while not (ssl_sock.session and ssl_sock.session.has_ticket):
            if not poller.poll(HANDSHAKE_TIMEOUT * 1000):
                raise TimeoutError(errno.ETIMEDOUT, "no session ticket")
            with contextlib.suppress(ssl.SSLWantReadError):
                data = ssl_sock.recv(CHUNK)
                if not data:
                    raise EOFError("the server closed the connection after the handshake")
                received += data
    finally:
        ssl_sock.setblocking(True)
    return bytes(received)


# -- telling the user what went wrong ----------------------------------------------------------

# OpenSSL's verify codes (X509_V_ERR_*) for a certificate that no trusted CA signed.
UNTRUSTED = {2, 7, 18, 19, 20, 21, 24, 25, 30}
EXPIRED, NOT_YET_VALID, REVOKED, INVALID_PURPOSE = 10, 9, 23, 26
CRL_PROBLEMS = {3, 11, 12}  # no CRL from that CA, CRL not valid yet, CRL expired
HOSTNAME_MISMATCH, IP_MISMATCH = 62, 64
# What OpenSSL says when the bytes it reads are not TLS records.
NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "UNKNOWN_PROTOCOL",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "RECORD_LENGTH_MISMATCH",
}
OLD_PROTOCOL = {
    "UNSUPPORTED_PROTOCOL",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "NO_PROTOCOLS_AVAILABLE",
    "WRONG_SSL_VERSION",
    "VERSION_TOO_LOW",
}
# The alerts by which the other end refuses our certificate, and what each means.
REFUSED = {
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by the CA that end trusts",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired (or a clock is wrong)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked in that end's CRL",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it is not for the host name that end expects",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "its key usage does not allow this use",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "that end could not verify it",
}


def _reason(e: ssl.SSLError) -> str:
    return e.reason or e.strerror or str(e)


def handshake_error(e: BaseException, tls: TlsContext, host: str | None) -> MigpipeError:
    """One line naming what failed in a handshake, and what to change; `host` on the client."""
    return TlsError(f"TLS: {_explain(e, tls, host)}")


def _explain(e: BaseException, tls: TlsContext, host: str | None) -> str:
    d, own = tls.directory, tls.role
    other = CLIENT if own is SERVER else SERVER
    if isinstance(e, ssl.SSLCertVerificationError):
        return _explain_verify(e, d, other, host)
    reason = e.reason if isinstance(e, ssl.SSLError) else None
    if reason in REFUSED:
        return f"the {other.end} refused our certificate {d / own.cert}: {REFUSED[reason]}"
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return f"the {other.end} requires a client certificate and this end sent none"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return (
            f"the client sent no certificate; the {CLIENT.end} needs {CLIENT.cert} and "
            f"{CLIENT.key} in its --tls-creds directory"
        )
    if reason in NOT_TLS:
        return f"the {other.end} does not speak TLS; is it running without --tls-creds?"
    if reason in OLD_PROTOCOL:
        return (
            "the other end offers no TLS version this end accepts: TLS 1.3, or 1.2 when "
            "both ends pass --tls12"
        )
    if isinstance(e, TimeoutError):
        return (
            f"no TLS handshake from the {other.end} within {HANDSHAKE_TIMEOUT:g} s; "
            "is it running without --tls-creds?"
        )
    if isinstance(e, EOFError | ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
        return (
            f"the {other.end} closed the connection during the handshake: it runs without "
            "--tls-creds, or it refused our certificate (its own message says why)"
        )
    if isinstance(e, ssl.SSLError):
        return f"handshake failed: {_reason(e)}"
    return f"handshake failed: {getattr(e, 'strerror', None) or e}"


def _explain_verify(e: ssl.SSLCertVerificationError, d: Path, other: Role, host: str | None) -> str:
    """Why the other end's certificate failed verification."""
    code = e.verify_code
    whose = f"the {other.name} certificate" + (f" for {host}" if host else "")
    if code in UNTRUSTED:
        return f"{whose} is not signed by the CA in {d / CA_CERT}"
    if code in (EXPIRED, NOT_YET_VALID):
        state = "has expired" if code == EXPIRED else "is not valid yet"
        return f"{whose} {state}; renew it (`migpipe tls-init`), or fix the clock that is wrong"
    if code == REVOKED:
        return f"{whose} is revoked in {d / CA_CRL}"
    if code in CRL_PROBLEMS:
        return f"{d / CA_CRL} cannot vouch for {whose} ({e.verify_message}); update the CRL"
    if code in (HOSTNAME_MISMATCH, IP_MISMATCH):
        kind = "IP address" if code == IP_MISMATCH else "name"
        return (
            f"the {other.name} certificate does not carry the {kind} {host}; connect by a "
            "name it carries, give --tls-hostname NAME, or reissue it with this one"
        )
    if code == INVALID_PURPOSE:
        return f"{whose} is not made for a TLS {other.name} (its extended key usage)"
    return f"{whose} was refused: {e.verify_message}"


# -- the data --------------------------------------------------------------------------------------


class TlsChannel:
    """The wire's connection over TLS, a Channel (see migpipe.io.channel): a Source, and a
    Sink that can finish; one thread may read while another writes (the two-way tunnel's answer
    direction is read while frames go out).

    OpenSSL's SSL object must not see two calls at once (QEMU's #1937 was that bug with
    GnuTLS), and a blocking call would hold it while it waits for the peer. So the socket stays
    non-blocking, one lock is held around each SSL call only, and the waiting for the socket
    is done outside it by poll: a read's by Readable (interrupt() ends it, the read deadline
    bounds it), a write's for POLLOUT within the write deadline. A call that OpenSSL says wants
    to read or write is retried, after that wait, with the same buffer.

    One SSL_read returns at most one 16 KiB record, so read() gathers every record already
    there into up to CHUNK bytes and waits only for the first: the pipeline then hands a
    thread one call per MiB rather than one per record, and gets a buffer nobody else holds.
    write() joins runs of small parts (a frame's QEMU bytes may come in many short pieces) so
    that they travel as full records, as FdChannel's writev sends them in one call.

    finish(), the Sink's, ends the writing direction with close_notify (not while the other
    direction is being read: see finish). The wire's own trailer already catches a connection
    cut short, so a reader accepts an end without close_notify and leaves the verdict to the
    trailer; close_notify only makes a clean end explicit.
    """

    def __init__(self, ssl_sock: ssl.SSLSocket, early: bytes = b"") -> None:
        self.socket = ssl_sock
        self._early = bytearray(early)  # data read in the handshake's wait, or by finish()
        self._fd = ssl_sock.fileno()
        self._readable = Readable(self._fd)
        self._lock = threading.Lock()  # held around each SSL call, never across a wait
        self._both_ended = False  # both close_notify crossed: the socket is no longer TLS's
        self._reading = False  # read() was called and has not returned the end yet
        ssl_sock.setblocking(False)

    def __enter__(self) -> "TlsChannel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def interrupt(self) -> None:
        """End a read that waits for the peer's next record, or for the rest of one, without
        touching the TLS state (a read that saw its own socket shut would make OpenSSL send
        the peer an alert)."""
        self._readable.interrupt()

    def read(self) -> bytes | bytearray:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        self._reading = True
        try:
            length = self._ssl(self._recv, view)
            if length:
                length += self._gather(view[length:], self._lock)
        except ssl.SSLZeroReturnError:
            length = 0  # close_notify, or a plain end (OP_IGNORE_UNEXPECTED_EOF)
        except ssl.SSLError as e:
            raise _data_error(e, "reading") from None
        except ConnectionResetError as e:
            message = f"TLS connection reset by the peer while reading ({e.strerror})"
            raise PeerGoneError(message) from None
        finally:
            view.release()
        self._reading = length > 0
        del buffer[length:]
        return buffer  # nobody else holds it: as good as bytes, without a 1 MiB copy

    def _recv(self, view: memoryview) -> int:
        """Under the lock: into `view`, what finish() kept first, else OpenSSL's next record;
        0 at the end."""
        if self._early:
            length = min(len(self._early), len(view))
            view[:length] = self._early[:length]
            del self._early[:length]
            return length
        if self._both_ended:
            return 0
        return self.socket.recv_into(view)

    def _gather(self, view: memoryview, lock: contextlib.AbstractContextManager) -> int:
        """Read the records already there into `view`, without waiting for more, taking
        `lock` around each (the channel's, or none when the caller holds it)."""
        length = 0
        try:
            while len(view) - length >= RECORD:
                with lock:
                    got = self._recv(view[length:])
                if not got:
                    break
                length += got
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError):
            pass  # nothing more has arrived yet, or the end: the next read() tells
        return length

    def write(self, parts: Sequence[bytes | memoryview]) -> None:
        try:
            small = bytearray()
            for part in parts:
                if len(part) < COALESCE:
                    small += part
                    continue
                if small:
                    self._send(small)
                    small = bytearray()  # not clear(): a view of it may linger in a traceback
                self._send(part)
            if small:
                self._send(small)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            message = "TLS connection closed by the reader (broken pipe)"
            raise PeerGoneError(message) from None
        except ssl.SSLError as e:
            raise _data_error(e, "writing") from None

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """All of `data`, in as many SSL_write calls as OpenSSL needs."""
        view = memoryview(data)
        while view:
            view = view[self._ssl(self.socket.send, view) :]

    def _ssl(self, call: Callable[[memoryview], int], view: memoryview) -> int:
        """One SSL call under the lock, repeated with the same buffer (as OpenSSL requires)
        once the socket is readable or writable, as the call said it wants, waiting outside
        the lock so that the other direction's calls go on meanwhile."""
        while True:
            with self._lock:
                try:
                    return call(view)
                except ssl.SSLWantReadError:
                    wait = self._readable.wait
                except ssl.SSLWantWriteError:
                    wait = self._await_writable
            wait()

    def _await_writable(self) -> None:
        """Wait until the socket takes bytes, no longer than its --idle-timeout (SO_SNDTIMEO,
        which a non-blocking socket's sends ignore), as FdChannel's blocking writev does."""
        if not self._writable(self._write_deadline):
            raise idle.stalled(self._fd, idle.peer(self._fd))

    @functools.cached_property
    def _write_deadline(self) -> int | None:
        """The socket's write deadline in ms, looked up at the first wait (the wire's owner
        sets it after the handshake) rather than at each, a few system calls apiece."""
        return idle.write_deadline(self._fd)

    def _writable(self, timeout: int | None) -> bool:
        """Whether the socket takes bytes within `timeout` ms (None: for ever)."""
        poller = select.poll()  # one per wait: a reader that must write may wait at once
        poller.register(self._fd, select.POLLOUT)
        return bool(poller.poll(timeout))

    def finish(self) -> None:
        """Send close_notify and end our direction (the peer's read then ends cleanly).

        Only close_notify is sent: waiting for the peer's would hang on a reader that, like
        migpipe's, just closes. The other direction stays open, so an answer can still be
        read. Errors are ignored, as the peer may be gone already.

        While the other direction is being read (the two-way tunnel's answers, in another
        thread: read() was called and has not returned the end), ours ends without
        close_notify: records that arrive while Python's ssl sends it would be discarded (see
        _keep_what_came), and there they may come at any time. The peer reads a plain end,
        which the wire's own checks judge, as the reader of a connection cut short does.
        """
        with contextlib.suppress(OSError):
            self._send_close_notify()
        with contextlib.suppress(OSError):  # not SSLSocket.shutdown, which ends reading TLS too
            socket.socket.shutdown(self.socket, socket.SHUT_WR)

    def _keep_what_came(self) -> None:
        """Under the lock, just before close_notify goes out: take the records the peer
        already sent (the destination's verdict, if it answered quickly) for the next read():
        Python's ssl sends close_notify by running SSL_shutdown twice, and the second run
        reads the peer's records and discards their data."""
        buffer = bytearray(CHUNK)
        with memoryview(buffer) as view:
            length = self._gather(view, contextlib.nullcontext())
        self._early += buffer[:length]

    def _send_close_notify(self) -> None:
        while True:
            with self._lock:
                if self._both_ended or self._reading:  # a second finish(), or see finish()
                    return
                self._keep_what_came()
                try:
                    self.socket.unwrap()  # sends close_notify, then wants the peer's
                    self._both_ended = True  # the peer's came already: reads end here
                    return
                except ssl.SSLWantReadError:
                    return  # ours is sent; the peer's is not awaited
                except ssl.SSLWantWriteError:
                    pass
            if not self._writable(round(HANDSHAKE_TIMEOUT * 1000)):
                return  # the reader stopped reading: the trailer was sent anyway

    def close(self) -> None:
        self.socket.close()


def _data_error(e: ssl.SSLError, doing: str) -> MigpipeError:
    if e.reason in REFUSED:  # a TLS 1.3 refusal that came after the handshake
        message = f"TLS: the other end refused our certificate: {REFUSED[e.reason]}"
        return TlsError(message)
    if e.reason == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC":
        message = "TLS: a record failed its integrity check: the connection was tampered with"
        return CorruptError(message)
    return PeerGoneError(f"TLS error while {doing}: {_reason(e)}")
