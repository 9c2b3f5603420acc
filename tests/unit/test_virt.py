"""The libvirt layer against libvirt's own in-memory test driver."""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from pytest_ostimages.hypervisor import connection as virt
from pytest_ostimages.hypervisor import subnets
from pytest_ostimages.lab import networks
from pytest_ostimages.state import environment
from pytest_ostimages.state import ledger as reaper
from pytest_ostimages.errors import VirtError
from pytest_ostimages.state.owner import Label
from pytest_ostimages.state.ledger import Owned
from pytest_ostimages.hypervisor.render import HostEntry, Templates, domain_xml, network_xml

LABEL = Label("feedbeef", 1, "testhost", "/w")


def make_network(conn, subnet: ipaddress.IPv4Network, name: str = "ost-feedbeef"):
    xml = network_xml(Templates().load("network.xml"), name=name, bridge=name, subnet=subnet,
                      domain="ost.test", hosts=[], label=LABEL)
    return virt.create_network(conn, xml)


def test_connect_failure_says_how_to_fix() -> None:
    with pytest.raises(VirtError, match="(?s)Cannot connect to libvirt at qemu\\+unix:///system\\?socket="
                                        "/nonexistent.*Is the daemon running"):
        virt.connect("qemu+unix:///system?socket=/nonexistent/sock")


def test_subnet_skips_libvirt_networks_and_routes(conn) -> None:
    # the test driver's "default" network holds 192.168.122.0/24
    pool = ipaddress.IPv4Network("192.168.120.0/22")
    make_network(conn, ipaddress.IPv4Network("192.168.120.0/24"), "other")
    try:
        assert networks.with_free_subnet(conn, pool, lambda s: s, routes=lambda: []) \
            == ipaddress.IPv4Network("192.168.121.0/24")
        # a host route (whatever this machine's own routes are) is skipped too
        assert networks.with_free_subnet(conn, pool, lambda s: s,
                                     routes=lambda: [ipaddress.IPv4Network("192.168.121.0/25")]) \
            == ipaddress.IPv4Network("192.168.123.0/24")
    finally:
        reaper.remove(conn, Owned("network", "other", LABEL))
    assert subnets.free_subnet(pool, [ipaddress.IPv4Network("192.168.120.0/23"),
                                   ipaddress.IPv4Network("192.168.122.0/24")]) \
        == ipaddress.IPv4Network("192.168.123.0/24")


def test_subnet_skips_the_one_an_ipv6_only_network_was_made_of(conn) -> None:
    # an IPv6-only session's network (--ost-ip-version=6) has only the /64 made of its /24: a second
    # session that took the /24 made the same /64, and the first one's guests lost their DNS server
    pool = ipaddress.IPv4Network("192.168.120.0/22")
    xml = network_xml(Templates().load("network.xml"), name="v6only", bridge="v6only", subnet=None,
                      subnet6=environment.ipv6_subnet(ipaddress.IPv4Network("192.168.120.0/24")),
                      domain="ost.test", hosts=[], label=LABEL)
    virt.create_network(conn, xml)
    try:
        assert "192.168.120" not in xml and "fd6f:7374:c0a8:7800::" in xml
        assert ipaddress.IPv4Network("192.168.120.0/24") in subnets.network_subnets(conn)
        assert networks.with_free_subnet(conn, pool, lambda s: s, routes=lambda: []) \
            == ipaddress.IPv4Network("192.168.121.0/24")
    finally:
        reaper.remove(conn, Owned("network", "v6only", LABEL))


def test_a_preferred_subnet_is_taken_where_it_is_free(conn) -> None:
    # the /24 a saved state was saved on: a restore there keeps the guest's NICs (lab/warm.py)
    pool = ipaddress.IPv4Network("192.168.120.0/22")
    take = functools.partial(networks.with_free_subnet, conn, pool, lambda s: s, routes=lambda: [])
    assert take(prefer=ipaddress.IPv4Network("192.168.121.0/24")) == ipaddress.IPv4Network("192.168.121.0/24")
    # not where it is used (the test driver's "default" network), outside the pool or not a /24: the first free
    for used_or_not_ours in ("192.168.122.0/24", "10.1.2.0/24", "192.168.120.0/23"):
        assert take(prefer=ipaddress.IPv4Network(used_or_not_ours)) == ipaddress.IPv4Network("192.168.120.0/24")


def test_a_vms_subnets_by_network_role() -> None:
    # what a saved state records of the VM's NICs (the subnets a later session prefers)
    subnet = ipaddress.IPv4Network("192.168.130.0/24")
    both = networks.entry(subnet, (4, 6), "engine", 10)
    v6_only = networks.entry(ipaddress.IPv4Network("192.168.131.0/24"), (6,), "engine-eth1", 10)
    assert v6_only.ip is None
    assert networks.subnets_of([("management", both), ("storage", v6_only)]) == \
        {"management": "192.168.130.0/24", "storage": "192.168.131.0/24"}


def test_exhausted_pool_is_a_clear_error(conn, tmp_path: Path) -> None:
    with pytest.raises(VirtError, match="No free /24 left in the subnet pool 192.168.122.0/24"):
        networks.with_free_subnet(conn, ipaddress.IPv4Network("192.168.122.0/24"), lambda s: s,
                              routes=lambda: [])


def test_host_routes_parses_proc_format(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert subnets.host_routes(routes) == [ipaddress.IPv4Network("192.168.2.0/24")]


def test_network_lifecycle_and_live_host_update(conn) -> None:
    net = make_network(conn, ipaddress.IPv4Network("192.168.150.0/24"))
    assert net.isActive()
    entry = HostEntry("late", "52:54:00:a8:96:0c", ipaddress.IPv4Address("192.168.150.12"))
    virt.add_network_host(net, entry, "ost.test")
    root = etree.fromstring(net.XMLDesc())
    assert root.find("ip/dhcp/host").get("mac") == entry.mac
    assert root.find("dns/host/hostname").text == "late.ost.test"
    assert reaper.remove(conn, Owned("network", net.name(), LABEL))
    # gone already: nothing to do
    assert not reaper.remove(conn, Owned("network", net.name(), LABEL))
    assert "ost-feedbeef" not in [n.name() for n in conn.listAllNetworks()]


def test_domain_lifecycle(conn) -> None:
    make_network(conn, ipaddress.IPv4Network("192.168.151.0/24"))
    xml = domain_xml(Templates().load("domain.xml"), name="ost-feedbeef-engine", virt_type="test",
                     cpu_mode="default", memory_mib=256, vcpus=1, disk=Path("/w/d.qcow2"), backing=[],
                     nics=[("ost-feedbeef", "52:54:00:00:00:0a")], console_log=Path("/w/c.log"),
                     label=LABEL)
    dom = virt.create_domain(conn, xml)
    assert virt.domain_state(dom) == "running"
    assert Label.from_xml(dom.XMLDesc()) == LABEL
    reaper.remove(conn, Owned("domain", dom.name(), LABEL))
    assert "ost-feedbeef-engine" not in [d.name() for d in conn.listAllDomains()]


def test_rejected_definition_is_a_clear_error(conn) -> None:
    before = {n.name() for n in conn.listAllNetworks()}
    with pytest.raises(VirtError, match="refused the network definition"):
        virt.create_network(conn, "<network><name>bad</name><ip address='nonsense'/></network>")
    assert {n.name() for n in conn.listAllNetworks()} == before


def test_a_start_that_fails_leaves_nothing_defined(conn) -> None:
    xml = domain_xml(Templates().load("domain.xml"), name="ost-feedbeef-twice", virt_type="test",
                     cpu_mode="default", memory_mib=256, vcpus=1, disk=Path("/w/d.qcow2"), backing=[],
                     nics=[("default", "52:54:00:00:00:0b")], console_log=Path("/w/c.log"),
                     label=LABEL)
    running = virt.create_domain(conn, xml)
    # defined again (same uuid), it is accepted; starting it fails (it runs): it is removed
    with pytest.raises(VirtError, match="Cannot start domain ost-feedbeef-twice: .*already running"):
        virt.create_domain(conn, running.XMLDesc())
    assert "ost-feedbeef-twice" not in [d.name() for d in conn.listAllDomains()]


def test_virt_type_resolution(conn) -> None:
    assert virt.resolve_virt_type(conn, "qemu") == "qemu"
    # the test driver offers no KVM: auto falls back, an explicit kvm is an error
    assert virt.resolve_virt_type(conn, "auto") == "qemu"
    with pytest.raises(VirtError, match="(?s)KVM was requested.*--ost-virt-type=qemu"):
        virt.resolve_virt_type(conn, "kvm")
    assert virt.resolve_cpu_mode("kvm", "auto") == "host-passthrough"
    assert virt.resolve_cpu_mode("qemu", "auto") == "maximum"
    assert virt.resolve_cpu_mode("qemu", "host-model") == "host-model"


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for a netns")
def test_free_subnets_skip_routes_of_every_table_and_every_address() -> None:
    ns = f"ost-unit-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for command in (["link", "set", "lo", "up"],
                        # policy routing (a VPN client's, a container runtime's): not in the main table
                        ["route", "add", "192.168.128.0/24", "dev", "lo", "table", "100"],
                        ["addr", "add", "192.168.129.1/24", "dev", "lo"]):
            subprocess.run(["ip", "-n", ns, *command], check=True)
        code = ("import ipaddress; from pytest_ostimages.hypervisor.subnets import free_subnet, host_networks\n"
                "print(free_subnet(ipaddress.IPv4Network('192.168.128.0/22'), host_networks()))")
        found = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                               text=True, check=True)
        assert found.stdout.strip() == "192.168.130.0/24"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_a_domain_whose_qemu_crashed_says_so() -> None:
    class Domain:  # what libvirt's virDomain.state() answers: (state, reason)
        def __init__(self, answer: tuple[int, int]) -> None:
            self.answer = answer

        def state(self) -> tuple[int, int]:
            return self.answer

    assert virt.domain_state(Domain((5, 3))) == "shut off: its qemu process crashed"  # VIR_DOMAIN_SHUTOFF_CRASHED
    assert virt.domain_state(Domain((5, 2))) == "shut off"  # destroyed
    assert virt.domain_state(Domain((1, 1))) == "running"
