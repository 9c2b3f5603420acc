"""An OST suite's deploy scripts: run as root in each VM after boot, the VMs in parallel."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import OstError
from ..lab.inputs import VMSpec
from ..parallel import each

if TYPE_CHECKING:
    from ..guest.vm import VM
    from ..lab.lab import Lab

TAIL_LINES = 20


class DeployError(OstError):
    """A deploy script failed in a VM."""


def run_deploy_scripts(vm: "VM", scripts: tuple[Path, ...], root: Path, logs: Path,
                       progress: Callable[[str], None]) -> None:
    """Copy each script into `vm` and run it as root, in order; the output goes to `logs`."""
    for number, script in enumerate(scripts, 1):
        name = str(script.relative_to(root)) if script.is_relative_to(root) else str(script)
        log = logs / f"{vm.role}.{number}.{script.name}.log"
        remote = f"/var/tmp/ost-deploy-{number}-{script.name}"
        start = time.monotonic()
        progress(f"{vm.role}: running deploy script {name}")
        vm.put(script, remote)
        with open(log, "w") as out:
            result = vm.stream(f"bash {remote} 2>&1", lambda line: print(line, file=out, flush=True))
        if result.returncode != 0:
            tail = "\n".join(result.stdout.splitlines()[-TAIL_LINES:])
            raise DeployError(f"Deploy script {name} failed on VM {vm.role} ({vm.name}) with exit code "
                              f"{result.returncode}. Its last {TAIL_LINES} lines of output:\n{tail}\n"
                              f"All of it: {log}")
        progress(f"{vm.role}: deploy script {name} done in {time.monotonic() - start:.1f} s")


def deploy(lab: Lab, specs: Iterable[VMSpec], root: Path) -> None:
    """Run the deploy scripts of `specs` (booted VMs of `lab`): the VMs in parallel, each one's in order."""
    jobs = [(lab.vms[spec.role], spec.deploy_scripts) for spec in specs if spec.deploy_scripts]
    if not jobs:
        return
    logs = lab.workdir.path / "deploy"
    logs.mkdir(exist_ok=True)
    start = time.monotonic()
    each(lambda job: run_deploy_scripts(job[0], job[1], root, logs, lab.progress), jobs)
    lab.progress(f"deploy scripts of {len(jobs)} VMs done in {time.monotonic() - start:.1f} s")
