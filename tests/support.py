"""What many test files share: migpipe run as a user runs it, synthetic streams, free ports.

Kept apart from conftest.py (which holds the real-QEMU fixtures) so that a test file imports
exactly the helpers it uses, by name.
"""

import shlex
import socket
import subprocess
import sys

from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest

MIGPIPE = [sys.executable, "-m", "migpipe"]  # the installed package, as `migpipe` would run it
MIGPIPE_SHELL = shlex.join(MIGPIPE)  # the same, in a shell command line (exec:, sh -c)
PAGE = 4096


def migpipe(*args: str, stdin: bytes = b"", **kwargs: object) -> subprocess.CompletedProcess:
    """`migpipe ARGS` with `stdin` as its input (empty by default, never the terminal's),
    stdout and stderr captured, whatever its exit status."""
    return subprocess.run(
        [*MIGPIPE, *args], input=stdin, capture_output=True, check=False, **kwargs
    )


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
