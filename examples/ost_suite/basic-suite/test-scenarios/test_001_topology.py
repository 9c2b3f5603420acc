"""The environment an OST suite expects: its VMs, networks, disks and deploy scripts."""

import ipaddress

SUITE_VMS = {"engine", "host-0", "host-1", "storage"}


def test_backend_finds_every_vm_network_and_address(backend, suite):
    assert backend.hostnames() == {f"ost-{suite}-{vm}" for vm in SUITE_VMS}
    for name, networks in backend.ips.items():
        assert set(networks) == {"management", "storage"}, name
        for role, ips in networks.items():  # dual stack on every network
            assert sorted(ip.version for ip in ips) == [4, 6], (name, role, ips)


def test_deploy_scripts_ran_in_each_vm(backend, ansible_by_hostname, suite):
    expected = {"engine": "setup_engine", "host-0": "setup_host", "host-1": "setup_host",
                "storage": "setup_storage"}
    for vm, script in expected.items():
        name = f"ost-{suite}-{vm}"
        assert backend.deploy_scripts[name] == [f"common/deploy-scripts/{script}.sh"]
        deployed = ansible_by_hostname(name).shell("cat /etc/ost-deployed")["stdout"]
        assert deployed == f"{script} on {name}"


def test_storage_has_its_extra_disks(ansible_storage):
    # sizes and serials as the init-config gives them (serials 2, 3, ... in key order, as OST). By serial,
    # as OST's deploy scripts find them: the guest names SCSI disks (sda, sdb) in the order their
    # asynchronous probes end, which differs from boot to boot
    disks = ansible_storage.shell("lsblk -bndo SERIAL,SIZE -I 8")["stdout"]
    assert sorted(line.split() for line in disks.splitlines()) == [["2", str(2**30)], ["3", str(2 * 2**30)]]
    # the deploy script found them by serial and made one volume group of both
    size = ansible_storage.shell("vgs --noheadings --units b --nosuffix -o vg_size ost_storage")["stdout"]
    assert 2.9 * 2**30 < int(size) <= 3 * 2**30


def test_host_has_a_nic_on_each_network(backend, ansible_host0_facts, hosts_hostnames):
    facts = ansible_host0_facts
    macs = backend.macs[hosts_hostnames[0]]
    assert facts["ansible_eth0"]["macaddress"] == macs["management"][0]
    assert facts["ansible_eth1"]["macaddress"] == macs["storage"][0]
    storage4 = next(ip for ip in backend.ips[hosts_hostnames[0]]["storage"] if ip.version == 4)
    assert ipaddress.ip_address(facts["ansible_eth1"]["ipv4"]["address"]) == storage4
