"""`migpipe save --qmp` and `migpipe restore --qmp` driving real QEMU 7.2 processes.

The oracle for a live save is the stream the source QEMU sent. QEMU writes it straight into
migpipe's pipe, so the test stands between migpipe and QEMU's monitor (recording_monitor): it
passes every QMP line through untouched, but hands QEMU a pipe of its own instead of the one
migpipe passed with `getfd`, and copies what QEMU writes into migpipe's pipe and a file. That
file is exactly what QEMU sent and migpipe read (the save's byte count must match it), and it
is replayed by tests/oracle.py, which shares no code with migpipe. The destination's memory,
loaded by `restore --qmp` from the fixed-layout file, must equal that replay: a page the layout
lost, kept stale or mixed up, or a load that delivered anything else, shows as a difference.

A save of a stopped guest has a simpler oracle: the guest's memory cannot change after the
stop, so the source's own memory is what it sent.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import oracle
import pytest
import qemuvm
import trio
from test_qemu_drive import TIMEOUT, Migpipe, destination, driven_source, pace, running
from test_save import _file_size_limit, synthetic

from migpipe.errors import EXIT_USAGE, MigpipeError
from migpipe.keys import keygen
from migpipe.qemu.migration import Ending
from migpipe.save import savefile

PACED_BANDWIDTH = qemuvm.PACINGS["dirty"].max_bandwidth  # what driven_source sets


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _tee(qemu_end: int, migpipe_end: int, record: Path) -> None:
    """QEMU's bytes to migpipe's pipe and to `record` (complete before migpipe sees the end)."""
    try:
        with open(record, "wb") as copy:
            while data := os.read(qemu_end, 1 << 20):
                copy.write(data)
                _write_all(migpipe_end, data)
    except BrokenPipeError:
        pass  # migpipe stopped reading: QEMU's next write fails as it would have
    finally:
        os.close(qemu_end)
        os.close(migpipe_end)


def _pass_back(qemu: socket.socket, client: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := qemu.recv(1 << 16):
            client.sendall(data)
        client.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def recording_monitor(qemu_qmp: Path, record: Path) -> Iterator[Path]:
    """A QMP socket to give migpipe instead of QEMU's `qemu_qmp` (see the module docstring):
    yields its path; `record` receives what QEMU writes to the fd migpipe passes it."""
    path = qemu_qmp.with_name(f"relay-{qemu_qmp.name}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    threads: list[threading.Thread] = []

    def relay() -> None:
        with server:
            client, _ = server.accept()
        with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
            qemu.connect(str(qemu_qmp))
            back = threading.Thread(target=_pass_back, args=(qemu, client))
            back.start()
            while True:
                data, fds, _, _ = socket.recv_fds(client, 1 << 16, 1, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    break
                if not fds:
                    qemu.sendall(data)
                    continue
                ours, qemu_end = os.pipe()
                socket.send_fds(qemu, [data], [qemu_end])
                os.close(qemu_end)
                tee = threading.Thread(target=_tee, args=(ours, fds[0], record))
                tee.start()
                threads.append(tee)
            qemu.shutdown(socket.SHUT_WR)
            back.join()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    yield path
    thread.join(TIMEOUT)  # migpipe has gone: the relay ends, and it started every tee
    for t in [thread, *threads]:
        t.join(TIMEOUT)
        assert not t.is_alive()


def run_migpipe(*args: str | Path, **popen) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migpipe", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **popen,
    )


def _bandwidth(vm: qemuvm.Vm) -> int:
    return vm.qmp.execute("query-migrate-parameters")["max-bandwidth"]


def _run_states(vm: qemuvm.Vm) -> list[str]:
    """The STOP and RESUME events QEMU sent since the last call, in order."""
    vm.qmp.execute("query-status")  # every event QEMU sent before this reply is queued now
    events = [e["event"] for e in vm.qmp.events if e["event"] in ("STOP", "RESUME")]
    vm.qmp.events.clear()
    return events


def test_a_live_save_restores_what_the_source_sent(guest_elf: Path, tmp_path: Path) -> None:
    key, saved, sent = tmp_path / "key", tmp_path / "vm.mig", tmp_path / "sent.stream"
    keygen(key)
    with (
        driven_source(guest_elf, tmp_path) as src,
        recording_monitor(tmp_path / "src.qmp", sent) as monitor,
    ):
        save = Migpipe(
            "save",
            "--qmp",
            monitor,
            saved,
            "--live",
            "--layout",
            "fixed",
            "--compress",
            "zstd",
            "--encrypt",
            "--key-file",
            key,
            "--cache",
            "8M",
            "--summary",
        )
        with running(save):
            assert pace(src, qemuvm.PACINGS["dirty"]) == "completed"
            status, err = save.finish()
        assert status == 0, err
        assert src.qmp.execute("query-status")["status"] == "postmigrate"
        assert _bandwidth(src) == PACED_BANDWIDTH  # a live save keeps the VM's own limit
    lines = err.splitlines()
    assert lines[0].startswith("migpipe save: completed in "), err
    assert "  the VM is postmigrate" in lines
    assert f"saved {sent.stat().st_size:,} stream bytes to {saved}" in err  # what QEMU wrote

    dst_qmp = tmp_path / "dst.qmp"
    with destination(tmp_path, dst_qmp, "dest") as dest:
        restored = run_migpipe("restore", "--qmp", dst_qmp, saved, "--key-file", key)
        assert restored.returncode == 0, restored.stderr
        assert restored.stderr.startswith("migpipe restore: completed, the VM is paused\n")
        memory = dest.pmemsave(tmp_path / "dest.mem")

    replay = oracle.replay(sent)
    assert replay.pages_resent > 0  # the guest dirtied memory while it was being saved
    assert oracle.first_difference(memory, replay.image) is None
    assert saved.stat().st_size <= sum(replay.blocks.values()) * 1.02 + (1 << 20)


def test_a_failed_save_leaves_the_guest_running_and_no_file(
    guest_elf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    saved = out / "vm.mig"
    with driven_source(guest_elf, tmp_path) as src:
        qmp = tmp_path / "src.qmp"
        _run_states(src)
        # 1. The file system refuses the file midway (EFBIG): migpipe had stopped the guest.
        failed = run_migpipe("save", "--qmp", qmp, saved, preexec_fn=_file_size_limit(4 << 20))
        message = failed.stderr
        assert failed.returncode == 1 and message.count("\n") == 1, message
        assert message.startswith("migpipe save: error: cannot write ")
        assert "File too large" in message
        assert "; the source VM is running" in message
        assert list(out.iterdir()) == []  # not even the temporary file
        assert _run_states(src) == ["STOP", "RESUME"]
        assert src.qmp.execute("query-status")["status"] == "running"
        assert src.qmp.execute("query-migrate")["status"] == "cancelled"
        assert _bandwidth(src) == PACED_BANDWIDTH  # unthrottled for the save, then put back

        # 2. The same VM saved again, and running again afterwards (--resume).
        second = run_migpipe("save", "--qmp", qmp, saved, "--resume", "--compress", "lz4")
        assert second.returncode == 0, second.stderr
        assert "  the VM is running" in second.stderr.splitlines()
        assert _run_states(src) == ["STOP", "RESUME"]
        assert src.qmp.execute("query-status")["status"] == "running"
    assert [p.name for p in out.iterdir()] == ["vm.mig"]
    inspected = run_migpipe("inspect", saved)
    assert inspected.returncode == 0, inspected.stderr


def test_a_stopped_guest_restores_exactly_and_a_damaged_file_never_runs(
    guest_elf: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "vm.mig"
    with driven_source(guest_elf, tmp_path) as src:
        result = run_migpipe("save", "--qmp", tmp_path / "src.qmp", saved, "--compress", "lz4")
        assert result.returncode == 0, result.stderr
        assert src.qmp.execute("query-status")["status"] == "postmigrate"  # as virsh save leaves it
        sent = src.pmemsave(tmp_path / "src.mem")  # stopped before the save: what it sent

    dst_qmp = tmp_path / "dst.qmp"
    with destination(tmp_path, dst_qmp, "dest") as dest:
        restored = run_migpipe("restore", "--qmp", dst_qmp, saved)
        assert restored.returncode == 0, restored.stderr
        assert oracle.first_difference(dest.pmemsave(tmp_path / "dest.mem"), sent) is None

    damaged = tmp_path / "damaged.mig"
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x20
    damaged.write_bytes(data)
    dst2_qmp = tmp_path / "dst2.qmp"
    waiting = ["-incoming", "defer", *qemuvm.qmp_socket_args(dst2_qmp)]  # no -S: a load would run
    with qemuvm.Vm(tmp_path, "dest2", waiting) as dest:
        missing = run_migpipe("restore", "--qmp", dst2_qmp, tmp_path / "none.mig")
        assert missing.stderr.startswith("migpipe restore: error: cannot open "), missing.stderr
        assert dest.qmp.execute("query-status")["status"] == "inmigrate"  # untouched

        failed = run_migpipe("restore", "--qmp", dst2_qmp, damaged)
        assert failed.returncode == 3, failed.stderr
        line = failed.stderr
        assert line.startswith("migpipe restore: error: ") and line.count("\n") == 1, line
        assert "checksum mismatch" in line and "; QEMU failed the load (at byte offset" in line
        assert dest.wait_exit(TIMEOUT) not in (None, 0)  # QEMU 7.2 exits after a failed load
        with pytest.raises(qemuvm.QmpClosed):
            dest.qmp.wait_event("RESUME")  # every event QEMU sent, up to its exit: never ran


def test_live_and_resume_need_qmp(tmp_path: Path) -> None:
    for option in ("--live", "--resume"):
        result = run_migpipe("save", tmp_path / "vm.mig", option)
        assert (result.returncode, result.stderr) == (
            EXIT_USAGE,
            "migpipe save: error: --live and --resume drive QEMU: they need --qmp\n",
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("status", ["completed", "cancelled", "failed", "exited"])
def test_a_save_takes_its_name_only_once_qemu_completed(tmp_path: Path, status: str) -> None:
    """What keeps a failed save --qmp from leaving a file beside a VM that runs on, even when
    the stream itself was complete: the file is named only after QEMU's final status."""
    stream, saved = tmp_path / "guest.stream", tmp_path / "out" / "vm.mig"
    stream.write_bytes(synthetic(iterations=2))
    saved.parent.mkdir()
    named_early: list[bool] = []

    async def save() -> None:
        ending = Ending()
        ending.set(status)  # QEMU's last MIGRATION event

        async def commit() -> None:
            named_early.append(saved.exists())
            await ending.completed()

        with open(stream, "rb") as source:
            await savefile.save(source.fileno(), saved, [], commit=commit)

    if status == "completed":
        trio.run(save)
        assert [p.name for p in saved.parent.iterdir()] == ["vm.mig"]
    else:
        with pytest.raises(MigpipeError, match=f"did not complete the migration \\({status}\\)"):
            trio.run(save)
        assert list(saved.parent.iterdir()) == []
    assert named_early == [False]
