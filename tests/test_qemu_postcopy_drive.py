"""`migpipe migrate --qmp --postcopy` into `migpipe incoming --qmp --postcopy`, on QEMU 7.2 and
10.0: the busy guest, which precopy cannot converge over a 30 MB/s link, switches to postcopy
and runs on the destination while its pages still cross; each page it touches first is
requested over QEMU's return path, which travels back through the wire's answer direction.

migpipe holds each QEMU's second QMP monitor and hands it a private UNIX socket of the two-way
tunnel; the harness keeps its own monitor to read the outcome. tests/link.py limits the wire
between the two commands to the rate of the measurements in issue 17.
"""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import qemuvm
from link import Link
from support import MIGPIPE, MIGPIPE_SHELL, free_port
from support import migpipe as migpipe_run

from migpipe.errors import EXIT_USAGE
from migpipe.io.tlsinit import tls_init

LINK_RATE = 30e6  # bytes/s, as in tests/test_qemu_twoway.py
POSTCOPY_CONNECTIONS = 2  # migrate --postcopy's wire over --connect: main stream, preempt
TIMEOUT = 30.0  # a failsafe: each command ends when its QEMU completed (here in < 10 s)


def migpipe(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*MIGPIPE, "-v", *map(str, args)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def until_listening(process: subprocess.Popen[bytes]) -> bytes:
    """What `process` said until it said it listens (-v), which it must: the link connects to
    it as soon as migrate connects to the link."""
    lines = []
    while b": listening on " not in (line := process.stderr.readline()):
        assert line, b"".join(lines).decode()  # it ended before it listened
        lines.append(line)
    return b"".join(lines)


def finish(process: subprocess.Popen[bytes], said: bytes = b"") -> tuple[int, str]:
    """Exit status and stderr (after what it `said` already), once it has exited (killed past
    TIMEOUT)."""
    try:
        _, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, (said + err).decode()


def tls(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Mutual TLS: incoming's options, and migrate's (it reaches incoming through the link,
    so it names the host it expects)."""
    creds = tmp_path / "pki"
    tls_init(creds, "migpipe test CA", ["localhost"], "source", 1)
    return ["--tls-creds", str(creds)], ["--tls-creds", str(creds), "--tls-hostname", "localhost"]


@pytest.mark.qemu
@pytest.mark.parametrize(
    "switch,secure",
    [([], False), (["--postcopy-after", "1"], False), (["--postcopy-after", "1"], True)],
    ids=["auto", "after-1", "after-1-tls"],
)
def test_a_busy_guest_in_postcopy_through_migrate_and_incoming(
    guest_elf: Path,
    qemu_build: qemuvm.QemuBuild,
    tmp_path: Path,
    switch: list[str],
    secure: bool,
) -> None:
    """Both commands exit 0 with their summaries; the source QEMU completed after the guest
    faulted pages in over the link, and the destination runs the guest. Over TLS too, whose
    channel carries both directions at once."""
    src_qmp, dst_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    wire = free_port() if secure else f"unix:{tmp_path / 'wire.sock'}"
    incoming_tls, migrate_tls = tls(tmp_path) if secure else ([], [])
    dest_args = ["-incoming", "defer", *qemuvm.qmp_socket_args(dst_qmp)]
    with (
        qemuvm.source_vm(
            guest_elf, "busy", tmp_path, args=qemuvm.qmp_socket_args(src_qmp), qemu=qemu_build
        ) as src,
        qemuvm.Vm(tmp_path, "dest", dest_args, qemu=qemu_build) as dest,
        Link(f"unix:{tmp_path / 'link.sock'}", wire, rate=LINK_RATE) as link,
    ):
        incoming = migpipe(
            "incoming", "--qmp", dst_qmp, "--listen", wire, "--postcopy", *incoming_tls
        )
        said = until_listening(incoming)
        migrate = migpipe(
            "migrate",
            "--qmp",
            src_qmp,
            "--connect",
            link.address,
            "--postcopy",
            *switch,
            *migrate_tls,
        )
        out_status, out_err = finish(migrate)
        in_status, in_err = finish(incoming, said)
        assert (out_status, in_status) == (0, 0), (out_err, in_err)
        info = src.qmp.execute("query-migrate")
        assert info["status"] == "completed"
        assert info["ram"]["postcopy-requests"] > 0  # the guest ran there before its pages came
        assert dest.qmp.execute("query-status")["status"] == "running"
        for vm in (src, dest):  # as libvirt 10+ sets them: requested pages on a connection
            caps = {
                c["capability"]: c["state"] for c in vm.qmp.execute("query-migrate-capabilities")
            }
            assert caps["postcopy-ram"] and caps["postcopy-preempt"], caps
    assert "migpipe migrate: completed" in out_err
    requests = f"{info['ram']['postcopy-requests']:,} pages it requested in postcopy"
    assert f"destination: loaded, as its QEMU said on the return path; {requests}" in out_err
    assert "migpipe incoming: completed, the VM is running" in in_err
    # postcopy-blocktime: the destination's vCPUs waited for the pages they requested
    waited = re.search(r"postcopy: the guest's vCPUs waited ([\d,]+) ms for pages", in_err)
    assert waited and int(waited[1].replace(",", "")) > 0, in_err
    # and decode timed each request to its page on the preempt connection
    timed = re.search(r"postcopy: ([\d,]+) page requests, each page back in [\d.,]+ ms", in_err)
    assert timed and int(timed[1].replace(",", "")) == info["ram"]["postcopy-requests"], in_err


@pytest.mark.qemu
def test_the_guest_running_on_the_destination_finds_its_memory_whole(
    guest_elf: Path, tmp_path: Path
) -> None:
    """The destination runs the guest from the switch on, so its memory cannot be compared with
    the source's; the self-checking guest (mode=check) proves it instead: paused on the
    destination after the migration, every page it wrote holds the count its table says, and
    it went on writing there. Through migrate/incoming --postcopy with zstd (with xbzrle it may
    end before the guest faults), QEMU 10.0 (7.2's TCG can leave a page of a live guest stale
    by itself)."""
    switch = ("--postcopy", "--postcopy-after", "1", "--compress", "zstd:1")
    with cut_link(guest_elf, tmp_path, qemuvm.QEMU_10_0, *switch, kind="check") as (
        src,
        dest,
        _,
        ends,
    ):
        out_status, out_err, in_status, in_err = ends()
        assert (out_status, in_status) == (0, 0), (out_err, in_err)
        assert src.qmp.execute("query-migrate")["ram"]["postcopy-requests"] > 0
        at_switch = qemuvm.check_image(src.pmemsave(tmp_path / "s.mem"))  # stopped since
        dest.qmp.execute("stop")
        on_destination = qemuvm.check_image(dest.pmemsave(tmp_path / "d.mem"))
    assert on_destination > at_switch > 0  # it ran on, on the destination


@pytest.mark.qemu
def test_postcopy_through_a_commands_stdin_and_stdout(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    """`migrate -- COMMAND`, as with ssh: the wire goes down the command's stdin and QEMU's
    return path comes back on its stdout (pv limits the way there to the link's rate)."""
    src_qmp, dst_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    dest_args = ["-incoming", "defer", *qemuvm.qmp_socket_args(dst_qmp)]
    incoming = f"{MIGPIPE_SHELL} incoming --qmp {shlex.quote(str(dst_qmp))} --postcopy"
    with (
        qemuvm.source_vm(
            guest_elf, "busy", tmp_path, args=qemuvm.qmp_socket_args(src_qmp), qemu=qemu_build
        ) as src,
        qemuvm.Vm(tmp_path, "dest", dest_args, qemu=qemu_build) as dest,
    ):
        migrate = migpipe(
            "migrate",
            "--qmp",
            src_qmp,
            "--postcopy",
            "--postcopy-after",
            "1",
            "--",
            "sh",
            "-c",
            f"pv -q -L {LINK_RATE:.0f} | {incoming}",
        )
        status, err = finish(migrate)
        assert status == 0, err
        info = src.qmp.execute("query-migrate")
        assert info["status"] == "completed"
        assert info["ram"]["postcopy-requests"] > 0
        assert dest.qmp.execute("query-status")["status"] == "running"
    assert "migpipe migrate: completed" in err
    assert "migpipe incoming: completed, the VM is running" in err  # its stderr is ours


@pytest.mark.qemu
@pytest.mark.parametrize("filters", [[], ["--xbzrle", "--compress", "zstd:1"]])
def test_multifd_through_migrate_and_incoming(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, filters: list[str]
) -> None:
    """`migrate --multifd 3` into `incoming --multifd 3`: QEMU's main connection and its three
    channels each cross as a lane of the one wire connection (through xbzrle and zstd too),
    and the source QEMU completes only once the destination said on the return path that it
    loaded everything; the destination holds the paused source's memory."""
    src_qmp, dst_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    wire = f"unix:{tmp_path / 'wire.sock'}"
    dest_args = ["-S", "-incoming", "defer", *qemuvm.qmp_socket_args(dst_qmp)]
    with (
        qemuvm.source_vm(
            guest_elf, "dirty", tmp_path, args=qemuvm.qmp_socket_args(src_qmp), qemu=qemu_build
        ) as src,
        qemuvm.Vm(tmp_path, "dest", dest_args, qemu=qemu_build) as dest,
    ):
        src.qmp.execute("stop")  # what it holds now is what the destination must hold
        incoming = migpipe("incoming", "--qmp", dst_qmp, "--listen", wire, "--multifd", "3")
        said = until_listening(incoming)
        migrate = migpipe(
            "migrate", "--qmp", src_qmp, "--connect", wire, "--multifd", "3", *filters
        )
        out_status, out_err = finish(migrate)
        in_status, in_err = finish(incoming, said)
        assert (out_status, in_status) == (0, 0), (out_err, in_err)
        assert src.qmp.execute("query-migrate")["status"] == "completed"
        for vm in (src, dest):
            caps = {
                c["capability"]: c["state"] for c in vm.qmp.execute("query-migrate-capabilities")
            }
            assert caps["multifd"] and caps["return-path"], caps
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")
    assert in_err.count("connected to unix:") == 1 + 3, in_err  # the main stream, 3 channels
    assert "destination: loaded, as its QEMU said on the return path\n" in out_err
    assert "migpipe incoming: completed" in in_err


@contextlib.contextmanager
def cut_link(
    guest_elf: Path,
    tmp_path: Path,
    qemu_build: qemuvm.QemuBuild,
    *switch: str,
    recover: tuple[str, ...] = (),
    dest_args: tuple[str, ...] = (),
    kind: str = "busy",
) -> Iterator[tuple[qemuvm.Vm, qemuvm.Vm, Link, Callable[[], tuple[int, str, int, str]]]]:
    """The `kind` guest migrating with `migrate --postcopy SWITCH...` into `incoming
    --postcopy` (both with `recover`, their --recover-timeout) over the link the test may cut:
    the source, the destination (started with `dest_args` too), the link, and what ends both
    commands (their statuses and stderr)."""
    src_qmp, dst_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    wire = f"unix:{tmp_path / 'wire.sock'}"
    dest_args = (*dest_args, "-incoming", "defer", *qemuvm.qmp_socket_args(dst_qmp))
    with (
        qemuvm.source_vm(
            guest_elf, kind, tmp_path, args=qemuvm.qmp_socket_args(src_qmp), qemu=qemu_build
        ) as src,
        qemuvm.Vm(tmp_path, "dest", list(dest_args), qemu=qemu_build) as dest,
        Link(f"unix:{tmp_path / 'link.sock'}", wire, rate=LINK_RATE) as link,
    ):
        incoming = migpipe("incoming", "--qmp", dst_qmp, "--listen", wire, "--postcopy", *recover)
        said = until_listening(incoming)
        migrate = migpipe("migrate", "--qmp", src_qmp, "--connect", link.address, *switch, *recover)
        yield src, dest, link, lambda: (*finish(migrate), *finish(incoming, said))


def one_line_each(out_status: int, out_err: str, in_status: int, in_err: str) -> str:
    """Both commands failed, each with one line last; migrate's line."""
    assert out_status != 0 and in_status != 0
    assert in_err.splitlines()[-1].startswith("migpipe incoming: error: "), in_err
    error = out_err.splitlines()[-1]  # one line, however the break showed first
    assert error.startswith("migpipe migrate: error: "), out_err
    return error


@pytest.mark.qemu
def test_a_link_cut_in_precopy_leaves_the_source_running(guest_elf: Path, tmp_path: Path) -> None:
    """Cut before the switch (--postcopy-after 3, cut once pass 2 began): migrate cancels the
    migration and says in one line that the source VM runs, which it does; incoming fails."""
    switch = ("--postcopy", "--postcopy-after", "3")
    with cut_link(guest_elf, tmp_path, qemuvm.QEMU_7_2, *switch) as (src, _, link, ends):
        src.qmp.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 2, timeout=TIMEOUT)
        assert link.cut() == POSTCOPY_CONNECTIONS
        ended = ends()
        assert src.qmp.execute("query-status")["status"] == "running"
        assert src.qmp.execute("query-migrate")["status"] in ("cancelled", "failed")
    assert "the source VM is running" in one_line_each(*ended)


@pytest.mark.qemu
def test_a_link_cut_in_postcopy_never_resumes_the_stale_source(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    """Cut once QEMU is in postcopy, with recovery off (--recover-timeout 0): the guest may
    have run on the destination, so the source's memory is stale; migrate neither cancels
    nor resumes it, nor waits on a QEMU that holds it paused (10.0: postcopy-paused), and
    says so in one line; incoming fails too."""
    switch = ("--postcopy-after", "1", "--postcopy")
    recover = ("--recover-timeout", "0")
    with cut_link(guest_elf, tmp_path, qemu_build, *switch, recover=recover) as (
        src,
        _,
        link,
        ends,
    ):
        active = src.qmp.wait_event(
            "MIGRATION", lambda e: e["data"]["status"] == "postcopy-active", timeout=TIMEOUT
        )
        assert active and link.cut() == POSTCOPY_CONNECTIONS
        ended = ends()
        assert src.qmp.execute("query-status")["running"] is False
        assert src.qmp.execute("query-migrate")["status"] != "cancelled"
    assert "postcopy had begun: the source VM stays paused" in one_line_each(*ended)


RESUME_AFTER = 8 << 20  # postcopy bytes sent before the cut: the destination runs by then


def into_postcopy(src: qemuvm.Vm) -> None:
    """Wait until the source is RESUME_AFTER bytes into postcopy."""
    src.qmp.wait_event(
        "MIGRATION", lambda e: e["data"]["status"] == "postcopy-active", timeout=TIMEOUT
    )
    while src.qmp.execute("query-migrate")["ram"]["postcopy-bytes"] < RESUME_AFTER:
        pass  # each query is a round trip to QEMU: the pages flow meanwhile


def resumed_after_a_cut(
    src: qemuvm.Vm, link: Link, ends: Callable[[], tuple[int, str, int, str]]
) -> tuple[str, str]:
    """Cut every connection of the wire RESUME_AFTER bytes into postcopy; both commands must
    then resume the migration and exit 0: their stderr."""
    into_postcopy(src)
    assert link.cut() == POSTCOPY_CONNECTIONS
    out_status, out_err, in_status, in_err = ends()
    assert (out_status, in_status) == (0, 0), (out_err, in_err)
    return out_err, in_err


@pytest.mark.qemu
def test_a_link_cut_in_postcopy_is_resumed(guest_elf: Path, tmp_path: Path) -> None:
    """QEMU 10.0 holds a postcopy migration whose connection broke paused on both hosts
    (postcopy-paused); migrate opens the link again and resumes it (`migrate` with resume)
    while incoming takes the new connection and hands it to QEMU's migrate-recover. The
    destination is started paused (-S), so the guest runs nowhere after the switch and its
    memory must end exactly as the source stopped it: everything the broken connection had
    not delivered came on the new one."""
    switch = ("--postcopy-after", "1", "--postcopy")
    build = qemuvm.QEMU_10_0
    with cut_link(guest_elf, tmp_path, build, *switch, dest_args=("-S",)) as (
        src,
        dest,
        link,
        ends,
    ):
        out_err, in_err = resumed_after_a_cut(src, link, ends)
        assert src.qmp.execute("query-migrate")["status"] == "completed"
        assert dest.qmp.execute("query-migrate")["status"] == "completed"
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")
    assert "resumed after the wire broke, " in out_err
    assert "resumed after the wire broke, 1x" in in_err  # one new wire, whatever migrate tried
    assert "QEMU paused the migration: waiting for the source to resume it" in in_err
    assert "QMP migrate-recover" in in_err


@pytest.mark.qemu
def test_a_link_cut_with_the_guest_running_on_the_destination_is_resumed(
    guest_elf: Path, tmp_path: Path
) -> None:
    """The case users meet: the guest runs on the destination (no -S) when the link breaks,
    its vCPUs wait on missing pages while both QEMUs are paused, and the resumed migration
    (QEMU 10.0) brings the rest; the self-checking guest, paused at the end, finds every page
    at its counter and went on writing there."""
    switch = ("--postcopy-after", "1", "--postcopy")
    with cut_link(guest_elf, tmp_path, qemuvm.QEMU_10_0, *switch, kind="check") as (
        src,
        dest,
        link,
        ends,
    ):
        _, in_err = resumed_after_a_cut(src, link, ends)
        assert dest.qmp.execute("query-migrate")["status"] == "completed"
        at_switch = qemuvm.check_image(src.pmemsave(tmp_path / "s.mem"))  # stopped since
        dest.qmp.execute("stop")
        on_destination = qemuvm.check_image(dest.pmemsave(tmp_path / "d.mem"))
    assert on_destination > at_switch > 0
    assert "resumed after the wire broke, 1x" in in_err


@pytest.mark.qemu
def test_a_broken_postcopy_is_resumed_by_migrate_and_incoming_resume(
    guest_elf: Path, tmp_path: Path
) -> None:
    """When the commands that ran it are gone (here: recovery off, so both gave up), the
    migration QEMU 10.0 holds postcopy-paused is resumed by `migrate --resume` and
    `incoming --resume`, as the operator runs them; the paused (-S) destination ends with
    exactly the source's memory."""
    switch = ("--postcopy-after", "1", "--postcopy")
    recover = ("--recover-timeout", "0")
    with cut_link(
        guest_elf, tmp_path, qemuvm.QEMU_10_0, *switch, recover=recover, dest_args=("-S",)
    ) as (src, dest, link, ends):
        into_postcopy(src)
        assert link.cut() == POSTCOPY_CONNECTIONS
        out_status, out_err, in_status, in_err = ends()
        assert "QEMU holds the migration postcopy-paused" in in_err, in_err
        assert "postcopy had begun: the source VM stays paused" in one_line_each(
            out_status, out_err, in_status, in_err
        )
        wire = f"unix:{tmp_path / 'wire.sock'}"
        incoming = migpipe("incoming", "--qmp", tmp_path / "dst.qmp", "--listen", wire, "--resume")
        said = until_listening(incoming)
        migrate = migpipe(
            "migrate", "--qmp", tmp_path / "src.qmp", "--connect", link.address, "--resume"
        )
        out_status, out_err = finish(migrate)
        in_status, in_err = finish(incoming, said)
        assert (out_status, in_status) == (0, 0), (out_err, in_err)
        assert src.qmp.execute("query-migrate")["status"] == "completed"
        assert dest.qmp.execute("query-migrate")["status"] == "completed"
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")
    assert 'QMP migrate {"uri"' in out_err and '"resume": true}' in out_err
    assert "QMP migrate-recover" in in_err


@pytest.mark.parametrize(
    "command,line",
    [
        ("migrate", "QEMU's migration is {}, not postcopy-paused: nothing to resume"),
        ("incoming", "QEMU waits for a migration from its start: nothing to resume"),
    ],
)
@pytest.mark.qemu
def test_resume_without_a_paused_migration_is_one_line(
    tmp_path: Path, command: str, line: str
) -> None:
    qmp = tmp_path / "vm.qmp"
    args = ["-incoming", "defer"] if command == "incoming" else []
    with qemuvm.Vm(tmp_path, "vm", [*args, *qemuvm.qmp_socket_args(qmp)], qemu=qemuvm.QEMU_10_0):
        result = migpipe_run(command, "--qmp", str(qmp), "--resume", "--connect", "unix:nowhere")
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().splitlines()[-1] == (
        f"migpipe {command}: error: " + line.format("none")
    )


def kill_processes(*words: str) -> int:
    """SIGKILL every process whose command line holds all of `words`; how many there were."""
    killed = 0
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if entry.name.isdigit() and all(w.encode() in argv for w in words):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


@pytest.mark.qemu
def test_postcopy_through_a_command_is_resumed_by_running_it_again(
    guest_elf: Path, tmp_path: Path
) -> None:
    """`migrate -- COMMAND`, as with ssh: the command's incoming dies in postcopy (killed), so
    both QEMUs hold the migration paused; migrate runs COMMAND again, and the new incoming
    finds its QEMU postcopy-paused and takes the resumed migration from its start. The
    destination is paused (-S): it must end with exactly the source's memory."""
    src_qmp, dst_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    dest_args = ["-S", "-incoming", "defer", *qemuvm.qmp_socket_args(dst_qmp)]
    incoming = f"{MIGPIPE_SHELL} -v incoming --qmp {shlex.quote(str(dst_qmp))} --postcopy"
    link = shlex.join([sys.executable, str(Path(__file__).parent / "link.py")])
    command = f"{link} --rate {LINK_RATE:.0f} | {incoming}"
    with (
        qemuvm.source_vm(
            guest_elf,
            "busy",
            tmp_path,
            args=qemuvm.qmp_socket_args(src_qmp),
            qemu=qemuvm.QEMU_10_0,
        ) as src,
        qemuvm.Vm(tmp_path, "dest", dest_args, qemu=qemuvm.QEMU_10_0) as dest,
    ):
        switch = ("--postcopy", "--postcopy-after", "1")
        migrate = migpipe("migrate", "--qmp", src_qmp, *switch, "--", "sh", "-c", command)
        into_postcopy(src)
        assert kill_processes("incoming", str(dst_qmp)) == 1
        status, err = finish(migrate)
        assert status == 0, err
        assert src.qmp.execute("query-migrate")["status"] == "completed"
        assert dest.qmp.execute("query-migrate")["status"] == "completed"
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")
    assert "resumed after the wire broke, " in err
    assert err.count("migpipe incoming: completed") == 1  # the second command's incoming
    assert "QMP migrate-recover" in err


ONE_WAY = (
    "--postcopy needs a wire that carries both ways, not {} (QEMU's return path travels back "
    "on it): --connect, --listen or COMMAND"
)


@pytest.mark.parametrize(
    "args,line",
    [
        (["migrate", "--qmp", "q", "--postcopy", "--out", "f"], ONE_WAY.format("f")),
        (["migrate", "--qmp", "q", "--postcopy"], ONE_WAY.format("standard output")),
        (["incoming", "--qmp", "q", "--postcopy", "--in", "f"], ONE_WAY.format("f")),
        (
            ["migrate", "--qmp", "q", "--multifd", "2", "--out", "f"],
            ONE_WAY.replace("--postcopy", "--multifd").format("f"),
        ),
        (
            ["incoming", "--qmp", "q", "--multifd", "0", "--connect", "unix:w"],
            "--multifd takes a number of channels from 1 to 255",
        ),
        (
            ["migrate", "--qmp", "q", "--postcopy-after", "2", "--connect", "unix:w"],
            "--postcopy-after takes a number of passes from 1, with --postcopy",
        ),
        (
            ["migrate", "--qmp", "q", "--postcopy", "--postcopy-after", "0", "--connect", "unix:w"],
            "--postcopy-after takes a number of passes from 1, with --postcopy",
        ),
    ],
)
def test_postcopy_refuses_a_one_way_wire_in_one_line(args: list[str], line: str) -> None:
    """A file cannot carry QEMU's return path back: a usage error, one line, before QMP is
    touched (the socket `q` does not exist)."""
    result = migpipe_run(*args)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.decode() == f"migpipe {args[0]}: error: {line}\n"
