"""The environment of a session as one typed, validated record.

``--ost-share`` (xdist workers attaching to one environment) and ``--ost-reuse``
(a later session attaching to kept VMs) exchange only this record, written as
JSON: every network (an OST suite's init-config may have several) and every VM
with all its NICs. Reading it checks that every name, address and path belongs
to the run it names, so a damaged or hostile file cannot point the plugin at
objects that are not that run's.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..config import SUITE_NAME
from .owner import RUN_ID, Label
from ..hypervisor.render import HostEntry

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath

FIRST_VM_HOST = 10  # VMs get .10 - .99; .100 up is the dynamic DHCP range
LAST_VM_HOST = 99
VERSION = 3


ULA = ipaddress.IPv6Network("fd6f:7374::/32")  # the sessions' IPv6 /64s: fd6f:7374:AABB:CC00::/64 for A.B.C.0/24


def ipv6_subnet(subnet: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    """A ULA /64 made of an IPv4 subnet's address: unique wherever the IPv4 one is."""
    o = subnet.network_address.packed
    return ipaddress.IPv6Network(f"fd6f:7374:{o[0]:02x}{o[1]:02x}:{o[2]:02x}{o[3]:02x}::/64")


def ipv4_subnet(subnet6: ipaddress.IPv6Network) -> Optional[ipaddress.IPv4Network]:
    """The /24 a /64 of ipv6_subnet's was made of (None for any other IPv6 network)."""
    if subnet6.prefixlen != 64 or not subnet6.subnet_of(ULA):
        return None
    return ipaddress.IPv4Network((subnet6.network_address.packed[4:8], 24))


def vm_names(run_id: str, role: str, suite: Optional[str] = None) -> tuple[str, str]:
    """The libvirt domain name and the short host name of VM `role`; an OST suite's are
    what OST's ost_utils expects: ``<run8>-ost-<suite>-<vm>`` and ``ost-<suite>-<vm>``."""
    if suite is not None:
        return f"{run_id}-ost-{suite}-{role}", f"ost-{suite}-{role}"
    return f"ost-{run_id}-{role}", role


def network_name(run_id: str, index: int, management: bool) -> str:
    """The name (and bridge) of the session's network number `index` (at most 15 characters)."""
    return f"ost-{run_id}" if management else f"ost-{run_id}-{index}"


@dataclass(frozen=True)
class NetworkRecord:
    """A network of the session, in the order of its topology (which numbers the names)."""

    name: str
    subnet: ipaddress.IPv4Network
    domain: str
    versions: tuple[int, ...] = (4,)  # IP versions on it (IPv6: the ULA /64 made of `subnet`)
    role: str = "management"
    management: bool = True
    next_host: int = FIRST_VM_HOST  # the next free host number on it

    def holds(self, ip: "ipaddress.IPv4Address | ipaddress.IPv6Address") -> bool:
        return ip in self._subnet(ip.version)

    def host_number(self, ip: "ipaddress.IPv4Address | ipaddress.IPv6Address") -> int:
        return int(ip) - int(self._subnet(ip.version).network_address)

    def _subnet(self, version: int) -> "ipaddress.IPv4Network | ipaddress.IPv6Network":
        return self.subnet if version == 4 else ipv6_subnet(self.subnet)


@dataclass(frozen=True)
class VMRecord:
    """One VM of the environment, as another process needs it to attach."""

    name: str  # libvirt domain
    role: str
    hostname: str
    ip: "ipaddress.IPv4Address | ipaddress.IPv6Address"  # the address the plugin reaches it at
    image: Path  # the layer's qcow2 file
    overlay: Path
    console: Path
    nics: tuple[tuple[str, HostEntry], ...]  # (network role, reservation) of eth0, eth1, ...
    host_key: str = ""  # the pinned SSH host key, an OpenSSH public key line


@dataclass(frozen=True)
class Environment:
    """A run's networks and VMs, and its owner."""

    run_id: str
    owner: Label
    workdir: "AnyPath"  # on the hypervisor
    networks: tuple[NetworkRecord, ...]  # the management network among them
    vms: tuple[VMRecord, ...]
    suite: Optional[str] = None  # an OST suite's (--ost-init-config): it names the VMs

    def to_json(self) -> str:
        return json.dumps({
            "version": VERSION, "run_id": self.run_id, "owner": self.owner.to_dict(),
            "workdir": str(self.workdir), "suite": self.suite,
            "networks": [{"name": net.name, "subnet": str(net.subnet), "domain": net.domain,
                          "versions": list(net.versions), "role": net.role, "management": net.management,
                          "next_host": net.next_host} for net in self.networks],
            "vms": [{"name": vm.name, "role": vm.role, "hostname": vm.hostname, "ip": str(vm.ip),
                     "image": str(vm.image), "overlay": str(vm.overlay), "console": str(vm.console),
                     "host_key": vm.host_key,
                     "nics": [{"network": role, "name": e.name, "mac": e.mac,
                               "ip": str(e.ip) if e.ip else None, "ip6": str(e.ip6) if e.ip6 else None}
                              for role, e in vm.nics]} for vm in self.vms],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, workdir_root: Path) -> "Environment":
        """Parse and validate; ValueError says what is wrong."""
        try:
            data = json.loads(text)
            return cls._validated(data, workdir_root)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"missing or mistyped field: {exc}") from None

    @classmethod
    def _validated(cls, data: dict[str, Any], workdir_root: Path) -> "Environment":
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
        run_id = data["run_id"]
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} is not 8 hex digits")
        owner = Label.from_dict(data["owner"])
        if owner.run_id != run_id:
            raise ValueError(f"the owner label is of run {owner.run_id!r}, not {run_id!r}")
        workdir = workdir_root / run_id  # on the hypervisor (hypervisor/host.py): compared as text
        if str(data["workdir"]) != str(workdir):
            raise ValueError(f"work directory {data['workdir']!r} is not {workdir}")
        suite = data["suite"]
        if suite is not None and not (isinstance(suite, str) and SUITE_NAME.fullmatch(suite)):
            raise ValueError(f"suite name {suite!r} is not a plain name")
        networks = {}
        for index, net in enumerate(data["networks"]):
            versions = tuple(net["versions"])
            if not versions or not set(versions) <= {4, 6}:
                raise ValueError(f"IP versions {versions!r} are not 4 and/or 6")
            management = net["management"] is True
            network = NetworkRecord(_name(net["name"], network_name(run_id, index, management)),
                                    ipaddress.IPv4Network(net["subnet"]), str(net["domain"]), versions,
                                    str(net["role"]), management, net["next_host"])
            if network.role in networks:
                raise ValueError(f"two networks have the role {network.role!r}")
            networks[network.role] = network
        if [n.management for n in networks.values()].count(True) != 1:
            raise ValueError("not exactly one management network")
        vms = [_vm(v, run_id, suite, workdir, networks) for v in data["vms"]]
        if len({vm.role for vm in vms}) != len(vms):
            raise ValueError("two VMs have the same role")
        for network in networks.values():
            used = [network.host_number(ip) for vm in vms for role, entry in vm.nics if role == network.role
                    for ip in entry.addresses]
            if not (isinstance(network.next_host, int)
                    and max(used, default=FIRST_VM_HOST - 1) < network.next_host <= LAST_VM_HOST + 1):
                raise ValueError(f"next host number {network.next_host!r} of network {network.name} "
                                 f"is taken or out of range")
        return cls(run_id, owner, workdir, tuple(networks.values()), tuple(vms), suite)


def _vm(v: dict[str, Any], run_id: str, suite: Optional[str], workdir: Path,
        networks: dict[str, NetworkRecord]) -> VMRecord:
    nics = []
    for nic in v["nics"]:
        network = networks[nic["network"]]  # KeyError: a NIC on a network the record lacks
        entry = HostEntry(str(nic["name"]), str(nic["mac"]),
                          ipaddress.IPv4Address(nic["ip"]) if nic["ip"] else None,
                          ipaddress.IPv6Address(nic["ip6"]) if nic["ip6"] else None)
        for ip in entry.addresses:
            if not network.holds(ip):
                raise ValueError(f"VM {v['name']} has address {ip} outside network {network.name}")
        nics.append((network.role, entry))
    vm = VMRecord(_name(v["name"], vm_names(run_id, str(v["role"]), suite)[0]), str(v["role"]),
                  str(v["hostname"]), ipaddress.ip_address(v["ip"]), Path(v["image"]),
                  _inside(Path(v["overlay"]), workdir), _inside(Path(v["console"]), workdir),
                  tuple(nics), _host_key(v["host_key"]))
    management = next(n.role for n in networks.values() if n.management)
    if not any(role == management and vm.ip in entry.addresses for role, entry in vm.nics):
        raise ValueError(f"VM {vm.name} is reached at {vm.ip}, which none of its NICs on the "
                         f"management network has")
    return vm


def _name(value: Any, expected: str) -> str:
    if value != expected:
        raise ValueError(f"name {value!r} is not {expected!r}")
    return expected


def _host_key(line: Any) -> str:
    if line and not (isinstance(line, str) and len(line.split()) >= 2):
        raise ValueError(f"host key {line!r} is not an OpenSSH public key line")
    return str(line)


def _inside(path: Path, workdir: "AnyPath") -> "AnyPath":
    if str(path.parent) != str(workdir):
        raise ValueError(f"{path} is not in the run's work directory {workdir}")
    return workdir / path.name
