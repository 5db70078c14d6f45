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
# Packages from bookworm-backports unpacked beside Debian's own (installed, they would replace
# them): unpack DIR PACKAGE... fetches them with a sources list and lists of our own, so the
# system's apt configuration stays as it was, and gives DIR only once all are unpacked.
unpack() {
    into=$1
    shift
    packages=""
    for package; do packages="$packages $package/bookworm-backports"; done
    apt_dir="$PWD/$into.apt"
    rm -rf "$apt_dir" "$into.part"
    mkdir -p "$apt_dir/lists/partial" "$into.part"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$apt_dir/sources.list"
    set -- -q -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
        -o APT::Sandbox::User="$(id -un)"
    # shellcheck disable=SC2086 # package names have no spaces
    if apt-get "$@" update >/dev/null && (cd "$apt_dir" && apt-get "$@" download $packages \
        >/dev/null); then
        for deb in "$apt_dir"/*.deb; do dpkg -x "$deb" "$into.part"; done
        mv "$into.part" "$into"
    else
        echo "setup.sh: could not fetch$packages; the tests that need them will fail" >&2
    fi
    rm -rf "$apt_dir" "$into.part"
}
# QEMU 10.0 for the real-VM tests, beside Debian's 7.2, run with -L for its firmware.
[ -x .qemu/10.0/usr/bin/qemu-system-x86_64 ] || { mkdir -p .qemu && unpack .qemu/10.0 \
    qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui; }
# libvirt 11.3 for tests/test_libvirt.py, beside Debian's 9.0: its virsh runs with
# LD_LIBRARY_PATH and LIBVIRT_DRIVER_DIR pointing here, its QEMU driver embedded in virsh.
[ -x .libvirt/11.3/usr/bin/virsh ] || { mkdir -p .libvirt && unpack .libvirt/11.3 \
    libvirt0 libvirt-common libvirt-clients libvirt-daemon libvirt-daemon-common \
    libvirt-daemon-log libvirt-daemon-driver-qemu; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# An editable install leaves migpipe's bytecode to be written on first use, which never happens
# where PYTHONDONTWRITEBYTECODE is set (as here): every migpipe process then compiles its modules
# again, 0.1 s of a 0.25 s start. Compile them once, as installing a wheel does.
.venv/bin/python -m compileall -q migpipe filters >/dev/null
