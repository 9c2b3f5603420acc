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

Anything that does not work (no agent, a restore error, an unknown save format)
falls back to a normal boot, with one progress line saying why. The cache is
bounded in size (least recently used out, never a state in use) and removed by
``pytest --ost-cleanup --ost-warm-cache``.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lxml import etree

from .errors import OstError
from .files import host_lock, write_atomic
from .identity import openssh_line
from .render import HostEntry
from .virt import libvirt_module, remove_domain

if TYPE_CHECKING:
    import libvirt

    from .lab import Network
    from .vm import VM

SNAPSHOT = "ost-warm"
MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("<16s19I")  # magic, version, data_len, was_running, format, cookieOffset, unused[14]


def guest_network(entry: HostEntry, network: "Optional[Network]") -> str:
    """The guest side of moving to the new NIC on `network` (the management one), for the guest agent.

    NetworkManager (ost-images): a new DHCP connection. ifupdown: the reserved
    addresses, route and resolver are set at once, and FRESH_LEASES, run last,
    takes new leases in the background. The old leases belonged to a NIC and a
    network that are gone: they are forgotten (asking for them again costs a NAK
    and a round trip).
    """
    assert network is not None
    commands = ["pkill -x dhclient", "rm -f /var/lib/dhcp/dhclient.eth0.leases /var/lib/dhcp/dhclient6.eth0.leases",
                "ip addr flush dev eth0 scope global"]
    nameservers: "list[ipaddress.IPv4Address | ipaddress.IPv6Address]" = []
    if entry.ip is not None:
        commands += [f"ip addr add {entry.ip}/{network.subnet.prefixlen} brd + dev eth0",
                     f"ip route replace default via {network.gateway} dev eth0"]
        nameservers.append(network.gateway)
    if entry.ip6 is not None and network.subnet6 is not None and network.gateway6 is not None:
        # with a lifetime: dhclient -6 starts by flushing the permanent global addresses
        commands.append(f"ip -6 addr add {entry.ip6}/{network.subnet6.prefixlen} dev eth0 nodad "
                        f"valid_lft 3600 preferred_lft 3600")
        nameservers.append(network.gateway6)
    resolv = "\\n".join([f"search {network.domain}", f"nameserver {nameservers[0]}"])
    commands.append(f"printf '{resolv}\\n' >/etc/resolv.conf")
    return f"if command -v nmcli >/dev/null; then nmcli device connect eth0; else {'; '.join(commands)}; fi"


# New leases (IPv4 and DHCPv6) in the background, last: the guest has its addresses already, and
# dhclient-script, with no old lease to drop, only confirms them.
FRESH_LEASES = "command -v nmcli >/dev/null || (ifup --force eth0 </dev/null >/dev/null 2>&1 &)"


class WarmStartError(OstError):
    """A saved state could not be restored; the VM is booted instead."""


def recipe_key(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SavedState:
    folder: Path

    @property
    def key(self) -> str:
        return self.folder.name

    @property
    def disk(self) -> Path:
        return self.folder / "disk.qcow2"

    @property
    def memory(self) -> Path:
        return self.folder / "memory.save"

    @property
    def meta(self) -> Path:
        return self.folder / "meta.json"

    def exists(self) -> bool:
        return self.meta.is_file()

    def host_key(self) -> str:
        return str(json.loads(self.meta.read_text())["host_key"])

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


class WarmCache:
    """``<root>/<key>/`` per saved state; bounded to `limit` bytes."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit

    def state(self, key: str) -> SavedState:
        return SavedState(self.root / key)

    def use(self, state: SavedState) -> int:
        """Mark `state` in use (a shared lock, held while the fd is open) and recently used."""
        fd = os.open(state.folder / "in-use.lock", os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(state.meta)  # last use, for the least-recently-used eviction
        return fd

    def save(self, vm: "VM", key: str, progress: Callable[[str], None]) -> None:
        """Save `vm` (running, with the SNAPSHOT taken when it was ready) as state `key`."""
        state = self.state(key)
        with host_lock(f"warm-{key}"):
            if state.exists():
                return  # another session saved it meanwhile
            start = time.monotonic()
            partial = self.root / f"{key}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True, mode=0o755)
            vm.close()
            dom = vm.domain
            dom.revertToSnapshot(dom.snapshotLookupByName(SNAPSHOT), libvirt_module().VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
            for snapshot in dom.listAllSnapshots():  # their memory would bloat the saved disk
                snapshot.delete()
            dom.save(str(partial / "memory.save"))
            shutil.move(str(vm.overlay), partial / "disk.qcow2")
            (partial / "in-use.lock").touch()
            assert vm.host_key is not None
            write_atomic(partial / "meta.json", json.dumps({
                "key": key, "image": str(vm.image.path), "role": vm.role, "saved": time.time(),
                "host_key": openssh_line(vm.host_key)}))
            for path in partial.iterdir():
                path.chmod(0o444 if path.name != "in-use.lock" else 0o644)
            os.replace(partial, state.folder)
        progress(f"{vm.role}: state saved for warm starts in {time.monotonic() - start:.1f} s "
                 f"({state.size() // 2**20} MiB, {state.folder})")
        self.evict(keep=key, progress=progress)

    def evict(self, keep: str, progress: Callable[[str], None]) -> None:
        """Least recently used states out until the cache fits; never one in use."""
        states = sorted((s for s in (SavedState(p) for p in self.root.glob("*")) if s.exists()),
                        key=lambda s: s.meta.stat().st_mtime)
        total = sum(s.size() for s in states)
        for state in states:
            if total <= self.limit:
                break
            size = state.size()  # measured before it is gone
            if state.key == keep or not self._remove_unused(state):
                continue
            total -= size
            progress(f"warm cache over {self.limit // 2**30} GiB: removed the least recently used state "
                     f"{state.key}")

    def clear(self) -> list[str]:
        """Remove every state not in use (``--ost-cleanup --ost-warm-cache``)."""
        removed = []
        for folder in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            if folder.name.endswith(".partial"):
                shutil.rmtree(folder, ignore_errors=True)
            elif SavedState(folder).exists() and self._remove_unused(SavedState(folder)):
                removed.append(folder.name)
        return removed

    def _remove_unused(self, state: SavedState) -> bool:
        with host_lock(f"warm-{state.key}"):
            fd = os.open(state.folder / "in-use.lock", os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a running VM's disk is backed by it
            finally:
                os.close(fd)
            shutil.rmtree(state.folder, ignore_errors=True)
            return True


# --- restore ----------------------------------------------------------------------------


def patch_save_image(source: Path, target: Path, edit: Callable[[etree._Element], None]) -> None:
    """Copy libvirt save image `source` to `target` with its domain XML changed by `edit`.

    Layout (libvirt's qemu_saveimage.h): a 92-byte header (magic, version, data_len,
    was_running, format, cookieOffset, 14 unused), then data_len bytes of data (the
    domain XML, NUL-terminated, then at cookieOffset the cookie), then the memory
    stream. The copy gets the new XML and a header that says how long it is; the
    cookie and the stream are copied as they are.
    """
    with open(source, "rb") as src:
        fields = list(HEADER.unpack(src.read(HEADER.size)))
        magic, version, data_len, cookie_offset = fields[0], fields[1], fields[2], fields[5]
        if magic != MAGIC or version != 2:
            raise WarmStartError(f"{source} is not a libvirt save image this plugin knows "
                                 f"(magic {magic!r}, version {version})")
        data = src.read(data_len)
        xml_end = cookie_offset or data_len
        root = etree.fromstring(data[:xml_end].split(b"\0", 1)[0],
                                etree.XMLParser(remove_blank_text=True))
        edit(root)
        xml = etree.tostring(root, encoding="unicode").encode() + b"\0"
        cookie = data[xml_end:] if cookie_offset else b""
        fields[2] = len(xml) + len(cookie)
        fields[5] = len(xml) if cookie_offset else 0
        with open(target, "wb") as out:
            out.write(HEADER.pack(*fields) + xml + cookie)
            shutil.copyfileobj(src, out, 16 << 20)  # the memory stream
    target.chmod(0o644)


def restored_xml(fresh: etree._Element) -> Callable[[etree._Element], None]:
    """An edit that gives the saved domain XML the names and files of `fresh` (this session's)."""

    def edit(root: etree._Element) -> None:
        for tag in ("name", "metadata"):
            _replace(root, root.find(tag), fresh.find(tag))
        root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        disk, new_disk = root.find("devices/disk[@device='disk']"), fresh.find("devices/disk[@device='disk']")
        for tag in ("source", "backingStore"):
            _replace(disk, disk.find(tag), new_disk.find(tag))  # type: ignore[union-attr]
        iface, new_iface = root.find("devices/interface"), fresh.find("devices/interface")
        for tag in ("source", "mac"):
            _replace(iface, iface.find(tag), new_iface.find(tag))  # type: ignore[union-attr]
        console_log = _found(fresh, "devices/serial/source").get("path", "")
        for path in ("devices/serial/source", "devices/console/source"):
            node = root.find(path)
            if node is not None:
                node.set("path", console_log)

    return edit


def _on_saved_disk(disk: etree._Element, overlay: Path, saved: Path) -> None:
    """Make `disk` (as rendered for a boot) the new `overlay` on the `saved` disk state."""
    _found(disk, "source").set("file", str(overlay))
    chain = disk.find("backingStore")
    store = etree.Element("backingStore", type="file")
    etree.SubElement(store, "format", type="qcow2")
    # read-only and shared by every restore: libvirt must not relabel it
    etree.SubElement(etree.SubElement(store, "source", file=str(saved)), "seclabel", model="dac", relabel="no")
    if chain is not None:
        disk.replace(chain, store)
        store.append(chain)
    else:
        disk.append(store)


def _found(root: etree._Element, path: str) -> etree._Element:
    node = root.find(path)
    if node is None:
        raise WarmStartError(f"the domain XML has no {path}")
    return node


def _replace(parent: Any, old: Any, new: Any) -> None:
    """`new` in place of `old` (or added, if the saved XML had none)."""
    if new is None:
        return
    if old is None:
        parent.append(copy.deepcopy(new))
    else:
        parent.replace(old, copy.deepcopy(new))


def _agent(dom: "libvirt.virDomain", execute: str, arguments: dict[str, Any]) -> Any:
    import libvirt_qemu

    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": execute, "arguments": arguments}), 30, 0)
    return json.loads(reply)["return"]


def wait_for_agent(dom: "libvirt.virDomain", timeout: float) -> bool:
    """Whether the guest agent answers within `timeout` s (it may start after sshd in a booting guest)."""
    libvirt = libvirt_module()
    deadline = time.monotonic() + timeout
    while True:
        try:
            _agent(dom, "guest-ping", {})
            return True
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def guest_exec(dom: "libvirt.virDomain", command: str, timeout: float = 60) -> None:
    """Run `command` in the guest through its agent, which needs no network."""
    pid = _agent(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _agent(dom, "guest-exec-status", {"pid": pid})
        if status.get("exited"):
            if status.get("exitcode", 0) != 0:
                raise WarmStartError(f"{command!r} in the guest exited with {status.get('exitcode')}")
            return
        time.sleep(0.1)
    raise WarmStartError(f"{command!r} in the guest did not finish within {timeout:.0f} s")


def restore(conn: "libvirt.virConnect", state: SavedState, fresh_xml: str, overlay: Path,
            memory_copy: Path, guest_setup: str) -> tuple["libvirt.virDomain", dict[str, float]]:
    """Restore `state` as the domain of `fresh_xml` (this session's), on the network with its MAC.

    `guest_setup`: shell commands run in the guest through its agent (guest_network and its identity).

    Returns the domain and the seconds each step took.
    """
    libvirt = libvirt_module()
    steps: dict[str, float] = {}
    mark = time.monotonic()

    def step(name: str) -> None:
        nonlocal mark
        steps[name], mark = time.monotonic() - mark, time.monotonic()

    result = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                             str(state.disk), str(overlay)], capture_output=True, text=True)
    if result.returncode != 0:
        raise WarmStartError(f"cannot make an overlay of {state.disk}: {result.stderr.strip()}")
    fresh = etree.fromstring(fresh_xml.encode())
    _on_saved_disk(_found(fresh, "devices/disk[@device='disk']"), overlay, state.disk)
    patch_save_image(state.memory, memory_copy, restored_xml(fresh))
    step("copy")
    try:
        conn.restoreFlags(str(memory_copy), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        dom = conn.lookupByName(fresh.findtext("name"))
    except libvirt.libvirtError as exc:
        raise WarmStartError(f"libvirt could not restore it: {exc.get_error_message()}") from None
    finally:
        memory_copy.unlink(missing_ok=True)
    step("restore")
    try:
        # The guest keeps the saved MAC with its device state: give it a new NIC instead.
        old = _found(etree.fromstring(dom.XMLDesc().encode()), "devices/interface")
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        dom.detachDeviceFlags(etree.tostring(old, encoding="unicode"), flags)
        nic = copy.deepcopy(_found(fresh, "devices/interface"))
        for child in nic.findall("address") + nic.findall("alias") + nic.findall("target"):
            nic.remove(child)
        dom.attachDeviceFlags(etree.tostring(nic, encoding="unicode"), flags)
        step("new NIC")
        if not wait_for_agent(dom, 10):
            raise WarmStartError("its guest agent does not answer")
        step("agent")
        now = time.time()
        dom.setTime({"seconds": int(now), "nseconds": int(now % 1 * 1e9)}, 0)
        guest_exec(dom, guest_setup)
        step("clock, addresses and identity")
    except (libvirt.libvirtError, KeyError, ValueError, WarmStartError) as exc:
        message = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
        remove_domain(dom)  # the one just restored: the fallback boot takes its name
        raise WarmStartError(f"the restored guest could not be moved to this session's network "
                             f"(guest agent?): {message}") from None
    return dom, steps

