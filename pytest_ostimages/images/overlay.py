"""qcow2 overlays: an installed image (or a saved state's disk) is only ever a backing file.

qemu-img opens the backing file read-only to create the overlay; nothing is copied.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import ImageError


def create_overlay(backing: Path, path: Path) -> Path:
    """A new qcow2 file `path` on qcow2 `backing`, referenced by absolute path with its format."""
    result = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageError(f"Cannot create an overlay of {backing} at {path}: {result.stderr.strip()}")
    path.chmod(0o600)  # the guest's own data; libvirt gives it to qemu's user while the VM runs
    return path
