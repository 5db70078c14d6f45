"""migpipe.io.direct on real files: ext4 under tmp_path (O_DIRECT), file systems that refuse
O_DIRECT or fill up mounted in a private namespace, and the page cache checked with mincore(2)."""

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import random
import resource
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from migpipe.errors import MigpipeError
from migpipe.io.direct import (
    BUFFER_SIZE,
    DirectFile,
    DirectReader,
    DirectWriter,
    aligned_buffer,
    alignment,
    open_direct,
)

PAGE = mmap.PAGESIZE
MIB = 1 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache: mincore(2) on a mapping of the file
    that is never touched, so looking does not bring anything in."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        try:
            vector = (ctypes.c_ubyte * -(-size // PAGE))()
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            return sum(page & 1 for page in vector)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_mount(directory: Path, fstype: str, options: str = "defaults") -> Iterator[Path]:
    """`directory` with a new `fstype` on it, mounted in a user and mount namespace of its own
    and reached from here through /proc/PID/root; it goes away with the namespace."""
    script = f'mount -t {fstype} -o {options} none "$1" && echo mounted && exec cat'
    holder = subprocess.Popen(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"mounted\n", f"cannot mount {fstype} in a namespace"
        yield Path(f"/proc/{holder.pid}/root{directory}")
    finally:
        holder.stdin.close()
        holder.wait()


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process: writes past `limit` fail with EFBIG (Python ignores the
    SIGXFSZ that comes with it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def odd_pieces(data: bytes) -> Iterator[bytes]:
    """`data` cut in sizes that never line up with a block or a buffer."""
    sizes, at = [1, 511, 4097, 65537, MIB + 3, 333], 0
    for i in range(len(data)):
        if at >= len(data):
            return
        yield data[at : at + sizes[i % len(sizes)]]
        at += sizes[i % len(sizes)]


def feed_pipe(data: bytes) -> int:
    """The read end of a pipe that a thread fills with `data` and then closes."""
    read_end, write_end = os.pipe()

    def fill() -> None:
        with os.fdopen(write_end, "wb") as f:
            f.write(data)

    threading.Thread(target=fill, daemon=True).start()
    return read_end


@pytest.fixture(scope="module")
def align(tmp_path_factory: pytest.TempPathFactory) -> int:
    with open_direct(str(tmp_path_factory.mktemp("align") / "probe"), "w") as file:
        assert file.direct, "tmp_path must be on a file system with O_DIRECT (ext4, xfs)"
        return file.align


SIZES = {
    "empty": lambda a: 0,
    "one byte": lambda a: 1,
    "align-1": lambda a: a - 1,
    "align": lambda a: a,
    "align+1": lambda a: a + 1,
    "buffer-1": lambda a: BUFFER_SIZE - 1,
    "buffer": lambda a: BUFFER_SIZE,
    "buffer+1": lambda a: BUFFER_SIZE + 1,
    "3 buffers+odd": lambda a: 3 * BUFFER_SIZE + 12345,
}


def test_alignment_is_what_o_direct_accepts(tmp_path: Path, align: int) -> None:
    """The reported unit works, and a write of half of it is refused (so it is no guess)."""
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        assert alignment(fd) == align
        block = aligned_buffer(align)
        assert os.pwrite(fd, block, align) == align
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, block[: align // 2], 0)
        assert refused.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_aligned_buffers_beyond_a_page() -> None:
    view = aligned_buffer(3 * PAGE, 16 * PAGE)
    assert len(view) == 3 * PAGE and bytes(view) == bytes(3 * PAGE)
    assert ctypes.addressof(ctypes.c_char.from_buffer(view)) % (16 * PAGE) == 0


def vm_flags(view: memoryview) -> set[str]:
    """The VmFlags of the mapping that holds `view` (proc(5): smaps)."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end ...
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError("no mapping holds the buffer")


def test_ring_buffers_are_huge_page_advised_and_not_forked() -> None:
    """A ring buffer: aligned to a huge page and advised onto huge pages, where the kernel has
    them (a 4 MiB O_DIRECT call is then one request to the device), and never inherited by a
    forked child (a copy-on-write share of memory under O_DIRECT); a page-sized one: no advice."""
    huge_size = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    huge = int(huge_size.read_text()) if huge_size.exists() else 0
    ring = aligned_buffer(BUFFER_SIZE)
    assert "dc" in vm_flags(ring)  # VM_DONTCOPY
    if huge:
        assert "hg" in vm_flags(ring)  # VM_HUGEPAGE
        assert ctypes.addressof(ctypes.c_char.from_buffer(ring)) % huge == 0
    small = aligned_buffer(PAGE)
    assert "hg" not in vm_flags(small) and "dc" in vm_flags(small)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("feed", ["odd writes", "pump from a pipe"])
def test_round_trip(tmp_path: Path, align: int, size, feed: str) -> None:
    data, path = payload(size(align)), tmp_path / "image"
    with open_direct(str(path), "w") as file:
        assert file.direct
        with DirectWriter(file) as writer:
            if feed == "odd writes":
                for piece in odd_pieces(data):
                    writer.write([piece])
            else:
                read_end = feed_pipe(data)
                assert writer.pump(read_end) == len(data)
                os.close(read_end)
            assert writer.finish() == len(data)
            with pytest.raises(ValueError, match="finished"):
                writer.write([b"late"])
        assert fcntl.fcntl(file.fd, fcntl.F_GETFL) & os.O_DIRECT  # back on after the tail
    assert path.read_bytes() == data
    with open_direct(str(path), "r") as file, DirectReader(file) as reader:
        chunks = list(iter(reader.read, b""))
    assert b"".join(chunks) == data
    assert all(0 < len(chunk) <= MIB for chunk in chunks)


def test_a_small_ring_turns_over_many_times(tmp_path: Path, align: int) -> None:
    data, path = payload(5 * MIB + 7), tmp_path / "image"
    ring = {"buffer_size": 8 * align, "depth": 2}
    with open_direct(str(path), "w") as file, DirectWriter(file, **ring) as writer:
        writer.write(list(odd_pieces(data)))
        writer.finish()
    assert path.read_bytes() == data
    read_end, write_end = os.pipe()
    out: list[bytes] = []
    with open_direct(str(path), "r") as file, DirectReader(file, **ring) as reader:
        done = threading.Thread(target=lambda: out.append(drain(read_end)))
        done.start()
        assert reader.pump(write_end) == len(data)
        os.close(write_end)
        done.join()
    os.close(read_end)
    assert out == [data]


def drain(fd: int) -> bytes:
    return b"".join(iter(lambda: os.read(fd, MIB), b""))


def test_a_stream_at_an_offset(tmp_path: Path, align: int) -> None:
    """A sequential stream after a header block, the header written last (as a save does)."""
    data, path = payload(2 * MIB + 99), tmp_path / "image"
    with open_direct(str(path), "w+") as file:
        with DirectWriter(file, offset=align) as writer:
            writer.write([data])
            assert writer.finish() == len(data)
        assert file.write_at(0, b"HEADER") == align  # padded with zeros to the stream
        with DirectReader(file, offset=align) as reader:
            assert b"".join(iter(reader.read, b"")) == data
        with pytest.raises(ValueError, match="must start at a multiple"):
            DirectWriter(file, offset=align + 1)
    assert path.read_bytes() == b"HEADER".ljust(align, b"\0") + data


def test_positioned_io(tmp_path: Path, align: int) -> None:
    """Slots written out of order, each at its own place, by several threads at once (as the
    fixed layout's writers do); read back whole and in part, rewritten, and past the end."""
    path, slot = tmp_path / "image", 64 * align
    stored = {n: payload(5 * align + 17 * n, n) for n in (7, 0, 3, 1, 2, 4)}
    with open_direct(str(path), "w+") as file:
        with ThreadPoolExecutor(4) as pool:
            written = list(pool.map(lambda n: file.write_at(n * slot, stored[n]), stored))
        assert written == [-(-len(data) // align) * align for data in stored.values()]
        assert resident_pages(path) == 0
        for n, data in stored.items():
            assert file.read_at(n * slot, len(data)) == data
            assert file.read_at(n * slot + 3, 100) == data[3:103]  # any offset and length
        rewritten = bytearray(file.read_at(3 * slot, len(stored[3])))  # read-modify-write
        rewritten[align : align + 5] = b"xxxxx"
        file.write_at(3 * slot, rewritten)
        assert file.read_at(3 * slot, len(rewritten)) == rewritten
        assert file.read_at(5 * slot, align) == bytes(align)  # a hole between slots
        end = 7 * slot + -(-len(stored[7]) // align) * align
        assert file.read_at(end - 10, 100) == bytes(10)  # the padding, then the end of the file
        assert file.read_at(end, align) == b""
        big = payload(2 * BUFFER_SIZE + 5)  # longer than one aligned buffer
        file.write_at(8 * slot, big)
        assert file.read_at(8 * slot, len(big)) == big
        file.write_at(9 * slot, b"short")  # through the buffer that just held `big`
        assert file.read_at(9 * slot, align) == b"short".ljust(align, b"\0")
        with pytest.raises(ValueError, match="not a multiple"):
            file.write_at(1, b"x")
        assert resident_pages(path) == 0


def test_o_direct_leaves_the_page_cache_alone(tmp_path: Path) -> None:
    data, path = payload(9 * MIB + 4321), tmp_path / "image"
    pages = -(-len(data) // PAGE)
    with open_direct(str(path), "w") as file, DirectWriter(file) as writer:
        writer.write(list(odd_pieces(data)))
        writer.finish()
    assert resident_pages(path) == 0
    with open_direct(str(path), "r") as file, DirectReader(file) as reader:
        assert b"".join(iter(reader.read, b"")) == data
    assert resident_pages(path) == 0
    path.read_bytes()  # the control: the check sees pages when they are there
    assert resident_pages(path) == pages
    control = tmp_path / "buffered"
    control.write_bytes(data)
    assert resident_pages(control) == pages


def test_drop_cache_mode_leaves_the_page_cache_alone(tmp_path: Path) -> None:
    """What direct="try" falls back to, on ext4 so that the cache can be seen."""
    data, path = payload(9 * MIB + 4321), tmp_path / "image"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    with DirectFile(fd, str(path), drop_cache=True) as file:
        assert not file.direct and file.drop_cache
        with DirectWriter(file) as writer:
            writer.write(list(odd_pieces(data)))
            writer.finish()
        assert resident_pages(path) == 0
        with DirectReader(file, offset=0) as reader:
            assert b"".join(iter(reader.read, b"")) == data
        assert resident_pages(path) == 0
    path.read_bytes()
    assert resident_pages(path) == -(-len(data) // PAGE)


def test_the_tail_padded_and_cut_back(tmp_path: Path, align: int) -> None:
    """Where O_DIRECT cannot be turned off for the tail: a zero-padded block, then ftruncate."""
    path = tmp_path / "image"
    with open_direct(str(path), "w") as file:
        block = payload(2 * align)
        file.write_at(0, block)
        tail = aligned_buffer(align)
        tail[:7] = b"the end"
        tail[7:] = b"\xff" * (align - 7)  # whatever the ring buffer held before
        file._pad_and_truncate(tail, 7, 2 * align)
    assert path.read_bytes() == block + b"the end"


def test_refused_o_direct_is_a_clear_error_and_try_falls_back(tmp_path: Path) -> None:
    """ramfs refuses O_DIRECT (tmpfs accepts it since Linux 6.6)."""
    data = payload(3 * MIB + 5)
    with private_mount(tmp_path, "ramfs") as ramfs:
        with pytest.raises(MigpipeError) as refused:
            open_direct(str(ramfs / "image"), "w", direct=True)
        assert "does not support O_DIRECT (use --direct=try" in str(refused.value)
        assert not (ramfs / "image").exists()  # nothing left behind
        with open_direct(str(ramfs / "image"), "x", direct="try") as file:
            assert not file.direct and file.drop_cache
            with DirectWriter(file) as writer:
                writer.write(list(odd_pieces(data)))
                writer.finish()
        with (
            open_direct(str(ramfs / "image"), "r", direct="try") as file,
            DirectReader(file) as reader,
        ):
            assert b"".join(iter(reader.read, b"")) == data


def test_open_errors(tmp_path: Path) -> None:
    (tmp_path / "there").write_bytes(b"x")
    with pytest.raises(MigpipeError, match=r"cannot open .*there: File exists"):
        open_direct(str(tmp_path / "there"), "x")
    with pytest.raises(MigpipeError, match=r"cannot open .*missing: No such file"):
        open_direct(str(tmp_path / "missing"), "r")


def test_a_full_file_system_is_an_error_at_the_next_write(tmp_path: Path) -> None:
    with private_mount(tmp_path, "tmpfs", "size=8m") as small:
        path = small / "image"
        with open_direct(str(path), "w", direct="try") as file, DirectWriter(file) as writer:
            with pytest.raises(MigpipeError) as full:
                for _ in range(64):
                    writer.write([bytes(MIB)])
            assert f"cannot write {path}: No space left on device" in str(full.value)
            with pytest.raises(MigpipeError, match="No space left on device"):
                writer.finish()  # the error stays; nothing pretends to have succeeded


def test_a_file_size_limit_is_an_error_at_the_next_write(tmp_path: Path) -> None:
    """EFBIG from RLIMIT_FSIZE, raised in the writer thread, reaches the caller's write()."""
    path, limit = tmp_path / "image", 8 * MIB
    with open_direct(str(path), "w") as file, DirectWriter(file) as writer:
        written = 0
        with file_size_limit(limit), pytest.raises(MigpipeError) as too_big:
            for _ in range(64):
                writer.write([bytes(MIB)])
                written += MIB
        assert str(too_big.value) == f"cannot write {path}: File too large (at byte offset {limit})"
        assert written < limit + 5 * BUFFER_SIZE  # the ring bounds how far the caller runs on
    assert path.stat().st_size == limit


def test_a_read_error_reaches_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(payload(MIB))
    fd = os.open(path, os.O_WRONLY)
    with DirectFile(fd, str(path)) as file, DirectReader(file) as reader:
        for _ in range(2):  # and again: it does not turn into an end of file
            with pytest.raises(MigpipeError, match=r"cannot read .*: Bad file descriptor"):
                reader.read()


def test_closing_a_reader_early_stops_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(payload(6 * BUFFER_SIZE))
    with open_direct(str(path), "r") as file:
        reader = DirectReader(file)
        assert len(reader.read()) == MIB
        reader.close()
        assert not reader._thread.is_alive()
        with pytest.raises(ValueError, match="closed"):
            reader.read()


def test_in_place_writes_reserved_headers_and_retracts(tmp_path: Path, align: int) -> None:
    """Headers filled after what follows them, bytes taken back, a reservation withdrawn: the
    file is what a plain bytearray given the same steps holds, with a ring too small for the
    longest reservation (it grows rather than wait for buffers that only fill() frees)."""
    rng, path, model = random.Random(7), tmp_path / "image", bytearray()
    with (
        open_direct(str(path), "w") as file,
        DirectWriter(file, buffer_size=align, depth=2) as writer,
    ):
        for round_ in range(60):
            where = writer.reserve(17)
            model += bytes(17)
            for _ in range(rng.randrange(1, 6)):  # reads straight into the ring, and copies
                spare = writer.spare()
                count = rng.randrange(1, len(spare) + 1)
                spare[:count] = piece = payload(count, seed=len(model))
                writer.advance(count)
                model += piece
                copied = payload(rng.randrange(3 * align), seed=count)
                writer.write([copied])
                model += copied
            assert b"".join(writer.view_since(where)) == model[where:]
            after = len(model) - where - 17
            if round_ % 7 == 3:  # withdrawn: everything from the reservation on goes
                assert writer.retract(after + 17) == model[where:]
                del model[where:]
                continue
            back = rng.randrange(after + 1)
            assert writer.retract(back) == model[len(model) - back :]
            del model[len(model) - back :]
            header = payload(17, seed=round_)
            writer.fill(where, header)
            model[where : where + 17] = header
        assert writer.finish() == len(model)
    assert path.read_bytes() == model


def test_in_place_misuse_is_refused(tmp_path: Path, align: int) -> None:
    with open_direct(str(tmp_path / "image"), "w") as file, DirectWriter(file) as writer:
        writer.write([b"head"])
        with pytest.raises(ValueError, match="not all after"):
            writer.retract(1)  # nothing reserved: it may be on disk
        where = writer.reserve(17)
        with pytest.raises(ValueError, match="not filled"):
            writer.reserve(4)
        writer.write([b"body"])
        with pytest.raises(ValueError, match="not all after"):
            writer.retract(10)  # into the reserved range, not all of it
        with pytest.raises(ValueError, match="may be on disk"):
            writer.view_since(where - 1)
        with pytest.raises(ValueError, match="no reserved range of 16 bytes"):
            writer.fill(where, bytes(16))
        with pytest.raises(ValueError, match="never filled"):
            writer.finish()
        writer.fill(where, bytes(range(17)))
        assert writer.finish() == 4 + 17 + 4
