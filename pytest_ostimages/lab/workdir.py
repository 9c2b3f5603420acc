"""The session's work directory: overlays, extra disks, console logs, keys and state, in one place.

Everything a session makes on disk lives in ``<work root>/<run id>/``, labelled with
its owner (state/owner.py) so that the ledger removes it with the run's VMs and the
reaper finds it when the run died. On a remote hypervisor that folder is there (the
VMs' files), and what people and tools on this machine use to reach the VMs (the key
copy, ``ssh_config``, ``known_hosts``, inventories, an OST suite's deployment
directory) is in a folder of the same name under the local work root, labelled too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import ImageError, SessionError
from ..hypervisor.host import LOCAL
from ..images.catalog import Image
from ..images.overlay import create_overlay
from ..state.folders import PRIVATE_ROOT, own_folder
from ..state.owner import OWNER_FILE, Label

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host


class WorkDir:
    """``<root>/<run_id>`` on the hypervisor (`path`), and its local twin for access files (`client`:
    the same folder when the hypervisor is this machine). Removed at the end."""

    def __init__(self, root: "AnyPath", run_id: str, host: "Host" = LOCAL, client_root: Optional[Path] = None) -> None:
        self.host = host
        self.path = root / run_id
        self.client: Path = self.path if host.local else (client_root or Path("/nonexistent")) / run_id  # type: ignore[assignment]

    @property
    def remote(self) -> bool:
        return not self.host.local

    def create(self, owner: Label) -> None:
        root = own_folder(self.path.parent, "work root", "--ost-workdir", self.host)
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
        self.path.chmod(PRIVATE_ROOT)  # whatever the umask: nobody else lists what is inside
        owner.write(self.path)  # so that the reaper knows whose it is
        if self.remote:
            own_folder(self.client.parent, "work root", "--ost-workdir")
            self.client.mkdir(mode=PRIVATE_ROOT)
            owner.write(self.client)

    def attach_client(self, owner: Label) -> None:
        """A remote hypervisor's run attached to: this machine's folder of its access files, made if
        there is none (the run was booted from another machine, or this one's /var/tmp was cleared),
        with `owner` as its owner from now on."""
        if not self.remote:
            return
        own_folder(self.client.parent, "work root", "--ost-workdir")
        self.client.mkdir(mode=PRIVATE_ROOT, exist_ok=True)
        owner.write(self.client)

    def overlay(self, image: Image, name: str) -> "AnyPath":
        """A new qcow2 overlay on `image`, backed by absolute path with its format."""
        return create_overlay(image.path, self.path / f"{name}.qcow2", self.host)

    def empty_disk(self, name: str, size: int) -> "AnyPath":
        """A new, empty qcow2 disk of `size` bytes (an extra disk): sparse, and its state can be
        frozen under an overlay like the root disk's (warm start of a whole environment)."""
        path = self.path / f"{name}.qcow2"
        result = self.host.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])
        if result.returncode != 0:
            raise SessionError(f"Cannot create the disk {path} ({size} bytes): {result.stderr.strip()}")
        path.chmod(0o600)  # libvirt gives it to qemu's user while the VM runs
        return path

    def private_key(self, key: "AnyPath") -> Path:
        """The images' key for this machine's ssh and ansible: `key` itself if it is here and only its
        owner can read it, else a 0600 copy in the (local) work directory (OpenSSH-style)."""
        try:
            mode = key.stat().st_mode
            data = key.read_bytes()
        except OSError as exc:
            raise ImageError(f"Cannot read the SSH key {key}{'' if self.host.local else f' on {self.host.name}'}: "
                             f"{exc.strerror}. The tests need it to log into the VMs; run as a user who can read "
                             f"it (ost-images installs it 0644).") from None
        if self.host.local and not mode & 0o077:
            return key  # type: ignore[return-value]
        copy = self.client / key.name
        if copy.exists():  # made by another worker sharing this directory
            return copy
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return copy

    def disown(self) -> None:
        """Keep the directory (--ost-keep): without a label the reaper leaves it alone."""
        (self.path / OWNER_FILE).unlink(missing_ok=True)
        if self.remote:
            (self.client / OWNER_FILE).unlink(missing_ok=True)
