"""A hypervisor across SSH: the :class:`~.host.Host` of a ``qemu+ssh://user@host/system`` URI.

Nothing of the hypervisor's is on the machine that runs pytest: libvirt's API and one SSH
connection, to the sshd the URI names, carry everything. That connection is found as libvirt's
own ``ssh`` transport finds it (the URI's ``keyfile=``, ``~/.ssh/config``, the agent, the default
keys; the host key checked against the known_hosts files, never accepted unseen), and every
VM of the session shares it. The hypervisor needs sshd and standard tools (sh, coreutils,
util-linux's flock): no Python there.

- Files: :class:`RemotePath`, pathlib's semantics over one SFTP session (requests serialized:
  paramiko's SFTP client is not thread-safe), with the OSErrors pathlib raises. Files this host
  creates are 0600 until chmod'ed. ``stat()`` carries SFTP's whole-second times; ``st_dev``,
  ``st_ino``, ``st_nlink`` and ``st_ctime`` cost a command there and are asked for when read.
- Commands: each an ``exec`` channel running ``sh -c WRAPPER``: the wrapper hands the command its
  input, then watches the channel; when the channel ends (closed, timed out, the client gone)
  it kills the command's process group. sshd alone would leave it running: it signals nothing
  to a command without a terminal.
- Locks: one long-lived agent shell there holds them all (``flock`` on files of the host-wide
  lock directory, the same that local sessions of that machine use); it kills every holder
  when its channel ends, so a client that dies releases its locks.
- Guests: ``direct-tcpip`` channels through the hypervisor's sshd (what ``ssh -J`` does).

OpenSSH allows 10 sessions per connection (``MaxSessions``): this host uses at most 9 at a time
(the lock agent, the SFTP session and :data:`MAX_COMMANDS` commands; sshd frees a closed
session's slot a moment late); a command waits for a free one. Forwarded guest connections are
not sessions and are not limited.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import itertools
import logging
import os
import queue
import re
import select
import shlex
import socket
import stat as stat_module
import subprocess
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath
from typing import IO, Any, Callable, Iterator, Optional, Sequence, TypeVar, Union
from urllib.parse import parse_qs, unquote, urlsplit

import paramiko
from paramiko import sftp as sftp_protocol

from ..errors import OstError, SessionError
from ..guest.keys import fingerprint
from .host import AnyPath, Completed, Host, LocalHost, is_local
from .locks import LOCK_DIR_VARIABLE

T = TypeVar("T")

CONNECT_TIMEOUT = 15.0  # seconds for the whole connection: TCP, key exchange, host key, login
KEEPALIVE = 15  # seconds between SSH keepalives on the hypervisor connection
MAX_SESSIONS = 10  # OpenSSH's default MaxSessions: session channels open at once on one connection
MAX_COMMANDS = MAX_SESSIONS - 3  # the lock agent and the SFTP session use two, one spare for sshd's lag
SESSION_RETRY = 10.0  # seconds a session refused (all in use: sshd frees closed ones a moment late) is asked again
RELEASE_TIMEOUT = 10.0  # seconds to wait for a command or a lock holder there to be gone
SLOT_POLL = 0.25  # seconds between two rounds over the slots of any_slot(), there
DEFAULT_KEYS = ("id_rsa", "id_ecdsa", "id_ed25519")  # OpenSSH's order, the types paramiko reads
USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"  # OpenSSH's defaults
GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"
LOCK_NAME = re.compile(r"[A-Za-z0-9._-]+")  # what a lock's name may be (it becomes a file name there)
LOG_CHANNEL = "paramiko.transport.pytest-ostimages"  # paramiko's logger for the hypervisor connections

# The wrapper of every command (run, spawn). $1: the length of the input, then the command.
# The first `$1` bytes of the channel's stdin are the command's whole stdin; the rest of the
# channel's stdin is never written: its end means the channel ended, and the watcher (a
# background child of the feeder, which holds no output of the command's) kills the process
# group that sshd made for this session: the command, its children, the watcher. A command
# that ended before leaves only the watcher, which ends with the channel.
COMMAND_WRAPPER = r"""n=$1; shift
command -v -- "$1" >/dev/null 2>&1 || { printf 'pytest-ostimages: command not found: %s\n' "$1" >&2; exit 127; }
exec 3<&0
{ head -c "$n" <&3; exec >&- 2>/dev/null; { cat <&3 >/dev/null; kill -9 0; } & } | "$@"
"""
NOT_FOUND = "pytest-ostimages: command not found: "
SPAWN_WRAPPER = COMMAND_WRAPPER.replace('| "$@"', '| "$@" >/dev/null 2>&1')  # like LocalHost.spawn: no output

# The lock agent (see the module's docstring). $1: the lock directory ("" for the default, as
# hypervisor/locks.py chooses it). Requests on stdin, one a line:
#   ID wait NAME | ID try NAME | ID slot PREFIX COUNT | ID release
# answers on stdout: "0 ready DIR" or "0 fatal WHY" first, then per request:
#   ID held [SLOT] | ID busy | ID released | ID error WHY FILE
# A holder is a background subshell that keeps the lock file open as fd 4 (exec'ed into a
# sleep once it holds it); release kills it. When stdin ends, the whole process group is killed.
LOCK_AGENT = r"""dir=$1
if [ -z "$dir" ]; then
    if [ -d /var/lock ]; then dir=/var/lock/pytest-ostimages; else dir=${TMPDIR:-/tmp}/pytest-ostimages-locks; fi
fi
umask 000
exec 3<&0 </dev/null
mkdir -m 1777 "$dir" 2>/dev/null
if [ -L "$dir" ] || [ ! -d "$dir" ]; then
    if [ -e "$dir" ] || [ -L "$dir" ]; then echo "0 fatal notdir $dir"; else echo "0 fatal mkdir $dir"; fi
    exit 1
fi
[ -O "$dir" ] && chmod 1777 "$dir"
echo "0 ready $dir"
hold() {  # ID NAME [again]: open the lock file as fd 4 (a regular file, never through a symlink)
    f=$dir/$2.lock
    if [ -L "$f" ]; then echo "$1 error symlink $f"; exit 0; fi
    if ! command exec 4<>"$f" 2>/dev/null; then echo "$1 error open $f"; exit 0; fi
    if [ ! -f "$f" ]; then echo "$1 error notfile $f"; exit 0; fi
    if [ -z "$3" ] && [ -O "$f" ]; then chmod 666 "$f"; fi
}
while read -r id verb name count <&3; do
    case $verb in
    wait) (
        hold "$id" "$name"
        until flock -w 2 4; do [ $? = 1 ] || { echo "$id error flock $f"; exit 0; }; done
        echo "$id held"; exec sleep 2147483647 ) &
        eval "p_$id=\$!" ;;
    try) (
        hold "$id" "$name"
        if flock -n 4; then echo "$id held"; exec sleep 2147483647; fi
        echo "$id busy" ) &
        eval "p_$id=\$!" ;;
    slot) (
        again=
        while :; do
            i=0
            while [ "$i" -lt "$count" ]; do
                hold "$id" "$name-$i" $again
                if flock -n 4; then echo "$id held $i"; exec sleep 2147483647; fi
                exec 4>&-
                i=$((i + 1))
            done
            again=1
            sleep "$SLOT_POLL"
        done ) &
        eval "p_$id=\$!" ;;
    release)
        eval "p=\${p_$id:-}"
        if [ -n "$p" ]; then kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; fi
        echo "$id released" ;;
    esac
done
kill -9 0
"""


# ----------------------------------------------------------------------------------------------
# Where to connect, and as whom: libvirt's ssh transport, i.e. OpenSSH's own rules


@dataclass(frozen=True)
class Destination:
    """An SSH URI resolved as ``ssh`` would resolve it (URI first, then ``~/.ssh/config``)."""

    uri: str
    user: str
    host: str  # as the URI names it
    hostname: str  # where to connect (the config's HostName, else host)
    port: int
    identity_files: tuple[str, ...]  # the URI's keyfile=, then the config's IdentityFile(s) that exist
    default_keys: bool  # no identity named: try ~/.ssh/id_* (as ssh does)
    agent: bool  # keys of the ssh agent (not with IdentitiesOnly yes)
    known_hosts: tuple[str, ...]  # the files the host key is looked up in
    host_key_alias: Optional[str]
    proxy_command: Optional[str]

    @property
    def name(self) -> str:
        """How messages name the hypervisor: the URI's destination, ``user@host[:port]``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + ("" if self.port == 22 else f":{self.port}")

    def jump_command(self) -> str:
        """An OpenSSH ProxyCommand that reaches ``%h:%p`` through this hypervisor (``ssh -W``), for
        the OpenSSH clients of this machine (ansible, testinfra, a person's ssh): the same
        destination, keys and known_hosts files as this connection."""
        def escaped(text: str) -> str:
            return text.replace("%", "%%")  # ssh expands %-tokens in a ProxyCommand

        argv = ["ssh", "-o", "BatchMode=yes", "-l", escaped(self.user), "-p", str(self.port)]
        for identity in self.identity_files:
            argv += ["-i", escaped(identity)]
        user_files = [f for f in self.known_hosts if f not in GLOBAL_KNOWN_HOSTS.split()]
        argv += ["-o", "UserKnownHostsFile=" + escaped(" ".join(user_files) or "/dev/null")]
        argv += ["-W", "[%h]:%p", escaped(self.host)]
        return shlex.join(argv)

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts lists the host key under (``[host]:port`` off port 22)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @classmethod
    def from_uri(cls, uri: str) -> "Destination":
        parts = urlsplit(uri)
        transport = parts.scheme.partition("+")[2]
        if transport not in ("ssh", "libssh", "libssh2"):
            raise SessionError(f"The libvirt URI {uri} does not name a hypervisor across SSH; expected one "
                               f"like qemu+ssh://root@HOST/system (transport ssh, libssh or libssh2), "
                               f"found the transport {transport or 'none'}.")
        try:
            host, uri_port = parts.hostname, parts.port
        except ValueError:
            raise SessionError(f"The libvirt URI {uri} has a port that is not a number; write it as "
                               f"qemu+ssh://USER@HOST:PORT/system.") from None
        if not host:
            raise SessionError(f"The libvirt URI {uri} names no host; write it as qemu+ssh://USER@HOST/system.")
        query = parse_qs(parts.query, keep_blank_values=True)
        config = _ssh_config(host)
        user = unquote(parts.username) if parts.username else config.get("user") or _local_user()
        hostname = config.get("hostname") or host
        try:
            port = uri_port or int(config.get("port", 22))
        except ValueError:
            raise SessionError(f"~/.ssh/config gives {host} the port {config.get('port')!r}, which is not a "
                               f"number; correct it there.") from None
        identities: list[str] = []
        keyfile = query.get("keyfile", [""])[-1]
        if keyfile:
            path = os.path.expanduser(keyfile)
            if not os.path.isfile(path):
                raise SessionError(f"The libvirt URI {uri} names the key keyfile={keyfile}, but there is no such "
                                   f"file on this machine; correct the path (libvirt's own ssh transport reads "
                                   f"the same key).")
            identities.append(path)
        configured = [os.path.expanduser(p) for p in config.get("identityfile", [])]
        identities += [p for p in configured if os.path.isfile(p) and p not in identities]  # ssh skips missing ones
        known_hosts = list(query.get("known_hosts", [])[-1:])  # the libssh transports' own file
        known_hosts += (config.get("userknownhostsfile") or USER_KNOWN_HOSTS).split()
        known_hosts += (config.get("globalknownhostsfile") or GLOBAL_KNOWN_HOSTS).split()
        proxy = config.get("proxycommand")
        jump = config.get("proxyjump")
        if (not proxy or proxy.lower() == "none") and jump and jump.lower() != "none":
            jumps = jump.split(",")
            target = f"[{hostname}]:{port}" if ":" in hostname else f"{hostname}:{port}"
            last = jumps[-1] if "://" in jumps[-1] else f"ssh://{jumps[-1]}"  # [user@]host[:port]
            proxy = shlex.join(["ssh", *(["-J", ",".join(jumps[:-1])] if len(jumps) > 1 else []),
                                "-W", target, last])
        return cls(
            uri=uri,
            user=user,
            host=host,
            hostname=hostname,
            port=port,
            identity_files=tuple(identities),
            default_keys=not keyfile and not configured,
            agent=config.get("identitiesonly", "no").lower() != "yes",
            known_hosts=tuple(os.path.expanduser(p) for p in known_hosts),
            host_key_alias=config.get("hostkeyalias"),
            proxy_command=proxy if proxy and proxy.lower() != "none" else None,
        )


def _local_user() -> str:
    import getpass
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name  # what ssh uses, whatever $USER says
    except KeyError:
        return getpass.getuser()


def _ssh_config(host: str) -> dict[str, Any]:
    """``~/.ssh/config`` for `host` (empty if there is none); read now, with HOME as it is now."""
    path = os.path.expanduser("~/.ssh/config")
    if not os.path.isfile(path):
        return {}
    try:
        return dict(paramiko.SSHConfig.from_path(path).lookup(host))
    except Exception as exc:  # paramiko raises several kinds for a config it cannot use
        raise SessionError(f"Cannot use {path} for the hypervisor {host}: {exc}. Correct it (ssh -G {host} "
                           f"shows how ssh reads it).") from None


# ----------------------------------------------------------------------------------------------
# Connecting


def _connect(dest: Destination, timeout: float) -> paramiko.Transport:
    """An authenticated transport to `dest`, its host key checked; SessionError otherwise."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    sock = _proxy(dest) if dest.proxy_command else _tcp(dest, left())
    transport = paramiko.Transport(sock)
    _quiet_refusals()
    transport.set_log_channel(LOG_CHANNEL)
    try:
        transport.banner_timeout = left()
        transport.handshake_timeout = left()
        known = _known_host_keys(dest)
        if known:  # ask for the key type we know, as ssh does (else a second, unknown type may be offered)
            ours = list(known)[0]
            first = ["rsa-sha2-512", "rsa-sha2-256", ours] if ours == "ssh-rsa" else [ours]
            options = transport.get_security_options()
            options.key_types = [t for t in first if t in options.key_types] + \
                                [t for t in options.key_types if t not in first]
        try:
            transport.start_client(timeout=left())  # returns at the timeout without an error: checked below
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise _handshake_error(dest, exc, timeout) from None
        if not transport.is_active() or transport.host_key is None:
            raise _handshake_error(dest, transport.get_exception(), timeout)
        _check_host_key(dest, known, transport.get_remote_server_key())
        transport.set_keepalive(KEEPALIVE)
        transport.auth_timeout = left()
        _authenticate(dest, transport)
        return transport
    except BaseException:
        transport.close()
        raise


class _RefusedForwarding(logging.Filter):
    """paramiko logs an ERROR for each forwarding the hypervisor's sshd could not connect: a guest
    not up yet, polled until it is. guest_socket() reports those as None; the log need not."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("open FAILED" in message and message.endswith("Connect failed"))


def _quiet_refusals() -> None:
    logger = logging.getLogger(LOG_CHANNEL)
    if not any(isinstance(f, _RefusedForwarding) for f in logger.filters):
        logger.addFilter(_RefusedForwarding())


def _tcp(dest: Destination, timeout: float) -> socket.socket:
    where = f"{dest.hostname}:{dest.port}" + ("" if dest.hostname == dest.host else f" ({dest.host} in ~/.ssh/config)")
    try:
        sock = socket.create_connection((dest.hostname, dest.port), timeout=timeout)
    except socket.gaierror as exc:
        raise SessionError(f"Cannot reach the hypervisor of {dest.uri}: the name {dest.hostname} does not resolve "
                           f"({exc.strerror}). Check the host in the URI (or HostName in ~/.ssh/config).") from None
    except ConnectionRefusedError:
        raise SessionError(f"Cannot reach the hypervisor of {dest.uri}: {where} refused the connection. Is sshd "
                           f"running there, on port {dest.port}?") from None
    except socket.timeout:
        raise SessionError(f"Cannot reach the hypervisor of {dest.uri}: no answer from {where} within "
                           f"{timeout:.0f} s. Is the host up, and does every firewall on the way let port "
                           f"{dest.port} through?") from None
    except OSError as exc:
        raise SessionError(f"Cannot reach the hypervisor of {dest.uri}: connecting to {where} failed "
                           f"({exc.strerror or exc}). Check the address and this machine's network "
                           f"(ip route get {dest.hostname}).") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def _proxy(dest: Destination) -> paramiko.ProxyCommand:
    assert dest.proxy_command is not None  # only called for one
    try:
        return paramiko.ProxyCommand(shlex.join(["sh", "-c", dest.proxy_command]))  # a shell's, as ssh runs it
    except (OSError, paramiko.SSHException) as exc:
        raise SessionError(f"Cannot start the ProxyCommand (or ProxyJump) that ~/.ssh/config gives {dest.host}: "
                           f"{dest.proxy_command}: {exc}.") from None


def _handshake_error(dest: Destination, exc: Optional[BaseException], timeout: float) -> SessionError:
    text = (str(exc) or exc.__class__.__name__) if exc is not None else ""
    if exc is None:
        what = (f"{dest.hostname}:{dest.port} accepted the connection but sent no SSH greeting, or did not "
                f"finish the key exchange, within {timeout:.0f} s. Is that port an sshd's, and is the "
                f"hypervisor overloaded?")
    elif "banner" in text.lower():
        what = (f"{dest.hostname}:{dest.port} accepted the connection but sent no SSH greeting within "
                f"{timeout:.0f} s. Is that port an sshd's, and is the hypervisor overloaded?")
    elif isinstance(exc, paramiko.IncompatiblePeer):
        what = f"its sshd and paramiko share no key exchange, cipher or host key algorithm ({text})."
    else:
        what = (f"the SSH handshake with {dest.hostname}:{dest.port} failed ({text}). The hypervisor's sshd "
                f"may refuse this client (MaxStartups, AllowUsers, a firewall); its log says why.")
    return SessionError(f"Cannot open an SSH connection to the hypervisor of {dest.uri}: {what}")


def _known_host_keys(dest: Destination) -> dict[str, paramiko.PKey]:
    """The keys the known_hosts files list for `dest` (hashed entries too), by key type."""
    keys: dict[str, paramiko.PKey] = {}
    for path in dest.known_hosts:
        found = _host_keys_in(path, dest.known_hosts_name)
        for kind, key in found.items():
            keys.setdefault(kind, key)
    return keys


def _host_keys_in(path: str, name: str) -> dict[str, paramiko.PKey]:
    if not os.path.isfile(path):
        return {}
    host_keys = paramiko.HostKeys()
    try:
        host_keys.load(path)
    except (OSError, paramiko.SSHException):
        return {}  # ssh too goes on without a file it cannot read
    return dict(host_keys.lookup(name) or {})


def _check_host_key(dest: Destination, known: dict[str, paramiko.PKey], offered: paramiko.PKey) -> None:
    kind = offered.get_name()
    expected = known.get(kind)
    label = f"{kind} key {fingerprint(offered)}"
    if expected is not None and expected == offered:
        return
    port = [] if dest.port == 22 else ["-p", str(dest.port)]
    if expected is None:
        listed = (f" (they list only other key types for it: {', '.join(sorted(known))})" if known else "")
        raise SessionError(
            f"The SSH host key of the hypervisor {dest.known_hosts_name} ({dest.uri}) is not known: it offers the "
            f"{label}, and no known_hosts file lists it{listed}. pytest-ostimages checks host keys as ssh "
            f"does and never accepts one unseen. Check that fingerprint against the hypervisor's own "
            f"(there: ssh-keygen -lf /etc/ssh/ssh_host_{_key_file_type(kind)}_key.pub), then add the key: "
            f"{shlex.join(['ssh-keyscan', *port, '-t', _key_file_type(kind), dest.hostname])} >> ~/.ssh/known_hosts"
            f", or connect once with {shlex.join(['ssh', *port, dest.user + '@' + dest.hostname])} and accept it.")
    holders = [path for path in dest.known_hosts if kind in _host_keys_in(path, dest.known_hosts_name)]
    where = holders[0] if holders else "a known_hosts file"
    raise SessionError(
        f"The SSH host key of the hypervisor {dest.known_hosts_name} ({dest.uri}) has CHANGED: it offers the "
        f"{label}, but {where} lists {fingerprint(expected)}. Either the hypervisor was reinstalled (or "
        f"its keys replaced), or someone is in the way. If the change is expected, remove the old entry "
        f"({shlex.join(['ssh-keygen', '-R', dest.known_hosts_name, '-f', where])}) and add the new key "
        f"after checking its fingerprint with the hypervisor's administrator.")


def _key_file_type(kind: str) -> str:
    """OpenSSH's short name of a key type (ssh-keyscan -t, /etc/ssh/ssh_host_<type>_key)."""
    return {"ssh-rsa": "rsa", "ssh-ed25519": "ed25519"}.get(kind, "ecdsa")


def _authenticate(dest: Destination, transport: paramiko.Transport) -> None:
    """Log in with the keys ssh would offer, in its order; SessionError naming what was tried."""
    tried: list[str] = []
    unusable: list[str] = []
    files = list(dest.identity_files)
    if dest.default_keys:
        files += [p for p in (os.path.expanduser(f"~/.ssh/{name}") for name in DEFAULT_KEYS) if os.path.isfile(p)]
    candidates: list[tuple[str, Callable[[], paramiko.PKey]]] = [(p, _key_loader(p)) for p in files]
    if dest.agent:
        try:
            agent_keys = paramiko.Agent().get_keys()
        except paramiko.SSHException:
            agent_keys = ()
        candidates += [(f"the agent's {key.get_name()} key {fingerprint(key)}", _given(key)) for key in agent_keys]
    for label, load in candidates:
        try:
            key = load()
        except _UnusableKey as exc:
            unusable.append(f"{label}: {exc}")
            continue
        tried.append(label)
        try:
            transport.auth_publickey(dest.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise SessionError(f"The hypervisor's sshd ({dest.uri}) does not take SSH keys for {dest.user} (it "
                               f"allows only {', '.join(exc.allowed_types) or 'nothing'}). pytest-ostimages, like "
                               f"libvirt's qemu+ssh, logs in with a key: allow PubkeyAuthentication there.") from None
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SessionError(f"The SSH connection to the hypervisor ({dest.uri}) broke while logging in as "
                               f"{dest.user} ({exc or exc.__class__.__name__}) after the keys {'; '.join(tried)}. "
                               f"If that is more keys than its sshd's MaxAuthTries allows, name the right one "
                               f"in the URI (?keyfile=PATH).") from None
        if transport.is_authenticated():
            return
    offered = "; ".join(tried) if tried else "no key at all"
    skipped = f" Keys that could not be used: {'; '.join(unusable)}." if unusable else ""
    raise SessionError(
        f"The hypervisor's sshd ({dest.uri}) refused the login as {dest.user} with the keys offered: {offered}."
        f"{skipped} Name the key that the hypervisor's ~{dest.user}/.ssh/authorized_keys lists in the URI "
        f"(?keyfile=PATH) or in ~/.ssh/config (IdentityFile), or load it into ssh-agent; "
        f"{shlex.join(['ssh', '-p', str(dest.port), dest.user + '@' + dest.hostname, 'true'])} must work "
        f"without a password.")


class _UnusableKey(Exception):
    pass


def _given(key: paramiko.PKey) -> Callable[[], paramiko.PKey]:
    return lambda: key


def _key_loader(path: str) -> Callable[[], paramiko.PKey]:
    def load() -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(path)
        except TypeError:  # cryptography: the key is encrypted and no password was given
            raise _UnusableKey("protected by a passphrase; load it into ssh-agent (ssh-add) instead") from None
        except (ValueError, paramiko.SSHException, paramiko.UnknownKeyType) as exc:
            raise _UnusableKey(f"not a private key that paramiko reads ({exc.__class__.__name__})") from None
        except OSError as exc:
            raise _UnusableKey(f"cannot be read ({exc.strerror})") from None

    return load


# ----------------------------------------------------------------------------------------------
# Files


class RemoteStat:
    """stat(2) of a file on the hypervisor, as SFTP gives it.

    Times are whole seconds (``st_mtime_ns`` is ``st_mtime`` * 10**9). ``st_dev``, ``st_ino``,
    ``st_nlink`` and ``st_ctime`` are not part of SFTP: the first read of one runs
    ``stat -c '%d %i %h %Z'`` there (one command, for the file as it is then).
    """

    def __init__(self, attrs: paramiko.SFTPAttributes, host: "SSHHost", path: str, follow: bool) -> None:
        self.st_mode: int = attrs.st_mode or 0
        self.st_uid: int = attrs.st_uid if attrs.st_uid is not None else -1
        self.st_gid: int = attrs.st_gid if attrs.st_gid is not None else -1
        self.st_size: int = attrs.st_size or 0
        self.st_atime: int = int(attrs.st_atime or 0)
        self.st_mtime: int = int(attrs.st_mtime or 0)
        self.st_atime_ns = self.st_atime * 10**9
        self.st_mtime_ns = self.st_mtime * 10**9
        self._host = host
        self._path = path
        self._follow = follow
        self._more: Optional[tuple[int, int, int, int]] = None

    def _extra(self) -> tuple[int, int, int, int]:
        if self._more is None:
            argv = ["stat", *(["-L"] if self._follow else []), "-c", "%d %i %h %Z", "--", self._path]
            done = self._host.run(argv, timeout=60)
            if done.returncode != 0:
                raise _command_error(done, self._path, self._host)
            dev, ino, nlink, ctime = (int(field) for field in done.text.split())
            self._more = (dev, ino, nlink, ctime)
        return self._more

    @property
    def st_dev(self) -> int:
        return self._extra()[0]

    @property
    def st_ino(self) -> int:
        return self._extra()[1]

    @property
    def st_nlink(self) -> int:
        return self._extra()[2]

    @property
    def st_ctime(self) -> int:
        return self._extra()[3]

    def __repr__(self) -> str:
        return (f"RemoteStat(st_mode={oct(self.st_mode)}, st_uid={self.st_uid}, st_gid={self.st_gid}, "
                f"st_size={self.st_size}, st_mtime={self.st_mtime})")


_MAGIC = re.compile(r"[*?\[]")


class RemotePath:
    """A path on a hypervisor across SSH: pathlib's ``PurePosixPath``, with the file operations of
    ``pathlib.Path`` (those of host.HostPath) done over SFTP, raising the OSErrors pathlib raises.

    Deliberately not ``os.PathLike``: a remote path handed to ``open()`` or ``os.*`` by mistake
    must fail, not act on a local file of the same name.
    """

    __slots__ = ("_host", "_pure")

    def __init__(self, host: "SSHHost", path: Union[str, PurePath, "RemotePath"]) -> None:
        self._host = host
        self._pure: PurePosixPath = path._pure if isinstance(path, RemotePath) else PurePosixPath(str(path))

    # -- the pure part: as PurePosixPath ------------------------------------------------------

    def _new(self, pure: PurePosixPath) -> "RemotePath":
        return RemotePath(self._host, pure)

    @property
    def host(self) -> "SSHHost":
        return self._host

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def suffix(self) -> str:
        return self._pure.suffix

    @property
    def suffixes(self) -> list[str]:
        return self._pure.suffixes

    @property
    def stem(self) -> str:
        return self._pure.stem

    @property
    def parts(self) -> tuple[str, ...]:
        return self._pure.parts

    @property
    def parent(self) -> "RemotePath":
        return self._new(self._pure.parent)

    @property
    def parents(self) -> tuple["RemotePath", ...]:
        return tuple(self._new(p) for p in self._pure.parents)

    def __truediv__(self, other: Union[str, PurePath, "RemotePath"]) -> "RemotePath":
        return self._new(self._pure / (other._pure if isinstance(other, RemotePath) else other))

    def joinpath(self, *others: Union[str, PurePath]) -> "RemotePath":
        return self._new(self._pure.joinpath(*others))

    def with_name(self, name: str) -> "RemotePath":
        return self._new(self._pure.with_name(name))

    def with_suffix(self, suffix: str) -> "RemotePath":
        return self._new(self._pure.with_suffix(suffix))

    def with_stem(self, stem: str) -> "RemotePath":
        return self.with_name(stem + self.suffix)

    def relative_to(self, other: Union[str, PurePath, "RemotePath"]) -> PurePosixPath:
        return self._pure.relative_to(other._pure if isinstance(other, RemotePath) else other)

    def is_absolute(self) -> bool:
        return self._pure.is_absolute()

    def is_relative_to(self, other: Union[str, PurePath, "RemotePath"]) -> bool:
        try:
            self.relative_to(other)
        except ValueError:
            return False
        return True

    def match(self, pattern: str) -> bool:
        return self._pure.match(pattern)

    def as_posix(self) -> str:
        return str(self._pure)

    def __str__(self) -> str:
        return str(self._pure)

    def __repr__(self) -> str:
        return f"RemotePath({self._host.name!r}, {str(self._pure)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemotePath):
            return NotImplemented
        return self._host is other._host and self._pure == other._pure

    def __hash__(self) -> int:
        return hash((id(self._host), self._pure))

    def __lt__(self, other: "RemotePath") -> bool:
        if not isinstance(other, RemotePath):
            return NotImplemented
        return self._pure < other._pure

    def __le__(self, other: "RemotePath") -> bool:
        return self == other or self < other

    # -- the hypervisor's file system -----------------------------------------------------------

    def stat(self, *, _exact: bool = True) -> RemoteStat:
        attrs = self._host._sftp("stat", self, lambda s: s.stat(str(self)), exact=_exact)
        return RemoteStat(attrs, self._host, str(self), True)

    def lstat(self, *, _exact: bool = True) -> RemoteStat:
        attrs = self._host._sftp("lstat", self, lambda s: s.lstat(str(self)), exact=_exact)
        return RemoteStat(attrs, self._host, str(self), False)

    def _mode(self, follow: bool = True) -> Optional[int]:
        """st_mode, or None where pathlib's exists() is False (missing, a file on the way, a loop)."""
        try:
            return (self.stat(_exact=False) if follow else self.lstat(_exact=False)).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.EIO:  # "Failure": a loop, or a name too long (pathlib: False)
                return None
            raise

    def exists(self) -> bool:
        return self._mode() is not None

    def is_file(self) -> bool:
        return stat_module.S_ISREG(self._mode() or 0)

    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self._mode() or 0)

    def is_symlink(self) -> bool:
        return stat_module.S_ISLNK(self._mode(follow=False) or 0)

    def is_fifo(self) -> bool:
        return stat_module.S_ISFIFO(self._mode() or 0)

    def open(self, mode: str = "r", buffering: int = -1, encoding: Optional[str] = None,
             errors: Optional[str] = None, newline: Optional[str] = None) -> IO[Any]:
        """As ``pathlib.Path.open``; a file created here is 0600. Text is UTF-8 unless `encoding`."""
        binary = "b" in mode
        plain = mode.replace("b", "").replace("t", "")
        if plain not in ("r", "w", "a", "x", "r+", "w+", "a+", "x+") or (binary and "t" in mode):
            raise ValueError(f"invalid mode: {mode!r}")
        raw = self._host._open(self, plain)
        if buffering == 0:
            if not binary:
                raise ValueError("can't have unbuffered text I/O")
            return raw  # type: ignore[return-value]
        size = buffering if buffering > 1 else 64 * 1024
        buffered: Union[io.BufferedReader, io.BufferedWriter, io.BufferedRandom]
        if "+" in plain:
            buffered = io.BufferedRandom(raw, size)
        elif plain == "r":
            buffered = io.BufferedReader(raw, size)
        else:
            buffered = io.BufferedWriter(raw, size)
        if binary:
            return buffered
        return io.TextIOWrapper(buffered, encoding or "utf-8", errors, newline, line_buffering=buffering == 1)

    def read_bytes(self) -> bytes:
        return self._host._read_all(self)

    def read_text(self, encoding: Optional[str] = None, errors: Optional[str] = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")

    def write_bytes(self, data: bytes) -> int:
        view = memoryview(data)
        with self.open("wb") as f:
            return f.write(view)

    def write_text(self, data: str, encoding: Optional[str] = None, errors: Optional[str] = None,
                   newline: Optional[str] = None) -> int:
        if not isinstance(data, str):
            raise TypeError(f"data must be str, not {data.__class__.__name__}")
        with self.open("w", encoding=encoding, errors=errors, newline=newline) as f:
            return f.write(data)

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        try:
            self._host._sftp("mkdir", self, lambda s: s.mkdir(str(self), mode))
        except FileNotFoundError:
            if not parents or self.parent == self:
                raise
            self.parent.mkdir(parents=True, exist_ok=True)
            self.mkdir(mode, parents=False, exist_ok=exist_ok)
        except OSError:
            if not exist_ok or not self.is_dir():
                raise

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._host._sftp("unlink", self, lambda s: s.remove(str(self)))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self) -> None:
        self._host._sftp("rmdir", self, lambda s: s.rmdir(str(self)))

    def rename(self, target: Union[str, PurePath, "RemotePath"]) -> "RemotePath":
        """As os.rename there: an existing file at `target` is replaced (SFTP's posix-rename)."""
        new = target if isinstance(target, RemotePath) else self._new(PurePosixPath(str(target)))
        self._host._sftp("rename", self, lambda s: s.posix_rename(str(self), str(new)), target=new)
        return new

    def replace(self, target: Union[str, PurePath, "RemotePath"]) -> "RemotePath":
        return self.rename(target)

    def chmod(self, mode: int) -> None:
        self._host._sftp("chmod", self, lambda s: s.chmod(str(self), mode))

    def touch(self, mode: int = 0o666, exist_ok: bool = True) -> None:
        if self.exists():
            if not exist_ok:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(self))
            now = time.time()
            self._host._sftp("utime", self, lambda s: s.utime(str(self), (now, now)))
            return
        self.open("xb").close()

    def readlink(self) -> "RemotePath":
        return self._new(PurePosixPath(self._host._sftp("readlink", self, lambda s: s.readlink(str(self)) or "")))

    def symlink_to(self, target: Union[str, PurePath, "RemotePath"]) -> None:
        self._host._sftp("symlink", self, lambda s: s.symlink(str(target), str(self)))

    def iterdir(self) -> Iterator["RemotePath"]:
        for name in self._listdir():
            yield self / name

    def _listdir(self) -> list[str]:
        return [a.filename for a in self._host._sftp("listdir", self, lambda s: s.listdir_attr(str(self)))]

    def _entries(self) -> list[paramiko.SFTPAttributes]:
        """The directory's entries as lstat sees them; none if it is no directory (glob's view)."""
        try:
            return self._host._sftp("listdir", self, lambda s: s.listdir_attr(str(self)))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        """As pathlib's glob: `pattern` relative, ``*``/``?``/``[...]`` per name (dotfiles too, case
        matters), ``**`` for this folder and every folder below it (symlinks not followed)."""
        if not pattern:
            raise ValueError(f"Unacceptable pattern: {pattern!r}")
        parts = PurePosixPath(pattern).parts
        if parts[0] == "/":
            raise NotImplementedError("Non-relative patterns are unsupported")
        seen: set[PurePosixPath] = set()
        for path in self._select(parts):
            if path._pure not in seen:
                seen.add(path._pure)
                yield path

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        return self.glob(f"**/{pattern}")

    def _select(self, parts: tuple[str, ...]) -> Iterator["RemotePath"]:
        head, rest = parts[0], parts[1:]
        if head == "**":
            for folder in self._folders():
                if rest:
                    yield from folder._select(rest)
                else:
                    yield folder
        elif _MAGIC.search(head):
            for entry in self._entries():
                if not fnmatch.fnmatchcase(entry.filename, head):
                    continue
                child = self / entry.filename
                if not rest:
                    yield child
                elif stat_module.S_ISDIR(entry.st_mode or 0) or \
                        (stat_module.S_ISLNK(entry.st_mode or 0) and child.is_dir()):
                    yield from child._select(rest)
        else:
            child = self / head
            if rest:
                yield from child._select(rest)
            elif child._mode(follow=False) is not None:
                yield child

    def _folders(self) -> Iterator["RemotePath"]:
        """This folder and every folder below it, not through symlinks (pathlib's ``**``)."""
        if not self.is_dir():
            return
        yield self
        for entry in self._entries():
            if stat_module.S_ISDIR(entry.st_mode or 0):
                yield from (self / entry.filename)._folders()


class _SFTPRaw(io.RawIOBase):
    """An open SFTP file as a raw stream (open() wraps it in io's buffered and text layers);
    each request holds the host's SFTP lock."""

    def __init__(self, host: "SSHHost", handle: paramiko.SFTPFile, mode: str, path: RemotePath) -> None:
        super().__init__()
        self._host = host
        self._file = handle
        self._mode = mode
        self.name = str(path)
        self._path = path

    def readable(self) -> bool:
        return "r" in self._mode or "+" in self._mode

    def writable(self) -> bool:
        return self._mode != "r"

    def seekable(self) -> bool:
        return True

    def _io(self, what: str, call: Callable[[], T]) -> T:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return self._host._sftp(what, self._path, lambda _sftp: call())

    def readinto(self, buffer: Any) -> int:
        if not self.readable():
            raise io.UnsupportedOperation("read")
        view = memoryview(buffer).cast("B")
        data = self._io("read", lambda: self._file.read(len(view)))
        view[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        if not self.readable():
            raise io.UnsupportedOperation("read")
        return self._io("read", lambda: self._file.read())

    def write(self, data: Any) -> int:
        if not self.writable():
            raise io.UnsupportedOperation("write")
        chunk = bytes(data)
        self._io("write", lambda: self._file.write(chunk))
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        def seek() -> int:
            self._file.seek(offset, whence)
            return self._file.tell()

        return self._io("seek", seek)

    def tell(self) -> int:
        return self._io("seek", self._file.tell)

    def truncate(self, size: Optional[int] = None) -> int:
        size = self.tell() if size is None else size
        self._io("truncate", lambda: self._file.truncate(size))
        return size

    def close(self) -> None:
        if not self.closed:
            try:
                with contextlib.suppress(SessionError):  # a lost connection closed it already
                    self._host._sftp("close", self._path, lambda _sftp: self._file.close())
            finally:
                super().close()


# ----------------------------------------------------------------------------------------------
# Commands


class RemoteProcess:
    """A command left running on the hypervisor (see spawn()); it ends with its channel."""

    def __init__(self, host: "SSHHost", channel: paramiko.Channel, argv: Sequence[str], input: bytes,
                 release: Callable[[], None]) -> None:
        self.argv = tuple(argv)
        self._host = host
        self._channel = channel
        self._killed = False
        self._release = release
        self._ended = threading.Event()
        self._input = input
        threading.Thread(target=self._feed, name=f"ost-feed-{argv[0]}", daemon=True).start()
        threading.Thread(target=self._reap, name=f"ost-reap-{argv[0]}", daemon=True).start()

    def _feed(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):  # it ended, or was killed, first
            self._channel.sendall(self._input)

    def _reap(self) -> None:
        self._channel.status_event.wait()
        self._channel.close()
        self._release()
        self._ended.set()

    def wait(self, timeout: Optional[float] = None) -> int:
        """Its exit status (-9 when killed); subprocess.TimeoutExpired after `timeout` s, as Popen.wait."""
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(list(self.argv), timeout or 0)
        if self._killed:
            return -9
        status = self._channel.exit_status
        if status == -1:  # no exit-status: killed by a signal there, or the connection went
            return -9
        return status

    def poll(self) -> Optional[int]:
        return self.wait(0) if self._ended.is_set() else None

    def kill(self) -> None:
        """End it (its whole process group there) and wait until it is gone."""
        if self._ended.is_set():
            return
        self._killed = True
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._channel.shutdown_write()  # the end of stdin: the wrapper's watcher kills the group
        if not self._channel.status_event.wait(RELEASE_TIMEOUT):
            self._channel.close()  # sshd then closes its pipes: the watcher sees the end all the same
        self._ended.wait(RELEASE_TIMEOUT)


def _command_error(done: Completed, path: str, host: "SSHHost") -> OSError:
    """The OSError a failed coreutils command there stands for (its message, the errno it names)."""
    message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
    for text, code in (("No such file or directory", errno.ENOENT), ("Permission denied", errno.EACCES),
                       ("Operation not permitted", errno.EPERM), ("File exists", errno.EEXIST),
                       ("Not a directory", errno.ENOTDIR), ("Is a directory", errno.EISDIR),
                       ("No space left", errno.ENOSPC), ("Read-only file system", errno.EROFS),
                       ("Operation not supported", errno.EOPNOTSUPP)):
        if text in message:
            return OSError(code, f"{os.strerror(code)} (on {host.name}: {message})", path)
    return OSError(errno.EIO, f"failed on {host.name}: {message}", path)


# ----------------------------------------------------------------------------------------------
# Locks


class _LockAgent:
    """The client's side of LOCK_AGENT: one channel, one reader thread, a queue per request."""

    def __init__(self, host: "SSHHost", directory: str) -> None:
        self._host = host
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._answers: dict[int, "queue.Queue[tuple[str, str]]"] = {0: queue.Queue()}
        self._answers_lock = threading.Lock()
        self._gone: Optional[str] = None
        self._channel = host._open_session(None, "the host-wide locks")
        agent = LOCK_AGENT.replace('"$SLOT_POLL"', str(SLOT_POLL))
        self._channel.exec_command(shlex.join(["sh", "-c", agent, "sh", directory]))
        threading.Thread(target=self._read, name="ost-lock-agent", daemon=True).start()
        try:
            word, rest = self._answer(0, time.monotonic() + 60)
        except TimeoutError:
            self.close()
            raise SessionError(f"The lock agent on the hypervisor {host.name} (sh and flock) did not start "
                               f"within 60 s; is the hypervisor overloaded?") from None
        if word == "ready":
            self.directory = rest
            return
        self.close()
        why, _, path = rest.partition(" ")
        if why == "notdir":
            raise OstError(f"{path} on the hypervisor {host.name} should be a directory for pytest-ostimages' "
                           f"lock files, but it is a symlink or a file. Remove it there: rm {path}")
        if why == "mkdir":
            raise OstError(f"Cannot create the host-wide lock directory {path} on the hypervisor {host.name}. "
                           f"Create it once as root there: mkdir -m 1777 {path}")
        raise SessionError(f"The lock agent on the hypervisor {host.name} did not start: {word} {rest}".strip())

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                data = self._channel.recv(4096)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    rid, _, answer = line.decode(errors="replace").partition(" ")
                    word, _, rest = answer.partition(" ")
                    if rid.isdigit():
                        self._queue(int(rid)).put((word, rest))
        except (OSError, EOFError, paramiko.SSHException):
            pass
        stderr = b""
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while self._channel.recv_stderr_ready():
                stderr += self._channel.recv_stderr(4096)
        self._gone = stderr.decode(errors="replace").strip() or "its channel ended"
        with self._answers_lock:
            for answers in self._answers.values():
                answers.put(("gone", self._gone))

    def _queue(self, rid: int) -> "queue.Queue[tuple[str, str]]":
        with self._answers_lock:
            return self._answers.setdefault(rid, queue.Queue())

    def request(self, verb: str, *args: str) -> int:
        rid = next(self._ids)
        answers = self._queue(rid)
        if self._gone is not None:
            answers.put(("gone", self._gone))
            return rid
        line = " ".join((str(rid), verb, *args)) + "\n"
        try:
            with self._send_lock:
                self._channel.sendall(line.encode())
        except (OSError, EOFError, paramiko.SSHException):
            answers.put(("gone", "its channel ended"))
        return rid

    def _answer(self, rid: int, deadline: Optional[float] = None,
                abort: Optional[threading.Event] = None) -> tuple[str, str]:
        answers = self._queue(rid)
        while True:
            if abort is not None and abort.is_set():
                raise InterruptedError("the session was interrupted while waiting for a host-wide slot")
            wait = 0.1 if abort is not None else 1.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"the lock agent on {self._host.name} did not answer")
            try:
                return answers.get(timeout=wait)
            except queue.Empty:
                continue

    def wait_for(self, rid: int, abort: Optional[threading.Event] = None) -> tuple[str, str]:
        """The answer to request `rid` (held, busy, or an error raised as one)."""
        word, rest = self._answer(rid, None, abort)
        if word == "gone":
            raise self._host._lost(f"the lock agent there ended ({rest})")
        if word == "error":
            raise self._lock_error(rest)
        return word, rest

    def release(self, rid: int) -> None:
        """Kill the request's holder (or waiter) there, and wait until it is gone."""
        line = f"{rid} release\n".encode()
        try:
            with self._send_lock:
                self._channel.sendall(line)
        except (OSError, EOFError, paramiko.SSHException):
            return  # the agent is gone: so is every lock it held
        deadline = time.monotonic() + RELEASE_TIMEOUT
        with contextlib.suppress(TimeoutError):
            while True:
                word, _ = self._answer(rid, deadline)
                if word in ("released", "gone"):
                    break
        with self._answers_lock:
            self._answers.pop(rid, None)

    def _lock_error(self, rest: str) -> OstError:
        why, _, path = rest.partition(" ")
        host = self._host.name
        if why == "symlink":
            return OstError(f"The lock file {path} on the hypervisor {host} is a symlink; pytest-ostimages never "
                            f"follows one. Remove it there: rm {path}")
        if why == "open":
            return OstError(f"Cannot open the lock file {path} on the hypervisor {host} (as {self._host.user}). "
                            f"Sessions of several users share these locks; make it writable for everyone there "
                            f"(chmod 0666 {path}) or remove it.")
        if why == "notfile":
            return OstError(f"The lock file {path} on the hypervisor {host} is not a regular file; remove it there.")
        return OstError(f"flock failed on the lock file {path} on the hypervisor {host}; is util-linux's flock "
                        f"installed there?")

    def close(self) -> None:
        self._channel.close()


# ----------------------------------------------------------------------------------------------
# Guests


class ChannelSocket:
    """A ``direct-tcpip`` channel that passes for a connected socket: paramiko's ``sock=``, and
    the readiness probe's ``recv(n, socket.MSG_PEEK)`` (what was peeked is read again)."""

    def __init__(self, channel: paramiko.Channel, peer: tuple[str, int]) -> None:
        self.channel = channel
        self.peer = peer
        self._peeked = b""

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            if not self._peeked:
                self._peeked = self.channel.recv(size)
            return self._peeked[:size]
        if self._peeked:
            data, self._peeked = self._peeked[:size], self._peeked[size:]
            return data
        return self.channel.recv(size)

    def send(self, data: bytes) -> int:
        return self.channel.send(data)

    def sendall(self, data: bytes) -> None:
        self.channel.sendall(data)

    def settimeout(self, timeout: Optional[float]) -> None:
        self.channel.settimeout(timeout)

    def gettimeout(self) -> Optional[float]:
        return self.channel.gettimeout()

    def getpeername(self) -> tuple[str, int]:
        return self.peer

    def fileno(self) -> int:
        return self.channel.fileno()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ChannelSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channel, name)


# ----------------------------------------------------------------------------------------------
# The host


def _diagnose(what: str, path: RemotePath, target: Optional[RemotePath], client: paramiko.SFTPClient,
              reported: Optional[int]) -> Optional[int]:
    """The errno behind an SFTP error that does not tell it (`reported`: ENOENT, or None for "Failure")."""

    def mode(p: RemotePath, follow: bool) -> Optional[int]:
        try:
            attrs = client.stat(str(p)) if follow else client.lstat(str(p))
        except OSError:
            return None
        return attrs.st_mode or 0

    def kind(p: RemotePath) -> str:
        """dir, file, missing (in an existing folder), under-file or under-missing."""
        m = mode(p, follow=False)
        if m is None:
            for ancestor in p.parents:
                found = mode(ancestor, follow=True)
                if found is not None:
                    if not stat_module.S_ISDIR(found):
                        return "under-file"
                    return "missing" if ancestor == p.parent else "under-missing"
            return "under-missing"
        if stat_module.S_ISLNK(m):
            m = mode(p, follow=True)
            if m is None:
                return "missing"
        return "dir" if stat_module.S_ISDIR(m) else "file"

    def full(p: RemotePath) -> bool:
        try:
            return bool(client.listdir(str(p)))
        except OSError:
            return False

    here = kind(path)
    if here == "under-file":
        return errno.ENOTDIR
    there = kind(target) if target is not None else None
    if reported == errno.ENOENT:  # "no such file": ENOENT, or ENOTDIR for the path itself
        if what in ("rmdir", "listdir") and here == "file":
            return errno.ENOTDIR
        if what == "rename" and (there == "under-file" or (here == "dir" and there == "file")):
            return errno.ENOTDIR
        return errno.ENOENT
    if here == "under-missing" or (here == "missing" and what != "mkdir"):
        return errno.ENOENT
    if what == "mkdir":
        return errno.EEXIST if here in ("dir", "file") else None
    if what == "rmdir":
        return errno.ENOTDIR if here == "file" else (errno.ENOTEMPTY if full(path) else None)
    if what == "unlink":
        return errno.EISDIR if here == "dir" else None
    if what == "listdir":
        return errno.ENOTDIR if here == "file" else None
    if what == "open-x":
        return errno.EEXIST
    if what in ("open-r", "open-w", "open-a"):
        return errno.EISDIR if here == "dir" else None
    if what == "rename":
        if there in ("under-file", "under-missing"):
            return errno.ENOTDIR if there == "under-file" else errno.ENOENT
        if there == "dir" and here == "file":
            return errno.EISDIR
        if there == "file" and here == "dir":
            return errno.ENOTDIR
        if there == "dir":
            return errno.ENOTEMPTY if full(target) else None  # type: ignore[arg-type]
    if what == "symlink":
        return errno.EEXIST
    if what == "stat":
        return errno.ELOOP
    return None


class SSHHost:
    """A hypervisor across SSH (see the module's docstring); one connection, thread-safe."""

    local = False

    def __init__(self, destination: Destination, transport: paramiko.Transport,
                 lock_dir: Optional[str] = None) -> None:
        self.uri = destination.uri
        self.destination = destination
        self.user = destination.user
        self._transport = transport
        self._lock_dir = lock_dir if lock_dir is not None else os.environ.get(LOCK_DIR_VARIABLE, "")
        self._sftp_lock = threading.RLock()
        self._sftp_client: Optional[paramiko.SFTPClient] = None
        self._commands = threading.BoundedSemaphore(MAX_COMMANDS)
        self._agent: Optional[_LockAgent] = None
        self._agent_lock = threading.Lock()
        self._uid: Optional[int] = None
        self._closed = False
        self.jump: Optional[str] = destination.jump_command()  # OpenSSH's way to the guests, as ssh -J

    @classmethod
    def connect(cls, uri: str, timeout: float = CONNECT_TIMEOUT, lock_dir: Optional[str] = None) -> "SSHHost":
        """Connect to the hypervisor of `uri` (``qemu+ssh://[user@]host[:port]/system[?keyfile=...]``).

        `lock_dir`: the host-wide lock directory there; by default ``OST_LOCK_DIR`` if set here (the
        plugin's own tests), else the one hypervisor/locks.py would choose on that machine.
        """
        destination = Destination.from_uri(uri)
        return cls(destination, _connect(destination, timeout), lock_dir)

    @property
    def name(self) -> str:
        return self.destination.name

    def __repr__(self) -> str:
        return f"SSHHost({self.uri!r})"

    def __enter__(self) -> "SSHHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the connection ----------------------------------------------------------------------

    def _lost(self, detail: str = "") -> SessionError:
        reason = self._transport.get_exception()
        why = f": {reason}" if reason else (f": {detail}" if detail else "")
        return SessionError(
            f"The SSH connection to the hypervisor {self.name} ({self.uri}) was lost{why}. Every host-wide lock "
            f"this session held there is released, and the session cannot go on; check the hypervisor's "
            f"network and sshd, then run the tests again.")

    def _alive(self) -> None:
        if self._closed:
            raise SessionError(f"The connection to the hypervisor {self.name} was closed (a bug: something "
                               f"used the session's host after its end).")
        if not self._transport.is_active():
            raise self._lost()

    def _open_session(self, deadline: Optional[float], purpose: str) -> paramiko.Channel:
        """A session channel. sshd frees a closed session's slot a moment after the close: a refusal
        (all MaxSessions in use) is tried again for SESSION_RETRY s. (paramiko hands an open's
        refusal to whichever thread asks first: a concurrent one may see "Unable to open channel.")"""
        self._alive()
        refused_until = time.monotonic() + SESSION_RETRY
        while True:
            timeout = 30.0 if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                return self._transport.open_session(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                # EOFError, OSError: the request could not be sent, the connection is gone (its transport's
                # thread may not have noticed yet: it still says active)
                if not self._transport.is_active() or isinstance(exc, (EOFError, OSError)):
                    raise self._lost(f"{type(exc).__name__} {exc}".strip()) from None
                refused = isinstance(exc, paramiko.ChannelException) or "Unable to open channel" in str(exc)
                if not refused:
                    raise TimeoutError(f"the hypervisor {self.name} did not open a session for {purpose}: "
                                       f"{exc}") from None
                if time.monotonic() < min(refused_until, deadline or refused_until):
                    time.sleep(0.05)
                    continue
                raise SessionError(
                    f"The hypervisor's sshd ({self.name}) refused another session for {purpose} ({exc}). "
                    f"pytest-ostimages opens up to {MAX_SESSIONS - 1} at once on its one connection: set "
                    f"MaxSessions {MAX_SESSIONS} (OpenSSH's default) or more in its sshd_config.") from None

    # -- files -------------------------------------------------------------------------------

    def path(self, path: Union[str, PurePath, RemotePath]) -> RemotePath:
        return RemotePath(self, path)

    def _sftp(self, what: str, path: RemotePath, call: Callable[[paramiko.SFTPClient], T],
              target: Optional[RemotePath] = None, exact: bool = True) -> T:
        """`call` with the SFTP session (one request at a time), its errors as pathlib's.

        `exact`: find the errno SFTP does not tell (a few more requests, only on an error); without
        it a missing file and a file on the way both read as FileNotFoundError (exists() needs no more).
        """
        with self._sftp_lock:
            self._alive()
            if self._sftp_client is None:
                channel = self._open_session(None, "SFTP")
                try:
                    channel.invoke_subsystem("sftp")
                    self._sftp_client = paramiko.SFTPClient(channel)
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    channel.close()
                    raise SessionError(f"The hypervisor {self.name} runs no SFTP server ({exc}); pytest-ostimages "
                                       f"reads and writes files there over SFTP: enable the sftp Subsystem in "
                                       f"its sshd_config.") from None
            client = self._sftp_client
            try:
                return call(client)
            except (EOFError, paramiko.SSHException, OSError) as exc:
                if not self._transport.is_active():
                    self._sftp_client = None
                    raise self._lost() from None
                if not isinstance(exc, OSError) or client.sock.closed:
                    self._sftp_client = None  # the next request starts another SFTP server there
                    raise SessionError(f"The SFTP server on the hypervisor {self.name} ended during {what} of "
                                       f"{path}: {exc or exc.__class__.__name__}. Its sshd's log says why.") from None
                raise self._os_error(what, path, exc, target, client, exact) from None

    def _os_error(self, what: str, path: RemotePath, exc: OSError, target: Optional[RemotePath],
                  client: paramiko.SFTPClient, exact: bool) -> OSError:
        """pathlib's OSError for a failed SFTP request.

        OpenSSH's SFTP server reports ENOENT, ENOTDIR and ELOOP all as "no such file", EACCES and
        EPERM as "permission denied", and every other errno as "Failure": the rest is found by
        looking at the paths involved, as the kernel did.
        """
        reported = exc.errno if isinstance(exc.errno, int) else None
        code: Optional[int] = reported
        if exact and reported in (None, errno.ENOENT):
            code = _diagnose(what, path, target, client, reported)
        second = str(target) if target is not None else None
        if code is None:
            return OSError(errno.EIO, f"{what} failed on the hypervisor {self.name}: its SFTP server says "
                                      f"{exc} (a read-only or full file system, or another file on the way)",
                           str(path), None, second)
        return OSError(code, os.strerror(code), str(path), None, second)

    def _open(self, path: RemotePath, mode: str) -> _SFTPRaw:
        """Open a file there (`mode` without b/t); a created one gets mode 0600 (SFTP's open carries it)."""
        flags = 0
        if "r" in mode or "+" in mode:
            flags |= sftp_protocol.SFTP_FLAG_READ
        if mode[0] in "wax" or "+" in mode:
            flags |= sftp_protocol.SFTP_FLAG_WRITE
        if "w" in mode:
            flags |= sftp_protocol.SFTP_FLAG_CREATE | sftp_protocol.SFTP_FLAG_TRUNC
        if "a" in mode:
            flags |= sftp_protocol.SFTP_FLAG_CREATE | sftp_protocol.SFTP_FLAG_APPEND
        if "x" in mode:
            flags |= sftp_protocol.SFTP_FLAG_CREATE | sftp_protocol.SFTP_FLAG_EXCL
        attrs = paramiko.SFTPAttributes()
        if flags & sftp_protocol.SFTP_FLAG_CREATE:
            attrs.st_mode = 0o600

        def open_(client: paramiko.SFTPClient) -> paramiko.SFTPFile:
            # paramiko's SFTPClient.open, with the permissions a new file gets (it sends none: 0666 & umask)
            kind, message = client._request(sftp_protocol.CMD_OPEN, str(path), flags, attrs)
            if kind != sftp_protocol.CMD_HANDLE:
                raise paramiko.SFTPError("Expected handle")
            # paramiko's file knows r, w, a and + (x is for the open above, and writes as w)
            handle = paramiko.SFTPFile(client, message.get_binary(), mode.replace("x", "w") + "b", 0)
            if mode[0] == "r" and stat_module.S_ISDIR(handle.stat().st_mode or 0):
                handle.close()  # open(2) of a folder for reading succeeds there; Python's open refuses
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            if mode[0] == "a":
                handle.seek(0, io.SEEK_END)
            return handle

        handle = self._sftp(f"open-{mode[0]}", path, open_)
        return _SFTPRaw(self, handle, mode, path)

    def _read_all(self, path: RemotePath) -> bytes:
        def read(client: paramiko.SFTPClient) -> bytes:
            with client.open(str(path), "rb") as handle:
                attrs = handle.stat()
                if stat_module.S_ISDIR(attrs.st_mode or 0):  # open(2) of a folder succeeds there
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
                if stat_module.S_ISREG(attrs.st_mode or 0):
                    handle.prefetch(attrs.st_size or 0)  # parallel requests: one round trip's wait, not one per 32 KiB
                return handle.read()

        return self._sftp("open-r", path, read)

    def _as_remote(self, path: AnyPath) -> RemotePath:
        return path if isinstance(path, RemotePath) else RemotePath(self, str(path))

    def rmtree(self, path: AnyPath) -> None:
        target = str(path)
        if target in ("", "/", ".") or PurePosixPath(target) == PurePosixPath("/"):
            raise ValueError(f"refusing to remove {target!r} on {self.name}")
        self.run(["rm", "-rf", "--", target], timeout=600)  # like shutil.rmtree(ignore_errors=True)

    def copyfile(self, source: AnyPath, target: AnyPath) -> None:
        """``cp --sparse=always`` there (a new copy is never readable by others on the way), then 0600."""
        script = 'umask 077 && cp --sparse=always --reflink=auto -- "$1" "$2" && chmod 600 -- "$2"'
        done = self.run(["sh", "-c", script, "sh", str(source), str(target)])
        if done.returncode != 0:
            raise _command_error(done, str(source), self)

    def chown(self, path: AnyPath, uid: int, gid: int) -> None:
        remote = self._as_remote(path)
        if uid == -1 or gid == -1:
            now = remote.stat()
            uid = now.st_uid if uid == -1 else uid
            gid = now.st_gid if gid == -1 else gid
        self._sftp("chown", remote, lambda s: s.chown(str(remote), uid, gid))

    def set_reader_acl(self, path: AnyPath, uid: int) -> None:
        """``setfacl -m u:UID:r,g::-,o::-`` there (the same ACL LocalHost writes); OSError without setfacl."""
        try:
            done = self.run(["setfacl", "-m", f"u:{int(uid)}:r,g::-,o::-", "--", str(path)])
        except FileNotFoundError:
            raise OSError(errno.EOPNOTSUPP, f"setfacl is not installed on the hypervisor {self.name}; install its "
                                            f"acl package there (dnf/apt-get install acl)", str(path)) from None
        if done.returncode == 0:
            return
        raise _command_error(done, str(path), self)

    def mkfifo(self, path: AnyPath, mode: int = 0o600) -> None:
        done = self.run(["mkfifo", "-m", format(mode & 0o7777, "o"), "--", str(path)])
        if done.returncode != 0:
            raise _command_error(done, str(path), self)

    # -- commands ----------------------------------------------------------------------------

    def _command(self, wrapper: str, argv: Sequence[str], input: bytes, deadline: Optional[float]) -> paramiko.Channel:
        """A channel running `argv` under `wrapper`, holding one of the command sessions (released by the caller)."""
        if not argv:
            raise ValueError("no command given")
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._commands.acquire(timeout=wait):
            raise TimeoutError(f"{argv[0]} did not start on {self.name} within the deadline: all "
                               f"{MAX_COMMANDS} command sessions stayed busy")
        try:
            channel = self._open_session(deadline, argv[0])
            try:
                channel.exec_command(shlex.join(["sh", "-c", wrapper, "sh", str(len(input)), *argv]))
            except (paramiko.SSHException, EOFError, OSError):
                channel.close()
                raise self._lost() if not self._transport.is_active() else \
                    SessionError(f"The hypervisor {self.name} refused to run {argv[0]}.") from None
            return channel
        except BaseException:
            self._commands.release()
            raise

    def run(self, argv: Sequence[str], input: Optional[bytes] = None, timeout: Optional[float] = None) -> Completed:
        """Run `argv` there; `timeout` a deadline for all of it (TimeoutError after it: the command,
        and what it started, killed there). FileNotFoundError if the command is not installed there."""
        deadline = None if timeout is None else time.monotonic() + timeout
        data = input or b""
        channel = self._command(COMMAND_WRAPPER, argv, data, deadline)
        try:
            if data:
                threading.Thread(target=self._feed, args=(channel, data), name=f"ost-input-{argv[0]}",
                                 daemon=True).start()
            stdout, stderr = self._collect(channel, deadline, argv, timeout)
            if not channel.status_event.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{argv[0]} did not finish within {timeout} s on {self.name}")
            status = channel.exit_status
        finally:
            channel.close()  # before its end: the wrapper's watcher kills the command there
            self._commands.release()
        if not self._transport.is_active() and status == -1:
            raise self._lost()
        error = stderr.decode(errors="replace")
        if status == 127 and error.startswith(NOT_FOUND):
            raise FileNotFoundError(errno.ENOENT, f"No such command on the hypervisor {self.name}", argv[0])
        return Completed(tuple(argv), status if status != -1 else -9, stdout, error)

    @staticmethod
    def _feed(channel: paramiko.Channel, data: bytes) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):  # it ended (or timed out) first
            channel.sendall(data)

    def _collect(self, channel: paramiko.Channel, deadline: Optional[float], argv: Sequence[str],
                 timeout: Optional[float]) -> tuple[bytes, bytes]:
        """stdout and stderr until the channel's end of file, both drained as they come (no deadlock)."""
        stdout, stderr = bytearray(), bytearray()
        ready = channel.fileno()  # readable when either has data, and for ever after the end
        while True:
            while channel.recv_ready():
                stdout += channel.recv(1 << 16)
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(1 << 16)
            if channel.eof_received or channel.closed:
                if not channel.recv_ready() and not channel.recv_stderr_ready():
                    return bytes(stdout), bytes(stderr)
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{argv[0]} did not finish within {timeout} s on {self.name}")
            if not self._transport.is_active():
                raise self._lost()
            select.select([ready], [], [], 1.0 if left is None else min(left, 1.0))

    def spawn(self, argv: Sequence[str], input: Optional[bytes] = None) -> RemoteProcess:
        """Start `argv` there with `input` as its whole stdin, its output discarded; it runs until it
        ends, kill() or the connection's end (then its whole process group there is killed)."""
        data = input or b""
        channel = self._command(SPAWN_WRAPPER, argv, data, None)
        return RemoteProcess(self, channel, argv, data, self._commands.release)

    def uid(self) -> int:
        if self._uid is None:
            done = self.run(["id", "-u"], timeout=60)
            if done.returncode != 0 or not done.text.strip().isdigit():
                raise SessionError(f"`id -u` failed on the hypervisor {self.name}: {done.stderr.strip()}")
            self._uid = int(done.text)
        return self._uid

    def default_root(self) -> RemotePath:
        """Where sessions keep their files there unless told: /var/tmp/pytest-ostimages-<SSH user>."""
        return self.path(f"/var/tmp/pytest-ostimages-{self.user}")

    # -- locks -------------------------------------------------------------------------------

    def _lock_agent(self) -> _LockAgent:
        with self._agent_lock:
            if self._agent is None:
                self._agent = _LockAgent(self, self._lock_dir)
            return self._agent

    @staticmethod
    def _check_name(name: str) -> str:
        if not LOCK_NAME.fullmatch(name):
            raise ValueError(f"a host-wide lock's name is letters, digits, '.', '_' and '-', not {name!r}")
        return name

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the host-wide lock `name` there (an flock a process there holds for this session)."""
        agent = self._lock_agent()
        rid = agent.request("wait", self._check_name(name))
        try:
            agent.wait_for(rid)
            yield
        finally:
            agent.release(rid)

    @contextlib.contextmanager
    def lock_if_free(self, name: str) -> Iterator[bool]:
        agent = self._lock_agent()
        rid = agent.request("try", self._check_name(name))
        try:
            word, _ = agent.wait_for(rid)
            yield word == "held"
        finally:
            agent.release(rid)

    @contextlib.contextmanager
    def any_slot(self, prefix: str, count: int, abort: threading.Event) -> Iterator[float]:
        """Hold one of `count` host-wide locks ``<prefix>-<i>`` there; yields the seconds waited.
        InterruptedError when `abort` is set while waiting."""
        if count < 1:
            raise ValueError(f"no slots to wait for (count={count})")
        agent = self._lock_agent()
        start = time.monotonic()
        rid = agent.request("slot", self._check_name(prefix), str(int(count)))
        try:
            agent.wait_for(rid, abort)
            yield time.monotonic() - start
        finally:
            agent.release(rid)

    # -- guests ------------------------------------------------------------------------------

    def guest_socket(self, address: str, port: int, timeout: float) -> Optional[ChannelSocket]:
        """A ``direct-tcpip`` channel to `address`:`port` through the hypervisor's sshd (as ``ssh -J``);
        None when sshd reports it refused or unreachable, or has not answered within `timeout` s (an
        open answered later is closed then)."""
        self._alive()
        address = address.strip("[]")
        opened: "Future[paramiko.Channel]" = Future()

        def open_channel() -> None:
            try:
                opened.set_result(self._transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0),
                                                               timeout=max(60.0, timeout)))
            except BaseException as exc:
                opened.set_exception(exc)

        threading.Thread(target=open_channel, name=f"ost-forward-{address}", daemon=True).start()
        try:
            channel = opened.result(timeout=max(0.0, timeout))
        except FutureTimeout:
            opened.add_done_callback(_close_late_channel)
            return None
        except paramiko.ChannelException as exc:
            if exc.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                raise SessionError(f"The hypervisor's sshd ({self.name}) refuses to forward connections to its "
                                   f"guests ({exc.text}). pytest-ostimages reaches each VM through it, as ssh -J "
                                   f"does: set AllowTcpForwarding yes (or local) in its sshd_config.") from None
            return None  # connect failed: nothing accepts there yet
        except (paramiko.SSHException, EOFError, OSError):
            if not self._transport.is_active():
                raise self._lost() from None
            return None
        return ChannelSocket(channel, (address, port))

    def close(self) -> None:
        """Close the connection: every lock held there is released, every command there killed."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self._sftp_client is not None:
                self._sftp_client.close()
        with contextlib.suppress(Exception):
            if self._agent is not None:
                self._agent.close()
        self._transport.close()


def _close_late_channel(opened: "Future[paramiko.Channel]") -> None:
    if not opened.cancelled() and opened.exception() is None:
        opened.result().close()


def connect(uri: str, timeout: float = CONNECT_TIMEOUT) -> SSHHost:
    """The hypervisor of `uri`, connected (see SSHHost.connect)."""
    return SSHHost.connect(uri, timeout)


def connect_host(uri: str) -> Host:
    """The hypervisor side of libvirt URI `uri`: this machine, or the one a qemu+ssh URI names."""
    if is_local(uri):
        return LocalHost(uri)
    return SSHHost.connect(uri)
