"""Convergence over a 30 MB/s link: with XBZRLE a busy guest migrates, without it it does not.

The "busy" guest (qemuvm.GUEST_APPEND) writes single bytes all over its 32 MiB region, so every
pass leaves ~32 MiB to send again: far more than a 30 MB/s link (`pv -q -L 30m` between encode
and decode) carries within QEMU's default 300 ms downtime limit, but nearly all of it pages
that an XBZRLE delta carries in a few bytes. PACINGS["busy"] leaves the switchover to QEMU from
pass 3 on (see there why not from pass 1) and gives up, cancelling, after `give_up_pass`.

Three migrations of it over the same link: `migpipe encode` alone must not converge; `encode
--xbzrle` and QEMU's own xbzrle capability must, with the destination holding exactly what the
source sent (tests/oracle.py), checked the same way for both. A control shows that the guest is
too busy for the link by itself, with no migpipe and QEMU deciding from pass 1.

"Must not converge" is: the harness gives up at pass GIVE_UP (NotConverged), or QEMU, misled
about the link's speed, switches over with more left to send than the link carries within the
downtime limit (see _not_converged). The module prints a comparison (seconds, passes,
bytes) at its end; each test also records its figures with `record_property` (--junitxml).
"""

import dataclasses
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oracle
import pytest
import qemuvm
from support import MIGPIPE_SHELL as MIGPIPE

pytestmark = pytest.mark.qemu
LINK = "pv -q -L 30m"
LINK_RATE = 30 << 20  # bytes per second: pv's "m" is MiB
DOWNTIME_S = 0.3  # QEMU's default downtime limit, PACINGS["busy"] from pass 3 on
GIVE_UP = 8  # passes: ~6 s without XBZRLE (the converging runs took 5-11, under BUSY's 20)
BUSY = qemuvm.PACINGS["busy"]
REGION_PAGES = 8192  # the guest's dirtied region (tests/guest/guest.c)


@dataclass
class Row:
    """One migration over the link, for the comparison."""

    outcome: str  # "converged", "gave up", or "switched over" (misled: see _not_converged)
    seconds: float  # `migrate` to destination loaded, or to the give-up pass
    passes: int  # QEMU's dirty-sync count
    qemu_bytes: int  # what the source sent
    wire_bytes: int | None  # what crossed the link (None: not known, see the callers)
    downtime_ms: int | None  # QEMU's own figure (it ends when the last byte enters the sender)
    downtime_bytes: int | None  # what QEMU sent with the guest stopped


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
        f"{'':24} {'outcome':>13} {'seconds':>7} {'passes':>6} {'QEMU bytes':>12} "
        f"{'wire bytes':>12} {'downtime ms':>11} {'downtime B':>11}"
    ]
    for label, r in rows.items():
        lines.append(
            f"{label:24} {r.outcome:>13} {r.seconds:7.2f} {r.passes:6} {num(r.qemu_bytes):>12} "
            f"{num(r.wire_bytes):>12} {num(r.downtime_ms):>11} {num(r.downtime_bytes):>11}"
        )
    return lines


def _not_converged(guest_elf: Path, workdir: Path, sender: str, pacing: qemuvm.Pacing) -> Row:
    """Migrate over SENDER, which must not manage a switchover within the downtime limit.

    The wire bytes are not known: the sender is cut off when the migration is cancelled, so
    `encode` writes no figures; plain `encode` puts on the wire what it reads, plus framing.
    """
    try:
        migration = qemuvm.migrate_through(guest_elf, "busy", workdir, sender=sender, pacing=pacing)
    except qemuvm.NotConverged as exc:
        ram = exc.info["ram"]
        # Not a near miss: what is still dirty is more than twice what the limit allows.
        assert ram["remaining"] > 2 * LINK_RATE * DOWNTIME_S, exc.info
        return Row(
            outcome="gave up",
            seconds=exc.seconds,
            passes=exc.passes,
            qemu_bytes=ram["transferred"],
            wire_bytes=None,
            downtime_ms=None,
            downtime_bytes=None,
        )
    # QEMU switched over anyway. Behind `migpipe encode` that happens now and then: QEMU sees
    # the link through encode's read-ahead (~20 MB), and when that has drained it takes a
    # burst that one of QEMU's 100 ms bandwidth samples reads as several times the link's
    # rate (in one run QEMU then sent 25.9 MB in its "219 ms" of downtime). That is no
    # convergence: what QEMU sent with the guest stopped still had to cross the link, so the
    # guest's real downtime was at least downtime-bytes / link rate, more than the limit
    # (measured: 1.6 s for 33.5 MB; with XBZRLE those bytes shrink, so no such bound holds).
    info = migration.source_info
    ram = info["ram"]
    assert ram["downtime-bytes"] > LINK_RATE * DOWNTIME_S, (
        f"converged for real: {migration.seconds:.2f} s, {ram['dirty-sync-count']} passes: {info}"
    )
    return Row(
        outcome="switched over",
        seconds=migration.seconds,
        passes=ram["dirty-sync-count"],
        qemu_bytes=ram["transferred"],
        wire_bytes=None,
        downtime_ms=info.get("downtime"),
        downtime_bytes=ram["downtime-bytes"],
    )


def _converged(
    guest_elf: Path, workdir: Path, filters: str, pacing: qemuvm.Pacing
) -> tuple[Row, dict[str, Any], oracle.Replay]:
    """Migrate over `encode FILTERS | LINK | decode`; check the destination against the oracle."""
    stats_path = workdir / "encode.json"
    sender = (
        f"{MIGPIPE} encode {filters} --stats-json {shlex.quote(str(stats_path))} "
        f"| {LINK} | {MIGPIPE} decode > {{fifo}}"
    )
    migration = qemuvm.migrate_through(guest_elf, "busy", workdir, sender=sender, pacing=pacing)
    assert migration.sender_status == 0
    info = migration.source_info
    assert info["status"] == "completed"
    replay = oracle.replay(migration.source_stream)
    assert replay.pages_resent > 0  # a live, multi-pass migration
    diff = oracle.first_difference(migration.dest_memory, replay.image)
    assert diff is None, diff
    stats = json.loads(stats_path.read_text())
    assert stats["qemu_bytes"] == migration.source_stream.stat().st_size
    row = Row(
        outcome="converged",
        seconds=migration.seconds,
        passes=info["ram"]["dirty-sync-count"],
        qemu_bytes=stats["qemu_bytes"],
        wire_bytes=stats["wire_bytes"],
        downtime_ms=info.get("downtime"),
        downtime_bytes=info["ram"]["downtime-bytes"],
    )
    return row, stats, replay


def test_the_link_alone_is_too_slow_for_the_busy_guest(
    guest_elf: Path, tmp_path: Path, record: Record
) -> None:
    """The control: no migpipe, and QEMU's 300 ms limit from pass 1 (its estimate is sound)."""
    pacing = dataclasses.replace(
        BUSY, downtime_ms=300, switchover_pass=None, give_up_pass=GIVE_UP, give_up_seconds=0
    )
    row = _not_converged(guest_elf, tmp_path, f"{LINK} > {{fifo}}", pacing)
    record("plain pv link (control)", row)


def test_without_xbzrle_the_migration_does_not_converge(
    guest_elf: Path, tmp_path: Path, record: Record
) -> None:
    sender = f"{MIGPIPE} encode | {LINK} | {MIGPIPE} decode > {{fifo}}"
    pacing = dataclasses.replace(BUSY, give_up_pass=GIVE_UP, give_up_seconds=0)
    record("encode (no xbzrle)", _not_converged(guest_elf, tmp_path, sender, pacing))


def test_migpipe_xbzrle_converges(guest_elf: Path, tmp_path: Path, record: Record) -> None:
    row, stats, _ = _converged(guest_elf, tmp_path, "--xbzrle", BUSY)
    counters = stats["filters"]["xbzrle"]
    assert counters["hits"] > REGION_PAGES // 2, counters  # deltas, not just a lucky pass
    assert stats["wire_bytes"] < stats["qemu_bytes"]
    record("encode --xbzrle", row)


def test_qemu_xbzrle_converges(guest_elf: Path, tmp_path: Path, record: Record) -> None:
    row, _, replay = _converged(guest_elf, tmp_path, "", dataclasses.replace(BUSY, xbzrle=True))
    assert replay.xbzrle_pages > 0
    record("QEMU xbzrle + encode", row)
