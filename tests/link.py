"""A network link for QEMU's socket migrations in tests: relays, limits the rate, records, cuts.

Link(listen, target) listens on `unix:PATH` or `HOST:PORT` and connects every connection it
accepts to `target`, in the order accepted (QEMU 7.2's destination takes the first connection as
the main stream), then relays both directions. Like one physical link it limits all connections
together in one direction, the forward one (accepted -> target), with a token bucket of ~1 ms
granularity (rate=None: unlimited). It can record each connection's bytes per direction into
files (RECORD/N.fwd, RECORD/N.back, N counting accepted connections from 0), and cut() breaks
every connection at once, as a failed link would (postcopy recovery), and goes on accepting.

Run as a command with --rate (`python tests/link.py --rate BYTES [--record FILE]`), it is the
same link as one stage of a shell pipeline: stdin to stdout at that rate, paced every ~1 ms,
recording what it relays into FILE. A test keeps the wire so rather than with `tee` before the
link: tee's pipe out is 64 KiB that no user's pipeline has, which at xbzrle's expansion is tens
of MB of QEMU's pages still to cross when QEMU stops the guest. `pv -L` paces
in 100 ms slots, so a last write that finds its slot spent waits up to 100 ms, which no real
link of that rate adds to a guest's pause.

The relay runs in a child process, not in threads of the test: copying hundreds of MB/s and
waking every millisecond to pace them would hold the test's GIL, and a test that parses a
capture or waits on QMP would in turn delay the pacing. The child has an interpreter of its
own and takes commands on its stdin, one line each, answering on its stdout ("cut N", the
connections and "closed"); an end of its stdin (the test died) ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

TICK = 0.001  # the bucket's granularity: a burst is this much time's worth of bytes
CHUNK = 256 << 10  # bytes relayed per call when the rate does not ask for less
REPLY_TIMEOUT = 30.0  # failsafe for the child's answers, never a wait


@dataclass(frozen=True)
class Relayed:
    """What one connection carried: its bytes forward (to the target) and back."""

    index: int
    forward: int
    back: int


class Link:
    """The parent's handle on the relay process (a context manager that ends it)."""

    def __init__(
        self,
        listen: str,
        target: str,
        *,
        rate: float | None = None,
        record: Path | None = None,
    ) -> None:
        self.listen, self.target, self.rate, self.record = listen, target, rate, record
        self.address = listen  # where it listens, its port filled in once started
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Link:
        cmd = [sys.executable, __file__, "--listen", self.listen, "--target", self.target]
        if self.rate is not None:
            cmd += ["--rate", repr(float(self.rate))]
        if self.record is not None:
            Path(self.record).mkdir(parents=True, exist_ok=True)
            cmd += ["--record", str(self.record)]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.address = self._reply("listening")
        return self

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            if exc_info[0] is None:
                self.close()
            else:
                self._proc.kill()
                self._proc.wait()

    def cut(self) -> int:
        """Break every open connection (both ends see their peer go); how many there were.
        Returns once they are all closed; new connections are accepted as before."""
        self._send("cut")
        return int(self._reply("cut"))

    def close(self, timeout: float = 10.0) -> list[Relayed]:
        """Stop accepting, let open connections end by themselves for up to `timeout` seconds
        (then cut them), and return what each connection carried, in accept order. The
        recordings are complete when this returns."""
        self._send(f"close {timeout}")
        relayed = []
        while (line := self._reply("conn", "closed")) != "":
            index, forward, back = map(int, line.split())
            relayed.append(Relayed(index, forward, back))
        assert self._proc is not None
        self._proc.wait(REPLY_TIMEOUT)
        return relayed

    def _send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def _reply(self, *words: str) -> str:
        """The rest of the child's next line, which must start with one of `words`."""
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], REPLY_TIMEOUT)
        line = self._proc.stdout.readline() if ready else ""
        word, _, rest = line.strip().partition(" ")
        if word not in words:
            self._proc.kill()
            raise RuntimeError(f"link: expected {' or '.join(words)}, got {line!r}")
        return rest


# -- the child process ------------------------------------------------------------------------


class TokenBucket:
    """Paces the bytes of every forward direction together: `rate` bytes a second on average,
    bursts of at most TICK seconds' worth. Bytes taken run up a debt that drains at `rate`, down
    to half a tick's credit; a taker that brings it past half a tick waits until it is paid, so
    several connections share the rate in the order they asked. Waiting only then, not at every
    read, halves the link's own CPU when it reads a small pipe thousands of times a second: on
    two cores that CPU is taken from the destination QEMU loading the guest's last pages."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = rate * TICK
        self.chunk = max(1, min(CHUNK, int(self.burst)))
        self._debt = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            drained = self._debt - (now - self._last) * self.rate
            self._debt = max(-self.burst / 2, drained) + size
            self._last = now
            debt = self._debt
        if debt > self.burst / 2:
            time.sleep(debt / self.rate)


class Connection:
    """One accepted connection and its target, relayed by two threads (one a direction)."""

    def __init__(
        self,
        index: int,
        near: socket.socket,
        far: socket.socket,
        bucket: TokenBucket | None,
        record: Path | None,
    ) -> None:
        self.index = index
        self.sockets = (near, far)
        self.counts = [0, 0]
        files: list[IO[bytes] | None] = [None, None]
        if record is not None:
            files = [open(record / f"{index}.{way}", "wb") for way in ("fwd", "back")]  # noqa: SIM115
        self.threads = [
            threading.Thread(target=self._pump, args=(0, near, far, bucket, files[0]), daemon=True),
            threading.Thread(target=self._pump, args=(1, far, near, None, files[1]), daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _pump(
        self,
        way: int,
        src: socket.socket,
        dst: socket.socket,
        bucket: TokenBucket | None,
        file: IO[bytes] | None,
    ) -> None:
        chunk = bucket.chunk if bucket is not None else CHUNK
        try:
            while data := src.recv(chunk):
                if bucket is not None:
                    bucket.take(len(data))
                dst.sendall(data)
                if file is not None:
                    file.write(data)
                self.counts[way] += len(data)
            dst.shutdown(socket.SHUT_WR)  # pass the end of this direction on
        except OSError:
            self.cut()  # one side failed: the whole connection goes, as on a real link
        finally:
            if file is not None:
                file.close()

    def cut(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for both directions to end; whether they did. Closes the sockets once so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self.threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self.threads):
            return False
        for sock in self.sockets:
            sock.close()
        return True


def _socket(spec: str, *, listening: bool) -> socket.socket:
    """A listening or connected socket for `unix:PATH`, `HOST:PORT` or `[V6]:PORT` (port 0
    listens on a free port)."""
    if spec.startswith("unix:"):
        family, address = socket.AF_UNIX, spec[5:]
    else:
        host, _, port = spec.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        family, address = (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    if listening:
        if family == socket.AF_UNIX:
            Path(str(address)).unlink(missing_ok=True)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    else:
        sock.connect(address)
        _no_delay(sock)
    return sock


def _no_delay(sock: socket.socket) -> None:
    """No Nagle delay on TCP: the link must not hold back a return path's small messages."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _shown(sock: socket.socket, spec: str) -> str:
    if sock.family == socket.AF_UNIX:
        return spec
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Relay:
    """The child: accepts, connects, relays; obeys cut and close."""

    def __init__(self, listener: socket.socket, args: argparse.Namespace) -> None:
        self.listener = listener
        self.target = args.target
        self.bucket = TokenBucket(args.rate) if args.rate else None
        self.record = Path(args.record) if args.record else None
        self.lock = threading.Lock()
        self.open: list[Connection] = []
        self.done: list[Connection] = []
        self.accepted = 0
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return  # closed: close's doing
            _no_delay(near)
            try:
                far = _socket(self.target, listening=False)
            except OSError as exc:
                print(f"link: cannot connect to {self.target}: {exc}", file=sys.stderr)
                near.close()
                continue
            with self.lock:
                self.open.append(Connection(self.accepted, near, far, self.bucket, self.record))
                self.accepted += 1

    def _settle(self) -> list[Connection]:
        """Move the connections that ended from open to done; the open ones left."""
        with self.lock:
            ended = [c for c in self.open if c.join(0)]
            self.open = [c for c in self.open if c not in ended]
            self.done += ended
            return list(self.open)

    def cut(self) -> int:
        with self.lock:
            victims = list(self.open)
        for connection in victims:
            connection.cut()
        for connection in victims:
            connection.join()
        self._settle()
        return len(victims)

    def close(self, timeout: float) -> list[Connection]:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.acceptor.join()
        deadline = time.monotonic() + timeout
        for connection in self._settle():
            connection.join(max(0.0, deadline - time.monotonic()))
        self.cut()
        return sorted(self.done, key=lambda c: c.index)


def _pipe(rate: float, record: Path | None) -> NoReturn:
    """stdin to stdout at RATE, as a pipeline stage, into RECORD too; then out at once.

    The end passes on as soon as it comes, as a link passes a connection's end, and the
    process leaves without Python's finalization: its ~12 ms of CPU would fall in the guest's
    pause, taken from the destination QEMU loading the last pages, where a real link spends none.
    """
    bucket = TokenBucket(rate)
    src, dst = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    with open(record or os.devnull, "wb", buffering=1 << 20) as file:
        while data := os.read(src, bucket.chunk):
            bucket.take(len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
            file.write(data)
        os.close(dst)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", help="without it: relay stdin to stdout at --rate")
    parser.add_argument("--target")
    parser.add_argument("--rate", type=float, help="bytes a second, forward, all connections")
    parser.add_argument(
        "--record", help="directory for each connection's bytes (a pipeline stage: a file)"
    )
    args = parser.parse_args()
    if args.listen is None:
        if args.rate is None or args.target:
            parser.error("a pipeline stage takes --rate and --record alone")
        _pipe(args.rate, Path(args.record) if args.record else None)
    if args.target is None:
        parser.error("--listen needs --target")
    listener = _socket(args.listen, listening=True)
    relay = Relay(listener, args)
    print("listening", _shown(listener, args.listen), flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "cut":
            print("cut", relay.cut(), flush=True)
        elif command == "close":
            for c in relay.close(float(arg)):
                print("conn", c.index, *c.counts, flush=True)
            print("closed", flush=True)
            return


if __name__ == "__main__":
    main()
