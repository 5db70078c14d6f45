"""`migpipe tls-init`: a small CA and the server and client certificates that migpipe's TLS needs.

The files follow the x509 layout QEMU's `tls-creds-x509` and libvirt read (see migpipe.io.tls), so
one directory can serve migpipe and QEMU alike. Keys are EC P-256, which every TLS stack takes in
TLS 1.3 and 1.2 (GnuTLS for QEMU and libvirt, OpenSSL for migpipe); Ed25519 handshakes as well
with migpipe's OpenSSL, but older peers and tools lack it.

Each file is written complete or not at all (a temporary file, written through the descriptor
that created it, synced, then renamed), private keys with mode 0600 and certificates with 0644,
into a directory only its owner can write (another writer could swap a name for a symlink and
receive a key). An existing set is never touched without --force: replacing a CA silently
would lock out every host that trusts the old one. The CA's key, needed only to sign new
certificates, can go to a directory of its own (--ca-dir), off the hosts.
"""

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migpipe.errors import (
    UsageError,
    quoted,
)
from migpipe.io import DEFAULT_CERT_DAYS
from migpipe.io.files import atomic_fd, private_directory, write_all
from migpipe.io.tls import CA_CERT, CLIENT, SERVER

CA_KEY = "ca-key.pem"
KEY_MODE, CERT_MODE = 0o600, 0o644
MAX_DAYS = 36500
FILES = (CA_CERT, CA_KEY, SERVER.cert, SERVER.key, CLIENT.cert, CLIENT.key)
HOST_FILES = tuple(name for name in FILES if name != CA_KEY)
HOST_NAME = re.compile(r"[A-Za-z0-9_*]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")  # ASCII: IDNs as xn--


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def san_entry(name: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS name SAN for a host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(name):
        raise UsageError(f"{quoted(name)} is neither a host name nor an IP address")
    return x509.DNSName(name)


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: Issued | None,
    days: int,
    extensions: Sequence[x509.ExtensionType],
    *,
    ca: bool = False,
) -> Issued:
    """A certificate for a new key, signed by `issuer` (or by itself when there is none).

    A CA may sign end-entity certificates only (path length 0) and nothing else; an end entity
    may only sign handshakes. Both limits are critical extensions, so every verifier applies them.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer = issuer.key if issuer else key
    usage = x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(subject))
        .issuer_name(issuer.cert.subject if issuer else _subject(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a peer's clock a little behind
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def make_ca(name: str, days: int) -> Issued:
    return _issue(name, None, days, [], ca=True)


def make_server(ca: Issued, names: Sequence[str], days: int) -> Issued:
    """The listening end's certificate: its first name as the CN, all of them as SANs.

    Clients check the SANs (host names as DNS names, addresses as IP addresses), not the CN.
    """
    extensions = [
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        x509.SubjectAlternativeName([san_entry(n) for n in names]),
    ]
    return _issue(names[0], ca, days, extensions)


def make_client(ca: Issued, name: str, days: int) -> Issued:
    """The connecting end's certificate; its CN is what a DN allow-list (QEMU's tls-authz) names."""
    return _issue(name, ca, days, [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """`data` under `path` with exactly `mode`, whatever the umask, complete or not at all."""
    with atomic_fd(path, force=force) as fd:
        os.fchmod(fd, mode)  # before the first byte: a key is never readable by others
        write_all(fd, data)
        os.fsync(fd)


def prepare_directory(directory: Path, names: Sequence[str], *, force: bool) -> None:
    """Create `directory` (0700) if needed, or check that only its owner, the caller, can
    write it; refuse if any of `names` is already there."""
    os.close(private_directory(directory, empty=False))
    existing = [name for name in names if os.path.lexists(directory / name)]
    if existing and not force:
        raise UsageError(
            f"{directory / existing[0]} exists; tls-init never replaces credentials "
            "without --force (hosts that trust the old CA would be locked out)",
        )


def tls_init(
    directory: Path,
    ca_name: str,
    server_names: Sequence[str],
    client_name: str,
    days: int = DEFAULT_CERT_DAYS,
    *,
    force: bool = False,
    ca_directory: Path | None = None,
) -> list[Path]:
    """Write a CA and a server and client certificate into `directory`, the CA's key into
    `ca_directory` (`directory` when None); the paths written."""
    if not server_names or not all(server_names) or not client_name:
        raise UsageError("--server-name and --client-name need a name")
    if not 1 <= days <= MAX_DAYS:
        raise UsageError(f"--days must be 1 to {MAX_DAYS}, not {days}")
    for name in server_names:
        san_entry(name)  # refuses a bad name before anything is written
    separate = ca_directory is not None and ca_directory.resolve() != directory.resolve()
    if separate:
        prepare_directory(ca_directory, (CA_KEY, CA_CERT), force=force)
    else:
        ca_directory = directory
    prepare_directory(directory, HOST_FILES if separate else FILES, force=force)
    ca = make_ca(ca_name, days)
    server = make_server(ca, server_names, days)
    client = make_client(ca, client_name, days)
    contents = {
        ca_directory / CA_KEY: (pem_key(ca.key), KEY_MODE),
        directory / SERVER.key: (pem_key(server.key), KEY_MODE),
        directory / CLIENT.key: (pem_key(client.key), KEY_MODE),
        directory / CA_CERT: (pem_cert(ca.cert), CERT_MODE),
        directory / SERVER.cert: (pem_cert(server.cert), CERT_MODE),
        directory / CLIENT.cert: (pem_cert(client.cert), CERT_MODE),
    }
    if separate:  # signing more certificates later needs both
        contents[ca_directory / CA_CERT] = (pem_cert(ca.cert), CERT_MODE)
    for path, (data, mode) in contents.items():
        write_file(path, data, mode, force=force)
    return list(contents)


def instructions(written: Sequence[Path]) -> str:
    """What to copy where, for the person who just ran tls-init (`written`: what it wrote)."""
    directory = next(path.parent for path in written if path.name == SERVER.key)

    def files(*names: str) -> str:
        return ", ".join(str(directory / name) for name in names)

    return (
        f"wrote {', '.join(map(str, written))}\n"
        f"to the {SERVER.end}, e.g. decode on the destination, copy "
        f"{files(CA_CERT, SERVER.cert, SERVER.key)} into its --tls-creds directory\n"
        f"to the {CLIENT.end}, e.g. encode on the source, copy "
        f"{files(CA_CERT, CLIENT.cert, CLIENT.key)} into its --tls-creds directory\n"
        f"keep the keys mode 0600 (scp -p does); keep {CA_KEY} off both hosts: "
        "it is needed only to sign new certificates"
    )
