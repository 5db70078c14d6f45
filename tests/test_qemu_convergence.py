"""The guest's real pause and convergence over a 30 MB/s link, as a user runs it (issue 21).

The "busy" guest (qemuvm.GUEST_APPEND) writes single bytes all over a 64 MiB region, so every
pass leaves most of it dirty again: far more than a 30 MB/s link (tests/link.py as a pipeline
stage, paced every ~1 ms) carries within a downtime limit, but nearly all of it pages that an
XBZRLE delta carries in a few bytes. QEMU runs with its parameters as a user leaves them
(PACINGS["busy"]: unthrottled, as libvirt migrates, and the downtime limit from the first pass),
with QEMU's default limit of 300 ms and with 50 ms, a limit operators set; on QEMU 7.2 and 10.0.

For each build and limit, QEMU's own xbzrle over the bare link is the control: it converges, and
what it puts on the link is the reference. `migpipe encode --xbzrle --compress zstd:1 | link`
into `migpipe decode` as the destination's exec: command, and `migpipe migrate --qmp` with the
same filters into `migpipe incoming --qmp` over the same link, must converge too, with the
destination holding exactly what the source sent (tests/oracle.py), at most 0.4 times the
control's bytes on the link, and a real pause (the source's STOP to the destination's
completion, QMP timestamps of one host) that QEMU's own downtime figure undercounts by at most
TAIL_MS: what the tunnel still held when QEMU wrote its last byte. migrate's own figure of the
pause must be what the events say. Issue 21 asks more: the pause within the limit plus 10 ms in
every run. That is asserted where QEMU's decision leaves room for the tail: at QEMU's default
300 ms, where QEMU's own downtime has stayed far below the limit, and at 50 ms through `migrate
--qmp` wherever QEMU takes the tunnel's rate as its avail-switchover-bandwidth (8.2+), which
makes it stop the guest with less left. It is not asserted at 50 ms through exec: (no monitor to
tell QEMU anything) nor on QEMU 7.2 (no such parameter): there QEMU's estimate of the rate is
right, so it stops the guest with up to the whole limit left to send (downtime 44-53 ms at 50 in
some runs), and the tail comes on top. Of this box's 64 runs after the link and migpipe stopped
spending the pause's CPU on their own exits, all held (at 50 ms at most 59; at 300 ms at most
131, QEMU's downtime at most 116); of 76 before that, 73 at 50 ms (the others: 61, 70, 71). The
table shows each run's pause beside the limit. Without XBZRLE (the bare link, plain `encode`)
nothing converges.

"Must not converge" is: the harness gives up at pass GIVE_UP (NotConverged), or QEMU, misled
about the link's speed, switches over with more left to send than the link carries within the
downtime limit (see _not_converged). The module prints a comparison at its end; each test also
records its figures with `record_property` (--junitxml).
"""

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oracle
import pytest
import qemuvm
from support import MIGPIPE as MIGPIPE_ARGS
from support import MIGPIPE_SHELL as MIGPIPE

from migpipe.qemu.migration import SWITCHOVER_BANDWIDTH

pytestmark = pytest.mark.qemu
LINK_RATE = 30 << 20  # bytes per second (30 MiB/s, as issue 21's `pv -q -L 30m` was)
# Not pv: it paces in 100 ms slots, so a final write that finds its slot spent waits up to
# 100 ms, which no real link adds and which made QEMU's own pause here 4-99 ms at random.
LINK = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).parent / 'link.py'))}"
LINK += f" --rate {LINK_RATE}"
LIMITS_MS = (300, 50)  # QEMU's default downtime limit, and a tight one
GIVE_UP = 8  # passes, for the migrations that must not converge
BUSY = qemuvm.PACINGS["busy"]
REGION_PAGES = qemuvm.BUSY_PAGES
FILTERS = "--xbzrle --compress zstd:1"
# What the tunnel may add to QEMU's own downtime figure. Measured over the paced link, QEMU 10.0
# at 50 ms, exec: 5-58 ms in 24 runs before the wire's pipes were sized by expansion; 4-40 in
# 18 runs after (stop 26); then up to 40 in 76 runs of both paths and builds once the wire was kept
# by the link instead of a tee stage (whose 64 KiB pipe held 20-40 MB of pages), the stream's
# end went out at the trailer (not after both ends' threads ended: ~10 ms) and the wire's
# buffers held 1 ms of what their bytes become; then 1-21 (median 9) in 64 runs once the link's
# pacing and exit, and migpipe's exit, stopped taking the CPU the destination needs then
# (traced: the link's Python finalization alone ran 11 ms on one of the two cores). Where it
# goes: what is in flight when QEMU writes its last byte, pages decode rebuilds and the
# destination QEMU loads, slowly when it waits for a core; then QEMU's own completion.
TAIL_MS = 40
SLACK_MS = 10  # what the pause may pass the downtime limit by, where that is asserted
LINK_SHARE = 0.4  # of the control's bytes on the link, at most


@dataclass
class Row:
    """One migration over the link, for the comparison."""

    outcome: str  # "converged", "gave up", or "switched over" (misled: see _not_converged)
    seconds: float  # `migrate` to destination loaded, or to the give-up pass
    passes: int  # QEMU's dirty-sync count
    qemu_bytes: int  # what the source sent
    link_bytes: int | None  # what crossed the link (None: not known, see the callers)
    downtime_ms: int | None  # QEMU's own figure (it ends when the last byte enters the sender)
    pause_ms: int | None  # the guest's real pause: source STOP to destination completed


Record = Callable[[str, Row], None]


class _Summary:
    """A plugin, registered by `comparison`, that prints the rows in pytest's final summary."""

    def __init__(self, rows: dict[str, Row]) -> None:
        self.rows = rows

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.rows:
            terminalreporter.write_sep("-", "busy guest over a 30 MB/s link")
            for line in _table(self.rows):
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def comparison(request: pytest.FixtureRequest) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    request.config.pluginmanager.register(_Summary(rows))
    return rows


@pytest.fixture
def record(comparison: dict[str, Row], record_property: Callable[[str, Any], None]) -> Record:
    def record(label: str, row: Row) -> None:
        comparison[label] = row
        for key, value in dataclasses.asdict(row).items():
            record_property(key, value)
        print(_table({label: row})[-1])  # shown with -s or -rP

    return record


def _table(rows: dict[str, Row]) -> list[str]:
    def num(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    lines = [
        f"{'':46} {'outcome':>13} {'seconds':>7} {'passes':>6} {'QEMU bytes':>13} "
        f"{'link bytes':>12} {'downtime ms':>11} {'pause ms':>8}"
    ]
    for label, r in rows.items():
        lines.append(
            f"{label:46} {r.outcome:>13} {r.seconds:7.2f} {r.passes:6} {num(r.qemu_bytes):>13} "
            f"{num(r.link_bytes):>12} {num(r.downtime_ms):>11} {num(r.pause_ms):>8}"
        )
    return lines


def _link(sender: str) -> dict[str, str]:
    """migrate_through's arguments for SENDER on the source's side of the link, and on the
    destination's side what a user runs there: `migpipe decode` as its exec: command when the
    sender is migpipe encode, else `cat` (no extra stage on either path)."""
    receiver = f"{MIGPIPE} decode" if sender.startswith(f"{MIGPIPE} encode") else "cat"
    return {"sender": f"{sender} > {{fifo}}", "incoming": f"exec:{receiver} < {{fifo}}"}


def _not_converged(
    guest_elf: Path, build: qemuvm.QemuBuild, workdir: Path, sender: str, pacing: qemuvm.Pacing
) -> Row:
    """Migrate over SENDER, which must not manage a switchover within the downtime limit.

    The wire bytes are not known: the sender is cut off when the migration is cancelled, so
    `encode` writes no figures; plain `encode` puts on the wire what it reads, plus framing.
    """
    try:
        migration = qemuvm.migrate_through(
            guest_elf, "busy", workdir, pacing=pacing, qemu=build, **_link(sender)
        )
    except qemuvm.NotConverged as exc:
        ram = exc.info["ram"]
        # Not a near miss: what is still dirty is more than twice what the limit allows.
        assert ram["remaining"] > 2 * LINK_RATE * pacing.downtime_ms / 1000, exc.info
        return Row(
            outcome="gave up",
            seconds=exc.seconds,
            passes=exc.passes,
            qemu_bytes=ram["transferred"],
            link_bytes=None,
            downtime_ms=None,
            pause_ms=None,
        )
    # QEMU switched over anyway: one of its 100 ms bandwidth samples caught a burst (pv let
    # unused allowance through at once, over the bare link once in ~30 runs; the paced link
    # bursts 1 ms at most) and read it as several times the link's rate. That is no convergence:
    # what QEMU sent with the guest stopped still had to cross the link, so the guest's real
    # pause was at least downtime-bytes / link rate, more than the limit.
    info = migration.source_info
    ram = info["ram"]
    assert ram["downtime-bytes"] > LINK_RATE * pacing.downtime_ms / 1000, (
        f"converged for real: {migration.seconds:.2f} s, {ram['dirty-sync-count']} passes: {info}"
    )
    return Row(
        outcome="switched over",
        seconds=migration.seconds,
        passes=ram["dirty-sync-count"],
        qemu_bytes=ram["transferred"],
        link_bytes=None,
        downtime_ms=info.get("downtime"),
        pause_ms=round(migration.real_pause * 1000),
    )


def _converged(
    guest_elf: Path, build: qemuvm.QemuBuild, workdir: Path, sender: str, pacing: qemuvm.Pacing
) -> tuple[qemuvm.Migration, oracle.Replay]:
    """Migrate over SENDER, which must converge; check the destination against the oracle."""
    migration = qemuvm.migrate_through(
        guest_elf, "busy", workdir, pacing=pacing, qemu=build, **_link(sender)
    )
    assert migration.sender_status == 0
    assert migration.source_info["status"] == "completed"
    replay = oracle.replay(migration.source_stream)
    assert replay.pages_resent > 0  # a live, multi-pass migration
    diff = oracle.first_difference(migration.dest_memory, replay.image)
    assert diff is None, diff
    return migration, replay


def _row(migration: qemuvm.Migration, link_bytes: int) -> Row:
    info = migration.source_info
    return Row(
        outcome="converged",
        seconds=migration.seconds,
        passes=info["ram"]["dirty-sync-count"],
        qemu_bytes=migration.source_stream.stat().st_size,
        link_bytes=link_bytes,
        downtime_ms=info["downtime"],
        pause_ms=round(migration.real_pause * 1000),
    )


_controls: dict[tuple[str, int], Row] = {}


def _control(guest_elf: Path, build: qemuvm.QemuBuild, workdir: Path, limit: int) -> Row:
    """QEMU's own xbzrle over the bare link (once per build and limit): the reference."""
    key = (str(build), limit)
    if key not in _controls:
        pacing = dataclasses.replace(BUSY, downtime_ms=limit, xbzrle=True)
        migration, replay = _converged(guest_elf, build, workdir, LINK, pacing)
        assert replay.xbzrle_pages > 0
        _controls[key] = _row(migration, migration.source_stream.stat().st_size)
    return _controls[key]


@pytest.mark.parametrize("limit", LIMITS_MS)
def test_qemu_xbzrle_converges(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, record: Record, limit: int
) -> None:
    """The control: QEMU's own xbzrle, no migpipe. Its pause is QEMU's downtime and little more."""
    row = _control(guest_elf, qemu_build, tmp_path, limit)
    record(f"{qemu_build} {limit} ms: QEMU xbzrle, bare link", row)


@pytest.mark.parametrize("limit", LIMITS_MS)
def test_migpipe_xbzrle_converges_and_keeps_the_pause(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, record: Record, limit: int
) -> None:
    control = _control(guest_elf, qemu_build, tmp_path / "control", limit)
    stats_path = tmp_path / "encode.json"
    # The link keeps the wire (see qemuvm.migrate_through), not a tee of QEMU's bytes: a user
    # runs no tee, and on two cores its copy of every byte QEMU sends competes with the tunnel
    # for the CPU the guest does not use; nor a tee stage after encode, whose 64 KiB pipe
    # would hold tens of MB of pages when QEMU stops the guest.
    sender = f"{MIGPIPE} encode {FILTERS} --stats-json {shlex.quote(str(stats_path))}"
    sender += f" | {LINK} --record {{wire}}"
    pacing = dataclasses.replace(BUSY, downtime_ms=limit)
    migration, _ = _converged(guest_elf, qemu_build, tmp_path, sender, pacing)
    stats = json.loads(stats_path.read_text())
    assert stats["qemu_bytes"] == migration.source_stream.stat().st_size
    counters = stats["filters"]["xbzrle"]
    assert counters["hits"] > REGION_PAGES // 2, counters  # deltas, not just a lucky pass
    row = _row(migration, stats["wire_bytes"])
    record(f"{qemu_build} {limit} ms: encode {FILTERS}", row)
    assert row.link_bytes <= LINK_SHARE * control.link_bytes, (row, control, counters)
    assert row.pause_ms - row.downtime_ms <= TAIL_MS, row
    if limit == 300:  # exec: tells QEMU nothing: see the module's docstring
        assert row.pause_ms <= limit + SLACK_MS, row


def test_the_link_alone_is_too_slow_for_the_busy_guest(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, record: Record
) -> None:
    """No migpipe and no xbzrle: QEMU's estimate of the bare link is sound, and it iterates."""
    pacing = dataclasses.replace(BUSY, give_up_pass=GIVE_UP, give_up_seconds=0)
    row = _not_converged(guest_elf, qemu_build, tmp_path, LINK, pacing)
    record(f"{qemu_build} 300 ms: bare link (control)", row)


def test_without_xbzrle_the_migration_does_not_converge(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, record: Record
) -> None:
    pacing = dataclasses.replace(BUSY, give_up_pass=GIVE_UP, give_up_seconds=0)
    row = _not_converged(guest_elf, qemu_build, tmp_path, f"{MIGPIPE} encode | {LINK}", pacing)
    record(f"{qemu_build} 300 ms: encode (no xbzrle)", row)


@pytest.mark.parametrize("limit", LIMITS_MS)
def test_migrate_qmp_xbzrle_converges_and_keeps_the_pause(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, record: Record, limit: int
) -> None:
    """The same through `migpipe migrate --qmp` and `incoming --qmp`, as a management daemon
    drives them: the link is the command between them, and it keeps what crossed it for the
    oracle. migrate's own figure of the pause must be what the VMs' events say."""
    control = _control(guest_elf, qemu_build, tmp_path / "control", limit)
    src_qmp, dst_qmp = tmp_path / "src.qmp", tmp_path / "dst.qmp"
    wire, stats_path = tmp_path / "wire", tmp_path / "migrate.json"
    incoming = shlex.join([*MIGPIPE_ARGS, "incoming", "--qmp", str(dst_qmp)])
    link = f"{LINK} --record {shlex.quote(str(wire))} | {incoming}"
    pacing = dataclasses.replace(BUSY, downtime_ms=limit)
    dest_args = ["-S", "-incoming", "defer", *qemuvm.qmp_socket_args(dst_qmp)]
    with (
        qemuvm.Vm(tmp_path, "dest", dest_args, qemu=qemu_build) as dest,
        qemuvm.source_vm(
            guest_elf,
            "busy",
            tmp_path,
            pacing=pacing,
            args=qemuvm.qmp_socket_args(src_qmp),
            qemu=qemu_build,
        ) as src,
    ):
        command = [*MIGPIPE_ARGS, "migrate", "--qmp", str(src_qmp), *FILTERS.split()]
        command += ["--stats-json", str(stats_path), "--", "sh", "-c", link]
        start = time.monotonic()
        migrate = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            status = _follow(src, pacing.give_up_seconds)
            seconds = time.monotonic() - start
            _, err = migrate.communicate(timeout=qemuvm.MIGRATION_TIMEOUT)
        finally:
            migrate.kill()
            migrate.wait()
        assert status == "completed", err
        assert migrate.returncode == 0, err
        loaded = qemuvm.wait_incoming(dest)
        stop = src.qmp.wait_event("STOP")  # queued while the migration ran
        memory = dest.pmemsave(tmp_path / "dest.mem")
        info = src.qmp.execute("query-migrate")
        told = SWITCHOVER_BANDWIDTH in src.qmp.execute("query-migrate-parameters")
    stream = tmp_path / "sent.stream"
    subprocess.run([*MIGPIPE_ARGS, "decode", "--in", str(wire), "--out", str(stream)], check=True)
    replay = oracle.replay(stream)
    assert replay.pages_resent > 0
    diff = oracle.first_difference(memory, replay.image)
    assert diff is None, diff
    pause = json.loads(stats_path.read_text())["real_pause"]
    events_ms = (qemuvm.event_time(loaded) - qemuvm.event_time(stop)) * 1000
    row = Row(
        outcome="converged",
        seconds=seconds,
        passes=info["ram"]["dirty-sync-count"],
        qemu_bytes=stream.stat().st_size,
        link_bytes=wire.stat().st_size,
        downtime_ms=info["downtime"],
        pause_ms=round(events_ms),
    )
    record(f"{qemu_build} {limit} ms: migrate --qmp {FILTERS}", row)
    assert abs(pause["ms"] - events_ms) <= 10, (pause, events_ms)  # migrate's figure is right
    assert row.link_bytes <= LINK_SHARE * control.link_bytes, (row, control)
    assert row.pause_ms - row.downtime_ms <= TAIL_MS, row
    if limit == 300 or told:  # QEMU 8.2+ was told the tunnel's rate: see the module's docstring
        assert row.pause_ms <= limit + SLACK_MS, row


def _follow(src: qemuvm.Vm, give_up_seconds: float) -> str:
    """The source's final migration status, on the harness's own monitor; a migration still
    running after `give_up_seconds` is cancelled (not converged), as run_migration does."""
    deadline = time.monotonic() + give_up_seconds
    while True:
        try:
            event = src.qmp.wait_event("MIGRATION", timeout=max(deadline - time.monotonic(), 0.1))
        except TimeoutError:
            src.qmp.execute("migrate_cancel")
            return f"not converged in {give_up_seconds:.0f} s: cancelled"
        if event["data"]["status"] in ("completed", "failed", "cancelled"):
            return event["data"]["status"]
