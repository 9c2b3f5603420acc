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

import shlex

from .keys import HostKey

MODES = ("auto", "keep")


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
