"""A real OpenSSH server for tests: its own host key, config, pid file and authorized key.

Not a mock: the plugin's SSH code (hypervisor/remote.py) meets the sshd that real hypervisors
run, with its key exchange, host key, SFTP server, session limits and forwarding. Everything
the server uses lives in one directory of the test's; it listens where the test says (loopback
for the unit tests, a veth address for the end-to-end rig in tests/e2e/remote.py) and is
stopped, with the sessions it forked, when the block ends.

Needs ``/usr/sbin/sshd`` (Debian: openssh-server, which .ci/setup installs); the tests that use
it are skipped, saying so, without it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")  # Debian's; the default sshd_config names it too
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start as root without it; Debian's init script makes it


def missing() -> Optional[str]:
    """Why no sshd can run here (None: it can)."""
    if not SSHD.exists():
        return f"needs {SSHD} (Debian package openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "needs ssh-keygen (Debian package openssh-client)"
    return None


def make_key(path: Path, comment: str = "ost-test") -> str:
    """A new ed25519 key pair at `path` (and `path`.pub); returns the public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_name(path.name + ".pub").read_text().strip()


def free_port(address: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def known_hosts_name(address: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: ``[address]:port`` unless the port is 22."""
    return address if port == 22 else f"[{address}]:{port}"


@dataclass
class Sshd:
    """A running sshd (see the module's docstring)."""

    directory: Path
    address: str
    port: int
    host_key: Path  # the private half; the public line is host_key_line
    host_key_line: str  # "ssh-ed25519 AAAA... comment"
    client_key: Path  # a private key the server accepts for the current user
    process: "subprocess.Popen[bytes]"
    log: Path

    @property
    def destination(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    def known_hosts_line(self) -> str:
        return f"{known_hosts_name(self.address, self.port)} {self.host_key_line}"

    def uri(self, user: Optional[str] = None, keyfile: Optional[Path] = None) -> str:
        """A libvirt URI naming this server (``qemu+ssh://user@address:port/system?keyfile=...``)."""
        user = user if user is not None else _user()
        port = "" if self.port == 22 else f":{self.port}"
        key = keyfile if keyfile is not None else self.client_key
        return f"qemu+ssh://{user}@{self.destination}{port}/system?keyfile={key}"

    def sessions(self) -> list[int]:
        """The pids of the per-connection processes this server forked (and theirs)."""
        return _descendants(self.process.pid)

    def stop(self) -> None:
        """Stop the server and every session it forked (sshd leaves those running on SIGTERM)."""
        children = self.sessions()
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@contextlib.contextmanager
def running_sshd(directory: Path, address: str = "127.0.0.1", port: Optional[int] = None,
                 client_key: Optional[Path] = None, extra_config: Sequence[str] = ()) -> Iterator[Sshd]:
    """Start sshd listening on `address`:`port` (a free port if None) with its files in `directory`.

    `client_key`: the key it accepts (made in `directory` if None). Stopped when the block ends.
    """
    why = missing()
    if why is not None:
        raise RuntimeError(why)
    directory.mkdir(parents=True, exist_ok=True)
    host_key = directory / "ssh_host_ed25519_key"
    if not host_key.exists():
        make_key(host_key, comment="ost-test-host")
    if client_key is None:
        client_key = directory / "client_key"
        if not client_key.exists():
            make_key(client_key, comment="ost-test-client")
    authorized = directory / "authorized_keys"
    authorized.write_text(client_key.with_name(client_key.name + ".pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    port = port if port is not None else free_port(address)
    listen = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    sftp = str(SFTP_SERVER) if SFTP_SERVER.exists() else "internal-sftp"
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",  # the test's files live under /tmp, which StrictModes refuses
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes",
        "PrintMotd no",
        "ClientAliveInterval 5",
        "ClientAliveCountMax 3",
        f"Subsystem sftp {sftp}",
        "LogLevel ERROR",
        *extra_config,
    ]) + "\n")
    log = directory / "sshd.log"
    process = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(log)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Sshd(directory, address, port, host_key,
                  host_key.with_name(host_key.name + ".pub").read_text().strip(), client_key, process, log)
    try:
        _wait_listening(server)
        yield server
    finally:
        server.stop()


def _wait_listening(server: Sshd, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"sshd exited with {server.process.returncode} as it started: "
                               f"{server.log.read_text(errors='replace').strip() if server.log.exists() else ''}")
        try:
            with socket.create_connection((server.address, server.port), timeout=1) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not answer on {server.address}:{server.port} within {timeout} s")
        time.sleep(0.02)
