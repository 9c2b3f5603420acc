"""Step 3: libvirt XML for networks and domains, from templates, with lxml.

The templates in ``pytest_ostimages/templates/`` are complete, valid libvirt XML;
the plugin only sets the elements and attributes that differ per VM and session,
and a suite can replace either template with its own copy (``--ost-templates``).
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Sequence

from lxml import etree

from .errors import OstError
from .owner import METADATA_NS, Label

@dataclass(frozen=True)
class HostEntry:
    """A VM's place on the network: fixed MAC -> IP, and a DNS name."""

    name: str
    mac: str
    ip: ipaddress.IPv4Address


class Templates:
    """The network and domain templates: the packaged ones or a suite's own."""

    NAMES = ("network.xml", "domain.xml")

    def __init__(self, directory: Optional[Path] = None) -> None:
        self.directory = directory
        if directory is not None and not directory.is_dir():
            raise OstError(f"Template directory {directory} does not exist; it should hold "
                           f"network.xml and/or domain.xml (copies of the packaged ones).")

    def _source(self, name: str) -> tuple[str, bytes]:
        """Where template `name` comes from, and its bytes."""
        if self.directory is not None and (self.directory / name).is_file():
            return str(self.directory / name), (self.directory / name).read_bytes()
        return (f"pytest_ostimages/templates/{name}",
                resources.files("pytest_ostimages").joinpath("templates", name).read_bytes())

    def text(self, name: str) -> str:
        return self._source(name)[1].decode()

    def load(self, name: str) -> etree._Element:
        source, text = self._source(name)
        try:
            return etree.fromstring(text, etree.XMLParser(remove_comments=True, remove_blank_text=True))
        except etree.XMLSyntaxError as exc:
            raise OstError(f"Template {source} is not valid XML: {exc}. Fix it, or remove it "
                           f"to use the packaged template.") from None


def _child(parent: etree._Element, path: str) -> etree._Element:
    """The element at `path` below `parent`, created (with its parents) if missing."""
    node = parent
    for tag in path.split("/"):
        found = node.find(tag)
        node = found if found is not None else etree.SubElement(node, tag)
    return node


def _set_metadata(root: etree._Element, label: Label) -> None:
    metadata = _child(root, "metadata")
    for old in metadata.findall(f"{{{METADATA_NS}}}owner"):
        metadata.remove(old)
    metadata.append(label.element())
    # libvirt wants <metadata> right after <name>/<uuid>/<title>/<description>.
    root.remove(metadata)
    root.insert(1, metadata)


def _tostring(root: etree._Element) -> str:
    etree.cleanup_namespaces(root)
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def network_xml(
    template: etree._Element,
    *,
    name: str,
    bridge: str,
    subnet: ipaddress.IPv4Network,
    domain: str,
    hosts: Iterable[HostEntry],
    label: Label,
) -> str:
    root = copy.deepcopy(template)
    _child(root, "name").text = name
    _child(root, "bridge").set("name", bridge)
    _set_metadata(root, label)
    _child(root, "domain").set("name", domain)
    ip = _child(root, "ip")
    for attr in ("netmask", "prefix", "address"):
        if attr in ip.attrib:
            del ip.attrib[attr]
    ip.set("address", str(subnet.network_address + 1))
    ip.set("prefix", str(subnet.prefixlen))
    dhcp = _child(ip, "dhcp")
    rng = _child(dhcp, "range")
    # Reserved addresses are below the dynamic range: .10 - .99 for VMs.
    rng.set("start", str(subnet.network_address + 100))
    rng.set("end", str(subnet.broadcast_address - 1))
    dns = _child(root, "dns")
    for entry in hosts:
        etree.SubElement(dhcp, "host", mac=entry.mac, ip=str(entry.ip), name=entry.name)
        host = etree.SubElement(dns, "host", ip=str(entry.ip))
        etree.SubElement(host, "hostname").text = f"{entry.name}.{domain}"
        etree.SubElement(host, "hostname").text = entry.name
    return _tostring(root)


def dhcp_host_xml(entry: HostEntry) -> str:
    """A <host> for virNetworkUpdate of the DHCP section (VMs added later)."""
    return etree.tostring(etree.Element("host", mac=entry.mac, ip=str(entry.ip), name=entry.name),
                          encoding="unicode")


def dns_host_xml(entry: HostEntry, domain: str) -> str:
    """A <host> for virNetworkUpdate of the DNS section (VMs added later)."""
    host = etree.Element("host", ip=str(entry.ip))
    etree.SubElement(host, "hostname").text = f"{entry.name}.{domain}"
    etree.SubElement(host, "hostname").text = entry.name
    return etree.tostring(host, encoding="unicode")


def domain_xml(
    template: etree._Element,
    *,
    name: str,
    virt_type: str,
    cpu_mode: str,
    memory_mib: int,
    vcpus: int,
    disk: Path,
    backing: Sequence[tuple[Path, str]],
    network: str,
    mac: str,
    console_log: Path,
    label: Label,
    shares: Sequence[tuple[Path, str, Path]] = (),
    seed: Optional[Path] = None,
) -> str:
    """`backing` is the overlay's chain below it: (file, format), top first.

    `cpu_mode` "default" removes <cpu> and lets libvirt choose. `shares`: host
    folders for the guest as (folder, mount tag, virtiofsd binary), over virtiofs.
    `seed`: a cloud-init NoCloud ISO, attached read-only as a virtio disk.
    """
    root = copy.deepcopy(template)
    root.set("type", virt_type)
    _child(root, "name").text = name
    _set_metadata(root, label)
    memory = _child(root, "memory")
    memory.set("unit", "MiB")
    memory.text = str(memory_mib)
    current = root.find("currentMemory")
    if current is not None:
        root.remove(current)
    _child(root, "vcpu").text = str(vcpus)
    cpu = root.find("cpu")
    if cpu_mode == "default":
        if cpu is not None:
            root.remove(cpu)
    else:
        cpu = cpu if cpu is not None else etree.SubElement(root, "cpu")
        cpu.attrib.clear()
        cpu.set("mode", cpu_mode)
        for child in list(cpu):
            cpu.remove(child)
    devices = _child(root, "devices")
    disk_node = devices.find("disk[@device='disk']")
    if disk_node is None:
        raise OstError("The domain template has no <disk device='disk'> in <devices>; "
                       "the plugin puts the VM's overlay there.")
    disk_node.set("type", "file")
    _child(disk_node, "driver").set("type", "qcow2")
    source = _child(disk_node, "source")
    source.attrib.clear()
    source.set("file", str(disk))
    for old in disk_node.findall("backingStore"):
        disk_node.remove(old)
    parent = disk_node
    for path, fmt in backing:
        # The chain is spelled out so that libvirt leaves the installed images
        # alone: it would otherwise chown them to its qemu user for good.
        store = etree.SubElement(parent, "backingStore", type="file")
        etree.SubElement(store, "format", type=fmt)
        etree.SubElement(etree.SubElement(store, "source", file=str(path)), "seclabel",
                         model="dac", relabel="no")
        parent = store
    etree.SubElement(parent, "backingStore")
    iface = devices.find("interface")
    if iface is None:
        iface = etree.SubElement(devices, "interface")
    iface.set("type", "network")
    iface_source = _child(iface, "source")
    iface_source.attrib.clear()
    iface_source.set("network", network)
    _child(iface, "mac").set("address", mac)
    serial = devices.find("serial")
    if serial is None:
        serial = etree.SubElement(devices, "serial")
        _child(serial, "target").set("port", "0")
    serial.set("type", "file")
    _child(serial, "source").set("path", str(console_log))
    if shares:
        _add_virtiofs(root, devices, shares)
    if seed is not None:
        # virtio, not a CD-ROM: the images' kernels may have no IDE or AHCI driver
        seed_disk = etree.SubElement(devices, "disk", type="file", device="disk")
        etree.SubElement(seed_disk, "driver", name="qemu", type="raw")
        etree.SubElement(seed_disk, "source", file=str(seed))
        etree.SubElement(seed_disk, "target", dev="vdz", bus="virtio")
        etree.SubElement(seed_disk, "readonly")
    return _tostring(root)


def _add_virtiofs(root: etree._Element, devices: etree._Element,
                  shares: Sequence[tuple[Path, str, Path]]) -> None:
    """virtiofs needs guest memory that virtiofsd can map: shared memfd."""
    backing = _child(root, "memoryBacking")
    _child(backing, "source").set("type", "memfd")
    _child(backing, "access").set("mode", "shared")
    for folder, tag, binary in shares:
        # libvirt 9.0 refuses <readonly/> for virtiofs: the guest mounts it read-only
        fs = etree.SubElement(devices, "filesystem", type="mount", accessmode="passthrough")
        etree.SubElement(fs, "driver", type="virtiofs")
        etree.SubElement(fs, "binary", path=str(binary))
        etree.SubElement(fs, "source", dir=str(folder))
        etree.SubElement(fs, "target", dir=tag)
