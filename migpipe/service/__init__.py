"""migpipe serve: its sans-IO protocol (protocol), the server (server) and the client library
daemons use (client). Specified in migpipe-serve(1).

The limits the command line shows live here, where it can read them without importing the
server (and trio with it)."""

DEFAULT_MAX_JOBS = 64
DEFAULT_MAX_CONNECTIONS = 128  # each may hold DEFAULT_MAX_FDS, and fds for a line it has not ended
DEFAULT_MAX_FDS = 64  # named fds that one connection may hold
