"""The guest side of a VM's networking: commands that move it to new addresses."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from ..hypervisor.render import HostEntry


@dataclass(frozen=True)
class Addressing:
    """What a guest needs to know of a network to set its reserved addresses itself."""

    prefix: int
    gateway: ipaddress.IPv4Address
    domain: str
    prefix6: Optional[int] = None
    gateway6: Optional[ipaddress.IPv6Address] = None


def guest_network(entry: HostEntry, network: Addressing) -> str:
    """The guest side of moving to the new NIC on `network` (the management one), for the guest agent.

    NetworkManager (ost-images): a new DHCP connection. ifupdown: the reserved
    addresses, route and resolver are set at once, and FRESH_LEASES, run last,
    takes new leases in the background. The old leases belonged to a NIC and a
    network that are gone: they are forgotten (asking for them again costs a NAK
    and a round trip).
    """
    commands = ["pkill -x dhclient", "rm -f /var/lib/dhcp/dhclient.eth0.leases /var/lib/dhcp/dhclient6.eth0.leases",
                "ip addr flush dev eth0 scope global"]
    nameservers: "list[ipaddress.IPv4Address | ipaddress.IPv6Address]" = []
    if entry.ip is not None:
        commands += [f"ip addr add {entry.ip}/{network.prefix} brd + dev eth0",
                     f"ip route replace default via {network.gateway} dev eth0"]
        nameservers.append(network.gateway)
    if entry.ip6 is not None and network.prefix6 is not None and network.gateway6 is not None:
        # with a lifetime: dhclient -6 starts by flushing the permanent global addresses
        commands.append(f"ip -6 addr add {entry.ip6}/{network.prefix6} dev eth0 nodad "
                        f"valid_lft 3600 preferred_lft 3600")
        nameservers.append(network.gateway6)
    resolv = "\\n".join([f"search {network.domain}", f"nameserver {nameservers[0]}"])
    commands.append(f"printf '{resolv}\\n' >/etc/resolv.conf")
    return f"if command -v nmcli >/dev/null; then nmcli device connect eth0; else {'; '.join(commands)}; fi"


# New leases (IPv4 and DHCPv6) in the background, last: the guest has its addresses already, and
# dhclient-script, with no old lease to drop, only confirms them.
FRESH_LEASES = "command -v nmcli >/dev/null || (ifup --force eth0 </dev/null >/dev/null 2>&1 &)"
