"""The session's networks: the live value, each NIC's reservation, and a free /24 to make one in."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar

from ..errors import VirtError
from ..hypervisor.render import HostEntry
from ..hypervisor.subnets import free_subnet, host_networks, network_subnets
from ..state.environment import ipv4_subnet, ipv6_subnet
from ..hypervisor.host import LOCAL
from .inputs import MANAGEMENT

if TYPE_CHECKING:
    import libvirt

    from ..hypervisor.host import Host

T = TypeVar("T")


@dataclass(frozen=True)
class Network:
    """A network of the session: the management one (DNS, SSH) or another of an init-config."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network  # taken from the pool even IPv6-only: it makes the IPv6 prefix unique
    domain: str
    handle: "libvirt.virNetwork"
    role: str = MANAGEMENT.role
    versions: tuple[int, ...] = (4, 6)
    management: bool = True  # DNS names, the plugin's SSH

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def gateway6(self) -> Optional[ipaddress.IPv6Address]:
        return self.subnet6.network_address + 1 if self.subnet6 is not None else None

    @property
    def subnet6(self) -> Optional[ipaddress.IPv6Network]:
        return ipv6_subnet(self.subnet) if 6 in self.versions else None

    def entry(self, name: str, host: int) -> HostEntry:
        return entry(self.subnet, self.versions, name, host)


def entry(subnet: ipaddress.IPv4Network, versions: tuple[int, ...], name: str, host: int) -> HostEntry:
    """The reservation of host number `host`: a MAC made of its IPv4 address (unique on the
    host and easy to match in logs), the IPv4 and IPv6 addresses of that number."""
    ip = subnet.network_address + host
    o = ip.packed
    return HostEntry(name, f"52:54:00:{o[1]:02x}:{o[2]:02x}:{o[3]:02x}", ip if 4 in versions else None,
                     ipv6_subnet(subnet).network_address + host if 6 in versions else None)


def subnets_of(nics: "Sequence[tuple[str, HostEntry]]") -> dict[str, str]:
    """The /24 of each network role that NICs (role, reservation) are on (a session's networks are /24s; an
    IPv6-only one's /64 is made of its /24, ipv6_subnet)."""
    found = {}
    for role, entry in nics:
        if entry.ip is not None:
            found[role] = str(ipaddress.IPv4Network((entry.ip, 24), strict=False))
        elif entry.ip6 is not None:
            made_of = ipv4_subnet(ipaddress.IPv6Network((entry.ip6, 64), strict=False))
            found.update({role: str(made_of)} if made_of is not None else {})
    return found


def with_free_subnet(conn: "libvirt.virConnect", pool: ipaddress.IPv4Network,
                     create: Callable[[ipaddress.IPv4Network], T],
                     routes: Optional[Callable[[], list[ipaddress.IPv4Network]]] = None, host: "Host" = LOCAL,
                     prefer: Optional[ipaddress.IPv4Network] = None) -> T:
    """Run `create(subnet)` with a /24 of `pool` that no libvirt network, route or address of the
    hypervisor `host` uses (`routes` default: its routes and addresses), `prefer` if it is one.

    Under that hypervisor's host-wide "subnets" lock, held until `create` returns, so the next
    allocator (any session, any work directory, any client) sees the new network in libvirt.
    """
    with host.lock("subnets"):
        used = network_subnets(conn) + (routes() if routes is not None else host_networks(host))
        subnet = free_subnet(pool, used, prefer)
        if subnet is None:
            raise VirtError(
                f"No free /24 left in the subnet pool {pool}: every one overlaps a libvirt "
                f"network or a host route ({len(used)} in use). Remove leftover networks "
                f"(virsh net-list --all) or choose a larger pool with --ost-subnet-pool."
            )
        return create(subnet)
