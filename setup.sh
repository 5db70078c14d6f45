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
# QEMU 10.0 for the real-VM tests, beside Debian's 7.2: its packages from bookworm-backports,
# unpacked into .qemu/10.0 (installed, they would replace 7.2), run with -L for its firmware. apt
# reads a sources list and lists of our own, so the system's apt configuration stays as it was.
qemu10=.qemu/10.0
if [ ! -x "$qemu10/usr/bin/qemu-system-x86_64" ]; then
    apt_dir="$PWD/.qemu/apt"
    rm -rf "$apt_dir" "$qemu10.part"
    mkdir -p "$apt_dir/lists/partial" "$qemu10.part"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$apt_dir/sources.list"
    set -- -q -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
        -o APT::Sandbox::User="$(id -un)"
    if apt-get "$@" update >/dev/null && (cd "$apt_dir" && apt-get "$@" download \
        qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
        qemu-system-data/bookworm-backports qemu-system-gui/bookworm-backports >/dev/null); then
        for deb in "$apt_dir"/*.deb; do dpkg -x "$deb" "$qemu10.part"; done
        mv "$qemu10.part" "$qemu10"
    else
        echo "setup.sh: could not fetch QEMU 10.0 from bookworm-backports; its tests will fail" >&2
    fi
    rm -rf "$apt_dir" "$qemu10.part"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# An editable install leaves migpipe's bytecode to be written on first use, which never happens
# where PYTHONDONTWRITEBYTECODE is set (as here): every migpipe process then compiles its modules
# again, 0.1 s of a 0.25 s start. Compile them once, as installing a wheel does.
.venv/bin/python -m compileall -q migpipe filters >/dev/null
