"""What a failed run shows: the report header, per-test VM sections, an artifacts tree.

The first screen of a failed run should say what went wrong: which images and
hypervisor were used, and for a failed test the console and journal tails of its
VMs. Everything else goes to ``--ost-artifacts DIR``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from . import kvm_access

if TYPE_CHECKING:
    from .catalog import Catalog
    from .config import OstConfig
    from .lab import Lab
    from .vm import VM

CONSOLE_TAIL = 30
JOURNAL_TAIL = 30


def header_lines(config: "OstConfig", catalog: "Catalog") -> list[str]:
    """Where the images come from and where the VMs will run (nothing is created)."""
    lines = [f"ost-images: {config.images_dir} (found via {catalog.source}), libvirt "
             f"{config.libvirt_uri}, virt type {config.virt_type}, work dir {config.workdir}"]
    for distro in catalog.distros():
        for layer in catalog.layer_names(distro):
            entry = catalog.layers[(distro, layer)]
            package = f"{entry.package.name}-{entry.package.version}" if entry.package else "no package"
            lines.append(f"ost-images:   {distro}-{layer} ({package})")
    if not catalog.distros():
        lines.append("ost-images:   none installed")
    kvm_warning = kvm_access.warning(config.libvirt_uri)
    if kvm_warning is not None:
        lines.append(f"ost-images: {kvm_warning}")
    return lines


def vm_sections(vms: Iterable["VM"]) -> list[tuple[str, str]]:
    """(title, text) report sections for a failed test: console and journal tails."""
    sections = []
    for vm in vms:
        state = vm.state()
        sections.append((f"ost {vm.role}: serial console (last {CONSOLE_TAIL} lines, {state})",
                         vm.console_log(CONSOLE_TAIL) or "(empty)"))
        if state == "running" and vm.boot_seconds is not None:  # it answered SSH once
            journal = _quiet_ssh(vm, f"journalctl --no-pager -n {JOURNAL_TAIL}")
            if journal is not None:
                sections.append((f"ost {vm.role}: journal (last {JOURNAL_TAIL} lines)", journal))
    return sections


def _quiet_ssh(vm: "VM", command: str, timeout: float = 20) -> "str | None":
    """stdout of `command`, or None when the VM cannot answer (it is a diagnostic)."""
    try:
        return vm.ssh(command, timeout=timeout).stdout
    except Exception:  # noqa: BLE001 - a diagnostic must never mask the real failure
        return None


def collect_artifacts(lab: "Lab", dest: Path) -> Path:
    """Write logs, XML and package lists of the lab's VMs under dest/<run id>/."""
    root = dest / lab.run_id
    root.mkdir(parents=True, exist_ok=True)
    for network in lab.networks.values():
        suffix = "" if network.management else f"-{network.role}"
        with contextlib.suppress(Exception):
            (root / f"network{suffix}.xml").write_text(network.handle.XMLDesc())
        with contextlib.suppress(Exception):
            (root / f"dhcp-leases{suffix}.json").write_text(json.dumps(network.handle.DHCPLeases(), indent=2))
    deploy_logs = lab.workdir.path / "deploy"
    if deploy_logs.is_dir():
        shutil.copytree(deploy_logs, root / "deploy", dirs_exist_ok=True)
    images = set()
    for vm in lab.vms.values():
        folder = root / vm.role
        folder.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(vm.console_path, folder / "console.log")
        with contextlib.suppress(Exception):
            (folder / "domain.xml").write_text(vm.domain.XMLDesc())
        (folder / "state.txt").write_text(vm.state() + "\n")
        if vm.state() == "running" and vm.boot_seconds is not None:
            journal = _quiet_ssh(vm, "journalctl --no-pager -b", timeout=60)
            if journal is not None:
                (folder / "journal.txt").write_text(journal)
            with contextlib.suppress(Exception):
                vm.ssh("tar czf /tmp/ost-var-log.tar.gz --ignore-failed-read /var/log", timeout=120)
                vm.get("/tmp/ost-var-log.tar.gz", folder / "var-log.tar.gz")
        images.add(vm.image)
    for image in images:
        for listing in (image.pkglist, image.pkglist_diff):
            if listing is not None and listing.exists():
                shutil.copyfile(listing, root / listing.name)
    return root
