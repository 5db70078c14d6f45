"""systemd socket activation: the listening socket a .socket unit hands `migpipe serve`.

systemd binds the socket itself (migpipe-serve.socket), starts the service at the first
connection, and passes the socket as fd 3 with LISTEN_FDS=1 and LISTEN_PID set to the
service's pid (sd_listen_fds(3)). The socket then outlives the service: a restart loses no
connection that a daemon makes meanwhile, and serve neither binds nor removes it.
"""

import os
import socket

from migpipe.errors import UsageError

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_socket() -> socket.socket | None:
    """The listening UNIX socket systemd passed this process; None when it was not started
    that way. The variables are unset, as sd_listen_fds(unset_environment=1) does, so that
    the jobs' children do not take them as theirs; fd 3 stops being inherited likewise."""
    pid, count, _ = (os.environ.pop(name, None) for name in VARIABLES)
    if pid != str(os.getpid()) or count is None:
        return None  # not for us: a parent's that leaked through, or no activation
    if count != "1":
        raise UsageError(
            f"systemd passed {count} sockets (LISTEN_FDS); migpipe serve takes one: "
            "give its .socket unit one ListenStream=PATH"
        )
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as e:
        raise UsageError(
            f"fd {LISTEN_FDS_START}, which systemd passed (LISTEN_FDS), is not a socket: "
            f"{e.strerror}"
        ) from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise UsageError(
            f"fd {LISTEN_FDS_START}, which systemd passed (LISTEN_FDS), is not a listening "
            "UNIX stream socket: give the .socket unit ListenStream=PATH"
        )
    sock.set_inheritable(False)
    return sock


def socket_path(sock: socket.socket) -> str:
    """Where `sock` is bound, as messages show it (an abstract name with its leading @)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode(errors="backslashreplace")
    return "@" + name[1:] if name.startswith("\0") else name
