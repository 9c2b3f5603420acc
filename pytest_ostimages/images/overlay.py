"""qcow2 overlays: an installed image (or a saved state's disk) is only ever a backing file.

qemu-img opens the backing file read-only to create the overlay; nothing is copied. It runs
where the images are: this machine, or a remote hypervisor (hypervisor/host.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ImageError
from ..hypervisor.host import LOCAL

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host


def create_overlay(backing: "AnyPath", path: "AnyPath", host: "Host" = LOCAL) -> "AnyPath":
    """A new qcow2 file `path` on qcow2 `backing`, referenced by absolute path with its format."""
    result = host.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)])
    if result.returncode != 0:
        raise ImageError(f"Cannot create an overlay of {backing} at {path}: {result.stderr.strip()}")
    path.chmod(0o600)  # the guest's own data; libvirt gives it to qemu's user while the VM runs
    return path
