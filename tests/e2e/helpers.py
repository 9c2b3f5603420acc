"""Checks shared by the end-to-end tests: installed images, libvirt objects, work dirs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

IMAGES = Path(os.environ.get("OST_IMAGES_DIR", "/usr/share/ost-images"))
WORKDIR = Path(os.environ.get("OST_WORKDIR", "/var/tmp/pytest-ostimages"))
# options of the inner sessions run by pytester: they do not read our pytest.ini
INNER = ["-p", "no:cacheprovider", "--ost-memory=512", "--ost-vcpus=1", "--ost-warm=off"]


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


def libvirt_objects(pid: Optional[int] = None) -> set[str]:
    """Libvirt domains and networks labelled by the plugin (by process `pid` if given)."""
    import libvirt

    from pytest_ostimages.state.owner import Label

    conn = libvirt.open(os.environ.get("OST_LIBVIRT_URI", "qemu:///system"))
    try:
        objects = [("domain", d) for d in conn.listAllDomains()] + \
                  [("network", n) for n in conn.listAllNetworks()]
        labelled = [(kind, o.name(), Label.from_xml(o.XMLDesc())) for kind, o in objects]
        return {f"{kind} {name}" for kind, name, label in labelled
                if label is not None and pid in (None, label.pid)}
    finally:
        conn.close()


def workdirs() -> set[str]:
    """Session work directories (they carry an owner label; the layer cache does not)."""
    return {p.parent.name for p in WORKDIR.glob("*/owner.json")}
