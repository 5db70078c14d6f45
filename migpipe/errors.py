"""The project's error type, and the signal a stopped pipeline sends its threads.

Every failure a user can cause (bad input, a truncated stream, a wrong option) is raised as
MigpipeError, so the CLI can print one line and exit non-zero instead of a traceback.
"""

import json
from collections.abc import Iterator

# Exit statuses, one per kind of failure a script may want to tell apart (see migpipe(1)).
EXIT_ERROR = 1  # bad input or a failed operation
EXIT_USAGE = 2
EXIT_CORRUPT = 3  # the wire failed a check: checksum, frame order, totals
EXIT_TRUNCATED = 4  # the wire or stream ended early
EXIT_PEER_GONE = 5  # the other end of a pipe or connection went away
EXIT_INCOMPATIBLE = 6  # newer wire version, unknown filter
EXIT_KEY = 7  # no key, or a key that does not open the stream
EXIT_TLS = 8  # a TLS handshake failed: certificate, CA, host name, or no TLS peer
EXIT_UNCONFIRMED = 9  # migrate: QEMU completed, but whether the destination did is unknown
EXIT_IDLE = 10  # a connected peer sent or took nothing for --idle-timeout


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, in order; `exc` itself otherwise."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def printable(data: bytes) -> str:
    """Bytes from a peer or a file as a message shows them: printable ASCII as it is, any other
    byte as \\xNN, in double quotes (not Python's b'...' repr)."""
    text = "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in data)
    return f'"{text}"'


def quoted(value: object) -> str:
    """A name or value in a message: text in double quotes, any character of it that would not
    print as \\xNN or \\uNNNN (not Python's '...' repr); a number, list or null from a header
    as JSON writes it."""
    if not isinstance(value, str):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return quoted(str(value))
    return '"' + "".join(_printable_char(c) for c in value) + '"'


def _printable_char(c: str) -> str:
    if c.isprintable() and c not in '"\\':
        return c
    return f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"


class MigpipeError(Exception):
    """A failure explained for the user, with the stream offset where it was found, if any."""

    default_status = EXIT_ERROR  # each subclass below names its own

    def __init__(self, message: str, offset: int | None = None, status: int | None = None) -> None:
        super().__init__(message, offset)
        self.message = message
        self.offset = offset
        self.status = self.default_status if status is None else status

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"{self.message} (at byte offset {self.offset})"


class UsageError(MigpipeError):
    """A wrong option or combination of options (status 2)."""

    default_status = EXIT_USAGE


class CorruptError(MigpipeError):
    """Input that failed a check: a checksum, an order, a total, a malformed header (3)."""

    default_status = EXIT_CORRUPT


class TruncatedError(MigpipeError):
    """Input that ended early (4)."""

    default_status = EXIT_TRUNCATED


class PeerGoneError(MigpipeError):
    """The other end of a pipe or connection went away, or never came (5)."""

    default_status = EXIT_PEER_GONE


class IdleError(PeerGoneError):
    """A peer still connected that sent (or took) nothing for --idle-timeout (10)."""

    default_status = EXIT_IDLE


class IncompatibleError(MigpipeError):
    """Input of a version, flag, filter or parameter this migpipe does not take (6)."""

    default_status = EXIT_INCOMPATIBLE


class SecretError(MigpipeError):
    """No key, the wrong key, or input a key was given for that is not sealed with it (7)."""

    default_status = EXIT_KEY


class TlsError(MigpipeError):
    """A TLS handshake or peer check failed (8)."""

    default_status = EXIT_TLS


class UnconfirmedError(MigpipeError):
    """QEMU completed a migration, but whether the destination did is unknown (9)."""

    default_status = EXIT_UNCONFIRMED


class Stopped(Exception):
    """Raised in a pipeline thread that was told to stop (another stage failed, or the task was
    cancelled) while it waited: in the data plane's queue, or in a read from its peer. The
    thread ends without an error of its own; the cause is reported by whoever stopped it."""
