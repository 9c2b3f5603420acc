"""The environment of a session as one typed, validated record.

``--ost-share`` (xdist workers attaching to one environment) and ``--ost-reuse``
(a later session attaching to kept VMs) exchange only this record, written as
JSON. Reading it checks that every name, address and path belongs to the run it
names, so a damaged or hostile file cannot point the plugin at objects that are
not that run's.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .owner import RUN_ID, Label

FIRST_VM_HOST = 10  # VMs get .10 - .99; .100 up is the dynamic DHCP range
LAST_VM_HOST = 99
VERSION = 2


def ipv6_subnet(subnet: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    """A ULA /64 made of an IPv4 subnet's address: unique wherever the IPv4 one is."""
    o = subnet.network_address.packed
    return ipaddress.IPv6Network(f"fd6f:7374:{o[0]:02x}{o[1]:02x}:{o[2]:02x}{o[3]:02x}::/64")


@dataclass(frozen=True)
class NetworkRecord:
    """The session's management network."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    domain: str
    versions: tuple[int, ...] = (4,)  # IP versions on it (IPv6: the ULA /64 made of `subnet`)


@dataclass(frozen=True)
class VMRecord:
    """One VM of the environment, as another process needs it to attach."""

    name: str  # libvirt domain
    role: str
    hostname: str
    ip: "ipaddress.IPv4Address | ipaddress.IPv6Address"  # the address the plugin reaches it at
    mac: str
    image: Path  # the layer's qcow2 file
    overlay: Path
    console: Path
    host_key: str = ""  # the pinned SSH host key, an OpenSSH public key line
    ip6: Optional[ipaddress.IPv6Address] = None


@dataclass(frozen=True)
class Environment:
    """A run's network and VMs, its owner, and the next free host number."""

    run_id: str
    owner: Label
    workdir: Path
    network: NetworkRecord
    vms: tuple[VMRecord, ...]
    next_host: int

    def to_json(self) -> str:
        net = self.network
        return json.dumps({
            "version": VERSION, "run_id": self.run_id, "owner": self.owner.to_dict(),
            "workdir": str(self.workdir), "next_host": self.next_host,
            "network": {"name": net.name, "bridge": net.bridge, "subnet": str(net.subnet),
                        "domain": net.domain, "versions": list(net.versions)},
            "vms": [{"name": vm.name, "role": vm.role, "hostname": vm.hostname, "ip": str(vm.ip),
                     "mac": vm.mac, "image": str(vm.image), "overlay": str(vm.overlay),
                     "console": str(vm.console), "host_key": vm.host_key,
                     "ip6": str(vm.ip6) if vm.ip6 else None} for vm in self.vms],
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
        workdir = workdir_root / run_id
        if Path(data["workdir"]) != workdir:
            raise ValueError(f"work directory {data['workdir']!r} is not {workdir}")
        net = data["network"]
        versions = tuple(net["versions"])
        if not versions or not set(versions) <= {4, 6}:
            raise ValueError(f"IP versions {versions!r} are not 4 and/or 6")
        network = NetworkRecord(_name(net["name"], f"ost-{run_id}"), _name(net["bridge"], f"ost-{run_id}"),
                                ipaddress.IPv4Network(net["subnet"]), str(net["domain"]), versions)
        subnet6 = ipv6_subnet(network.subnet)
        vms = []
        for v in data["vms"]:
            vm = VMRecord(_name(v["name"], f"ost-{run_id}-{v['role']}"), str(v["role"]), str(v["hostname"]),
                          ipaddress.ip_address(v["ip"]), str(v["mac"]), Path(v["image"]),
                          _inside(Path(v["overlay"]), workdir), _inside(Path(v["console"]), workdir),
                          _host_key(v.get("host_key", "")),
                          ipaddress.IPv6Address(v["ip6"]) if v.get("ip6") else None)
            for ip in (vm.ip, vm.ip6):
                if ip is not None and ip not in (network.subnet if ip.version == 4 else subnet6):
                    raise ValueError(f"VM {vm.name} has address {ip} outside the network's "
                                     f"{network.subnet} / {subnet6}")
            vms.append(vm)
        if len({vm.role for vm in vms}) != len(vms):
            raise ValueError("two VMs have the same role")
        next_host = data["next_host"]
        used = [int(vm.ip) - int((network.subnet if vm.ip.version == 4 else subnet6).network_address)
                for vm in vms]
        if not isinstance(next_host, int) or not (max(used, default=FIRST_VM_HOST - 1) < next_host
                                                  <= LAST_VM_HOST + 1):
            raise ValueError(f"next host number {next_host!r} is taken or out of range")
        return cls(run_id, owner, workdir, network, tuple(vms), next_host)


def _name(value: Any, expected: str) -> str:
    if value != expected:
        raise ValueError(f"name {value!r} is not {expected!r}")
    return expected


def _host_key(line: Any) -> str:
    if line and not (isinstance(line, str) and len(line.split()) >= 2):
        raise ValueError(f"host key {line!r} is not an OpenSSH public key line")
    return str(line)


def _inside(path: Path, workdir: Path) -> Path:
    if path.parent != workdir:
        raise ValueError(f"{path} is not in the run's work directory {workdir}")
    return path
