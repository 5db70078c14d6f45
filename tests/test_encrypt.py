"""The encrypt filter: round trips, and every tampering an attacker who can rewrite checksums
could try (frames renumbered and re-checksummed, so only authentication can catch them)."""

import os
import stat
import zlib
from pathlib import Path

import pytest
import trio
from migpipe_filters import encrypt
from support import decode_wire, migpipe, synthetic_stream

from migpipe import wire
from migpipe.chain import parse_chain
from migpipe.errors import EXIT_CORRUPT, EXIT_KEY, MigpipeError
from migpipe.io.channel import NOT_A_STREAM
from migpipe.keys import Secrets, keygen
from migpipe.tunnel.pipeline import encode


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process passphrase tests need not pay scrypt's real cost (the CLI test does)."""
    monkeypatch.setattr(encrypt, "SCRYPT_LOG_N", 10)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    keygen(path)
    return path


def small_stream(seed: int = 1) -> bytes:
    return synthetic_stream(64 << 10, 2, dirty_share=0.5, seed=seed)


def encode_bytes(stream: bytes, chain: str, secrets: Secrets, tmp_path: Path) -> bytes:
    """The real pipeline over real files, in-process (so the frame size can be made small)."""
    source, sink = tmp_path / "in", tmp_path / "wire"
    source.write_bytes(stream)
    with open(source, "rb") as i, open(sink, "wb") as o:
        trio.run(encode, i.fileno(), o.fileno(), parse_chain(chain, secrets))
    return sink.read_bytes()


def decode_bytes(data: bytes, secrets: Secrets) -> tuple[bytes, MigpipeError | None]:
    """What decode would write, and its error."""
    return decode_wire([data], secrets)


def split_wire(data: bytes) -> tuple[bytes, list[tuple[int, bytes]], wire.Trailer]:
    reader = wire.WireReader()
    reader.feed(data)
    reader.close()
    events = reader.next_events()
    frames = [(e.kind, e.payload) for e in events if isinstance(e, wire.Frame)]
    return events[0].encoded, frames, events[-1]


def join_wire(header: bytes, frames: list[tuple[int, bytes]], trailer: wire.Trailer) -> bytes:
    """A wire with every sequence number and checksum made consistent again."""
    out = bytearray(header)
    for sequence, (kind, payload) in enumerate(frames):
        out += wire.encode_frame(kind, sequence, [payload]) + payload
    return bytes(out + wire.encode_trailer(len(frames), trailer))


def with_header_crc(header: bytearray) -> bytes:
    end = len(header) - 4
    header[end:] = zlib.crc32(header[:end]).to_bytes(4, "big")
    return bytes(header)


@pytest.fixture
def small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("migpipe.tunnel.pipeline.FRAME_TARGET", 8 << 10)
    monkeypatch.setattr("migpipe.io.channel.CHUNK", 8 << 10)


@pytest.fixture
def sealed(key: Path, tmp_path: Path, small_frames: None) -> tuple[bytes, bytes, Secrets]:
    stream = small_stream()
    secrets = Secrets(key_file=str(key))
    data = encode_bytes(stream, "zstd:1,encrypt", secrets, tmp_path)
    assert len(split_wire(data)[1]) >= 5
    return stream, data, secrets


def assert_refused(result: tuple[bytes, MigpipeError | None], stream: bytes, words: str) -> None:
    out, error = result
    assert error is not None and words in error.message, error
    assert stream.startswith(out) and len(out) <= stream.rindex(b"\x00\x06\x00\x00")


@pytest.mark.parametrize("chain", ["encrypt", "encrypt:chacha20", "xbzrle,zstd:1,encrypt"])
def test_round_trip(key: Path, tmp_path: Path, chain: str) -> None:
    stream = small_stream()
    secrets = Secrets(key_file=str(key))
    data = encode_bytes(stream, chain, secrets, tmp_path)
    assert zlib.compress(stream)[64:96] not in data and stream[-4096:] not in data
    assert decode_bytes(data, secrets) == (stream, None)


def test_passphrase_round_trip_and_a_wrong_one(tmp_path: Path) -> None:
    stream = small_stream()
    data = encode_bytes(stream, "encrypt", Secrets(passphrase_fd=pipe_of(b"right\n")), tmp_path)
    assert decode_bytes(data, Secrets(passphrase_fd=pipe_of(b"right"))) == (stream, None)
    out, error = decode_bytes(data, Secrets(passphrase_fd=pipe_of(b"wrong\n")))
    assert out == b"" and error.status == EXIT_KEY and "does not open" in error.message


def pipe_of(secret: bytes) -> int:
    read, write = os.pipe()
    os.write(write, secret)
    os.close(write)
    return read


def test_wrong_key_and_wrong_kind_of_secret(sealed, tmp_path: Path) -> None:
    _, data, _ = sealed
    other = tmp_path / "other"
    keygen(other)
    out, error = decode_bytes(data, Secrets(key_file=str(other)))
    assert out == b"" and error.status == EXIT_KEY and "wrong key" in error.message
    out, error = decode_bytes(data, Secrets(passphrase_fd=pipe_of(b"guess")))
    assert out == b"" and error.status == EXIT_KEY and "with a key file" in error.message
    out, error = decode_bytes(data, Secrets())
    assert out == b"" and error.status == EXIT_KEY and "--key-file" in error.message


def test_altered_header(sealed) -> None:
    _, data, secrets = sealed
    header, frames, trailer = split_wire(data)
    text = header[12:-4]
    # the page size is not secret, but a decoder must never act on a forged one
    forged = with_header_crc(bytearray(header.replace(b'"page_size":4096', b'"page_size":8192')))
    assert forged != header
    result = decode_bytes(join_wire(forged, frames, trailer), secrets)
    assert result[0] == b"" and result[1].status == EXIT_CORRUPT
    assert "header failed authentication" in result[1].message
    at = text.index(b'"wrapped":"') + 20  # a bit of the wrapped file key
    flipped = bytearray(header)
    flipped[12 + at] ^= 0x01
    out, error = decode_bytes(join_wire(with_header_crc(flipped), frames, trailer), secrets)
    assert out == b"" and error is not None and error.status in (EXIT_KEY, EXIT_CORRUPT)


def forged_header(header: bytes, old: bytes, new: bytes) -> bytes:
    """`header` with `old` replaced in its text, its length and CRC made right again (the tag
    cannot be)."""
    n = int.from_bytes(header[10:12], "big")
    text = header[12 : 12 + n].replace(old, new)
    rest = header[12 + n :]  # the tag and the CRC
    return with_header_crc(bytearray(header[:10] + len(text).to_bytes(2, "big") + text + rest))


def test_the_header_is_authenticated_before_any_filter_is_made(
    sealed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forger who keeps the wrapped key but puts an xbzrle cache of 1 TiB in the header gets
    one key unwrapping and a refusal: no xbzrle filter is built, no cache mapped."""
    from migpipe_filters.xbzrle import Xbzrle

    _, data, secrets = sealed
    header, frames, trailer = split_wire(data)
    made = []
    monkeypatch.setattr(Xbzrle, "from_params", classmethod(lambda cls, *a: made.append(a)))
    forged = forged_header(
        header, b'{"filters":[', b'{"filters":[["xbzrle",{"cache":1099511627776}],'
    )
    out, error = decode_bytes(join_wire(forged, frames, trailer), secrets)
    assert out == b"" and error.status == EXIT_CORRUPT
    assert "header failed authentication" in error.message and made == []


def test_a_header_stripped_of_its_tag_is_refused(sealed) -> None:
    """Clearing the sealed flag and cutting the tag out (CRC fixed) is no way around it."""
    _, data, secrets = sealed
    header, frames, trailer = split_wire(data)
    stripped = bytearray(header[:-36] + header[-4:])
    stripped[9] = 0
    out, error = decode_bytes(join_wire(with_header_crc(stripped), frames, trailer), secrets)
    assert out == b"" and error.status == EXIT_CORRUPT
    assert "carries no tag" in error.message


def test_a_key_refuses_a_wire_that_is_not_encrypted(key: Path, tmp_path: Path) -> None:
    """The downgrade: a forger sends a plaintext wire to a decoder that holds a key."""
    stream = small_stream(seed=99)  # the attacker's guest
    plain = encode_bytes(stream, "zstd:1", Secrets(), tmp_path)
    out, error = decode_bytes(plain, Secrets(key_file=str(key)))
    assert out == b"" and error.status == EXIT_KEY
    assert "not encrypted, but a key was given" in error.message
    allowed = Secrets(key_file=str(key), allow_unencrypted=True)
    assert decode_bytes(plain, allowed) == (stream, None)
    result = migpipe("decode", "--key-file", str(key), stdin=plain)
    assert result.returncode == EXIT_KEY and result.stdout == NOT_A_STREAM
    assert result.stderr.count(b"\n") == 1 and b"--allow-unencrypted" in result.stderr
    result = migpipe("decode", "--key-file", str(key), "--allow-unencrypted", stdin=plain)
    assert result.returncode == 0 and result.stdout == stream


@pytest.mark.parametrize("kind", ["qemu", "stream", "fixed", "libvirt"])
def test_a_key_refuses_a_file_that_is_not_encrypted(key: Path, tmp_path: Path, kind: str) -> None:
    """An encrypted save swapped at rest for any file restore reads without a key."""
    stream = small_stream(seed=99)
    path = tmp_path / "vm.sav"
    if kind == "qemu":
        path.write_bytes(stream)
    else:
        xml = tmp_path / "vm.xml"
        xml.write_text("<domain type='kvm'><name>vm</name></domain>")
        options = {
            "stream": [],
            "fixed": ["--layout", "fixed"],
            "libvirt": ["--libvirt-xml", str(xml)],
        }
        assert migpipe("save", str(path), *options[kind], stdin=stream).returncode == 0
    for command in (["restore"], ["inspect"]):
        result = migpipe(*command, str(path), "--key-file", str(key))
        assert result.returncode == EXIT_KEY, result.stderr
        assert b"not encrypted, but a key was given" in result.stderr
        assert result.stdout in (b"", NOT_A_STREAM)
    allowed = migpipe("restore", str(path), "--key-file", str(key), "--allow-unencrypted")
    assert allowed.returncode == 0 and len(allowed.stdout) > 0


@pytest.mark.parametrize("where", ["first byte", "middle", "tag"])
def test_flipped_bit_in_a_payload(sealed, where: str) -> None:
    stream, data, secrets = sealed
    header, frames, trailer = split_wire(data)
    kind, payload = frames[2]
    at = {"first byte": 0, "middle": len(payload) // 2, "tag": len(payload) - 3}[where]
    frames[2] = (kind, payload[:at] + bytes([payload[at] ^ 0x04]) + payload[at + 1 :])
    out, error = decode_bytes(join_wire(header, frames, trailer), secrets)
    assert_refused((out, error), stream, "payload 2 failed authentication")
    good, _ = decode_bytes(join_wire(header, frames[:2], trailer), secrets)
    assert out == good  # the two frames before it, and nothing of the bad one


def test_reordered_duplicated_dropped_and_foreign_payloads(sealed, tmp_path: Path) -> None:
    stream, data, secrets = sealed
    header, frames, trailer = split_wire(data)
    swapped = [frames[0], frames[2], frames[1], *frames[3:]]
    assert_refused(
        decode_bytes(join_wire(header, swapped, trailer), secrets),
        stream,
        "payload 1 failed authentication",
    )
    repeated = [frames[0], frames[1], frames[1], *frames[2:]]
    assert_refused(
        decode_bytes(join_wire(header, repeated, trailer), secrets),
        stream,
        "payload 2 failed authentication",
    )
    dropped = [frames[0], *frames[2:]]
    assert_refused(
        decode_bytes(join_wire(header, dropped, trailer), secrets),
        stream,
        "payload 1 failed authentication",
    )
    # the same key and position, another stream: its file key (and header) differ
    (tmp_path / "other").mkdir()
    other = encode_bytes(small_stream(seed=2), "zstd:1,encrypt", secrets, tmp_path / "other")
    foreign = [*frames[:3], split_wire(other)[1][3], *frames[4:]]
    assert_refused(
        decode_bytes(join_wire(header, foreign, trailer), secrets),
        stream,
        "payload 3 failed authentication",
    )


def test_a_forged_last_payload(sealed) -> None:
    """Cut the stream and flag the last remaining payload final: the last flag is sealed in."""
    stream, data, secrets = sealed
    header, frames, trailer = split_wire(data)
    cut = [*frames[:3], (wire.FRAME_FINAL, frames[3][1])]
    assert_refused(
        decode_bytes(join_wire(header, cut, trailer), secrets),
        stream,
        "last payload failed authentication",
    )


def test_every_truncation_point(key: Path, tmp_path: Path, small_frames: None) -> None:
    stream = small_stream()
    secrets = Secrets(key_file=str(key))
    data = encode_bytes(stream, "zstd:1,encrypt", secrets, tmp_path)  # 14 frames, 29 KB
    eof = stream.rindex(b"\x00\x06\x00\x00")
    for cut in range(len(data)):
        out, error = decode_bytes(data[:cut], secrets)
        assert error is not None, cut
        assert stream.startswith(out) and len(out) <= eof, cut


def test_cli_keys(tmp_path: Path) -> None:
    key = tmp_path / "k"
    old = os.umask(0)
    try:
        assert migpipe("keygen", str(key)).returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    result = migpipe("keygen", str(key))
    assert result.returncode == 1 and b"never replaces" in result.stderr
    assert key.read_bytes() == before and len(list(tmp_path.iterdir())) == 1

    stream = small_stream()
    sealed = migpipe("encode", "--encrypt", "--key-file", str(key), stdin=stream)
    assert sealed.returncode == 0, sealed.stderr
    with open(key, "rb") as f:  # a daemon hands the key over as a descriptor
        result = migpipe(
            "decode", "--key-fd", str(f.fileno()), stdin=sealed.stdout, pass_fds=[f.fileno()]
        )
    assert result.returncode == 0 and result.stdout == stream

    key.chmod(0o644)
    result = migpipe("decode", "--key-file", str(key), stdin=sealed.stdout)
    assert result.returncode == 1 and result.stdout == NOT_A_STREAM
    assert b"read by its group or others (mode 0644); chmod 600 it" in result.stderr


def test_cli_passphrase_file_and_wrong_key(tmp_path: Path) -> None:
    phrase = tmp_path / "phrase"
    phrase.write_bytes(b"correct horse\n")
    phrase.chmod(0o640)
    stream = small_stream()
    result = migpipe("encode", "--encrypt", "--passphrase-file", str(phrase), stdin=stream)
    assert result.returncode == 1 and b"mode 0640" in result.stderr and result.stdout == b""
    phrase.chmod(0o600)
    sealed = migpipe("encode", "--encrypt", "--passphrase-file", str(phrase), stdin=stream)
    assert sealed.returncode == 0, sealed.stderr
    assert b"correct horse" not in sealed.stdout and b'"kdf":"scrypt","log_n":17' in sealed.stdout
    phrase.write_bytes(b"wrong horse\n")
    result = migpipe("decode", "--passphrase-file", str(phrase), stdin=sealed.stdout)
    assert result.returncode == EXIT_KEY and result.stdout == NOT_A_STREAM
    assert result.stderr.count(b"\n") == 1 and b"does not open this stream" in result.stderr


def test_compression_must_come_before_encryption(key: Path) -> None:
    result = migpipe("encode", "--filters", "encrypt,zstd", "--key-file", str(key))
    assert result.returncode == 6 and b"then encryption" in result.stderr


def test_a_key_in_a_memfd_is_accepted(key: Path, tmp_path: Path) -> None:
    """A daemon holds keys in memory only: a memfd's mode (0777) says nothing about disk."""
    memfd = os.memfd_create("key")
    try:
        os.write(memfd, key.read_bytes())
        os.lseek(memfd, 0, os.SEEK_SET)
        stream = small_stream()
        data = encode_bytes(stream, "encrypt", Secrets(key_fd=memfd), tmp_path)
    finally:
        os.close(memfd)
    assert decode_bytes(data, Secrets(key_file=str(key))) == (stream, None)


def test_a_readers_scrypt_ceiling_is_checked_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service lowers the scrypt cost a header may ask of it (Secrets.max_scrypt_log_n):
    a wire asking more is refused before scrypt runs."""
    monkeypatch.setattr(encrypt, "SCRYPT_LOG_N", 12)
    stream = small_stream()
    data = encode_bytes(stream, "encrypt", Secrets(passphrase_fd=pipe_of(b"right\n")), tmp_path)
    ran = []
    monkeypatch.setattr(encrypt, "_wrapping_key", lambda *args: ran.append(args))
    lowered = Secrets(passphrase_fd=pipe_of(b"right\n"), max_scrypt_log_n=11)
    out, error = decode_bytes(data, lowered)
    assert out == b"" and error.status == EXIT_CORRUPT and ran == []
    assert "scrypt cost 2^12 is outside 2^10..2^11" in error.message


def test_a_key_refuses_a_bare_stream_on_standard_input(key: Path) -> None:
    """inspect - reads a bare QEMU stream, which nothing can have sealed: with a key, refused
    as a named file of that kind is."""
    result = migpipe("inspect", "-", "--key-file", str(key), stdin=small_stream())
    assert result.returncode == EXIT_KEY and b"standard input (a bare QEMU stream)" in result.stderr
    allowed = migpipe(
        "inspect", "-", "--key-file", str(key), "--allow-unencrypted", stdin=small_stream()
    )
    assert allowed.returncode == 0
