"""What a session boots from, checked before anything is created.

The catalog of installed images, the distro, each layer with its validated chain,
the SSH key, the templates and each VM's size: everything here is read and
checked, nothing is made. A problem is an OstError that names the input and
what to do, raised before the first libvirt object or file exists.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from ..errors import SessionError
from ..images.catalog import Catalog, Image
from ..config import OstConfig
from ..hypervisor.host import LOCAL
from ..hypervisor.render import Templates
from ..guest.seed import UserData
from ..guest.ssh import load_key

if TYPE_CHECKING:
    import paramiko

    from ..hypervisor.host import AnyPath, Host


@dataclass(frozen=True)
class VMSpec:
    """What to boot: a role name and a layer name (or qcow2 path)."""

    role: str
    image: str
    memory: Optional[int] = None
    vcpus: Optional[int] = None
    shares: tuple[tuple[Path, str, Path], ...] = ()  # (host folder, tag, virtiofsd) for the guest
    user_data: Optional[UserData] = None  # cloud-config (dict or text) for a layer with cloud-init
    nics: tuple[str, ...] = ()  # network roles of eth0, eth1, ...; () = one NIC on the management network
    disks: tuple["Disk", ...] = ()  # extra empty disks
    deploy_scripts: tuple[Path, ...] = ()  # run as root over SSH after boot, in order

    def size(self, config: OstConfig) -> tuple[int, int]:
        """Memory (MiB) and vCPUs: its own, else `config`'s setting for its role."""
        return (self.memory or config.memory.for_role(self.role), self.vcpus or config.vcpus.for_role(self.role))


@dataclass(frozen=True)
class Disk:
    """An extra empty disk: a qcow2 file of `size` bytes (sparse); the guest sees `serial`."""

    name: str  # e.g. sda (the init-config's key)
    size: int
    serial: str


@dataclass(frozen=True)
class NetworkSpec:
    """A network of the session; VMs reach each other by name on the management one."""

    role: str
    management: bool = False


MANAGEMENT = NetworkSpec("management", management=True)  # the only network outside init-configs


def is_path(image: str) -> bool:
    """Whether `image` names a qcow2 file rather than a layer."""
    return "/" in image or image.endswith(".qcow2")


class Inputs:
    """The session's checked inputs; each is looked up once."""

    def __init__(self, config: OstConfig, catalog: Optional[Catalog] = None,
                 host: "Callable[[], Host]" = lambda: LOCAL) -> None:
        self.config = config
        self.host = host  # the hypervisor's side, where the images are (connected when first needed)
        self._distro: Optional[str] = None
        if catalog is not None:  # already discovered (for the report header)
            self.catalog = catalog

    @functools.cached_property
    def catalog(self) -> Catalog:
        return Catalog.discover(self.config.images_dir, host=self.host())

    def choose_distro(self, layers: Iterable[str] = ()) -> str:
        """The session's distro: --ost-distro, else the only one that has every planned layer.

        Fixed by the first call: every VM of a session comes from one distro.
        """
        if self._distro is None:
            wanted = sorted({layer for layer in layers if not is_path(layer)})
            self._distro = self.catalog.choose_distro(self.config.distro, wanted)
        return self._distro

    @property
    def distro(self) -> str:
        return self.choose_distro()

    def image(self, name: str) -> Image:
        """A layer name of the session's distro, or a path to a qcow2 file (on the hypervisor)."""
        if is_path(name):
            return self.catalog.image_from_path(Path(name), self.distro)
        return self.catalog.image(self.distro, name)

    @functools.cached_property
    def key(self) -> "paramiko.PKey":
        """The distro's root SSH key, loaded (a broken key fails here)."""
        return load_key(self.key_path)

    @property
    def key_path(self) -> "AnyPath":
        return self.catalog.ssh_key(self.distro)

    @functools.cached_property
    def templates(self) -> Templates:
        templates = Templates(self.config.templates)
        for name in Templates.NAMES:  # invalid XML fails now, before anything exists
            templates.load(name)
        return templates

    def cloud_init(self, image: Image) -> bool:
        """Whether VMs of `image` get a NoCloud seed (--ost-cloud-init, else its package list)."""
        mode = self.config.cloud_init
        return mode == "on" or (mode == "auto" and image.has_package("cloud-init"))

    def firmware(self, image: Image) -> str:
        """"bios" or "efi" for VMs of `image`: --ost-firmware, else what the image boots with."""
        return self.config.firmware if self.config.firmware != "auto" else self.catalog.firmware(image)

    def check(self, specs: Iterable[VMSpec]) -> dict[str, Image]:
        """Every input `specs` need, checked; returns role -> image."""
        specs = list(specs)
        if self.host().local and shutil.which("qemu-img") is None:
            raise SessionError("qemu-img is not installed; the plugin checks images and makes each VM's overlay "
                               "with it. Install qemu-utils (Debian) or qemu-img (EL, Fedora).")
        self.choose_distro(s.image for s in specs)
        images = {s.role: self.image(s.image) for s in specs}
        for image in images.values():
            self.firmware(image)  # an image whose firmware is unknown fails before anything exists
        self.key  # noqa: B018 - a broken key fails before anything exists
        self.templates  # noqa: B018
        return images

