"""The session's lab: checked inputs -> work directory -> networks -> VMs, and teardown.

One :class:`Lab` per pytest session (per xdist worker). It creates nothing until
the first VM is asked for and checks every input (inputs.py) before creating
anything. Each object it makes is recorded in its ledger before it exists, so that
closing the lab removes them all through the one ownership-checked path
(state/ledger.py), also after a failure half-way. What it holds is one
:class:`~pytest_ostimages.state.environment.Environment` record, which is all that
``--ost-share`` and ``--ost-reuse`` exchange; a lab that attaches to another run's
environment is built from that record before it makes anything itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..config import OstConfig
from ..errors import OstError, SessionError, VMError, WarmStartError
from ..guest import cloudinit
from ..guest.keys import HostKey, openssh_line, public_key
from ..guest.network import Addressing, GuestNIC, restore_script
from ..guest.seed import write_seed
from ..guest.ssh import SSH
from ..guest.vm import CLEAN_SNAPSHOT, VM
from ..hypervisor import connection as virt
from ..hypervisor.remote import connect_host
from ..hypervisor.render import HostEntry, OstMetadata, domain_xml, network_xml
from ..images.catalog import Catalog, Image
from ..parallel import each
from ..state import ledger
from ..state.environment import (FIRST_VM_HOST, LAST_VM_HOST, Environment, NetworkRecord, VMRecord, ipv6_subnet,
                                 network_name, vm_names)
from ..state.ledger import Ledger
from ..state.owner import Label, RunRecord, client_id
from ..state.slots import BootSlots
from ..state.warmcache import SavedState, WarmCache, recipe_key
from . import warm
from .access import write_inventory, write_ssh_files
from .booter import Booter, BootPlan, wait_for_network
from .inputs import MANAGEMENT, Inputs, NetworkSpec, VMSpec
from .networks import Network, entry, with_free_subnet
from .workdir import WorkDir


@functools.lru_cache(maxsize=None)
def plugin_source_digest() -> str:
    """The plugin's own code and templates: a saved state is used only by the code that saved it
    (another version may provision guests differently: names, addresses, what runs in them)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".xml")):
        digest.update(f"{path.relative_to(package)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


if TYPE_CHECKING:
    import libvirt

    from ..hypervisor.host import AnyPath, Host


@dataclass(frozen=True)
class OstDeployment:
    """An OST suite's session (--ost-init-config): OST's names, and its deployment directory."""

    suite: str
    root: Path  # OST_REPO_ROOT
    networks: tuple[NetworkSpec, ...]


@dataclass(frozen=True)
class Run:
    """Which run a lab is: its id, its owner's label and its work directory."""

    run_id: str
    owner: Label
    workdir: WorkDir

    @classmethod
    def new(cls, run_id: str, roots: "Roots", host: "Host", owner_pid: Optional[int] = None) -> "Run":
        workdir = WorkDir(roots.hypervisor, run_id, host, roots.local)
        return cls(run_id, Label.current(run_id, workdir.path, owner_pid), workdir)

    @classmethod
    def of(cls, env: Environment, roots: "Roots", host: "Host") -> "Run":
        return cls(env.run_id, env.owner, WorkDir(roots.hypervisor, env.run_id, host, roots.local))


@dataclass(frozen=True)
class Roots:
    """Where a lab's runs keep their files: on the hypervisor (VMs' files, kept.json; per client
    machine on a remote one, so that clients never see each other's), and here (access files).
    The same folder when the hypervisor is this machine."""

    hypervisor: "AnyPath"
    local: Path
    warm: "AnyPath"  # the saved states (shared by every session of that hypervisor's user)
    layers: "AnyPath"  # the custom layers (likewise)


class Lab:
    def __init__(self, config: OstConfig, progress: Callable[[str], None] = lambda _: None,
                 owner_pid: Optional[int] = None, catalog: Optional[Catalog] = None,
                 warn: Optional[Callable[[str], None]] = None) -> None:
        self.config = config
        self.progress = progress
        self.warn = warn or progress  # what the person must know even when all went well
        self.inputs = Inputs(config, catalog, lambda: self.host)
        self._run_id, self._owner_pid = secrets.token_hex(4), owner_pid
        self._run: Optional[Run] = None  # made once the hypervisor is known (its paths)
        self._host: Optional["Host"] = None
        self.vms: dict[str, VM] = {}
        self.specs: dict[str, VMSpec] = {}  # what each VM was booted from (its role's)
        self.networks: dict[str, Network] = {}  # by role, the management network first
        self.ost: Optional[OstDeployment] = None  # set for an OST suite (--ost-init-config)
        self.ssh_key: Optional[Path] = None  # the distro's key as a 0600 file, once started
        self.ledger = Ledger()  # what close() removes, each object recorded before it exists
        self.current_environment: Optional[str] = None  # the saved environment the VMs are in now, if any
        self.pending_environment: Optional[SavedState] = None  # chosen by restore_environment, not yet restored
        self.reached: list[str] = []  # checkpoint states the VMs are in already, ahead of current_environment
        self.interrupted = False  # Ctrl-C or SIGTERM: close() tears down at once
        self._next_host: dict[str, int] = {}  # per network role
        self._conn: Optional["libvirt.virConnect"] = None
        self._booter: Optional[Booter] = None

    @property
    def run(self) -> Run:
        if self._run is None:
            self._run = Run.new(self._run_id, self.roots, self.host, self._owner_pid)
        return self._run

    @run.setter
    def run(self, run: Run) -> None:
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.run_id if self._run is not None else self._run_id

    @property
    def owner(self) -> Label:
        return self.run.owner

    @property
    def workdir(self) -> WorkDir:
        return self.run.workdir

    @property
    def workdir_root(self) -> "AnyPath":
        """The work root on the hypervisor."""
        return self.roots.hypervisor

    # --- connection and hypervisor --------------------------------------------------

    @property
    def host(self) -> "Host":
        """The hypervisor's side (its files, commands, locks, the way to its guests)."""
        if self._host is None:
            self._host = connect_host(self.config.libvirt_uri)
            self.ledger.host = self._host
        return self._host

    @functools.cached_property
    def roots(self) -> Roots:
        config, host = self.config, self.host
        if host.local:
            return Roots(config.workdir, config.workdir, config.warm_root, config.workdir / "layers")
        base = host.path(str(config.workdir)) if "workdir" in config.given else host.default_root()
        warm = host.path(str(config.warm_dir)) if config.warm_dir is not None else base / "warm"
        return Roots(base / "clients" / client_id(), config.workdir, warm, base / "layers")

    @property
    def conn(self) -> "libvirt.virConnect":
        if self._conn is None:
            self._conn = virt.connect(self.config.libvirt_uri)
        return self._conn

    @functools.cached_property
    def virt_type(self) -> str:
        return virt.resolve_virt_type(self.conn, self.config.virt_type)

    @functools.cached_property
    def cpu_mode(self) -> str:
        return virt.resolve_cpu_mode(self.virt_type, self.config.cpu_mode)

    @functools.cached_property
    def warm_cache(self) -> Optional[WarmCache]:
        """The host-wide saved states (next to the custom layers), None with --ost-warm=off."""
        if not self.config.warm:
            return None
        return WarmCache(self.roots.warm, self.config.warm_cache_size * 2**30,
                         virt.qemu_ids(self.conn, self.virt_type), self.host)

    @property
    def booter(self) -> Booter:
        if self._booter is None:
            self._booter = Booter(BootSlots(self.config.max_boots, self.host), self.config.boot_timeout,
                                  self.virt_type, self.progress, self.warm_cache, self.warn, self.host)
        return self._booter

    # --- creating things ----------------------------------------------------------

    def _start(self) -> None:
        """Check libvirt, reap what dead runs left, then make the work directory."""
        if self.ssh_key is not None:  # started, or attached
            return
        self.virt_type  # noqa: B018 - connects and checks KVM before anything exists
        for leftover in ledger.reap(self.conn, self.roots.hypervisor, self.host, self.roots.local):
            self.progress(f"removed leftover {leftover}")
        for partial in WarmCache(self.roots.warm, 0, host=self.host).remove_crashed_saves():
            self.progress(f"removed leftover warm state {partial} (its save was interrupted)")
        self.progress(f"libvirt {virt.libvirt_version(self.conn)} at "
                      f"{self.config.libvirt_uri}: {self.virt_type} guests, CPU {self.cpu_mode}")
        self.ledger.record("workdir", str(self.workdir.path), self.owner)
        if self.workdir.remote:
            self.ledger.record("clientdir", str(self.workdir.client), self.owner)
        self.workdir.create(self.owner)
        # for people and tools that log in by hand (OpenSSH wants the key 0600)
        self.ssh_key = self.workdir.private_key(self.inputs.key_path)
        self.progress(f"work directory {self.workdir.path}" + (f" on {self.host.name} (here: {self.workdir.client})"
                                                               if self.workdir.remote else ""))

    @property
    def network(self) -> Optional[Network]:
        """The management network (DNS names, SSH), once created."""
        return self.networks.get(self.management_role)

    @property
    def management_role(self) -> str:
        """The management network's role: an init-config's may have any name ("is_management")."""
        return next(n.role for n in self.topology if n.management)

    @property
    def topology(self) -> tuple[NetworkSpec, ...]:
        return self.ost.networks if self.ost is not None else (MANAGEMENT,)

    def names(self, role: str) -> tuple[str, str]:
        """The libvirt domain name and the short host name of VM `role`."""
        return vm_names(self.run_id, role, self.ost.suite if self.ost is not None else None)

    def _create_network(self, spec: NetworkSpec, hosts: list[tuple[str, int]],
                        prefer: Optional[ipaddress.IPv4Network] = None) -> None:
        """Create network `spec` with DHCP (and DNS) entries for `hosts` (name, host number), on
        the /24 `prefer` if that is free."""
        name = network_name(self.run_id, [n.role for n in self.topology].index(spec.role), spec.management)
        versions = self.config.ip_versions()
        templates = self.inputs.templates

        def create(subnet: ipaddress.IPv4Network) -> Network:
            # OST's ost_utils finds the deployment by this directory: $OST_DEPLOYMENT, here
            ost = OstMetadata(self.workdir.client, spec.role) if self.ost is not None else None
            xml = network_xml(templates.load("network.xml"), name=name, bridge=name,
                              subnet=subnet if 4 in versions else None,
                              subnet6=ipv6_subnet(subnet) if 6 in versions else None,
                              domain=self.config.dns_domain, dns=spec.management, label=self.owner, ost=ost,
                              hosts=[entry(subnet, versions, host_name, host) for host_name, host in hosts],
                              bridge_mac=entry(subnet, versions, name, 1).mac)  # made of the gateway address
            # recorded first: an interrupt right after creation still removes it
            self.ledger.record("network", name, self.owner)
            handle = virt.create_network(self.conn, xml)
            return Network(name, name, subnet, self.config.dns_domain, handle, spec.role, versions,
                           spec.management)

        # the hypervisor's routes and its host-wide lock: a remote one's, not this machine's
        network = self.networks[spec.role] = with_free_subnet(self.conn, self.config.subnet_pool, create,
                                                              host=self.host, prefer=prefer)
        addresses = [str(network.subnet)] * (4 in versions) + [str(network.subnet6)] * (6 in versions)
        self.progress(f"network {name} ({spec.role}): {', '.join(addresses)}, bridge {name}")

    def _connect(self, specs: list[VMSpec], prefer: Optional[dict[str, ipaddress.IPv4Network]] = None
                 ) -> list[tuple[tuple[str, HostEntry], ...]]:
        """Each spec's NICs (network role, reservation), eth0 first; networks are created on
        first use, with their entries (on the /24 `prefer` names for their role, where free);
        running ones get the new entries added."""
        numbered = []
        for spec in specs:
            nics = []
            short = self.names(spec.role)[1]
            roles = spec.nics or (self.management_role,)
            for index, net_role in enumerate(roles):
                host = self._next_host.get(net_role, FIRST_VM_HOST)
                if host > LAST_VM_HOST:
                    raise OstError(f"A network of a session can have at most "
                                   f"{LAST_VM_HOST - FIRST_VM_HOST + 1} NICs; {net_role} is full.")
                self._next_host[net_role] = host + 1
                # the first NIC on the management network has the VM's name (DNS)
                first = net_role == self.management_role and roles.index(net_role) == index
                nics.append((net_role, short if first else f"{short}-eth{index}", host))
            numbered.append(nics)
        created = set()
        for net_spec in self.topology:
            if net_spec.role not in self.networks:
                self._create_network(net_spec, [(name, host) for nics in numbered
                                                for role, name, host in nics if role == net_spec.role],
                                     (prefer or {}).get(net_spec.role))
                created.add(net_spec.role)
        result = []
        for nics in numbered:
            entries = tuple((role, self.networks[role].entry(name, host)) for role, name, host in nics)
            for role, reservation in entries:
                if role not in created:
                    network = self.networks[role]
                    virt.add_network_host(network.handle, reservation,
                                          network.domain if network.management else None)
            result.append(entries)
        return result

    def ensure_network(self) -> Network:
        if self.network is None:
            self._start()
            self._connect([])
        assert self.network is not None
        return self.network

    def boot(self, specs: list[VMSpec], environment: Optional[SavedState] = None) -> list[VM]:
        """Boot `specs` together and wait until each answers SSH (none: just the networks).

        `environment`: restore them all from this saved environment instead (save_environment),
        each keeping the identity it was saved with; if any of them cannot be restored, they all
        boot.
        """
        taken = [s.role for s in specs if s.role in self.vms]
        if len({s.role for s in specs}) != len(specs) or taken:
            raise OstError(f"VM roles must be unique in a session; got {[s.role for s in specs]}"
                           + (f", and {taken} already run" if taken else ""))
        images = self.inputs.check(specs)  # every input checked before anything is made
        self._check_firmware(list(images.values()))
        for spec in specs:
            if spec.nics and self.management_role not in spec.nics:
                raise SessionError(f"VM {spec.role} has no NIC on the management network (its NICs: "
                               f"{', '.join(spec.nics)}); the plugin reaches VMs over it.")
            unknown = sorted(set(spec.nics) - {n.role for n in self.topology})
            if unknown:
                raise SessionError(f"VM {spec.role} has NICs on {unknown}, which this session does not "
                               f"have (its networks: {[n.role for n in self.topology]}).")
        self.settle()
        if specs and self.current_environment is not None:  # a saved environment, and then these
            self.current_environment = recipe_key([self.current_environment, "then booted", self.fingerprint(specs)])
        self._start()
        nics = self._connect(specs, self._saved_subnets(specs, images, environment))
        if not specs:
            return []
        names = self._names([nic for spec_nics in nics for nic in spec_nics])
        plans = [dataclasses.replace(self._plan(spec, spec_nics, images[spec.role]), names=names)
                 for spec, spec_nics in zip(specs, nics)]
        self.specs.update((spec.role, spec) for spec in specs)
        try:
            if environment is not None:
                try:  # restored as saved: the environment's VMs may trust each other's keys
                    return self.booter.boot(self.conn, [dataclasses.replace(
                        plan, host_key=None, warm_key=None, saved=environment.vm(plan.role), saved_in=environment,
                        strict=True) for plan in plans], self.inputs.key, self._started)
                except WarmStartError as exc:
                    self.progress(f"saved environment {environment.key} cannot be restored ({exc}): booting instead")
                    for plan in plans:  # those restored (just now): the boot takes their names
                        if plan.role in self.vms:
                            self._replace(self.vms.pop(plan.role))
            return self.booter.boot(self.conn, plans, self.inputs.key, self._started)
        finally:
            self._write_access_files()

    def _check_firmware(self, images: list[Image]) -> None:
        """A UEFI image needs UEFI firmware where libvirt runs: say so before anything exists."""
        uefi = [image for image in images if self.inputs.firmware(image) == "efi"]
        if not uefi:
            return
        machine = self.inputs.templates.load("domain.xml").find("os/type").get("machine", "")
        choices = virt.firmware_choices(self.conn, self.virt_type, machine)
        if choices is not None and "efi" not in choices:
            raise SessionError(f"Image {uefi[0].path} boots with UEFI, but libvirt at {self.config.libvirt_uri} has no "
                           f"UEFI firmware for {machine or 'its default'} machines (its domain capabilities list "
                           f"{', '.join(choices) or 'none'}). Install OVMF (Debian, Ubuntu: apt install ovmf; EL, "
                           f"Fedora: dnf install edk2-ovmf) and restart libvirtd, or pass --ost-firmware=bios for an "
                           f"image that also boots with BIOS.")

    def _write_access_files(self) -> None:
        assert self.ssh_key is not None  # made by _start
        write_ssh_files(self.workdir.client, self.run_id, self.ssh_key, self.vms.values(), self.host.jump)
        write_inventory(self.inventory, self.vms.values(), self.ssh_key, self.workdir.client / "known_hosts",
                        self.host.jump)

    @property
    def inventory(self) -> Path:
        """The ansible inventory of the session's VMs (access.write_inventory)."""
        return self.workdir.client / "inventory"

    def addressing(self, network: Network) -> Addressing:
        """What a guest needs to set its addresses on `network` itself (a restored VM)."""
        return Addressing(network.subnet.prefixlen, network.gateway, network.domain,
                          network.subnet6.prefixlen if network.subnet6 is not None else None, network.gateway6)

    def _plan(self, spec: VMSpec, nics: tuple[tuple[str, HostEntry], ...], image: Image) -> BootPlan:
        """Overlay, disks, identity (host key, NoCloud seed) and domain XML of one VM of a batch."""
        assert self.network is not None
        memory, vcpus = spec.size(self.config)
        name, short = self.names(spec.role)
        management = next(e for role, e in nics if role == self.management_role)
        overlay = self.workdir.overlay(image, name)
        disks = [(self.workdir.empty_disk(f"{name}-{disk.name}", disk.size), disk.name, disk.serial)
                 for disk in spec.disks]
        console = self.workdir.path / f"{name}.console.log"
        firmware = self.inputs.firmware(image)
        # in the work directory: libvirt's default NVRAM outlives a transient domain, and a
        # later domain of the same name would boot with these variables
        nvram = self.workdir.path / f"{name}.VARS.fd" if firmware == "efi" else None
        hostname = f"{short}.{self.network.domain}"
        host_key = HostKey.generate() if self.config.identity == "auto" else None
        seed = None
        if self.inputs.cloud_init(image):
            host_key = host_key or HostKey.generate()  # cloud-init installs it either way
            seed = self.workdir.path / f"{name}.seed.iso"
            write_seed(seed, hostname, str(management.ip or management.ip6),
                       openssh_line(self.inputs.key), host_key, spec.user_data)
        ost = None
        if self.ost is not None:
            ost = OstMetadata(self.workdir.client, deploy_scripts=tuple(
                str(p.relative_to(self.ost.root)) if p.is_relative_to(self.ost.root) else str(p)
                for p in spec.deploy_scripts))
        xml = domain_xml(self.inputs.templates.load("domain.xml"), name=name, virt_type=self.virt_type,
                         cpu_mode=self.cpu_mode, memory_mib=memory, vcpus=vcpus, disk=overlay,
                         backing=list(zip(image.chain, image.chain_formats)),
                         nics=[(self.networks[role].name, e.mac) for role, e in nics],
                         console_log=console, label=self.owner.with_role(spec.role),
                         shares=spec.shares, seed=seed, disks=disks, ost=ost, firmware=firmware,
                         secure_boot=self.config.secure_boot, nvram=nvram)
        # recorded before it exists: an interrupt at any point still removes it
        self.ledger.record("domain", name, self.owner)
        warm_key = self._warm_key(spec, image)
        guest_nics = tuple(GuestNIC(e, self.addressing(self.networks[role]), e is management) for role, e in nics)
        plan = BootPlan(spec.role, name, hostname, image, memory, vcpus, management, overlay, console, xml,
                        host_key, seed is not None, cloudinit.asked_modules(spec.user_data), warm_key, nics,
                        guest_nics)
        if warm_key is not None and self.warm_cache is not None:
            return dataclasses.replace(plan, saved=self.warm_cache.state(warm_key))
        return plan

    def _warm_key(self, spec: VMSpec, image: Image) -> Optional[str]:
        """The warm cache's key of VM `spec` as booted alone, if its state can be saved and restored:
        one NIC, no extra disks, shares or deploy scripts. A restored guest has run cloud-init already
        (with these user-data) and takes its new identity through the guest agent: a NoCloud seed is no
        reason to boot."""
        if (self.warm_cache is None or spec.shares or len(spec.nics or (self.management_role,)) != 1
                or spec.disks or spec.deploy_scripts):
            return None
        memory, vcpus = spec.size(self.config)
        return recipe_key([plugin_source_digest(), image.identity(), memory, vcpus, self.virt_type,
                           self.cpu_mode, self.inputs.templates.text("domain.xml"),
                           self.config.identity, self.config.ip_version, self.inputs.firmware(image),
                           self.config.secure_boot, self.inputs.cloud_init(image), spec.user_data])

    def _saved_subnets(self, specs: list[VMSpec], images: dict[str, Image],
                       environment: Optional[SavedState]) -> dict[str, ipaddress.IPv4Network]:
        """The /24 of each network role that the states `specs` will be restored from were saved on
        (from `environment`, or each VM's own): a restore there keeps the saved NICs and leases (2-3 s
        a VM), elsewhere every NIC moves (5-20 s). Taken where free (a state saved before the plugin
        recorded them, or unreadable, prefers none)."""
        if self.warm_cache is None:
            return {}
        if environment is not None:
            states = [environment.vm(spec.role) for spec in specs]
        else:
            keys = (self._warm_key(spec, images[spec.role]) for spec in specs)
            states = [self.warm_cache.state(key) for key in keys if key is not None]
        found: dict[str, ipaddress.IPv4Network] = {}
        for state in states:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                for role, subnet in state.data().get("subnets", {}).items():
                    found.setdefault(role, ipaddress.IPv4Network(subnet))
        return found

    def _started(self, vm: VM) -> None:
        self.vms[vm.role] = vm

    # --- what shaped the VMs, and environments saved whole (warm start) ------------------

    def fingerprint(self, specs: list[VMSpec]) -> str:
        """What shaped the VMs of `specs`: a kept or saved environment is used only if it is unchanged.

        An OST suite's deploy scripts are in it by content: VMs that ran them are not asked to
        run them again, and a changed script makes a new environment.
        """
        config = self.config
        # not the URI: a kept or saved environment is only ever looked for where it is (its hypervisor's
        # work root), and one hypervisor may be named by several URIs (qemu:///system, qemu+ssh://...)
        parts: list[Any] = [config.virt_type, config.cpu_mode, config.dns_domain,
                            config.identity, config.ip_version, config.firmware, config.secure_boot,
                            self.ost and self.ost.suite, [(n.role, n.management) for n in self.topology]]
        for spec in sorted(specs, key=lambda s: s.role):
            parts.append([spec.role, self.inputs.image(spec.image).identity(), *spec.size(self.config),
                          spec.nics, spec.disks, spec.shares, spec.user_data,
                          [hashlib.sha256(script.read_bytes()).hexdigest() for script in spec.deploy_scripts]])
        for name in ("domain.xml", "network.xml"):
            parts.append(self.inputs.templates.text(name))
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def environment_key(self, specs: list[VMSpec]) -> str:
        """The warm cache's key of the environment of `specs` as provisioned (booted, deployed)."""
        return recipe_key([plugin_source_digest(), "environment", self.fingerprint(specs), self.virt_type,
                           self.cpu_mode])

    def save_environment(self, key: str, meta: dict[str, Any]) -> Optional[SavedState]:
        """Save every VM of the lab together, as state `key` of the warm cache, and let them go on.

        The VMs are paused first, so that their states belong together; each then goes on where
        it was, on new overlays of its saved disks. `meta` is kept with the state (a
        checkpoint's name, inputs and value). None with --ost-warm=off or without VMs.
        """
        self.settle()
        cache, vms = self.warm_cache, list(self.vms.values())
        if cache is None or not vms:
            return None
        state, start = cache.state(key), time.monotonic()
        parents = sorted({vm.backed_by for vm in vms if vm.backed_by})  # saved states their disks are on

        def write(folder: Path) -> dict[str, Any]:
            for vm in vms:
                vm.close()
                vm.domain.suspend()  # all of them, before any is saved
            saved = each(lambda vm: _outcome(warm.save_vm, vm, folder / vm.role), vms)
            failed = [outcome for outcome in saved if isinstance(outcome, Exception)]
            if failed:  # all of them back, running where they were: the state is not saved
                for vm, outcome in zip(vms, saved):
                    if isinstance(outcome, warm.SavedVM):
                        outcome.undo()
                    elif vm.state() == "paused":
                        vm.domain.resume()
                raise failed[0]
            return {**meta, "kind": "environment", "roles": sorted(self.vms), "parents": parents}

        try:
            fresh = cache.save(key, write, self.progress)
        except (WarmStartError, OSError, virt.libvirt_error()) as exc:
            message = exc.get_error_message() if isinstance(exc, virt.libvirt_error()) else str(exc)
            self.progress(f"environment {key} could not be saved ({message}); the VMs go on unsaved")
            return None
        if not fresh:
            # saved by another session meanwhile (or damaged, and other states are built on it):
            # these VMs, untouched, are in the state it names
            self.current_environment = key
            self.progress(f"environment {key} is saved already: these VMs go on unsaved")
            return state
        for parent in parents:  # its disks are backed by theirs
            cache.use(cache.state(parent), state.folder)
        cache.use(state, self.workdir.path)
        each(lambda vm: warm.resume_saved(vm, state.vm(vm.role)), vms)
        self.current_environment = key
        self.progress(f"environment of {len(vms)} VMs saved as {key} in {time.monotonic() - start:.1f} s "
                      f"({state.size() // 2**20} MiB)")
        return state

    def restore_environment(self, state: SavedState) -> None:
        """Have the lab's VMs in `state` (saved by save_environment) before they are next used
        (settle): each on this session's networks with its own MACs and addresses, keeping its
        saved identity. Until then another call replaces it: a checkpoint built on this one was
        saved too, so a session restores only the deepest state it reaches. WarmStartError, with
        nothing touched, if `state` does not fit these VMs or is damaged."""
        cache = self.warm_cache
        roles = state.data().get("roles", [])
        if cache is None or sorted(self.vms) != sorted(roles):
            raise WarmStartError(f"saved environment {state.key} holds VMs {roles}, this session {sorted(self.vms)}")
        # every chain checked before any VM is touched: a running VM is replaced only by a whole state
        damaged = {role: why for role in roles if (why := warm.damage(state.vm(role), self.host)) is not None}
        if damaged or not cache.use(state, self.workdir.path):
            removed = bool(damaged) and cache.discard(state)
            why = "; ".join(f"{role}: {reason}" for role, reason in damaged.items())
            raise WarmStartError(f"saved environment {state.key} is damaged or gone (VMs {list(damaged) or roles}"
                                 + (f": {why}" if why else "") + ")" + ("; removed, to be saved again" if removed else ""))
        self.pending_environment = state
        self.current_environment = state.key

    def settle(self) -> None:
        """Restore the environment restore_environment chose, if that is still to be done."""
        state, self.pending_environment = self.pending_environment, None
        if state is None:
            return
        start = time.monotonic()
        try:
            each(lambda vm: self._restore_vm(vm, state.vm(vm.role)), list(self.vms.values()))
        except (WarmStartError, OSError) as exc:  # the VMs it replaced are gone: no going back now
            raise SessionError(f"The VMs of run {self.run_id} could not be restored from saved environment "
                           f"{state.key}: {exc}") from None
        self._write_access_files()
        self.progress(f"environment of {len(self.vms)} VMs restored from {state.key} in "
                      f"{time.monotonic() - start:.1f} s")

    def _restore_vm(self, vm: VM, saved: SavedState) -> None:
        fresh = vm.domain.XMLDesc()  # this session's names, networks, MACs and files
        vm.close()
        self._replace(vm)  # the restored domain takes its name (the ledger's)
        management = next(e for role, e in vm.nics if role == self.management_role and vm.ip in e.addresses)
        script = restore_script([GuestNIC(e, self.addressing(self.networks[role]), e is management)
                                 for role, e in vm.nics])
        domain, overlay, _ = warm.restore(self.conn, saved, fresh, vm.overlay.with_name(f"{vm.name}.memory"), script,
                                          self.host)
        vm.replace_domain(domain, overlay, public_key(saved.host_key()))
        vm.backed_by = saved.folder.parent.name
        seconds = vm.wait_for_ssh(self.config.boot_timeout)
        wait_for_network(vm, management, self._names(), True, self.progress,
                         time.monotonic() - seconds + self.config.boot_timeout)

    def _names(self, batch: Sequence[tuple[str, HostEntry]] = ()) -> tuple[HostEntry, ...]:
        """The session's names on the management network (DNS): each NIC there of its VMs and of
        `batch` (the NICs of VMs about to boot)."""
        nics = [nic for vm in self.vms.values() for nic in vm.nics] + list(batch)
        return tuple(e for role, e in nics if role == self.management_role)

    def _replace(self, vm: VM) -> None:
        """Remove `vm`'s domain, which another of the same name (still in the ledger) replaces: through
        the ledger's own removal, its label checked."""
        if not ledger.remove(self.conn, ledger.Owned("domain", vm.name, self.owner)):
            raise SessionError(f"Domain {vm.name} is not run {self.run_id}'s any more (its label changed, or it is "
                               f"gone): it is not replaced.")

    def remove_vm(self, vm: VM) -> None:
        """Remove one VM of the lab before the session ends (its domain; its files go with the lab's)."""
        if self.vms.get(vm.role) is not vm:
            raise OstError(f"VM {vm.role} ({vm.name}) is not one of run {self.run_id}'s VMs.")
        self.settle()
        if self.current_environment is not None:
            self.current_environment = recipe_key([self.current_environment, "then removed", vm.role])
        vm.close()
        del self.vms[vm.role]
        self.specs.pop(vm.role, None)
        self.ledger.remove(self._conn, "domain", vm.name)
        self._write_access_files()
        self.progress(f"{vm.role}: removed")

    def clean(self, vm: VM) -> str:
        """Make `vm` clean for a test (clean_vm): its first use saves the just-booted state, every
        later use goes back to it. Says what was done."""
        if vm.dirty is None:
            message = f"clean state saved in {vm.snapshot():.1f} s"
        elif vm.dirty:
            message = f"reverted to its clean state in {vm.revert():.1f} s"
        else:
            message = "clean"
        vm.dirty = True
        return message

    # --- one environment for several processes (--ost-share, --ost-reuse) -----------

    def environment(self) -> Environment:
        """The record another process needs to attach to this lab's VMs."""
        networks = tuple(NetworkRecord(net.name, net.subnet, net.domain, net.versions, net.role, net.management,
                                       self._next_host.get(net.role, FIRST_VM_HOST))
                         for net in (self.networks[n.role] for n in self.topology if n.role in self.networks))
        vms = tuple(VMRecord(vm.name, vm.role, vm.hostname, vm.ip, vm.image.path, vm.overlay, vm.console_path,
                             vm.nics, openssh_line(vm.host_key) if vm.host_key else "")
                    for vm in self.vms.values())
        return Environment(self.run_id, self.owner, self.workdir.path, networks, vms,
                           self.ost.suite if self.ost is not None else None)

    def attach(self, env: Environment, adopt: bool = False, verify: bool = False) -> None:
        """Become a lab of `env`'s run, before making anything: its VMs, networks and files are
        then this lab's (close() removes them, release() leaves them).

        `verify`: every VM must answer SSH with its pinned host key first (an OstError
        says which does not; nothing is attached then). `adopt`: this session becomes
        the run's owner, in one step in the run's own record, so that the reaper takes
        the VMs if this session dies.
        """
        if self.ledger or self.vms:
            raise SessionError(f"Run {self.run_id} has made VMs or networks already; it cannot attach to "
                           f"run {env.run_id} as well.")
        suite = self.ost.suite if self.ost is not None else None
        if env.suite != suite or [n.role for n in env.networks] != [n.role for n in self.topology]:
            raise SessionError(f"Run {env.run_id} was booted for another topology (suite {env.suite}, networks "
                           f"{[n.role for n in env.networks]}); this session cannot attach to it.")
        management = next(n.role for n in env.networks if n.management)
        key = self.inputs.key
        vms = []
        for v in env.vms:
            domain = self._lookup(self.conn.lookupByName, f"VM {v.role} of run {env.run_id}", v.name)
            reservation = next(e for role, e in v.nics if role == management and v.ip in e.addresses)
            vm = VM(v.name, v.role, v.hostname, v.ip, reservation.mac, self.inputs.image(str(v.image)),
                    v.overlay, v.console, domain,
                    SSH(str(v.ip), key, host_key=public_key(v.host_key) if v.host_key else None, via=self.host),
                    ip6=reservation.ip6, nics=v.nics, ready=bool(v.host_key), host=self.host)
            # a clean_vm snapshot taken by the earlier session: revert before first use
            vm.dirty = True if vm.has_snapshot(CLEAN_SNAPSHOT) else None
            vms.append(vm)
        if verify:
            each(_answers_with_pinned_key, vms)
        self.run = Run.of(env, self.roots, self.host)
        self.ledger.record_environment(env, self.workdir.client if self.workdir.remote else None)
        owner = Label.current(env.run_id, env.workdir) if adopt else env.owner
        if adopt:
            RunRecord(owner).write(env.workdir)
        self.workdir.attach_client(owner)
        self.networks = {net.role: Network(net.name, net.name, net.subnet, net.domain,
                                           self._lookup(self.conn.networkLookupByName,
                                                        f"network {net.role} of run {env.run_id}", net.name),
                                           net.role, net.versions, net.management) for net in env.networks}
        self._next_host = {net.role: net.next_host for net in env.networks}
        self.vms = {vm.role: vm for vm in vms}
        self.ssh_key = self.workdir.private_key(self.inputs.key_path)
        if self.workdir.remote:  # this machine's twin of the run's folder may be new (attach_client)
            self._write_access_files()
        self.progress(f"attached to {len(self.vms)} VMs of run {self.run_id}")

    @staticmethod
    def _lookup(lookup: Callable[[str], Any], what: str, name: str) -> Any:
        """A domain or network of an environment being attached to; an OstError if it is gone."""
        try:
            return lookup(name)
        except virt.libvirt_error() as exc:
            raise SessionError(f"Cannot attach to {what}: libvirt has no {name} ({exc.get_error_message()}); it "
                               f"was removed meanwhile.") from None

    def release(self) -> None:
        """Close connections but leave every VM, network and file for the others."""
        self.ledger.release()
        for vm in self.vms.values():
            vm.close()
        self._close_connection()

    def close(self) -> None:
        """Remove every domain, network and file this lab made (or attached to).

        VMs whose ready state is new to the warm-start cache are saved first, all at once,
        unless the session is being interrupted; an interrupt (Ctrl-C, SIGTERM) during the
        saves stops them, and everything is removed all the same.
        """
        try:
            if not self.interrupted:
                self._save_warm_states()
        except BaseException:
            self.interrupted = True
            raise
        finally:
            if self.ledger:
                self.progress(f"removing the VMs, networks and work directory of run {self.run_id}")
            for vm in self.vms.values():
                vm.close()
            try:
                if self.ledger.workdir() is not None and self.config.keep:
                    self.workdir.disown()
                self.ledger.remove_all(self._conn, keep_workdir=self.config.keep)
            finally:
                self.vms.clear()
                self.networks = {}
                self._close_connection()

    def _save_warm_states(self) -> None:
        ready = [vm for vm in self.vms.values() if vm.warm_key is not None and vm.state() == "running"]
        cache = self.warm_cache if ready else None
        if cache is None:
            return

        def save(vm: VM) -> None:
            self.progress(f"{vm.role}: saving its ready state for warm starts")
            try:
                warm.save_state(cache, vm, vm.warm_key or "", self.progress)
            except Exception as exc:  # noqa: BLE001 - a cache must never keep a session from ending
                self.progress(f"{vm.role}: its state could not be saved ({exc.__class__.__name__}: {exc})")

        each(save, ready)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._host is not None and not self._host.local:  # the SSH connection to a remote hypervisor
            self._host.close()
            self._host = None


def _outcome(work: Callable[..., Any], *args: Any) -> Any:
    """What `work(*args)` returned, or the error it raised (for work whose every outcome counts)."""
    try:
        return work(*args)
    except Exception as exc:  # noqa: BLE001 - handed back, not swallowed
        return exc


def _answers_with_pinned_key(vm: VM) -> None:
    if vm.host_key is None:
        raise OstError(f"VM {vm.role} ({vm.name}) has no pinned host key: it never became ready.")
    try:
        vm.ssh("true", check=True, timeout=60)
    except VMError as exc:
        raise OstError(f"VM {vm.role} ({vm.name}) does not answer as the machine it was: {exc}") from None
