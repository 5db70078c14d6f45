"""QEMU's socket migrations through the two-way tunnel (`encode --qemu`, `decode --qemu`), on
QEMU 7.2 and 10.0: the return path, switchover-ack and postcopy, whose messages travel from the
destination QEMU back to the source through the wire's answer direction.

The source migrates to `unix:` where encode listens; decode connects to the destination's
`migrate-incoming unix:`; the wire between them is a UNIX socket. Memory is compared where it can
be known: a source paused before the migration holds exactly what the destination must hold.
"""

import json
import subprocess
import threading
from pathlib import Path

import pytest
import qemuvm
from link import Link
from support import MIGPIPE

from migpipe.io.tlsinit import tls_init
from migpipe.keys import keygen

pytestmark = pytest.mark.qemu


class Tunnel:
    """encode listening for the source QEMU (-v says when), decode for encode's wire; or with
    `reverse`, encode listening for decode's. `connections`: encode --connections."""

    def __init__(
        self,
        tmp_path: Path,
        filters: list[str],
        reader: list[str] = (),
        rate: float | None = None,
        connections: int = 1,
        reverse: bool = False,
    ) -> None:
        self.wire = wire = f"unix:{tmp_path / 'wire.sock'}"
        self.src, self.dst = tmp_path / "src.sock", tmp_path / "dst.sock"
        spread = ["--connections", str(connections)] if connections > 1 else []
        encode = [*MIGPIPE, "-v", "encode", "--qemu", f"unix:{self.src}", *spread, *filters]
        decode = [*MIGPIPE, "-v", "decode", "--qemu", f"unix:{self.dst}", *reader]
        self.link = None
        if reverse:  # encode listens for the wire, then for QEMU once decode connected
            self.encode = subprocess.Popen([*encode, "--listen", wire], stderr=subprocess.PIPE)
            said = self._until_listening(self.encode)
            self.decode = subprocess.Popen([*decode, "--connect", wire], stderr=subprocess.PIPE)
            said += self._until_listening(self.encode)
            self.errors = {"encode": said, "decode": b""}
        else:
            self.decode = subprocess.Popen([*decode, "--listen", wire], stderr=subprocess.PIPE)
            self.errors = {"encode": b"", "decode": self._until_listening(self.decode)}
            if rate is not None:  # encode reaches decode through a link of that rate
                self.link = Link(f"unix:{tmp_path / 'link.sock'}", wire, rate=rate).start()
                wire = self.link.address
            self.encode = subprocess.Popen([*encode, "--connect", wire], stderr=subprocess.PIPE)
            self._until_listening(self.encode)
        self.relayed: list = []  # what each of the link's connections carried, once closed
        self._readers = [
            threading.Thread(target=self._drain, args=(name, process))
            for name, process in (("encode", self.encode), ("decode", self.decode))
        ]
        for reader_thread in self._readers:
            reader_thread.start()

    def wire_connections(self) -> int:
        """How many connections the wire had (decode -v: accepted, or connected to the wire)."""
        said = self.errors["decode"]
        return said.count(b"accepted a connection on") + said.count(
            f"connected to {self.wire}".encode()
        )

    @staticmethod
    def _until_listening(process: subprocess.Popen) -> bytes:
        """What `process` said until it said it listens (-v), which it must."""
        lines = []
        while b"listening on unix:" not in (line := process.stderr.readline()):
            assert line, b"".join(lines).decode()  # it ended before it listened
            lines.append(line)
        return b"".join(lines)

    def _drain(self, name: str, process: subprocess.Popen) -> None:
        self.errors[name] += process.stderr.read()

    def statuses(self) -> tuple[int, int]:
        """encode's and decode's exit statuses, once both ended."""
        codes = self.encode.wait(timeout=60), self.decode.wait(timeout=60)
        for reader_thread in self._readers:
            reader_thread.join()
        if self.link is not None:
            self.relayed = self.link.close()
        return codes


def capabilities(vm: qemuvm.Vm, *names: str) -> None:
    caps = [{"capability": name, "state": True} for name in ("events", *names)]
    vm.qmp.execute("migrate-set-capabilities", capabilities=caps)


@pytest.mark.parametrize(
    "filters",
    [[], ["--xbzrle", "--compress", "zstd:1"], ["--xbzrle", "--filters", "zstd:1,encrypt"]],
    ids=["plain", "xbzrle-zstd", "xbzrle-zstd-encrypt"],
)
@pytest.mark.parametrize("caps", [("return-path",), ("postcopy-ram",)])
def test_a_paused_guest_with_the_return_path(
    guest_elf: Path,
    qemu_build: qemuvm.QemuBuild,
    tmp_path: Path,
    caps: tuple[str, ...],
    filters: list[str],
) -> None:
    """Sealed too: the return path's messages cross the answer direction encrypted."""
    key = tmp_path / "key"
    keygen(key)
    sealed = ["--key-file", str(key)] if "zstd:1,encrypt" in filters else []
    tunnel = Tunnel(tmp_path, [*filters, *sealed], sealed)
    with (
        qemuvm.source_vm(guest_elf, "idle", tmp_path, qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-S", "-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        capabilities(dest, *caps)
        dest.qmp.execute("migrate-incoming", uri=f"unix:{tunnel.dst}")
        capabilities(src, *caps)
        src.qmp.execute("migrate", uri=f"unix:{tunnel.src}")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=60)
        qemuvm.wait_incoming(dest)
        assert tunnel.statuses() == (0, 0), tunnel.errors
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")


def test_switchover_ack_passes_through(guest_elf: Path, tmp_path: Path) -> None:
    """switchover-ack (QEMU 8.1+, so 10.0 here): the source switches over only once the
    destination said on the return path (SWITCHOVER_ACK) that its devices are ready, which
    it says through the wire's answer direction; the destination holds the paused source's
    memory."""
    build = qemuvm.QEMU_10_0
    tunnel = Tunnel(tmp_path, [])
    with (
        qemuvm.source_vm(guest_elf, "idle", tmp_path, qemu=build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-S", "-incoming", "defer"], qemu=build) as dest,
    ):
        for vm in (dest, src):
            capabilities(vm, "return-path", "switchover-ack")
        dest.qmp.execute("migrate-incoming", uri=f"unix:{tunnel.dst}")
        src.qmp.execute("migrate", uri=f"unix:{tunnel.src}")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=60)
        qemuvm.wait_incoming(dest)
        caps = {c["capability"]: c["state"] for c in src.qmp.execute("query-migrate-capabilities")}
        assert caps["switchover-ack"], caps
        assert tunnel.statuses() == (0, 0), tunnel.errors
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")


def migrate_multifd(
    guest_elf: Path,
    qemu_build: qemuvm.QemuBuild,
    tmp_path: Path,
    tunnel: Tunnel,
    channels: int,
    kind: str = "idle",
) -> tuple[bytes, bytes]:
    """A multifd migration of `channels` channels through `tunnel` into a paused destination:
    the source's and the destination's memory once it completed. An "idle" source is paused
    before it starts; a "dirty" one at its third pass, so its memory is what must arrive."""
    with (
        qemuvm.source_vm(guest_elf, kind, tmp_path, qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-S", "-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        for vm in (dest, src):
            capabilities(vm, "multifd")
            vm.qmp.execute("migrate-set-parameters", **{"multifd-channels": channels})
        dest.qmp.execute("migrate-incoming", uri=f"unix:{tunnel.dst}")
        src.qmp.execute("migrate", uri=f"unix:{tunnel.src}")
        if kind == "dirty":
            src.qmp.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 3, timeout=60)
            src.qmp.execute("stop")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=60)
        qemuvm.wait_incoming(dest)
        assert tunnel.statuses() == (0, 0), tunnel.errors
        return src.pmemsave(tmp_path / "s.mem"), dest.pmemsave(tmp_path / "d.mem")


@pytest.mark.parametrize(
    "channels,wire,connections,reverse",
    [
        (2, "plain", 1, False),
        (4, "sealed", 1, False),
        (2, "tls", 1, False),
        (4, "sealed", 3, True),
        (2, "tls", 3, False),
    ],
    ids=["2-plain", "4-sealed", "2-tls", "4-sealed-3-connections-reverse", "2-tls-3-connections"],
)
def test_multifd_channels_each_a_lane(
    guest_elf: Path,
    qemu_build: qemuvm.QemuBuild,
    tmp_path: Path,
    channels: int,
    wire: str,
    connections: int,
    reverse: bool,
) -> None:
    """QEMU's multifd connections each cross as a lane of their own, through zstd and encrypt,
    or over TLS, opened at the destination in QEMU's order; the destination holds the paused
    source's memory. Spread over several connections of the wire (encode --connections), each
    TLS too, whichever end opens them: 4 channels on 2 further connections share them (lanes
    1 and 3, 2 and 4), 2 on 2 have one each."""
    key, creds = tmp_path / "key", tmp_path / "creds"
    keygen(key)
    if wire == "sealed":
        filters = ["--filters", "zstd:1,encrypt", "--key-file", str(key)]
        reader = ["--key-file", str(key)]
    elif wire == "tls":
        tls_init(creds, "Test CA", ["localhost"], "source")
        reader = ["--tls-creds", str(creds)]
        filters = [*reader, "--tls-hostname", "localhost"]
    else:
        filters = reader = []
    tunnel = Tunnel(tmp_path, filters, reader, connections=connections, reverse=reverse)
    source, destination = migrate_multifd(guest_elf, qemu_build, tmp_path, tunnel, channels)
    assert destination == source
    # decode -v: one connection to the destination per lane, the main one and each channel's
    assert tunnel.errors["decode"].count(f"connected to unix:{tunnel.dst}".encode()) == 1 + channels
    assert tunnel.wire_connections() == connections


LINK_RATE = 30e6  # bytes/s: the link of the measurements in issues 17 and 21


def postcopy(
    src: qemuvm.Vm, dest: qemuvm.Vm, src_uri: str, dest_uri: str, caps: tuple[str, ...] = ()
) -> dict:
    """A postcopy migration as libvirt runs one: precopy first, migrate-start-postcopy once the
    second pass began; the source's query-migrate once both QEMUs completed."""
    capabilities(dest, "postcopy-ram", *caps)
    dest.qmp.execute("migrate-incoming", uri=dest_uri)
    capabilities(src, "postcopy-ram", *caps)
    src.qmp.execute("migrate", uri=src_uri)
    src.qmp.wait_event("MIGRATION_PASS", lambda e: e["data"]["pass"] >= 2, timeout=60)
    src.qmp.execute("migrate-start-postcopy")
    src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=120)
    qemuvm.wait_incoming(dest)
    return src.qmp.execute("query-migrate")


def test_postcopy_of_a_busy_guest_over_a_slow_link(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    """The destination runs the guest while its pages still cross a 30 MB/s link, so each page
    it touches first is requested over the return path (through the answer direction) and
    comes forward in the stream; QEMU's own postcopy over the same link does the same."""
    own_dst = f"unix:{tmp_path / 'own-dst.sock'}"
    with (
        Link(f"unix:{tmp_path / 'own.sock'}", own_dst, rate=LINK_RATE) as own,
        qemuvm.source_vm(guest_elf, "busy", tmp_path, qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "own-dest", ["-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        alone = postcopy(src, dest, own.address, own_dst)
    tunnel = Tunnel(tmp_path, [], rate=LINK_RATE)  # as slow as QEMU's own: pages are asked for
    with (
        qemuvm.source_vm(guest_elf, "busy", tmp_path, name="src2", qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        through = postcopy(src, dest, f"unix:{tunnel.src}", f"unix:{tunnel.dst}")
        assert dest.qmp.execute("query-status")["status"] == "running"
    assert tunnel.statuses() == (0, 0), tunnel.errors
    assert alone["ram"]["postcopy-requests"] > 0  # the guest faulted pages in over the link
    assert through["ram"]["postcopy-requests"] > 0  # and through migpipe's answer direction


@pytest.mark.parametrize("path", ["xbzrle-zstd", "zstd-encrypt", "tls"])
def test_postcopy_of_a_busy_guest_filtered_sealed_and_over_tls(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, path: str
) -> None:
    """The busy guest in postcopy over the 30 MB/s link through xbzrle and zstd, through zstd
    and encrypt (the return path's requests cross sealed), and over TLS, with preempt on its
    own connection as migrate sets it: both QEMUs complete, the guest runs on the
    destination, and (but with xbzrle, whose precopy can leave no page to ask for) the
    destination's requests crossed back, as many as the source answered."""
    key, creds = tmp_path / "key", tmp_path / "creds"
    if path == "xbzrle-zstd":
        filters, reader = ["--xbzrle", "--compress", "zstd:1"], []
    elif path == "zstd-encrypt":
        keygen(key)
        reader = ["--key-file", str(key)]
        filters = ["--filters", "zstd:1,encrypt", *reader]
    else:
        tls_init(creds, "Test CA", ["localhost"], "source")
        reader = ["--tls-creds", str(creds)]
        filters = [*reader, "--tls-hostname", "localhost"]
    stats = tmp_path / "decode.json"
    tunnel = Tunnel(
        tmp_path,
        filters,
        [*reader, "--stats-json", str(stats)],
        rate=LINK_RATE,
        connections=2,
    )
    with (
        qemuvm.source_vm(guest_elf, "busy", tmp_path, qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        info = postcopy(
            src, dest, f"unix:{tunnel.src}", f"unix:{tunnel.dst}", ("postcopy-preempt",)
        )
        assert info["status"] == "completed"
        assert dest.qmp.execute("query-status")["status"] == "running"
    assert tunnel.statuses() == (0, 0), tunnel.errors
    requests = info["ram"]["postcopy-requests"]
    assert path == "xbzrle-zstd" or requests > 0
    timed = json.loads(stats.read_text()).get("postcopy_requests")
    assert (timed or {"requests": 0})["requests"] == requests, timed


@pytest.mark.parametrize("connections", [1, 2])
def test_postcopy_preempt_over_a_slow_link(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, connections: int
) -> None:
    """postcopy-preempt, which libvirt 10+ turns on with postcopy: QEMU opens a second
    connection without a magic number, for the pages the destination asked for, and the
    destination knows it only as the one after the main stream. It crosses as a lane of its
    own, opened at the destination in that order, while the guest runs there. With
    --connections 2 that lane has the wire's second connection to itself, as QEMU's own
    preempt channel has a connection of its own: the link carries both, and the requested
    pages cross the second. On 10.0 the self-checking guest, paused on the destination
    afterwards, finds every page it wrote at its count (7.2's TCG can leave a page of a live
    guest stale by itself, so there the busy guest runs)."""
    kind = "check" if qemu_build is qemuvm.QEMU_10_0 else "busy"
    stats = tmp_path / "decode.json"
    tunnel = Tunnel(
        tmp_path, [], ["--stats-json", str(stats)], rate=LINK_RATE, connections=connections
    )
    with (
        qemuvm.source_vm(guest_elf, kind, tmp_path, qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        info = postcopy(
            src, dest, f"unix:{tunnel.src}", f"unix:{tunnel.dst}", ("postcopy-preempt",)
        )
        assert dest.qmp.execute("query-status")["status"] == "running"
        if kind == "check":
            dest.qmp.execute("stop")
            assert qemuvm.check_image(dest.pmemsave(tmp_path / "d.mem")) > 0
    assert tunnel.statuses() == (0, 0), tunnel.errors
    assert info["ram"]["postcopy-requests"] > 0
    # decode -v: the main stream's connection and the preempt channel's
    assert tunnel.errors["decode"].count(f"connected to unix:{tunnel.dst}".encode()) == 2, (
        tunnel.errors
    )
    assert len(tunnel.relayed) == connections
    # decode saw each of the destination's requests go back, and timed its page's arrival
    timed = json.loads(stats.read_text())["postcopy_requests"]
    assert timed["requests"] == info["ram"]["postcopy-requests"], timed
    assert 0 < timed["answered"] <= timed["requests"], timed
    assert 0 < timed["median_ms"] <= timed["p90_ms"] <= timed["max_ms"], timed
    if connections == 2:  # the preempt channel's pages (4 KiB each) went on the second
        assert tunnel.relayed[1].forward >= info["ram"]["postcopy-requests"] * 4096 // 2


def test_a_paused_guest_with_the_return_path_over_tls(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path
) -> None:
    """--qemu over --tls-creds: the wire's answers (the destination's return-path messages) are
    read in one thread of each end while others write frames, through one TLS channel."""
    creds = tmp_path / "creds"
    tls_init(creds, "Test CA", ["localhost"], "source")
    tls = ["--tls-creds", str(creds)]
    tunnel = Tunnel(tmp_path, [*tls, "--tls-hostname", "localhost"], tls)  # a UNIX socket wire
    with (
        qemuvm.source_vm(guest_elf, "idle", tmp_path, qemu=qemu_build) as src,
        qemuvm.Vm(tmp_path, "dest", ["-S", "-incoming", "defer"], qemu=qemu_build) as dest,
    ):
        capabilities(dest, "postcopy-ram")
        dest.qmp.execute("migrate-incoming", uri=f"unix:{tunnel.dst}")
        capabilities(src, "postcopy-ram")
        src.qmp.execute("migrate", uri=f"unix:{tunnel.src}")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=60)
        qemuvm.wait_incoming(dest)
        assert tunnel.statuses() == (0, 0), tunnel.errors
        assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")


@pytest.mark.parametrize("mode", ["return-path", "multifd", "postcopy-preempt"])
def test_a_second_migration_into_encode_is_refused(
    guest_elf: Path, qemu_build: qemuvm.QemuBuild, tmp_path: Path, mode: str
) -> None:
    """Another QEMU migrating to the address encode listens on while one migrates through it
    (a retry, a second guest given the same socket) is refused in one line: its migration
    fails and its guest runs on there, and the first completes, the destination holding what
    its paused source holds (or, in postcopy, running the guest). The first is held at 1 MB/s
    (QEMU's max-bandwidth) until then. With postcopy-preempt the intruder may be taken for the
    preempt channel, which says nothing before a page is asked for: its lane then waits for
    the real one (QEMU 10.0 opens it when postcopy starts, 7.2 at once)."""
    caps = {"multifd": ("multifd",), "postcopy-preempt": ("postcopy-ram", "postcopy-preempt")}
    caps = caps.get(mode, (mode,))
    postcopy = mode == "postcopy-preempt"
    tunnel = Tunnel(tmp_path, [], rate=LINK_RATE)
    with (
        qemuvm.source_vm(
            guest_elf, "busy" if postcopy else "idle", tmp_path, qemu=qemu_build
        ) as src,
        qemuvm.Vm(tmp_path, "dest", ["-incoming", "defer"], qemu=qemu_build) as dest,
        qemuvm.source_vm(guest_elf, "busy", tmp_path, name="second", qemu=qemu_build) as second,
    ):
        for vm in (dest, src):
            capabilities(vm, *caps)
        dest.qmp.execute("migrate-incoming", uri=f"unix:{tunnel.dst}")
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
        src.qmp.execute("migrate", uri=f"unix:{tunnel.src}")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "active", timeout=60)
        capabilities(second)
        second.qmp.execute("migrate", uri=f"unix:{tunnel.src}")
        second.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "failed", timeout=60)
        assert second.qmp.execute("query-status")["status"] == "running"
        assert src.qmp.execute("query-migrate")["status"] == "active"
        src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
        if postcopy:
            src.qmp.execute("migrate-start-postcopy")
        src.qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=120)
        qemuvm.wait_incoming(dest)
        if postcopy:
            assert dest.qmp.execute("query-status")["status"] == "running"
        else:
            assert dest.pmemsave(tmp_path / "d.mem") == src.pmemsave(tmp_path / "s.mem")
    assert tunnel.statuses() == (0, 0), tunnel.errors
    refused = [line for line in tunnel.errors["encode"].splitlines() if b"refused" in line]
    assert refused == [
        f"migpipe encode: warning: refused a connection on unix:{tunnel.src}: it is another "
        "migration stream (QEMU's header): one QEMU migrates per encode".encode()
    ], tunnel.errors["encode"]
