"""The script that moves a restored guest to this session's networks, run by a real shell;
`ip` is a stand-in that records its calls and, like the flush of a hot-plugged NIC's own
DHCP client in between, refuses the default route a number of times."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from pytest_ostimages.guest.network import GUEST_FUNCTIONS, Addressing, GuestNIC, move_to
from pytest_ostimages.hypervisor.render import HostEntry

IP = """#!/bin/sh
echo "$*" >>"{log}"
case "$1 $2" in
"route replace")
    n=$(cat "{count}" 2>/dev/null || echo 0); echo $((n + 1)) >"{count}"
    [ "$n" -ge {refusals} ] || {{ echo "Error: Nexthop has invalid gateway." >&2; exit 2; }}
esac
"""


def set_address(tmp_path: Path, refusals: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir, log = tmp_path / "bin", tmp_path / "ip.log"
    bin_dir.mkdir()
    (bin_dir / "ip").write_text(IP.format(log=log, count=tmp_path / "count", refusals=refusals))
    (bin_dir / "ip").chmod(0o755)
    done = subprocess.run(["sh", "-c", f'{GUEST_FUNCTIONS}\nset -e\nost_address enp1s0 192.0.2.10/24 192.0.2.1'],
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True, text=True)
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
