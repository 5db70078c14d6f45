"""migpipe serve and migpipe.service.client, over real UNIX sockets, pipes and files.

The service runs in-process in its own thread's trio loop, so each test can wait for it to
be idle (no connection, no job) and then count the process's open fds: every scenario must
leave exactly the fds it found. One test runs `migpipe serve` itself as a subprocess. The
protocol without sockets (lines, limits, commands, messages) is tests/test_serviceproto.py.
"""

import contextlib
import errno
import json
import os
import select
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio
from migpipe_filters import encrypt
from support import MIGPIPE, synthetic_stream

from migpipe.errors import EXIT_KEY, EXIT_PEER_GONE, MigpipeError
from migpipe.io.channel import FdChannel
from migpipe.keys import keygen
from migpipe.save.fixedfile import FixedSaver, PlainFile
from migpipe.service import client as service_client
from migpipe.service.client import Client, JobError, ServiceError
from migpipe.service.protocol import (
    COMMAND_NOT_FOUND,
    COMMANDS,
    GENERIC_ERROR,
    INPUT,
    JOB_CANCELLED,
    JOB_FAILED,
    JOB_PROGRESS,
    MAX_FDS_PER_MESSAGE,
    MAX_LINE,
    OUTPUT,
    SECRET,
    CommandError,
    FdInfo,
    encode_message,
    error_reply,
    event,
    greeting,
    reply,
)
from migpipe.service.server import REFUSALS_LOGGED, Service, bind_private, describe_fd
from migpipe.tunnel.pipeline import decode

TIMEOUT = 60.0  # only ever reached when something is broken; nothing waits for it to pass
IDLE_TIMEOUT = 10.0  # the same, for the service to notice that every client has gone
NOBODY, DAEMON = 65534, 1


@pytest.fixture(scope="module")
def stream() -> bytes:
    return synthetic_stream(4 << 20, 3, dirty_share=0.05, seed=1)


@pytest.fixture(scope="module")
def small_stream() -> bytes:
    return synthetic_stream(256 << 10, 2, dirty_share=0.05, seed=1)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Harness:
    """A Service in its own thread's trio loop, as `migpipe serve` runs it."""

    def __init__(self, path: Path, **options: object) -> None:
        self.path = path
        self.log: list[str] = []
        self.service = Service(**options, log=self.log.append)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,))

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            await nursery.start(self.service.serve, self.path)
            self._ready.set()

    def __enter__(self) -> "Harness":
        self._thread.start()
        assert self._ready.wait(TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self.token)
        self._thread.join(TIMEOUT)

    def connect(self) -> Client:
        return service_client.connect(str(self.path), timeout=TIMEOUT, wait_timeout=TIMEOUT)

    def raw(self) -> "Raw":
        return Raw(str(self.path))

    def on_loop(self, function: Callable[[], object]) -> None:
        """Call `function` in the service's thread, as its own tasks would."""
        trio.from_thread.run_sync(function, trio_token=self.token)

    def wait_idle(self) -> None:
        async def idle() -> None:
            with trio.fail_after(IDLE_TIMEOUT):  # a test that failed may leave a client open
                await self.service.wait_idle()

        trio.from_thread.run(idle, trio_token=self.token)


class Raw:
    """A client that sends whatever bytes and fds a test wants, and reads lines back."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        assert "migpipe" in self.read()

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        sent = socket.send_fds(self.sock, [data], fds) if fds else 0
        self.sock.sendall(data[sent:])

    def read(self) -> dict:
        line = self.file.readline()
        assert line, "the service closed the connection"
        return strict_json(line)

    def closed_by_service(self) -> bool:
        """EOF, or a reset: a socket closed with unread data in it resets its peer."""
        try:
            return self.file.readline() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def strict_json(line: bytes) -> Any:
    """JSON as the standard has it: Python's json takes NaN and Infinity, which it is not."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"the service sent {constant}, which is not JSON")

    return json.loads(line, parse_constant=refuse)


@contextlib.contextmanager
def serving(path: Path, **options: object) -> Iterator[Harness]:
    """A running service; on the way out, once it is idle, no fd may be left open."""
    with Harness(path, **options) as harness:
        before = open_fds()
        yield harness
        harness.wait_idle()
        assert open_fds() == before, "fds leaked"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Harness]:
    with serving(tmp_path / "migpipe.sock") as harness:
        yield harness


def give(session: Client, name: str, fd: int) -> None:
    """Pass `fd` to the service and close our copy: from now on only the service has it."""
    try:
        session.add_fd(name, fd)
    finally:
        os.close(fd)


def sink() -> int:
    """A write-only file with no name, where output no test reads goes."""
    return os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_WRONLY, 0o600)


def reader_gone(write_end: int) -> bool:
    """True when every read end of the pipe is closed (the service closed its copy too).
    Closes `write_end`."""
    try:
        os.write(write_end, b"x")
    except BrokenPipeError:
        return True
    finally:
        os.close(write_end)
    return False


def stall(session: Client, jobs: dict[str, int], prefix: bytes) -> None:
    """Wait until each job has read all of `prefix` from its input: with nothing more there,
    it is now blocked reading, which is what cancelling must interrupt."""

    def all_read() -> bool:
        return all(session.progress.get(job, {}).get("bytes-in") == len(prefix) for job in jobs)

    for w in jobs.values():
        os.write(w, prefix)  # a pipe holds 64 KiB
    while not all_read():
        session.wait_event(lambda e: e["event"] == JOB_PROGRESS)


def read_all(fd: int) -> bytes:
    """Everything up to EOF, which comes once every write end (the service's too) is closed."""
    out = bytearray()
    with select.epoll() as poll:
        poll.register(fd, select.EPOLLIN)
        while poll.poll(TIMEOUT) and (chunk := os.read(fd, 1 << 20)):
            out += chunk
        assert poll.poll(0), "no EOF: a write end is still open"
    os.close(fd)
    return bytes(out)


def feeder(fd: int, data: bytes) -> threading.Thread:
    """Write `data` into a pipe and close it, in a thread (pipes hold far less)."""

    def run() -> None:
        with contextlib.suppress(BrokenPipeError):  # a job that failed stopped reading
            _write_all(fd, data)
        os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Gate:
    """Stands in for a slow function of the service's: each call waits for the test to open
    the gate, so the test knows the service is inside it for as long as it needs."""

    def __init__(self, slow: Callable[..., Any]) -> None:
        self.slow = slow
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, *args: Any) -> Any:
        self.entered.set()
        assert self.open.wait(2 * TIMEOUT)  # the test's own wait, if the gate holds it, fails first
        return self.slow(*args)

    def others_are_served(self, service: Harness) -> None:
        """While a call waits here, a new client is greeted and its commands answered: the
        call is not on the service's event loop. Then the gate opens."""
        try:
            assert self.entered.wait(TIMEOUT)
            with service.connect() as other:
                assert other.execute("query-jobs") == []
        finally:
            self.open.set()


class Spinner:
    """Stands in for a function a job's worker thread calls: the first call computes in Python
    (holding the GIL but at each switch interval) until the test lets it go, as a job busy
    parsing does; then it does what the function does."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, *args: Any) -> Any:
        if not self.entered.is_set():
            self.entered.set()
            while not self.released.is_set():
                pass
        return self.function(*args)


def decoded(wire: Path, tmp_path: Path) -> bytes:
    """A wire file decoded in-process, for checking what jobs wrote."""
    out = tmp_path / f"{wire.name}.decoded"
    with open(wire, "rb") as src, open(out, "wb") as dst:
        trio.run(decode, FdChannel(src.fileno()), FdChannel(dst.fileno()))
    return out.read_bytes()


# -- the service ---------------------------------------------------------------------------------


def test_what_fds_are(tmp_path: Path) -> None:
    r, w = os.pipe()
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    path_only = os.open(tmp_path, os.O_PATH)
    zero = os.open("/dev/zero", os.O_RDWR)
    left, right = socket.socketpair()
    try:
        assert describe_fd(r) == FdInfo("pipe", readable=True, writable=False)
        assert describe_fd(w) == FdInfo("pipe", readable=False, writable=True)
        assert describe_fd(directory) == FdInfo("directory", readable=True, writable=False)
        assert describe_fd(path_only) == FdInfo("directory", readable=False, writable=False)
        assert describe_fd(zero) == FdInfo("character device", readable=True, writable=True)
        assert describe_fd(left.fileno()) == FdInfo("socket", readable=True, writable=True)
    finally:
        for fd in (r, w, directory, path_only, zero):
            os.close(fd)
        left.close()
        right.close()
    with pytest.raises(CommandError, match=r"fd 'd' \(argument 'input', read from\) is a dir"):
        INPUT.check("input", "d", FdInfo("directory", True, False))
    with pytest.raises(CommandError, match=r"'f' .* is not open for writing"):
        OUTPUT.check("output", "f", FdInfo("file", True, False))
    with pytest.raises(CommandError, match="is a pipe; it must be one of: file"):
        SECRET.check("key", "k", FdInfo("pipe", True, False))
    INPUT.check("input", "s", FdInfo("socket", True, True))


def test_encode_then_decode_reproduces_the_stream(
    service: Harness, stream: bytes, tmp_path: Path
) -> None:
    (tmp_path / "in").write_bytes(stream)
    with service.connect() as session:
        src = os.open(tmp_path / "in", os.O_RDONLY)
        assert session.add_fd("src", src) == {
            "name": "src",
            "type": "file",
            "readable": True,
            "writable": False,
        }
        os.close(src)
        give(session, "dst", os.open(tmp_path / "wire", os.O_WRONLY | os.O_CREAT, 0o600))
        job = session.start_job("encode", input="src", output="dst", filters=["xbzrle", "zstd"])
        assert session.execute("query-fds") == []  # the job took them
        encoded = session.wait_job(job)
        assert encoded["state"] == "completed"
        assert encoded["bytes-in"] == encoded["figures"]["qemu_bytes"] == len(stream)
        assert encoded["bytes-out"] == (tmp_path / "wire").stat().st_size

        r, w = os.pipe()
        give(session, "wire", os.open(tmp_path / "wire", os.O_RDONLY))
        give(session, "out", w)
        job = session.start_job("decode", input="wire", output="out")
        assert read_all(r) == stream
        rebuilt = session.wait_job(job)
        assert rebuilt["figures"]["qemu_digest"] == encoded["figures"]["qemu_digest"]
        assert rebuilt["bytes-in"] == encoded["bytes-out"]
        assert session.query_jobs() == []


@pytest.mark.parametrize("layout", ["stream", "fixed"])
def test_save_then_restore_jobs(
    service: Harness, stream: bytes, tmp_path: Path, layout: str
) -> None:
    """A daemon opens the saved file itself and hands it over; restore gives the stream back
    (the fixed layout: each page once, holding what the stream left in it)."""
    import oracle

    with service.connect() as session:
        r, w = os.pipe()
        give(session, "qemu", r)
        give(session, "file", os.open(tmp_path / "vm.mig", os.O_RDWR | os.O_CREAT, 0o600))
        job = session.start_job("save", input="qemu", output="file", layout=layout, filters=["lz4"])
        with os.fdopen(w, "wb") as qemu:
            qemu.write(stream)
        saved = session.wait_job(job)
        assert saved["state"] == "completed" and saved["bytes-in"] == len(stream)

        r, w = os.pipe()
        give(session, "file", os.open(tmp_path / "vm.mig", os.O_RDONLY))
        give(session, "out", w)
        job = session.start_job("restore", input="file", output="out")
        restored = read_all(r)
        assert session.wait_job(job)["state"] == "completed"
    if layout == "stream":
        assert restored == stream
    else:
        replayed = oracle.replay(restored)
        assert replayed.max_sends == 1 and replayed.image == oracle.replay(stream).image

    with service.connect() as session:  # a save into a file that is not empty is refused
        give(session, "qemu", os.open(tmp_path / "vm.mig", os.O_RDONLY))
        give(session, "file", os.open(tmp_path / "vm.mig", os.O_RDWR))
        with pytest.raises(ServiceError, match="must be empty"):
            session.start_job("save", input="qemu", output="file")


def test_a_save_job_refuses_at_start_what_its_layout_cannot_do(
    service: Harness, small_stream: bytes, tmp_path: Path
) -> None:
    """xbzrle with the fixed layout, a cache that is not a size: start-job says so, no job."""
    with service.connect() as session:
        for arguments, error in (
            ({"layout": "fixed", "filters": ["xbzrle"]}, "xbzrle has nothing to do there"),
            ({"layout": "fixed", "cache": "lots"}, "not a size"),
        ):
            r, w = os.pipe()
            os.close(w)
            give(session, "qemu", r)
            give(session, "file", os.open(tmp_path / "vm.mig", os.O_RDWR | os.O_CREAT, 0o600))
            with pytest.raises(ServiceError, match=error):
                session.start_job("save", input="qemu", output="file", **arguments)
            assert session.execute("query-jobs") == []
            for name in ("qemu", "file"):  # still the daemon's, named: it may use them again
                session.execute("remove-fd", name=name)
        r, w = os.pipe()  # and a cache that is one is taken
        give(session, "qemu", r)
        give(session, "file", os.open(tmp_path / "vm.mig", os.O_RDWR | os.O_CREAT, 0o600))
        job = session.start_job("save", input="qemu", output="file", layout="fixed", cache="1M")
        with os.fdopen(w, "wb") as qemu:
            qemu.write(small_stream)
        assert session.wait_job(job)["state"] == "completed"


@pytest.mark.parametrize("layout", ["stream", "fixed"])
def test_a_save_job_refuses_a_file_it_could_not_restore_from(
    service: Harness, tmp_path: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_APPEND would put the fixed layout's extents, index and superblock at the end, and a
    write offset past 0 a hole before the stream's magic: either save would seem to complete
    and never restore. start-job says so, and takes nothing."""
    for name in ("vm.mig", "unseekable"):
        (tmp_path / name).touch()
    unseekable = (tmp_path / "unseekable").stat().st_ino
    real_lseek = os.lseek

    def lseek(fd: int, offset: int, whence: int) -> int:  # as a FUSE file opened nonseekable
        if os.fstat(fd).st_ino == unseekable:
            raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
        return real_lseek(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", lseek)
    appending = os.open(tmp_path / "vm.mig", os.O_RDWR | os.O_APPEND)
    offset = os.open(tmp_path / "vm.mig", os.O_RDWR)
    real_lseek(offset, 4096, os.SEEK_SET)  # the file is empty all the same
    with service.connect() as session:
        for name, fd, error in (
            (
                "appending",
                appending,
                "output fd 'appending' is open with O_APPEND, which puts "
                "every write at the end; open it without",
            ),
            ("offset", offset, "output fd 'offset' is at offset 4096; a save writes from offset 0"),
            (
                "unseekable",
                os.open(tmp_path / "unseekable", os.O_RDWR),
                "output fd 'unseekable' cannot seek (Illegal seek); a saved file must",
            ),
        ):
            r, w = os.pipe()
            os.close(w)
            give(session, "qemu", r)
            give(session, name, fd)
            with pytest.raises(ServiceError) as refused:
                session.start_job("save", input="qemu", output=name, layout=layout)
            assert refused.value.desc == error
            assert session.query_jobs() == []
            assert {f["name"] for f in session.execute("query-fds")} == {"qemu", name}
            session.remove_fd("qemu")
            session.remove_fd(name)
        give(session, "unseekable", os.open(tmp_path / "unseekable", os.O_RDONLY))
        give(session, "out", sink())
        with pytest.raises(ServiceError, match="input fd 'unseekable' cannot seek"):
            session.start_job("restore", input="unseekable", output="out")
    assert (tmp_path / "vm.mig").stat().st_size == 0


def test_encrypted_jobs_take_their_key_as_an_fd(
    service: Harness, small_stream: bytes, tmp_path: Path
) -> None:
    keygen(tmp_path / "key")
    (tmp_path / "in").write_bytes(small_stream)
    with service.connect() as session:
        give(session, "src", os.open(tmp_path / "in", os.O_RDONLY))
        give(session, "dst", os.open(tmp_path / "wire", os.O_WRONLY | os.O_CREAT, 0o600))
        give(session, "key", os.open(tmp_path / "key", os.O_RDONLY))
        job = session.start_job(
            "encode", input="src", output="dst", filters=["zstd:1", "encrypt"], key="key"
        )
        session.wait_job(job)
        assert small_stream[:4096] not in (tmp_path / "wire").read_bytes()

        give(session, "wire", os.open(tmp_path / "wire", os.O_RDONLY))
        give(session, "out", sink())
        with pytest.raises(JobError) as failed:  # no key
            session.wait_job(session.start_job("decode", input="wire", output="out"))
        assert failed.value.data["exit-status"] == EXIT_KEY

        r, w = os.pipe()
        give(session, "wire", os.open(tmp_path / "wire", os.O_RDONLY))
        give(session, "out", w)
        give(session, "key", os.open(tmp_path / "key", os.O_RDONLY))
        job = session.start_job("decode", input="wire", output="out", key="key")
        assert read_all(r) == small_stream
        session.wait_job(job)


@pytest.mark.parametrize(("kind", "maker"), [("decode", "encode"), ("restore", "save")])
def test_a_reader_given_a_key_refuses_an_unencrypted_input(
    service: Harness, small_stream: bytes, tmp_path: Path, kind: str, maker: str
) -> None:
    """Whoever can write the wire or the file must not choose the guest: given a key, a job
    takes only input sealed with it, unless allow-unencrypted says a plain one will do."""
    keygen(tmp_path / "key")
    (tmp_path / "in").write_bytes(small_stream)
    with service.connect() as session:
        give(session, "src", os.open(tmp_path / "in", os.O_RDONLY))
        give(session, "dst", os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600))
        session.wait_job(session.start_job(maker, input="src", output="dst"))  # not encrypted

        give(session, "plain", os.open(tmp_path / "plain", os.O_RDONLY))
        give(session, "out", os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600))
        give(session, "key", os.open(tmp_path / "key", os.O_RDONLY))
        with pytest.raises(
            ServiceError, match="'allow-unencrypted' of 'start-job' must be a boolean, not a string"
        ):
            session.start_job(
                kind, input="plain", output="out", key="key", **{"allow-unencrypted": "yes"}
            )
        with pytest.raises(JobError) as refused:
            session.wait_job(session.start_job(kind, input="plain", output="out", key="key"))
        assert refused.value.error_class == JOB_FAILED
        assert refused.value.data["exit-status"] == EXIT_KEY
        assert (tmp_path / "out").stat().st_size == 0  # not one byte for QEMU

        r, w = os.pipe()
        give(session, "plain", os.open(tmp_path / "plain", os.O_RDONLY))
        give(session, "out", w)
        give(session, "key", os.open(tmp_path / "key", os.O_RDONLY))
        job = session.start_job(
            kind, input="plain", output="out", key="key", **{"allow-unencrypted": True}
        )
        assert read_all(r) == small_stream
        session.wait_job(job)


def test_keys_are_derived_off_the_event_loop(
    service: Harness, small_stream: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scrypt takes a passphrase's time, at start-job for encode and at the wire header for
    decode: never on the loop that serves every client."""
    (tmp_path / "pass").write_bytes(b"correct horse\n")
    (tmp_path / "pass").chmod(0o600)
    (tmp_path / "in").write_bytes(small_stream)
    with service.connect() as session:
        give(session, "src", os.open(tmp_path / "in", os.O_RDONLY))
        give(session, "dst", os.open(tmp_path / "wire", os.O_WRONLY | os.O_CREAT, 0o600))
        give(session, "pass", os.open(tmp_path / "pass", os.O_RDONLY))
        gate = Gate(encrypt._wrapping_key)
        monkeypatch.setattr(encrypt, "_wrapping_key", gate)
        with ThreadPoolExecutor(1) as pool:  # start-job waits at the gate
            started = pool.submit(
                session.start_job,
                "encode",
                input="src",
                output="dst",
                filters=["encrypt"],
                passphrase="pass",
            )
            gate.others_are_served(service)
            session.wait_job(started.result(TIMEOUT))

        gate = Gate(gate.slow)
        monkeypatch.setattr(encrypt, "_wrapping_key", gate)
        r, w = os.pipe()
        give(session, "wire", os.open(tmp_path / "wire", os.O_RDONLY))
        give(session, "out", w)
        give(session, "pass", os.open(tmp_path / "pass", os.O_RDONLY))
        job = session.start_job("decode", input="wire", output="out", passphrase="pass")
        gate.others_are_served(service)
        assert read_all(r) == small_stream
        session.wait_job(job)


def test_a_save_is_synced_off_the_event_loop(
    service: Harness, small_stream: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(PlainFile.sync)
    monkeypatch.setattr(PlainFile, "sync", lambda file: gate(file))
    (tmp_path / "in").write_bytes(small_stream)
    with service.connect() as session:
        give(session, "qemu", os.open(tmp_path / "in", os.O_RDONLY))
        give(session, "file", os.open(tmp_path / "vm.mig", os.O_RDWR | os.O_CREAT, 0o600))
        job = session.start_job("save", input="qemu", output="file")
        gate.others_are_served(service)
        assert session.wait_job(job)["bytes-in"] == len(small_stream)


def test_an_output_socket_ends_even_if_the_client_kept_a_copy(
    service: Harness, small_stream: bytes, tmp_path: Path
) -> None:
    (tmp_path / "in").write_bytes(small_stream)
    ours, theirs = socket.socketpair()
    with service.connect() as session, ours, theirs:
        give(session, "src", os.open(tmp_path / "in", os.O_RDONLY))
        session.add_fd("dst", ours.fileno())  # and we keep `ours` open
        job = session.start_job("encode", input="src", output="dst")
        wire = theirs.makefile("rb").read()  # EOF: the job shut the socket down for writing
        assert len(wire) == session.wait_job(job)["bytes-out"]


def test_32_jobs_at_once(service: Harness, small_stream: bytes, tmp_path: Path) -> None:
    feeds, jobs = [], []
    with service.connect() as session:
        for n in range(32):
            r, w = os.pipe()
            give(session, f"in{n}", r)
            give(session, f"out{n}", os.open(tmp_path / f"wire{n}", os.O_WRONLY | os.O_CREAT))
            jobs.append(
                session.start_job(
                    "encode", input=f"in{n}", output=f"out{n}", filters=["xbzrle", "zstd:1"]
                )
            )
            feeds.append(w)
        running = session.query_jobs()
        assert [j["id"] for j in running] == jobs  # all 32 started before any had input
        assert {j["state"] for j in running} == {"running"}
        threads = [feeder(w, small_stream) for w in feeds]
        for job in jobs:
            assert session.wait_job(job)["figures"]["qemu_bytes"] == len(small_stream)
        for thread in threads:
            thread.join()
    for n in range(32):
        assert decoded(tmp_path / f"wire{n}", tmp_path) == small_stream


def test_stalled_jobs_do_not_starve_the_others(small_stream: bytes, tmp_path: Path) -> None:
    """More stalled jobs than trio's default 40 worker threads, and one more job still runs."""
    (tmp_path / "in").write_bytes(small_stream)
    writers = {}
    with serving(tmp_path / "s.sock", max_jobs=50) as service:
        with service.connect() as session:
            for n in range(45):
                r, w = os.pipe()
                give(session, f"in{n}", r)
                give(session, f"out{n}", sink())
                writers[session.start_job("encode", input=f"in{n}", output=f"out{n}")] = w
            stall(session, writers, small_stream[:4096])
            give(session, "src", os.open(tmp_path / "in", os.O_RDONLY))
            give(session, "dst", sink())
            job = session.start_job("encode", input="src", output="dst")
            assert session.wait_job(job)["bytes-in"] == len(small_stream)
            assert len(session.query_jobs()) == 45
        service.wait_idle()
        # leaving the connection cancelled the 45: their input pipes have no reader any more
        assert all([reader_gone(w) for w in writers.values()])


def test_cancel_job(service: Harness, small_stream: bytes) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with service.connect() as session:
        give(session, "in", in_r)
        give(session, "out", out_w)
        job = session.start_job("encode", input="in", output="out")
        stall(session, {job: in_w}, small_stream[:4096])
        session.cancel_job(job)
        with pytest.raises(JobError) as ended:
            session.wait_job(job)
        assert ended.value.error_class == JOB_CANCELLED
        assert ended.value.data["state"] == "cancelled"
        assert session.query_jobs() == []
        with pytest.raises(ServiceError, match=f"no job '{job}' on this connection"):
            session.cancel_job(job)
        # the job closed both its fds when it ended, with the connection still open
        read_all(out_r)  # asserts EOF
        assert reader_gone(in_w)


def test_a_job_busy_in_python_delays_no_greeting_and_stops_once_cancelled(
    service: Harness, stream: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a job's thread computes in Python, others are greeted and answered at once; once
    cancelled, the job stops at its next read although its input has bytes waiting there (it
    never waits, so only the stop flag its cancel sets can end it), not at the input's end."""
    spinner = Spinner(FixedSaver.add)
    monkeypatch.setattr(FixedSaver, "add", lambda saver, records: spinner(saver, records))
    prefix, rest = stream[:4096], stream[4096 : 64 << 10]
    r, w = os.pipe()
    os.write(w, prefix)
    with service.connect() as session:
        give(session, "qemu", r)
        give(session, "file", os.open(tmp_path / "vm.mig", os.O_RDWR | os.O_CREAT, 0o600))
        job = session.start_job("save", input="qemu", output="file", layout="fixed")
        try:
            assert spinner.entered.wait(TIMEOUT)  # it read the prefix and is busy with it
            os.write(w, rest)  # a pipe holds 64 KiB: its next read finds all this at once
            started = time.monotonic()
            with service.connect() as other:
                assert other.query_jobs() == []
            assert time.monotonic() - started < 2.0  # the loop is ours within a few ms
            session.cancel_job(job)
        finally:
            spinner.released.set()
        with pytest.raises(JobError) as ended:
            session.wait_job(job)
        assert ended.value.error_class == JOB_CANCELLED
        assert ended.value.data["bytes-in"] == len(prefix)
    assert reader_gone(w)


def test_progress_events(service: Harness, stream: bytes) -> None:
    r, w = os.pipe()
    half = threading.Event()

    def feed() -> None:
        _write_all(w, stream[: len(stream) // 2])
        half.wait(TIMEOUT)
        _write_all(w, stream[len(stream) // 2 :])
        os.close(w)

    writer = threading.Thread(target=feed)
    writer.start()
    with service.connect() as session:
        give(session, "in", r)
        give(session, "out", sink())
        job = session.start_job("encode", input="in", output="out", filters=["zstd:1"])
        progress = session.wait_event(
            lambda e: e["event"] == JOB_PROGRESS and e["data"]["bytes-in"] > 0
        )
        half.set()
        assert progress["data"]["id"] == job and progress["data"]["state"] == "running"
        assert progress["data"]["bytes-in"] <= len(stream) // 2
        assert set(progress["timestamp"]) == {"seconds", "microseconds"}
        assert session.progress[job] == progress["data"]
        assert session.wait_job(job)["bytes-in"] == len(stream)
    writer.join()


def test_leaving_closes_fds_and_cancels_jobs_others_keep_going(
    service: Harness, small_stream: bytes
) -> None:
    unused_r, unused_w = os.pipe()
    in_r, in_w = os.pipe()
    other = service.connect()
    session = service.connect()
    give(session, "unused", unused_r)
    give(session, "in", in_r)
    give(session, "out", sink())
    job = session.start_job("encode", input="in", output="out")
    stall(session, {job: in_w}, small_stream[:4096])
    assert [j["id"] for j in session.query_jobs()] == [job]
    assert other.query_jobs() == []  # jobs belong to their connection
    session.close()  # mid-job
    assert other.execute("query-fds") == []
    other.close()
    service.wait_idle()
    assert reader_gone(unused_w)
    assert reader_gone(in_w)


def test_bad_input_gets_an_error_and_the_connection_lives(service: Harness) -> None:
    raw = service.raw()
    cases = [
        (b"{nonsense\n", GENERIC_ERROR, "JSON parse error"),
        (b'"hello"\n', GENERIC_ERROR, "a JSON object, not a string"),
        (b'{"execute": "migrate", "id": 1}\n', COMMAND_NOT_FOUND, "unknown command 'migrate'"),
        (
            b'{"execute": "remove-fd", "arguments": {"name": ["x"]}}\n',
            GENERIC_ERROR,
            "must be a string, not a list",
        ),
        (
            b'{"execute": "cancel-job", "arguments": {"id": "job-1", "force": true}}\n',
            GENERIC_ERROR,
            "no argument 'force'",
        ),
        (
            b'{"execute": "start-job", "arguments": {"kind": "teleport"}}\n',
            GENERIC_ERROR,
            "unknown job kind 'teleport' (kinds: encode, decode, save, restore)",
        ),
        (
            b'{"execute": "start-job", "arguments": {"kind": "encode", "input": "a"}}\n',
            GENERIC_ERROR,
            "'start-job' needs argument 'output'",
        ),
        (
            b'{"execute": "start-job", "arguments": {"kind": "decode", "input": "a", "output": "b",'
            b' "filters": []}}\n',
            GENERIC_ERROR,
            "'start-job' has no argument 'filters'",
        ),
        (
            b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
            GENERIC_ERROR,
            "no capability 'oob'",
        ),
        (
            b'{"execute": "query-fds", "id": 1e999999}\n',
            GENERIC_ERROR,
            "a number too large for a double",
        ),
    ]
    for text, error_class, desc in cases:
        raw.send(text)
        answer = raw.read()
        assert answer["error"]["class"] == error_class, text
        assert desc in answer["error"]["desc"], (text, answer)
    raw.send(b'{"execute": "query-fds", "id": "still here"}\n')
    assert raw.read() == {"return": [], "id": "still here"}
    raw.close()


def test_replies_are_sent_before_the_connection_closes(service: Harness) -> None:
    raw = service.raw()
    raw.send(b'{"execute": "query-fds", "id": 1}\n{"execute": "query-jobs", "id": 2}\n')
    raw.sock.shutdown(socket.SHUT_WR)  # a client that only stops sending still gets its replies
    assert raw.read() == {"return": [], "id": 1}
    assert raw.read() == {"return": [], "id": 2}
    assert raw.closed_by_service()
    raw.close()


def test_a_flood_is_disconnected_and_others_are_served(service: Harness) -> None:
    r, w = os.pipe()
    other = service.connect()
    raw = service.raw()
    flood = b'{"execute": "add-fd", "arguments": {"name": "' + b"x" * (MAX_LINE + 1024)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.send(flood, [r])  # the service may hang up before it has all of it
    os.close(r)
    assert f"longer than {MAX_LINE} bytes" in raw.read()["error"]["desc"]
    assert raw.closed_by_service()
    raw.close()
    assert other.execute("query-fds") == []
    other.close()
    service.wait_idle()
    assert reader_gone(w)  # the fd that came with the flood was closed


def test_fds_without_a_line_end_are_a_flood(service: Harness) -> None:
    """A client that sends fds with a line it never ends is cut off, not left to make the
    service hold fds without limit; the fds are closed, and others are served."""
    r, w = os.pipe()
    other = service.connect()
    raw = service.raw()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(3):  # one byte of a line and as many fds as a message may carry, thrice
            raw.send(b"{", [r] * MAX_FDS_PER_MESSAGE)
        raw.send(b"}\n")  # the service may hang up before it has all of it
    os.close(r)
    assert f"more than {MAX_FDS_PER_MESSAGE} fds for one line" in raw.read()["error"]["desc"]
    assert raw.closed_by_service()
    raw.close()
    assert other.execute("query-fds") == []
    other.close()
    service.wait_idle()
    assert reader_gone(w)  # every copy the service received was closed


def test_connection_limit(tmp_path: Path) -> None:
    with serving(tmp_path / "s.sock", max_connections=2) as service:
        first, second = service.connect(), service.connect()
        with pytest.raises(ServiceError, match="has 2 connections, the most it may"):
            service.connect()
        assert second.execute("query-fds") == []  # those served are served as before
        first.close()
        second.close()
        service.wait_idle()
        with service.connect() as again:
            assert again.execute("query-jobs") == []


def test_bad_sizes_get_an_error_and_the_connection_lives(service: Harness) -> None:
    with service.connect() as session:
        for n, size in enumerate(["infK", "nanK", "1e400K", "-4M", "lots"]):
            give(session, f"in{n}", os.open(os.devnull, os.O_RDONLY))
            give(session, f"out{n}", sink())
            with pytest.raises(ServiceError, match=f'xbzrle cache size: not a size: "{size}"'):
                session.start_job(
                    "encode", input=f"in{n}", output=f"out{n}", filters=[f"xbzrle:{size}"]
                )
        assert len(session.execute("query-fds")) == 10  # a refused start-job takes nothing


def test_a_bug_in_a_command_fails_it_not_the_connection(
    service: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(text: str, secrets: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("migpipe.service.server.parse_chain", broken)
    with service.connect() as session:
        give(session, "in", os.open(os.devnull, os.O_RDONLY))
        give(session, "out", sink())
        with pytest.raises(ServiceError, match="internal error: RuntimeError: a bug"):
            session.start_job("encode", input="in", output="out")
        assert {fd["name"] for fd in session.execute("query-fds")} == {"in", "out"}
    assert "internal error in a command" in service.log[0]


def test_fds_on_the_wrong_command_are_closed(service: Harness) -> None:
    pipes = [os.pipe() for _ in range(3)]
    raw = service.raw()
    raw.send(b'{"execute": "add-fd", "arguments": {"name": "a"}}\n')
    assert "got 0" in raw.read()["error"]["desc"]
    raw.send(b'{"execute": "add-fd", "arguments": {"name": "a"}}\n', [pipes[0][0], pipes[1][0]])
    assert "got 2; they were closed" in raw.read()["error"]["desc"]
    raw.send(b'{"execute": "query-jobs", "id": 4}\n', [pipes[2][0]])
    assert raw.read() == {
        "error": {
            "class": GENERIC_ERROR,
            "desc": "'query-jobs' takes no fd; the 1 attached were closed",
        },
        "id": 4,
    }
    for r, _ in pipes:
        os.close(r)
    raw.send(b'{"execute": "query-fds"}\n')
    assert raw.read() == {"return": []}
    assert all([reader_gone(w) for _, w in pipes])
    raw.close()


def test_too_many_fds_in_one_message(service: Harness) -> None:
    pipes = [os.pipe() for _ in range(MAX_FDS_PER_MESSAGE + 4)]
    raw = service.raw()
    raw.send(b'{"execute": "add-fd", "arguments": {"name": "a"}}\n', [r for r, _ in pipes])
    assert f"more than {MAX_FDS_PER_MESSAGE} fds" in raw.read()["error"]["desc"]
    for r, _ in pipes:
        os.close(r)
    assert all([reader_gone(w) for _, w in pipes])  # those received closed, the rest dropped
    raw.close()


def test_a_closed_fd_cannot_be_sent(service: Harness) -> None:
    with service.connect() as session:
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        with pytest.raises(OSError) as raised:
            session.add_fd("gone", r)
        assert raised.value.errno == errno.EBADF  # sendmsg fails whole: nothing reached it
        assert session.execute("query-fds") == []


def test_fds_of_the_wrong_kind_are_refused_at_start(service: Harness, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"data")
    (tmp_path / "key").write_bytes(b"not a key\n")
    (tmp_path / "key").chmod(0o600)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    fds = {
        "dir": os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        "readonly": os.open(tmp_path / "file", os.O_RDONLY),
        "path": os.open(tmp_path / "file", os.O_PATH),
        "pipe-in": in_r,
        "pipe-out": out_w,
        "key": os.open(tmp_path / "key", os.O_RDONLY),
    }
    with service.connect() as session:
        for name, fd in fds.items():
            give(session, name, fd)
        with pytest.raises(ServiceError, match="an fd named 'dir' is already added"):
            give(session, "dir", sink())
        refused = [
            (
                {"input": "dir", "output": "pipe-out"},
                "'dir' (argument 'input', read from) is a "
                "directory; it must be one of: block device, character device, file, pipe, socket",
            ),
            (
                {"input": "pipe-in", "output": "readonly"},
                "'readonly' (argument 'output', written to) is not open for writing",
            ),
            (
                {"input": "path", "output": "pipe-out"},
                "'path' (argument 'input', read from) is not open for reading",
            ),
            ({"input": "pipe-out", "output": "pipe-out"}, "fd 'pipe-out' is given twice"),
            ({"input": "nope", "output": "pipe-out"}, "no fd named 'nope'"),
            ({"input": "pipe-in", "output": "pipe-out", "key": "pipe-in"}, "given twice"),
            (
                {"input": "pipe-in", "output": "pipe-out", "key": "readonly", "passphrase": "key"},
                "give 'key' or 'passphrase', not both",
            ),
            (
                {"input": "pipe-in", "output": "pipe-out", "filters": ["gzip"]},
                'unknown filter "gzip"',
            ),
            (
                {"input": "pipe-in", "output": "pipe-out", "filters": ["zstd,lz4"]},
                "one filter per item of 'filters'",
            ),
            (
                {"input": "pipe-in", "output": "pipe-out", "filters": "zstd"},
                "must be a list of strings, not a string",
            ),
            (
                {"input": "pipe-in", "output": "pipe-out", "filters": ["encrypt"], "key": "key"},
                "is not a migpipe key file",
            ),
            ({"input": "pipe-in", "output": "pipe-out", "filters": ["encrypt"]}, "needs a key"),
        ]
        for arguments, desc in refused:
            with pytest.raises(ServiceError) as raised:
                session.start_job("encode", **arguments)
            assert desc in raised.value.desc, (arguments, raised.value.desc)
        # a refused start-job takes no fd
        assert {fd["name"] for fd in session.execute("query-fds")} == set(fds)
        session.remove_fd("pipe-in")
        assert reader_gone(in_w)  # remove-fd closed it
        with pytest.raises(ServiceError, match="no fd named 'pipe-in'"):
            session.remove_fd("pipe-in")
    service.wait_idle()
    read_all(out_r)  # leaving closed 'pipe-out', never used


def test_job_failures_are_events_and_the_service_goes_on(
    service: Harness, small_stream: bytes, tmp_path: Path
) -> None:
    (tmp_path / "garbage").write_bytes(os.urandom(1 << 16))
    (tmp_path / "in").write_bytes(small_stream)
    with service.connect() as session:
        give(session, "garbage", os.open(tmp_path / "garbage", os.O_RDONLY))
        give(session, "out", sink())
        with pytest.raises(JobError) as failed:
            session.wait_job(session.start_job("decode", input="garbage", output="out"))
        assert failed.value.error_class == JOB_FAILED
        assert failed.value.data["exit-status"] not in (0, None) and failed.value.desc

        r, w = os.pipe()
        os.close(r)  # nobody will read the output
        give(session, "src", os.open(tmp_path / "in", os.O_RDONLY))
        give(session, "dst", w)
        with pytest.raises(JobError) as failed:
            session.wait_job(session.start_job("encode", input="src", output="dst"))
        assert failed.value.data["exit-status"] == EXIT_PEER_GONE
        assert failed.value.desc == "output fd 'dst' was closed by its reader"

        give(session, "src", os.open(tmp_path / "in", os.O_RDONLY))
        give(session, "dst", sink())
        done = session.wait_job(session.start_job("encode", input="src", output="dst"))
        assert done["bytes-in"] == len(small_stream)


def test_job_and_fd_limits(tmp_path: Path) -> None:
    writers = []
    with serving(tmp_path / "s.sock", max_jobs=2, max_fds=4) as service:
        with service.connect() as session:
            for n in range(3):
                r, w = os.pipe()
                give(session, f"in{n}", r)
                writers.append(w)
            give(session, "out0", sink())
            with pytest.raises(ServiceError, match="holds 4 fds, the most it may"):
                give(session, "more", sink())
            first = session.start_job("encode", input="in0", output="out0")
            give(session, "out1", sink())
            give(session, "out2", sink())
            session.start_job("encode", input="in1", output="out1")
            with pytest.raises(ServiceError, match="runs 2 jobs, the most it may"):
                session.start_job("encode", input="in2", output="out2")
            session.cancel_job(first)
            with pytest.raises(JobError):
                session.wait_job(first)
            session.start_job("encode", input="in2", output="out2")
            assert len(session.query_jobs()) == 2
        service.wait_idle()
        assert all([reader_gone(w) for w in writers])


def test_capabilities_and_commands(service: Harness) -> None:
    with service.connect() as session:
        assert session.execute("qmp_capabilities") == {}  # accepted, never required
        assert session.execute("qmp_capabilities", enable=[]) == {}
        assert [c["name"] for c in session.execute("query-commands")] == list(COMMANDS)


# -- the client ----------------------------------------------------------------------------------


def test_client_timeouts_bound_replies_not_jobs() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(encode_message(greeting()))
        session = Client(ours)
        assert session.timeout == service_client.REPLY_TIMEOUT
        assert session.wait_timeout is None  # a job may take hours


def test_a_late_reply_is_dropped_not_taken_for_the_next_ones() -> None:
    """Replies are matched by id: one that comes after its command timed out is nobody's."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(encode_message(greeting()))
        session = Client(ours, timeout=TIMEOUT)
        with pytest.raises(TimeoutError):
            session.execute("query-fds", timeout=0.01)  # nothing answers it in time
        late = error_reply(1, "the reply to command 1")
        theirs.sendall(encode_message(late) + encode_message(reply(2, [])))
        assert session.execute("query-jobs") == []
        with pytest.raises(TimeoutError):
            session.execute("query-fds", timeout=0.01)
        ended = event(JOB_CANCELLED, {"id": "job-1"})
        theirs.sendall(encode_message(reply(3, [])) + encode_message(ended))
        assert session.wait_event(lambda e: True, timeout=TIMEOUT) == ended
        received = theirs.makefile("rb")
        sent = [json.loads(received.readline()) for _ in range(3)]
        assert [(m["execute"], m["id"]) for m in sent] == [
            ("query-fds", 1),
            ("query-jobs", 2),
            ("query-fds", 3),
        ]


# -- the socket ----------------------------------------------------------------------------------


def test_socket_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        sock, _ = bind_private(tmp_path / "a.sock", 0o600)
    finally:
        os.umask(old)
    with sock:
        assert stat.S_IMODE(os.stat(tmp_path / "a.sock").st_mode) == 0o600
        with pytest.raises(MigpipeError, match="another service is listening"):
            bind_private(tmp_path / "a.sock", 0o600)
    # the socket's listener is gone: a stale socket is replaced
    sock, _ = bind_private(tmp_path / "a.sock", 0o600)
    sock.close()
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(MigpipeError, match="exists and is not a socket"):
        bind_private(tmp_path / "file", 0o600)
    assert (tmp_path / "file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sock", "file"]  # no leftovers


def as_uid(uid: int, work: Callable[[], bytes]) -> bytes:
    """What `work` returns when a forked child runs it as `uid` (no exec: socket calls and
    the like, then _exit)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            _write_all(w, work())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    out = read_all(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return out


def _connect_as(uid: int, path: Path, times: int = 1) -> list[dict]:
    """The first line the service sends each of `times` clients running as `uid`, in turn."""

    def connect() -> bytes:
        lines = b""
        for _ in range(times):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(str(path))
                lines += sock.makefile("rb").readline()
        return lines

    return [strict_json(line) for line in as_uid(uid, connect).splitlines()]


@contextlib.contextmanager
def shared_socket() -> Iterator[Path]:
    """A socket path that other uids can reach (to be refused by SO_PEERCRED, or served)."""
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        yield Path(directory) / "migpipe.sock"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other uids needs root")


@needs_root
def test_peers_are_checked_with_so_peercred() -> None:
    with shared_socket() as path:
        with serving(path, allow_uids=[DAEMON]) as service:
            assert stat.S_IMODE(path.stat().st_mode) == 0o666  # SO_PEERCRED is the gate
            refused = _connect_as(NOBODY, path)
            assert refused == [
                {
                    "error": {
                        "class": GENERIC_ERROR,
                        "desc": f"uid {NOBODY} may not use this migpipe service",
                    }
                }
            ]
            assert "migpipe" in _connect_as(DAEMON, path)[0]
            assert f"refused a connection from uid {NOBODY}" in service.log[0]
        with serving(path) as service:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600


@needs_root
def test_refused_connections_are_logged_at_a_bounded_rate() -> None:
    """Anyone may connect to a shared socket: a burst of refusals is REFUSALS_LOGGED lines,
    then one that counts the rest when the interval ends (the test ends it: no clock runs)."""
    with (
        shared_socket() as path,
        serving(path, allow_uids=[DAEMON], refusal_interval=3600) as service,
    ):
        refused = _connect_as(NOBODY, path, REFUSALS_LOGGED + 25)
        assert len(refused) == REFUSALS_LOGGED + 25 and all("error" in line for line in refused)
        assert len(service.log) == REFUSALS_LOGGED
        assert all(
            line.startswith(f"refused a connection from uid {NOBODY} (pid ") for line in service.log
        )
        service.on_loop(service.service.refusals.tick)
        assert service.log[-1] == "refused 25 more connections in 3600 s (not logged one by one)"
        service.on_loop(service.service.refusals.tick)  # nothing held back: nothing to say
        assert len(service.log) == REFUSALS_LOGGED + 1
        _connect_as(NOBODY, path)  # a new interval: logged again
        assert len(service.log) == REFUSALS_LOGGED + 2
        assert service.log[-1].startswith(f"refused a connection from uid {NOBODY}")


@needs_root
def test_one_uid_gets_a_share_of_the_jobs_and_connections() -> None:
    """A shared service (--allow-uid) gives each uid half its jobs and half its connections
    by default: one uid that takes all it may still leaves room for the others."""
    writers = []
    with (
        shared_socket() as path,
        serving(path, allow_uids=[DAEMON], max_jobs=4, max_connections=4) as service,
    ):
        with service.connect() as first, service.connect() as second:
            share = r"uid 0 has 2 connections, the most one uid may \(migpipe serve --max-conn"
            with pytest.raises(ServiceError, match=share):
                service.connect()
            for n, session in enumerate([first, second, first]):
                r, w = os.pipe()
                writers.append(w)
                give(session, f"in{n}", r)
                give(session, f"out{n}", sink())
            first.start_job("encode", input="in0", output="out0")
            second.start_job("encode", input="in1", output="out1")  # another connection's
            share = r"uid 0 runs 2 jobs, the most one uid may \(migpipe serve --max-jobs-per-uid\)"
            with pytest.raises(ServiceError, match=share):
                first.start_job("encode", input="in2", output="out2")

            def start_a_job() -> bytes:
                r, w = os.pipe()
                with service_client.connect(str(path), TIMEOUT) as session:
                    give(session, "in", r)
                    give(session, "out", w)
                    return session.start_job("encode", input="in", output="out").encode()

            assert as_uid(DAEMON, start_a_job) == b"job-3"
        service.wait_idle()
        assert all([reader_gone(w) for w in writers])


def test_per_uid_limits_can_be_set(tmp_path: Path) -> None:
    uid, writers = os.geteuid(), []
    with (
        serving(tmp_path / "s.sock", max_jobs_per_uid=1, max_connections_per_uid=1) as service,
    ):
        with service.connect() as session:
            with pytest.raises(ServiceError, match=f"uid {uid} has 1 connections, the most one"):
                service.connect()
            for n in range(2):
                r, w = os.pipe()
                writers.append(w)
                give(session, f"in{n}", r)
                give(session, f"out{n}", sink())
            first = session.start_job("encode", input="in0", output="out0")
            with pytest.raises(ServiceError, match=f"uid {uid} runs 1 jobs, the most one uid"):
                session.start_job("encode", input="in1", output="out1")
            session.cancel_job(first)
            with pytest.raises(JobError):
                session.wait_job(first)
            session.start_job("encode", input="in1", output="out1")
        service.wait_idle()
        assert all([reader_gone(w) for w in writers])
    with pytest.raises(MigpipeError, match="--max-jobs-per-uid must be at least 1, not 0"):
        Service(max_jobs_per_uid=0)


@needs_root
def test_the_client_passes_fds_only_to_a_service_run_by_whom_it_expects() -> None:
    """Whoever listens on the path gets the fds the client passes, keys too: by default it
    must be root or the client's own uid, else expected_uid."""
    ready_r, ready_w = os.pipe()
    with shared_socket() as path, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))

        def greet_twice() -> bytes:  # as NOBODY: SO_PEERCRED names who called listen()
            listener.settimeout(TIMEOUT)  # a failed test leaves no child waiting for ever
            listener.listen(2)
            os.write(ready_w, b"!")
            for _ in range(2):
                peer, _ = listener.accept()
                peer.settimeout(TIMEOUT)
                # the first client may hang up before its greeting is sent, or read
                with peer, contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    peer.sendall(encode_message(greeting()))
                    while peer.recv(1 << 10):  # until the client hangs up
                        pass
            return b"done"

        with ThreadPoolExecutor(1) as pool:
            served = pool.submit(as_uid, NOBODY, greet_twice)
            assert os.read(ready_r, 1) == b"!"
            with pytest.raises(
                PermissionError,
                match=f"{path} is served by uid {NOBODY}, not "
                f"by uid {os.geteuid()} or root: not passing it fds",
            ):
                service_client.connect(str(path), TIMEOUT)
            with service_client.connect(str(path), TIMEOUT, expected_uid=NOBODY) as session:
                assert session.greeting == greeting()["migpipe"]
            assert served.result(TIMEOUT) == b"done"
    os.close(ready_r)
    os.close(ready_w)


def test_migpipe_serve(tmp_path: Path, small_stream: bytes) -> None:
    path = tmp_path / "migpipe.sock"
    server = subprocess.Popen(
        [*MIGPIPE, "serve", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline() == f"migpipe serve: listening on {path}\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        before = len(os.listdir(f"/proc/{server.pid}/fd"))
        (tmp_path / "in").write_bytes(small_stream)
        with service_client.connect(str(path), TIMEOUT, TIMEOUT) as session:
            src = os.open(tmp_path / "in", os.O_RDONLY)
            r, w = os.pipe()
            session.add_fd("src", src)
            session.add_fd("dst", w)
            os.close(src)
            os.close(w)
            job = session.start_job("encode", input="src", output="dst", filters=["lz4"])
            wire = read_all(r)
            assert session.wait_job(job)["bytes-out"] == len(wire)
            assert len(os.listdir(f"/proc/{server.pid}/fd")) == before + 1  # our connection
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=TIMEOUT)
    assert server.returncode == 0, err
    assert err == ""
    assert not path.exists()
