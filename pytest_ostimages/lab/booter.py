"""Booting a batch of VMs together: host-wide slots, one thread per VM, abort on interrupt.

The booter knows nothing of networks, overlays or XML: it gets plans whose every
input exists, starts each domain once a boot slot is free and waits for its SSH.
The first failure is raised after every thread has ended; an interrupt of the
main thread stops all waits at once.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .. import faults
from ..errors import BootError, QemuCrashed, WarmStartError
from ..guest.agent import wait_for_agent
from ..guest.identity import fixup_script
from ..guest.keys import HostKey, fingerprint, public_key
from ..guest.network import FRESH_LEASES_BOUND, GuestNIC, restore_script
from ..guest.ssh import SSH
from ..guest.vm import VM
from ..hypervisor import connection as virt
from ..hypervisor.host import LOCAL
from ..hypervisor.render import HostEntry
from ..images.catalog import Image
from ..parallel import each
from ..state.slots import BootSlots
from ..state.warmcache import SavedState, WarmCache
from . import warm

if TYPE_CHECKING:
    import libvirt

    from ..hypervisor.host import AnyPath, Host
    import paramiko


NETWORK_WAIT = 30.0  # seconds a booted VM may take for its IPv6 address, and for its resolver (then, with a word, more)


@dataclass(frozen=True)
class BootPlan:
    """A VM of a batch, ready to start: everything but the domain exists."""

    role: str
    name: str
    hostname: str
    image: Image
    memory: int
    vcpus: int
    entry: HostEntry
    overlay: "AnyPath"  # on the hypervisor
    console: "AnyPath"
    xml: str
    host_key: Optional[HostKey]  # the identity to give it; None: keep the image's
    cloud_init: bool = False  # it gets its identity (host_key) from a NoCloud seed
    cloud_init_asks: Optional[frozenset[str]] = None  # the modules that must not fail (None: all)
    warm_key: Optional[str] = None  # its recipe, when warm start applies to it
    nics: tuple[tuple[str, HostEntry], ...] = ()  # (network role, reservation) of eth0, eth1, ...
    guest_nics: tuple[GuestNIC, ...] = ()  # every NIC with its network (a restore sets its addresses)
    saved: Optional[SavedState] = None  # restore it from this state (or boot, if there is none)
    saved_in: Optional[SavedState] = None  # the cache's state `saved` is in (an environment's, or itself)
    strict: bool = False  # a failed restore is an error (a whole environment's), not a boot
    names: tuple[HostEntry, ...] = ()  # the session's names on the management network (its own among them)

    @property
    def ip(self) -> "ipaddress.IPv4Address | ipaddress.IPv6Address":
        """Where the plugin reaches it: IPv4 on the management network, unless IPv6-only."""
        address = self.entry.ip or self.entry.ip6
        assert address is not None
        return address

    def vm(self, domain: "libvirt.virDomain", ssh: SSH, overlay: Optional["AnyPath"] = None, **extra: Any) -> VM:
        return VM(self.name, self.role, self.hostname, self.ip, self.entry.mac, self.image,
                  overlay or self.overlay, self.console, domain, ssh, ip6=self.entry.ip6, nics=self.nics,
                  **extra)


def wait_for_network(vm: VM, own: HostEntry, names: Sequence[HostEntry], restored: bool,
                     progress: Callable[[str], None], deadline: float) -> None:
    """Until the VM has its IPv6 address and, restored, its fresh DHCP leases are bound, for at most
    NETWORK_WAIT s; then until it resolves the session's names over DNS (`names`: the management
    network's, its own `own` among them), for at most NETWORK_WAIT s more, and then, with a word, on
    until `deadline` (time.monotonic(): its boot's, --ost-boot-timeout from its start): a guest on a
    busy host is slow, not broken. A VM that does not resolve them is not handed over (its DHCP clients
    set its resolver in the background after SSH answers: a test would race them); one without its
    DHCPv6 address or its fresh leases is, with a word (an image without DHCPv6 by DUID-LL works over
    IPv4)."""
    wanted = {name: own.addresses for name in (own.name, vm.hostname)}
    wanted.update({entry.name: entry.addresses for entry in names if entry.name != own.name})
    start = time.monotonic()
    missing = vm.wait_for_network(own.ip6 if vm.ip != own.ip6 else None, wanted, NETWORK_WAIT,
                                  also=[FRESH_LEASES_BOUND] if restored else [])
    unresolved = [line for line in missing if line.startswith("name ")]
    left = deadline - time.monotonic()
    if unresolved and left >= 1:
        progress(f"{vm.role}: does not resolve every name of the session yet ({'; '.join(unresolved)}): "
                 f"waiting up to {left:.0f} s more, until its boot timeout")
        unresolved = vm.wait_for_network(None, wanted, left)
    if unresolved:
        raise BootError(vm.describe_failure(
            f"does not resolve the session's names over DNS within {time.monotonic() - start:.0f} s "
            f"({'; '.join(unresolved)}): its resolver should be the session network's. The guest's "
            f"/etc/resolv.conf:\n{vm.diagnostic('cat /etc/resolv.conf')}", hint=False))
    if any(line.startswith("address ") for line in missing):
        progress(f"{vm.role}: no IPv6 address {own.ip6} within {NETWORK_WAIT:.0f} s: does the image "
                 f"ask for it by DHCPv6 with a DUID-LL (NetworkManager: dhcp-duid=ll)?")
    if any(line.startswith("fresh ") for line in missing):
        progress(f"{vm.role}: its DHCP clients had not bound fresh leases within {NETWORK_WAIT:.0f} s of the restore")


class Booter:
    def __init__(self, slots: BootSlots, boot_timeout: float, virt_type: str,
                 progress: Callable[[str], None], warm: Optional[WarmCache] = None,
                 warn: Optional[Callable[[str], None]] = None, host: "Host" = LOCAL) -> None:
        self.host = host  # the hypervisor's side: the VMs' files, the way to their sshd
        self.slots = slots
        self.boot_timeout = boot_timeout
        self.virt_type = virt_type
        self.progress = progress
        self.warn = warn or progress
        self.warm = warm
        self.abort = threading.Event()  # set when the session is interrupted

    def boot(self, conn: "libvirt.virConnect", plans: list[BootPlan], key: "paramiko.PKey",
             started: Callable[[VM], None]) -> list[VM]:
        """Boot every plan in its own thread; `started(vm)` as soon as its domain runs."""
        start = time.monotonic()
        # Ctrl-C or SIGTERM reaching the main thread stops the waits at once
        vms = each(lambda plan: self._boot_one(conn, plan, key, started), plans, interrupted=self.abort.set)
        if len(plans) > 1:
            self.progress(f"{len(plans)} VMs ready in {time.monotonic() - start:.1f} s")
        return vms

    def _boot_one(self, conn: "libvirt.virConnect", plan: BootPlan, key: "paramiko.PKey",
                  started: Callable[[VM], None]) -> VM:
        """Restore or start one domain once a host-wide boot slot is free, and wait for its SSH; then,
        the slot free for the next VM's boot, its identity, its addresses and names, its agent."""
        with self.slots.take(self.abort) as waited:
            if waited >= 1:
                self.progress(f"{plan.role}: waited {waited:.1f} s for a boot slot")
            vm = self._restore(conn, plan, key, started)
            if vm is None:
                domain = virt.create_domain(conn, plan.xml)
                vm = plan.vm(domain, SSH(str(plan.ip), key, abort=self.abort, via=self.host), host=self.host)
                started(vm)
                self.progress(f"{plan.role}: booting {plan.image.label} as {plan.name} ({plan.vcpus} vCPU, "
                              f"{plan.memory} MiB, {self.virt_type}) at {plan.ip}")
            faults.point("ssh-wait")
            seconds = self._wait_for_ssh(plan, vm)
        ready_by = time.monotonic() - seconds + self.boot_timeout  # its boot's deadline
        if plan.cloud_init and plan.host_key is not None and vm.origin == "booted":
            left = max(1.0, self.boot_timeout - seconds)
            done, unasked = vm.finish_cloud_init(plan.host_key, left, plan.cloud_init_asks)
            identity = f", cloud-init done in {done:.1f} s"
            for error in unasked:  # the VM is as asked; what else failed is for the person to know
                self.warn(f"{plan.role}: cloud-init reported an error in what it was not asked to do: {error}")
        elif plan.host_key is not None and vm.origin != "booted":
            identity = ", own identity given through the guest agent"
        elif vm.origin != "booted":
            identity = ", the saved state's identity kept"
        elif plan.host_key is not None:
            identity = f", own identity in {vm.take_identity(plan.host_key):.1f} s"
        else:
            vm.pin_offered_key()
            identity = ", image's identity kept"
        wait_for_network(vm, plan.entry, plan.names, vm.origin != "booted", self.progress, ready_by)
        if plan.warm_key is not None and vm.origin == "booted":
            # a restore needs the agent (its new lease and identity come through it)
            if wait_for_agent(vm.domain, 30):
                vm.snapshot(warm.SNAPSHOT)  # this ready state is saved for warm starts at the end
                vm.warm_key = plan.warm_key
            else:
                self.progress(f"{plan.role}: its guest agent does not answer: no warm start from it")
        assert vm.host_key is not None
        vm.ready = True  # its identity taken and its host key pinned: it may be kept and attached to
        self.progress(f"{plan.role}: ssh ready in {seconds:.1f} s{identity}, host key "
                      f"{fingerprint(vm.host_key)}")
        return vm

    def _wait_for_ssh(self, plan: BootPlan, vm: VM) -> float:
        """Seconds until root can log in, from its start. A booted VM whose qemu process crashed is
        started once more, on the same disks (as after a power cut), within the same deadline: a TCG
        qemu here crashed twice in some 2000 boots, with nothing in its log, both times while the guest
        probed its PCI devices, and a test loses nothing by a VM's second start. A second crash is an
        error (QemuCrashed)."""
        start = time.monotonic()
        try:
            return vm.wait_for_ssh(self.boot_timeout, self.abort)
        except QemuCrashed:
            if vm.origin != "booted" or self.abort.is_set():  # a restored VM's state is gone with its qemu
                raise
        log = virt.qemu_log(vm.domain, self.host)
        self.warn(f"{plan.role}: its qemu process crashed while it booted (the hypervisor's qemu, not the image: "
                  f"libvirt's log of it{f' {log}' if log is not None else ''}); starting it once more")
        try:
            vm.domain.create()
        except virt.libvirt_error() as exc:
            raise BootError(vm.describe_failure(f"could not be started again after its qemu crashed while it "
                                                f"booted: {exc.get_error_message()}", hint=False)) from None
        vm.wait_for_ssh(max(1.0, start + self.boot_timeout - time.monotonic()), self.abort, again=True)
        return time.monotonic() - start

    def _restore(self, conn: "libvirt.virConnect", plan: BootPlan, key: "paramiko.PKey",
                 started: Callable[[VM], None]) -> Optional[VM]:
        """The VM restored from its saved state, None if there is none or (not strict) it failed.

        A VM of a single-VM state gets its own identity; a VM of an environment's state keeps
        the state's (plan.host_key is None): the environment's VMs may trust each other's keys.
        """
        state, top = plan.saved, plan.saved_in or plan.saved
        if self.warm is None or state is None or top is None or not plan.guest_nics:
            return None
        start = time.monotonic()
        if not (state.exists() and self.warm.use(top, plan.overlay.parent)):  # none, or evicted meanwhile
            if plan.strict:
                raise WarmStartError(f"the saved state {top.key} of {plan.role} is gone")
            return None
        damage = warm.damage(state, self.host)
        if damage is not None:
            if plan.strict:
                raise WarmStartError(f"the saved state {top.key} of {plan.role} is damaged: {damage}")
            self.progress(f"{plan.role}: saved state {state.key} is damaged ({damage}): booting")
            return None
        try:
            # its own identity in the same agent command: one SSH login, with the new host key
            identity = (fixup_script(plan.hostname.split(".")[0], plan.hostname, str(plan.ip), plan.host_key,
                                     sshd="restart") if plan.host_key is not None else "")
            domain, overlay, steps = warm.restore(conn, state, plan.xml, plan.overlay.with_name(f"{plan.name}.memory"),
                                                  restore_script(plan.guest_nics, identity), self.host)
        except (WarmStartError, OSError) as exc:
            if plan.strict:
                raise WarmStartError(f"{plan.role}: {exc}") from None
            self.progress(f"{plan.role}: warm start from saved state {state.key} failed ({exc}): booting")
            return None
        host_key = plan.host_key.pkey() if plan.host_key is not None else public_key(state.host_key())
        vm = plan.vm(domain, SSH(str(plan.ip), key, host_key=host_key, abort=self.abort, via=self.host), overlay,
                     origin=f"restored from saved state {top.key}", backed_by=top.key, host=self.host)
        started(vm)
        self.progress(f"{plan.role}: restored {plan.image.label} from saved state {top.key} as "
                      f"{plan.name} at {plan.ip} in {time.monotonic() - start:.1f} s ("
                      + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items()) + ")")
        return vm
