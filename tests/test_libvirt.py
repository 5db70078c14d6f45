"""migpipe against real libvirts: Debian 12's 9.0 driving QEMU 7.2, and the 11.3 setup.sh
unpacks from bookworm-backports driving QEMU 10.0. Images `virsh save` wrote (each format the
version has, sparse with parallel channels on 11.3) restore through `migpipe restore` into a
fresh QEMU with the memory the guest had; images `migpipe save --libvirt-xml` wrote restore
with `virsh restore`; an interrupted migpipe image is refused by both.

libvirt runs embedded in virsh (`qemu:///embed?root=DIR`): no daemon, nothing outside DIR. Each
driver load probes QEMU's capabilities, which takes seconds and may happen on every load (on the
machine this was written on, libvirt found its cached probe stale each time: "host cpuid
changed"), so the tests share one long-lived virsh shell per save format (the format is
qemu.conf's, read once when the driver loads), and a version's shells probe at the same time.

The unpacked 11.3 runs as installed but for two environment variables: LD_LIBRARY_PATH for its
libvirt.so, LIBVIRT_DRIVER_DIR for its QEMU driver module. libvirt_iohelper, which it finds by a
compiled-in path, is Debian 9.0's: the same `PATH FD` contract, started with an environment
of libvirt's own (no LD_LIBRARY_PATH), so it runs against the system's 9.0 libvirt.so.
Its libvirtd runs unpacked too, but only in a mount namespace of its own: as root it keeps
its state in compiled-in system directories (/etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt; libvirtd.conf moves only its sockets), which Debian's 9.0 shares; the
embedded driver is the same QEMU driver code with all of that under DIR.

The domain is the qemuvm guest on the machine qemuvm's destinations have (pc, 128 MiB, ACPI, no
USB or balloon), so a stream from either side loads into the other; the guest's isa-debugcon is
a socket the test listens on, so "READY" is read as it is written, as in qemuvm.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import oracle
import pytest
import qemuvm
from support import MIGPIPE, PAGE, migpipe

from migpipe.io.channel import NOT_A_STREAM

pytestmark = pytest.mark.qemu


@dataclass(frozen=True)
class LibvirtBuild:
    """One libvirt the tests drive, and the QEMU it drives (as qemuvm.QemuBuild: a version that
    is missing fails its tests with `missing`)."""

    version: str
    virsh: str | None
    missing: str
    qemu: qemuvm.QemuBuild
    #: What its `virsh save` writes here, one driver (one qemu.conf) each: a shell costs
    #: seconds. 9.0 has no zstd (10.4), and no sparse (11.2), which 11.3 writes by
    #: `--image-format` in its raw shell. 9.0's other programs are 11.3's too.
    formats: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"libvirt{self.version}"

    def command(self) -> list[str]:
        if self.virsh is None:
            pytest.fail(self.missing)
        return [self.virsh]


def unpacked_libvirt(
    version: str, qemu: qemuvm.QemuBuild, formats: tuple[str, ...]
) -> LibvirtBuild:
    """The libvirt that setup.sh unpacked into .libvirt/VERSION: its virsh, run with its own
    libvirt.so and QEMU driver module (the system's are Debian's 9.0)."""
    usr = qemuvm.REPO / ".libvirt" / version / "usr"
    lib = usr / "lib" / "x86_64-linux-gnu"
    virsh = usr / "bin" / "virsh"
    return LibvirtBuild(
        version=version,
        virsh=str(virsh) if os.access(virsh, os.X_OK) else None,
        missing=f"libvirt {version} is not unpacked in {usr.parent}: run ./setup.sh",
        qemu=qemu,
        formats=formats,
        env=(
            ("LD_LIBRARY_PATH", str(lib)),
            ("LIBVIRT_DRIVER_DIR", str(lib / "libvirt" / "connection-driver")),
        ),
    )


LIBVIRT_9_0 = LibvirtBuild(
    "9.0",
    shutil.which("virsh"),
    "virsh is not installed: run ./setup.sh as root (apt-get install libvirt-clients "
    "libvirt-daemon libvirt-daemon-driver-qemu)",
    qemuvm.QEMU_7_2,
    ("raw", "gzip"),
)
LIBVIRT_11_3 = unpacked_libvirt(
    "11.3", qemuvm.QEMU_10_0, ("raw", "gzip", "bzip2", "xz", "lzop", "zstd")
)
LIBVIRTS = (LIBVIRT_9_0, LIBVIRT_11_3)
COMMAND_TIMEOUT = 120.0  # a failsafe: `virsh save` of this guest takes 1.5 s raw, 4 s gzip
DIRTY = qemuvm.GUEST_APPEND["dirty"]  # the guest of the captured stream virsh restores
#: The guest virsh saves: it is paused first anyway, so it need not keep dirtying memory (and a
#: core) while it waits; 16 MiB of qemuvm's mix keeps xz and bzip2 to seconds.
SAVED_PAGES = 4096
SAVED = f"mode=idle pages={SAVED_PAGES}"
MARK = "<< end >>"  # what `echo "<<" end ">>"` prints; the command line itself does not hold it
#: QEMU's module directory, the same path in Debian's 7.2 and in bookworm-backports' 10.0.
SYSTEM_QEMU_MODULES = Path("/usr/lib/x86_64-linux-gnu/qemu")

#: virsh's parent: it adopts what virsh daemonizes (its QEMUs) and reaps them as they exit,
#: then exits as virsh did. libvirt waits for a QEMU it killed (`save`, `destroy`) to be gone,
#: and an orphan's zombie is gone once init reaps it, which some machines' init does only
#: every second or so (1.4 s on the one this was written on): seconds on every save.
REAPER = (
    sys.executable,
    "-c",
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER\n"
    "child = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)\n"
    "while (died := os.wait())[0] != child:\n"
    "    pass\n"
    "sys.exit(os.waitstatus_to_exitcode(died[1]))\n",
)

QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
save_image_format = "{image_format}"
"""


def emulator(build: qemuvm.QemuBuild, directory: Path) -> str:
    """The `<emulator>` that runs `build` for libvirt, which passes QEMU no options or
    environment of ours: for an unpacked build, a script that adds them.

    Its QEMU would also load the installed 7.2's modules wherever its own directory lacks one
    (it searches QEMU_MODULE_DIR, then the path compiled in, which is 7.2's), and abort on the
    first ("Only modules from the same build"): libvirt's capability probe lists every device
    type, which loads every module. The script hides 7.2's directory from it, in a mount
    namespace of its own (unshare, as root).
    """
    if not build.args and not build.env:
        return build.command()[0]
    hide = ""
    if SYSTEM_QEMU_MODULES.is_dir():
        empty = directory / "no-modules"
        empty.mkdir()
        hide = f"mount --bind {empty} {SYSTEM_QEMU_MODULES} && "
    script = directory / f"qemu-{build.version}"
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in build.env)
    command = shlex.join(build.command())
    inner = f'{hide}exec {command} "$@"'  # sh -c's $0 is "qemu", then libvirt's arguments
    script.write_text(
        f"#!/bin/sh\n{exports}exec unshare --mount --propagation private "
        f'sh -c {shlex.quote(inner)} qemu "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


class VirshError(AssertionError):
    """A virsh command failed; the message has virsh's own error lines."""


class Virsh:
    """A `virsh` shell of `build` on an embedded QEMU driver rooted in `root`; its domains run
    `emulator`.

    Commands go to its stdin, each followed by an `echo` of MARK; its output is read up to the
    mark (virsh runs commands in order), so a command's result is known without polling.
    Its stderr goes to ROOT/virsh.log: an "error:" line there after a command is its failure.
    stdbuf: virsh's stdout is a pipe, which it would otherwise flush only once it has read the
    next line of input.
    """

    def __init__(self, build: LibvirtBuild, root: Path, image_format: str, emulator: str) -> None:
        self.build, self.root, self.emulator = build, root, emulator
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "qemu.conf").write_text(QEMU_CONF.format(image_format=image_format))
        self.log = root / "virsh.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *REAPER,
                    *("stdbuf", "-oL", *build.command()),
                    *("-q", "-c", f"qemu:///embed?root={root}"),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, **dict(build.env)},
            )
        self._pending = b""
        self._log_seen = 0

    def send(self, command: str) -> None:
        """Start `command` (shells work in parallel); `result` waits for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f'{command}\necho "<<" end ">>"\n'.encode())
        self.proc.stdin.flush()

    def result(self, command: str) -> tuple[str, str]:
        """The output of the oldest command sent, and its error lines joined (or "")."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + COMMAND_TIMEOUT
        mark = MARK.encode()
        while mark not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise VirshError(
                    f"virsh {command}: no answer in {COMMAND_TIMEOUT:.0f} s:\n{self._new_log()}"
                )
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise VirshError(f"virsh exited during {command!r}:\n{self._new_log()}")
            self._pending += chunk
        out, self._pending = self._pending.split(mark, 1)
        lines = out.decode(errors="replace").splitlines()
        output = "\n".join(line for line in lines if line and not line.startswith("virsh # "))
        log = self._new_log().splitlines()
        return output, " / ".join(line for line in log if line.startswith("error:"))

    def run(self, command: str) -> str:
        """Run one command; its output lines (prompts left out). VirshError if it failed."""
        self.send(command)
        output, errors = self.result(command)
        if errors:
            raise VirshError(f"virsh {command}: {errors}")
        return output

    def errors(self, command: str) -> str:
        """Run a command that must fail; its error lines."""
        self.send(command)
        _, errors = self.result(command)
        if not errors:
            raise VirshError(f"virsh {command}: succeeded, but it must fail")
        return errors

    def state(self, domain: str) -> str:
        return self.run(f"domstate {domain}").strip()

    def monitor(self, domain: str, command: str, **arguments: object) -> dict:
        """A QMP command through libvirt's own monitor connection (a `custom-monitor` taint)."""
        message = json.dumps({"execute": command, "arguments": arguments})
        return json.loads(self.run(f"qemu-monitor-command {domain} {shlex.quote(message)}"))

    def destroy(self, domain: str) -> None:
        """Kill `domain`'s QEMU if it still runs (it outlives an embedded driver)."""
        if domain in self.run("list --name").split():
            self.run(f"destroy {domain}")

    def close(self) -> None:
        """Destroy what is still running, then quit."""
        with contextlib.suppress(VirshError, OSError):
            for domain in self.run("list --name").split():
                self.destroy(domain)
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _new_log(self) -> str:
        data = self.log.read_bytes()
        new, self._log_seen = data[self._log_seen :], len(data)
        return new.decode(errors="replace")


@pytest.fixture(scope="module")
def shells(qemu_binary: str) -> Iterator[Callable[[LibvirtBuild, str], Virsh]]:
    """build, save format -> its virsh shell. A build's shells start on first use, all loading
    their drivers and probing QEMU at once.

    Their roots are short directories in /tmp: libvirt puts UNIX sockets (108 bytes at most)
    a few levels under them."""
    base = Path(tempfile.mkdtemp(prefix="lv", dir="/tmp"))
    started: dict[LibvirtBuild, dict[str, Virsh]] = {}

    def shell(build: LibvirtBuild, image_format: str) -> Virsh:
        if build not in started:
            started[build] = start_shells(build, base / build.version)
        return started[build][image_format]

    try:
        yield shell
    finally:
        for shells in started.values():
            for virsh in shells.values():
                virsh.close()
        shutil.rmtree(base, ignore_errors=True)


def start_shells(build: LibvirtBuild, directory: Path) -> dict[str, Virsh]:
    """One shell of `build` per save format it writes, each rooted in `directory`/FORMAT, its
    driver loaded and QEMU probed."""
    directory.mkdir()
    qemu = emulator(build.qemu, directory)
    probe = f"domcapabilities --virttype qemu --emulatorbin {qemu} --machine pc"
    shells = {fmt: Virsh(build, directory / fmt, fmt, qemu) for fmt in build.formats}
    for virsh in shells.values():
        virsh.send(probe)
    for virsh in shells.values():
        _, errors = virsh.result(probe)
        assert not errors, f"{build} cannot run QEMU (./setup.sh as root sets it up): {errors}"
    return shells


def domain_xml(
    name: str,
    guest_elf: Path,
    cmdline: str,
    qemu: str,
    console: Path | None = None,
    args: Sequence[str] = (),
) -> str:
    """The test guest (its command line `cmdline`, as qemuvm.GUEST_APPEND's) as a libvirt
    domain whose QEMU (`qemu`, an <emulator>) matches qemuvm's (`-machine pc`, 128 MiB; libvirt
    adds -no-acpi unless told otherwise). `console`: a socket for its isa-debugcon; `args`:
    more QEMU arguments."""
    if console is not None:
        args = [
            *args,
            "-chardev",
            f"socket,id=dbg,path={console}",
            "-device",
            "isa-debugcon,chardev=dbg,iobase=0xe9",
        ]
    extra = ""
    if args:
        extra = "<qemu:commandline>{}</qemu:commandline>".format(
            "".join(f"<qemu:arg value={quoteattr(arg)}/>" for arg in args)
        )
    return f"""\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{qemuvm.RAM_SIZE >> 20}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest_elf}</kernel>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>{qemu}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='none'/>
  {extra}
</domain>
"""


@contextlib.contextmanager
def running_domain(
    virsh: Virsh, name: str, guest_elf: Path, cmdline: str, args: Sequence[str] = ()
) -> Iterator[None]:
    """A transient domain whose guest (`cmdline`) has filled its memory (it printed READY);
    destroyed at the end if it still runs. `args`: more QEMU arguments."""
    console = virsh.root / f"{name}.con"
    xml = virsh.root / f"{name}.xml"
    xml.write_text(domain_xml(name, guest_elf, cmdline, virsh.emulator, console, args))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(console))
        listener.listen(1)
        listener.settimeout(COMMAND_TIMEOUT)
        try:
            virsh.run(f"create {xml}")
            connection, _ = listener.accept()  # QEMU connected while it started
            with connection:
                output = b""
                while qemuvm.READY not in output:
                    chunk = connection.recv(4096)
                    assert chunk, f"{name}: the console closed before READY: {output!r}"
                    output += chunk
                yield
        finally:
            virsh.destroy(name)
            console.unlink()  # the name is free for the domain's next run


def image_body(image: Path, image_format: str) -> bytes:
    """The QEMU stream in a libvirt image, read without migpipe: the body starts after the
    92-byte header and its data_len (a native-order word at offset 20) of XML and padding, and
    goes through `PROG -dc` as libvirt's restore sends it."""
    data = image.read_bytes()
    body = data[92 + int.from_bytes(data[20:24], sys.byteorder) :]
    if image_format == "raw":
        return body
    return subprocess.run([image_format, "-dc"], input=body, capture_output=True, check=True).stdout


def memory_of(virsh: Virsh, name: str) -> bytes:
    """The guest RAM qemuvm compares (from 1 MiB), read by QEMU through libvirt's monitor."""
    dump = virsh.root / f"{name}.mem"
    virsh.monitor(
        name, "pmemsave", val=qemuvm.IMAGE_START, size=qemuvm.IMAGE_SIZE, filename=str(dump)
    )
    memory = dump.read_bytes()
    dump.unlink()
    return memory


def dirtied_pages(memory: bytes) -> int:
    """The pages of `memory` that are not all zero: what the guest wrote before the save."""
    return sum(1 for at in range(0, len(memory), PAGE) if memory[at : at + PAGE].count(0) != PAGE)


#: (build, what `virsh save` writes): each build's qemu.conf formats, and 11.3's sparse.
VIRSH_SAVES = [
    *(pytest.param(build, fmt, id=f"{build}-{fmt}") for build in LIBVIRTS for fmt in build.formats),
    pytest.param(LIBVIRT_11_3, "sparse", id="libvirt11.3-sparse"),
]
#: How `virsh save` is asked for a format its qemu.conf does not name: sparse is QEMU's
#: mapped-ram file, written by QEMU's multifd channels in parallel (libvirt 11.2+), here
#: around the page cache too (QEMU's direct-io: the pages through an O_DIRECT descriptor).
SAVE_OPTIONS = {"sparse": " --image-format sparse --parallel-channels 2 --bypass-cache"}
#: And how it reads one back: QEMU loads the pages of a mapped-ram file on 2 threads too.
RESTORE_OPTIONS = {"sparse": " --parallel-channels 2"}


@pytest.mark.parametrize(("libvirt", "image_format"), VIRSH_SAVES)
def test_virsh_save_restores_through_migpipe(
    shells: Callable[[LibvirtBuild, str], Virsh],
    guest_elf: Path,
    tmp_path: Path,
    libvirt: LibvirtBuild,
    image_format: str,
) -> None:
    virsh = shells(libvirt, image_format if image_format in libvirt.formats else "raw")
    name = f"save-{image_format}"
    image = tmp_path / "vm.img"
    options = SAVE_OPTIONS.get(image_format, "")
    with running_domain(virsh, name, guest_elf, SAVED):
        virsh.run(f"suspend {name}")
        saved = memory_of(virsh, name)  # what the image must hold: the guest stays paused
        virsh.run(f"save {name} {image} --running{options}")  # --running: run once restored
    assert name not in virsh.run("list --all --name").split()  # saved: the guest is gone
    assert dirtied_pages(saved) > SAVED_PAGES // 2  # 3 in 4 are not zero: saved after READY

    inspected = migpipe("inspect", "--json", str(image))
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["error"] is None  # the whole stream, to its EOF item
    assert f"<name>{name}</name>" in report["file"]["xml"]
    assert report["file"]["libvirt_format"] == image_format
    assert report["file"]["was_running"] is True
    assert report["machine"] == libvirt.qemu.machine

    restored = migpipe("restore", str(image))
    assert restored.returncode == 0, restored.stderr
    if image_format == "sparse":  # each page in its place: the present ones are those dirtied
        present = sum(block["present"] for block in report["file"]["mapped_ram"])
        assert present >= dirtied_pages(saved)
    else:
        assert restored.stdout == image_body(image, image_format)  # the stream, byte for byte
    # around the page cache, as `virsh restore --bypass-cache` reads (sparse: by offset)
    uri = f"exec:{shlex.join([*MIGPIPE, 'restore', str(image), '--direct'])}"
    with qemuvm.destination_vm(tmp_path, uri, qemu=libvirt.qemu) as dest:
        qemuvm.wait_incoming(dest)
        memory = dest.pmemsave(tmp_path / "dest.mem")
    assert oracle.first_difference(memory, saved) is None


#: (build, what `migpipe save --libvirt-xml` writes for its `virsh restore`): a body as is,
#: compressed in-process, by the lzop program, and placed as QEMU's mapped-ram file. bzip2
#: and xz are standard containers as gzip and zstd are, decoded in tests/test_libvirtimage.py
#: by the programs libvirt runs (and seconds each here: libvirt decompresses in one thread).
VIRSH_RESTORES = [
    pytest.param(build, fmt, id=f"{build}-{fmt}")
    for build, formats in (
        (LIBVIRT_9_0, ("gzip",)),
        (LIBVIRT_11_3, ("raw", "lzop", "zstd", "sparse")),
    )
    for fmt in formats
]


@pytest.mark.parametrize(("libvirt", "image_format"), VIRSH_RESTORES)
def test_migpipe_image_restores_with_virsh(
    shells: Callable[[LibvirtBuild, str], Virsh],
    capture_kinds: Callable[[qemuvm.QemuBuild], dict[str, qemuvm.Capture]],
    guest_elf: Path,
    tmp_path: Path,
    libvirt: LibvirtBuild,
    image_format: str,
) -> None:
    virsh, name = shells(libvirt, "raw"), f"restored-{image_format}"
    capture = capture_kinds(libvirt.qemu)["dirty"]
    replay = oracle.replay(capture.path)
    assert replay.pages_resent > 0  # a live stream: pages sent in several passes
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml(name, guest_elf, DIRTY, virsh.emulator))
    image = tmp_path / "vm.img"
    with open(capture.path, "rb") as stream:
        saved = migpipe(
            "save",
            str(image),
            "--libvirt-xml",
            str(xml),
            "--image-format",
            image_format,
            "--paused",
            stdin=stream,
        )
    assert saved.returncode == 0, saved.stderr

    virsh.run(f"restore {image}{RESTORE_OPTIONS.get(image_format, '')}")
    try:
        assert virsh.state(name) == "paused"  # as the image's header asked (--paused)
        assert oracle.first_difference(memory_of(virsh, name), replay.image) is None
        virsh.run(f"resume {name}")
        assert virsh.state(name) == "running"
        status = virsh.monitor(name, "query-status")["return"]
        assert status["status"] == "running"
    finally:
        virsh.destroy(name)


_IN_MODIFY = 0x2
_LIBC = ctypes.CDLL(None, use_errno=True)


def wait_for_bytes(directory: Path, pattern: str, size: int, timeout: float = 60.0) -> Path:
    """Block (on inotify) until a file in `directory` matching `pattern` holds `size` bytes."""
    fd = _LIBC.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        watch = _LIBC.inotify_add_watch(fd, str(directory).encode(), _IN_MODIFY)
        assert watch >= 0, os.strerror(ctypes.get_errno())
        deadline = time.monotonic() + timeout
        while True:  # checked after the watch exists, so no write goes unnoticed
            for path in directory.glob(pattern):
                if path.stat().st_size >= size:
                    return path
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], f"no {pattern} of {size}"
            os.read(fd, 65536)
    finally:
        os.close(fd)


@pytest.mark.parametrize("libvirt", LIBVIRTS, ids=str)
def test_interrupted_migpipe_image_is_refused(
    shells: Callable[[LibvirtBuild, str], Virsh],
    qemu_captures: dict[str, qemuvm.Capture],
    guest_elf: Path,
    tmp_path: Path,
    libvirt: LibvirtBuild,
) -> None:
    virsh, name = shells(libvirt, "raw"), "partial"
    xml = tmp_path / "dom.xml"
    xml.write_text(domain_xml(name, guest_elf, DIRTY, virsh.emulator))
    out = tmp_path / "out"
    out.mkdir()
    image = out / "vm.img"
    stream = qemu_captures["dirty"].path.read_bytes()
    with open(tmp_path / "save.err", "w+b") as err:
        saver = subprocess.Popen(
            [*MIGPIPE, "save", str(image), "--libvirt-xml", str(xml)],
            stdin=subprocess.PIPE,
            stderr=err,
        )
        try:
            assert saver.stdin is not None
            saver.stdin.write(stream[: len(stream) // 2])  # the rest never comes
            saver.stdin.flush()
            partial = wait_for_bytes(out, ".vm.img.*.partial", 2 << 20)  # XML, padding, a body
        except OSError as e:
            err.seek(0)
            raise AssertionError(
                f"migpipe save ended early ({saver.wait()}): {err.read()!r}"
            ) from e
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait()
    assert not image.exists()
    assert partial.read_bytes()[:16] == b"LibvirtQemudPart"

    assert "incomplete" in virsh.errors(f"restore {partial}")
    assert name not in virsh.run("list --all --name").split()
    result = migpipe("restore", str(partial))
    assert result.returncode == 4, result.stderr  # EXIT_TRUNCATED
    assert b"incomplete" in result.stderr and result.stdout == NOT_A_STREAM
