"""keygen, tls-init, serve and demo: keys and certificates, the service, the built-in example."""

import argparse
from pathlib import Path

from migpipe.cli.command import Command
from migpipe.cli.options import config_option, idle_option, size_argument
from migpipe.errors import UsageError
from migpipe.io import DEFAULT_CERT_DAYS
from migpipe.running import run_trio
from migpipe.service import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_JOBS


def register(command: Command) -> None:
    keygen = command("keygen", cmd_keygen, "Write a new random key file (mode 0600) for encrypt.")
    keygen.add_argument("file", type=Path, help="where to write it; never replaces a file")

    tls_init = command(
        "tls-init", cmd_tls_init, "Make a CA and the server and client certificates for TLS."
    )
    tls_init.add_argument("directory", type=Path, help="where to write them (created 0700)")
    tls_init.add_argument("--ca", required=True, metavar="NAME", help="the CA's common name")
    tls_init.add_argument(
        "--server-name",
        required=True,
        metavar="NAME[,NAME...]",
        help="the listening host's DNS names and IP addresses",
    )
    tls_init.add_argument(
        "--client-name", required=True, metavar="NAME", help="the connecting host's name"
    )
    tls_init.add_argument(
        "--days", type=int, default=DEFAULT_CERT_DAYS, help="validity in days (%(default)s)"
    )
    tls_init.add_argument("--force", action="store_true", help="replace existing credentials")
    tls_init.add_argument(
        "--ca-dir",
        type=Path,
        metavar="DIR",
        help="put ca-key.pem (and ca-cert.pem) here, off the hosts",
    )

    serve = command(
        "serve", cmd_serve, "Run encode and decode jobs on fds that daemons pass over a socket."
    )
    serve.add_argument(
        "--socket",
        metavar="PATH",
        help="the UNIX socket to listen on (mode 0600); "
        "under systemd socket activation, the one it passed",
    )
    serve.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="also serve this uid (repeatable; the socket becomes 0666 and SO_PEERCRED decides)",
    )
    serve.add_argument(
        "--max-jobs",
        type=int,
        default=DEFAULT_MAX_JOBS,
        metavar="N",
        help="jobs running at once, over all connections (%(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="clients served at once; more are refused (%(default)s)",
    )
    serve.add_argument(
        "--max-jobs-per-uid",
        type=int,
        metavar="N",
        help="jobs one uid may run at once (half of --max-jobs with --allow-uid, else all)",
    )
    serve.add_argument(
        "--max-connections-per-uid",
        type=int,
        metavar="N",
        help="clients of one uid served at once (half of --max-connections "
        "with --allow-uid, else all)",
    )
    idle_option(serve)
    config_option(serve)  # its idle-timeout, from [serve] or [migpipe]
    demo = command(
        "demo", cmd_demo, "Run the built-in example: a synthetic guest through migpipe, checked."
    )
    demo.add_argument("--size", type=size_argument, default="256M", help="guest RAM (%(default)s)")
    demo.add_argument("--iterations", type=int, default=4, help="precopy passes (%(default)s)")
    demo.add_argument("--seed", type=int, default=1)


def cmd_keygen(args: argparse.Namespace) -> int:
    from migpipe.keys import keygen

    keygen(args.file)
    print(f"wrote {args.file} (mode 0600); copy it to the other end the way you copy ssh keys")
    return 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    from migpipe.io.tlsinit import instructions, tls_init

    names = [name.strip() for name in args.server_name.split(",")]
    written = tls_init(
        args.directory,
        args.ca,
        names,
        args.client_name,
        args.days,
        force=args.force,
        ca_directory=args.ca_dir,
    )
    print(instructions(written))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from migpipe.service.activation import inherited_socket, socket_path
    from migpipe.service.server import Service, run

    inherited = inherited_socket()
    path, whence = args.socket, ""
    if inherited is not None:
        path, whence = socket_path(inherited), " (from systemd)"
        if args.socket is not None and Path(args.socket) != Path(path):
            raise UsageError(
                f"--socket {args.socket} is not the socket systemd passed ({path}): "
                "make the .socket unit's ListenStream= and --socket name one path"
            )
    elif path is None:
        raise UsageError("serve needs --socket PATH, or a socket from systemd (LISTEN_FDS)")

    def ready() -> None:  # after the socket is in place: a supervisor may connect now
        print(f"migpipe serve: listening on {path}{whence}", flush=True)

    limits = ("max_jobs", "max_connections", "max_jobs_per_uid", "max_connections_per_uid")
    given = {name: getattr(args, name) for name in limits if getattr(args, name) is not None}
    service = Service(allow_uids=args.allow_uid, idle_timeout=args.idle_timeout, **given)
    run_trio(run, Path(path), service, ready, inherited)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from migpipe.tools.demo import run_demo

    return run_demo(args.size, args.iterations, args.seed)
