"""The guest side of a VM's networking: commands that move a restored guest to this session's networks,
and the wait until a guest holds its addresses and resolves the session's names (network_wait_script).

A restored guest wakes up with NICs that have new MACs (the old ones belonged to
another session's networks). Each NIC is found by its MAC, never by a name: the
older ost-images call the first one ``eth0``, kiwi-built ones ``enp1s0``. It gets
its reserved addresses at once (so that SSH answers on them right away), the
management NIC the default route and the resolver. Where NetworkManager runs
(ost-images), it takes each new NIC's fresh leases as it activates the NIC's profile,
before the reserved addresses go on; elsewhere ifupdown and dhclient take them in the
background afterwards. The old leases are forgotten: asking for them again costs
a NAK and a round trip. The guest is handed over once those clients are bound
(FRESH_LEASES_BOUND): Debian's dhclient-script rewrites /etc/resolv.conf in place as
it binds, and a lookup in between finds no resolver.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..hypervisor.render import HostEntry

# written by the background part of move_to once the DHCP clients it started are bound (or have had
# FRESH_LEASES_WAIT s); a saved state may hold one from an earlier restore, so the first part removes it
FRESH_LEASES_MARK = "/run/pytest-ostimages.fresh-leases"
FRESH_LEASES_WAIT = 20
LEASES_DIR = "/var/lib/dhcp"  # Debian's dhclient, as ifupdown runs it
FRESH_LEASES_BOUND = f'[ -e {FRESH_LEASES_MARK} ] || echo "fresh DHCP leases: its DHCP clients are not bound yet"'

# ost_nic: name of the NIC with MAC $1, once udev has named it (a hot-plugged NIC is renamed, e.g. eth0 -> enp1s0)
GUEST_FUNCTIONS = """ost_nic() {
    for i in $(seq 50); do
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] || continue
            udevadm settle -t 5 2>/dev/null
            for e in /sys/class/net/*; do [ "$(cat "$e/address" 2>/dev/null)" = "$1" ] && { echo "${e##*/}"; return 0; }; done
        done
        sleep 0.1
    done
    echo "no NIC with MAC $1" >&2
    return 1
}
# give NIC $1 address $2 (and, for the management NIC, the default route via $3): the link up
# first (a hot-plugged NIC that no ifupdown stanza names stays down: "Nexthop has invalid
# gateway"), and again while its own DHCP client (ifupdown's allow-hotplug) flushes it
ost_address() {
    for i in $(seq 50); do
        { ip link set dev "$1" up && ip addr replace "$2" brd + dev "$1" &&
            { [ -z "$3" ] || ip route replace default via "$3" dev "$1"; }; } 2>/dev/null && return 0
        sleep 0.1
    done
    ip link set dev "$1" up && ip addr replace "$2" brd + dev "$1" &&
        { [ -z "$3" ] || ip route replace default via "$3" dev "$1"; } && return 0
    ip -br addr show dev "$1" >&2  # what it has, for the error
    return 1
}
# wait until NetworkManager has activated NIC $1: it autoconnects a new NIC's profile by itself and
# flushes the NIC's addresses as it does, so the reserved ones go on after that (and no later
# "nmcli device connect", which would flush them again); connect it if it has not within
# $nm_wait s; fails (ifupdown's then) if NetworkManager does not manage it
nm_wait=15
ost_nm_up() {
    end=$(($(date +%s) + nm_wait)); path=
    while [ "$(date +%s)" -lt "$end" ]; do
        [ -n "$path" ] || path=$(ost_nm_path "$1")  # once NetworkManager knows the NIC, it keeps its path
        [ "$(ost_nm_state "$1" "$path")" = 100 ] && return 0
        sleep 0.2
    done
    case "$(ost_nm_state "$1" "$path")" in 10|"") return 1 ;; esac  # unmanaged
    nmcli --wait 30 device connect "$1" >/dev/null
}
# NetworkManager's D-Bus object of NIC $1 (nothing if it does not know it, or there is no busctl)
ost_nm_path() {
    command -v busctl >/dev/null || return 0
    busctl --auto-start=no --timeout=5 call org.freedesktop.NetworkManager /org/freedesktop/NetworkManager \
        org.freedesktop.NetworkManager GetDeviceByIpIface s "$1" 2>/dev/null | cut -d'"' -f2
}
# NetworkManager's state of NIC $1 (100 activated, 10 unmanaged; nothing if it does not know it),
# asked over D-Bus with busctl at its object $2 (ost_nm_path's; empty: not known yet): nmcli loads
# NetworkManager's every object first, 0.4 s of a TCG guest's CPU a call (busctl: 0.08 s), taken
# from NetworkManager's own activation of the NIC
ost_nm_state() {
    if ! command -v busctl >/dev/null; then
        nmcli -g GENERAL.STATE device show "$1" 2>/dev/null | cut -d" " -f1
        return 0
    fi
    [ -n "$2" ] || return 0
    busctl --auto-start=no --timeout=5 get-property org.freedesktop.NetworkManager "$2" \
        org.freedesktop.NetworkManager.Device State 2>/dev/null | cut -d" " -f2
}
# make ifupdown forget that NIC $1 is up without running its stanza's down commands: each one's
# "dhclient -x" costs a second of guest CPU under TCG, and the clients were stopped already (any
# a hot-plug ifup started is stopped here, after ifupdown's lock on the NIC let this through).
# ifdown of a NIC the (empty) interfaces file does not define only drops its state; a full
# ifdown if that ever leaves the NIC marked up.
ost_ifupdown_forget() {
    ifdown --force -i /dev/null "$1" >/dev/null 2>&1 || true
    ! ifquery --state "$1" >/dev/null 2>&1 || ifdown --force "$1" >/dev/null 2>&1 || true
    pkill -x dhclient || true
}
if ! command -v nmcli >/dev/null; then nm=
elif ! command -v busctl >/dev/null; then nmcli -t -f RUNNING general 2>/dev/null | grep -qx running && nm=1 || nm=
else busctl --auto-start=no --timeout=5 get-property org.freedesktop.NetworkManager /org/freedesktop/NetworkManager \
    org.freedesktop.NetworkManager Version >/dev/null 2>&1 && nm=1 || nm=
fi"""


@dataclass(frozen=True)
class Addressing:
    """What a guest needs to know of a network to set its reserved addresses itself."""

    prefix: int
    gateway: ipaddress.IPv4Address
    domain: str
    prefix6: Optional[int] = None
    gateway6: Optional[ipaddress.IPv6Address] = None


@dataclass(frozen=True)
class GuestNIC:
    """One NIC of a guest: its reservation on a network, and whether it is the management one."""

    entry: HostEntry
    network: Addressing
    management: bool = False


def move_to(nics: Sequence[GuestNIC]) -> tuple[str, str]:
    """(commands that give every NIC its reserved addresses now, commands that take fresh leases in
    the background), for the guest agent; run the first before the guest's identity, the second after."""
    now = [GUEST_FUNCTIONS, "set -e", f"rm -f {FRESH_LEASES_MARK}", '[ -n "$nm" ] || pkill -x dhclient || true']
    later, failed = [], []
    for number, nic in enumerate(nics):
        entry, network, var = nic.entry, nic.network, f"n{number}"
        # NetworkManager's fresh leases are the reservations. With ifupdown, the NIC is marked down
        # (one "ifup" later, not two: a second dhclient replacing the first removes its addresses, the
        # reserved ones) and a DHCP client that a hot-plug ifup may have started on it is stopped,
        # and the old leases go, with their addresses
        now += [f"{var}=$(ost_nic {entry.mac})",
                f'if [ -n "$nm" ] && ost_nm_up "${var}"; then m{number}=1; else m{number}=',
                f'    ost_ifupdown_forget "${var}"',
                f'    rm -f {LEASES_DIR}/dhclient.${var}.leases {LEASES_DIR}/dhclient6.${var}.leases',
                f'    ip addr flush dev "${var}" scope global',
                'fi']
        if entry.ip is not None:
            gateway = network.gateway if nic.management else ""
            now.append(f'ost_address "${var}" {entry.ip}/{network.prefix} "{gateway}"')
        if entry.ip6 is not None and network.prefix6 is not None:
            # with a lifetime: dhclient -6 starts by flushing the permanent global addresses
            now.append(f'ip -6 addr replace {entry.ip6}/{network.prefix6} dev "${var}" nodad valid_lft 3600 '
                       f'preferred_lft 3600')
        if nic.management:
            nameserver = network.gateway if entry.ip is not None else network.gateway6
            now.append(f"printf 'search {network.domain}\\nnameserver {nameserver}\\n' >/etc/resolv.conf")
        # without NetworkManager (which has its leases already), ifupdown's stanza for the NIC takes them,
        # unless a hot-plug ifup did meanwhile (ifupdown serialises the two; the second does nothing);
        # every NIC's at once (ifupdown locks each NIC on its own): their DHCP exchanges overlap
        later.append(f'{{ [ -n "$m{number}" ] || ifup "${var}"; }} &')
        failed.append(f'[ -n "$m{number}" ] || ifquery --state "${var}" >/dev/null 2>&1 || m{number}=failed')
    later += ["wait", *failed]  # a NIC whose ifup failed gets no lease: not waited for
    later.append(f"end=$(($(date +%s) + {FRESH_LEASES_WAIT})); settled=0; "
                 f'while [ "$settled" -lt 2 ] && [ "$(date +%s)" -lt "$end" ]; do '
                 f"if {leases_bound(nics)}; then settled=$((settled + 1)); else settled=0; fi; sleep 0.2; done; "
                 f"touch {FRESH_LEASES_MARK}")
    fresh = "(\n{}\n) </dev/null >/dev/null 2>&1 &".format("\n".join(later))
    return "\n".join(now), fresh


def restore_script(nics: Sequence[GuestNIC], identity: str = "") -> Callable[[bool], str]:
    """What a restored guest runs through its agent (lab/warm.py), `identity` (identity.py) included,
    given whether it kept its NICs: with the saved MACs, and so the saved addresses, its leases are
    this network's (FRESH_LEASES_BOUND holds at once); else it moves to its reserved ones (move_to)."""

    def script(kept: bool) -> str:
        if kept:
            return "\n".join([f"rm -f {FRESH_LEASES_MARK}", identity, f"touch {FRESH_LEASES_MARK}"])
        addresses, fresh_leases = move_to(nics)
        return f"{addresses}\n{identity}\n{fresh_leases}"

    return script


def leases_bound(nics: Sequence[GuestNIC]) -> str:
    """Shell condition: the DHCP clients that move_to's ifups started are bound. ifupdown's dhclient
    has written each lease of a NIC ifupdown brought up ($mN empty), just before its script runs,
    and no dhclient-script runs (asked twice in a row by the caller)."""
    leases = [f'{{ [ -n "$m{number}" ] || [ -s {LEASES_DIR}/dhclient{v}.$n{number}.leases ]; }}'
              for number, nic in enumerate(nics)
              for v, ip in (("", nic.entry.ip), ("6", nic.entry.ip6)) if ip is not None]
    return " && ".join(leases + ["! pgrep -x dhclient-script >/dev/null"])


def network_wait_script(ip6: Optional[ipaddress.IPv6Address],
                        names: dict[str, list["ipaddress.IPv4Address | ipaddress.IPv6Address"]],
                        timeout: float, also: Sequence[str] = ()) -> str:
    """A guest script that waits up to `timeout` s until the guest holds `ip6` (if given) and passes the
    shell checks `also` (each prints what it misses), then up to `timeout` s more until it has resolved
    each of `names` over DNS (not /etc/hosts) to each of its addresses, once. It exits 1 printing what
    is still missing then (a name with what the resolver answered). The names are looked up once the
    other checks pass (the DHCP clients that rewrite the resolver are bound by then) and have a
    deadline of their own: a guest slow to bind its leases is handed over late, not refused. A lookup
    gets only the time left: with no answer from a resolver, getent retries for up to 10 s."""
    checks = ([f'ip -o addr show to {ip6} | grep -q . || echo "address {ip6}"'] if ip6 is not None else [])
    checks += also
    lookups, numbers = [], []
    # deadlines in ms (`date +%s` would end a wait of N s anywhere from N-1 to N s after it starts, as the
    # second it starts in is already under way); each lookup gets the time left when it starts, 1 s at least
    left = ('left=$((end - $(ost_ms))); [ "$left" -ge 1000 ] || left=1000; '
            'left=$((left / 1000)).$((left % 1000 / 100))')
    for name, addresses in names.items():
        for ip in addresses:
            number = len(numbers)
            numbers.append(str(number))
            # what it answered, one line: every address it gave, or nothing
            lookups.append(f'ost_name_{number}() {{ {left}; got=$(timeout "$left" getent -s dns ahostsv{ip.version} '
                           f'{shlex.quote(name)} | cut -d" " -f1 | sort -u | tr "\\n" " "); '
                           f'case " $got" in *" {ip} "*) return 0 ;; esac; '
                           f'got=${{got% }}; echo "name {name} (IPv{ip.version}: {ip}), answered: ${{got:-nothing}}"; return 1; }}')
    return "\n".join([
        "ost_ms() { echo $(($(date +%s%N) / 1000000)); }", *lookups,
        f"end=$(($(ost_ms) + {int(timeout * 1000)}))", "while :; do",
        f"    missing=$({'; '.join(checks) or ':'})", '    [ -z "$missing" ] && break',
        '    [ "$(ost_ms)" -ge "$end" ] && break', "    sleep 0.2", "done",
        f"end=$(($(ost_ms) + {int(timeout * 1000)})); pending='{' '.join(numbers)}'", "while :; do",
        "    still=; unresolved=",
        '    for n in $pending; do line=$(ost_name_$n) || { still="$still $n"; unresolved="$unresolved$line',
        '"; }; done',
        '    pending=$still; [ -z "$pending" ] && break',
        '    [ "$(ost_ms)" -ge "$end" ] && break', "    sleep 0.2", "done",
        '[ -z "$missing$pending" ] && exit 0',
        'printf "%s\\n%s" "$missing" "$unresolved"', "exit 1"])
