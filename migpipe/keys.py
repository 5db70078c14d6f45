"""The user's secret: a key file, or a passphrase, from a file, a descriptor or the terminal.

Secrets never come from argv or the environment (both are visible to other users through /proc)
and are never logged. A key or passphrase file that its group or others can read is refused, as
ssh refuses such private keys: a migration stream holds a guest's whole memory.

Key files hold one line `migpipe-key-v1:` + 32 random bytes in unpadded base64url; lines starting
with '#' are comments. `migpipe keygen` writes them with mode 0600.
"""

import base64
import contextlib
import datetime
import getpass
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from migpipe.errors import (
    MigpipeError,
    SecretError,
    UsageError,
)
from migpipe.io.files import (
    NameTaken,
    atomic_fd,
    check_directories_up,
    read_private_fd,
    read_private_file,
    write_all,
)

KEY_PREFIX = "migpipe-key-v1:"
KEY_SIZE = 32


@dataclass(frozen=True)
class UserKey:
    """What the user holds: a 32-byte key (kind 'key') or a passphrase (kind 'passphrase')."""

    kind: str
    secret: bytes = field(repr=False)


@dataclass
class Secrets:
    """Where the user's secret comes from; read once, and only when a filter asks for it."""

    key_file: str | None = None
    key_fd: int | None = None
    passphrase_file: str | None = None
    passphrase_fd: int | None = None
    ask_passphrase: bool = False
    confirm: bool = False  # ask twice (encode/save: a typo would make the stream unreadable)
    # A secret given to a reading end means the input must be sealed with it (see sealing_required).
    allow_unencrypted: bool = False
    # The most scrypt work (log2 N) a header may ask of a passphrase's reader; None: the
    # filter's own ceiling. The service lowers it: its jobs share one host.
    max_scrypt_log_n: int | None = None
    _cached: UserKey | None = field(default=None, repr=False)

    @property
    def given(self) -> bool:
        """Whether the user named a secret at all (it is read only when a filter needs it)."""
        sources = (self.key_file, self.key_fd, self.passphrase_file, self.passphrase_fd)
        return self.ask_passphrase or any(source is not None for source in sources)

    @property
    def sealing_required(self) -> bool:
        """A reader given a key refuses input not sealed with it: otherwise whoever can write
        the wire or the file could hand the destination any guest (a downgrade), and the key
        would protect nothing. --allow-unencrypted is the explicit way out for mixed fleets."""
        return self.given and not self.allow_unencrypted

    def check_sealed(self, sealed: bool, what: str) -> None:
        """Refuse `what` (the input, a file) when it is not sealed but must be; before one
        byte of it reaches QEMU."""
        if self.sealing_required and not sealed:
            raise SecretError(
                f"{what} is not encrypted, but a key was given: refused, since anyone could have "
                "written it (--allow-unencrypted accepts it)",
            )

    def user_key(self, purpose: str) -> UserKey:
        """The secret, or a clear error naming the options that give one."""
        if self._cached is None:
            self._cached = self._load(purpose)
        return self._cached

    def _load(self, purpose: str) -> UserKey:
        if self.key_file is not None:
            return parse_key(read_private_file(self.key_file, "key file"), self.key_file)
        if self.key_fd is not None:
            return parse_key(read_private_fd(self.key_fd, "--key-fd"), f"fd {self.key_fd}")
        if self.passphrase_file is not None:
            text = read_private_file(self.passphrase_file, "passphrase file")
            return passphrase(text, self.passphrase_file)
        if self.passphrase_fd is not None:
            text = read_private_fd(self.passphrase_fd, "--passphrase-fd")
            return passphrase(text, f"fd {self.passphrase_fd}")
        if self.ask_passphrase:
            return passphrase(self._prompt(), "the terminal")
        raise SecretError(
            f"{purpose} needs a key: give --key-file FILE, --key-fd N, --passphrase-file FILE, "
            "--passphrase-fd N or --ask-passphrase",
        )

    def _prompt(self) -> bytes:
        try:
            text = getpass.getpass("migpipe passphrase: ")
            if self.confirm and getpass.getpass("migpipe passphrase (again): ") != text:
                raise UsageError("the passphrases do not match")
        except EOFError:
            raise UsageError("no passphrase given") from None
        return text.encode()


def parse_key(data: bytes, where: str) -> UserKey:
    """The key on the first line that is not a comment; a key of one byte repeated (a zeroed
    file, a placeholder) is refused: it is not random, so it protects nothing."""
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(KEY_PREFIX):
            encoded = line[len(KEY_PREFIX) :]
            key = b""
            with contextlib.suppress(ValueError):
                key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            if len(key) == KEY_SIZE and len(set(key)) == 1:
                raise MigpipeError(
                    f"{where} holds no random key (all its bytes are 0x{key[0]:02x}); "
                    "make one with `migpipe keygen`"
                )
            if len(key) == KEY_SIZE:
                return UserKey("key", key)
        break
    raise MigpipeError(f"{where} is not a migpipe key file (make one with `migpipe keygen`)")


def passphrase(data: bytes, where: str) -> UserKey:
    """The first line, without its line ending; an empty passphrase is refused."""
    text = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not text:
        raise MigpipeError(f"the passphrase from {where} is empty")
    return UserKey("passphrase", text)


def format_key(key: bytes) -> str:
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    encoded = base64.urlsafe_b64encode(key).decode().rstrip("=")
    return f"# migpipe key, created {created}\n{KEY_PREFIX}{encoded}\n"


def keygen(path: Path) -> None:
    """Write a new random key to `path`, mode 0600, complete or not at all, never replacing.

    The key is written to a private temporary file, synced, then hard-linked into place (and
    only so): link() fails if the name exists, so an existing key (and every stream it
    protects) is never lost. A directory where reading the key would be refused (see
    read_private_file) is refused first, and the file is made in that very directory.
    """
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MigpipeError(f"cannot create {path}: {e.strerror}") from None
    try:
        check_directories_up(dir_fd, f"key file {path}")
        with atomic_fd(path, dir_fd=dir_fd, link_only=True) as fd:
            write_all(fd, format_key(secrets.token_bytes(KEY_SIZE)).encode())
            os.fsync(fd)
    except NameTaken:
        raise MigpipeError(f"{path} exists; keygen never replaces a key") from None
    except OSError as e:
        raise MigpipeError(f"cannot create {path}: {e.strerror}") from None
    finally:
        os.close(dir_fd)
