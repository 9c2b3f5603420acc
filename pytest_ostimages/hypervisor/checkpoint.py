"""A running domain's state kept outside libvirt's snapshots, for domains that cannot have those.

libvirt refuses internal snapshots of a domain with pflash (UEFI) firmware ("internal
snapshots of a VM with pflash based firmware are not supported"). A checkpoint does
the same with what works for every domain: its memory in a save image (``virsh
save``), its disk as it was frozen into a read-only qcow2 layer under a new overlay
(the overlay keeps its path, so nothing else changes), its firmware variables copied.
Going back destroys the domain, puts a new overlay on that layer and the variables
back, and restores the save image (which stays, for the next time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from lxml import etree

from ..errors import VMError
from ..images.overlay import create_overlay
from ..state.folders import share_with_qemu
from .connection import libvirt_module, qemu_ids
from .host import LOCAL
from .saveimage import found, on_saved_disk

if TYPE_CHECKING:
    import libvirt

    from .host import AnyPath, Host


@dataclass(frozen=True)
class Checkpoint:
    """Files on the hypervisor, beside the domain's overlay."""

    memory: "AnyPath"  # the save image
    disk: "AnyPath"  # the disk at that moment, read-only, backing the domain's overlay
    nvram: Optional["AnyPath"]  # the firmware's variables at that moment
    xml: str  # the domain XML to restore with: the overlay on `disk`


def uses_pflash(dom: "libvirt.virDomain") -> bool:
    """Whether the domain's firmware is in pflash (UEFI): no internal snapshots then."""
    loader = etree.fromstring(dom.XMLDesc().encode()).find("os/loader")
    return loader is not None and loader.get("type") == "pflash"


def take(dom: "libvirt.virDomain", overlay: "AnyPath", nvram: Optional["AnyPath"], name: str,
         host: "Host" = LOCAL) -> tuple[Checkpoint, "libvirt.virDomain"]:
    """Checkpoint `dom` (running on `overlay`, on `host`) as `<overlay>.<name>.*`; returns it and the
    domain, running again."""
    libvirt = libvirt_module()
    conn = dom.connect()
    memory = overlay.with_name(f"{overlay.stem}.{name}.save")
    disk = overlay.with_name(f"{overlay.stem}.{name}.qcow2")
    try:
        virt_type = etree.fromstring(dom.XMLDesc().encode()).get("type", "kvm")
        dom.save(str(memory))  # the domain stops; its memory is in the file
        overlay.rename(disk)
        share_with_qemu(disk, qemu_ids(conn, virt_type), host)  # below the new overlay: libvirt does not relabel it
        copy = None
        if nvram is not None:
            copy = nvram.with_name(f"{nvram.name}.{name}")
            host.copyfile(nvram, copy)
        create_overlay(disk, overlay, host)
        root = etree.fromstring(conn.saveImageGetXMLDesc(str(memory), 0).encode())
        on_saved_disk(found(root, "devices/disk[@device='disk']"), overlay, disk)
        checkpoint = Checkpoint(memory, disk, copy, etree.tostring(root, encoding="unicode"))
        return checkpoint, _restore(conn, checkpoint)
    except libvirt.libvirtError as exc:
        raise VMError(f"Cannot checkpoint domain {dom.name()}: libvirt says {exc.get_error_message()!r}") from None


def find(dom: "libvirt.virDomain", overlay: "AnyPath", nvram: Optional["AnyPath"], name: str) -> Optional[Checkpoint]:
    """The checkpoint `name` taken earlier of the domain on `overlay` (by another session that kept it)."""
    memory = overlay.with_name(f"{overlay.stem}.{name}.save")
    disk = overlay.with_name(f"{overlay.stem}.{name}.qcow2")
    if not (memory.is_file() and disk.is_file()):
        return None
    copy = nvram.with_name(f"{nvram.name}.{name}") if nvram is not None else None
    root = etree.fromstring(dom.connect().saveImageGetXMLDesc(str(memory), 0).encode())
    on_saved_disk(found(root, "devices/disk[@device='disk']"), overlay, disk)
    return Checkpoint(memory, disk, copy if copy is not None and copy.is_file() else None,
                      etree.tostring(root, encoding="unicode"))


def go_back(dom: "libvirt.virDomain", checkpoint: Checkpoint, overlay: "AnyPath", nvram: Optional["AnyPath"],
            host: "Host" = LOCAL) -> "libvirt.virDomain":
    """Destroy `dom` and restore it as it was at `checkpoint`; returns the domain, running."""
    libvirt = libvirt_module()
    conn = dom.connect()
    try:
        if dom.isActive():
            dom.destroy()
        overlay.unlink(missing_ok=True)
        create_overlay(checkpoint.disk, overlay, host)
        if nvram is not None and checkpoint.nvram is not None:
            host.copyfile(checkpoint.nvram, nvram)
        return _restore(conn, checkpoint)
    except libvirt.libvirtError as exc:
        raise VMError(f"Cannot go back to the checkpoint of domain {dom.name()}: libvirt says "
                      f"{exc.get_error_message()!r}") from None


def _restore(conn: "libvirt.virConnect", checkpoint: Checkpoint) -> "libvirt.virDomain":
    libvirt = libvirt_module()
    conn.restoreFlags(str(checkpoint.memory), checkpoint.xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
    return conn.lookupByName(etree.fromstring(checkpoint.xml.encode()).findtext("name"))
