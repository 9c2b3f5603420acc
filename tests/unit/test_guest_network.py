"""The script that moves a restored guest to this session's networks, run by a real shell;
`ip` is a stand-in that records its calls and, like the flush of a hot-plugged NIC's own
DHCP client in between, refuses the default route a number of times."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from pathlib import Path

import pytest

from pytest_ostimages.guest.network import (FRESH_LEASES_BOUND, FRESH_LEASES_MARK, GUEST_FUNCTIONS, LEASES_DIR,
                                            Addressing, GuestNIC, leases_bound, move_to, network_wait_script,
                                            restore_script)
from pytest_ostimages.hypervisor.render import HostEntry

IP = """#!/bin/sh
echo "$*" >>"{log}"
case "$1 $2" in
"route replace")
    n=$(cat "{count}" 2>/dev/null || echo 0); echo $((n + 1)) >"{count}"
    [ "$n" -ge {refusals} ] || {{ echo "Error: Nexthop has invalid gateway." >&2; exit 2; }}
esac
"""


def stand_ins(tmp_path: Path, **scripts: str) -> dict[str, str]:
    """An environment whose PATH finds these scripts (name -> text) before the real tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def set_address(tmp_path: Path, refusals: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "ip.log"
    env = stand_ins(tmp_path, ip=IP.format(log=log, count=tmp_path / "count", refusals=refusals))
    done = subprocess.run(["sh", "-c", f'{GUEST_FUNCTIONS}\nset -e\nost_address enp1s0 192.0.2.10/24 192.0.2.1'],
                          env=env, capture_output=True, text=True)
    return done, log.read_text().splitlines()


def test_the_default_route_is_set_again_after_a_dhcp_client_flushed_the_address(tmp_path: Path) -> None:
    done, calls = set_address(tmp_path, refusals=3)
    assert done.returncode == 0, done.stderr
    assert calls[:3] == ["link set dev enp1s0 up", "addr replace 192.0.2.10/24 brd + dev enp1s0",
                         "route replace default via 192.0.2.1 dev enp1s0"]  # up first: a hot-plugged NIC is down
    assert calls.count("addr replace 192.0.2.10/24 brd + dev enp1s0") == 4  # the address again each time
    assert calls[-1] == "route replace default via 192.0.2.1 dev enp1s0"


def test_a_route_that_never_takes_fails_the_script_with_what_ip_said(tmp_path: Path) -> None:
    done, calls = set_address(tmp_path, refusals=1000)
    assert done.returncode == 1
    assert done.stderr.strip() == "Error: Nexthop has invalid gateway."  # once: the last try's
    assert calls.count("route replace default via 192.0.2.1 dev enp1s0") == 51
    assert calls[-1] == "-br addr show dev enp1s0"  # what the NIC has, for the error


@pytest.mark.parametrize("management", [True, False])
def test_only_the_management_nic_gets_the_default_route(management: bool) -> None:
    entry = HostEntry("host-0", "52:54:00:00:00:0a", ipaddress.IPv4Address("192.0.2.10"), None)
    now, _ = move_to([GuestNIC(entry, Addressing(24, ipaddress.IPv4Address("192.0.2.1"), "lab"), management)])
    assert ('ost_address "$n0" 192.0.2.10/24 "192.0.2.1"' in now) is management
    assert ('ost_address "$n0" 192.0.2.10/24 ""' in now) is not management


# NetworkManager autoconnects a new NIC's profile and flushes its addresses as it does: the
# reserved addresses go on once it has activated the NIC, and nothing connects it again later.
# Its device state is asked over D-Bus (busctl), nmcli only connects.
BUSCTL = """#!/bin/sh
echo "busctl $*" >>"{log}"
case "$*" in
*" Version") ;;  # NetworkManager runs
*" GetDeviceByIpIface s enp2s0") echo 'o "/org/freedesktop/NetworkManager/Devices/3"' ;;
*" get-property org.freedesktop.NetworkManager /org/freedesktop/NetworkManager/Devices/3 "*" State")
    n=$(cat "{count}" 2>/dev/null || echo 0); echo $((n + 1)) >"{count}"
    if [ "$n" -ge {polls} ]; then echo "u {final}"; else echo "u 30"; fi ;;
*) echo "Call failed: No device found for the requested iface." >&2; exit 1 ;;
esac
"""
NMCLI = """#!/bin/sh
echo "nmcli $*" >>"{log}"
"""
STATE = ("busctl --auto-start=no --timeout=5 get-property org.freedesktop.NetworkManager "
         "/org/freedesktop/NetworkManager/Devices/3 org.freedesktop.NetworkManager.Device State")


def nm_up(tmp_path: Path, polls: int, final: int = 100, wait: int = 15, nic: str = "enp2s0") -> tuple[int, list[str]]:
    log = tmp_path / "calls.log"
    env = stand_ins(tmp_path, busctl=BUSCTL.format(log=log, count=tmp_path / "count", polls=polls, final=final),
                    nmcli=NMCLI.format(log=log))
    done = subprocess.run(["sh", "-c", f'{GUEST_FUNCTIONS}\nnm_wait={wait}\nost_nm_up {nic}'],
                          env=env, capture_output=True, text=True)
    return done.returncode, [c for c in log.read_text().splitlines() if not c.endswith((" Version", f" s {nic}"))]


def test_a_nic_networkmanager_activates_by_itself_is_not_connected_again(tmp_path: Path) -> None:
    code, calls = nm_up(tmp_path, polls=3)
    assert code == 0
    assert calls == [STATE] * 4  # waited for it, nothing else


def test_the_nics_object_is_looked_up_once_while_it_is_awaited(tmp_path: Path) -> None:
    """Each busctl call costs a TCG guest CPU: the NIC's D-Bus object does not change while it activates."""
    code, _ = nm_up(tmp_path, polls=3)
    lookups = [c for c in (tmp_path / "calls.log").read_text().splitlines() if c.endswith(" s enp2s0")]
    assert code == 0 and len(lookups) == 1, lookups


def test_a_nic_networkmanager_leaves_alone_is_connected(tmp_path: Path) -> None:
    code, calls = nm_up(tmp_path, polls=10**6, wait=1)
    assert code == 0
    assert calls[-1] == "nmcli --wait 30 device connect enp2s0"


@pytest.mark.parametrize("nic", ["enp2s0", "enp9s0"])  # unmanaged; unknown to NetworkManager
def test_a_nic_networkmanager_does_not_manage_is_ifupdowns(tmp_path: Path, nic: str) -> None:
    code, calls = nm_up(tmp_path, polls=0, final=10, wait=1, nic=nic)
    assert code == 1
    assert not [call for call in calls if "connect" in call]


@pytest.mark.parametrize("runs", [True, False])
def test_networkmanager_moves_the_nics_where_it_runs(tmp_path: Path, runs: bool) -> None:
    busctl = "#!/bin/sh\ncase \"$*\" in *\" Version\") exit %d ;; esac\nexit 1\n" % (0 if runs else 1)
    env = stand_ins(tmp_path, busctl=busctl, nmcli="#!/bin/sh\nexit 0\n")
    done = subprocess.run(["sh", "-c", f'{GUEST_FUNCTIONS}\necho "nm=$nm"'], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == ("nm=1" if runs else "nm=")


def test_the_reserved_addresses_go_on_after_networkmanager_activated_the_nic() -> None:
    entry = HostEntry("host-0", "52:54:00:00:00:0a", ipaddress.IPv4Address("192.0.2.10"),
                      ipaddress.IPv6Address("fd00::a"))
    now, later = move_to([GuestNIC(entry, Addressing(24, ipaddress.IPv4Address("192.0.2.1"), "lab", 64,
                                                     ipaddress.IPv6Address("fd00::1")), True)])
    assert now.index('ost_nm_up "$n0"') < now.index('ost_address "$n0" 192.0.2.10/24')
    assert now.index('ost_nm_up "$n0"') < now.index("ip -6 addr replace fd00::a/64")
    assert "nmcli" not in later and '[ -n "$m0" ] || ifup "$n0"' in later
    assert subprocess.run(["sh", "-n", "-c", f"{now}\n{later}"]).returncode == 0


def test_without_networkmanager_a_nic_is_brought_up_once() -> None:
    """A hot-plugged NIC that ifupdown names allow-hotplug gets a hot-plug ifup of its own: its
    DHCP client is stopped before the reserved addresses go on, and the later ifup is not forced
    (a second dhclient on the NIC made the first remove the reserved IPv6 address)."""
    entry = HostEntry("engine", "52:54:00:00:00:0a", ipaddress.IPv4Address("192.0.2.10"), None)
    now, later = move_to([GuestNIC(entry, Addressing(24, ipaddress.IPv4Address("192.0.2.1"), "lab"), True)])
    assert now.index('ost_ifupdown_forget "$n0"') < now.index('ost_address "$n0"')
    assert "--force" not in later


DUAL = Addressing(24, ipaddress.IPv4Address("192.0.2.1"), "lab", 64, ipaddress.IPv6Address("fd00::1"))
TWO_NICS = [GuestNIC(HostEntry("host-0", f"52:54:00:00:00:0{n}", ipaddress.IPv4Address(f"192.0.2.1{n}"),
                               ipaddress.IPv6Address(f"fd00::{n}")), DUAL, n == 0) for n in (0, 1)]
NIC_NAMES = 'n0=eth0; n1=eth1; m0=; m1=\n'


@pytest.mark.parametrize("missing", ["dhclient.eth0", "dhclient6.eth0", "dhclient.eth1", "dhclient6.eth1", None])
def test_fresh_leases_are_bound_once_every_client_of_every_nic_has_its_lease(tmp_path: Path, missing) -> None:
    for name in {"dhclient.eth0", "dhclient6.eth0", "dhclient.eth1", "dhclient6.eth1"} - {missing}:
        (tmp_path / f"{name}.leases").write_text("lease {}\n")
    condition = leases_bound(TWO_NICS).replace(LEASES_DIR, str(tmp_path))
    done = subprocess.run(["sh", "-c", f"{NIC_NAMES}if {condition}; then echo bound; fi"], capture_output=True,
                          text=True)
    assert done.stdout.strip() == ("bound" if missing is None else ""), (missing, condition)


IFUP = """#!/bin/sh
# ifup NIC: eth0's waits (up to 5 s) for eth1's to have started, then each writes its NIC's leases
echo "$1" >>"{dir}/started"
if [ "$1" = eth0 ]; then
    for i in $(seq 50); do grep -qx eth1 "{dir}/started" && break; sleep 0.1; done
    grep -qx eth1 "{dir}/started" || echo "eth0's ifup ran alone" >>"{dir}/errors"
fi
echo "lease {{}}" >"{dir}/dhclient.$1.leases"; echo "lease {{}}" >"{dir}/dhclient6.$1.leases"
"""


def test_without_networkmanager_the_nics_take_their_fresh_leases_at_once(tmp_path: Path) -> None:
    """Each NIC's ifup and DHCP exchange takes seconds under TCG: they overlap, and the mark that
    the guest is handed over by is written once every NIC's leases are there."""
    env = stand_ins(tmp_path, ifup=IFUP.format(dir=tmp_path), ifquery="#!/bin/sh\nexit 0\n")  # both brought up
    _, later = move_to(TWO_NICS)
    script = later.replace(LEASES_DIR, str(tmp_path)).replace(FRESH_LEASES_MARK, str(tmp_path / "mark"))
    script = script.removesuffix(" &")  # the agent runs it in the background; here, to its end
    done = subprocess.run(["sh", "-c", NIC_NAMES + script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "errors").exists(), (tmp_path / "errors").read_text()
    assert sorted((tmp_path / "started").read_text().split()) == ["eth0", "eth1"]
    assert (tmp_path / "mark").exists()


def test_forgetting_a_nic_never_stops_the_move(tmp_path: Path) -> None:
    """The move runs under `set -e`: a guest whose ifdown fails (or that has no ifupdown) still gets
    its addresses."""
    env = stand_ins(tmp_path, **dict.fromkeys(("ifdown", "ifquery", "pkill"), "#!/bin/sh\nexit 1\n"))
    done = subprocess.run(["sh", "-c", f"{GUEST_FUNCTIONS}\nset -e\nost_ifupdown_forget eth0\necho moved"],
                          env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "moved", done.stderr


NAMES = {"engine": [ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv6Address("fd00::10")]}
RESOLVES = 'case "$4" in engine) echo "${3#ahostsv}" | sed "s/^4$/192.0.2.10/; s/^6$/fd00::10/";; esac'


def wait(tmp_path: Path, timeout: float = 2, also: tuple[str, ...] = (), **tools: str
         ) -> tuple[subprocess.CompletedProcess, float]:
    env = stand_ins(tmp_path, **{name: f"#!/bin/sh\n{text}\n" for name, text in tools.items()})
    start = time.monotonic()
    done = subprocess.run(["sh", "-c", network_wait_script(None, NAMES, timeout, also)], env=env,
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - start


@pytest.mark.parametrize("getent, missing", [
    (RESOLVES, []),
    ("echo 192.0.2.99 STREAM engine", ["name engine (IPv4: 192.0.2.10), answered: 192.0.2.99",
                                       "name engine (IPv6: fd00::10), answered: 192.0.2.99"]),
    ("sleep 60", ["name engine (IPv4: 192.0.2.10), answered: nothing",  # no resolver answers
                  "name engine (IPv6: fd00::10), answered: nothing"]),
])
def test_the_network_wait_ends_by_its_deadline_with_what_is_missing(tmp_path: Path, getent: str, missing) -> None:
    done, seconds = wait(tmp_path, getent=getent)
    assert [line.strip() for line in done.stdout.splitlines() if line.strip()] == missing, done
    assert done.returncode == (1 if missing else 0), done
    assert seconds < 6  # 2 s and the lookups under way then, which get the time left


def test_each_lookup_gets_the_time_left_when_it_starts(tmp_path: Path) -> None:
    """Six lookups of which none answers, 2 s to go: the first has the 2 s, each later one the
    least a lookup gets (1 s), not the 2 s the round started with (12 s in all)."""
    names = {name: NAMES["engine"] for name in ("engine", "host-0", "host-1")}
    env = stand_ins(tmp_path, getent="#!/bin/sh\nsleep 60\n")
    start = time.monotonic()
    done = subprocess.run(["sh", "-c", network_wait_script(None, names, 2)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout.count("answered: nothing") == 6, done
    assert time.monotonic() - start < 9


def test_names_are_looked_up_once_the_leases_are_bound_with_time_of_their_own(tmp_path: Path) -> None:
    """A restored guest whose DHCP clients bind late (here: at the end of the first deadline) is still
    handed over: its names get a deadline of their own, and are not looked up before."""
    bound = tmp_path / "bound"
    late = f"[ -e {bound} ] || {{ echo 'fresh DHCP leases'; [ -e {tmp_path}/n ] && touch {bound}; touch {tmp_path}/n; }}"
    lookups = tmp_path / "lookups"
    getent = f'echo "$4" >>{lookups}\n[ -e {bound} ] || exit 2\n{RESOLVES}'
    done, _ = wait(tmp_path, timeout=1, also=(late,), getent=getent)
    assert done.returncode == 0 and done.stdout == "", done
    assert lookups.read_text().split() == ["engine", "engine"]  # each address once, after the leases


def test_a_wait_of_one_second_lasts_one_second_late_in_a_clock_second(tmp_path: Path) -> None:
    """The deadline is the time asked for from the wait's start, not the next whole clock second: a check
    that passes after half a second passes within a wait of 1 s begun at .8 of a second."""
    while time.time() % 1 < 0.8:
        time.sleep(0.01)
    passes_at = time.time_ns() + 500_000_000
    done, seconds = wait(tmp_path, timeout=1, also=(f'[ "$(date +%s%N)" -ge {passes_at} ] || echo "not yet"',),
                         getent=RESOLVES)
    assert done.returncode == 0 and done.stdout == "", (done, seconds)


def test_a_name_resolved_once_is_not_asked_again(tmp_path: Path) -> None:
    """A lookup that fails now and then (a lost answer) does not keep a guest waiting for a round in
    which every name answers at once."""
    count = tmp_path / "count"
    # the IPv4 lookup answers only the first time, the IPv6 one only from the second time on
    getent = (f'n=$(cat {count}.$3 2>/dev/null || echo 0); echo $((n + 1)) >{count}.$3\n'
              f'[ "$3" = ahostsv4 ] && [ "$n" -gt 0 ] && exit 2\n[ "$3" = ahostsv6 ] && [ "$n" -eq 0 ] && exit 2\n'
              f'{RESOLVES}')
    done, _ = wait(tmp_path, timeout=5, getent=getent)
    assert done.returncode == 0, done
    assert (tmp_path / "count.ahostsv4").read_text().strip() == "1"


def test_a_restored_guest_that_kept_its_nics_only_takes_its_identity(tmp_path: Path) -> None:
    """Restored on networks of the saved addresses (the same MACs), a guest keeps its NICs and leases:
    nothing re-addresses or restarts a DHCP client, and the fresh-lease check holds at once."""
    env = stand_ins(tmp_path, **dict.fromkeys(("ip", "ifup", "ifdown", "pkill", "dhclient", "nmcli", "busctl"),
                                              f"#!/bin/sh\necho \"$0\" >>{tmp_path}/ran\n"))
    script = restore_script(TWO_NICS, identity="echo identity taken")
    kept = script(True).replace(FRESH_LEASES_MARK, str(tmp_path / "mark"))
    done = subprocess.run(["sh", "-c", kept], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "identity taken\n", done.stderr
    assert not (tmp_path / "ran").exists(), (tmp_path / "ran").read_text()
    check = FRESH_LEASES_BOUND.replace(FRESH_LEASES_MARK, str(tmp_path / "mark"))
    assert subprocess.run(["sh", "-c", check], capture_output=True, text=True).stdout == ""
    # moved to other addresses, it gets them and fresh leases, its identity between the two
    addresses, fresh_leases = move_to(TWO_NICS)
    assert script(False) == f"{addresses}\necho identity taken\n{fresh_leases}"


class ShellGuest:
    """The part of a VM that wait_for_network uses, its commands run by a real shell here (with the
    stand-in tools of `env`) as they run in the guest."""

    role, hostname, ip = "engine", "engine", ipaddress.IPv4Address("192.0.2.10")

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def ssh(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", command], env=self.env, capture_output=True, text=True, timeout=timeout)

    def wait_for_network(self, ip6, names, timeout, also=()) -> list[str]:  # as VM.wait_for_network
        done = self.ssh(network_wait_script(ip6, names, timeout, also), timeout=2 * timeout + 30)
        return [line for line in done.stdout.splitlines() if line.strip()] if done.returncode else []

    def diagnostic(self, command: str) -> str:
        return self.ssh(command, timeout=10).stdout

    def describe_failure(self, reason: str, hint: bool = True) -> str:
        return f"VM engine {reason}"


@pytest.mark.parametrize("answers_after, deadline, resolves", [(3, 10, True), (60, 3, False)])
def test_a_slow_guests_names_are_awaited_until_its_boot_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  answers_after: int, deadline: int,
                                                                  resolves: bool) -> None:
    """A guest on a busy host whose resolver answers after the network wait (1 s here) is handed over
    once it does, with a word; one that never answers fails by its boot's deadline, not later."""
    from pytest_ostimages.errors import BootError
    from pytest_ostimages.lab import booter

    monkeypatch.setattr(booter, "NETWORK_WAIT", 1.0)
    ready = int(time.time()) + answers_after
    guest = ShellGuest(stand_ins(tmp_path, getent=f'#!/bin/sh\n[ "$(date +%s)" -ge {ready} ] || exit 2\n{RESOLVES}\n',
                                 ip="#!/bin/sh\necho 2: enp1s0 inet6 fd00::10/64\n"))  # it holds its IPv6 address
    own = HostEntry("engine", "52:54:00:00:00:10", *NAMES["engine"])
    said: list[str] = []
    start = time.monotonic()
    if resolves:
        booter.wait_for_network(guest, own, [own], False, said.append, start + deadline)  # type: ignore[arg-type]
    else:
        with pytest.raises(BootError, match=r"does not resolve the session's names over DNS within \d+ s "
                                            r"\(name engine \(IPv4: 192.0.2.10\), answered: nothing"):
            booter.wait_for_network(guest, own, [own], False, said.append, start + deadline)  # type: ignore[arg-type]
    assert time.monotonic() - start < deadline + 3
    assert len(said) == 1 and said[0].startswith("engine: does not resolve every name of the session yet (name "
                                                 "engine (IPv4: 192.0.2.10), answered: nothing"), said
    assert "until its boot timeout" in said[0]
