"""QEMU 7.2's and 10.0's multifd channels through `encode --qemu --xbzrle`: each channel's pages
cross its lane as deltas against the lane's mirrored cache (migpipe.tunnel.multifdcodec).

The guest dirties memory through several passes, then the source is paused while it still
migrates (QMP `stop` at the third pass): the pages dirtied before are sent again with the guest
still, so the source's memory once the migration completed is what the destination must hold
(a source left running under TCG is no oracle on 7.2).
"""

import json
from pathlib import Path

import pytest
import qemuvm
from test_qemu_twoway import Tunnel, migrate_multifd

pytestmark = pytest.mark.qemu

CHANNELS = 2


def migrate(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, kind: str
) -> tuple[bytes, bytes, dict[str, int]]:
    """A migration with CHANNELS multifd channels through `encode --xbzrle`: the source's and
    the destination's memory once it completed, and encode's multifd-xbzrle figures. A "dirty"
    source is paused at the third pass, an "idle" one before it starts."""
    stats = tmp_path / "encode.json"
    tunnel = Tunnel(tmp_path, ["--xbzrle", "--stats-json", str(stats)])
    memory = migrate_multifd(guest_elf, qemu_build, tmp_path, tunnel, CHANNELS, kind)
    figures = json.loads(stats.read_text())["filters"]["multifd-xbzrle"]
    assert figures["lanes"] == CHANNELS
    return *memory, figures


def test_a_dirty_guests_pages_cross_as_deltas(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    """Pages sent again on the lane that sent them before cross as deltas. On 10.0 the source
    paused mid-migration holds the destination's memory; on 7.2 it does not, through lanes
    without xbzrle too (the paused source below is 7.2's oracle)."""
    src, dest, figures = migrate(guest_elf, qemu_build, tmp_path, "dirty")
    print(qemu_build.version, figures)  # the per-lane cache's hit rate (issue 18)
    assert figures["hits"] > 0
    if qemu_build.version != "7.2":
        assert dest == src


def test_a_paused_source_crosses_through_the_codec(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    """Pages cross whole in the codec's payloads (7.2 sends a few again even from a paused
    source: deltas), rebuilt byte for byte."""
    src, dest, figures = migrate(guest_elf, qemu_build, tmp_path, "idle")
    assert figures["misses"] > 1000
    assert dest == src
