"""An OST suite's deploy scripts: run as root in each VM after boot, the VMs in parallel."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from .. import faults
from ..errors import OstError
from ..lab.inputs import VMSpec
from ..parallel import each

if TYPE_CHECKING:
    from ..guest.vm import VM
    from ..lab.lab import Lab

TAIL_LINES = 20


class DeployError(OstError):
    """A deploy script failed in a VM."""


TIMED_OUT = (124, 137)  # coreutils timeout: the script was stopped (TERM), or killed after the grace time


def run_deploy_scripts(vm: "VM", scripts: tuple[Path, ...], root: Path, logs: Path,
                       progress: Callable[[str], None], timeout: float = 1800) -> None:
    """Copy each script into `vm` and run it as root, in order, each for at most `timeout` s;
    the output goes to `logs`."""
    for number, script in enumerate(scripts, 1):
        name = str(script.relative_to(root)) if script.is_relative_to(root) else str(script)
        log = logs / f"{vm.role}.{number}.{script.name}.log"
        remote = f"/var/tmp/ost-deploy-{number}-{script.name}"
        start = time.monotonic()
        progress(f"{vm.role}: running deploy script {name}")
        vm.put(script, remote)
        faults.point("deploy")
        with open(log, "w") as out:
            # stopped in the guest (a hung script would hold the session for ever); the SSH
            # channel's own timeout is the backstop should the guest stop answering
            result = vm.stream(f"timeout --kill-after=10 {timeout:.0f} bash {remote} 2>&1",
                               lambda line: print(line, file=out, flush=True), timeout=timeout + 60)
        if result.returncode != 0:
            tail = "\n".join(result.stdout.splitlines()[-TAIL_LINES:])
            where = f"on VM {vm.role} ({vm.name})"
            what = (f"timed out {where} after {timeout:.0f} s (--ost-deploy-timeout)" if result.returncode in TIMED_OUT
                    else f"failed {where} with exit code {result.returncode}")
            raise DeployError(f"Deploy script {name} {what}. Its last {TAIL_LINES} lines of output:\n{tail}\n"
                              f"All of it: {log}")
        progress(f"{vm.role}: deploy script {name} done in {time.monotonic() - start:.1f} s")


def deploy(lab: Lab, specs: Iterable[VMSpec], root: Path) -> None:
    """Run the deploy scripts of `specs` (booted VMs of `lab`): the VMs in parallel, each one's in order."""
    jobs = [(lab.vms[spec.role], spec.deploy_scripts) for spec in specs if spec.deploy_scripts]
    if not jobs:
        return
    logs = lab.workdir.client / "deploy"  # here, beside the deployment's other files
    logs.mkdir(mode=0o700, exist_ok=True)  # what the scripts print may be secret
    start = time.monotonic()

    def run(job: tuple["VM", tuple[Path, ...]]) -> Optional[DeployError]:
        try:
            run_deploy_scripts(job[0], job[1], root, logs, lab.progress, lab.config.deploy_timeout)
        except DeployError as exc:
            return exc
        return None

    failed = [error for error in each(run, jobs) if error is not None]  # every VM's, not only the first
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise DeployError(f"{len(failed)} deploy scripts failed:\n\n" + "\n\n".join(map(str, failed)))
    lab.progress(f"deploy scripts of {len(jobs)} VMs done in {time.monotonic() - start:.1f} s")
