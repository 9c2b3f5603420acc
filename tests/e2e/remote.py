"""A remote hypervisor on this one machine, for end-to-end tests of ``qemu+ssh://`` sessions.

As shared/LAB.md ("A remote hypervisor on one machine") describes it:

- the hypervisor: this network namespace (the lab's, where the e2e tests run, with its libvirtd),
  plus an sshd of its own on a veth address; with ``count=2``, two sshds on two addresses of
  this namespace stand for two hypervisors (both reach the same libvirtd and kernel);
- the client: a network namespace of the rig's whose only route is that veth's /24: it reaches
  the hypervisors' sshds and nothing of the VMs' networks. Its commands run in a private mount
  namespace where the images directory, the RPM database, the plugin's work root and its lock
  directory are empty tmpfs, and where ``~/.ssh`` is the rig's: ``known_hosts`` with the sshds'
  host keys, and whatever a test adds (a ``config``). ``~`` is the passwd home (ssh ignores
  $HOME; HOME is set to it too), whose ``.ssh`` the rig's replaces: the rest of it stays (pyenv's
  Python lives there on these machines).

Everything runs as root (as CI does). Whatever the test does, the block's end removes what the
rig made: the client's processes, its namespace, the veth, the sshds and their sessions, the
temporary files, and the mount points it had to create (if still empty).

    with remote_hypervisor() as hv:
        done = hv.run(["virsh", "-c", hv.uris[0], "version"])
        session = hv.popen([sys.executable, "-m", "pytest", ...], stdout=subprocess.PIPE)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import pytest

from pytest_ostimages.config import default_workdir
from pytest_ostimages.hypervisor.locks import LOCK_DIR, LOCK_DIR_VARIABLE, locked

from ..unit.sshd import Sshd, make_key, missing, running_sshd

POOL = ipaddress.IPv4Network("10.99.0.0/16")  # the rig's /24 comes from here, clear of every route
CLIENT_HOST = 100  # the client's address in the /24: .100; the hypervisors' are .1, .2, ...
SETUP_LOCK = Path(tempfile.gettempdir()) / "pytest-ostimages-e2e-remote.lock"  # one rig set up at a time

# Run as the client: $1 the client's network namespace, $2 the rig's .ssh (bind-mounted over
# $3, ~/.ssh), $4 how many paths follow to hide under an empty tmpfs; then the command.
CLIENT_SCRIPT = r"""ns=$1 ssh_dir=$2 home_ssh=$3 n=$4
shift 4
mount --bind "$ssh_dir" "$home_ssh" || exit 125
while [ "$n" -gt 0 ]; do
    mount -t tmpfs -o mode=0755,size=64m ost-client-hidden "$1" || exit 125
    shift; n=$((n - 1))
done
exec ip netns exec "$ns" "$@"
"""


@dataclass
class RemoteHypervisor:
    """What remote_hypervisor() yields: the URIs, the client's home, and a way to run as the client."""

    uris: list[str]  # qemu+ssh://root@ADDRESS/system?keyfile=KEY, one per hypervisor
    addresses: list[str]  # the hypervisors' sshd addresses (port 22)
    subnet: ipaddress.IPv4Network
    client_address: str
    client_netns: str
    home: Path  # a folder of the rig's: its .ssh is the client's ~/.ssh (write a config there, say)
    passwd_home: str  # the client's HOME: the uid's passwd home, e.g. /root, with home/.ssh as its .ssh
    key: Path  # the private key in the URIs' keyfile= (readable by the client)
    hidden: tuple[str, ...]  # empty tmpfs for the client
    sshds: list[Sshd] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.uris[0]

    def env(self, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """The client's environment: this one, HOME the client's, no ssh agent, then `extra`."""
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")}
        env["HOME"] = self.passwd_home
        env.update(extra or {})
        return env

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` as the client (see the module's docstring)."""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", CLIENT_SCRIPT, "sh",
                self.client_netns, str(self.home / ".ssh"), f"{self.passwd_home}/.ssh", str(len(self.hidden)),
                *self.hidden, *argv]

    def run(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
            check: bool = False, **kwargs: Any) -> "subprocess.CompletedProcess[str]":
        """Run `argv` as the client; output captured as text unless `kwargs` say otherwise."""
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), env=self.env(env), timeout=timeout, check=check, **kwargs)

    def popen(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              **kwargs: Any) -> "subprocess.Popen[Any]":
        """Start `argv` as the client. Its pid is the command's own (unshare, sh and ip exec it):
        kill() kills the client itself."""
        return subprocess.Popen(self.command(argv), env=self.env(env), **kwargs)

    def stop_sshd(self, index: int = 0) -> None:
        """Stop hypervisor `index`'s sshd and its sessions: that hypervisor becomes unreachable."""
        self.sshds[index].stop()

    def client_pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.client_netns], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]


@contextlib.contextmanager
def remote_hypervisor(count: int = 1, hide: Sequence[str] = (),
                      hidden: Optional[Sequence[str]] = None) -> Iterator[RemoteHypervisor]:
    """`count` hypervisors across SSH, and a client that holds nothing of theirs (module docstring).

    `hidden`: the paths the client sees as empty (default: the images, the RPM database, the work
    root, the lock directory); `hide`: more of them (e.g. a test's own work root).
    """
    why = missing()
    if why is not None:
        pytest.skip(f"the remote hypervisor rig {why}")
    if os.geteuid() != 0:
        pytest.skip("the remote hypervisor rig needs root (network namespaces, mounts)")
    if _current_netns() is None:
        pytest.skip("the remote hypervisor rig runs in the lab's network namespace, never in this machine's "
                    "own: run the e2e tests inside the lab (.ci/lab run -- pytest tests/e2e)")
    tag = secrets.token_hex(3)
    netns, veth = f"ost-client-{tag}", f"ostrv{tag}"
    passwd_home = pwd.getpwuid(os.getuid()).pw_dir
    directory = Path(tempfile.mkdtemp(prefix="ost-remote-"))
    made_points: list[Path] = []
    with contextlib.ExitStack() as undo:
        undo.callback(shutil.rmtree, directory, ignore_errors=True)
        home = directory / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        key = directory / "client_key"
        make_key(key, comment=f"ost-remote-{tag}")
        with locked(SETUP_LOCK):  # two rigs must not take the same /24
            subnet = _free_subnet()
            hosts = list(subnet.hosts())
            addresses = [str(hosts[i]) for i in range(count)]
            client = str(hosts[CLIENT_HOST - 1])
            _ip("netns", "add", netns)
            undo.callback(_remove_netns, netns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "hv0", "netns", netns)
            undo.callback(_ip, "link", "del", veth, check=False)
            for address in addresses:
                _ip("addr", "add", f"{address}/{subnet.prefixlen}", "dev", veth)
            _ip("link", "set", veth, "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "addr", "add", f"{client}/{subnet.prefixlen}", "dev", "hv0")
            _ip("-n", netns, "link", "set", "hv0", "up")
        servers = [undo.enter_context(running_sshd(directory / f"sshd{i}", address=address, port=22,
                                                   client_key=key))
                   for i, address in enumerate(addresses)]
        (home / ".ssh" / "known_hosts").write_text("".join(s.known_hosts_line() + "\n" for s in servers))
        paths = list(hidden) if hidden is not None else _default_hidden()
        paths += [p for p in hide if p not in paths]
        # a mount point must exist: make what is missing (removed after, if still empty)
        for path in [*paths, f"{passwd_home}/.ssh"]:
            missing_dirs = [p for p in (Path(path), *Path(path).parents) if not p.exists()]
            for point in reversed(missing_dirs):
                point.mkdir()
                made_points.append(point)
        undo.callback(_remove_empty, made_points)
        rig = RemoteHypervisor(
            uris=[f"qemu+ssh://root@{address}/system?keyfile={key}" for address in addresses],
            addresses=addresses, subnet=subnet, client_address=client, client_netns=netns, home=home,
            passwd_home=passwd_home, key=key, hidden=tuple(paths), sshds=servers)
        undo.callback(_kill_clients, rig)
        yield rig


@pytest.fixture
def remote_hv() -> Iterator[RemoteHypervisor]:
    """One remote hypervisor (remote_hypervisor()); a test module imports this fixture to use it."""
    with remote_hypervisor() as rig:
        yield rig


def _current_netns() -> Optional[str]:
    """The name of the network namespace this process is in (None: an unnamed one, the machine's own)."""
    mine = os.stat("/proc/self/ns/net").st_ino
    folder = Path("/run/netns")
    for entry in folder.iterdir() if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            if entry.stat().st_ino == mine:
                return entry.name
    return None


def _ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of POOL that no route or address of this namespace touches."""
    used = []
    for kind in ("route", "addr"):
        out = subprocess.run(["ip", "-j", "-4", kind], capture_output=True, text=True, check=True).stdout
        for entry in json.loads(out or "[]"):
            if kind == "route" and entry.get("dst") not in (None, "default"):
                dst = entry["dst"] if "/" in entry["dst"] else f"{entry['dst']}/32"
                used.append(ipaddress.IPv4Network(dst, strict=False))
            for info in entry.get("addr_info", []) if kind == "addr" else []:
                used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for candidate in POOL.subnets(new_prefix=24):
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise RuntimeError(f"no free /24 in {POOL} for the remote hypervisor rig")


def _default_hidden() -> list[str]:
    """What a client that holds nothing of the hypervisor's must not see."""
    paths = [os.environ.get("OST_IMAGES_DIR") or "/usr/share/ost-images",
             os.environ.get("OST_WORKDIR") or str(default_workdir())]
    rpm = shutil.which("rpm")
    if rpm is not None:
        dbpath = subprocess.run([rpm, "--eval", "%_dbpath"], capture_output=True, text=True).stdout.strip()
        paths += [dbpath] if dbpath.startswith("/") else []
    paths += ["/var/lib/rpm"] if Path("/var/lib/rpm").is_dir() else []
    paths += [str(LOCK_DIR)] if LOCK_DIR.parent.is_dir() else []
    paths += [os.environ[LOCK_DIR_VARIABLE]] if os.environ.get(LOCK_DIR_VARIABLE) else []
    return list(dict.fromkeys(paths))


def _kill_clients(rig: RemoteHypervisor) -> None:
    for pid in rig.client_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove_netns(name: str) -> None:
    for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def _remove_empty(points: list[Path]) -> None:
    for point in reversed(points):
        with contextlib.suppress(OSError):
            point.rmdir()  # only if still empty: the hypervisor's side may have used it since
