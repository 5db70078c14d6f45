"""The config file: defaults for the key, TLS, filters and deadlines, so that exec: URIs stay
short; the command line over $MIGPIPE_CONFIG's file (or --config's) over /etc's; every mistake
one line naming the file and line; a key it names checked as --key-file's is."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from support import migpipe, synthetic_stream

from migpipe.cli import config, main
from migpipe.keys import keygen


@pytest.fixture(scope="module")
def stream() -> bytes:
    return synthetic_stream(4 << 20, 2)


def encode(tmp_path: Path, stream: bytes, *args: str, env: dict | None = None) -> list[str]:
    """The filters encode ran (by --stats-json), given `args` and environment `env`."""
    stats = tmp_path / "stats.json"
    result = migpipe(
        "encode", "--out", str(tmp_path / "wire"), "--force", "--stats-json", str(stats), *args,
        stdin=stream, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    return sorted(json.loads(stats.read_text())["filter_seconds"])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_filters_come_from_the_file_unless_the_command_line_names_any(
    tmp_path: Path, stream: bytes
) -> None:
    conf = write(tmp_path / "m.conf", "[migpipe]\nfilters = zstd:1\n")
    assert encode(tmp_path, stream, "--config", str(conf)) == ["zstd"]
    assert encode(tmp_path, stream, "--config", str(conf), "--compress", "lz4") == ["lz4"]
    assert encode(tmp_path, stream, "--config", str(conf), "--filters", "lz4") == ["lz4"]
    assert encode(tmp_path, stream) == []  # no file, no /etc file here: no filters


def test_a_command_section_overrides_the_common_one(tmp_path: Path, stream: bytes) -> None:
    conf = write(tmp_path / "m.conf", "[migpipe]\nfilters = zstd\n\n[encode]\nfilters = lz4\n")
    assert encode(tmp_path, stream, "--config", str(conf)) == ["lz4"]


def test_precedence_command_line_then_environment_then_etc(
    tmp_path: Path, stream: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = write(tmp_path / "etc.conf", "[encode]\nfilters = zstd\n")
    named = write(tmp_path / "env.conf", "[encode]\nfilters = lz4\n")
    given = write(tmp_path / "given.conf", "[encode]\nfilters = xbzrle\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", etc)
    monkeypatch.delenv(config.ENVIRONMENT, raising=False)
    assert config.config_path(None) == etc
    monkeypatch.setenv(config.ENVIRONMENT, str(named))
    assert config.config_path(None) == named
    assert config.config_path(str(given)) == given
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "none.conf")
    monkeypatch.delenv(config.ENVIRONMENT)
    assert config.config_path(None) is None  # no /etc file: none, and no error
    # and through the command, in its own process
    assert encode(tmp_path, stream, env={config.ENVIRONMENT: str(named)}) == ["lz4"]
    both = {config.ENVIRONMENT: str(named)}
    assert encode(tmp_path, stream, "--config", str(given), env=both) == ["xbzrle"]


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("[migpipe]\nkeyfile = k\n", 2, "unknown setting keyfile (known: key-file,"),
        ("# defaults\n[migpipe]\n\nfilters\n", 4, "neither NAME = VALUE nor a [section]: filters"),
        ("[encdoe]\nfilters = lz4\n", 1, "unknown section [encdoe] (use [migpipe] or "),
        ("filters = lz4\n", 1, "filters comes before any [section]"),
        ("[migpipe]\nconnect-timeout = soon\n", 2, 'connect-timeout: "soon" is not a number'),
        ("[migpipe]\nfilters = gzip\n", 2, "unknown filter"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_line(
    tmp_path: Path, stream: bytes, text: str, line: int, says: str
) -> None:
    conf = write(tmp_path / "m.conf", text)
    result = migpipe("encode", "--config", str(conf), "--connect", "127.0.0.1:9", stdin=stream)
    message = result.stderr.decode()
    assert message.count("\n") == 1 and message.startswith("migpipe encode: error: "), message
    assert f"{conf}:{line}" in message and says in message, message
    assert result.returncode in (2, 6), message  # a usage error; an unknown filter: 6


def test_a_missing_named_file_is_an_error(tmp_path: Path) -> None:
    result = migpipe("decode", "--config", str(tmp_path / "none.conf"))
    assert result.returncode == 2
    assert result.stderr.decode() == (
        f"migpipe decode: error: cannot read config file {tmp_path / 'none.conf'}: "
        "No such file or directory\n"
    )


def test_the_key_file_it_names_is_relative_to_it_and_checked_as_key_file_is(
    tmp_path: Path, stream: bytes
) -> None:
    keygen(tmp_path / "key")
    conf = write(tmp_path / "m.conf", "[migpipe]\nkey-file = key\n[encode]\nfilters = encrypt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    wire = elsewhere / "w"
    sealed = migpipe(
        "encode", "--config", str(conf), "--out", str(wire), stdin=stream, cwd=elsewhere
    )
    assert sealed.returncode == 0, sealed.stderr
    opened = migpipe("decode", "--config", str(conf), "--in", str(wire), cwd=elsewhere)
    assert (opened.returncode, opened.stdout) == (0, stream)
    assert migpipe("decode", "--in", str(wire)).returncode == 7  # sealed: it took the key

    # a key option on the command line replaces the file's: this key does not open the wire
    keygen(tmp_path / "other")
    other = migpipe("decode", "--config", str(conf), "--key-file", str(tmp_path / "other"),
                    "--in", str(wire))  # fmt: skip
    assert other.returncode == 7, other.stderr

    (tmp_path / "key").chmod(0o644)
    by_file = migpipe("decode", "--config", str(conf), "--in", str(wire))
    by_option = migpipe("decode", "--key-file", str(tmp_path / "key"), "--in", str(wire))
    assert by_file.returncode == by_option.returncode == 1
    assert by_file.stderr == by_option.stderr
    assert b"can be read by its group or others (mode 0644); chmod 600 it" in by_file.stderr


def test_a_configured_key_makes_readers_refuse_plain_input_but_not_inspect(
    tmp_path: Path, stream: bytes
) -> None:
    keygen(tmp_path / "key")
    conf = write(tmp_path / "m.conf", "[migpipe]\nkey-file = key\n")
    plain = tmp_path / "plain.wire"
    assert migpipe("encode", "--out", str(plain), stdin=stream).returncode == 0
    assert migpipe("decode", "--config", str(conf), "--in", str(plain)).returncode == 7
    assert migpipe("inspect", "--config", str(conf), str(plain)).returncode == 0


def test_tls_and_filters_apply_only_where_they_can(tmp_path: Path, stream: bytes) -> None:
    """tls-creds for a command without a connection, filters for a libvirt image: not used,
    rather than every such command failing because of the file."""
    conf = write(tmp_path / "m.conf", "[migpipe]\ntls-creds = tls\nfilters = zstd\n")
    assert encode(tmp_path, stream, "--config", str(conf)) == ["zstd"]  # --out: no TLS
    xml = write(tmp_path / "dom.xml", "<domain type='qemu'><name>vm</name></domain>")
    image = tmp_path / "vm.save"
    saved = migpipe("save", "--config", str(conf), str(image), "--libvirt-xml", str(xml),
                    stdin=stream)  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    assert b"libvirt save image" in migpipe("inspect", str(image)).stdout


def test_deadlines_come_from_the_file(tmp_path: Path) -> None:
    """accept-timeout from the file gives up a --listen nobody connects to; the command
    line's wins."""
    conf = write(tmp_path / "m.conf", "[decode]\naccept-timeout = 0.5\n")
    listen = ["--listen", f"unix:{tmp_path / 'sock'}"]
    result = migpipe("decode", "--config", str(conf), *listen, timeout=30)
    assert result.stderr.decode().endswith("within 0.5 s\n"), result.stderr
    result = migpipe("decode", "--config", str(conf), *listen, "--accept-timeout", "0.2")
    assert result.stderr.decode().endswith("within 0.2 s\n"), result.stderr


def test_main_reads_the_system_file(
    tmp_path: Path, stream: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "SYSTEM_CONFIG", write(tmp_path / "etc.conf", "[x]\n"))
    monkeypatch.delenv(config.ENVIRONMENT, raising=False)
    assert main(["decode", "--in", str(tmp_path / "none")]) == 2  # the bad /etc file, first


def test_the_qmp_greeting_deadline_comes_from_the_file(tmp_path: Path, stream: bytes) -> None:
    """A monitor another client holds never greets: qmp-timeout from the file gives up."""
    saved = tmp_path / "vm.mig"
    assert migpipe("save", str(saved), stdin=stream).returncode == 0
    conf = write(tmp_path / "m.conf", "[restore]\nqmp-timeout = 0.3\n")
    with socket.socket(socket.AF_UNIX) as held:
        held.bind(str(tmp_path / "qmp"))
        held.listen()  # accepted by the kernel, never greeted
        result = migpipe("restore", "--config", str(conf), "--qmp", str(tmp_path / "qmp"),
                         str(saved), timeout=30)  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert b"within 0.3 s" in result.stderr, result.stderr
