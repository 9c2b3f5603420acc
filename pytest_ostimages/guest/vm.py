"""Step 6: the VM a test gets: a booted domain with SSH, SFTP and its console log."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import paramiko
from lxml import etree

from .. import faults
from ..errors import BootError, OstError, QemuCrashed, VirtError, VMError, WarmStartError
from ..hypervisor import checkpoint
from ..hypervisor.checkpoint import Checkpoint
from ..hypervisor.connection import domain_state, kvm_failure, libvirt_module, qemu_crash
from ..hypervisor.host import LOCAL
from ..hypervisor.render import HostEntry
from ..images.catalog import Image
from . import cloudinit, testinfra_host
from .agent import clock_offset, clock_script, guest_exec, wait_for_agent
from .identity import fixup_script
from .keys import HostKey
from .network import network_wait_script
from .ssh import SSH, CommandResult, HostKeyMismatch, NotReady

CLEAN_SNAPSHOT = "ost-clean"
# The guest's journal, whatever machine-id it has now: the plugin gives each VM its own after journald
# started (identity, the NoCloud seed's bootcmd), and journalctl alone reads only the persistent journal
# filed under the current one ("-- No entries --" for everything logged before the change).
JOURNAL = "journalctl --no-pager --merge"
# this boot's entries (journalctl refuses -b with --merge)
BOOT_JOURNAL = f"{JOURNAL} _BOOT_ID=$(tr -d - </proc/sys/kernel/random/boot_id)"
BOOT_HINT = ("Check that the image boots and starts sshd (the console shows how far it got); "
             "under TCG emulation (--ost-virt-type=qemu) give it more --ost-boot-timeout.")
STUCK_HINT = ("The guest stopped where its console stops: it is stuck, not slow, and more --ost-boot-timeout "
              "would not help. If it stops at the same place on every run, the image is the cause; if it boots on "
              "the next run, it was that one boot (under TCG emulation, guests have been seen to stop this way early "
              "in their boot, rarely, and to boot on the next try).")
log = logging.getLogger("pytest_ostimages")

if TYPE_CHECKING:
    import libvirt

    from ..hypervisor.host import AnyPath, Host
    from testinfra.host import Host as TestinfraHost


class ConsoleWatch:
    """When a booting guest's console last grew (its log's size, looked at once a second)."""

    def __init__(self, path: "AnyPath") -> None:
        self._path = path
        self._size = 0
        self._grew = self._looked = time.monotonic()

    def look(self) -> None:
        now = time.monotonic()
        if now - self._looked < 1.0:
            return
        self._looked = now
        try:
            size = self._path.stat().st_size
        except (OSError, OstError):  # a diagnostic: never a reason to stop waiting
            return
        if size != self._size:
            self._size, self._grew = size, now

    def silent_for(self) -> float:
        """Seconds since the console last grew; 0 if it never printed anything."""
        return time.monotonic() - self._grew if self._size else 0.0


@dataclass(eq=False)
class VM:
    """A running VM of the session.

    ``name`` is the libvirt domain name (unique per run), ``role`` the short name
    tests use (``engine``, ``host0``), ``hostname`` the FQDN the other VMs resolve.
    """

    name: str
    role: str
    hostname: str
    ip: "ipaddress.IPv4Address | ipaddress.IPv6Address"  # where the plugin reaches it (IPv4 unless IPv6-only)
    mac: str
    image: Image
    overlay: "AnyPath"  # on the hypervisor, as its console log
    console_path: "AnyPath"
    domain: "libvirt.virDomain" = field(repr=False)
    _ssh: SSH = field(repr=False)
    boot_seconds: Optional[float] = None
    dirty: Optional[bool] = None  # clean_vm: None until snapshotted, then used since revert?
    origin: str = "booted"  # or "restored from saved state <key>" (warm start)
    warm_key: Optional[str] = None  # its recipe, when its ready state is to be saved
    ip6: Optional[ipaddress.IPv6Address] = None  # on the management network
    nics: tuple[tuple[str, HostEntry], ...] = ()  # (network role, reservation) of eth0, eth1, ...
    ready: bool = False  # answered SSH, has its identity, its host key pinned
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict, repr=False)  # UEFI's "snapshots"
    backed_by: Optional[str] = None  # the saved state (warm start) its disks are overlays of
    host: "Host" = field(default=LOCAL, repr=False)  # the hypervisor's side: its files (overlay, console, NVRAM)

    @functools.cached_property
    def testinfra(self) -> "TestinfraHost":
        """A testinfra Host for this VM (``vm.testinfra.package("lvm2").is_installed``),
        over its pinned SSH connection; needs ``pytest-ostimages[testinfra]``."""
        return testinfra_host.host(self._ssh)

    def addresses(self, network: Optional[str] = None) -> list["ipaddress.IPv4Address | ipaddress.IPv6Address"]:
        """The VM's reserved addresses on `network` (a network role; default the management
        network, whatever an init-config names it), IPv4 first."""
        if network is None:
            network = next(role for role, entry in self.nics if self.ip in entry.addresses)
        return [ip for role, entry in self.nics if role == network for ip in entry.addresses]

    def ssh(self, command: str, check: bool = False, timeout: Optional[float] = 600) -> CommandResult:
        """Run `command` as root; with ``check=True`` a non-zero exit raises."""
        result = self.stream(command, None, timeout)
        return result.check(self.role) if check else result

    def stream(self, command: str, on_line: Optional[Callable[[str], None]],
               timeout: Optional[float] = None) -> CommandResult:
        """Run `command` as root, calling `on_line` with each stdout line as it comes."""
        with self._answering(repr(command)):
            return self._ssh.stream(command, on_line, timeout=timeout)

    @contextlib.contextmanager
    def _answering(self, what: str) -> Iterator[None]:
        """SSH to the VM for `what`: a dead VM is reported as such (at once, and when SSH fails),
        an SSH failure as the VM's, with its console."""
        dead = self._death()
        if dead is not None:
            raise dead
        try:
            yield
        except HostKeyMismatch as exc:
            raise VMError(f"VM {self.role} ({self.name}) at {self.ip}: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            # say that the VM died, not that SSH failed
            raise self._death() or VMError(self.describe_failure(
                f"did not answer SSH for {what}: {exc.__class__.__name__}: {exc}", hint=False)) from None

    def _death(self) -> Optional[VMError]:
        """The error for a VM that is not running any more, None while it runs."""
        state = self.state()
        if state == "running":
            return None
        return VMError(self.describe_failure(f"is not running any more (state: {state})", hint=False))

    def diagnostic(self, command: str, timeout: float = 20) -> Optional[str]:
        """stdout of `command`, or None when the VM cannot answer (for reports: never raises)."""
        try:
            return self.ssh(command, timeout=timeout).stdout
        except Exception:  # noqa: BLE001 - a diagnostic must never mask the real failure
            return None

    def put(self, local: Union[str, Path], remote: str) -> None:
        """Copy a local file into the VM over SFTP."""
        with open(local, "rb") as source, self._answering(f"copying {local} to {remote}"), self._ssh.sftp() as sftp:
            sftp.putfo(source, remote)

    def get(self, remote: str, local: Union[str, Path]) -> None:
        """Copy a file out of the VM over SFTP."""
        with open(local, "wb") as target, self._answering(f"copying {remote} to {local}"), self._ssh.sftp() as sftp:
            sftp.getfo(remote, target)

    def console_log(self, lines: Optional[int] = None) -> str:
        """The serial console output so far (the last `lines` lines if given)."""
        try:
            text = self.console_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:]) if lines else text

    def state(self) -> str:
        return domain_state(self.domain)

    def wait_for_ssh(self, timeout: float, abort: Optional[threading.Event] = None, again: bool = False) -> float:
        """Block until root can log in; return the seconds it took.

        Setting `abort` (the session is being interrupted) stops the wait at once. `again`: the VM was
        started once more after its qemu crashed (a second crash says so).
        """
        start = time.monotonic()
        console = ConsoleWatch(self.console_path)

        def died() -> Optional[str]:
            if abort is not None and abort.is_set():
                return "was not waited for any more: the session was interrupted"
            state = self.state()
            console.look()
            return None if state == "running" else f"stopped while booting (state: {state})"

        try:
            self._ssh.wait_ready(timeout, died)
        except NotReady as exc:
            kvm = kvm_failure(self.domain, self.host) if self.state() == "paused" else None
            if kvm is not None:  # every VM of the host would stop the same way
                raise VirtError(self.describe_failure(f"was stopped by KVM while booting: {kvm.rstrip('.')}",
                                                     hint=False)) from None
            crash = qemu_crash(self.domain, self.host)
            if crash is not None:  # not the image: no hint about it
                twice = " again, after it was started once more" if again else ""
                raise QemuCrashed(self.describe_failure(f"stopped while booting: its qemu process crashed{twice}; "
                                                        f"{crash}", hint=False)) from None
            silent = console.silent_for()
            if exc.unanswered and silent >= timeout / 2:  # it printed, then stopped: stuck, not slow
                raise BootError(self.describe_failure(f"{exc}; its console has printed nothing for the last {silent:.0f} s",
                                                      hint=STUCK_HINT)) from None
            raise BootError(self.describe_failure(str(exc))) from None
        except HostKeyMismatch as exc:
            raise BootError(self.describe_failure(f"is not the machine it should be: {exc}", hint=False)) from None
        self.boot_seconds = time.monotonic() - start
        return self.boot_seconds

    @property
    def host_key(self) -> Optional[paramiko.PKey]:
        """The pinned SSH host key (None before first contact)."""
        return self._ssh.host_key

    def take_identity(self, key: HostKey) -> float:
        """Give the guest its own machine-id, host key `key` and hostname; pin `key`. Seconds."""
        start = time.monotonic()
        self.ssh(fixup_script(self.hostname.split(".")[0], self.hostname, str(self.ip), key),
                 check=True, timeout=120)
        faults.point("identity")
        self._ssh.pin(key.pkey())
        self._wait_for_new_sshd()
        return time.monotonic() - start

    def _wait_for_new_sshd(self, timeout: float = 60) -> None:
        """sshd re-executes itself (SIGHUP) with the new key: log in again as soon as it listens."""
        try:
            self._ssh.wait_ready(timeout, lambda: None if self.state() == "running" else "stopped")
        except NotReady as exc:
            raise BootError(self.describe_failure(f"did not answer SSH after taking its identity: {exc}")) from None
        except HostKeyMismatch as exc:
            raise BootError(self.describe_failure(f"does not offer the host key it was given: {exc}",
                                                  hint=False)) from None

    def finish_cloud_init(self, key: HostKey, timeout: float,
                          asked: Optional[frozenset[str]]) -> tuple[float, list[str]]:
        """Wait until cloud-init has finished (its seed gave the guest `key`); pin `key`.

        The boot failed if cloud-init did not finish within `timeout` s, or failed in a stage
        or in a module of `asked` (cloudinit.py; None: any module). Returns the seconds it
        took and the errors that do not fail the boot, for a warning.
        """
        start = time.monotonic()
        try:
            done = self.ssh(cloudinit.WAIT_COMMAND, timeout=timeout)
        except OstError:
            done = None
        status, _, record = done.stdout.partition("\n") if done is not None else ("", "", "")
        try:
            report = cloudinit.Report.parse(record)
        except ValueError:
            report = None
        failures = ([f"it did not finish within {timeout:.0f} s"] if done is None
                    else [f"it exited with {status} and left no readable /run/cloud-init/status.json"]
                    if report is None else report.failures(asked))
        if failures:
            log = self.ssh("cloud-init status --long; tail -n 30 /var/log/cloud-init-output.log", timeout=60)
            raise BootError(self.describe_failure(
                "answers SSH, but cloud-init did not do what was asked of it: " + "; ".join(failures)
                + f"\n{log.stdout}", hint=False))
        self._ssh.pin(key.pkey())
        self.ssh("true", check=True)  # sshd offers the key cloud-init installed
        assert report is not None
        return time.monotonic() - start, report.warnings(asked)

    def wait_for_network(self, ip6: Optional[ipaddress.IPv6Address],
                         names: dict[str, list["ipaddress.IPv4Address | ipaddress.IPv6Address"]],
                         timeout: float, also: Sequence[str] = ()) -> list[str]:
        """Wait up to `timeout` s until the guest holds `ip6` (if given) and passes the shell checks
        `also` (each prints what it misses), then up to `timeout` s more until it resolves each of
        `names` over DNS (not /etc/hosts) to each of its addresses; what is still missing then ([] when
        nothing)."""
        script = network_wait_script(ip6, names, timeout, also)
        result = self.ssh(script, timeout=2 * timeout + 30)
        return [line for line in result.stdout.splitlines() if line.strip()] if result.returncode else []

    def pin_offered_key(self) -> None:
        """Keep the guest as it is; accept only the host key it offered at first contact."""
        self._ssh.pin(self._ssh.offered_key())

    def describe_failure(self, reason: str, console_lines: int = 30, hint: Union[bool, str] = True) -> str:
        """`hint`: True for the boot hint, a text of its own, or False for none."""
        tail = self.console_log(console_lines) or "(the console log is empty)"
        advice = BOOT_HINT if hint is True else hint or ""
        return (
            f"VM {self.role} ({self.name}, image {self.image.label}) {reason}.\n"
            f"  state: {self.state()}\n  address: {self.ip} ({self.hostname}, MAC {self.mac})\n"
            f"  console log: {self.console_path}\n"
            f"--- last {console_lines} lines of the serial console ---\n{tail}\n---"
            + (f"\n{advice}" if advice else "")
        )

    def snapshot(self, name: str = CLEAN_SNAPSHOT) -> float:
        """Save memory and disk as snapshot `name`; return seconds. An internal snapshot (inside
        the overlay), or with UEFI firmware, which libvirt cannot snapshot internally, a checkpoint
        beside the overlay (hypervisor/checkpoint.py)."""
        start = time.monotonic()
        with self._snapshot_errors(f"save its state as snapshot {name!r}"):
            if checkpoint.uses_pflash(self.domain):
                self._ssh.close()  # its domain is saved and restored under it
                self.checkpoints[name], self.domain = checkpoint.take(self.domain, self.overlay, self.nvram, name,
                                                                      self.host)
            else:
                self.domain.snapshotCreateXML(f"<domainsnapshot><name>{name}</name></domainsnapshot>", 0)
        return time.monotonic() - start

    def has_snapshot(self, name: str = CLEAN_SNAPSHOT) -> bool:
        """Whether snapshot `name` exists (taken by this session, or by one that kept the VM)."""
        if name not in self.checkpoints:
            found = checkpoint.find(self.domain, self.overlay, self.nvram, name)
            if found is not None:
                self.checkpoints[name] = found
        return name in self.checkpoints or name in self.domain.snapshotListNames()

    def revert(self, name: str = CLEAN_SNAPSHOT) -> float:
        """Go back to snapshot `name`, running; SSH reconnects on next use. Return seconds."""
        start = time.monotonic()
        self._ssh.close()  # the guest forgot this connection: it predates the snapshot
        agent = self._agent_connected()  # asked now: right after the restore libvirt may not know yet
        with self._snapshot_errors(f"go back to snapshot {name!r}"):
            if name in self.checkpoints:
                self.domain = checkpoint.go_back(self.domain, self.checkpoints[name], self.overlay, self.nvram,
                                                 self.host)
            else:
                self.domain.revertToSnapshot(self.domain.snapshotLookupByName(name),
                                             libvirt_module().VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
        if agent:
            self._catch_up_clock()
        return time.monotonic() - start

    def _agent_connected(self) -> bool:
        """Whether the guest's agent has its channel open, as libvirt last heard from QEMU. Right after
        a restore libvirt says "disconnected" until QEMU replays the guest's open (tens of ms, longer
        on a loaded host): what counts for a revert is the state before it."""
        channel = etree.fromstring(self.domain.XMLDesc().encode()).find(
            "devices/channel/target[@name='org.qemu.guest_agent.0']")
        return channel is not None and channel.get("state") != "disconnected"

    def _catch_up_clock(self) -> None:
        """The guest's clock went back with its memory, to the snapshot's time: it is moved ahead by
        its offset from the host's through the guest agent. (A guest whose agent never opened its
        channel keeps the snapshot's time, as without the plugin: revert does not call this.)"""
        try:
            # a restored guest on a busy host may take seconds to run its agent again (5 s was too few)
            if not wait_for_agent(self.domain, 30):
                raise WarmStartError("its guest agent did not answer within 30 s")
            guest_exec(self.domain, clock_script(clock_offset(self.domain)), timeout=30)
        except (libvirt_module().libvirtError, WarmStartError) as exc:
            log.warning("%s: its clock stays at the snapshot's time: %s", self.role, exc)

    def replace_domain(self, domain: "libvirt.virDomain", overlay: Path, host_key: Optional[paramiko.PKey]) -> None:
        """The VM runs in `domain` now, on `overlay`, and answers with `host_key` (a restore)."""
        self._ssh.close()
        self.domain, self.overlay = domain, overlay
        # what belonged to the state it was in: its clean state, its checkpoints, its recipe's warm save
        self.checkpoints.clear()
        self.dirty, self.warm_key = None, None
        if host_key is not None:
            self._ssh.pin(host_key)

    @property
    def nvram(self) -> Optional["AnyPath"]:
        """The UEFI firmware's variables file (on the hypervisor), None with BIOS."""
        found = etree.fromstring(self.domain.XMLDesc().encode()).findtext("os/nvram")
        return self.host.path(found) if found else None

    @contextlib.contextmanager
    def _snapshot_errors(self, what: str) -> Iterator[None]:
        libvirt = libvirt_module()
        try:
            yield
        except libvirt.libvirtError as exc:
            raise VMError(f"VM {self.role} ({self.name}) could not {what}: libvirt says "
                          f"{exc.get_error_message()!r}. The VM is {self.state()}; a clean_vm needs a "
                          f"domain template whose firmware and disks allow snapshots.") from None

    def close(self) -> None:
        self._ssh.close()
