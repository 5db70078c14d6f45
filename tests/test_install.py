"""What an installed migpipe brings beside the command: man pages `man` finds, bash completion
that matches --help, the systemd unit and the libvirt_iohelper wrapper in contrib/."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from migpipe.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
COMPLETION = CONTRIB / "bash-completion" / "migpipe"
UNIT = CONTRIB / "systemd" / "migpipe-serve.service"
BIN = Path(sys.executable).parent
COMMANDS = [
    "inspect", "extract", "generate", "encode", "decode", "migrate", "incoming", "save",
    "restore", "iohelper", "keygen", "tls-init", "serve", "demo",
]  # fmt: skip


def test_every_man_page_and_the_completion_are_data_files() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    installed = {
        f"{target}/{Path(source).name}": source
        for target, sources in data["data-files"].items()
        for source in sources
    }
    pages = {f"share/man/man{p.suffix[1:]}/{p.name}" for p in (ROOT / "man").glob("*.[0-9]")}
    assert pages <= installed.keys(), "a man page pyproject.toml does not install"
    assert (
        installed["share/bash-completion/completions/migpipe"] == "contrib/bash-completion/migpipe"
    )
    assert all((ROOT / source).is_file() for source in installed.values())


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_finds_the_pages_of_an_installed_wheel(tmp_path: Path) -> None:
    """`pip install` of the wheel puts the pages under PREFIX/share/man, where man looks for
    any PREFIX/bin on PATH: `man migpipe` works with no MANPATH."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", tmp_path / "wheel", ROOT], capture_output=True
    )
    assert built.returncode == 0, built.stderr.decode()
    (wheel,) = (tmp_path / "wheel").glob("migpipe-*.whl")
    prefix = tmp_path / "prefix"
    # --ignore-installed: else pip uninstalls the venv's own (editable) migpipe first
    into_prefix = ["install", "--no-deps", "--ignore-installed", "--prefix", prefix, wheel]
    installed = subprocess.run([*pip, *into_prefix], capture_output=True)
    assert installed.returncode == 0, installed.stderr.decode()
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env["PATH"] = f"{prefix / 'bin'}:/usr/bin:/bin"
    for page, section in [("migpipe", "1"), ("migpipe-serve", "1"), ("migpipe-wire", "5")]:
        found = subprocess.run(
            ["man", "-w", section, page], env=env, capture_output=True, text=True
        )
        assert found.stdout.strip() == str(prefix / f"share/man/man{section}/{page}.{section}")
    assert (prefix / "share/bash-completion/completions/migpipe").read_text() == (
        COMPLETION.read_text()
    )


def test_the_completion_script_is_what_the_parser_generates() -> None:
    sys.path.insert(0, str(CONTRIB / "bash-completion"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    assert COMPLETION.read_text() == generate.script(build_parser()), (
        "run .venv/bin/python contrib/bash-completion/generate.py > contrib/bash-completion/migpipe"
    )


def complete(*words: str) -> list[str]:
    """What bash offers for the command line `words` (the last one being completed)."""
    script = (
        f"source {shlex.quote(str(COMPLETION))}; COMP_WORDS=({shlex.join(words)}); "
        f"COMP_CWORD={len(words) - 1}; _migpipe; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("command", COMMANDS)
def test_completion_offers_every_option_help_shows(command: str) -> None:
    shown = subprocess.run(
        [BIN / "migpipe", command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    heads = [line.split("  ")[1] for line in shown.splitlines() if line.startswith("  -")]
    options = {flag for head in heads for flag in re.findall(r"--?[a-zA-Z][\w-]*", head)}
    assert "--help" in options
    assert options <= set(complete("migpipe", command, "-"))


def test_completion_of_commands_and_values() -> None:
    assert set(complete("migpipe", "")) >= set(COMMANDS)
    assert complete("migpipe", "re") == ["restore"]
    assert complete("migpipe", "save", "--layout", "") == ["stream", "fixed"]
    assert "README.md" in complete("migpipe", "encode", "--key-file", "READ")
    assert "pyproject.toml" in complete("migpipe", "inspect", "pypro")  # a positional FILE
    assert complete("migpipe", "encode", "--connect", "") == []  # an address: typed


def unit_command(unit: Path) -> list[str]:
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.optionxform = str  # systemd's keys are case-sensitive
    parsed.read(unit)
    return shlex.split(parsed["Service"]["ExecStart"])


def test_the_systemd_unit_runs_a_serve_command_line_migpipe_accepts() -> None:
    argv = unit_command(UNIT)
    assert Path(argv[0]).name == "migpipe"
    args = build_parser().parse_args(argv[1:])  # a usage error exits here
    assert args.command == "serve"
    assert args.socket.startswith("/run/migpipe/")  # in the unit's RuntimeDirectory


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """verify checks the unit's keys and that ExecStart's program exists: pointed at this
    venv's migpipe instead of /usr/local/bin's."""
    text = UNIT.read_text()
    argv = unit_command(UNIT)
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(f"ExecStart={argv[0]}", f"ExecStart={BIN / 'migpipe'}"))
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", unit], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stderr
    assert "migpipe-serve.service" not in verified.stderr, verified.stderr


def test_the_iohelper_wrapper_copies_as_libvirt_iohelper_does(tmp_path: Path) -> None:
    """contrib/libvirt/libvirt_iohelper in libvirt's place: `PATH FD`, stdin to FD (a save)
    and FD to stdout (a restore), through the migpipe on PATH."""
    wrapper = CONTRIB / "libvirt" / "libvirt_iohelper"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    data = os.urandom(3 << 20)
    image = tmp_path / "vm.save"
    fd = os.open(image, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        subprocess.run([wrapper, image, str(fd)], input=data, pass_fds=[fd], env=env, check=True)
    finally:
        os.close(fd)
    assert image.read_bytes() == data
    fd = os.open(image, os.O_RDONLY)
    try:
        back = subprocess.run(
            [wrapper, image, str(fd)], pass_fds=[fd], env=env, capture_output=True, check=True
        )
    finally:
        os.close(fd)
    assert back.stdout == data
