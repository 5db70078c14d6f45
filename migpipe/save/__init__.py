"""Saved files: the layouts and restore (savefile), the fixed layout (fixedfile), libvirt's save
image (libvirtimage), libvirt_iohelper's twin (iohelper). Specified in migpipe-file(5)."""
