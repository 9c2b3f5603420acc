"""OST init-configs: the topology of an OST suite, read as ``lagofy.sh`` (``ost_init``) reads it.

An init-config (``common/init-configs/1_engine_2_hosts.json`` in ovirt-system-tests,
linked as ``<suite>/ost.json``) names the networks (role, ``is_management``, the
NICs on each) and the VMs (memory, ``vcpu_num``, NICs, ``root_disk_var``, extra
``disks``, ``deploy-scripts``). Keys are taken in sorted order, as ``jq keys``
does for ``lagofy.sh``: a VM's NICs become eth0, eth1, ... in that order. The
``template`` paths are ignored: the plugin's templates carry every element.

Everything is checked here, before anything exists; a problem is an
InitConfigError that names the file and the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import SUITE_NAME
from ..errors import OstError
from ..lab.inputs import Disk, NetworkSpec, VMSpec

# root_disk_var -> the layer it names (common/helpers/ost-images.sh); a variable of
# that name in the environment overrides it with a path.
ROOT_DISK_LAYERS = {
    "OST_IMAGES_BASE": "base",
    "OST_IMAGES_ENGINE_INSTALLED": "engine-installed",
    "OST_IMAGES_HOST_INSTALLED": "host-installed",
    "OST_IMAGES_HE_INSTALLED": "he-installed",
}
DISTROLESS_IMAGES = {"OST_IMAGES_STORAGE_BASE": "storage-base.qcow2"}  # <images dir>/<file>
SIZE = re.compile(r"(\d+)([KMGT]?)B?", re.IGNORECASE)


class InitConfigError(OstError):
    """An init-config that cannot be booted as written."""


@dataclass(frozen=True)
class Topology:
    """The networks and VMs an init-config describes."""

    path: Path
    suite: str
    networks: tuple[NetworkSpec, ...]  # the management network first
    vms: tuple[VMSpec, ...]


def load(path: Path, root: Path, images_dir: Path, environ: Mapping[str, str],
         suite: Optional[str] = None) -> Topology:
    """Read and check `path`; deploy-script paths are relative to `root` (OST_REPO_ROOT)."""
    reader = _Reader(path)
    data = reader.document()
    networks, nic_network = reader.networks(data)
    vms = tuple(reader.vm(name, value, nic_network, root, images_dir, environ)
                for name, value in sorted(reader.mapping(data, "vms", required=True).items()))
    management = next(n.role for n in networks if n.management)
    for vm in vms:
        if management not in vm.nics:
            raise reader.error(f"vms.{vm.role}.nics", f"none of the VM's NICs ({', '.join(reader.nic_names[vm.role]) or 'none'}) "
                               f"is on the management network {management!r}: the plugin reaches VMs over it; "
                               f"list one of them in networks.{management}.nics")
    if not vms:
        raise reader.error("vms", "no VM is defined; add at least one under \"vms\"")
    owners: dict[str, str] = {}
    for vm in vms:
        for nic in reader.nic_names[vm.role]:
            if nic in owners:
                raise reader.error(f"vms.{vm.role}.nics.{nic}",
                                   f"the NIC is also a NIC of VM {owners[nic]!r}; NIC names are unique")
            owners[nic] = vm.role
    if suite is None and not SUITE_NAME.fullmatch(path.parent.name):
        raise InitConfigError(f"init-config {path}: the suite is named after its directory, but "
                              f"{path.parent.name!r} is not a suite name (letters, digits, '-' and '_'); "
                              f"name it with --ost-suite.")
    return Topology(path, suite or path.parent.name, networks, vms)


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.nic_names: dict[str, list[str]] = {}  # VM -> its NIC names, in eth order

    def error(self, key: str, problem: str) -> InitConfigError:
        return InitConfigError(f"init-config {self.path}: {key}: {problem}.")

    def document(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise InitConfigError(f"init-config {self.path} cannot be read: {exc.strerror}. Give the "
                                  f"path of an OST init-config JSON with --ost-init-config.") from None
        # lagofy.sh drops lines starting with '#' (comments) before jq reads the file
        text = "\n".join("" if line.startswith("#") else line for line in text.splitlines())
        try:
            data = json.loads(text, object_pairs_hook=self._no_duplicates)
        except json.JSONDecodeError as exc:
            raise InitConfigError(f"init-config {self.path} is not valid JSON: {exc}.") from None
        except _Duplicate as dup:
            raise self.error(str(dup), "the name is given twice; names must be unique") from None
        if not isinstance(data, dict):
            raise self.error("(top level)", "expected an object with \"networks\" and \"vms\"")
        return data

    @staticmethod
    def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen[key] = value
        return seen

    def mapping(self, parent: dict[str, Any], key: str, where: str = "", required: bool = False) -> dict[str, Any]:
        value = parent.get(key, None if required else {})
        if not isinstance(value, dict):
            raise self.error(f"{where}{key}", "missing; expected an object" if value is None
                             else f"expected an object, found {type(value).__name__}")
        return value

    def networks(self, data: dict[str, Any]) -> tuple[tuple[NetworkSpec, ...], dict[str, str]]:
        """The networks (management first) and NIC name -> network role."""
        specs: list[NetworkSpec] = []
        nic_network: dict[str, str] = {}
        for role, value in sorted(self.mapping(data, "networks", required=True).items()):
            where = f"networks.{role}"
            if not isinstance(value, dict):
                raise self.error(where, "expected an object with \"nics\"")
            management = value.get("is_management", False)
            if not isinstance(management, bool):
                raise self.error(f"{where}.is_management", "expected true or false")
            nics = value.get("nics", [])
            if not isinstance(nics, list) or not all(isinstance(n, str) and n for n in nics):
                raise self.error(f"{where}.nics", "expected a list of NIC names")
            for nic in nics:
                if nic in nic_network:
                    raise self.error(f"{where}.nics", f"NIC {nic!r} is also on network {nic_network[nic]!r}")
                nic_network[nic] = role
            specs.append(NetworkSpec(role, management))
        managements = [s.role for s in specs if s.management]
        if len(managements) != 1:
            raise self.error("networks", "no network has \"is_management\": true" if not managements
                             else f"{managements} all have \"is_management\": true; exactly one may")
        specs.sort(key=lambda s: not s.management)
        return tuple(specs), nic_network

    def vm(self, name: str, value: Any, nic_network: dict[str, str], root: Path, images_dir: Path,
           environ: Mapping[str, str]) -> VMSpec:
        where = f"vms.{name}"
        if not isinstance(value, dict):
            raise self.error(where, "expected an object")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", name):
            raise self.error(where, "a VM name is letters, digits and '-' (it becomes a host name)")
        nic_names = sorted(self.mapping(value, "nics", f"{where}.", required=True))
        for nic in nic_names:
            if nic not in nic_network:
                raise self.error(f"{where}.nics.{nic}", f"no network lists this NIC; the networks "
                                 f"list {sorted(nic_network) or 'no NICs'}")
        nics = tuple(nic_network[nic] for nic in nic_names)
        self.nic_names[name] = nic_names
        disks = tuple(
            Disk(dev, self.size(f"{where}.disks.{dev}.size", spec), str(serial))
            for serial, (dev, spec) in enumerate(sorted(self.mapping(value, "disks", f"{where}.").items()), 2)
        )
        scripts = value.get("deploy-scripts", [])
        if not isinstance(scripts, list) or not all(isinstance(s, str) for s in scripts):
            raise self.error(f"{where}.deploy-scripts", "expected a list of paths")
        for script in scripts:
            if not (root / script).is_file():
                raise self.error(f"{where}.deploy-scripts", f"{root / script} does not exist (paths are "
                                 f"relative to --ost-root / $OST_REPO_ROOT, here {root})")
        return VMSpec(name, self.root_disk(where, value, images_dir, environ),
                      memory=self.number(f"{where}.memory", value.get("memory")),
                      vcpus=self.number(f"{where}.vcpu_num", value.get("vcpu_num")),
                      nics=nics, disks=disks, deploy_scripts=tuple(root / s for s in scripts))

    def root_disk(self, where: str, value: dict[str, Any], images_dir: Path,
                  environ: Mapping[str, str]) -> str:
        var = value.get("root_disk_var")
        known = sorted([*ROOT_DISK_LAYERS, *DISTROLESS_IMAGES])
        if not isinstance(var, str):
            raise self.error(f"{where}.root_disk_var", f"missing; expected one of {', '.join(known)}")
        if environ.get(var):  # exported by the user (or ost-images.sh): a path
            path = Path(environ[var])
            if not path.is_file():
                raise self.error(f"{where}.root_disk_var", f"${var} is {path}, which does not exist")
            return str(path)
        if var in ROOT_DISK_LAYERS:
            return ROOT_DISK_LAYERS[var]
        if var in DISTROLESS_IMAGES:
            path = images_dir / DISTROLESS_IMAGES[var]
            if not path.is_file():
                raise self.error(f"{where}.root_disk_var", f"{var} is {path}, which does not exist; "
                                 f"install it or export {var}=<path of a qcow2 image>")
            return str(path)
        raise self.error(f"{where}.root_disk_var", f"{var!r} is not set in the environment and names no "
                         f"known image; expected one of {', '.join(known)}, or export {var}=<qcow2 path>")

    def number(self, key: str, raw: Any) -> Optional[int]:
        if raw is None:
            return None
        try:
            value = int(str(raw))
        except ValueError:
            value = 0
        if value <= 0:
            raise self.error(key, f"{raw!r} is not a whole number greater than 0")
        return value

    def size(self, key: str, spec: Any) -> int:
        raw = spec.get("size") if isinstance(spec, dict) else None
        match = SIZE.fullmatch(str(raw)) if raw is not None else None
        if match is None or int(match.group(1)) == 0:
            raise self.error(key, f"{raw!r} is not a disk size; expected e.g. \"101G\", \"512M\" or bytes")
        return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " ")


class _Duplicate(Exception):
    pass

