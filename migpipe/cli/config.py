"""migpipe's defaults in one place, so that the key file, TLS directory, filters and deadlines
need not be repeated in every command and every QEMU `exec:` URI.

One file is read: `--config FILE`, else the file $MIGPIPE_CONFIG names, else
/etc/migpipe/migpipe.conf if it exists. What the command line says wins over the file, an
option at a time (the key and the filter chain as a whole: a key or filter option given
replaces the file's). The format is INI, read here rather than by configparser so that every
mistake is reported with its line:

    # /etc/migpipe/migpipe.conf
    [migpipe]                    # every command
    key-file = key               # relative to this file's directory
    tls-creds = tls
    connect-timeout = 10

    [encode]                     # one command's own, over [migpipe]'s
    filters = xbzrle,zstd:1,encrypt
"""

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from migpipe.errors import UsageError

SYSTEM_CONFIG = Path("/etc/migpipe/migpipe.conf")
ENVIRONMENT = "MIGPIPE_CONFIG"
SECTION = "migpipe"  # the settings of every command; [COMMAND] sections override them
KEY_DESTS = ("key_file", "key_fd", "passphrase_file", "passphrase_fd", "ask_passphrase")
FILTER_DESTS = ("filters", "compress", "xbzrle", "xbzrle_cache", "encrypt")
PATHS = {"key-file", "passphrase-file", "tls-creds"}  # relative to the file's directory
SETTINGS = ("key-file", "passphrase-file", "tls-creds", "tls-peer", "filters")  # + *-timeout
COMMANDS: set[str] = set()  # the commands that take --config, filled as the parser is built


@dataclass
class Setting:
    value: str
    where: str  # FILE:LINE, for messages


def config_path(given: str | None) -> Path | None:
    """The one file to read, by precedence; None when there is none (no /etc file)."""
    if given:
        return Path(given)
    named = os.environ.get(ENVIRONMENT)
    if named:
        return Path(named)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def read(path: Path) -> dict[str, dict[str, Setting]]:
    """The file's sections: {section: {setting: Setting}}; a UsageError naming FILE:LINE for
    anything it cannot mean (a line that is no setting, an unknown section or setting)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not text"
        raise UsageError(f"cannot read config file {path}: {why}") from None
    sections: dict[str, dict[str, Setting]] = {}
    current: dict[str, Setting] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            if name != SECTION and name not in COMMANDS:
                known = ", ".join(sorted(COMMANDS))
                raise UsageError(f"{where}: unknown section [{name}] (use [{SECTION}] or {known})")
            current = sections.setdefault(name, {})
            continue
        name, equals, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name:
            raise UsageError(f"{where}: neither NAME = VALUE nor a [section]: {raw.strip()}")
        if current is None:
            raise UsageError(f"{where}: {name} comes before any [section]")
        if name not in SETTINGS and not name.endswith("-timeout"):
            known = ", ".join((*SETTINGS, "*-timeout"))
            raise UsageError(f"{where}: unknown setting {name} (known: {known})")
        if name in PATHS and value:
            value = str(path.parent / Path(value).expanduser())
        current[name] = Setting(value, where)
    return sections


def apply(args: argparse.Namespace, sub: argparse.ArgumentParser, seconds: Callable) -> None:
    """Fill in what the command line left out from the config file's settings for this
    command. An option counts as given when its value is not the parser's default object,
    the test argparse itself uses for its defaults."""
    path = config_path(args.config)
    if path is None:
        return
    sections = read(path)
    settings = {**sections.get(SECTION, {}), **sections.get(args.command, {})}

    def unset(*dests: str) -> bool:
        return all(getattr(args, d) is sub.get_default(d) for d in dests if hasattr(args, d))

    for name, setting in settings.items():
        dest = name.replace("-", "_")
        if not hasattr(args, dest):
            continue  # a setting of other commands (filters for decode)
        if dest in ("key_file", "passphrase_file"):
            if unset(*KEY_DESTS) and setting.value:
                setattr(args, dest, setting.value)
                if args.command == "inspect":  # it hands nothing to QEMU: plain files still read
                    args.allow_unencrypted = True
        elif dest == "filters":
            if unset(*FILTER_DESTS) and not getattr(args, "libvirt_xml", None):
                args.filters = setting.value
                args.filters_from = setting.where
        elif dest in ("tls_creds", "tls_peer"):
            if unset(dest) and (args.connect or args.listen) and setting.value:
                value = [p.strip() for p in setting.value.split(",")]
                setattr(args, dest, Path(setting.value) if dest == "tls_creds" else value)
        elif unset(dest):
            try:
                setattr(args, dest, seconds(setting.value))
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"{setting.where}: {name}: {e}") from None
            if dest == "qmp_timeout" and args.qmp is not None:
                from migpipe.qemu import qmp  # main set it from the command line's, before

                qmp.GREETING_TIMEOUT = args.qmp_timeout
