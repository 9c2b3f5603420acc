"""Step 5: SSH to the VMs with the images' baked-in root key (paramiko).

Readiness is checked in two steps: a cheap TCP connect + banner read every
100 ms (so a VM that is up is noticed within a fraction of a second), then a
real login, retried with tenacity until the deadline.

Commands run on one channel each, read by the calling thread alone (no helper
threads): their timeout is a deadline for the whole command.
"""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import paramiko
import tenacity

from ..errors import ImageError, OstError, SSHCommandError
from .keys import fingerprint

if TYPE_CHECKING:
    from ..hypervisor.host import AnyPath, Host

PROBE_INTERVAL = 0.1
PROBE_CONNECT = 2.0  # seconds a remote hypervisor may take to say a guest's port is closed
READ_INTERVAL = 0.1  # seconds a running command may go without a look at its deadline and abort event
READ_SIZE = 65536
CONNECT_TIMEOUT = 10.0  # seconds for each step of a login (TCP, key exchange, authentication)
OPEN_TIMEOUT = 30.0  # seconds for a channel of an open connection
AUTH_GRACE = 10.0  # seconds a guest may refuse the key while it finishes booting
# What a booting guest's SSH raises until it is ready (socket.timeout is an OSError).
NOT_READY_YET = (OSError, EOFError, paramiko.SSHException)
NOT_CONNECTED = NOT_READY_YET  # what a connection that dropped raises
# Put before every command, on a line of its own. Closing a channel alone would leave a command that
# writes nothing running in the guest (holding its locks: dnf's, a device's). So the command's stdin is
# /dev/null, and a watcher holds the channel's stdin: when the channel closes (a timeout, an abort,
# Ctrl-C) while the command still runs, sshd closes that stdin and the watcher sends SIGTERM to its
# own process group: the command's (sshd starts each command's shell in a session of its own). A
# command that ended by itself leaves alone what it started in the background.
WATCHED = ('exec 3<&0 </dev/null; { while read -r _; do :; done <&3; kill -0 $$ 2>/dev/null && kill -TERM 0; } '
           '>/dev/null 2>&1 & exec 3<&-\n')


@dataclass(frozen=True)
class CommandResult:
    """What a command run over SSH returned (like subprocess.CompletedProcess)."""

    command: str
    returncode: int
    stdout: str
    stderr: str

    def check(self, where: str = "") -> "CommandResult":
        if self.returncode != 0:
            raise SSHCommandError(
                f"Command {self.command!r}{' on ' + where if where else ''} exited with "
                f"{self.returncode}.\n--- stdout (tail) ---\n{_tail(self.stdout)}\n"
                f"--- stderr (tail) ---\n{_tail(self.stderr)}"
            )
        return self


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _within(seconds: float, end: Optional[float]) -> float:
    """`seconds`, or less if the deadline `end` (time.monotonic()) comes sooner."""
    return seconds if end is None else max(0.0, min(seconds, end - time.monotonic()))


def _lines(data: bytearray, sent: int, on_line: Callable[[str], None]) -> int:
    """Call `on_line` with each whole line of `data` after offset `sent`; the offset after them."""
    end = data.rfind(b"\n", sent) + 1
    if end:
        for line in bytes(data[sent:end - 1]).split(b"\n"):
            on_line(line.decode(errors="replace"))
    return max(end, sent)


def load_key(path: "AnyPath") -> paramiko.PKey:
    """The private key at `path` (here, or on a remote hypervisor), whatever its type."""
    try:
        if isinstance(path, Path):
            return paramiko.PKey.from_path(str(path))
        text = path.read_text()
        for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return kind.from_private_key(io.StringIO(text))
            except paramiko.SSHException:
                continue
        raise paramiko.SSHException("not a private key of a type paramiko knows")
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ImageError(f"Cannot use {path} as an SSH private key: {exc}. It should be the "
                         f"images' <distro>_id_rsa; reinstall the base image package.") from None


class NotReady(Exception):
    """SSH did not come up; the reason is for the BootError the VM builds. `unanswered`: the wait ran
    out and nothing answered on the SSH port at its last try."""

    def __init__(self, reason: str, unanswered: bool = False) -> None:
        super().__init__(reason)
        self.unanswered = unanswered


class HostKeyMismatch(OstError):
    """The machine at a VM's address offered another host key than the one pinned."""


class SSH:
    """One reusable SSH connection to a VM as root.

    Until a host key is pinned (first contact) any key is accepted; from then on
    only the pinned one (paramiko's RejectPolicy). Setting `abort` (the booter's, on
    Ctrl-C) stops a running command within READ_INTERVAL. `via`: the hypervisor's side
    (hypervisor/host.py); a remote hypervisor's VMs are reached through its sshd, as
    ``ssh -J`` does (one connection to it for every VM of the session).
    """

    def __init__(self, host: str, key: paramiko.PKey, user: str = "root", port: int = 22,
                 host_key: Optional[paramiko.PKey] = None, abort: Optional[threading.Event] = None,
                 via: Optional["Host"] = None) -> None:
        self.host, self.key, self.user, self.port = host, key, user, port
        self.host_key = host_key
        self.abort = abort
        self.via = via if via is not None and not via.local else None  # None: straight from here
        self._client: Optional[paramiko.SSHClient] = None
        self._lock = threading.Lock()

    def pin(self, host_key: paramiko.PKey) -> None:
        """Accept only `host_key` from now on (the open connection is closed)."""
        self.close()
        self.host_key = host_key

    def offered_key(self) -> paramiko.PKey:
        """The host key of the open connection (the first contact's, before pinning)."""
        transport = self.connect().get_transport()
        assert transport is not None  # connect() succeeded
        return transport.get_remote_server_key()

    def connect(self, timeout: float = CONNECT_TIMEOUT, sock: Optional[socket.socket] = None) -> paramiko.SSHClient:
        """The open connection, reconnecting if it was closed or dropped.

        `sock`: an already connected socket to log in over (the readiness probe's).
        """
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is not None and transport.is_active():
                return self._client  # type: ignore[return-value]
            self.close_unlocked()
            client = paramiko.SSHClient()
            if self.host_key is None:  # first contact, inside the session's own new network
                client.set_missing_host_key_policy(paramiko.MissingHostKeyPolicy())
            else:
                client.get_host_keys().add(self._known_name, self.host_key.get_name(), self.host_key)
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            if sock is None and self.via is not None:
                sock = self.via.guest_socket(self.host, self.port, timeout)
                if sock is None:
                    raise OSError(f"{self.via.name} reaches nothing on {self.host}:{self.port}")
            try:
                client.connect(self.host, self.port, self.user, pkey=self.key, timeout=timeout,
                               banner_timeout=timeout, auth_timeout=timeout, sock=sock,
                               look_for_keys=False, allow_agent=False)
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise HostKeyMismatch(
                    f"{self.host} offered host key {fingerprint(exc.key)} ({exc.key.get_name()}), but "
                    f"{fingerprint(exc.expected_key)} ({exc.expected_key.get_name()}) was pinned when "
                    f"the session set the VM up: another machine answers at its address, or its "
                    f"host keys were changed behind the plugin's back.") from None
            transport = client.get_transport()
            assert transport is not None  # connect() succeeded
            transport.set_keepalive(15)
            self._client = client
            return client

    def run(self, command: str, timeout: Optional[float] = None) -> CommandResult:
        """Run `command`; a connection that dropped is reopened once."""
        return self.stream(command, None, timeout)

    def stream(self, command: str, on_line: Optional[Callable[[str], None]],
               timeout: Optional[float] = None) -> CommandResult:
        """Run `command`, calling `on_line` with each stdout line as it arrives (if given).

        `timeout` is a deadline for all of it: connecting, starting the command, its output
        and its exit status (None: none). When it passes, or `abort` is set, the command's
        channel is closed and OstError raised; the connection stays open for the next command.
        The calling thread reads stdout and stderr together: neither can fill up and stall the
        other, and Ctrl-C interrupts it. (A new login's steps each get what is left of the
        deadline when it starts: paramiko's TCP, key exchange and authentication timeouts.)
        """
        end = time.monotonic() + timeout if timeout is not None else None
        channel = self._open_channel(command, timeout, end)
        try:
            channel.exec_command(WATCHED + command)
            stdout, stderr, sent = bytearray(), bytearray(), 0
            while not self._finished(channel):
                self._check(command, timeout, end)
                select.select([channel], [], [], _within(READ_INTERVAL, end))
                while channel.recv_ready():
                    stdout += channel.recv(READ_SIZE)
                while channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(READ_SIZE)
                if on_line is not None:
                    sent = _lines(stdout, sent, on_line)
            if on_line is not None and sent < len(stdout):  # a last line without a newline
                on_line(stdout[sent:].decode(errors="replace"))
            status = channel.recv_exit_status()
        finally:
            channel.close()
        return CommandResult(command, status, stdout.decode(errors="replace"), stderr.decode(errors="replace"))

    def _open_channel(self, command: str, timeout: Optional[float], end: Optional[float]) -> paramiko.Channel:
        """A new session channel, over the open connection or (once, if it dropped) a new one, before `end`."""
        try:
            return self._new_channel(command, timeout, end)
        except NOT_CONNECTED:
            self.close()
            return self._new_channel(command, timeout, end)

    def _new_channel(self, command: str, timeout: Optional[float], end: Optional[float]) -> paramiko.Channel:
        self._check(command, timeout, end)
        try:
            transport = self.connect(timeout=_within(CONNECT_TIMEOUT, end)).get_transport()
            assert transport is not None  # connect() succeeded
            return transport.open_session(timeout=_within(OPEN_TIMEOUT, end))
        except NOT_CONNECTED:
            self._check(command, timeout, end)  # it failed for want of time: say so
            raise

    def _check(self, command: str, timeout: Optional[float], end: Optional[float]) -> None:
        """Raise OstError once the deadline has passed or `abort` is set."""
        if end is not None and time.monotonic() >= end:
            raise OstError(f"Command {command!r} on {self.host} did not finish within {timeout} s; it was "
                           f"ended there (SIGTERM to its processes). Allow it more time, or bound it in the VM "
                           f"itself (timeout N COMMAND).")
        if self.abort is not None and self.abort.is_set():
            raise OstError(f"Command {command!r} on {self.host} was stopped: the session was interrupted.")

    @staticmethod
    def _finished(channel: paramiko.Channel) -> bool:
        """The command exited and all its output is read (nothing comes after the end of file)."""
        return (channel.exit_status_ready() and (channel.eof_received or channel.closed)
                and not channel.recv_ready() and not channel.recv_stderr_ready())

    @property
    def _known_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def sftp(self) -> paramiko.SFTPClient:
        return self.connect().open_sftp()

    def close(self) -> None:
        with self._lock:
            self.close_unlocked()

    def close_unlocked(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def wait_ready(self, timeout: float, alive: Callable[[], Optional[str]]) -> None:
        """Wait until a login works; `alive()` returns why the VM died, or None.

        Raises NotReady with the last reason after `timeout` seconds, at once if
        the VM is no longer running.
        """
        deadline = time.monotonic() + timeout
        last = ["no answer yet"]
        unanswered = [True]  # at the last try
        first_refusal: list[float] = []

        def attempt() -> None:
            dead = alive()
            if dead:
                raise NotReady(dead)
            sock = sshd_socket(self.host, self.port) if self.via is None else \
                self.via.guest_socket(self.host, self.port, PROBE_CONNECT)
            unanswered[0] = sock is None
            if sock is None:
                through = "" if self.via is None else f" (through {self.via.name})"
                last[0] = (f"nothing answers on {self.host}:{self.port}{through} (no address yet, or sshd not "
                           f"started)")
                raise TimeoutError(last[0])
            try:
                try:
                    # a loaded guest may need long for the key exchange: allow it up to 30 s
                    self.connect(timeout=max(1.0, min(30.0, deadline - time.monotonic())), sock=sock)
                except BaseException:
                    sock.close()  # a failed login leaves the probe's socket to us
                    raise
            except paramiko.AuthenticationException as exc:
                # The key is baked into the image: a refusal that lasts is final.
                first_refusal[:] = first_refusal or [time.monotonic()]
                if time.monotonic() - first_refusal[0] > AUTH_GRACE:
                    raise NotReady(f"answers SSH but refuses the key for {self.user} ({exc}); "
                                   f"is this image's key the distro's <distro>_id_rsa?") from None
                last[0] = f"sshd answers but refuses the key ({exc})"
                raise
            except (paramiko.SSHException, EOFError, OSError) as exc:
                last[0] = f"sshd answers but the login failed ({exc.__class__.__name__}: {exc})"
                raise

        retrying = tenacity.Retrying(
            stop=tenacity.stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=tenacity.wait_fixed(PROBE_INTERVAL),
            # only what means "not ready yet"; anything else is a bug and surfaces at once
            retry=tenacity.retry_if_exception_type(NOT_READY_YET),
            reraise=True,
        )
        try:
            retrying(attempt)
        except NOT_READY_YET:
            raise NotReady(f"not reachable over SSH within {timeout:.0f} s: {last[0]}", unanswered[0]) from None


def sshd_socket(host: str, port: int = 22, connect_timeout: float = 0.25,
                banner_timeout: float = 10.0) -> Optional[socket.socket]:
    """A connection to host:port whose peer greets like sshd (the greeting left unread).

    The login then uses this very connection: sshd forks for every connection,
    which costs a booting, emulated guest a noticeable fraction of a second.
    """
    # Before the guest has its address a connect waits for ARP: give up soon and
    # probe again. Once connected, sshd may need long to greet (it forks per client).
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError:
        return None
    try:
        sock.settimeout(banner_timeout)
        if sock.recv(4, socket.MSG_PEEK).startswith(b"SSH-"):
            return sock
    except OSError:
        pass
    sock.close()
    return None
