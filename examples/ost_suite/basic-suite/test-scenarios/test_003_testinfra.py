"""testinfra on the same VMs: pytest-ostimages gives each VM a testinfra host (vm.testinfra)."""


def test_host_packages_services_and_files(ost_vms):
    host = ost_vms["host-0"].testinfra
    assert host.package("lvm2").is_installed
    assert host.service("ssh").is_running
    assert host.file("/etc/ost-deployed").contains("setup_host")
    assert host.run("hostname").stdout.strip() == "ost-basic-suite-host-0"


def test_engine_over_testinfra(ost_vms):
    engine = ost_vms["engine"].testinfra
    assert engine.check_output("cat /etc/ost-deployed").startswith("setup_engine")
    assert not engine.package("lvm2").is_installed
