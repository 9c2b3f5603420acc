"""Both IP versions, as OST tests them: names, addresses and SSH (ansible) over IPv6."""

import ipaddress

import pytest


def test_management_network_is_dual_stack(tested_ip_version):
    assert tested_ip_version == 6


def test_ansible_reaches_the_vms_over_ipv6(working_dir, ansible_hosts, hosts_hostnames):
    with open(f"{working_dir}/hosts") as inventory:
        addresses = [line.split("ansible_host=")[1].split()[0] for line in inventory if line.strip()]
    assert all(ipaddress.ip_address(a).version == 6 for a in addresses)
    assert set(ansible_hosts.ping()) == set(hosts_hostnames)


def test_hostname_is_the_backend_name(ansible_host0_facts, hosts_hostnames):
    # OST's engine_ip and friends rely on it
    assert ansible_host0_facts["ansible_hostname"] == hosts_hostnames[0]


@pytest.mark.parametrize("version", [4, 6])
def test_hosts_resolve_and_reach_the_engine(backend, ansible_host0, engine_hostname, version):
    expected = next(ip for ip in backend.ips[engine_hostname]["management"] if ip.version == version)
    resolved = ansible_host0.shell(f"getent ahostsv{version} {engine_hostname}")["stdout"].split()[0]
    assert ipaddress.ip_address(resolved) == expected
    ansible_host0.shell(f"ping -{version} -c 1 -W 5 {engine_hostname}")


def test_storage_network_carries_traffic(backend, ansible_host0, storage_hostname):
    for ip in backend.ips[storage_hostname]["storage"]:
        ansible_host0.shell(f"ping -c 1 -W 5 {ip}")
