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
from typing import Iterable, Optional, Protocol, Sequence

from lxml import etree

from ..errors import SessionError

DNSMASQ_NS = "http://libvirt.org/schemas/network/dnsmasq/1.0"  # libvirt's pass-through of dnsmasq options
OST_NS = "OST:metadata"  # what OST's ost_utils/backend/virsh reads (see docs/ost.md)
TEMPLATES = "pytest_ostimages.hypervisor"  # the package whose templates/ folder holds the packaged ones


class Label(Protocol):
    """What marks an object as a run's (state.owner.Label): one <metadata> element."""

    def element(self) -> etree._Element: ...


@dataclass(frozen=True)
class HostEntry:
    """A NIC's place on a network: fixed MAC -> IPv4 and/or IPv6 address, and a DNS name."""

    name: str
    mac: str
    ip: Optional[ipaddress.IPv4Address]
    ip6: Optional[ipaddress.IPv6Address] = None

    @property
    def duid(self) -> str:
        """The DHCPv6 client id of the NIC: DUID-LL (type 3, Ethernet) of its MAC, as OST writes it."""
        return "0:3:0:1:" + self.mac

    @property
    def addresses(self) -> "list[ipaddress.IPv4Address | ipaddress.IPv6Address]":
        return [ip for ip in (self.ip, self.ip6) if ip is not None]


@dataclass(frozen=True)
class OstMetadata:
    """OST's own metadata element, so that OST's ost_utils finds the session's objects."""

    working_dir: Path  # the deployment directory ($OST_DEPLOYMENT)
    network_role: Optional[str] = None  # networks
    deploy_scripts: tuple[str, ...] = ()  # domains

    def element(self) -> etree._Element:
        # OST's templates: the children carry no namespace (ost_utils looks them up so)
        root = etree.Element(f"{{{OST_NS}}}ost", nsmap={"ost": OST_NS})
        if self.network_role is not None:
            etree.SubElement(root, "ost-network-role", comment=self.network_role)
        etree.SubElement(root, "ost-working-dir", comment=str(self.working_dir))
        if self.network_role is None:
            scripts = etree.SubElement(root, "ost-deploy-scripts")
            for script in self.deploy_scripts:
                etree.SubElement(scripts, "script", name=script)
        return root


class Templates:
    """The network and domain templates: the packaged ones or a suite's own."""

    NAMES = ("network.xml", "domain.xml")

    def __init__(self, directory: Optional[Path] = None) -> None:
        self.directory = directory
        if directory is not None and not directory.is_dir():
            raise SessionError(f"Template directory {directory} does not exist; it should hold "
                           f"network.xml and/or domain.xml (copies of the packaged ones).")

    def _source(self, name: str) -> tuple[str, bytes]:
        """Where template `name` comes from, and its bytes."""
        if self.directory is not None and (self.directory / name).is_file():
            return str(self.directory / name), (self.directory / name).read_bytes()
        return (f"{TEMPLATES.replace('.', '/')}/templates/{name}",
                resources.files(TEMPLATES).joinpath("templates", name).read_bytes())

    def text(self, name: str) -> str:
        return self._source(name)[1].decode()

    def load(self, name: str) -> etree._Element:
        source, text = self._source(name)
        try:
            return etree.fromstring(text, etree.XMLParser(remove_comments=True, remove_blank_text=True))
        except etree.XMLSyntaxError as exc:
            raise SessionError(f"Template {source} is not valid XML: {exc}. Fix it, or remove it "
                           f"to use the packaged template.") from None


def _child(parent: etree._Element, path: str) -> etree._Element:
    """The element at `path` below `parent`, created (with its parents) if missing."""
    node = parent
    for tag in path.split("/"):
        found = node.find(tag)
        node = found if found is not None else etree.SubElement(node, tag)
    return node


def _set_metadata(root: etree._Element, label: Label, ost: Optional[OstMetadata] = None) -> None:
    metadata = _child(root, "metadata")
    owner = label.element()
    for old in [*metadata.findall(owner.tag), *metadata.findall(f"{{{OST_NS}}}ost")]:
        metadata.remove(old)
    metadata.append(owner)
    if ost is not None:
        metadata.append(ost.element())
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
    subnet: Optional[ipaddress.IPv4Network],
    domain: str,
    hosts: Iterable[HostEntry],
    label: Label,
    subnet6: Optional[ipaddress.IPv6Network] = None,
    dns: bool = True,
    ost: Optional[OstMetadata] = None,
    bridge_mac: Optional[str] = None,
) -> str:
    """`subnet` and/or `subnet6` (a /64): the network's IPv4 and IPv6 address ranges.

    Each host gets a DHCP reservation per family (DHCPv6 keyed on the DUID-LL of
    its MAC); with `dns` (the management network) also A and AAAA records. Leases
    never expire (unless the template's ranges say otherwise), and `bridge_mac` is
    the host's own MAC on it: a guest saved on a network of the same addresses and
    restored on this one finds the leases, neighbours and router it knew still
    valid (lab/warm.py keeps its NICs then).
    """
    root = copy.deepcopy(template)
    _child(root, "name").text = name
    _child(root, "bridge").set("name", bridge)
    if bridge_mac is not None:
        _child(root, "mac").set("address", bridge_mac)
    _set_metadata(root, label, ost)
    _child(root, "domain").set("name", domain)
    _dnsmasq_option(root, "no-hosts")  # the guests resolve the session's names, not the host's /etc/hosts
    template_ip = _child(root, "ip")
    for old in root.findall("ip"):
        root.remove(old)
    dns_node = _child(root, "dns")
    if not dns:
        dns_node.clear()
        dns_node.set("enable", "no")
    dhcp4 = dhcp6 = None
    if subnet is not None:
        dhcp4 = _ip(root, template_ip, subnet, rng=(subnet.network_address + 100, subnet.broadcast_address - 1))
    if subnet6 is not None:
        dhcp6 = _ip(root, template_ip, subnet6, rng=(subnet6.network_address + 0x100, subnet6.network_address + 0x1FF))
        if dns:
            # a DHCPv6 client writes the resolver from its own lease (Debian's dhclient-script replaces
            # resolv.conf): without the search domain there, short names stop resolving
            _dnsmasq_option(root, f"dhcp-option=option6:domain-search,{domain}")
    for entry in hosts:
        # Reserved addresses are below the dynamic range: host numbers 10 - 99.
        if dhcp4 is not None and entry.ip is not None:
            etree.SubElement(dhcp4, "host", mac=entry.mac, ip=str(entry.ip), name=entry.name)
        if dhcp6 is not None and entry.ip6 is not None:
            etree.SubElement(dhcp6, "host", id=entry.duid, ip=str(entry.ip6), name=entry.name)
        if dns:
            for ip in entry.addresses:
                dns_node.append(_dns_host(entry.name, domain, ip))
    return _tostring(root)


def _dnsmasq_option(root: etree._Element, value: str) -> None:
    options = root.find(f"{{{DNSMASQ_NS}}}options")
    if options is None:
        options = etree.SubElement(root, f"{{{DNSMASQ_NS}}}options", nsmap={"dnsmasq": DNSMASQ_NS})
    if not any(o.get("value") == value for o in options):
        etree.SubElement(options, f"{{{DNSMASQ_NS}}}option", value=value)


def _ip(root: etree._Element, template: etree._Element, subnet: ipaddress._BaseNetwork,
        rng: tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]) -> etree._Element:
    """An <ip> (from the template's first one) for `subnet`; returns its <dhcp>."""
    ip = copy.deepcopy(template)
    for attr in ("netmask", "prefix", "address", "family"):
        if attr in ip.attrib:
            del ip.attrib[attr]
    if subnet.version == 6:
        ip.set("family", "ipv6")
    ip.set("address", str(subnet.network_address + 1))
    if subnet.version == 4:  # OST's ost_utils reads an IPv4 <ip>'s netmask, not a prefix
        ip.set("netmask", str(subnet.netmask))
    else:
        ip.set("prefix", str(subnet.prefixlen))
    root.append(ip)
    dhcp = _child(ip, "dhcp")
    for host in dhcp.findall("host"):
        dhcp.remove(host)
    dynamic = _child(dhcp, "range")
    dynamic.set("start", str(rng[0]))
    dynamic.set("end", str(rng[1]))
    if dynamic.find("lease") is None:  # the reservations' too: a restored guest's clock jumps ahead
        etree.SubElement(dynamic, "lease", expiry="0")
    return dhcp


def _dns_host(name: str, domain: str, ip: ipaddress._BaseAddress) -> etree._Element:
    host = etree.Element("host", ip=str(ip))
    etree.SubElement(host, "hostname").text = f"{name}.{domain}"
    etree.SubElement(host, "hostname").text = name
    return host


def dhcp_host_xml(entry: HostEntry, version: int) -> str:
    """A <host> for virNetworkUpdate of a DHCP section (VMs added later)."""
    host = etree.Element("host")
    if version == 4:
        host.set("mac", entry.mac)
    else:
        host.set("id", entry.duid)
    host.set("ip", str(entry.ip if version == 4 else entry.ip6))
    host.set("name", entry.name)
    return etree.tostring(host, encoding="unicode")


def dns_host_xml(entry: HostEntry, domain: str, ip: ipaddress._BaseAddress) -> str:
    """A <host> for virNetworkUpdate of the DNS section (VMs added later)."""
    return etree.tostring(_dns_host(entry.name, domain, ip), encoding="unicode")


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
    nics: Sequence[tuple[str, str]],
    console_log: Path,
    label: Label,
    shares: Sequence[tuple[Path, str, Path]] = (),
    seed: Optional[Path] = None,
    disks: Sequence[tuple[Path, str, str]] = (),
    ost: Optional[OstMetadata] = None,
    firmware: str = "bios",
    secure_boot: bool = False,
    nvram: Optional[Path] = None,
) -> str:
    """`backing` is the overlay's chain below it: (file, format), top first.

    `firmware` "efi": libvirt's firmware auto-selection, with or without Secure Boot, the
    variables in `nvram`; "bios": the template's (SeaBIOS). A template's own <loader> is
    left alone. On a q35 machine NIC N gets PCIe root port N of its own, so that the
    guest names it ``enpNs0`` (``ethN-1`` with ``net.ifnames=0``).

    `nics`: (network, MAC) of eth0, eth1, ..., each a copy of the template's
    first <interface>. `disks`: extra qcow2 disks (file, target dev, serial) on
    virtio-scsi, as OST attaches them.

    `cpu_mode` "default" removes <cpu> and lets libvirt choose. `shares`: host
    folders for the guest as (folder, mount tag, virtiofsd binary), over virtiofs.
    `seed`: a cloud-init NoCloud ISO, attached read-only as a virtio disk.
    """
    root = copy.deepcopy(template)
    root.set("type", virt_type)
    _child(root, "name").text = name
    _set_metadata(root, label, ost)
    q35 = _set_firmware(root, firmware, secure_boot, nvram)
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
        raise SessionError("The domain template has no <disk device='disk'> in <devices>; "
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
    _set_nics(devices, nics, q35)
    serial = devices.find("serial")
    if serial is None:
        serial = etree.SubElement(devices, "serial")
        _child(serial, "target").set("port", "0")
    serial.set("type", "file")
    _child(serial, "source").set("path", str(console_log))
    if disks:
        _add_scsi_disks(devices, disks)
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


def _set_firmware(root: etree._Element, firmware: str, secure_boot: bool, nvram: Optional[Path]) -> bool:
    """The <os> for `firmware`; True for a q35 machine."""
    os_node = _child(root, "os")
    machine = (os_node.find("type").get("machine", "") if os_node.find("type") is not None else "")
    q35 = "q35" in machine
    if os_node.find("loader") is not None:  # the template chose its firmware itself
        return q35
    for old in os_node.findall("firmware") + os_node.findall("nvram"):
        os_node.remove(old)
    if firmware != "efi":
        os_node.attrib.pop("firmware", None)
        return q35
    if secure_boot and not q35:
        raise SessionError(f"Secure Boot (--ost-secure-boot) needs a q35 machine; the domain template's "
                       f"is {machine or 'not set'}. Use machine='q35' in it, or --ost-secure-boot=off.")
    os_node.set("firmware", "efi")
    for bios in os_node.findall("bios"):  # SeaBIOS's
        os_node.remove(bios)
    features = etree.SubElement(os_node, "firmware")
    etree.SubElement(features, "feature", enabled="yes" if secure_boot else "no", name="secure-boot")
    if secure_boot:
        etree.SubElement(features, "feature", enabled="yes", name="enrolled-keys")
        _child(root, "features/smm").set("state", "on")
    if nvram is not None:
        etree.SubElement(os_node, "nvram").text = str(nvram)
    return q35


def _set_nics(devices: etree._Element, nics: Sequence[tuple[str, str]], q35: bool = False) -> None:
    template = devices.find("interface")
    if template is None:
        template = etree.SubElement(devices, "interface")
    place = list(devices).index(template)
    for old in devices.findall("interface"):
        devices.remove(old)
    for offset, (network, mac) in enumerate(nics):
        iface = copy.deepcopy(template)
        iface.set("type", "network")
        source = _child(iface, "source")
        source.attrib.clear()
        source.set("network", network)
        _child(iface, "mac").set("address", mac)
        for old in iface.findall("address"):
            iface.remove(old)
        if q35:  # NIC N alone on root port N: bus N, so the guest names it enpNs0
            bus = offset + 1
            if devices.find(f"controller[@type='pci'][@index='{bus}']") is None:
                etree.SubElement(devices, "controller", type="pci", index=str(bus), model="pcie-root-port")
            etree.SubElement(iface, "address", type="pci", domain="0x0000", bus=f"0x{bus:02x}", slot="0x00",
                             function="0x0")
        devices.insert(place + offset, iface)


def _add_scsi_disks(devices: etree._Element, disks: Sequence[tuple[Path, str, str]]) -> None:
    if devices.find("controller[@type='scsi']") is None:
        etree.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for path, target, serial in disks:
        disk = etree.SubElement(devices, "disk", type="file", device="disk")
        etree.SubElement(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
        etree.SubElement(disk, "source", file=str(path))
        etree.SubElement(disk, "target", dev=target, bus="scsi")
        etree.SubElement(disk, "serial").text = serial


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
