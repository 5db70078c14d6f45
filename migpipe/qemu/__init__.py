"""QEMU driven over QMP, as libvirt does: the QMP protocol and client (qmp), and migrate,
incoming, save and restore through a pipe handed over with getfd (migration)."""
