"""Files migpipe writes or reads on a user's behalf: what another local user could do to them.

extract writes a guest's memory (M5), generate --from reads files a manifest names (L7), key
files are secrets (L5), tls-init writes private keys (L6): none of them may be read by others,
followed through a symlink someone planted, or taken from a directory someone else can write.
Tests run as root, so "another user" is a chown to OTHER, and modes are checked by the code,
not by EACCES (which root never gets).
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest
from support import PAGE, migpipe
from test_stream_parser import ram_stream

from migpipe import keys
from migpipe.errors import MigpipeError
from migpipe.io import files
from migpipe.stream.parser import parse_bytes
from migpipe.stream.records import MemSize, NormalPage, RamBlock, Record
from migpipe.stream.writer import write_records
from migpipe.tools.extracted import extract, image_file_name, rebuild

OTHER = 1234  # a uid that is neither root nor us


def one_line(result: subprocess.CompletedProcess) -> str:
    """The error a refused command printed: exactly one line, no traceback."""
    message = result.stderr.decode()
    assert message.count("\n") == 1 and "Traceback" not in message, message
    return message


def blocks_records(sizes: dict[str, int], pages: list[NormalPage]) -> list[Record]:
    """A stream's records: RAM blocks named as given, holding `pages`."""
    records = ram_stream(pages)
    blocks = tuple(RamBlock(name, size) for name, size in sizes.items())
    records[3] = MemSize(sum(sizes.values()), blocks)
    return records


def blocks_stream(sizes: dict[str, int], pages: list[NormalPage]) -> bytes:
    return write_records(blocks_records(sizes, pages))


@pytest.fixture
def extracted(tmp_path: Path) -> Path:
    data = blocks_stream({"pc.ram": 4 * PAGE}, [NormalPage("pc.ram", PAGE, b"\xaa" * PAGE, True)])
    directory = tmp_path / "x"
    extract(parse_bytes(data), directory)
    return directory


# -- extract (M5) -------------------------------------------------------------------------------


def test_extract_is_private_whatever_the_umask(tmp_path: Path) -> None:
    data = blocks_stream({"pc.ram": 4 * PAGE}, [])
    source = tmp_path / "s"
    source.write_bytes(data)
    old = os.umask(0o022)
    try:
        result = migpipe("extract", str(source), str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == dict.fromkeys(["pc.ram.img", "device-state.bin", "manifest.json"], 0o600)


@pytest.mark.parametrize(
    ("prepare", "why"),
    [
        (lambda d: (d / "pc.ram.img").symlink_to(d.parent / "victim"), "it is not empty"),
        (lambda d: os.chown(d, OTHER, -1), f"it is owned by uid {OTHER}"),
        (lambda d: d.chmod(0o770), "its group or others can write it (mode 0770)"),
    ],
    ids=["planted-symlink", "foreign-owner", "group-writable"],
)
def test_extract_refuses_a_directory_others_have_touched(tmp_path: Path, prepare, why) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    directory = tmp_path / "out"
    directory.mkdir(mode=0o700)
    prepare(directory)
    data = blocks_stream({"pc.ram": 2 * PAGE}, [NormalPage("pc.ram", 0, b"\xaa" * PAGE, True)])
    result = migpipe("extract", "-", str(directory), stdin=data)
    assert result.returncode == 1
    assert f"refusing directory {directory}: {why}" in one_line(result)
    assert victim.read_bytes() == b"precious"
    assert not (directory / "manifest.json").exists()


def test_a_name_planted_while_extracting_is_never_followed(tmp_path: Path) -> None:
    """Even in a directory of ours, a name that appears is refused (O_EXCL|O_NOFOLLOW)."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "pc.ram.img").symlink_to(victim)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(MigpipeError, match=r"cannot create .*pc\.ram\.img: File exists"):
            files.create_private(fd, "pc.ram.img", tmp_path, os.O_RDWR)
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "names",
    [("a/b", "a__b"), ("/x", "x"), ("a%2Fb", "a/b"), ("a\0b", "a b")],
    ids=["slash-underscores", "leading-slash", "escape-itself", "nul"],
)
def test_block_names_never_share_a_file(tmp_path: Path, names: tuple[str, str]) -> None:
    """Two blocks, a page in each: both survive extract and a rebuild, byte for byte (a shared
    file used to truncate the first block's map: SIGBUS; a NUL was a ValueError). Records, not
    bytes: the parser now refuses a NUL itself; extract must not depend on it."""
    first, second = names
    pages = [
        NormalPage(first, 2 * PAGE, b"\x11" * PAGE, True),
        NormalPage(second, 0, b"\x22" * PAGE, True),
    ]
    extract(blocks_records({first: 4 * PAGE, second: PAGE}, pages), tmp_path / "a")
    one, two = (tmp_path / "a" / image_file_name(name) for name in names)
    assert one != two and "/" not in one.name + two.name
    assert one.read_bytes() == bytes(2 * PAGE) + b"\x11" * PAGE + bytes(PAGE)
    assert two.read_bytes() == b"\x22" * PAGE
    extract(rebuild(tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "b" / one.name).read_bytes() == one.read_bytes()
    assert (tmp_path / "b" / two.name).read_bytes() == two.read_bytes()


def test_extract_on_a_full_disk_is_an_error_not_sigbus(tmp_path: Path) -> None:
    from test_direct import private_mount

    data = blocks_stream(
        {"pc.ram": 512 * PAGE}, [NormalPage("pc.ram", 500 * PAGE, b"\x33" * PAGE, True)]
    )
    with private_mount(tmp_path, "tmpfs", "size=1m") as small:
        result = migpipe("extract", "-", str(small / "out"), stdin=data)
        assert result.returncode == 1, result.stderr
        message = one_line(result)
        assert f"cannot write {small / 'out' / 'pc.ram.img'}: No space left on device" in message


# -- generate --from (L7) -----------------------------------------------------------------------


def test_generate_from_reads_the_directory_it_wrote(extracted: Path) -> None:
    result = migpipe("generate", "--from", str(extracted))
    assert result.returncode == 0, result.stderr
    assert b"\xaa" * PAGE in result.stdout


def test_generate_from_never_follows_a_symlink(extracted: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only " * 1638 + b"....")
    (extracted / "pc.ram.img").unlink()
    (extracted / "pc.ram.img").symlink_to(secret)
    result = migpipe("generate", "--from", str(extracted))
    assert result.returncode == 1 and b"root only" not in result.stdout
    assert f"cannot open {extracted / 'pc.ram.img'}: it is a symbolic link" in one_line(result)


def test_generate_from_refuses_files_another_user_owns(extracted: Path) -> None:
    os.chown(extracted / "device-state.bin", OTHER, -1)
    result = migpipe("generate", "--from", str(extracted))
    assert result.returncode == 1
    assert f"refusing {extracted / 'device-state.bin'}: it is owned by uid {OTHER}" in one_line(
        result
    )


def test_generate_from_refuses_a_fifo_without_waiting_on_it(extracted: Path) -> None:
    (extracted / "pc.ram.img").unlink()
    os.mkfifo(extracted / "pc.ram.img")
    result = migpipe("generate", "--from", str(extracted))
    assert result.returncode == 1 and "it is not a regular file" in one_line(result)


@pytest.mark.parametrize(
    ("name", "shown"),
    [("../secret", '"../secret"'), ("/etc/passwd", '"/etc/passwd"'), ("..", '".."'), (7, "7")],
)
def test_generate_from_refuses_names_outside_the_directory(
    extracted: Path, name, shown: str
) -> None:
    import json

    manifest = json.loads((extracted / "manifest.json").read_text())
    manifest["blocks"][0]["file"] = name
    (extracted / "manifest.json").write_text(json.dumps(manifest))
    result = migpipe("generate", "--from", str(extracted))
    assert result.returncode == 1
    assert f"{shown} is not a file name inside {extracted}" in one_line(result)


# -- key files (L5) -----------------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    keys.keygen(directory / "key")
    return directory / "key"


def test_a_key_of_ours_in_a_private_directory_is_read(key: Path) -> None:
    assert keys.parse_key(keys.read_private_file(str(key), "key file"), str(key)).kind == "key"


def test_a_key_another_user_owns_is_refused(key: Path) -> None:
    os.chown(key, OTHER, -1)
    with pytest.raises(MigpipeError, match=f"refusing key file {key}: it is owned by uid {OTHER}"):
        keys.read_private_file(str(key), "key file")
    with open(key, "rb") as f, pytest.raises(MigpipeError, match=f"owned by uid {OTHER}"):
        keys.read_private_fd(f.fileno(), "--key-fd")


def test_a_symlinked_key_is_refused(key: Path) -> None:
    link = key.with_name("link")
    link.symlink_to(key)
    with pytest.raises(MigpipeError, match=f"cannot open key file {link}: it is a symbolic link"):
        keys.read_private_file(str(link), "key file")


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o777, None, "its group or others can write it (mode 0777)"),
        (0o730, None, "its group or others can write it (mode 0730)"),
        (0o1777, OTHER, "its group or others can write it (mode 1777)"),  # sticky, not root's
        (0o700, OTHER, f"it is owned by uid {OTHER}"),
    ],
)
def test_a_key_in_a_directory_others_can_change_is_refused(
    key: Path, mode: int, owner: int | None, why: str
) -> None:
    key.parent.chmod(mode)
    if owner is not None:
        os.chown(key.parent, owner, -1)
    with pytest.raises(MigpipeError, match=rf"refusing key file {key}: directory {key.parent}: "):
        keys.read_private_file(str(key), "key file")
    result = migpipe("encode", "--encrypt", "--key-file", str(key), stdin=b"")
    assert result.returncode == 1 and why in one_line(result)
    with pytest.raises(MigpipeError, match=r"\(mode|owned by"):
        keys.keygen(key.with_name("new"))
    assert not key.with_name("new").exists()


def test_a_key_further_up_a_directory_others_can_write_is_refused(key: Path) -> None:
    key.parent.parent.chmod(0o777)
    with pytest.raises(MigpipeError, match=f"directory {key.parent.parent}: its group or others"):
        keys.read_private_file(str(key), "key file")


def test_a_key_in_roots_sticky_directory_is_read(key: Path) -> None:
    """/tmp's case: others write there, but cannot rename or remove what is ours."""
    key.parent.chmod(0o1777)
    assert keys.read_private_file(str(key), "key file").startswith(b"# migpipe key")


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_a_key_of_one_repeated_byte_is_refused(key: Path, byte: int) -> None:
    key.write_text(keys.format_key(bytes([byte]) * keys.KEY_SIZE))
    result = migpipe("encode", "--encrypt", "--key-file", str(key), stdin=b"")
    assert result.returncode == 1
    assert f"{key} holds no random key (all its bytes are 0x{byte:02x})" in one_line(result)


# -- tls-init (L6) ------------------------------------------------------------------------------


def tls_init(directory: Path, *more: str) -> subprocess.CompletedProcess:
    return migpipe(
        "tls-init",
        str(directory),
        "--ca",
        "CA",
        "--server-name",
        "dst",
        "--client-name",
        "src",
        *more,
    )


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o777, None, "its group or others can write it (mode 0777)"),
        (0o1777, None, "its group or others can write it (mode 1777)"),
        (0o700, OTHER, f"it is owned by uid {OTHER}"),
    ],
)
def test_tls_init_refuses_a_directory_others_can_change(
    tmp_path: Path, mode: int, owner: int | None, why: str
) -> None:
    directory = tmp_path / "creds"
    directory.mkdir()
    directory.chmod(mode)
    if owner is not None:
        os.chown(directory, owner, -1)
    result = tls_init(directory)
    assert result.returncode == 1
    assert f"refusing directory {directory}: {why}" in one_line(result)
    assert list(directory.iterdir()) == []


def test_tls_init_writes_through_the_descriptor_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temporary name swapped for a symlink after mkstemp never receives a key."""
    from migpipe.io import tlsinit

    bait = tmp_path / "bait"
    bait.write_bytes(b"")
    real_mkstemp = files.tempfile.mkstemp

    def swapped(*args, **kwargs) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        os.unlink(name)
        os.symlink(bait, name)  # what a writer of the directory could do
        return fd, name

    monkeypatch.setattr(files.tempfile, "mkstemp", swapped)
    tlsinit.write_file(tmp_path / "ca-key.pem", b"-----BEGIN PRIVATE KEY-----", 0o600, force=False)
    assert bait.read_bytes() == b""


def test_tls_init_puts_the_ca_key_where_asked(tmp_path: Path) -> None:
    result = tls_init(tmp_path / "creds", "--ca-dir", str(tmp_path / "ca"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca-cert.pem", "ca-key.pem"]
    assert "ca-key.pem" not in [p.name for p in (tmp_path / "creds").iterdir()]
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "ca" / "ca-cert.pem").read_bytes() == (
        tmp_path / "creds" / "ca-cert.pem"
    ).read_bytes()
