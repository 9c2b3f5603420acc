"""The default fixtures on real VMs: engine + hosts booted together, SSH, SFTP, DNS."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from pytest_ostimages import VM, Catalog, Network, OstError, SSHCommandError, VMError
from pytest_ostimages.guest.ssh import SSH

from .helpers import IMAGES


def test_engine_up(engine: VM) -> None:
    assert engine.ssh("systemctl is-system-running --wait").stdout.strip() == "running"
    assert engine.ssh("cat /etc/ost-layer").stdout.strip() == "engine-installed"


def test_hosts_are_host_installed(hosts: list[VM]) -> None:
    assert [h.role for h in hosts] == ["host0", "host1"]
    for host in hosts:
        assert host.ssh("cat /etc/ost-layer", check=True).stdout.strip() == "host-installed"


def test_layers_carry_their_packages(engine: VM, host0: VM, ost_images: Catalog) -> None:
    for vm in (engine, host0):
        added = Path(vm.image.pkglist_diff).read_text().split()
        assert added, f"{vm.image.label} should add packages on top of base"
        installed = vm.ssh("dpkg-query -W -f '${Package}-${Version}\\n'", check=True).stdout.split()
        assert set(added) <= set(installed)
    assert ost_images.source == "rpm"
    assert engine.image.package is not None
    assert engine.image.package.name == f"ost-images-{engine.image.distro}-engine-installed"


def test_hosts_reach_the_engine_by_name(hosts: list[VM], engine: VM) -> None:
    for host in hosts:
        assert host.ssh(f"ping -c1 -W5 {engine.hostname}").returncode == 0
        resolved = host.ssh("getent ahostsv4 engine").stdout.split()
        assert resolved[0] == str(engine.ip)
        # only the session's names: not those of the host's /etc/hosts (libvirt's dnsmasq reads it)
        assert host.ssh(f"getent ahostsv4 {socket.gethostname()}").returncode == 2


def test_addresses_are_the_reserved_ones(engine: VM, hosts: list[VM], ost_network: Network) -> None:
    for vm in (engine, *hosts):
        assert vm.ip in ost_network.subnet
        assert f"inet {vm.ip}/" in vm.ssh("ip -4 addr show eth0").stdout
        assert vm.mac in vm.ssh("cat /sys/class/net/eth0/address").stdout


def test_dual_stack_addresses_names_and_ssh_over_ipv6(engine: VM, host0: VM, ost_network: Network,
                                                    ost_lab) -> None:
    assert engine.ip6 in ost_network.subnet6 and engine.addresses() == [engine.ip, engine.ip6]
    # the guest's DHCPv6 lease is its reservation, keyed on the DUID-LL of its MAC
    assert f"inet6 {engine.ip6}/" in engine.ssh("ip -6 addr show eth0").stdout
    # A and AAAA records on the management network
    assert ipaddress.ip_address(host0.ssh("getent ahostsv6 engine").stdout.split()[0]) == engine.ip6
    assert ipaddress.ip_address(host0.ssh("getent ahostsv4 engine").stdout.split()[0]) == engine.ip
    assert host0.ssh(f"ping -6 -c1 -W5 {engine.hostname}").returncode == 0
    # SSH over IPv6, still with the host key pinned at first contact
    over6 = SSH(str(engine.ip6), ost_lab.inputs.key, host_key=engine.host_key)
    try:
        assert over6.run("hostname").stdout.strip() == "engine"
    finally:
        over6.close()


def test_testinfra_modules_on_a_vm(host0: VM) -> None:
    host = host0.testinfra
    assert host.package("lvm2").is_installed and not host.package("no-such-package").is_installed
    assert host.service("ssh").is_running
    assert host.file("/etc/ost-layer").content_string.strip() == "host-installed"
    assert host.run("hostname -f").stdout.strip() == host0.hostname
    assert host.check_output("id -un") == "root"


def test_ansible_runner_through_the_session_inventory(ost_ansible_inventory: Path, engine: VM,
                                                      hosts: list[VM], tmp_path: Path) -> None:
    import ansible_runner

    def run(pattern: str, module: str, args: str = "") -> dict[str, dict]:
        result = ansible_runner.run(private_data_dir=str(tmp_path), inventory=str(ost_ansible_inventory),
                                    host_pattern=pattern, module=module, module_args=args, quiet=True)
        assert result.status == "successful", result.stdout.read()
        return {e["event_data"]["host"]: e["event_data"]["res"] for e in result.events
                if e.get("event") == "runner_on_ok"}

    # (other test modules of the session may have added VMs, e.g. host2: the checks hold whatever they are)
    assert set(run("engine:hosts", "ping")) >= {"engine", "host0", "host1"}
    layers = {host: res["stdout"] for host, res in run("hosts", "shell", "cat /etc/ost-layer").items()}
    assert {"host0", "host1"} <= set(layers) and set(layers.values()) == {"host-installed"}  # numbered roles


def test_copy_a_file_in_and_out(engine: VM, tmp_path: Path) -> None:
    source = tmp_path / "payload.bin"
    source.write_bytes(os.urandom(300_000))
    engine.put(source, "/root/payload.bin")
    assert engine.ssh("sha256sum /root/payload.bin").stdout.split()[0] == \
        subprocess.run(["sha256sum", str(source)], capture_output=True, text=True).stdout.split()[0]
    engine.get("/root/payload.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


def test_command_results_and_check(engine: VM) -> None:
    result = engine.ssh("echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(SSHCommandError, match="exited with 3(.|\n)*err"):
        engine.ssh("echo err >&2; exit 3", check=True)


def test_a_command_that_times_out_is_ended_in_the_guest(engine: VM) -> None:
    # it writes nothing and reads its stdin (empty): without the plugin's watcher it would run on, holding
    # whatever it holds, after its channel closed
    with pytest.raises(OstError, match="did not finish within 2 s; it was ended there"):
        engine.ssh("cat; sleep 600.5 | cat", timeout=2)
    gone = "for i in $(seq 50); do pgrep -f 'sleep 600[.]5' >/dev/null || exit 0; sleep 0.1; done; exit 1"
    assert engine.ssh(gone, timeout=30).returncode == 0


def test_dropped_connection_is_reopened(host1: VM) -> None:
    host1._ssh.connect().get_transport().close()  # as if the network dropped it
    assert host1.ssh("echo again").stdout == "again\n"


def test_console_log_shows_the_boot(engine: VM) -> None:
    assert "Linux version" in engine.console_log()
    assert len(engine.console_log(lines=5).splitlines()) <= 5


def test_overlays_leave_installed_images_alone(engine: VM, hosts: list[VM]) -> None:
    for vm in (engine, *hosts):
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(vm.overlay)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["full-backing-filename"] == str(vm.image.path)
        assert info["backing-filename-format"] == "qcow2"
        assert vm.overlay.parent != IMAGES
    # while the VMs run, the installed files keep their owner (that of their directory,
    # not libvirt's qemu user) and mode
    for path in IMAGES.glob("*.qcow2"):
        st = path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (IMAGES.stat().st_uid, 0o444), path


def test_factory_boots_any_layer_later(ost_vm_factory, engine: VM) -> None:
    late = ost_vm_factory("base", role="late")
    assert late.ssh("cat /etc/ost-layer").stdout.strip() == "base"
    # added to the running network: reserved address and DNS name both work
    assert ipaddress.IPv4Address(late.ssh("getent ahostsv4 late").stdout.split()[0]) == late.ip
    assert late.ssh(f"getent ahostsv4 {engine.hostname}").stdout.split()[0] == str(engine.ip)
    # both families: the DHCPv6 reservation and the AAAA record were added too
    assert ipaddress.IPv6Address(engine.ssh("getent ahostsv6 late").stdout.split()[0]) == late.ip6
    assert f"inet6 {late.ip6}/" in late.ssh("ip -6 addr show eth0").stdout
    # a VM that dies is reported as dead, with its console, not as an SSH timeout
    late.domain.destroy()
    with pytest.raises(VMError, match=r"(?s)VM late .* is not running any more \(state: shut off\).*serial console"):
        late.ssh("true")
