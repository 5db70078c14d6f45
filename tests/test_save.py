"""save and restore: both layouts, with compression and encryption; never a half file; a damaged
file never restores into a stream a QEMU could complete."""

import functools
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
import trio
from support import MIGPIPE, migpipe, synthetic_stream
from test_tunnel import eof_at

from migpipe.cli import EXIT_INTERRUPTED
from migpipe.errors import MigpipeError
from migpipe.io.channel import NOT_A_STREAM
from migpipe.keys import keygen
from migpipe.running import run_trio
from migpipe.stream.writer import write_records
from migpipe.tools.synthetic import GuestModel, SyntheticGuest

RAM = 8 << 20


def synthetic(iterations: int, dirty: float = 0.3, ram: int = RAM) -> bytes:
    return synthetic_stream(ram, iterations, dirty)


@pytest.fixture(scope="module")
def stream() -> bytes:
    return synthetic(iterations=4)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "key"
    keygen(path)
    return path


CHAINS = [[], ["--compress", "zstd:1"], ["--compress", "lz4"], ["--compress", "zstd", "--encrypt"]]


@pytest.mark.parametrize("layout", ["stream", "fixed"])
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: " ".join(c) or "plain")
def test_round_trip(tmp_path: Path, stream: bytes, key: Path, layout: str, chain: list) -> None:
    saved = tmp_path / "vm.mig"
    keyed = ["--key-file", str(key)] if "--encrypt" in chain else []
    result = migpipe("save", str(saved), "--layout", layout, *chain, *keyed, stdin=stream)
    assert result.returncode == 0, result.stderr
    restored = migpipe("restore", str(saved), *keyed)
    assert restored.returncode == 0, restored.stderr
    if layout == "stream":
        assert restored.stdout == stream
    else:  # each page once, holding what the stream left in it
        original, compact = oracle.replay(stream), oracle.replay(restored.stdout)
        assert original.pages_resent > 0 and compact.max_sends == 1
        assert oracle.first_difference(compact.image, original.image) is None
        assert restored.stdout[eof_at(restored.stdout) :] == stream[eof_at(stream) :]
    if "--encrypt" in chain:
        assert stream[100_000:100_064] not in saved.read_bytes()


def test_fixed_layout_size_stays_bounded(tmp_path: Path) -> None:
    """Twelve passes re-dirtying most of RAM: the stream grows with them, the file does not."""
    sizes = {}
    for passes in (2, 12):
        data = synthetic(iterations=passes, dirty=0.8)
        saved = tmp_path / f"{passes}.mig"
        result = migpipe("save", str(saved), "--layout", "fixed", "--cache", "1M", stdin=data)
        assert result.returncode == 0, result.stderr
        sizes[passes] = (len(data), saved.stat().st_size)
    assert sizes[12][0] > 3 * sizes[2][0]  # the stream
    assert sizes[12][1] == sizes[2][1] <= RAM * 1.02 + (1 << 20)  # the file


def test_fixed_save_counts_the_bytes_it_writes_as_it_goes(tmp_path: Path, stream: bytes) -> None:
    """--progress shows the fixed layout's written bytes during the save, not 0 until the end;
    at the end they are the file's size."""
    from migpipe.save.fixedfile import FixedSaver, PlainFile
    from migpipe.stream.parser import parse_bytes
    from migpipe.tunnel.pipeline import Totals

    records = parse_bytes(stream)
    totals = Totals()
    with open(tmp_path / "vm.mig", "wb+") as f:
        saver = FixedSaver(PlainFile(f.fileno()), [], totals, cache=1 << 20)  # 8 MiB of RAM
        saver.add(records[: len(records) // 2])
        for future, _ in saver.in_flight.values():  # evicted extents are written by a pool
            future.result()
        written = saver.counters.extent_writes
        assert written > 0 and totals.wire_bytes > 0  # counted before the end
        saver.add(records[len(records) // 2 :])
        size = saver.finish()
        assert size == os.fstat(f.fileno()).st_size


def test_summary_and_stats(tmp_path: Path, stream: bytes) -> None:
    stats = tmp_path / "stats.json"
    result = migpipe(
        "save",
        str(tmp_path / "vm.mig"),
        "--layout",
        "fixed",
        "--cache",
        "2M",
        "--summary",
        "--stats-json",
        str(stats),
        stdin=stream,
    )
    assert result.returncode == 0, result.stderr
    summary = result.stderr.decode()
    assert f"saved {len(stream):,} stream bytes" in summary
    figures = json.loads(stats.read_text())["filters"]["fixed"]
    replay = oracle.replay(stream)
    assert figures["pages_stored"] == sum(replay.blocks.values()) // 4096
    assert figures["pages_overwritten"] == figures["pages_received"] - figures["pages_stored"] > 0
    assert figures["extent_reloads"] > 0  # a 2 MiB cache for 8 MiB of RAM: read-modify-write
    assert f"overwritten in place {figures['pages_overwritten']:,}" in summary


def test_existing_file_needs_force_and_survives_a_failure(tmp_path: Path, stream: bytes) -> None:
    saved = tmp_path / "vm.mig"
    saved.write_bytes(b"the previous save")
    result = migpipe("save", str(saved), stdin=stream)
    assert result.returncode == 1 and b"exists; use --force" in result.stderr
    result = migpipe("save", str(saved), "--force", stdin=stream[: len(stream) // 2])
    assert result.returncode == 4 and b"truncated" in result.stderr
    assert saved.read_bytes() == b"the previous save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.mig"]
    assert migpipe("save", str(saved), "--force", stdin=stream).returncode == 0
    assert migpipe("restore", str(saved)).stdout == stream


# The ways a save writes its file: encode's data plane (with a plain write, or copying into the
# O_DIRECT ring when there are filters), the stream read straight into the O_DIRECT ring (no
# filters: migpipe.tunnel.inplace), and the fixed layout's slots.
WRITES = {
    "stream": ["--layout", "stream"],
    "stream, O_DIRECT": ["--layout", "stream", "--direct=try"],
    "fixed": ["--layout", "fixed"],
}
writes = pytest.mark.parametrize("layout", WRITES.values(), ids=WRITES.keys())


@writes
def test_a_full_file_system_leaves_the_previous_save_untouched(
    tmp_path: Path, stream: bytes, layout: list[str]
) -> None:
    """ENOSPC for real (a small tmpfs): one line, the old file as it was, nothing else left."""
    from test_direct import private_mount

    with private_mount(tmp_path, "tmpfs", "size=1m") as small:
        saved = small / "vm.mig"
        saved.write_bytes(b"the previous save")
        assert len(stream) > 1 << 20
        result = migpipe("save", str(saved), "--force", *layout, stdin=stream)
        assert result.returncode == 1, result.stderr
        message = result.stderr.decode()
        assert "No space left on device" in message and message.count("\n") == 1, message
        assert saved.read_bytes() == b"the previous save"
        assert [p.name for p in small.iterdir()] == ["vm.mig"]


@writes
def test_sigkill_at_many_points_leaves_nothing_under_the_name(
    tmp_path: Path, stream: bytes, layout: list[str]
) -> None:
    saved = tmp_path / "vm.mig"
    saved.write_bytes(b"old")
    for fed in (0, 1, 4096, len(stream) // 3, len(stream) - 1, len(stream)):
        saver = subprocess.Popen(
            [sys.executable, "-m", "migpipe", "save", str(saved), "--force", *layout],
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        saver.stdin.write(stream[:fed])
        saver.stdin.flush()
        saver.send_signal(signal.SIGKILL)
        saver.stdin.close()
        assert saver.wait() == -signal.SIGKILL
        assert saved.read_bytes() == b"old", fed
        for partial in tmp_path.glob(".vm.mig.*.partial"):  # what a killed save leaves behind
            result = migpipe("restore", str(partial))
            assert result.returncode != 0 and len(result.stdout) <= eof_at(stream)
            partial.unlink()


def _file_size_limit(limit: int):
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@writes
def test_a_full_disk_fails_cleanly(tmp_path: Path, stream: bytes, layout: list[str]) -> None:
    saved = tmp_path / "vm.mig"
    result = migpipe(
        "save", str(saved), *layout, stdin=stream, preexec_fn=_file_size_limit(len(stream) // 4)
    )
    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.count("\n") == 1 and "File too large" in message, message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["stream", "fixed"])
@pytest.mark.parametrize(
    "filters",
    [["--compress", "lz4"], ["--compress", "zstd", "--encrypt"], ["--direct=try"]],
    ids=["lz4", "zstd+encrypt", "no filters, O_DIRECT"],
)
def test_damaged_files_never_restore_complete(
    tmp_path: Path, stream: bytes, key: Path, layout: str, filters: list[str]
) -> None:
    saved = tmp_path / "vm.mig"
    keys = ["--key-file", str(key)] if "--encrypt" in filters else []
    assert (
        migpipe("save", str(saved), "--layout", layout, *filters, *keys, stdin=stream).returncode
        == 0
    )
    data = saved.read_bytes()
    used = [i for i in range(0, len(data), 4096) if data[i : i + 4096].strip(b"\0")]
    damaged = tmp_path / "damaged.mig"
    for at in [9, 40, *used[1 :: max(1, len(used) // 8)], min(used[-1] + 100, len(data) - 1)]:
        corrupt = bytearray(data)
        corrupt[at] ^= 0x20
        damaged.write_bytes(corrupt)
        result = migpipe("restore", str(damaged), *keys)
        assert result.returncode != 0, at
        assert stream[eof_at(stream) :] not in result.stdout, at
        assert b"Traceback" not in result.stderr and result.stderr.count(b"\n") == 1
    for cut in (0, 4096, len(data) // 2, len(data) - 1):
        damaged.write_bytes(data[:cut])
        result = migpipe("restore", str(damaged), *keys)
        assert result.returncode != 0 and stream[eof_at(stream) :] not in result.stdout, cut


def test_unfinished_fixed_file_is_refused(tmp_path: Path, stream: bytes) -> None:
    saved = tmp_path / "vm.mig"
    assert migpipe("save", str(saved), "--layout", "fixed", stdin=stream).returncode == 0
    with open(saved, "r+b") as f:  # as if the save died before its last write, the superblock
        f.write(bytes(4096))
    result = migpipe("restore", str(saved))
    assert result.returncode == 1 and result.stdout == NOT_A_STREAM
    assert b"an unfinished migpipe save" in result.stderr


def test_restore_to_an_fd(tmp_path: Path, stream: bytes) -> None:
    saved = tmp_path / "vm.mig"
    assert migpipe("save", str(saved), stdin=stream).returncode == 0
    read, write = os.pipe()
    restorer = subprocess.Popen(
        [sys.executable, "-m", "migpipe", "restore", str(saved), "--fd", str(write)],
        pass_fds=[write],
    )
    os.close(write)
    with os.fdopen(read, "rb") as f:
        assert f.read() == stream
    assert restorer.wait() == 0


@pytest.mark.parametrize("layout", ["stream", "fixed"])
def test_inspect_reads_saved_files(tmp_path: Path, stream: bytes, key: Path, layout: str) -> None:
    saved = tmp_path / "vm.mig"
    assert (
        migpipe(
            "save",
            str(saved),
            "--layout",
            layout,
            "--compress",
            "zstd:1",
            "--encrypt",
            "--key-file",
            str(key),
            stdin=stream,
        ).returncode
        == 0
    )
    result = migpipe("inspect", str(saved), "--json", "--key-file", str(key))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["file"]["layout"] == layout and report["error"] is None
    assert [name for name, _ in report["file"]["filters"]] == ["zstd", "encrypt"]
    pages = oracle.replay(stream).pages_by_kind
    if layout == "stream":  # what QEMU sent
        assert report["pages"]["normal"] == pages["page"] and report["bytes"] == len(stream)
    else:  # each page once
        ram_pages = sum(size // 4096 for size in oracle.replay(stream).blocks.values())
        assert sum(report["pages"].values()) == ram_pages
    text = migpipe("inspect", str(saved), "--key-file", str(key)).stdout.decode()
    assert text.startswith(f"file: {layout} layout, zstd, encrypt; ")
    os.utime(saved, (0, 1_700_000_000))  # when the file says it was written: its mtime
    written = json.loads(migpipe("inspect", str(saved), "--json", "--key-file", str(key)).stdout)
    assert written["file"]["written"] == "2023-11-14T22:13:20+00:00"
    locked = migpipe("inspect", str(saved))
    assert locked.returncode == 7 and b"needs a key" in locked.stderr


@pytest.mark.parametrize("image_format", ["raw", "gzip", "lzop", "zstd"])
def test_libvirt_save_image(tmp_path: Path, stream: bytes, image_format: str) -> None:
    xml = tmp_path / "vm.xml"
    xml.write_text("<domain type='qemu'><name>vm</name></domain>")
    image = tmp_path / "vm.img"
    result = migpipe(
        "save",
        str(image),
        "--libvirt-xml",
        str(xml),
        "--image-format",
        image_format,
        "--paused",
        stdin=stream,
    )
    assert result.returncode == 0, result.stderr
    data = image.read_bytes()
    assert data.startswith(b"LibvirtQemudSave") and b"<name>vm</name>" in data[92:1000]
    assert int.from_bytes(data[24:28], sys.byteorder) == 0  # was_running: --paused
    restored = migpipe("restore", str(image))
    assert restored.returncode == 0 and restored.stdout == stream
    text = migpipe("inspect", str(image)).stdout.decode()
    assert text.startswith(f"file: libvirt save image, {image_format} body, guest paused")


def test_libvirt_images_that_must_not_restore(tmp_path: Path, stream: bytes) -> None:
    xml = tmp_path / "vm.xml"
    xml.write_text("<domain/>")
    image = tmp_path / "vm.img"
    assert (
        migpipe(
            "save", str(image), "--libvirt-xml", str(xml), "--image-format", "gzip", stdin=stream
        ).returncode
        == 0
    )
    data = image.read_bytes()
    tail = stream[eof_at(stream) :]
    damaged = tmp_path / "damaged.img"
    for bad in (
        data[: len(data) - 9],  # the gzip trailer (CRC, size) cut off
        data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],  # a flipped CRC bit
        b"LibvirtQemudPart" + data[16:],
    ):
        damaged.write_bytes(bad)
        result = migpipe("restore", str(damaged))
        assert result.returncode != 0 and tail not in result.stdout, result.stderr
    result = migpipe(
        "save", str(tmp_path / "x.img"), "--libvirt-xml", str(xml), "--compress=lz4", stdin=stream
    )
    assert result.returncode == 2 and b"takes no migpipe filters" in result.stderr


@pytest.mark.parametrize(
    ("layout", "filters"),
    [("stream", []), ("stream", ["--compress", "lz4"]), ("fixed", ["--compress", "lz4"])],
    ids=["stream", "stream lz4", "fixed lz4"],
)
def test_direct_save_and_restore_leave_the_page_cache_alone(
    tmp_path: Path, stream: bytes, layout: str, filters: list[str]
) -> None:
    from test_direct import resident_pages

    saved = tmp_path / "vm.mig"
    result = migpipe("save", str(saved), "--layout", layout, *filters, "--direct", stdin=stream)
    assert result.returncode == 0, result.stderr
    assert resident_pages(saved) == 0
    restored = migpipe("restore", str(saved), "--direct")
    assert restored.returncode == 0 and resident_pages(saved) == 0
    if layout == "stream":
        assert restored.stdout == stream
    migpipe("restore", str(saved))  # the control: a buffered read fills the cache
    assert resident_pages(saved) > 0


def test_fixed_restore_holds_the_eof_item_until_the_last_chunk_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device state is stored and checked in DEVICE_CHUNK pieces. When a piece ends between
    QEMU's EOF item and the VM description, a damaged last piece must still keep the EOF item
    from QEMU (it needs nothing after it to complete the load)."""
    from migpipe.save.fixedfile import DEVICE_CHUNK, FixedSaver, PlainFile, restore_fixed
    from migpipe.stream.records import Eof
    from migpipe.stream.writer import StreamWriter
    from migpipe.tools import synthetic
    from migpipe.tools.extracted import Skeleton
    from migpipe.tunnel.pipeline import Totals

    def records(device_bytes: int) -> list:
        monkeypatch.setattr(
            synthetic, "DEVICES", (*synthetic.DEVICES[:1], ("big", 1, device_bytes))
        )
        return list(SyntheticGuest(GuestModel(ram_size=1 << 20, iterations=1, seed=3)).records())

    def device_state_before_eof(stream_records: list) -> int:
        skeleton, writer, kept = Skeleton(4096), StreamWriter(), bytearray()
        for record in stream_records:
            if skeleton.add(record):
                if type(record) is Eof:
                    return len(kept)
                writer.write(kept, record)
        raise AssertionError("no EOF item")

    probe = device_state_before_eof(records(1000))
    guest = records(1000 + DEVICE_CHUNK - 1 - probe)  # the first chunk ends right after EOF
    assert device_state_before_eof(guest) == DEVICE_CHUNK - 1
    saved = tmp_path / "vm.mig"
    with open(saved, "w+b") as f:
        saver = FixedSaver(PlainFile(f.fileno()), [], Totals())
        saver.add(guest)
        saver.finish()
    assert len(saver.chunks) == 2  # 1 MiB - 1 bytes before the EOF item; EOF and VM description
    whole = write_records(guest)

    class Collected:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, parts: list) -> None:
            for part in parts:
                self.data += part

    def restore_into(out: Collected) -> None:
        with open(saved, "rb") as f:  # as the CLI runs it: its error, not the nursery's group
            run_trio(restore_fixed, PlainFile(f.fileno()), out)

    intact = Collected()
    restore_into(intact)
    compact = bytes(intact.data)
    assert compact[eof_at(compact) :] == whole[eof_at(whole) :]  # EOF item, VM description
    data = bytearray(saved.read_bytes())
    data[saver.chunks[-1][0] + 5] ^= 1  # in the last chunk: the VM description
    saved.write_bytes(data)
    damaged = Collected()
    with pytest.raises(MigpipeError):
        restore_into(damaged)
    assert compact.startswith(damaged.data)
    assert len(damaged.data) <= eof_at(compact)


def test_a_name_taken_during_the_save_is_left_alone(tmp_path: Path) -> None:
    """A save can run for minutes: a file (or a symlink) that takes the name meanwhile is
    never replaced without --force, and nothing is published instead."""
    from migpipe.io.files import atomic_path

    target = tmp_path / "vm.mig"
    taken = pytest.raises(MigpipeError, match="appeared while this file was written")
    with taken, atomic_path(target) as temporary:
        temporary.write_bytes(b"ours")
        target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert list(tmp_path.iterdir()) == [target]

    dangling = tmp_path / "link.mig"
    dangling.symlink_to(tmp_path / "nowhere")
    result = migpipe("save", str(dangling), stdin=b"")
    assert result.returncode == 1 and b"exists; use --force" in result.stderr
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("layout", ["stream", "fixed", "libvirt"])
def test_a_save_killed_after_its_last_byte_leaves_no_file_that_restores(
    tmp_path: Path, stream: bytes, layout: str
) -> None:
    """The window a SIGKILL can hit between the file being complete and synced and its name
    (save --qmp waits there for QEMU to complete): what is on disk then is refused, and only
    the published file restores."""
    import shutil

    from migpipe.save import savefile

    source, saved = tmp_path / "stream", tmp_path / "vm.mig"
    source.write_bytes(stream)
    on_disk = tmp_path / "as-on-disk"

    async def commit() -> None:  # what a crash right here would leave behind
        (partial,) = tmp_path.glob(".vm.mig.*.partial")
        shutil.copyfile(partial, on_disk)

    target = (
        savefile.LibvirtTarget("<domain><name>vm</name></domain>") if layout == "libvirt" else None
    )
    with open(source, "rb") as f:
        trio.run(
            functools.partial(
                savefile.save,
                f.fileno(),
                saved,
                [],
                layout="stream" if target else layout,
                libvirt=target,
                commit=commit,
            )
        )
    refused = migpipe("restore", str(on_disk))
    assert refused.returncode != 0 and refused.stdout == NOT_A_STREAM
    expected = b"incomplete" if target else b"an unfinished migpipe save"
    assert expected in refused.stderr, refused.stderr
    restored = migpipe("restore", str(saved))
    assert restored.returncode == 0, restored.stderr
    assert oracle.replay(restored.stdout).image == oracle.replay(stream).image


def test_o_direct_alignment_beyond_the_fixed_unit_is_one_clear_error(tmp_path: Path) -> None:
    """A file system whose O_DIRECT unit exceeds the fixed layout's 4096 bytes (8 KiB here, as
    statx would report it): refused before anything is written, not a traceback mid-save."""
    from migpipe.errors import EXIT_INCOMPATIBLE
    from migpipe.io.direct import open_direct
    from migpipe.save.fixedfile import FixedSaver
    from migpipe.tunnel.pipeline import Totals

    with open_direct(str(tmp_path / "vm.mig"), "w") as file:
        file.align = 8192
        with pytest.raises(MigpipeError, match="needs 8192-byte alignment") as refused:
            FixedSaver(file, [], Totals())
    assert refused.value.status == EXIT_INCOMPATIBLE
    assert (tmp_path / "vm.mig").stat().st_size == 0


@pytest.fixture(scope="module")
def long_stream() -> bytes:
    """Tens of MB: far more than a pipe and the chunks in flight hold."""
    return synthetic(iterations=1, ram=96 << 20)


SAVES = {  # save's options (None: the bare stream in a file), restore's
    "bare QEMU stream": (None, []),
    "bare QEMU stream, O_DIRECT": (None, ["--direct=try"]),
    "stream layout": ([], []),
    "fixed layout": (["--layout", "fixed"], []),
    "libvirt image": (["--libvirt-xml", "{xml}"], []),
}


@pytest.mark.parametrize("kind", SAVES)
def test_ctrl_c_stops_a_restore_at_the_next_chunk(tmp_path: Path, long_stream: bytes, kind: str):
    """A restore into a QEMU that loads slowly can take minutes: Ctrl-C must end it at the
    next chunk, not once the whole file went out."""
    saved, xml = tmp_path / "vm.mig", tmp_path / "vm.xml"
    xml.write_text("<domain/>")
    save_options, restore_options = SAVES[kind]
    if save_options is None:
        saved.write_bytes(long_stream)
    else:
        options = [option.format(xml=xml) for option in save_options]
        result = migpipe("save", str(saved), *options, stdin=long_stream)
        assert result.returncode == 0, result.stderr
    argv = [sys.executable, "-m", "migpipe", "restore", str(saved), *restore_options]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        first = proc.stdout.read(1 << 16)  # it started; now it fills the pipe and waits
        proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read()  # lets its waiting write end
        assert proc.wait(60) == EXIT_INTERRUPTED, proc.stderr.read()
    assert len(first) == 1 << 16
    # Until the signal is handled (trio wakes, cancels, stops the threads) the restore writes on
    # at the speed this test reads: 7.1 MB of a 28 MB stream once on a loaded box. Half of it
    # still tells a stop at the next chunk from a restore that runs to the end.
    assert len(first) + len(rest) < len(long_stream) // 2, "it ran on after the signal"


# -- crafted fixed-layout files and streams: bounded work, one clear error ------------------------


def _address_space(limit: int):
    """A preexec_fn capping the child's memory: a runaway allocation fails, not the host."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.fixture(scope="module")
def fixed_file(tmp_path_factory: pytest.TempPathFactory, stream: bytes) -> bytes:
    saved = tmp_path_factory.mktemp("fixed") / "vm.mig"
    assert migpipe("save", str(saved), "--layout", "fixed", stdin=stream).returncode == 0
    return saved.read_bytes()


def test_a_fixed_index_claiming_a_huge_block_is_refused_at_once(
    tmp_path: Path, fixed_file: bytes
) -> None:
    """The audit's file (H3): a genuine save whose index says a block holds 2^60 bytes. The slot
    count is computed, not walked, and compared before anything is made per slot."""
    from test_fixed_fuzz import read_index, with_index

    _, meta, slots, chunks = read_index(fixed_file)
    meta["skeleton"]["blocks"][0]["used_length"] = 1 << 60
    crafted = tmp_path / "crafted.mig"
    crafted.write_bytes(with_index(fixed_file, meta, slots, chunks))
    result = migpipe("restore", str(crafted), timeout=60, preexec_fn=_address_space(1 << 30))
    assert result.returncode == 3, result.stderr  # EXIT_CORRUPT
    assert result.stderr.count(b"\n") == 1 and b"slots" in result.stderr, result.stderr
    assert result.stdout == NOT_A_STREAM


def _with_blocks(records: list, used_length: int) -> list:
    """`records` with their first RAM block made `used_length` bytes long."""
    from migpipe.stream.records import MemSize

    (at,) = (n for n, record in enumerate(records) if type(record) is MemSize)
    first, *rest = records[at].blocks
    blocks = (first._replace(used_length=used_length), *rest)
    return [*records[:at], MemSize(sum(b.used_length for b in blocks), blocks), *records[at + 1 :]]


def _small_guest() -> list:
    return list(SyntheticGuest(GuestModel(ram_size=1 << 20, iterations=1, seed=3)).records())


def test_a_fixed_save_of_a_guest_beyond_the_layout_is_refused_at_once(tmp_path: Path) -> None:
    """A stream announcing 32 TiB (a few hundred bytes, within the parser's bound) is refused
    when it announces it, not after a walk of 32 million slots."""
    crafted = write_records(_with_blocks(_small_guest(), 32 << 40))
    result = migpipe(
        "save",
        str(tmp_path / "vm.mig"),
        "--layout",
        "fixed",
        stdin=crafted,
        timeout=60,
        preexec_fn=_address_space(1 << 30),
    )
    assert result.returncode == 6, result.stderr  # EXIT_INCOMPATIBLE
    assert result.stderr.count(b"\n") == 1 and b"at most 16 TiB" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_fixed_save_keeps_state_only_for_what_the_guest_sends(tmp_path: Path) -> None:
    """A 1 TiB block announced, a few pages sent: the saver's memory is that of the pages."""
    import tracemalloc

    from migpipe.save.fixedfile import FixedSaver, PlainFile
    from migpipe.tunnel.pipeline import Totals

    records = _with_blocks(_small_guest(), 1 << 40)
    with open(tmp_path / "vm.mig", "w+b") as f:
        saver = FixedSaver(PlainFile(f.fileno()), [], Totals())
        tracemalloc.start()
        try:
            saver.add(records)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            saver.abort()
    assert saver.layout.slots == (1 << 40) // (1 << 20) + 3  # the 1 TiB block, then 3 small
    assert peak < 16 << 20, f"{peak} bytes for {saver.layout.slots} slots"


def _refused(data: bytes, tmp_path: Path) -> tuple[MigpipeError, int]:
    """The error restoring `data` ends in, and the bytes it read first."""
    from test_fixed_fuzz import CountingFile, restore

    path = tmp_path / "crafted.mig"
    path.write_bytes(data)
    with open(path, "rb") as f:
        file = CountingFile(f.fileno())
        with pytest.raises(MigpipeError) as refused:
            restore(file)
    return refused.value, file.bytes_read


def test_device_state_beyond_its_limit_is_refused_before_it_is_read(
    tmp_path: Path, fixed_file: bytes
) -> None:
    """A chunk claiming 64 MiB in a file that has them (sparse): refused from the index."""
    from test_fixed_fuzz import read_index, with_index

    from migpipe.errors import EXIT_CORRUPT

    _, meta, slots, chunks = read_index(fixed_file)
    chunks[0][1] = 64 << 20
    crafted = with_index(fixed_file, meta, slots, chunks) + bytes(64 << 20)
    error, bytes_read = _refused(bytes(crafted), tmp_path)
    assert error.status == EXIT_CORRUPT and "device-state chunk 0 of" in str(error)
    assert bytes_read < len(fixed_file)


def test_a_device_state_chunk_listed_twice_is_refused(tmp_path: Path, fixed_file: bytes) -> None:
    """Unencrypted, a chunk's write number proves nothing: the index's places must not overlap,
    or one chunk's device state would go to QEMU twice."""
    from test_fixed_fuzz import read_index, with_index

    from migpipe.errors import EXIT_CORRUPT

    _, meta, slots, chunks = read_index(fixed_file)
    meta["chunks"] += 1
    error, _ = _refused(bytes(with_index(fixed_file, meta, slots, [chunks[0], *chunks])), tmp_path)
    assert error.status == EXIT_CORRUPT and "overlaps" in str(error)


NESTED = b"[" * 100_000 + b"]" * 100_000
MALFORMED_INDEXES = {  # an edit of the index's JSON, and what the error says
    "more slots than entries": (lambda m: m.update(slots=m["slots"] + 1), "bytes for"),
    "page size 2^36": (lambda m: m["skeleton"].update(page_size=1 << 36), "page size"),
    "a block name beyond Latin-1": (
        lambda m: m["skeleton"]["blocks"][0].update(name="\u0100"),
        "latin-1",
    ),
    "a negative version": (lambda m: m["skeleton"].update(version=-1), "not a count"),
    "a machine that is a number": (lambda m: m["skeleton"].update(machine=5), "not a name"),
    "JSON of 5 MiB": (lambda m: m.update(padding="x" * (5 << 20)), "bytes of JSON"),
    "JSON nested 100000 deep": (lambda m: NESTED, "nested too deeply"),
}


@pytest.mark.parametrize("case", MALFORMED_INDEXES)
def test_a_malformed_fixed_index_is_one_clear_error(
    tmp_path: Path, fixed_file: bytes, case: str
) -> None:
    from test_fixed_fuzz import read_index, with_index

    from migpipe.errors import EXIT_CORRUPT

    edit, expected = MALFORMED_INDEXES[case]
    _, meta, slots, chunks = read_index(fixed_file)
    meta = edit(meta) or meta
    error, _ = _refused(bytes(with_index(fixed_file, meta, slots, chunks)), tmp_path)
    assert error.status == EXIT_CORRUPT and expected in str(error), error


def test_fixed_files_shorter_than_their_superblock_are_one_clear_error(
    tmp_path: Path, fixed_file: bytes
) -> None:
    from migpipe.errors import EXIT_CORRUPT, EXIT_TRUNCATED

    for size in range(0, 200):
        error, _ = _refused(fixed_file[:size], tmp_path)
        assert error.status in (EXIT_CORRUPT, EXIT_TRUNCATED), (size, error)


def test_a_restore_walking_unwritten_extents_stops_when_told(tmp_path: Path) -> None:
    """A genuine file whose 4 GiB block got a few pages: restore walks 4096 extents that
    produce nothing, looking at the stop flag before each one."""
    import threading

    from migpipe.errors import Stopped
    from migpipe.save.fixedfile import FixedReader, FixedSaver, PlainFile
    from migpipe.tunnel.pipeline import Totals

    class StopAfter(threading.Event):
        """Set once it has been looked at `polls` times."""

        def __init__(self, polls: int) -> None:
            super().__init__()
            self.polls = polls

        def is_set(self) -> bool:
            self.polls -= 1
            return self.polls < 0

    with open(tmp_path / "vm.mig", "w+b") as f:
        saver = FixedSaver(PlainFile(f.fileno()), [], Totals())
        saver.add(_with_blocks(_small_guest(), 4 << 30))
        saver.finish()
        stopping = StopAfter(100)
        reader = FixedReader(PlainFile(f.fileno()), None, Totals(), stopping)
        with pytest.raises(Stopped):
            for _ in reader.records():
                pass
    assert stopping.polls == -1  # stopped at the first poll that said so


@pytest.mark.qemu
def test_restore_running_and_paused_override_the_saved_run_state(
    guest_elf: Path, tmp_path: Path
) -> None:
    """As virsh restore: by default the guest comes back as it was saved (a --live save ran to
    the end, a plain save stopped it first); --running runs it, --paused keeps it from running
    a single cycle (no RESUME event), whatever the file says."""
    import qemuvm
    from test_qemu_drive import idle_source, run_migpipe

    live, stopped = tmp_path / "live.mig", tmp_path / "stopped.mig"
    with idle_source(guest_elf, tmp_path, "src"):  # QEMU's own limit: the live save converges
        saved = run_migpipe("save", "--qmp", tmp_path / "src.qmp", live, "--live", "--resume")
        assert saved.returncode == 0, saved.stderr
        saved = run_migpipe("save", "--qmp", tmp_path / "src.qmp", stopped)
        assert saved.returncode == 0, saved.stderr

    cases = [(live, [], "running"), (live, ["--paused"], "paused"), (stopped, [], "paused")]
    cases += [(stopped, ["--running"], "running"), (stopped, ["-", "--running"], "running")]
    for n, (file, options, state) in enumerate(cases):
        qmp = tmp_path / f"dst{n}.qmp"
        # no -S (unlike test_qemu_drive's destination): QEMU itself would run the guest
        waiting = ["-incoming", "defer", *qemuvm.qmp_socket_args(qmp)]
        with qemuvm.Vm(tmp_path, f"dst{n}", waiting) as dest, open(file, "rb") as pipe_in:
            if "-" in options:  # `ssh host cat vm.mig | migpipe restore --qmp SOCK -`
                command = [*MIGPIPE, "restore", "--qmp", str(qmp), *options]
                restored = subprocess.run(command, stdin=pipe_in, capture_output=True, text=True)
            else:
                restored = run_migpipe("restore", "--qmp", qmp, file, *options)
            assert restored.returncode == 0, restored.stderr
            assert f"the VM is {state}" in restored.stderr
            assert dest.qmp.execute("query-status")["status"] == state
            ran = any(event["event"] == "RESUME" for event in dest.qmp.events)
            assert ran == (state == "running"), (file.name, options)


def test_running_and_paused_need_qmp(tmp_path: Path, stream: bytes) -> None:
    saved = tmp_path / "vm.mig"
    assert migpipe("save", str(saved), stdin=stream).returncode == 0
    for option in ("--running", "--paused"):
        result = migpipe("restore", str(saved), option)
        assert (result.returncode, result.stderr) == (
            2,
            b"migpipe restore: error: --running and --paused drive QEMU: they need --qmp\n",
        )


@pytest.mark.parametrize("chain", [[], ["--compress", "lz4", "--encrypt"]], ids=["plain", "sealed"])
def test_save_dash_writes_the_stream_layout_to_stdout(
    tmp_path: Path, stream: bytes, key: Path, chain: list
) -> None:
    keys = ["--key-file", str(key)] if "--encrypt" in chain else []
    saved = migpipe("save", "-", *chain, *keys, stdin=stream)
    assert saved.returncode == 0, saved.stderr
    (tmp_path / "vm.mig").write_bytes(saved.stdout)
    assert migpipe("inspect", *keys, str(tmp_path / "vm.mig")).stdout.startswith(
        b"file: stream layout"
    )
    assert migpipe("restore", *keys, str(tmp_path / "vm.mig")).stdout == stream


@pytest.mark.parametrize(
    "options",
    [["--layout", "fixed"], ["--libvirt-xml", "dom.xml"], ["--direct"], ["--summary"]],
    ids=lambda o: o[0],
)
def test_save_dash_refuses_what_needs_a_file(stream: bytes, options: list) -> None:
    result = migpipe("save", "-", *options, stdin=stream)
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr.decode() == (
        f"migpipe save: error: {' '.join(options[:2]) if options[0] == '--layout' else options[0]}"
        " needs a FILE to save to, not standard output (-)\n"
    )


def saved_kinds(tmp_path: Path, stream: bytes, key: Path) -> dict[str, tuple[bytes, list]]:
    """A file of every kind restore reads in order, with the options it needs."""
    keys = ["--key-file", str(key)]
    xml = tmp_path / "dom.xml"
    xml.write_text("<domain type='qemu'><name>vm</name></domain>")
    made = {
        "stream": (["--compress", "zstd:1"], []),
        "sealed": (["--encrypt", *keys], keys),
        "libvirt": (["--libvirt-xml", str(xml), "--image-format", "gzip"], []),
    }
    kinds = {"qemu": (stream, [])}
    for kind, (options, reading) in made.items():
        assert migpipe("save", str(tmp_path / kind), *options, stdin=stream).returncode == 0
        kinds[kind] = ((tmp_path / kind).read_bytes(), reading)
    return kinds


def test_restore_reads_a_pipe_in_order(tmp_path: Path, stream: bytes, key: Path) -> None:
    """`ssh host cat vm.mig | migpipe restore -` (or /dev/stdin, <(...)): every kind but
    the fixed layout, checked as from a file: its end only once all of it passed."""
    for kind, (data, reading) in saved_kinds(tmp_path, stream, key).items():
        for name in ("-", "/dev/stdin"):
            restored = migpipe("restore", name, *reading, stdin=data)
            assert (restored.returncode, restored.stdout) == (0, stream), (kind, restored.stderr)
        if kind != "qemu":
            cut = migpipe("restore", "-", *reading, stdin=data[: len(data) * 2 // 3])
            assert cut.returncode != 0 and cut.stdout != stream, kind  # its end withheld
    refused = migpipe("restore", "-", "--key-file", str(key), stdin=stream)
    assert refused.returncode == 7  # a key given: a bare stream from a pipe is refused too


def test_restore_says_why_a_fixed_file_cannot_come_from_a_pipe(
    tmp_path: Path, stream: bytes
) -> None:
    saved = tmp_path / "vm.mig"
    assert migpipe("save", str(saved), "--layout", "fixed", stdin=stream).returncode == 0
    result = migpipe("restore", "-", stdin=saved.read_bytes())
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr == (
        b"migpipe restore: error: standard input: a fixed-layout save cannot be restored from "
        b"a pipe: its pages are found through an index at its end; copy it to a file first\n"
    )
    assert migpipe("restore", "-", "--direct", stdin=saved.read_bytes()).returncode == 2


def test_stats_json_dash_is_stdout_where_stdout_is_free(tmp_path: Path, stream: bytes) -> None:
    result = migpipe("save", str(tmp_path / "vm.mig"), "--stats-json", "-", stdin=stream)
    assert result.returncode == 0
    assert json.loads(result.stdout)["qemu_bytes"] == len(stream)
    assert not (tmp_path / "-").exists()
    for command in (["save", "-"], ["encode"], ["restore", str(tmp_path / "vm.mig")]):
        taken = migpipe(*command, "--stats-json", "-", stdin=stream)
        assert (taken.returncode, taken.stdout) == (2, b""), command
        assert b"--stats-json -: standard output carries the stream here" in taken.stderr


def test_decode_of_a_saved_file_says_to_use_restore(tmp_path: Path, stream: bytes) -> None:
    fixed, image = tmp_path / "fixed.mig", tmp_path / "vm.save"
    xml = tmp_path / "dom.xml"
    xml.write_text("<domain type='qemu'><name>vm</name></domain>")
    assert migpipe("save", str(fixed), "--layout", "fixed", stdin=stream).returncode == 0
    assert migpipe("save", str(image), "--libvirt-xml", str(xml), stdin=stream).returncode == 0
    for data, says in [
        (fixed.read_bytes(), "a migpipe save in the fixed layout: use migpipe restore"),
        (image.read_bytes(), "a libvirt save image: use migpipe restore"),
        (stream, "a bare QEMU stream, which needs no decoding"),
    ]:
        result = migpipe("decode", stdin=data)
        assert result.returncode == 3
        assert result.stderr.decode() == (
            f"migpipe decode: error: not a migpipe wire stream (bad magic; it is {says}) "
            "(at byte offset 0)\n"
        )


def test_inspect_reads_every_kind_from_a_pipe(tmp_path: Path, stream: bytes, key: Path) -> None:
    """`cat FILE | migpipe inspect` says what `migpipe inspect FILE` does, but the size on
    disk a pipe does not have; the fixed layout, which is read through its index, is refused
    with the reason."""
    for kind, (data, reading) in saved_kinds(tmp_path, stream, key).items():
        by_path = migpipe("inspect", *reading, str(tmp_path / kind) if kind != "qemu" else "-",
                          stdin=data)  # fmt: skip
        by_pipe = migpipe("inspect", *reading, stdin=data)
        assert by_pipe.returncode == by_path.returncode == 0, (kind, by_pipe.stderr)
        first, rest = by_pipe.stdout.decode().split("\n", 1)
        assert by_path.stdout.decode().endswith(rest), kind
        if kind != "qemu":
            assert first.startswith(by_path.stdout.decode().split(" (", 1)[0]), kind
    fixed = tmp_path / "fixed.mig"
    assert migpipe("save", str(fixed), "--layout", "fixed", stdin=stream).returncode == 0
    refused = migpipe("inspect", stdin=fixed.read_bytes())
    assert refused.returncode == 2
    assert b"a fixed-layout save cannot be inspected from a pipe" in refused.stderr
