"""Fixtures of an OST suite, written the way OST's ``ost_utils/pytest/fixtures`` writes them.

They depend on nothing of pytest-ostimages: like OST's own ``backend`` and ``ansible_*``
fixtures, they find the environment through ``$OST_DEPLOYMENT``, the ``OST:metadata`` of
the libvirt domains and networks (read with ``virsh``, as ``ost_utils/backend/virsh``
reads it) and the ``hosts`` ansible inventory in the deployment directory. A suite that
imports OST's own ``ost_utils.pytest.fixtures`` instead runs on the same VMs unchanged.

The one exception is ``hosts_enrolled``, a checkpoint fixture (``@checkpoint``): the first
session runs it and saves the VMs right after; later sessions restore them in that state
and skip it (docs/warm.md).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from typing import Optional

import ansible_runner
import pytest

from pytest_ostimages import checkpoint

OST = "{OST:metadata}ost"


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", *args], check=True, capture_output=True, text=True).stdout


def dumpxml(command: str, name: str) -> Optional[ET.Element]:
    """The XML of a listed domain or network; None if it went meanwhile (another session's, whose
    end removed it: several sessions run side by side)."""
    done = subprocess.run(["virsh", command, name], capture_output=True, text=True)
    return ET.fromstring(done.stdout) if done.returncode == 0 else None


class Backend:
    """Hostname -> network role -> addresses, and deploy scripts, as ost_utils' VirshBackend finds them."""

    def __init__(self, deployment: str) -> None:
        networks = {}  # libvirt name -> (role, {mac or DHCPv6 id: address})
        for name in virsh("net-list", "--name").split():
            if not name.startswith("ost"):
                continue
            xml = dumpxml("net-dumpxml", name)
            working_dir = None if xml is None else xml.find(f"./metadata/{OST}/ost-working-dir[@comment]")
            if working_dir is None or working_dir.get("comment") != deployment:
                continue
            role = xml.find(f"./metadata/{OST}/ost-network-role[@comment]").get("comment")
            dhcp = {host.get("mac", host.get("id")): ipaddress.ip_address(host.get("ip"))
                    for host in xml.findall("./ip/dhcp/host")}
            networks[name] = (role, dhcp)
        self.ips: dict[str, dict[str, list]] = {}
        self.macs: dict[str, dict[str, list[str]]] = {}
        self.deploy_scripts: dict[str, list[str]] = {}
        for libvirt_name in virsh("list", "--name").split():
            if libvirt_name[8:13] != "-ost-":
                continue
            xml = dumpxml("dumpxml", libvirt_name)
            working_dir = None if xml is None else xml.find(f"./metadata/{OST}/ost-working-dir[@comment]")
            if working_dir is None or working_dir.get("comment") != deployment:
                continue
            name = libvirt_name[9:]
            self.deploy_scripts[name] = [s.get("name") for s in
                                         xml.findall(f"./metadata/{OST}/ost-deploy-scripts/script[@name]")]
            for nic in xml.findall("./devices/interface[@type='network']"):
                mac = nic.find("./mac[@address]").get("address")
                role, dhcp = networks[nic.find("./source[@network]").get("network")]
                self.macs.setdefault(name, {}).setdefault(role, []).append(mac)
                # DHCPv6 reservations are keyed on 0:3:0:1:<mac> (DUID-LL): found by suffix, v6 first
                found = sorted((ip for key, ip in dhcp.items() if key.endswith(mac)), key=lambda ip: -ip.version)
                self.ips.setdefault(name, {}).setdefault(role, []).extend(found)

    def hostnames(self) -> set[str]:
        return set(self.ips)


@pytest.fixture(scope="session")
def working_dir() -> str:
    return os.environ["OST_DEPLOYMENT"]


@pytest.fixture(scope="session")
def suite() -> str:
    return os.environ["SUITE"]


@pytest.fixture(scope="session")
def backend(working_dir: str) -> Backend:
    return Backend(working_dir)


@pytest.fixture(scope="session")
def engine_hostname(backend: Backend) -> str:
    return next(name for name in backend.hostnames() if "engine" in name)


@pytest.fixture(scope="session")
def hosts_hostnames(backend: Backend) -> list[str]:
    return sorted(name for name in backend.hostnames() if "host" in name)


@pytest.fixture(scope="session")
def storage_hostname(backend: Backend) -> str:
    return next(name for name in backend.hostnames() if "storage" in name)


@pytest.fixture(scope="session")
def tested_ip_version(backend: Backend) -> int:
    management = next(iter(backend.ips.values()))["management"]
    return 6 if any(ip.version == 6 for ip in management) else 4


class ModuleMapper:
    """``ansible_host0.shell("uptime")``: an ansible module on the hosts of a pattern, through
    ansible-runner and the deployment's inventory, as OST's ost_utils.ansible does."""

    def __init__(self, inventory: str, pattern: str) -> None:
        self.inventory = inventory
        self.pattern = pattern

    def __getattr__(self, module: str):
        def call(*args: str, **kwargs: object) -> dict:
            module_args = " ".join([*args, *(f"{k}={shlex.quote(str(v))}" for k, v in kwargs.items())])
            with tempfile.TemporaryDirectory() as private:
                run = ansible_runner.run(private_data_dir=private, inventory=self.inventory, host_pattern=self.pattern,
                                         module=module, module_args=module_args, quiet=True)
                results = {e["event_data"]["host"]: e["event_data"]["res"] for e in run.events
                           if e.get("event") in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable")}
            if run.status != "successful":
                raise AssertionError(f"ansible {module} {module_args!r} on {self.pattern}: {run.status}: {results}")
            return results[self.pattern] if self.pattern in results else results

        return call


@pytest.fixture(scope="session")
def ansible_by_hostname(working_dir: str):
    return lambda pattern: ModuleMapper(os.path.join(working_dir, "hosts"), pattern)


@pytest.fixture(scope="session")
def ansible_engine(ansible_by_hostname, engine_hostname):
    return ansible_by_hostname(engine_hostname)


@pytest.fixture(scope="session")
def ansible_storage(ansible_by_hostname, storage_hostname):
    return ansible_by_hostname(storage_hostname)


@pytest.fixture(scope="session")
def ansible_host0(ansible_by_hostname, hosts_hostnames):
    return ansible_by_hostname(hosts_hostnames[0])


@pytest.fixture(scope="session")
def ansible_hosts(ansible_by_hostname, hosts_hostnames):
    return ansible_by_hostname(f"~({'|'.join(hosts_hostnames)})")


@pytest.fixture(scope="session")
def ansible_host0_facts(ansible_host0) -> dict:
    return ansible_host0.setup()["ansible_facts"]


@checkpoint(files=["../common/checkpoint/ost-enrolled.service"])
def hosts_enrolled(ansible_engine, ansible_hosts, engine_hostname, hosts_hostnames) -> dict:
    """The engine enrolls every host, as OST's engine adds hosts: it gets a root SSH key of its
    own, every host authorizes it, the engine pins each host's key (by name) and then serves the
    list of enrolled hosts. The saved state holds that trust: restored VMs keep their identity."""
    # ed25519: made at once (a 4096-bit RSA key takes an emulated guest 12-15 s)
    ansible_engine.shell("ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/engine_id_ed25519")
    key = ansible_engine.shell("cat /root/.ssh/engine_id_ed25519.pub")["stdout"]
    ansible_hosts.shell(f"echo {shlex.quote(key)} >>/root/.ssh/authorized_keys")
    for host in hosts_hostnames:
        ansible_engine.shell(f"ssh-keyscan -t ed25519 {host} >>/root/.ssh/known_hosts")
    service = os.path.join(os.path.dirname(__file__), "..", "common", "checkpoint", "ost-enrolled.service")
    ansible_engine.copy(src=service, dest="/etc/systemd/system/ost-enrolled.service")
    ansible_engine.shell(f"mkdir -p /srv/ost-enrolled && printf '%s\\n' {' '.join(hosts_hostnames)} "
                         f">/srv/ost-enrolled/enrolled && systemctl daemon-reload && systemctl enable --now ost-enrolled")
    return {"hosts": hosts_hostnames, "url": f"http://{engine_hostname}:8080/enrolled"}
