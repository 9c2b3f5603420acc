"""``--ost-artifacts DIR``: what a failed run leaves for later reading.

Console logs, journals, ``/var/log``, domain and network XML, DHCP leases, deploy
logs and package lists of a lab's VMs, under ``DIR/<run id>/``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..guest.vm import BOOT_JOURNAL

if TYPE_CHECKING:
    from .lab import Lab


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
    deploy_logs = lab.workdir.client / "deploy"
    if deploy_logs.is_dir():
        shutil.copytree(deploy_logs, root / "deploy", dirs_exist_ok=True)
    images = set()
    for vm in lab.vms.values():
        folder = root / vm.role
        folder.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):  # on the hypervisor
            (folder / "console.log").write_bytes(vm.console_path.read_bytes())
        with contextlib.suppress(Exception):
            (folder / "domain.xml").write_text(vm.domain.XMLDesc())
        (folder / "state.txt").write_text(vm.state() + "\n")
        if vm.state() == "running" and vm.boot_seconds is not None:
            journal = vm.diagnostic(BOOT_JOURNAL, timeout=60)
            if journal is not None:
                (folder / "journal.txt").write_text(journal)
            with contextlib.suppress(Exception):
                vm.ssh("tar czf /tmp/ost-var-log.tar.gz --ignore-failed-read /var/log", timeout=120)
                vm.get("/tmp/ost-var-log.tar.gz", folder / "var-log.tar.gz")
        images.add(vm.image)
    for image in images:
        for listing in (image.pkglist, image.pkglist_diff):
            with contextlib.suppress(OSError):  # (a layer without package lists)
                if listing is not None:
                    (root / listing.name).write_bytes(listing.read_bytes())
    return root
