"""--ost-ip-version=4 and 6: single-stack networks, as ``ost.sh -4`` / ``-6`` run OST.

Dual stack (the default) is proven by the shared environment (test_environment.py).
"""

from __future__ import annotations

import pytest

from .helpers import INNER, RESTORABLE, libvirt_objects, workdirs

CONFTEST = """
    from pytest_ostimages import vm_fixture

    a = vm_fixture("a", "base")
    b = vm_fixture("b", "base")
"""

TESTS = {
    "6": """
        import ipaddress

        def test_ipv6_only(a, b, ost_network):
            assert a.ip == a.ip6 and a.ip6 in ost_network.subnet6  # reached over IPv6
            assert a.addresses() == [a.ip6]
            assert a.ssh("ip -4 -o addr show dev eth0 scope global").stdout == ""
            assert f"inet6 {a.ip6}/" in a.ssh("ip -6 -o addr show dev eth0 scope global").stdout
            # the AAAA record of the management network, by short name and FQDN
            for name in ("a", a.hostname):
                assert ipaddress.ip_address(b.ssh(f"getent ahosts {name}").stdout.split()[0]) == a.ip6
            assert b.ssh(f"ping -6 -c 1 -W 5 {a.ip6}").returncode == 0
    """,
    "4": """
        import ipaddress

        def test_ipv4_only(a, b, ost_network):
            # handed over once its DHCP client is bound: Debian's dhclient-script rewrites
            # resolv.conf in place as it binds (a restored guest takes a fresh lease)
            for vm in (b, a):
                bound = "test -s /var/lib/dhcp/dhclient.eth0.leases && ! pgrep -x dhclient-script"
                assert vm.ssh(bound).returncode == 0
            assert a.ip6 is None and a.ip in ost_network.subnet and a.addresses() == [a.ip]
            assert a.ssh("ip -6 -o addr show dev eth0 scope global").stdout == ""
            for name in ("a", a.hostname):
                assert ipaddress.ip_address(b.ssh(f"getent ahosts {name}").stdout.split()[0]) == a.ip
    """,
}


@pytest.mark.parametrize("version", ["6", "4"])
def test_single_stack_network(pytester: pytest.Pytester, version: str) -> None:
    before = libvirt_objects(), workdirs()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS[version])
    result = pytester.runpytest_subprocess(*INNER, *RESTORABLE, f"--ost-ip-version={version}")
    result.assert_outcomes(passed=1)
    assert (libvirt_objects(), workdirs()) == before
