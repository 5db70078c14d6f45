"""What many test files share: migpipe run as a user runs it, synthetic streams, free ports.

Kept apart from conftest.py (which holds the real-QEMU fixtures) so that a test file imports
exactly the helpers it uses, by name.
"""

import shlex
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import IO

from migpipe.errors import MigpipeError
from migpipe.keys import Secrets
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest

MIGPIPE = [sys.executable, "-m", "migpipe"]  # the installed package, as `migpipe` would run it
MIGPIPE_SHELL = shlex.join(MIGPIPE)  # the same, in a shell command line (exec:, sh -c)
PAGE = 4096


def migpipe(
    *args: str, stdin: bytes | IO[bytes] = b"", **kwargs: object
) -> subprocess.CompletedProcess:
    """`migpipe ARGS` reading `stdin`, bytes or an open file (empty by default, never the
    terminal's), stdout and stderr captured, whatever its exit status."""
    given = {"input": stdin} if isinstance(stdin, bytes | bytearray) else {"stdin": stdin}
    return subprocess.run([*MIGPIPE, *args], capture_output=True, check=False, **given, **kwargs)


def synthetic_stream(
    ram_size: int, iterations: int, dirty_share: float = 0.3, seed: int = 7
) -> bytes:
    """A synthetic precopy stream, deterministic from its arguments."""
    model = GuestModel(ram_size=ram_size, iterations=iterations, dirty_share=dirty_share, seed=seed)
    return write_records(SyntheticGuest(model).records())


def free_port() -> str:
    """127.0.0.1:PORT with a port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def decode_wire(chunks: Iterable[bytes], secrets: Secrets) -> tuple[bytes, MigpipeError | None]:
    """What decode would write of a wire handed over in `chunks`, in-process through the sans-IO
    decoder, and the error that stopped it (None when it completed)."""
    from migpipe.tunnel.pipeline import decode_chunks  # trio's: only for the files that decode

    out = bytearray()
    try:
        for piece in decode_chunks(chunks, secrets):
            out += piece
    except MigpipeError as e:
        return bytes(out), e
    return bytes(out), None
