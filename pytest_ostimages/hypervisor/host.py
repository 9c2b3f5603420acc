"""The hypervisor's side: its files, its commands, its locks, and the way to its guests.

A session's VMs run where its libvirt URI says: on this machine (``qemu:///system``) or on
another one (``qemu+ssh://user@host/system``). Everything the plugin does there besides
libvirt's own API goes through one :class:`Host`: reading the installed images and their
RPM database, making overlays and seeds, saving and restoring states, locking, finding
free subnets, reaching a guest's sshd. The code above never asks which one it has.

- :class:`LocalHost`: this machine; paths are ``pathlib.Path``, commands are processes,
  locks are files under the host-wide lock directory (state/files.py), a guest is a TCP
  connection away. Exactly what a local session always did, at the same cost.
- ``SSHHost`` (hypervisor/remote.py): another machine over SSH, with the identity and
  host key checking that libvirt's own ``qemu+ssh`` transport uses; paths are SFTP paths,
  commands run there, locks are ``flock`` held by a process there for as long as the
  channel lives, a guest is a ``direct-tcpip`` channel through that machine's sshd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ContextManager, Iterator, Optional, Protocol, Sequence, Union

from .locks import any_host_slot, host_lock, host_lock_if_free


@dataclass(frozen=True)
class Completed:
    """A command that ran on the hypervisor (like subprocess.CompletedProcess, stdout as bytes)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class Process(Protocol):
    """A command left running on the hypervisor (a FIFO's feeder, a lock's holder)."""

    def wait(self, timeout: Optional[float] = None) -> int: ...

    def kill(self) -> None: ...


class HostPath(Protocol):
    """A path on the hypervisor: the part of ``pathlib.Path`` the plugin uses."""

    @property
    def name(self) -> str: ...

    @property
    def parent(self) -> "HostPath": ...

    @property
    def suffix(self) -> str: ...

    @property
    def stem(self) -> str: ...

    def __truediv__(self, other: str) -> "HostPath": ...

    def with_name(self, name: str) -> "HostPath": ...

    def exists(self) -> bool: ...

    def is_file(self) -> bool: ...

    def is_dir(self) -> bool: ...

    def is_symlink(self) -> bool: ...

    def stat(self) -> os.stat_result: ...

    def lstat(self) -> os.stat_result: ...

    def read_bytes(self) -> bytes: ...

    def read_text(self, errors: Optional[str] = None) -> str: ...

    def write_bytes(self, data: bytes) -> int: ...

    def write_text(self, data: str) -> int: ...

    def open(self, mode: str = "r") -> IO[Any]: ...

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None: ...

    def unlink(self, missing_ok: bool = False) -> None: ...

    def rmdir(self) -> None: ...

    def rename(self, target: Any) -> Any: ...

    def replace(self, target: Any) -> Any: ...

    def chmod(self, mode: int) -> None: ...

    def iterdir(self) -> Iterator["HostPath"]: ...

    def glob(self, pattern: str) -> Iterator["HostPath"]: ...

    def rglob(self, pattern: str) -> Iterator["HostPath"]: ...


AnyPath = Union[Path, HostPath]


class Host(Protocol):
    """The hypervisor's side of a session (see the module's docstring)."""

    uri: str  # the libvirt URI that names it
    local: bool  # this machine: its paths are this process's own
    jump: Optional[str]  # how OpenSSH on this machine reaches its guests: a ProxyCommand (None: directly)

    @property
    def name(self) -> str:
        """How messages name it: "this host", or the SSH destination."""
        ...

    def path(self, path: Union[str, Path]) -> HostPath:
        """A path on the hypervisor."""
        ...

    def run(self, argv: Sequence[str], input: Optional[bytes] = None, timeout: Optional[float] = None) -> Completed:
        """Run a command there; `timeout` a deadline for all of it (TimeoutError after it)."""
        ...

    def spawn(self, argv: Sequence[str], input: Optional[bytes] = None) -> Process:
        """Start a command there and leave it running; `input` is its whole stdin."""
        ...

    def uid(self) -> int:
        """The uid the plugin's files there belong to (this process's, or the SSH user's)."""
        ...

    def default_root(self) -> HostPath:
        """Where sessions keep their files there unless told (per user: /var/tmp/pytest-ostimages-<user>)."""
        ...

    def lock(self, name: str) -> ContextManager[None]:
        """Hold the host-wide lock `name` there (every session using that hypervisor agrees)."""
        ...

    def lock_if_free(self, name: str) -> ContextManager[bool]:
        """Hold the host-wide lock `name` if nobody holds it; yields whether it is held."""
        ...

    def any_slot(self, prefix: str, count: int, abort: threading.Event) -> ContextManager[float]:
        """Hold one of `count` host-wide locks ``<prefix>-<i>``; yields the seconds waited."""
        ...

    def rmtree(self, path: AnyPath) -> None:
        """Remove a folder there and all in it (what is gone already is no error)."""
        ...

    def copyfile(self, source: AnyPath, target: AnyPath) -> None:
        """Copy a file there (sparse where the filesystem allows), mode 0600."""
        ...

    def chown(self, path: AnyPath, uid: int, gid: int) -> None:
        """chown(2) there (-1 leaves one as it is)."""
        ...

    def set_reader_acl(self, path: AnyPath, uid: int) -> None:
        """A POSIX ACL there: read for `uid`, nothing for the group and others (OSError if refused)."""
        ...

    def mkfifo(self, path: AnyPath, mode: int = 0o600) -> None:
        """A FIFO there."""
        ...

    def guest_socket(self, address: str, port: int, timeout: float) -> Any:
        """A connected stream to `address`:`port` on one of the hypervisor's networks (a guest's sshd),
        for paramiko's `sock=`; None when nothing accepts there (yet)."""
        ...

    def close(self) -> None:
        ...


class _LocalProcess:
    def __init__(self, process: "subprocess.Popen[bytes]", input: Optional[bytes]) -> None:
        self.process = process
        self.feeder = threading.Thread(target=self._feed, args=(input,), daemon=True)
        self.feeder.start()

    def _feed(self, input: Optional[bytes]) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # the command ended (or was killed) before it read it all
            if input:
                self.process.stdin.write(input)
            self.process.stdin.close()

    def wait(self, timeout: Optional[float] = None) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()


class LocalHost:
    """This machine (see the module's docstring): what the plugin always did, no indirection."""

    local = True
    jump = None

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @property
    def name(self) -> str:
        return "this host"

    def path(self, path: Union[str, Path]) -> Path:
        return Path(path)

    def run(self, argv: Sequence[str], input: Optional[bytes] = None, timeout: Optional[float] = None) -> Completed:
        try:
            done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{argv[0]} did not finish within {timeout} s") from None
        return Completed(tuple(argv), done.returncode, done.stdout, done.stderr.decode(errors="replace"))

    def spawn(self, argv: Sequence[str], input: Optional[bytes] = None) -> _LocalProcess:
        process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        return _LocalProcess(process, input)

    def uid(self) -> int:
        return os.getuid()

    def default_root(self) -> Path:
        from ..config import default_workdir

        return default_workdir()

    def lock(self, name: str) -> ContextManager[None]:
        return host_lock(name)

    def lock_if_free(self, name: str) -> ContextManager[bool]:
        return host_lock_if_free(name)

    def any_slot(self, prefix: str, count: int, abort: threading.Event) -> ContextManager[float]:
        return any_host_slot(prefix, count, abort)

    def rmtree(self, path: AnyPath) -> None:
        shutil.rmtree(str(path), ignore_errors=True)

    def copyfile(self, source: AnyPath, target: AnyPath) -> None:
        shutil.copyfile(str(source), str(target))
        os.chmod(str(target), 0o600)

    def chown(self, path: AnyPath, uid: int, gid: int) -> None:
        os.chown(str(path), uid, gid)

    def set_reader_acl(self, path: AnyPath, uid: int) -> None:
        os.setxattr(str(path), "system.posix_acl_access", reader_acl(uid))

    def mkfifo(self, path: AnyPath, mode: int = 0o600) -> None:
        os.mkfifo(str(path), mode)

    def guest_socket(self, address: str, port: int, timeout: float) -> Optional[socket.socket]:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError:
            return None

    def close(self) -> None:
        pass


LOCAL = LocalHost("qemu:///system")  # this machine's files, commands and locks (the URI names no daemon here)



def is_local(uri: str) -> bool:
    """Whether a libvirt URI's hypervisor is this machine (no host in it: qemu:///system, test:///default)."""
    from urllib.parse import urlsplit

    return not urlsplit(uri).hostname


def reader_acl(uid: int) -> bytes:
    """A POSIX access ACL (the kernel's xattr format, version 2): rw for the owner, r for `uid`,
    nothing for the group and others."""
    import struct

    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, 4, uid), (0x04, 0, undefined), (0x10, 4, undefined), (0x20, 0, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, id_) for tag, perm, id_ in entries)
