"""Warm start: VMs restored from saved memory + disk state instead of booted.

The first time a VM of a given recipe (its image chain, size, virt type, CPU
mode, domain template and identity mode) is ready, the plugin takes an internal
snapshot (a fraction of a second) and, at the end of the session, saves that
state into a host-wide cache next to the custom layers: ``<workdir>/warm/<key>/``
holds ``disk.qcow2`` (the overlay at that moment, read-only, backed by the
installed image) and ``memory.save`` (libvirt's save image). A later session,
any number of them at once, restores it in seconds:

1. a new overlay on ``disk.qcow2``; a copy of ``memory.save`` whose embedded
   domain XML gets this session's name, UUID, disk, network and console (libvirt
   refuses another UUID through its API, and two live copies of one state need
   two, so the copy is written with the new XML in its header's data);
2. the NIC is replaced by one with this session's MAC (a restored guest keeps the
   old MAC from its device state), and through the guest agent (no network
   needed) the clock is set;
3. in one guest-agent command, the VM gets its reserved addresses, takes its own
   identity (identity.py: machine-id, host key, hostname, sshd restarted) and
   starts taking fresh leases in the background (guest_network, FRESH_LEASES),
   so that the first SSH login, on the new address, already checks the new host
   key (the saved one with ``--ost-identity=keep``).

A session whose networks have the saved state's addresses (the first free subnets of the
pool are the same ones from one session to the next) gives each NIC the saved MAC, as a
MAC is made of its address (networks.entry): then the guest keeps its NICs, addresses and
leases (which never expire, and the bridge has the saved one's MAC: render.network_xml),
and only its clock and identity are set (steps 2 and 3 shrink to one short command).

Anything that does not work (no agent, a restore error, an unknown save format)
falls back to a normal boot, with one progress line saying why. The cache is
bounded in size (least recently used out, never a state in use) and removed by
``pytest --ost-cleanup --ost-warm-cache``.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lxml import etree

from .. import faults
from ..errors import ImageError, WarmStartError
from ..guest.agent import clock_offset, clock_script, guest_exec, has_nic, wait_for_agent
from ..hypervisor.connection import libvirt_module, remove
from ..hypervisor.host import LOCAL
from ..images.catalog import backing_chain
from ..images.overlay import create_overlay
from ..hypervisor.saveimage import found, on_saved_disk, restored_xml, streamed
from ..guest.keys import openssh_line
from ..state.files import write_atomic
from ..state.owner import RUN_ID
from ..state.warmcache import SavedState, WarmCache
from ..waiting import poll
from .networks import subnets_of

if TYPE_CHECKING:
    import libvirt

    from ..hypervisor.host import AnyPath, Host

    from ..guest.vm import VM

SNAPSHOT = "ost-warm"


def vm_meta(vm: "VM") -> dict[str, Any]:
    """A saved VM's meta data: its role, image and host key, and the /24 of each of its networks (a
    restore there keeps its NICs: Lab._saved_subnets)."""
    assert vm.host_key is not None
    return {"role": vm.role, "image": str(vm.image.path), "host_key": openssh_line(vm.host_key),
            "subnets": subnets_of(vm.nics)}


def save_state(cache: WarmCache, vm: "VM", key: str, progress: Callable[[str], None]) -> None:
    """Save `vm` (running, with the SNAPSHOT taken when it was ready) as state `key` of `cache`."""
    start = time.monotonic()

    host = cache.host

    def write(folder: "AnyPath") -> dict[str, Any]:
        vm.close()
        dom = vm.domain
        ready = vm.checkpoints.get(SNAPSHOT)
        if ready is not None:  # UEFI: the checkpoint taken when it was ready is the state
            dom.destroy()
            move(host, ready.memory, folder / "memory.save")
            faults.point("warm-save")
            move(host, ready.disk, folder / "disk.qcow2")
            if ready.nvram is not None:
                move(host, ready.nvram, folder / "VARS.fd")
        else:
            dom.revertToSnapshot(dom.snapshotLookupByName(SNAPSHOT),
                                 libvirt_module().VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
            for snapshot in dom.listAllSnapshots():  # their memory would bloat the saved disk
                snapshot.delete()
            dom.save(str(folder / "memory.save"))
            faults.point("warm-save")
            move(host, vm.overlay, folder / "disk.qcow2")
        return vm_meta(vm)

    if cache.save(key, write, progress):
        state = cache.state(key)
        progress(f"{vm.role}: state saved for warm starts in {time.monotonic() - start:.1f} s "
                 f"({state.size() // 2**20} MiB, {state.folder})")
        faults.point("warm-saved")


@dataclass
class SavedVM:
    """A VM that save_vm put into an environment's state folder: how to take it back, running, while
    the state is not complete (another VM's save failed)."""

    vm: "VM"
    memory: "AnyPath"
    moved: list[tuple["AnyPath", "AnyPath"]] = field(default_factory=list)  # (its disk, the state's layer) renamed

    def undo(self) -> None:
        """The VM running again where it was, on its own disks (the state's folder is then thrown away)."""
        for disk, layer in reversed(self.moved):
            layer.replace(disk)
        self.moved.clear()
        conn = self.vm.domain.connect()
        conn.restore(str(self.memory))  # as it was saved (paused, in an environment's save)
        domain = conn.lookupByName(self.vm.name)
        if domain.state()[0] == libvirt_module().VIR_DOMAIN_PAUSED:
            domain.resume()
        self.vm.replace_domain(domain, self.vm.overlay, self.vm.host_key)


def save_vm(vm: "VM", folder: "AnyPath") -> SavedVM:
    """Save `vm` (paused) into `folder`, a VM's part of an environment's state: its memory, its disks
    (they become the state's read-only layers, each whole above what outlives the run: the image, or
    an earlier state) and its UEFI variables. Its domain stops. If anything fails, the VM runs
    again where it was before the error is raised."""
    dom = vm.domain
    for snapshot in dom.listAllSnapshots():  # they would stay in the saved disk, unreachable
        snapshot.delete()
    vm.checkpoints.clear()
    vm.dirty, vm.warm_key = None, None  # superseded: clean_vm and warm start begin from this state
    live = etree.fromstring(dom.XMLDesc().encode())
    (folder / "disks").mkdir(parents=True)
    state = SavedState(folder)
    dom.save(str(state.memory))
    saved = SavedVM(vm, state.memory)
    try:
        faults.point("warm-save")
        for disk, layer in _disk_layers(live, state):
            _freeze(vm.host, vm.host.path(found(disk, "source").get("file", "")), layer, saved)
        nvram = live.findtext("os/nvram")
        if nvram:
            vm.host.copyfile(vm.host.path(nvram), state.nvram)
        write_atomic(state.meta, json.dumps(vm_meta(vm)))
    except BaseException:
        saved.undo()
        raise
    return saved


def _freeze(host: "Host", disk: "AnyPath", layer: "AnyPath", saved: SavedVM) -> None:
    """`disk` (the VM's, in its run's folder) as the state's read-only `layer`.

    Renamed when it can be (the same filesystem: it costs nothing, and is undone on failure),
    else copied; the VM's own disk stays as it was then. A disk whose chain has other layers
    in the run's folder (checkpoints: clean_vm on UEFI, the warm start's ready state) would be
    backed by files that go with the run: their data is merged into the layer (qemu-img rebase,
    safe mode: the clusters that differ), which is then backed by the first layer that outlives
    the run (the image, or an earlier state).
    """
    try:
        chain, _ = backing_chain(disk, None, host)
    except ImageError as exc:
        raise WarmStartError(f"the disk {disk} cannot be saved: {exc}") from None
    base = next((path for path in chain[1:] if str(path.parent) != str(disk.parent)), None)
    try:
        if same_filesystem(host, disk, layer.parent):
            disk.replace(layer)
            saved.moved.append((disk, layer))
        else:
            host.copyfile(disk, layer)
    except OSError as exc:
        raise WarmStartError(f"cannot copy the disk {disk} into the saved state at {layer}: "
                             f"{exc.strerror or exc}") from None
    if len(chain) > 1 and str(chain[1].parent) == str(disk.parent):
        rebase = ["qemu-img", "rebase", "-f", "qcow2", "-b", str(base) if base else "", "-F", "qcow2", str(layer)]
        result = host.run(rebase)
        if result.returncode != 0:
            raise WarmStartError(f"cannot merge the run's layers below {disk} into the saved state at {layer}: "
                                 f"{result.stderr.strip() or f'qemu-img exited with {result.returncode}'}")


def move(host: "Host", source: "AnyPath", target: "AnyPath") -> None:
    """Move a file there: renamed, or copied and removed across filesystems."""
    if same_filesystem(host, source, target.parent):
        source.replace(target)
    else:
        host.copyfile(source, target)
        source.unlink()


def same_filesystem(host: "Host", path: "AnyPath", folder: "AnyPath") -> bool:
    """Whether `path` can be renamed into `folder` (one filesystem)."""
    if host.local:
        return os.stat(str(path)).st_dev == os.stat(str(folder)).st_dev
    done = host.run(["stat", "-c", "%d", str(path), str(folder)])
    devices = done.text.split()
    return done.returncode == 0 and len(devices) == 2 and devices[0] == devices[1]


def damage(saved: SavedState, host: "Host" = LOCAL) -> Optional[str]:
    """Why the VM state `saved` cannot be restored (None: it can): a file missing, or a disk whose
    chain is broken or reaches into a run's work directory (which goes with that run)."""
    if not saved.memory.is_file():
        return f"{saved.memory} is missing"
    disks = [saved.disk, *sorted((saved.folder / "disks").glob("*.qcow2"))]
    for disk in disks:
        if not disk.is_file():
            return f"{disk} is missing"
        try:
            chain, _ = backing_chain(disk, None, host)
        except ImageError as exc:
            return str(exc).splitlines()[0]
        private = [path for path in chain[1:] if RUN_ID.fullmatch(path.parent.name)]
        if private:
            return f"{disk} is backed by {private[0]}, a file of a run's work directory"
    return None


def resume_saved(vm: "VM", saved: SavedState) -> None:
    """After save_vm: `vm` goes on where it was, on new overlays (at its disks' paths) of `saved`'s layers."""
    conn = vm.domain.connect()
    root = etree.fromstring(conn.saveImageGetXMLDesc(str(saved.memory), 0).encode())
    for disk, layer in saved_disks(root, saved):
        source = vm.host.path(found(disk, "source").get("file", ""))
        create_overlay(layer, source, vm.host)
        on_saved_disk(disk, source, layer)
    conn.restoreFlags(str(saved.memory), etree.tostring(root, encoding="unicode"),
                      libvirt_module().VIR_DOMAIN_SAVE_RUNNING)
    vm.replace_domain(conn.lookupByName(vm.name), vm.overlay, vm.host_key)
    vm.backed_by = saved.folder.parent.name


def _disk_layers(domain: etree._Element, state: SavedState) -> list[tuple[etree._Element, Path]]:
    """The writable disks of `domain` (XML: the root disk first, the extra ones by target) and the
    file of `state` each becomes."""
    disks = domain.findall("devices/disk[@device='disk']")
    layers = [(disks[0], state.disk)] if disks else []
    for disk in disks[1:]:
        target = disk.find("target")
        if disk.find("readonly") is None and target is not None:  # not the NoCloud seed
            layers.append((disk, state.extra_disk(target.get("dev", ""))))
    return layers


def saved_disks(domain: etree._Element, state: SavedState) -> list[tuple[etree._Element, Path]]:
    """The disks of `domain` (XML) and the read-only layers of `state` each is to be an overlay on:
    the root disk on the state's disk, each extra disk on the state's disk of that target."""
    return [(disk, layer) for disk, layer in _disk_layers(domain, state) if layer.is_file()]


NIC_SEEN_TIMEOUT = 30  # s for a hot-plugged NIC to reach the guest's kernel


def attach_nics(dom: "libvirt.virDomain", nics: list[etree._Element], seen: Callable[[str], bool]) -> None:
    """Hot-plug `nics` (interface XML) in their order, each once the guest has the one before.

    A guest that names its NICs eth0, eth1, ... names them in the order its kernel probes them; two
    hot-plugs at once on a guest of 2 vCPUs were probed either way round (a restored OST host's eth0
    was its storage NIC). `seen(mac)`: whether the guest has that NIC yet.
    """
    libvirt = libvirt_module()
    for number, new in enumerate(nics):
        nic = copy.deepcopy(new)
        for child in nic.findall("alias") + nic.findall("target"):
            nic.remove(child)
        dom.attachDeviceFlags(etree.tostring(nic, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        mac = nic.findall("mac")[0].get("address", "")
        if number < len(nics) - 1 and not poll(lambda: seen(mac), NIC_SEEN_TIMEOUT, 0.1,
                                               retry_on=(libvirt.libvirtError,)):
            raise WarmStartError(f"the guest did not see its new NIC {mac} within {NIC_SEEN_TIMEOUT} s")


def nic_macs(domain: etree._Element) -> list[str]:
    """The MACs of a domain's NICs (XML), in order."""
    return [mac.get("address", "").lower() for mac in domain.findall("devices/interface/mac")]


def restore(conn: "libvirt.virConnect", state: SavedState, fresh_xml: str, memory_fifo: "AnyPath",
            guest_setup: Callable[[bool], str], host: "Host" = LOCAL) -> tuple["libvirt.virDomain", Path, dict[str, float]]:
    """Restore `state` as the domain of `fresh_xml` (this session's), on its networks with its MACs,
    every disk a new overlay on the state's, beside the file `fresh_xml` names (which a boot
    after a failed restore still uses).

    `guest_setup(kept)`: shell commands run in the guest through its agent (guest_network and its
    identity); `kept`: the saved NICs had this session's MACs, and so its addresses, and were kept.

    Returns the domain, its root disk's overlay and the seconds each step took.
    """
    libvirt = libvirt_module()
    steps: dict[str, float] = {}
    mark = time.monotonic()

    def step(name: str) -> None:
        nonlocal mark
        steps[name], mark = time.monotonic() - mark, time.monotonic()

    fresh = etree.fromstring(fresh_xml.encode())
    overlays, tag = [], secrets.token_hex(3)  # each restore its own files
    for disk, saved in saved_disks(fresh, state):  # the root disk, and the extra disks the state holds
        source = host.path(found(disk, "source").get("file", ""))
        overlays.append(source.with_name(f"{source.name.split('.')[0]}.{tag}.qcow2"))
        try:
            create_overlay(saved, overlays[-1], host)
        except ImageError as exc:
            raise WarmStartError(str(exc)) from None
        on_saved_disk(disk, overlays[-1], saved)
    nvram = fresh.findtext("os/nvram")
    if nvram and state.nvram.is_file():  # the firmware's variables of the saved state (UEFI)
        host.copyfile(state.nvram, host.path(nvram))
    step("overlays")
    saved_macs: list[str] = []
    edit = restored_xml(fresh)

    def edit_noting_macs(saved: etree._Element) -> None:
        saved_macs.extend(nic_macs(saved))
        edit(saved)

    try:
        with streamed(state.memory, memory_fifo, edit_noting_macs, host) as memory:
            conn.restoreFlags(str(memory), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        dom = conn.lookupByName(fresh.findtext("name"))
    except libvirt.libvirtError as exc:
        raise WarmStartError(f"libvirt could not restore it: {exc.get_error_message()}") from None
    step("restore")
    try:
        if not wait_for_agent(dom, 10):
            raise WarmStartError("its guest agent does not answer")
        step("agent")
        kept = bool(saved_macs) and saved_macs == nic_macs(fresh)
        if not kept:
            # The guest keeps the saved MACs with its device state: give it new NICs instead, each
            # where the old one was (on q35 its own PCIe bus, which enpNs0 names follow; eth names
            # follow the order, which attach_nics keeps)
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
            for old in etree.fromstring(dom.XMLDesc().encode()).findall("devices/interface"):
                dom.detachDeviceFlags(etree.tostring(old, encoding="unicode"), flags)
            attach_nics(dom, fresh.findall("devices/interface"), lambda mac: has_nic(dom, mac))
            step("new NICs")
        # The guest's clock stopped at the save: it is moved ahead first thing in the same agent command,
        # by its offset from this host's, not with the agent's guest-set-time, which also writes the RTC
        # with hwclock and so waits for a second's edge (the emulated RTC follows the host's clock anyway)
        guest_exec(dom, clock_script(clock_offset(dom)) + guest_setup(kept))
        step("clock and identity, addresses kept" if kept else "clock, addresses and identity")
    except (libvirt.libvirtError, KeyError, ValueError, WarmStartError) as exc:
        message = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        remove(dom)  # the one just restored: the fallback boot takes its name
        raise WarmStartError(f"the restored guest could not be moved to this session's network "
                             f"(guest agent?): {message}") from None
    return dom, overlays[0], steps
