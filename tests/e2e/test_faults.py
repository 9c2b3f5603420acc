"""Sessions killed with SIGKILL at every step leave nothing once the next session's reaper ran,
and nothing foreign is touched meanwhile (pytest_ostimages/faults.py names the steps).

Beside every killed session stand: a domain and a network of the user's (no label), an
environment kept by --ost-reuse under another work root, and a live session of a third
work root, booted and waiting. All of them must come out as they went in.

All of them run in a pid namespace of the module's own: to every other session on the host (another
xdist worker's) the killed sessions' leftovers are then a live container's, never theirs to reap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from pytest_ostimages import faults
from pytest_ostimages.state.kept import KEPT_FILE

from .helpers import (INNER, LIBVIRT_URI, RESTORABLE, PidNamespace, inactive_domains, libvirt_objects,
                      pid_namespace, read_until, scratch_root, users_own_objects)

VM_TEST = "def test_vm(ost_vm):\n    assert ost_vm.ssh('true').returncode == 0\n"
VM = ["--ost-image=engine-installed"]  # the bystanders and the sessions killed after boot: restorable
pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="runs its sessions in a pid namespace of its own (needs root)")
NEXT_SESSION = "def test_net(ost_network):\n    pass\n"  # its reaper runs before it makes its network


def session(pidns: PidNamespace, folder: Path, root: Path, *args: str, env: dict[str, str] | None = None,
            test: str = VM_TEST) -> subprocess.CompletedProcess:
    (folder / "test_it.py").write_text(test)
    return subprocess.run(pidns.pytest(folder, *INNER, "-s", f"--ost-workdir={root}", *args, "test_it.py"),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})}, timeout=900)


@dataclass
class Bystanders:
    foreign: str  # a domain and a network of this name, without our label
    kept_root: Path  # --ost-reuse kept an environment there
    live_root: Path  # a session of that root is running
    labelled: set[str]  # their labelled libvirt objects

    def state(self) -> tuple:
        import libvirt

        conn = libvirt.open(LIBVIRT_URI)
        try:
            return (self.foreign in inactive_domains(conn), conn.networkLookupByName(self.foreign).isActive(),
                    libvirt_objects(), (self.kept_root / KEPT_FILE).exists(),
                    sorted(p.name for p in self.kept_root.iterdir()), sorted(p.name for p in self.live_root.iterdir()))
        finally:
            conn.close()


@pytest.fixture(scope="module")
def pidns() -> Iterator[PidNamespace]:
    with pid_namespace() as namespace:
        yield namespace


@pytest.fixture(scope="module")
def bystanders(pidns: PidNamespace, tmp_path_factory: pytest.TempPathFactory,
               engine_vm_saved: None) -> Iterator[Bystanders]:
    already = libvirt_objects()  # the outer session's own VMs, for one
    folder = tmp_path_factory.mktemp("bystanders")
    release = folder / "release"
    with users_own_objects() as foreign, scratch_root("ost-faults-", pidns) as kept_root, \
            scratch_root("ost-faults-", pidns) as live_root:
        live = None
        try:
            kept = session(pidns, folder, kept_root, *VM, *RESTORABLE, "--ost-reuse")
            assert kept.returncode == 0 and "keeping 1 VMs" in kept.stdout, kept.stdout + kept.stderr
            (folder / "live").mkdir()
            (folder / "live" / "test_live.py").write_text(textwrap.dedent(f"""
                import time
                from pathlib import Path

                def test_live(ost_vm):
                    print("LIVE-READY", flush=True)
                    while not Path({str(release)!r}).exists():
                        time.sleep(0.5)
            """))
            live = subprocess.Popen(pidns.pytest(folder / "live", *INNER, *RESTORABLE, "-s",
                                                 f"--ost-workdir={live_root}", *VM, "test_live.py"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    stdin=subprocess.DEVNULL)
            read_until(live, "LIVE-READY")
            them = Bystanders(foreign, kept_root, live_root, libvirt_objects() - already)
            assert len(them.labelled) == 4, them.labelled  # two domains and two networks
            yield them
        finally:
            release.touch()
            if live is not None:
                assert live.wait(timeout=300) == 0, live.stdout.read() if live.stdout else ""
            cleanup = session(pidns, folder, kept_root, "--ost-cleanup")
            assert cleanup.returncode == 0, cleanup.stdout


def step_args(step: str, folder: Path, root: Path) -> tuple[list[str], str]:
    """What a session that reaches `step` runs: its arguments and its test module."""
    if step == "deploy":
        (folder / "deploy.sh").write_text("sleep 30\n")
        (folder / "suite").mkdir()
        (folder / "suite" / "ost.json").write_text(json.dumps({
            "networks": {"management": {"is_management": True, "nics": ["vm"]}},
            "vms": {"vm": {"nics": {"vm": {}}, "root_disk_var": "OST_IMAGES_BASE", "deploy-scripts": ["deploy.sh"]}}}))
        return [f"--ost-init-config={folder / 'suite' / 'ost.json'}", f"--ost-root={folder}"], \
            "def test_x():\n    pass\n"
    if step in ("keep", "adopt"):  # after the boot: its VM may as well be restored
        return [*VM, "--ost-reuse", *RESTORABLE], VM_TEST
    # the steps of a boot, the identity a booted VM takes and a warm save (of its own cache) need a boot
    return ["--ost-image=base", *(["--ost-warm=on"] if step.startswith("warm-save") else [])], VM_TEST


@pytest.mark.parametrize("step", faults.STEPS)
def test_a_session_killed_at_a_step_leaves_nothing(step: str, pidns: PidNamespace, bystanders: Bystanders,
                                                   tmp_path: Path) -> None:
    with scratch_root("ost-faults-", pidns) as root:
        before = bystanders.state()
        args, test = step_args(step, tmp_path, root)
        if step == "adopt":  # something kept in this root, to adopt
            kept = session(pidns, tmp_path, root, *args, test=test)
            assert "keeping 1 VMs" in kept.stdout, kept.stdout + kept.stderr
        killed = session(pidns, tmp_path, root, *args, test=test, env={faults.VARIABLE: step})
        assert killed.returncode == -signal.SIGKILL, f"never reached {step}:\n{killed.stdout}{killed.stderr}"
        assert libvirt_objects() != before[2] or step == "warm-save" or list(root.iterdir()), "it left nothing to reap"

        reaper = session(pidns, tmp_path, root, test=NEXT_SESSION)
        assert reaper.returncode == 0, reaper.stdout + reaper.stderr
        assert bystanders.state() == before  # the foreign, kept and live ones as they were; nothing of ours left
        assert sorted(p.name for p in root.iterdir()) in ([], ["warm"]), list(root.rglob("*"))
        states = sorted((root / "warm").iterdir()) if (root / "warm").exists() else []
        if step == "warm-saved":  # killed after its state was complete: nothing lost
            assert [(state / "meta.json").is_file() for state in states] == [True], states
        else:  # killed before: nothing half-saved stays
            assert states == [], states
