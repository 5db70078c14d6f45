"""`migpipe migrate --qmp` and `migpipe incoming --qmp` driving two real QEMU 7.2 processes.

migpipe holds each QEMU's second QMP monitor (a UNIX socket) and passes it one end of a pipe with
`getfd`, as libvirt does; the harness keeps its own monitor to watch events and pace the guest's
convergence. The oracle is what the source sent: here QEMU writes straight into migpipe, so the
test keeps a copy of the wire instead, and decodes it afterwards. Decode checks what it rebuilds
against the digest encode took of QEMU's bytes, so the decoded copy is the source's stream, and
tests/oracle.py replays it independently of migpipe's parser.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import oracle
import pytest
import qemuvm
import trio
from support import MIGPIPE, free_port

from migpipe.errors import (
    EXIT_KEY,
    EXIT_PEER_GONE,
    EXIT_TRUNCATED,
    EXIT_UNCONFIRMED,
    MigpipeError,
)
from migpipe.io.tlsinit import tls_init
from migpipe.io.transport import connect
from migpipe.qemu.qmp import QmpProtocol

TIMEOUT = qemuvm.MIGRATION_TIMEOUT  # failsafes only: every wait below ends on an event
FINAL = ("completed", "failed", "cancelled")
SWITCHOVER = "avail-switchover-bandwidth"  # QEMU 8.2+


class Migpipe:
    """A migpipe command run in the background; killed if the test leaves it running."""

    def __init__(self, *args: str | Path) -> None:
        self.process = subprocess.Popen(
            [*MIGPIPE, *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # kill() reaches the commands it runs, which share stderr
        )

    def finish(self) -> tuple[int, str]:
        """Exit status and stderr, once it has exited."""
        _, err = self.process.communicate(timeout=TIMEOUT)
        return self.process.returncode, err.decode()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=TIMEOUT)


@contextlib.contextmanager
def running(*commands: Migpipe) -> Iterator[None]:
    try:
        yield
    finally:
        for command in commands:
            if command.process.poll() is None:
                command.kill()


@contextlib.contextmanager
def destination(
    workdir: Path, qmp_socket: Path, name: str, qemu: qemuvm.QemuBuild = qemuvm.QEMU_7_2
) -> Iterator[qemuvm.Vm]:
    """A paused destination waiting with `-incoming defer`, for migpipe to start the load."""
    args = ["-S", "-incoming", "defer", *qemuvm.qmp_socket_args(qmp_socket)]
    with qemuvm.Vm(workdir, name, args, qemu=qemu) as vm:
        yield vm


def _copy(source: socket.socket, sink: socket.socket, record: Path | None) -> None:
    with open(record or "/dev/null", "wb") as copy:
        while data := source.recv(1 << 20):
            sink.sendall(data)
            copy.write(data)
    sink.shutdown(socket.SHUT_WR)  # pass the half-close on: decode needs the wire's end


@contextlib.contextmanager
def recording_relay(upstream: str, record: Path) -> Iterator[str]:
    """A TCP relay to `upstream`: yields the address to connect to instead, and keeps a copy of
    the bytes flowing upstream (the wire) in `record`; the answer flows back untouched."""
    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"

    def relay() -> None:
        with server:
            down, _ = server.accept()
        with down, connect(upstream, TIMEOUT) as up:
            back = threading.Thread(target=_copy, args=(up, down, None))
            back.start()
            _copy(down, up, record)
            back.join()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    yield address
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def pace(src: qemuvm.Vm, pacing: qemuvm.Pacing, ready: Callable[[], bool] | None = None) -> str:
    """Follow on the harness's monitor a migration that migpipe drives, doing the pacing's part
    (raise the downtime limit at its switch-over pass, as run_migration does, or at a later
    pass once `ready()` says so); QEMU's final status."""
    return paced(src, pacing, ready)["data"]["status"]


def paced(
    src: qemuvm.Vm, pacing: qemuvm.Pacing, ready: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """pace(), returning QEMU's final MIGRATION event."""
    deadline = time.monotonic() + TIMEOUT
    switched = False
    while True:
        event = src.qmp.wait_event(
            ("MIGRATION", "MIGRATION_PASS"), timeout=deadline - time.monotonic()
        )
        if event["event"] == "MIGRATION_PASS":
            due = event["data"]["pass"] >= (pacing.switchover_pass or 0)
            if not switched and due and (ready is None or ready()):
                src.qmp.execute(
                    "migrate-set-parameters", **{"downtime-limit": pacing.final_downtime_ms}
                )
                switched = True
        elif event["data"]["status"] in FINAL:
            return event


def sent_stream(wire: Path, workdir: Path) -> oracle.Replay:
    """The oracle's replay of the QEMU stream a saved wire carried (decoded by migpipe, which
    checks it against the source's digest)."""
    stream = workdir / f"{wire.name}.stream"
    decode = [*MIGPIPE, "decode", "--in", str(wire), "--out", str(stream)]
    subprocess.run(decode, check=True, timeout=TIMEOUT)
    return oracle.replay(stream)


def driven_source(
    guest_elf: Path, workdir: Path, qemu: qemuvm.QemuBuild = qemuvm.QEMU_7_2
) -> AbstractContextManager[qemuvm.Vm]:
    """A source VM whose guest dirties memory, with a QMP socket for migpipe at WORKDIR/src.qmp."""
    qmp = qemuvm.qmp_socket_args(workdir / "src.qmp")
    return qemuvm.source_vm(guest_elf, "dirty", workdir, args=qmp, qemu=qemu)


def start_migrate(workdir: Path, *args: str | Path) -> Migpipe:
    """`migpipe migrate` from the driven source in workdir."""
    return Migpipe("migrate", "--qmp", workdir / "src.qmp", *args)


def test_migrate_to_incoming_over_tcp(guest_elf: Path, tmp_path: Path) -> None:
    dst_qmp, wire = tmp_path / "dst.qmp", tmp_path / "wire"
    listen = free_port()
    out_stats, in_stats = tmp_path / "migrate.json", tmp_path / "incoming.json"
    with (
        destination(tmp_path, dst_qmp, "dest") as dest,
        driven_source(guest_elf, tmp_path) as src,
        recording_relay(listen, wire) as relay,
    ):
        incoming = Migpipe(
            "incoming", "--qmp", dst_qmp, "--listen", listen, "--stats-json", in_stats
        )
        migrate = start_migrate(
            tmp_path, "--filters", "xbzrle,zstd", "--connect", relay, "--stats-json", out_stats
        )
        with running(incoming, migrate):
            assert pace(src, qemuvm.PACINGS["dirty"]) == "completed"
            status, err = migrate.finish()
            assert status == 0, err
            status, in_err = incoming.finish()
            assert status == 0, in_err
        assert src.qmp.execute("query-status")["status"] == "postmigrate"
        assert dest.qmp.execute("query-status")["status"] == "paused"
        memory = dest.pmemsave(tmp_path / "dest.mem")

    replay = sent_stream(wire, tmp_path)
    assert replay.pages_resent > 0  # a live, multi-pass migration
    assert oracle.first_difference(memory, replay.image) is None
    sent, received = json.loads(out_stats.read_text()), json.loads(in_stats.read_text())
    assert sent["qemu_bytes"] == received["qemu_bytes"] == (tmp_path / "wire.stream").stat().st_size
    assert sent["qemu_digest"] == received["qemu_digest"]
    assert sent["wire_bytes"] == wire.stat().st_size == received["wire_bytes"]
    assert sent["qemu"]["status"] == "completed"
    assert sent["qemu"]["ram"]["dirty-sync-count"] >= 3
    assert sent["destination"] == {"status": "completed", "error": "", "sealed": False}
    assert received["runstate"] == "paused"
    assert "downtime" in err and "destination: completed" in err and "ratio" in err


#: How far migpipe's real pause may lie from the one the harness takes from both VMs' events on
#: this host. Both read the same clocks (QMP stamps: the wall clock; migpipe ages each stamp on
#: arrival to its monotonic clock), and migpipe's total does not depend on when either side
#: timed the wire's end, so what is left is what migpipe counts and the events do not: the
#: verdict's way back where it is not measured (a command: a pipe's wake-up), and two
#: wake-ups, of the destination's thread between timing the verdict and sending it and of the
#: source's reader, which wait for a CPU on a 2-CPU host where two QEMUs and the other migpipe
#: are winding down. Measured over TCP and a command on 7.2 and 10.0: 0.05-0.4 ms in most
#: runs, 2-3 ms now and then, 6 and 9 ms once each in ~80 while other jobs loaded the host.
#: Only the measured one-way time can make migpipe's figure short: microseconds on loopback.
#: The early bound catches a part left out (the link's or the destination's: here 0-10 ms).
PAUSE_LATE_MS = 15.0
PAUSE_EARLY_MS = 0.5


def pause_from_events_ms(
    src: qemuvm.Vm, dest: qemuvm.Vm, completed: dict[str, Any]
) -> tuple[float, float]:
    """The harness's own figures, from the QMP events both VMs sent its monitors (both share
    this host's clock): the real pause, the source's STOP to the destination's load completed,
    and QEMU's downtime counted from the same STOP, to the source's `completed` event. QEMU's
    own figure starts earlier, before it stops the vCPUs, which under load can take longer
    than the tunnel's whole tail: from the STOP event it is a floor the real pause must clear."""
    loaded = qemuvm.wait_incoming(dest)
    stop = qemuvm.event_time(src.qmp.wait_event("STOP"))  # queued while the migration ran
    return (qemuvm.event_time(loaded) - stop) * 1e3, (qemuvm.event_time(completed) - stop) * 1e3


@pytest.mark.parametrize("link", ["tcp", "command"])
def test_the_real_pause_is_what_both_vms_events_say(
    qemu_build: qemuvm.QemuBuild, guest_elf: Path, tmp_path: Path, link: str
) -> None:
    """migrate puts the guest's real pause together from its own part (STOP to the wire's end),
    the destination's (the wire's end to its load's end, in the verdict) and the link's (the
    round trip at the end less both): on one host it must be what the VMs' events say, and at
    least QEMU's own downtime, which ends when the last byte is in migpipe's pipe, counted
    from the same STOP (see pause_from_events_ms). Over TCP the answer's way back is TCP's
    one-way time; through a command it cannot be measured."""
    dst_qmp = tmp_path / "dst.qmp"
    out_stats, in_stats = tmp_path / "migrate.json", tmp_path / "incoming.json"
    incoming = ["incoming", "--qmp", dst_qmp, "--stats-json", in_stats]
    with (
        destination(tmp_path, dst_qmp, "dest", qemu_build) as dest,
        driven_source(guest_elf, tmp_path, qemu_build) as src,
    ):
        filters = ("--filters", "xbzrle,zstd:1", "--stats-json", out_stats)
        if link == "tcp":
            listen = free_port()
            peer = [Migpipe(*incoming, "--listen", listen)]
            migrate = start_migrate(tmp_path, *filters, "--connect", listen)
        else:
            peer = []
            migrate = start_migrate(tmp_path, *filters, "--", *MIGPIPE, *map(str, incoming))
        with running(migrate, *peer):
            completed = paced(src, qemuvm.PACINGS["dirty"])
            assert completed["data"]["status"] == "completed"
            status, err = migrate.finish()
            assert status == 0, err
            in_err = peer[0].finish()[1] if peer else ""
        harness_ms, qemu_from_stop_ms = pause_from_events_ms(src, dest, completed)

    pause = json.loads(out_stats.read_text())["real_pause"]
    assert pause["ms"] > 0 and pause["qemu_downtime_ms"] > 0, pause
    assert pause["ms"] >= qemu_from_stop_ms - PAUSE_EARLY_MS, (pause, qemu_from_stop_ms)
    assert -PAUSE_EARLY_MS <= pause["ms"] - harness_ms <= PAUSE_LATE_MS, (pause, harness_ms)
    parts = pause["source_ms"] + pause["link_ms"] + pause["destination_ms"]
    assert min(pause["source_ms"], pause["link_ms"], pause["destination_ms"]) >= 0, pause
    assert parts == pytest.approx(pause["ms"], abs=0.01), pause
    assert pause["end"] == "completed"  # the destination stays paused (-S)
    if link == "tcp":
        assert 0 < pause["one_way_ms"] < 1, pause  # loopback
    else:
        assert pause["one_way_ms"] is None, pause
    assert json.loads(in_stats.read_text())["real_pause"] == {
        "destination_ms": pause["destination_ms"],
        "end": "completed",
    }
    summary = re.search(r"downtime ([\d,]+) ms, real pause ([\d,.]+) ms", err)
    assert summary is not None, err
    downtime, shown = (float(figure.replace(",", "")) for figure in summary.groups())
    assert downtime == pause["qemu_downtime_ms"] and shown == pytest.approx(pause["ms"], abs=0.1)
    assert "real pause: source " in err and "real pause: destination " in err + in_err


def test_migrate_tells_qemu_the_tunnels_rate_while_it_migrates(
    qemu_build: qemuvm.QemuBuild, guest_elf: Path, tmp_path: Path
) -> None:
    """Where QEMU has avail-switchover-bandwidth (8.2+: 10.0, not 7.2), migrate tells it the
    tunnel's rate while the migration runs, and sets it back to 0 (QEMU's own estimate) at the
    end; the harness lets QEMU switch over only once it has seen a rate told."""
    dst_qmp = tmp_path / "dst.qmp"
    told: list[int] = []

    def rate_told() -> bool:
        told.append(src.qmp.execute("query-migrate-parameters")[SWITCHOVER])
        return told[-1] > 0

    with (
        destination(tmp_path, dst_qmp, "dest", qemu_build),
        driven_source(guest_elf, tmp_path, qemu_build) as src,
    ):
        has_it = SWITCHOVER in src.qmp.execute("query-migrate-parameters")
        assert has_it == (qemu_build.version != "7.2")
        incoming = [*MIGPIPE, "incoming", "--qmp", str(dst_qmp)]
        migrate = start_migrate(tmp_path, "--compress", "lz4", "--", *incoming)
        with running(migrate):
            paced = pace(src, qemuvm.PACINGS["dirty"], rate_told if has_it else None)
            assert paced == "completed"
            status, err = migrate.finish()
        assert status == 0, err
        after = src.qmp.execute("query-migrate-parameters")
    if has_it:
        assert told[-1] > 0 and after[SWITCHOVER] == 0, (told, after)
    else:
        assert told == [] and SWITCHOVER not in after


def test_migrate_to_incoming_over_tls(guest_elf: Path, tmp_path: Path) -> None:
    """Mutual TLS between the two migpipes; the destination's answer comes back over TLS too.
    The oracle is what QEMU wrote into migpipe's pipe, recorded by a relay on its monitor."""
    from test_qemu_save_qmp import recording_monitor

    creds, dst_qmp, sent = tmp_path / "pki", tmp_path / "dst.qmp", tmp_path / "sent.stream"
    tls_init(creds, "migpipe test CA", ["localhost"], "source", 1)
    port = free_port().rpartition(":")[2]
    out_stats = tmp_path / "migrate.json"
    with (
        destination(tmp_path, dst_qmp, "dest") as dest,
        driven_source(guest_elf, tmp_path) as src,
        recording_monitor(tmp_path / "src.qmp", sent) as monitor,
    ):
        incoming = Migpipe(
            "incoming", "--qmp", dst_qmp, "--listen", f"127.0.0.1:{port}", "--tls-creds", creds
        )
        migrate = Migpipe(
            "migrate",
            "--qmp",
            monitor,
            "--filters",
            "xbzrle,zstd:1",
            "--connect",
            f"localhost:{port}",
            "--tls-creds",
            creds,
            "--stats-json",
            out_stats,
        )
        with running(incoming, migrate):
            assert pace(src, qemuvm.PACINGS["dirty"]) == "completed"
            status, err = migrate.finish()
            in_status, in_err = incoming.finish()
            assert (status, in_status) == (0, 0), err + in_err
        memory = dest.pmemsave(tmp_path / "dest.mem")
    replay = oracle.replay(sent)
    assert replay.pages_resent > 0
    assert oracle.first_difference(memory, replay.image) is None
    answer = json.loads(out_stats.read_text())["destination"]
    assert answer == {"status": "completed", "error": "", "sealed": False}


def test_a_failure_midway_leaves_the_source_running_for_a_second_attempt(
    guest_elf: Path, tmp_path: Path
) -> None:
    wire = tmp_path / "wire"
    with driven_source(guest_elf, tmp_path) as src:
        # 1. The destination's migpipe dies while QEMU iterates (a 1 ms downtime limit keeps it
        #    from switching over): the source cancels, and its VM keeps running.
        listen = free_port()
        with destination(tmp_path, tmp_path / "dst1.qmp", "dest1") as dest:
            incoming = Migpipe("incoming", "--qmp", tmp_path / "dst1.qmp", "--listen", listen)
            migrate = start_migrate(tmp_path, "--compress", "lz4", "--connect", listen)
            with running(incoming, migrate):
                src.qmp.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 2, TIMEOUT)
                incoming.kill()
                status, err = migrate.finish()
            assert status == EXIT_PEER_GONE, err
            assert err.count("\n") == 1 and err.startswith("migpipe migrate: error: "), err
            assert "the source VM is running" in err
            ended = src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] in FINAL)
            assert ended["data"]["status"] == "cancelled"
            assert src.qmp.execute("query-status")["status"] == "running"
            assert dest.wait_exit(TIMEOUT) not in (None, 0)  # the load failed: QEMU exited
        src.qmp.events.clear()  # the first attempt's leftovers

        # 2. The same source to a fresh destination, this time through a command (as with ssh).
        with destination(tmp_path, tmp_path / "dst2.qmp", "dest2") as dest:
            incoming_command = [*MIGPIPE, "incoming", "--qmp", str(tmp_path / "dst2.qmp")]
            peer = f"tee {shlex.quote(str(wire))} | {shlex.join(incoming_command)}"
            migrate = start_migrate(tmp_path, "--compress", "lz4", "--", "sh", "-c", peer)
            with running(migrate):
                assert pace(src, qemuvm.PACINGS["dirty"]) == "completed"
                status, err = migrate.finish()
            assert status == 0, err
            assert "destination: completed" in err
            assert dest.qmp.execute("query-status")["status"] == "paused"
            memory = dest.pmemsave(tmp_path / "dest2.mem")
    replay = sent_stream(wire, tmp_path)
    assert replay.pages_resent > 0
    assert oracle.first_difference(memory, replay.image) is None


def test_a_damaged_wire_fails_the_load_and_the_source_keeps_running(
    guest_elf: Path, tmp_path: Path
) -> None:
    dst_qmp, incoming_err = tmp_path / "dst.qmp", tmp_path / "incoming.err"
    flip = [sys.executable, str(Path(__file__).with_name("mangle.py")), "flip", "3000000"]
    mangle = shlex.join(flip)  # well inside the bulk pass's frames
    incoming = shlex.join([*MIGPIPE, "incoming", "--qmp", str(dst_qmp)])
    peer = f"{mangle} 2>/dev/null | {incoming} 2>{shlex.quote(str(incoming_err))}"
    with (
        destination(tmp_path, dst_qmp, "dest") as dest,
        driven_source(guest_elf, tmp_path) as src,
    ):
        migrate = start_migrate(tmp_path, "--compress", "zstd", "--", "sh", "-c", peer)
        with running(migrate):
            status, err = migrate.finish()
        # The destination's own reason, whether the source read it between frames or after
        # its next write met the closed pipe: never just "broken pipe".
        assert status == 1, err
        assert err.startswith("migpipe migrate: error: the destination failed: checksum"), err
        assert err.endswith("; the source VM is running\n"), err
        assert src.qmp.execute("query-status")["status"] == "running"
        assert dest.wait_exit(TIMEOUT) not in (None, 0)  # QEMU failed the load, never ran it
    line = incoming_err.read_text()
    assert line.startswith("migpipe incoming: error: ") and line.count("\n") == 1, line
    assert "checksum" in line and "QEMU failed the load" in line


def test_the_destinations_answer_decides_after_qemu_completed(
    guest_elf: Path, tmp_path: Path
) -> None:
    """QEMU completes once the stream is in migpipe's pipe, before the destination has loaded it:
    a destination that then fails must get the source resumed (libvirt's Confirm phase), and
    one that cannot say how it went must leave the source paused, never running twice."""
    opened = 'echo \'{"status": "opened"}\'; cat > /dev/null'
    failing = opened + '; echo \'{"status": "failed", "error": "disk full"}\''
    with driven_source(guest_elf, tmp_path) as src:
        migrate = start_migrate(tmp_path, "--", "sh", "-c", failing)
        with running(migrate):
            assert pace(src, qemuvm.PACINGS["dirty"]) == "completed"
            status, err = migrate.finish()
        assert (status, err) == (
            1,
            "migpipe migrate: error: the destination failed: disk full; the source VM is running\n",
        )
        assert src.qmp.execute("query-status")["status"] == "running"

        src.qmp.events.clear()
        migrate = start_migrate(tmp_path, "--", "sh", "-c", opened + "; exit 3")
        with running(migrate):
            assert pace(src, qemuvm.PACINGS["dirty"]) == "completed"
            status, err = migrate.finish()
        assert status == EXIT_UNCONFIRMED
        assert err.startswith(
            "migpipe migrate: error: sh exited with status 3: QEMU completed, "
            "the source VM stays paused and the destination's state is "
            "unknown"
        )
        assert src.qmp.execute("query-status")["status"] == "postmigrate"


def idle_source(guest_elf: Path, workdir: Path, name: str) -> AbstractContextManager[qemuvm.Vm]:
    """A running source whose guest only idles, with a QMP socket for migpipe at
    WORKDIR/NAME.qmp: it converges at once with QEMU's default downtime limit (bandwidth
    unlimited, as libvirt sets it)."""
    qmp = qemuvm.qmp_socket_args(workdir / f"{name}.qmp")
    live = qemuvm.Pacing(max_bandwidth=1 << 30)
    return qemuvm.source_vm(guest_elf, "idle", workdir, pacing=live, name=name, args=qmp)


@contextlib.contextmanager
def fake_destination(answer: bytes) -> Iterator[str]:
    """A TCP peer without the key: it answers `answer` at once, then takes the whole wire."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            peer, _ = server.accept()
        with peer:
            peer.sendall(answer)
            while peer.recv(1 << 20):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    thread.join(TIMEOUT)


@contextlib.contextmanager
def forging_relay(upstream: str, verdict: bytes | None) -> Iterator[str]:
    """A TCP relay to a real destination that passes the wire and the destination's first
    line ("opened", sealed) on, then replaces its verdict with `verdict` (None: says nothing):
    an on-path host without the key."""
    server = socket.create_server(("127.0.0.1", 0))

    def back(up: socket.socket, down: socket.socket) -> None:
        replies = b""
        while chunk := up.recv(1 << 16):
            replies += chunk
            if b"\n" in replies:  # the first line goes on at once: the source waits for it
                down.sendall(replies.partition(b"\n")[0] + b"\n")
                break
        while up.recv(1 << 16):
            pass
        down.sendall(verdict or b"")
        down.shutdown(socket.SHUT_WR)

    def relay() -> None:
        with server:
            down, _ = server.accept()
        with down, connect(upstream, TIMEOUT) as up:
            answer = threading.Thread(target=back, args=(up, down))
            answer.start()
            _copy(down, up, None)
            answer.join()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def keys(workdir: Path, *names: str) -> list[Path]:
    paths = [workdir / name for name in names]
    for path in paths:
        subprocess.run([*MIGPIPE, "keygen", str(path)], check=True, capture_output=True)
    return paths


def test_a_host_without_the_key_never_gets_the_streams_end(guest_elf: Path, tmp_path: Path) -> None:
    """With encrypt, the stream's end goes only to a destination that proved it holds the key
    (its "opened" is sealed): an on-path host that says "opened" and "completed" without it
    gets the stream cut short, and the source runs on."""
    (key,) = keys(tmp_path, "key")
    forged = b'{"status": "opened"}\n{"status": "completed", "error": ""}\n'
    with idle_source(guest_elf, tmp_path, "src") as src, fake_destination(forged) as to:
        migrate = start_migrate(tmp_path, "--encrypt", "--key-file", key, "--connect", to)
        with running(migrate):
            status, err = migrate.finish()
        assert status == 1, err
        assert err == (
            "migpipe migrate: error: the destination's word that it opened the stream "
            "cannot be trusted; the source VM is running\n"
        )
        assert src.qmp.execute("query-status")["status"] == "running"


FORGED = {
    "completed": b'{"status": "completed", "error": ""}\n',
    "failed": b'{"status": "failed", "error": "forged"}\n',  # the real one completed
    "silence": None,
    "garbage sealed": b'{"sealed": "AAAA"}\n',
}


@pytest.mark.parametrize("forged", FORGED)
def test_a_verdict_without_the_key_leaves_the_source_paused(
    guest_elf: Path, tmp_path: Path, forged: str
) -> None:
    """After the stream's end, with encrypt, only the destination that opened the stream can
    give the verdict: a forged "completed" must not make the source's manager destroy it (the
    guest would exist nowhere), a forged "failed" must not resume it (it would run twice, the
    real destination holding it too), silence is no success. The outcome is unknown: status 9,
    and the source stays paused for a human or libvirt to decide."""
    (key,) = keys(tmp_path, "key")
    listen, dst_qmp = free_port(), tmp_path / "dst.qmp"
    with (
        idle_source(guest_elf, tmp_path, "src") as src,
        destination(tmp_path, dst_qmp, "dest") as dest,
        forging_relay(listen, FORGED[forged]) as relay,
    ):
        incoming = Migpipe("incoming", "--qmp", dst_qmp, "--listen", listen, "--key-file", key)
        migrate = start_migrate(tmp_path, "--encrypt", "--key-file", key, "--connect", relay)
        with running(incoming, migrate):
            status, err = migrate.finish()
            assert incoming.finish()[0] == 0
        assert status == EXIT_UNCONFIRMED, err
        assert err.count("\n") == 1 and "the destination's state is unknown" in err, err
        assert src.qmp.execute("query-status")["status"] == "postmigrate"
        assert dest.qmp.execute("query-status")["status"] == "paused"  # it has the guest


def test_a_wrong_key_on_the_destination_stops_the_stream_and_the_source_runs(
    guest_elf: Path, tmp_path: Path
) -> None:
    """The destination refuses the stream at its header and says so on the connection: the
    source stops sending (the stream's end never leaves, so nothing can complete), cancels and
    runs on, however much of the stream the socket buffers held (newcomer review, section 6).
    Then, with the right key, the answer comes back sealed."""
    keyring = dict(zip(("right", "wrong"), keys(tmp_path, "right", "wrong"), strict=True))
    out_stats = tmp_path / "migrate.json"
    with idle_source(guest_elf, tmp_path, "src") as src:
        for name, expected in (("wrong", 1), ("right", 0)):
            listen, dst_qmp = free_port(), tmp_path / f"dst-{name}.qmp"
            with destination(tmp_path, dst_qmp, f"dest-{name}") as dest:
                incoming = Migpipe(
                    "incoming", "--qmp", dst_qmp, "--listen", listen, "--key-file", keyring[name]
                )
                migrate = start_migrate(
                    tmp_path,
                    "--encrypt",
                    "--key-file",
                    keyring["right"],
                    "--connect",
                    listen,
                    "--stats-json",
                    out_stats,
                )
                with running(incoming, migrate):
                    status, err = migrate.finish()
                    in_status, in_err = incoming.finish()
                assert status == expected, err
                if name == "wrong":
                    assert in_status == EXIT_KEY, in_err
                    assert err.startswith("migpipe migrate: error: the destination failed: "), err
                    assert "the key does not open this stream" in err
                    assert err.endswith("; the source VM is running\n"), err
                    assert src.qmp.execute("query-status")["status"] == "running"
                    assert dest.wait_exit(TIMEOUT) not in (None, 0)  # QEMU failed the load
                    src.qmp.events.clear()
                else:
                    assert in_status == 0, in_err
                    assert "destination: completed (sealed)" in err
                    destination_said = json.loads(out_stats.read_text())["destination"]
                    assert destination_said == {"status": "completed", "error": "", "sealed": True}
                    assert dest.qmp.execute("query-status")["status"] == "paused"


def test_qmp_framing() -> None:
    protocol = QmpProtocol()
    ident, line = protocol.command("getfd", {"fdname": "x"})
    assert json.loads(line) == {"execute": "getfd", "id": ident, "arguments": {"fdname": "x"}}
    assert line.endswith(b"\n") and protocol.command("stop", {})[0] == ident + 1
    data = (
        b'{"QMP": {"version": {}}}\r\n{"event": "MIGRATION", "data": {"status": "active"}}'
        b'\r\n\r\n{"return": {}, "id": 1}\r\n{"error": {"desc": "no"}, "id": 2}\r\n'
        b'{"ret'
    )
    messages = [m for i in range(len(data)) for m in protocol.receive_data(data[i : i + 1])]
    assert messages == [
        {"QMP": {"version": {}}},
        {"event": "MIGRATION", "data": {"status": "active"}},
        {"return": {}, "id": 1},
        {"error": {"desc": "no"}, "id": 2},
    ]
    with pytest.raises(MigpipeError, match="not a QMP message"):
        protocol.receive_data(b'urn": }\n')  # the partial line, ended badly


def run_migpipe(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MIGPIPE, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_refusals_are_one_clear_line(qemu_binary: str, tmp_path: Path) -> None:
    """No QMP socket, and a QEMU that was not started to wait for a migration."""
    missing = run_migpipe("migrate", "--qmp", tmp_path / "none.qmp", "--out", tmp_path / "w")
    assert missing.returncode == 1
    assert missing.stderr.startswith("migpipe migrate: error: cannot connect to QMP at ")
    assert not (tmp_path / "w").exists()
    sock = tmp_path / "vm.qmp"
    with qemuvm.Vm(tmp_path, "plain", ["-S", *qemuvm.qmp_socket_args(sock)]) as vm:
        refused = run_migpipe("incoming", "--qmp", sock, "--in", "/dev/null")
        assert refused.returncode == 1
        assert refused.stderr == (
            "migpipe incoming: error: QEMU is prelaunch, not inmigrate: start it with "
            "-incoming defer\n"
        )
        assert vm.qmp.execute("query-status")["status"] == "prelaunch"


def test_a_wire_that_ends_before_its_header_fails_the_load(
    qemu_binary: str, tmp_path: Path
) -> None:
    """Nothing of the stream reached QEMU: QEMU 7.2 alone would wait on the hung-up pipe
    forever; migpipe makes it fail the load (see migpipe.io.channel.stream_sink)."""
    sock = tmp_path / "dst.qmp"
    with destination(tmp_path, sock, "dest") as dest:
        result = run_migpipe("incoming", "--qmp", sock, "--in", "/dev/null")
        assert dest.wait_exit(TIMEOUT) not in (None, 0)
    assert result.returncode == EXIT_TRUNCATED, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("migpipe incoming: error: wire stream truncated in header")
    assert "; QEMU failed the load" in result.stderr
    assert "Not a migration stream" in dest.log_tail()


def test_a_destination_that_never_answers_is_lost_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source VM is paused while migrate waits for the answer: the wait has a bound."""
    from migpipe.qemu import migration as drive

    released = threading.Event()

    class Silent:
        wire = -1

        def confirm(self, sealer: object) -> drive.Confirmation:
            released.wait()
            return drive.Confirmation("completed")

    monkeypatch.setattr(drive, "CONFIRMATION_TIMEOUT", 0.05)
    try:
        answer = trio.run(drive._confirmation, Silent(), None)
    finally:
        released.set()
    assert answer == drive.Confirmation("lost", "the destination did not answer within 0.05 s")


def test_qemu_refusing_the_migration_changes_nothing(guest_elf: Path, tmp_path: Path) -> None:
    """A QEMU-side failure on the source: a migration is already under way (the harness's own,
    throttled to a crawl), so QEMU refuses. migpipe says so in one line, opens no wire, and
    leaves the VM and the migration it did not start as they were."""
    with driven_source(guest_elf, tmp_path) as src:
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
        src.qmp.execute("migrate", uri="exec:cat > /dev/null")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "active", TIMEOUT)
        wire = tmp_path / "wire"
        result = run_migpipe("migrate", "--qmp", tmp_path / "src.qmp", "--out", wire)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("migpipe migrate: error: ")
        assert result.stderr.count("\n") == 1 and "in progress" in result.stderr, result.stderr
        assert not wire.exists()
        assert src.qmp.execute("query-migrate")["status"] == "active"
        assert src.qmp.execute("query-status")["status"] == "running"
        src.qmp.execute("migrate_cancel")
