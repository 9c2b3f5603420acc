"""The session's work directory: overlays, extra disks, console logs, keys and state, in one place.

Everything a session makes on disk lives in ``<work root>/<run id>/``, labelled with
its owner (state/owner.py) so that the ledger removes it with the run's VMs and the
reaper finds it when the run died.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from ..errors import ImageError, SessionError
from ..images.catalog import Image
from ..images.overlay import create_overlay
from ..state.folders import PRIVATE_ROOT, own_folder
from ..state.owner import OWNER_FILE, Label


class WorkDir:
    """``<root>/<run_id>``: one directory per session, removed at the end."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.path = root / run_id

    def create(self, owner: Label) -> None:
        root = own_folder(self.path.parent, "work root", "--ost-workdir")
        # qemu runs as another user (libvirt-qemu) and must reach the overlays.
        for folder in [root, *root.parents]:
            if not folder.stat().st_mode & stat.S_IXOTH:
                raise SessionError(
                    f"The work directory {self.path} is inside {folder}, which other users "
                    f"cannot traverse (mode {stat.filemode(folder.stat().st_mode)}), so libvirt's "
                    f"qemu user cannot open the overlays. Use --ost-workdir under a directory "
                    f"with o+x (default /var/tmp/pytest-ostimages-<user>), or chmod o+x {folder}."
                )
        self.path.mkdir(mode=PRIVATE_ROOT)
        os.chmod(self.path, PRIVATE_ROOT)  # whatever the umask: nobody else lists what is inside
        owner.write(self.path)  # so that the reaper knows whose it is

    def overlay(self, image: Image, name: str) -> Path:
        """A new qcow2 overlay on `image`, backed by absolute path with its format."""
        return create_overlay(image.path, self.path / f"{name}.qcow2")

    def empty_disk(self, name: str, size: int) -> Path:
        """A new, empty qcow2 disk of `size` bytes (an extra disk): sparse, and its state can be
        frozen under an overlay like the root disk's (warm start of a whole environment)."""
        path = self.path / f"{name}.qcow2"
        result = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SessionError(f"Cannot create the disk {path} ({size} bytes): {result.stderr.strip()}")
        path.chmod(0o600)  # libvirt gives it to qemu's user while the VM runs
        return path

    def private_key(self, key: Path) -> Path:
        """`key` itself if only its owner can read it, else a 0600 copy (OpenSSH-style)."""
        try:
            mode = key.stat().st_mode
            key.read_bytes()
        except OSError as exc:
            raise ImageError(f"Cannot read the SSH key {key}: {exc.strerror}. The tests need "
                             f"it to log into the VMs; run as a user who can read it "
                             f"(ost-images installs it 0644).") from None
        if not mode & 0o077:
            return key
        copy = self.path / key.name
        if copy.exists():  # made by another worker sharing this directory
            return copy
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.read_bytes())
        return copy

    def disown(self) -> None:
        """Keep the directory (--ost-keep): without a label the reaper leaves it alone."""
        (self.path / OWNER_FILE).unlink(missing_ok=True)
