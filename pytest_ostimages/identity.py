"""Each VM its own identity (machine-id, SSH host key, hostname), and its host key pinned.

VMs cloned from one layer share what the image was built with: machine-id, SSH
host keys, hostname (ost-images are kickstart installs). Without virt-sysprep and
without touching installed images, each VM gets its own right after its SSH first
answers and before any test sees it (``--ost-identity=auto``):

- a new random machine-id (systemd-machine-id-setup),
- an ed25519 host key made here, in this process, so it is known before the guest
  ever offers it; the image's host keys are removed,
- its hostname: the role as short name, the FQDN on the management network,
- sshd reloaded, then the connection made again against the pinned key.

Why over SSH and not systemd credentials over SMBIOS: the ``system.hostname`` and
``system.machine_id`` credentials need systemd 254; EL9 and Debian 12 guests have
252. From then on every connection checks the host key (paramiko's RejectPolicy):
another machine answering at a VM's address is an error naming both fingerprints.
``--ost-identity=keep`` changes nothing in the guest and pins the key it offered at
first contact, inside the session's own, just-created network.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .files import write_atomic

if TYPE_CHECKING:
    from .vm import VM

MODES = ("auto", "keep")


@dataclass(frozen=True)
class HostKey:
    """An SSH host key pair: the private half in OpenSSH format, the public one as a line."""

    private: str
    public: str  # "ssh-ed25519 AAAA..."

    @classmethod
    def generate(cls) -> "HostKey":
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        return cls(private, public)

    def pkey(self) -> paramiko.PKey:
        return public_key(self.public)


def public_key(line: str) -> paramiko.PKey:
    """A public key from an OpenSSH line ("ssh-ed25519 AAAA... comment")."""
    kind, data = line.split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


def fingerprint(key: paramiko.PKey) -> str:
    """As OpenSSH shows it: SHA256:<base64, no padding>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def openssh_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def fixup_script(short: str, fqdn: str, ip: str, key: HostKey, sshd: str = "reload") -> str:
    """The guest side, one command: new machine-id, host key `key`, the hostname, then sshd
    `reload`ed (over SSH: the session that runs it survives) or `restart`ed (through the guest
    agent: it returns once only the new sshd listens, so no login can meet the old key)."""
    s = shlex.quote(short)
    return "\n".join([
        "set -e",
        "rm -f /etc/machine-id /var/lib/dbus/machine-id",
        "systemd-machine-id-setup >/dev/null",
        "if [ -d /var/lib/dbus ]; then ln -sf /etc/machine-id /var/lib/dbus/machine-id; fi",
        "rm -f /etc/ssh/ssh_host_*",
        "umask 077",
        "cat >/etc/ssh/ssh_host_ed25519_key <<'OST_HOST_KEY'",
        key.private.strip(),
        "OST_HOST_KEY",
        f"echo {shlex.quote(key.public)} >/etc/ssh/ssh_host_ed25519_key.pub",
        "chmod 0644 /etc/ssh/ssh_host_ed25519_key.pub",
        f"echo {s} >/etc/hostname",
        f"hostname {s}",
        hosts_line(ip, short, fqdn),
        # reload = SIGHUP: sshd re-executes itself with only the new key, on the same socket
        f"systemctl {sshd} sshd 2>/dev/null || systemctl {sshd} ssh",
    ]) + "\n"


def hosts_line(ip: str, short: str, fqdn: str) -> str:
    """A command that maps the hostname to the VM's own management address (not 127.0.1.1:
    the VM resolves its name as the others do), so that ``hostname -f`` is the FQDN."""
    return (f"sed -i '/# ost-identity$/d' /etc/hosts && printf '%s %s %s # ost-identity\\n' "
            f"{shlex.quote(ip)} {shlex.quote(fqdn)} {shlex.quote(short)} >>/etc/hosts")


def known_hosts_line(names: list[str], key: paramiko.PKey) -> str:
    return f"{','.join(names)} {openssh_line(key)}\n"



def write_ssh_files(folder: Path, run_id: str, private_key: Path, vms: Iterable["VM"]) -> None:
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
        f"    StrictHostKeyChecking yes\n    BatchMode yes\n"))
