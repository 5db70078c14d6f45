"""Everything that touches a file descriptor: channels over fds (channel), atomic and private
files (files), O_DIRECT (direct), TCP and UNIX sockets (transport), TLS (tls) and its
credentials (tlsinit)."""

DEFAULT_CERT_DAYS = 1095  # tls-init's certificates, three years (here: the CLI reads it)
