"""The session's lab: images -> overlays -> network -> domains -> SSH, and teardown.

One :class:`Lab` per pytest session (per xdist worker). It creates nothing until
the first VM is asked for, checks every input (images, chain, key, libvirt)
before creating anything, boots the VMs of a batch together and records a
cleanup for every object it makes, so that closing it removes them all, also
after a failure half-way.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import reaper, virt
from .catalog import Catalog, Image
from .config import OstConfig
from .errors import OstError
from .overlay import WorkDir
from .owner import Label
from .render import HostEntry, Templates, domain_xml, network_xml
from .slots import BootSlots
from .ssh import SSH, load_key
from .vm import VM

if TYPE_CHECKING:
    import libvirt
    import paramiko

FIRST_VM_HOST = 10  # VMs get .10 - .99; .100 up is the dynamic DHCP range
LAST_VM_HOST = 99


@dataclass(frozen=True)
class VMSpec:
    """What to boot: a role name and a layer name (or qcow2 path)."""

    role: str
    image: str
    memory: Optional[int] = None
    vcpus: Optional[int] = None


@dataclass(frozen=True)
class Network:
    """The session's management network."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    domain: str
    handle: "libvirt.virNetwork"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1


class Lab:
    def __init__(self, config: OstConfig, progress: Callable[[str], None] = lambda _: None,
                 owner_pid: Optional[int] = None, catalog: Optional[Catalog] = None) -> None:
        self.config = config
        self.progress = progress
        self.run_id = secrets.token_hex(4)
        self.workdir = WorkDir(config.workdir, self.run_id)
        self.vms: dict[str, VM] = {}
        self.network: Optional[Network] = None
        self._cleanup = contextlib.ExitStack()
        self._conn: Optional["libvirt.virConnect"] = None
        self._next_host = FIRST_VM_HOST
        self._owner = Label.current(self.run_id, self.workdir.path, owner_pid)
        self._abort = threading.Event()  # set when the session is interrupted
        self.ssh_key: Optional[Path] = None  # the distro's key as a 0600 file, once started
        self._slots = BootSlots(config.workdir, config.max_boots)
        if catalog is not None:  # already discovered (for the report header)
            self.catalog = catalog

    # --- inputs, checked before anything is created -------------------------------

    @functools.cached_property
    def catalog(self) -> Catalog:
        return Catalog.discover(self.config.images_dir)

    @functools.cached_property
    def distro(self) -> str:
        return self.catalog.choose_distro(self.config.distro)

    def image(self, name: str) -> Image:
        """A layer name of the chosen distro, or a path to a qcow2 file."""
        if "/" in name or name.endswith(".qcow2"):
            return self.catalog.image_from_path(Path(name), self.distro)
        return self.catalog.image(self.distro, name)

    @functools.cached_property
    def _key(self) -> "paramiko.PKey":
        return load_key(self.catalog.ssh_key(self.distro))

    @functools.cached_property
    def templates(self) -> Templates:
        return Templates(self.config.templates)

    @property
    def conn(self) -> "libvirt.virConnect":
        if self._conn is None:
            self._conn = virt.connect(self.config.libvirt_uri)
            self._cleanup.callback(self._conn.close)
        return self._conn

    @functools.cached_property
    def virt_type(self) -> str:
        return virt.resolve_virt_type(self.conn, self.config.virt_type)

    @functools.cached_property
    def cpu_mode(self) -> str:
        return virt.resolve_cpu_mode(self.virt_type, self.config.cpu_mode)

    def size(self, spec: VMSpec) -> tuple[int, int]:
        """Memory (MiB) and vCPUs of `spec`: its own, else the setting for its role."""
        return (spec.memory or self.config.memory.for_role(spec.role),
                spec.vcpus or self.config.vcpus.for_role(spec.role))

    def label(self, role: str = "") -> Label:
        return self._owner.with_role(role)

    # --- creating things ----------------------------------------------------------

    def _start(self) -> None:
        """Check libvirt and the templates, then make the work directory."""
        if self.workdir.path.exists():
            return
        self.templates.load("domain.xml"), self.templates.load("network.xml")
        self.virt_type  # noqa: B018 - connects and checks KVM before anything exists
        for leftover in reaper.reap(self.conn, self.config.workdir):
            self.progress(f"removed leftover {leftover}")
        version = self.conn.getLibVersion()
        self.progress(f"libvirt {version // 1000000}.{version // 1000 % 1000}.{version % 1000} at "
                      f"{self.config.libvirt_uri}: {self.virt_type} guests, CPU {self.cpu_mode}")
        self.workdir.create(self._owner)
        self._cleanup.callback(self.workdir.remove if not self.config.keep else self.workdir.disown)
        # for people and tools that log in by hand (OpenSSH wants the key 0600)
        self.ssh_key = self.workdir.private_key(self.catalog.ssh_key(self.distro))
        self.progress(f"work directory {self.workdir.path}")

    def _create_network(self, roles: list[str]) -> list[HostEntry]:
        """Create the management network with DHCP/DNS entries for `roles`."""
        name = f"ost-{self.run_id}"

        def create(subnet: ipaddress.IPv4Network) -> tuple[Network, list[HostEntry]]:
            entries = [_entry(role, subnet.network_address + FIRST_VM_HOST + i)
                       for i, role in enumerate(roles)]
            xml = network_xml(self.templates.load("network.xml"), name=name, bridge=name,
                              subnet=subnet, domain=self.config.dns_domain, hosts=entries,
                              label=self.label())
            # registered first: an interrupt right after creation still removes it
            self._cleanup.callback(virt.remove_network, self.conn, name)
            handle = virt.create_network(self.conn, xml)
            return Network(name, name, subnet, self.config.dns_domain, handle), entries

        self.network, entries = virt.with_free_subnet(
            self.conn, self.config.subnet_pool, self.config.workdir / "subnets.lock", create)
        self._next_host = FIRST_VM_HOST + len(entries)
        self.progress(f"network {name}: {self.network.subnet}, bridge {name}")
        return entries

    def _reserve(self, role: str) -> HostEntry:
        """A DHCP/DNS entry for a VM added to the running network."""
        assert self.network is not None
        if self._next_host > LAST_VM_HOST:
            raise OstError(f"A session can have at most {LAST_VM_HOST - FIRST_VM_HOST + 1} VMs.")
        entry = _entry(role, self.network.subnet.network_address + self._next_host)
        virt.add_network_host(self.network.handle, entry, self.network.domain)
        self._next_host += 1
        return entry

    def ensure_network(self) -> Network:
        if self.network is None:
            self._start()
            self._create_network([])
        assert self.network is not None
        return self.network

    def boot(self, specs: list[VMSpec]) -> list[VM]:
        """Boot `specs` together and wait until each answers SSH."""
        taken = [s.role for s in specs if s.role in self.vms]
        if len({s.role for s in specs}) != len(specs) or taken:
            raise OstError(f"VM roles must be unique in a session; got {[s.role for s in specs]}")
        images = {s.role: self.image(s.image) for s in specs}  # every input checked first
        key = self._key
        self._start()
        if self.network is None:
            entries = self._create_network([s.role for s in specs])
        else:
            entries = [self._reserve(s.role) for s in specs]
        assert self.network is not None
        plans = []
        for spec, entry in zip(specs, entries):
            image = images[spec.role]
            memory, vcpus = self.size(spec)
            name = f"ost-{self.run_id}-{spec.role}"
            overlay = self.workdir.overlay(image, name)
            console = self.workdir.path / f"{name}.console.log"
            xml = domain_xml(self.templates.load("domain.xml"), name=name, virt_type=self.virt_type,
                             cpu_mode=self.cpu_mode, memory_mib=memory, vcpus=vcpus, disk=overlay,
                             backing=list(zip(image.chain, image.chain_formats)),
                             network=self.network.name, mac=entry.mac, console_log=console,
                             label=self.label(spec.role))
            # registered before it exists: an interrupt at any point still removes it
            self._cleanup.callback(virt.remove_domain, self.conn, name)
            plans.append(_Plan(spec.role, name, image, memory, vcpus, entry, overlay, console, xml))
        return self._run_all(plans, key)

    def _boot_one(self, plan: "_Plan", key: "paramiko.PKey") -> VM:
        """Start one domain once a host-wide boot slot is free, and wait for its SSH."""
        assert self.network is not None
        with self._slots.take(self._abort) as waited:
            if waited >= 1:
                self.progress(f"{plan.role}: waited {waited:.1f} s for a boot slot")
            domain = virt.create_domain(self.conn, plan.xml)
            vm = VM(plan.name, plan.role, f"{plan.role}.{self.network.domain}", plan.entry.ip,
                    plan.entry.mac, plan.image, plan.overlay, plan.console, domain,
                    SSH(str(plan.entry.ip), key))
            self.vms[plan.role] = vm
            self.progress(f"{plan.role}: booting {plan.image.label} as {plan.name} ({plan.vcpus} vCPU, "
                          f"{plan.memory} MiB, {self.virt_type}) at {plan.entry.ip}")
            seconds = vm.wait_for_ssh(self.config.boot_timeout, self._abort)
        self.progress(f"{plan.role}: ssh ready in {seconds:.1f} s")
        return vm

    def _run_all(self, plans: list["_Plan"], key: "paramiko.PKey") -> list[VM]:
        """Boot every plan in its own thread; the first error is raised after all ended."""
        start = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=len(plans))
        futures = [pool.submit(self._boot_one, plan, key) for plan in plans]
        try:
            errors = [f.exception() for f in futures if f.exception() is not None]
        finally:
            if not all(f.done() for f in futures):
                # Ctrl-C or SIGTERM reached the main thread: stop the waits now.
                self._abort.set()
            pool.shutdown(wait=True)
        if errors:
            raise errors[0]  # type: ignore[misc]
        if len(plans) > 1:
            self.progress(f"{len(plans)} VMs ready in {time.monotonic() - start:.1f} s")
        return [f.result() for f in futures]

    # --- one environment for several processes (--ost-share) ------------------------

    def describe(self) -> dict[str, Any]:
        """What another process needs to attach to this lab's VMs."""
        assert self.network is not None
        net = self.network
        return {
            "run_id": self.run_id, "owner": asdict(self._owner),
            "network": {"name": net.name, "bridge": net.bridge, "subnet": str(net.subnet),
                        "domain": net.domain},
            "vms": [{"name": vm.name, "role": vm.role, "hostname": vm.hostname, "ip": str(vm.ip),
                     "mac": vm.mac, "image": str(vm.image.path), "overlay": str(vm.overlay),
                     "console": str(vm.console_path)} for vm in self.vms.values()],
        }

    def attach(self, state: dict[str, Any]) -> None:
        """Use the VMs another process booted; close() then removes them as if ours."""
        self.run_id = state["run_id"]
        self.workdir = WorkDir(self.config.workdir, self.run_id)
        self._owner = Label(**state["owner"])
        self._cleanup.callback(self.workdir.remove)
        net = state["network"]
        self._cleanup.callback(virt.remove_network, self.conn, net["name"])
        self.network = Network(net["name"], net["bridge"], ipaddress.IPv4Network(net["subnet"]),
                               net["domain"], self.conn.networkLookupByName(net["name"]))
        for v in state["vms"]:
            self._cleanup.callback(virt.remove_domain, self.conn, v["name"])
            vm = VM(v["name"], v["role"], v["hostname"], ipaddress.IPv4Address(v["ip"]), v["mac"],
                    self.image(v["image"]), Path(v["overlay"]), Path(v["console"]),
                    self.conn.lookupByName(v["name"]), SSH(v["ip"], self._key))
            self.vms[vm.role] = vm
        self.ssh_key = self.workdir.private_key(self.catalog.ssh_key(self.distro))
        self.progress(f"attached to {len(self.vms)} VMs of run {self.run_id}")

    def release(self) -> None:
        """Close connections but leave every VM, network and file for the others."""
        self._cleanup.pop_all()
        for vm in self.vms.values():
            vm.close()
        if self._conn is not None:
            self._conn.close()

    def close(self) -> None:
        """Remove every domain, network and file this lab made."""
        if self.workdir.path.exists():
            self.progress(f"removing the VMs, network and work directory of run {self.run_id}")
        for vm in self.vms.values():
            vm.close()
        if self._conn is not None and len(self.vms) > 1:
            # Destroying a domain waits for its qemu to exit: do them all at once.
            with ThreadPoolExecutor(max_workers=len(self.vms)) as pool:
                list(pool.map(lambda vm: virt.remove_domain(self.conn, vm.name), self.vms.values()))
        self._cleanup.close()
        self.vms.clear()
        self.network = None


@dataclass(frozen=True)
class _Plan:
    """A VM of a batch, ready to start: everything but the domain exists."""

    role: str
    name: str
    image: Image
    memory: int
    vcpus: int
    entry: HostEntry
    overlay: Path
    console: Path
    xml: str


def _entry(role: str, ip: ipaddress.IPv4Address) -> HostEntry:
    # A MAC made of the address: unique on the network and easy to match in logs.
    o = ip.packed
    return HostEntry(role, f"52:54:00:{o[1]:02x}:{o[2]:02x}:{o[3]:02x}", ip)
