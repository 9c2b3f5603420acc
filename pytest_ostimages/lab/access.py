"""How people and tools log into a session's VMs: ``ssh_config`` and ``known_hosts``, an ansible
inventory (any suite) and OST's ``hosts`` file.

All log in as root with the distro's key and check host keys against the
session's pinned ``known_hosts`` (write_ssh_files), so ansible never
prompts and never accepts a VM answering in another's place. On a remote
hypervisor every one of them goes through that machine's sshd (`jump`: an
OpenSSH ProxyCommand, as ``ssh -J`` would), since only it reaches the VMs.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from ..config import role_kind
from ..guest.keys import known_hosts_line
from ..state.files import write_atomic

if TYPE_CHECKING:
    from ..guest.vm import VM


def ssh_args(known_hosts: Path, jump: Optional[str] = None) -> str:
    proxy = f" -o {shlex.quote(f'ProxyCommand={jump}')}" if jump else ""
    return (f"-o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null "
            f"-o StrictHostKeyChecking=yes{proxy}")


def address(vm: "VM") -> str:
    """Where ansible reaches a VM: its IPv6 address on a dual-stack network, as OST does."""
    return str(vm.ip6 or vm.ip)


def group(role: str) -> str:
    """The group of a numbered role (host0, host-1: hosts); others are reached by name (ungrouped)."""
    kind = role_kind(role)
    return f"{kind}s" if kind != role else "ungrouped"


# Each module is fed to the guest's python over the SSH session that runs it, not copied there first
# and removed after: one SSH command per module instead of three or four (3.9 -> 2.8 s a call under TCG,
# bench/README.md). All log in as root, so no sudo `requiretty` stands in the way.
PIPELINING = "ansible_pipelining=true"


def write_inventory(path: Path, vms: Iterable["VM"], key: Path, known_hosts: Path, jump: Optional[str] = None) -> Path:
    """An INI inventory, hosts named by role: numbered roles grouped by family (hosts), the others
    (engine, storage) by their own name."""
    groups: dict[str, list[str]] = {}
    for vm in vms:
        groups.setdefault(group(vm.role), []).append(
            f"{vm.role} ansible_host={address(vm)} ansible_user=root "
            f"ansible_ssh_private_key_file={key} ansible_python_interpreter=/usr/bin/python3 "
            f"ansible_ssh_common_args={shlex.quote(ssh_args(known_hosts, jump))} {PIPELINING}")
    write_atomic(path, "".join(f"[{name}]\n" + "\n".join(lines) + "\n\n" for name, lines in groups.items()))
    return path


def write_ost_hosts(path: Path, vms: Iterable["VM"], key: Path, known_hosts: Path, jump: Optional[str] = None) -> Path:
    """OST's ``$OST_DEPLOYMENT/hosts``: the line lagofy.sh writes per VM, named by its host name
    (pipelining added at its end, where lagofy.sh's own parsing of the line does not look)."""
    write_atomic(path, "".join(
        f"{vm.hostname.split('.')[0]} ansible_host={address(vm)} ansible_ssh_private_key_file={key} "
        f"ansible_ssh_extra_args={shlex.quote(ssh_args(known_hosts, jump))} {PIPELINING}\n" for vm in vms))
    return path


def write_ssh_files(folder: Path, run_id: str, private_key: Path, vms: Iterable["VM"],
                    jump: Optional[str] = None) -> None:
    """`folder`/known_hosts (every pinned key) and `folder`/ssh_config: ``ssh -F it engine``."""
    pinned = [(vm, vm.host_key) for vm in vms if vm.host_key is not None]
    known = folder / "known_hosts"
    write_atomic(known, "".join(known_hosts_line(list(dict.fromkeys(
        [str(vm.ip), *([str(vm.ip6)] if vm.ip6 else []), vm.hostname, vm.hostname.split(".")[0], vm.role])), key)
                                for vm, key in pinned))
    hosts = "".join(f"Host {vm.role} {vm.hostname}\n    HostName {vm.ip}\n" for vm, _ in pinned)
    write_atomic(folder / "ssh_config", (
        f"# VMs of pytest-ostimages run {run_id}: ssh -F {folder}/ssh_config ROLE\n{hosts}"
        f"Host *\n    User root\n    IdentityFile {private_key}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known}\n    GlobalKnownHostsFile /dev/null\n"
        f"    StrictHostKeyChecking yes\n    BatchMode yes\n" + (f"    ProxyCommand {jump}\n" if jump else "")))
