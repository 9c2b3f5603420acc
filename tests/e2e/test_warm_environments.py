"""Warm start of whole environments: an OST topology restored deployed, and a checkpoint fixture.

The example OST suite (engine, 2 hosts, storage with 2 extra disks, two networks, deploy
scripts, the checkpoint fixture hosts_enrolled) is run whole: booted and deployed, saving
its deployed environment and its checkpoint, and a later session restores both, on networks
of its own; or, when an earlier session saved both (test_remote's, in CI), it restores them
itself and no later session is needed.
(Several sessions restoring one state at once: test_warm.py.)
(A checkpoint's changed source and damaged states: test_checkpoints.py, always saved anew.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import INNER, RESTORABLE, libvirt_objects, ost_example_pool, scratch_root, workdirs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ost_suite"
# the deploy effects (read by testinfra: ansible costs seconds a call), both NICs, the extra disks with
# their data, and the checkpoint's effects
SOME = "testinfra or extra_disks or nic_on_each or enrolled or engines_service"  # 6 tests


@pytest.fixture(scope="module")
def warm_root() -> Iterator[Path]:
    """Work root of this module's sessions (their saved states are the run's: RESTORABLE)."""
    with scratch_root("ost-warm-env-") as root:
        yield root


@pytest.fixture
def pool() -> Iterator[str]:
    """The example suite's pool, the test's alone: each session gets the subnets its saved states were saved on."""
    with ost_example_pool() as option:
        yield option


def command(suite: Path, root: Path, pool: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", *INNER, *RESTORABLE, pool, f"--ost-workdir={root}",
            f"--ost-init-config={suite / 'basic-suite' / 'ost.json'}", f"--ost-root={suite}",
            str(suite / "basic-suite"), *args]


def test_a_deployed_topology_and_its_checkpoint_are_restored(pytester: pytest.Pytester, warm_root: Path,
                                                             pool: str) -> None:
    before = libvirt_objects(), workdirs()
    suite = pytester.path / "ost_suite"
    shutil.copytree(EXAMPLE, suite)

    # the example suite as shipped, every test
    first = subprocess.run(command(suite, warm_root, pool), cwd=pytester.path, capture_output=True, text=True)
    assert first.returncode == 0 and "14 passed" in first.stdout, first.stdout + first.stderr
    for pattern in (r"OST suite basic-suite: 2 networks, 4 VMs from \S*ost.json",
                    r"network ost-\w+-1 \(storage\): 192\.168\.\d+\.0/24, fd6f:7374:\S+::/64"):
        assert re.search(pattern, first.stdout), (pattern, first.stdout)
    if "restored deployed from saved environment" not in first.stdout:  # nothing saved yet: booted, saved
        for pattern in (r"storage: deploy script common/deploy-scripts/setup_storage.sh done in",
                        r"deploy scripts of 4 VMs done in", r"checkpoint hosts_enrolled: ran in"):
            assert re.search(pattern, first.stdout), (pattern, first.stdout)
        assert first.stdout.count("environment of 4 VMs saved as") == 2, first.stdout  # deployed; enrolled
    # saved on these subnets (now, or by an earlier run that kept the addresses): a restore keeps them
    restored_first = "restored deployed from saved environment" in first.stdout
    same_subnets = not restored_first or "addresses kept" in first.stdout

    # a session restores both saved states (on its own networks) and reruns nothing: the first one, where an
    # earlier session had saved both (on a CI machine test_remote's, which runs first); else a later one
    if restored_first and "checkpoint hosts_enrolled: saved state " in first.stdout:
        output = first.stdout
    else:
        second = subprocess.run(command(suite, warm_root, pool, "-k", SOME), cwd=pytester.path, capture_output=True,
                                text=True)
        output = second.stdout
        assert second.returncode == 0 and "6 passed" in output, output + second.stderr
        assert "restored deployed from saved environment" in output, output
    assert "checkpoint hosts_enrolled: saved state " in output and "VMs restored from" in output, output
    assert not re.search(r"deploy script \S+ done|deploy scripts of|checkpoint hosts_enrolled: ran|: booting ",
                         output), output
    # each VM restored on the saved subnets keeps its NICs, addresses and leases (the tests above passed
    # on them: names, both networks, the engine's service); on others it is moved to new ones
    restores = re.findall(r"^\[ost\] (\S+): restored \S+ from saved state .*\((.*)\)$", output, re.M)
    assert len(restores) == 4, output
    for role, steps in restores:
        assert ("addresses kept" in steps, "new NICs" in steps) == (same_subnets, not same_subnets), (role, steps)

    listing = subprocess.run([sys.executable, "-m", "pytest", "--ost-warm-list", *RESTORABLE], cwd=pytester.path,
                             capture_output=True, text=True).stdout
    assert "OST suite basic-suite deployed (engine, host-0, host-1, storage)" in listing, listing
    assert "hosts_enrolled (engine, host-0, host-1, storage)" in listing, listing
    assert "ost-enrolled.service" in listing  # its declared file, among its inputs
    assert (libvirt_objects(), workdirs()) == before
