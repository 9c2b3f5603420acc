"""SSH host keys: made here (ed25519), read from OpenSSH lines, shown as OpenSSH shows them."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


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


def known_hosts_line(names: list[str], key: paramiko.PKey) -> str:
    return f"{','.join(names)} {openssh_line(key)}\n"
