#!/bin/sh
# Sets up everything migpipe's example, tests and benchmarks need on Debian 12 / Python 3.11:
# Debian packages (QEMU for the real-VM tests, gcc for the test guest and the C accelerators,
# libvirt for tests/test_libvirt.py, the CLIs bench/ compares against) when run as root, and a
# virtualenv in .venv with migpipe and its test tools. A package is found by a command or file.
set -eu
cd "$(dirname "$0")"
missing=""
for pair in qemu-system-x86:qemu-system-x86_64 gcc:gcc libc6-dev:/usr/include/stdio.h pv:pv \
    zstd:zstd lz4:lz4 lzop:lzop libvirt-clients:virsh libvirt-daemon-driver-qemu:virt-qemu-run \
    libvirt-daemon:/usr/lib/libvirt/libvirt_iohelper; do
    command -v "${pair#*:}" >/dev/null 2>&1 || [ -e "${pair#*:}" ] || missing="$missing ${pair%%:*}"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
            >/dev/null
    else
        echo "setup.sh: not root, so not installing Debian packages:$missing" >&2
    fi
fi
if [ "$(id -u)" = 0 ]; then
    # libvirt 9.0 looks up its built-in QEMU user and groups before it reads qemu.conf, even one
    # that says root; libvirt-daemon-system would create them, with daemons the tests never use.
    getent group kvm >/dev/null || groupadd --system kvm
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || useradd --system --gid kvm --no-create-home \
        --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# An editable install leaves migpipe's bytecode to be written on first use, which never happens
# where PYTHONDONTWRITEBYTECODE is set (as here): every migpipe process then compiles its modules
# again, 0.1 s of a 0.25 s start. Compile them once, as installing a wheel does.
.venv/bin/python -m compileall -q migpipe filters >/dev/null
