"""migpipe-serve.socket: systemd socket activation of `migpipe serve`, as systemd does it.

The listening socket is made here (systemd's part) and handed to serve as fd 3 with
LISTEN_FDS=1 and LISTEN_PID set to serve's own pid (a launcher that sets them and execs
keeps its pid), or by systemd-socket-activate, systemd's own tool for it. serve must
use that socket, leave it in place when it stops, and a daemon that connects between two
starts must be served by the next one instead of being refused.
"""

import configparser
import contextlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import MIGPIPE, migpipe

from migpipe.service import client as service_client

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
BIN = Path(MIGPIPE[0]).parent  # this venv's, where its migpipe is installed
TIMEOUT = 30.0
# systemd's part between fork and exec: the socket on fd 3, the variables naming our pid
SYSTEMD = """import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


def unit(name: str) -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(interpolation=None, strict=False)
    parsed.optionxform = str  # systemd's keys are case-sensitive
    parsed.read(CONTRIB / name)
    return parsed


def listening(path: Path) -> socket.socket:
    """What systemd makes of ListenStream=PATH: a bound, listening UNIX socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


@contextlib.contextmanager
def activated(sock: socket.socket, *args: str) -> Iterator[subprocess.Popen]:
    """`migpipe serve ARGS` started as systemd starts a socket-activated service; stopped
    with SIGTERM, as `systemctl stop` does, if the test has not."""
    server = subprocess.Popen(
        [sys.executable, "-c", SYSTEMD, str(sock.fileno()), *MIGPIPE, "serve", *args],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        server.communicate(timeout=TIMEOUT)


def stop(server: subprocess.Popen) -> str:
    """SIGTERM, as `systemctl stop` sends; serve's stderr, once it exited 0."""
    server.send_signal(signal.SIGTERM)
    _, err = server.communicate(timeout=TIMEOUT)
    assert server.returncode == 0, err
    return err


def test_the_socket_unit_listens_where_the_service_serves() -> None:
    service, sockets = unit("migpipe-serve.service"), unit("migpipe-serve.socket")
    argv = shlex.split(service["Service"]["ExecStart"])
    assert argv[argv.index("--socket") + 1] == sockets["Socket"]["ListenStream"]
    assert sockets["Socket"]["SocketMode"] == "0600"  # serve's own mode without --allow-uid
    # systemd would remove the RuntimeDirectory, and the socket in it, when serve stops
    assert service["Service"]["RuntimeDirectoryPreserve"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_socket_and_its_service(tmp_path: Path) -> None:
    """Both units as installed, side by side (verify checks that the socket has its
    service), the service's ExecStart pointed at this venv's migpipe."""
    service = (CONTRIB / "migpipe-serve.service").read_text()
    (tmp_path / "migpipe-serve.service").write_text(
        service.replace("ExecStart=/usr/local/bin/migpipe", f"ExecStart={BIN / 'migpipe'}")
    )
    shutil.copy(CONTRIB / "migpipe-serve.socket", tmp_path)
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(tmp_path.iterdir())],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    assert "migpipe-serve" not in verified.stderr, verified.stderr


def test_serve_takes_its_socket_from_systemd_and_leaves_it_for_the_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "serve.sock"
    ready = f"migpipe serve: listening on {path} (from systemd)\n"
    with listening(path) as sock:
        with activated(sock, "--socket", str(path)) as server:
            assert server.stdout.readline() == ready
            with service_client.connect(str(path), TIMEOUT) as session:
                assert session.query_jobs() == []
            assert stop(server) == ""
        assert path.is_socket()  # systemd's, not removed by serve
        # A daemon connecting while no serve runs waits in the backlog...
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.connect(str(path))
        with activated(sock) as server:  # ...for the next start (no --socket: systemd's)
            assert server.stdout.readline() == ready
            with service_client.Client(waiting, TIMEOUT) as session:
                assert session.query_jobs() == []
            assert stop(server) == ""


def test_serve_refuses_a_socket_other_than_the_one_it_is_told(tmp_path: Path) -> None:
    path = tmp_path / "serve.sock"
    with listening(path) as sock, activated(sock, "--socket", str(tmp_path / "other")) as server:
        _, err = server.communicate(timeout=TIMEOUT)
    assert server.returncode == 2
    assert err == (
        f"migpipe serve: error: --socket {tmp_path / 'other'} is not the socket systemd passed"
        f" ({path}): make the .socket unit's ListenStream= and --socket name one path\n"
    )


def test_serve_without_a_socket_says_where_it_takes_one() -> None:
    result = migpipe("serve")
    assert result.returncode == 2
    assert b"serve needs --socket PATH, or a socket from systemd" in result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="no systemd-socket-activate"
)
def test_systemd_socket_activate_starts_serve_at_the_first_connection(tmp_path: Path) -> None:
    path = tmp_path / "serve.sock"
    server = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), *MIGPIPE, "serve", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr.readline() == f"Listening on {path} as 3.\n"
        with service_client.connect(str(path), TIMEOUT) as session:  # starts serve
            assert session.query_jobs() == []
        assert server.stdout.readline() == f"migpipe serve: listening on {path} (from systemd)\n"
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=TIMEOUT)
    assert server.returncode == 0
