#!/bin/sh
# Sets up everything migpipe's example, tests and benchmarks need on Debian 12 / Python 3.11:
# Debian packages (QEMU for the real-VM tests, gcc for the test guest, the CLIs bench/ compares
# against) when run as root, and a virtualenv in .venv with migpipe and its test tools.
set -eu
cd "$(dirname "$0")"
missing=""
for pair in qemu-system-x86:qemu-system-x86_64 gcc:gcc pv:pv zstd:zstd lz4:lz4 lzop:lzop; do
    command -v "${pair#*:}" >/dev/null 2>&1 || missing="$missing ${pair%%:*}"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
    else
        echo "setup.sh: not root, so not installing Debian packages:$missing" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
