"""Each VM its own identity (machine-id, SSH host key, hostname), and its host key pinned.

VMs cloned from one layer share what the image was built with: machine-id, SSH
host keys, hostname (ost-images are kickstart installs). Without virt-sysprep and
without touching installed images, each VM gets its own right after its SSH first
answers and before any test sees it (``--ost-identity=auto``):

- a new random machine-id (systemd-machine-id-setup),
- an ed25519 host key made here, in this process, so it is known before the guest
  ever offers it; the image's host keys are removed,
- its hostname: the role as short name, the FQDN on the management network,
- sshd restarted, then the connection made again against the pinned key.

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

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MODES = ("auto", "keep")
UPLOAD = "/root/.ost-identity-key"  # where the new host key waits until it is installed


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


def fixup_script(short: str, fqdn: str) -> str:
    """The guest side: new machine-id, the uploaded host key, the hostname, sshd restarted."""
    s, f = shlex.quote(short), shlex.quote(fqdn)
    return "\n".join([
        "set -e",
        "rm -f /etc/machine-id /var/lib/dbus/machine-id",
        "systemd-machine-id-setup >/dev/null",
        "if [ -d /var/lib/dbus ]; then ln -sf /etc/machine-id /var/lib/dbus/machine-id; fi",
        "rm -f /etc/ssh/ssh_host_*",
        f"install -m 0600 {UPLOAD} /etc/ssh/ssh_host_ed25519_key",
        f"install -m 0644 {UPLOAD}.pub /etc/ssh/ssh_host_ed25519_key.pub",
        f"rm -f {UPLOAD} {UPLOAD}.pub",
        f"echo {s} >/etc/hostname",
        f"hostname {s}",
        "sed -i '/# ost-identity$/d' /etc/hosts",
        f"printf '127.0.1.1 %s %s # ost-identity\\n' {f} {s} >>/etc/hosts",
        # Type=notify: restart returns once the new sshd, with only the new key, listens
        "systemctl restart sshd 2>/dev/null || systemctl restart ssh",
    ]) + "\n"


def upload(sftp: paramiko.SFTPClient, key: HostKey) -> None:
    for path, text, mode in ((UPLOAD, key.private, 0o600), (f"{UPLOAD}.pub", key.public + "\n", 0o644)):
        with sftp.open(path, "w") as out:
            out.chmod(mode)
            out.write(text)


def known_hosts_line(names: list[str], key: paramiko.PKey) -> str:
    return f"{','.join(names)} {openssh_line(key)}\n"

