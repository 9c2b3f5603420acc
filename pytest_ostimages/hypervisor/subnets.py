"""Which /24 of the pool is free: not used by any libvirt network, route or address of this host."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lxml import etree

from ..errors import SessionError
from ..state.environment import ipv4_subnet
from .connection import libvirt_error
from .host import LOCAL

MISSING_IP = ("The ip command is not installed; the plugin needs it to find the subnets this host uses (routes and "
              "addresses) before it makes a network. Install iproute2 (Debian) or iproute (EL, Fedora).")

if TYPE_CHECKING:
    import libvirt

    from .host import AnyPath, Host


def host_networks(host: "Host" = LOCAL) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks the hypervisor's network namespace uses: routes of every routing table
    (policy routing, as VPN clients and container runtimes install, is not in the main table) and
    the subnet of every address on any interface. From ``ip -j``; /proc/net/route without it."""
    try:
        routes = _ip_json(host, "-4", "route", "show", "table", "all")
        addresses = _ip_json(host, "-4", "addr", "show")
    except FileNotFoundError:
        raise SessionError(MISSING_IP) from None
    except (OSError, subprocess.CalledProcessError, ValueError):  # an ip without -j: the main table at least
        return host_routes(host.path("/proc/net/route"))
    used = [ipaddress.IPv4Network(route["dst"] if "/" in route["dst"] else f"{route['dst']}/32", strict=False)
            for route in routes if route.get("dst") not in (None, "default")]
    used += [ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
             for interface in addresses for info in interface.get("addr_info", []) if "local" in info]
    # 127/8 is on every host and never a libvirt network's (libvirt's test driver takes test pools there)
    return [network for network in used if not network.is_loopback]


def _ip_json(host: "Host", *args: str) -> list[dict]:
    done = host.run(["ip", "-j", *args])
    if done.returncode == 127:  # a hypervisor's shell: command not found
        raise FileNotFoundError("ip")
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.argv, done.stdout, done.stderr)
    return json.loads(done.stdout or b"[]")


def host_routes(route_file: "AnyPath" = Path("/proc/net/route")) -> list[ipaddress.IPv4Network]:
    """The IPv4 routes of this network namespace's main table (connected subnets included)."""
    routes: list[ipaddress.IPv4Network] = []
    try:
        lines = route_file.read_text().splitlines()[1:]
    except OSError:
        return routes
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        dest, mask = (socket.inet_ntoa(struct.pack("<I", int(f, 16))) for f in (fields[1], fields[7]))
        if dest != "0.0.0.0":
            routes.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return routes


def network_subnets(conn: "libvirt.virConnect") -> list[ipaddress.IPv4Network]:
    """The IPv4 subnets of every libvirt network, active or not; for an IPv6 /64 of ours (an
    IPv6-only session's network has no IPv4 one), the /24 it was made of: a session that took
    that /24 would make the same /64, and the host would route it to one of the two bridges."""
    subnets = []
    for net in conn.listAllNetworks():
        with contextlib.suppress(libvirt_error()):  # removed meanwhile
            for ip in etree.fromstring(net.XMLDesc().encode()).findall("ip"):
                if not ip.get("address"):
                    continue
                if ip.get("family", "ipv4") == "ipv6":
                    made_of = ipv4_subnet(ipaddress.IPv6Network(f"{ip.get('address')}/{ip.get('prefix') or '64'}",
                                                                strict=False))
                    subnets += [made_of] if made_of else []
                    continue
                suffix = ip.get("prefix") or ip.get("netmask") or "24"
                subnets.append(ipaddress.IPv4Network(f"{ip.get('address')}/{suffix}", strict=False))
    return subnets


def free_subnet(pool: ipaddress.IPv4Network, used: list[ipaddress.IPv4Network],
                prefer: Optional[ipaddress.IPv4Network] = None) -> Optional[ipaddress.IPv4Network]:
    """The first /24 of `pool` that overlaps nothing `used`; `prefer` if it is such a /24."""
    preferred = [prefer] if prefer is not None and prefer.prefixlen == 24 and prefer.subnet_of(pool) else []
    for candidate in [*preferred, *pool.subnets(new_prefix=24)]:
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    return None
