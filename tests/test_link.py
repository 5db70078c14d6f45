"""tests/link.py, the link the socket-migration tests run QEMU through, with real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from link import Link

Handler = Callable[[socket.socket, int], None]  # a connection and its place in accept order


class Target:
    """A UNIX listener that hands each connection, in accept order, to a thread of its own."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.spec = f"unix:{path}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._handler = handler
        self._threads: list[threading.Thread] = []
        self._accepted = threading.Condition()
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._accepted:
                index = len(self._threads)
                thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
                thread.start()
                self._threads.append(thread)
                self._accepted.notify_all()

    def _serve(self, conn: socket.socket, index: int) -> None:
        with conn:
            try:
                self._handler(conn, index)
            except BaseException as exc:  # reported by join()
                self.errors.append(exc)

    def join(self, count: int) -> None:
        """Wait until `count` connections have been served; raise what a handler raised."""
        with self._accepted:  # the link connects to us as it accepts, maybe not yet
            self._accepted.wait_for(lambda: len(self._threads) >= count, 30)
        for thread in self._threads[:count]:
            thread.join(30)
        assert len(self._threads) >= count
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def connect(spec: str) -> socket.socket:
    if spec.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(spec[5:])
    else:
        host, _, port = spec.rpartition(":")
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(30)
    return sock


def test_relays_both_directions_in_order_and_records_them(tmp_path: Path) -> None:
    """Three connections, each 3 MB forward and 1 MB back: every byte arrives in order on the
    connection it was sent on, the target accepts them in the order the link did, and the
    recordings and the counts are those bytes."""
    forward = [os.urandom(3 << 20) for _ in range(3)]
    back = [os.urandom(1 << 20) for _ in range(3)]
    arrived: list[tuple[int, bytes]] = []

    def echo(conn: socket.socket, _: int) -> None:
        data = recv_all(conn)
        index = data[0]
        arrived.append((index, data[1:]))
        conn.sendall(back[index])

    target = Target(tmp_path / "target.sock", echo)
    with Link(f"unix:{tmp_path}/link.sock", target.spec, record=tmp_path / "rec") as link:
        clients = [connect(link.address) for _ in range(3)]
        for index, client in enumerate(clients):
            client.sendall(bytes([index]) + forward[index])
            client.shutdown(socket.SHUT_WR)
        replies = [recv_all(client) for client in clients]
        relayed = link.close()
    target.join(3)
    target.close()
    assert sorted(arrived) == [(i, forward[i]) for i in range(3)]
    assert replies == back
    assert [(r.index, r.forward, r.back) for r in relayed] == [
        (i, 1 + (3 << 20), 1 << 20) for i in range(3)
    ]
    for i in range(3):
        assert (tmp_path / "rec" / f"{i}.fwd").read_bytes() == bytes([i]) + forward[i]
        assert (tmp_path / "rec" / f"{i}.back").read_bytes() == back[i]


def test_accept_order_is_the_targets(tmp_path: Path) -> None:
    """Connections made at once reach the target in the order the link accepted them
    (QEMU 7.2's destination takes its first connection as the main stream)."""
    target = Target(tmp_path / "t.sock", lambda conn, index: conn.sendall(bytes([index])))
    with Link(f"unix:{tmp_path}/l.sock", target.spec) as link:
        clients = [connect(link.address) for _ in range(8)]
        answers = [recv_all(client) for client in clients]
        for client in clients:
            client.close()
        link.close()
    target.close()
    assert answers == [bytes([i]) for i in range(8)]


def test_rate_is_shared_by_all_connections(tmp_path: Path) -> None:
    """At 4 MB/s, two connections sending 2 MB each at once take about a second together,
    not half of one: the limit is the link's, not each connection's."""
    rate, each = 4_000_000, 2_000_000
    done: list[float] = []

    def sink(conn: socket.socket, _: int) -> None:
        assert len(recv_all(conn)) == each
        done.append(time.monotonic())

    target = Target(tmp_path / "t.sock", sink)
    with Link(f"unix:{tmp_path}/l.sock", target.spec, rate=rate) as link:
        clients = [connect(link.address) for _ in range(2)]
        start = time.monotonic()
        senders = [
            threading.Thread(target=lambda c=c: (c.sendall(bytes(each)), c.shutdown(1)))
            for c in clients
        ]
        for sender in senders:
            sender.start()
        target.join(2)
        elapsed = max(done) - start
        for sender in senders:
            sender.join()
        link.close()
    target.close()
    assert 0.8 < elapsed < 1.6, f"4 MB at 4 MB/s took {elapsed:.2f} s"
    assert min(done) - start > 0.6, "one connection finished early: the rate is not shared"


def test_cut_breaks_every_connection_and_accepts_new_ones(tmp_path: Path) -> None:
    """cut() ends both sides of every open connection at once (each sees its peer go) and
    the link takes new connections after it."""
    ended = threading.Barrier(3, timeout=30)

    def held(conn: socket.socket, index: int) -> None:
        conn.sendall(b"hello")
        assert recv_exact(conn, 6) == b"before"
        conn.sendall(b"ok")
        assert recv_all(conn) == b""  # the first two: the cut, not the client, ends them
        if index < 2:
            ended.wait()

    def exchange(client: socket.socket) -> None:
        """Both directions relayed, end to end: the connection is up, nothing in flight."""
        assert recv_exact(client, 5) == b"hello"
        client.sendall(b"before")
        assert recv_exact(client, 2) == b"ok"

    target = Target(tmp_path / "t.sock", held)
    with Link(f"unix:{tmp_path}/l.sock", target.spec, record=tmp_path / "rec") as link:
        clients = [connect(link.address) for _ in range(2)]
        for client in clients:
            exchange(client)
        assert link.cut() == 2
        ended.wait()  # both target sides saw the end
        for client in clients:
            assert recv_all(client) == b""
        assert link.cut() == 0
        again = connect(link.address)
        exchange(again)
        again.shutdown(socket.SHUT_WR)
        assert recv_all(again) == b""
        relayed = link.close()
    target.join(3)
    target.close()
    assert [(r.forward, r.back) for r in relayed] == [(6, 7)] * 3


def test_tcp_listener_reports_its_port(tmp_path: Path) -> None:
    """HOST:0 listens on a free port, which the link reports."""
    target = Target(tmp_path / "t.sock", lambda conn, _: conn.sendall(recv_all(conn)[::-1]))
    with Link("127.0.0.1:0", target.spec) as link:
        host, _, port = link.address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        client = connect(link.address)
        client.sendall(b"abc")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"cba"
        link.close()
    target.close()


def test_a_refusing_target_closes_the_connection(tmp_path: Path) -> None:
    """With nothing listening at the target, an accepted connection is closed at once (its
    client sees the end) and the link goes on accepting."""
    with Link(f"unix:{tmp_path}/l.sock", f"unix:{tmp_path}/nobody.sock") as link:
        for _ in range(2):
            client = connect(link.address)
            assert recv_all(client) == b""
            client.close()
        assert link.close() == []


def test_a_pipeline_stage_relays_stdin_to_stdout_and_records_it(tmp_path: Path) -> None:
    """As one stage of a shell pipeline (the convergence tests' link): what comes in goes out
    whole and in order, and --record keeps the same bytes (the wire, without a tee stage)."""
    data = os.urandom(3 << 20)
    record = tmp_path / "wire"
    stage = [sys.executable, str(Path(__file__).parent / "link.py"), "--rate", "1e9"]
    stage += ["--record", str(record)]
    done = subprocess.run(stage, input=data, capture_output=True, check=True, timeout=30)
    assert done.stdout == data
    assert record.read_bytes() == data
