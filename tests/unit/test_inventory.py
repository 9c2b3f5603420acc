"""The ansible inventories: ours (any suite) and OST's hosts file."""

from __future__ import annotations

import configparser
import ipaddress
from pathlib import Path
from types import SimpleNamespace

from pytest_ostimages.lab.access import write_inventory, write_ost_hosts


def vm(role: str, n: int, dual: bool = True) -> SimpleNamespace:
    return SimpleNamespace(role=role, hostname=f"{role}.ost.test", ip=ipaddress.IPv4Address(f"192.0.2.{n}"),
                           ip6=ipaddress.IPv6Address(f"fd00::{n}") if dual else None)


def test_numbered_roles_are_grouped_and_nothing_prompts(tmp_path: Path) -> None:
    vms = [vm("engine", 10), vm("host0", 11), vm("host1", 12, dual=False), vm("storage", 13)]
    path = write_inventory(tmp_path / "inventory", vms, Path("/w/key"), Path("/w/known_hosts"))
    parser = configparser.ConfigParser(allow_no_value=True, delimiters=(" ",))
    parser.read(path)
    # no group named like a host (ansible warns about those)
    assert {s: [line.split()[0] for line in parser[s]] for s in parser.sections()} == {
        "ungrouped": ["engine", "storage"], "hosts": ["host0", "host1"]}
    text = path.read_text()
    assert "host0 ansible_host=fd00::11 " in text and "host1 ansible_host=192.0.2.12 " in text  # IPv6 first, as OST
    assert "ansible_ssh_common_args='-o UserKnownHostsFile=/w/known_hosts -o GlobalKnownHostsFile=/dev/null " \
           "-o StrictHostKeyChecking=yes'" in text
    assert all(line.endswith(" ansible_pipelining=true") for line in text.splitlines() if "ansible_host=" in line)


def test_ost_hosts_file_has_lagofys_line_format(tmp_path: Path) -> None:
    vms = [SimpleNamespace(**{**vars(vm("engine", 10)), "hostname": "ost-basic-suite-engine.ost.test"})]
    text = write_ost_hosts(tmp_path / "hosts", vms, Path("/w/key"), Path("/w/kh")).read_text()
    assert text.startswith("ost-basic-suite-engine ansible_host=fd00::10 ansible_ssh_private_key_file=/w/key "
                           "ansible_ssh_extra_args='-o UserKnownHostsFile=/w/kh ")
    assert text.endswith("' ansible_pipelining=true\n")  # after what lagofy.sh's own sed reads
