"""Checks shared by the end-to-end tests: installed images, libvirt objects, work dirs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

IMAGES = Path(os.environ.get("OST_IMAGES_DIR", "/usr/share/ost-images"))


def image_state() -> dict[str, tuple[str, int, int, int]]:
    """sha256, owner, group and mode of every installed qcow2."""
    state = {}
    for path in sorted(IMAGES.glob("*.qcow2")):
        st = path.stat()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        state[path.name] = (digest.hexdigest(), st.st_uid, st.st_gid, st.st_mode)
    return state


def libvirt_objects() -> set[str]:
    """Every libvirt domain and network labelled by the plugin, to spot leftovers."""
    import libvirt

    from pytest_ostimages.render import Label

    conn = libvirt.open(os.environ.get("OST_LIBVIRT_URI", "qemu:///system"))
    try:
        objects = [("domain", d) for d in conn.listAllDomains()] + \
                  [("network", n) for n in conn.listAllNetworks()]
        return {f"{kind} {o.name()}" for kind, o in objects if Label.from_xml(o.XMLDesc())}
    finally:
        conn.close()


def workdirs() -> set[str]:
    root = Path("/var/tmp/pytest-ostimages")
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
