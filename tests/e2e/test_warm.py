"""Warm start: a later session restores saved VMs instead of booting them, with its own
addresses and names, several sessions at once; a changed input makes it boot.

The states restored are the run's (RESTORABLE): the first session boots and saves them, or restores
them where an earlier session of the run saved them first (saving is proven in test_shared_host,
test_faults and test_remote). The changed input boots into a warm cache of the test's own; the next
session restores it on the /24 it was saved on, though another is its pool's first free one."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from .helpers import DISTRO, RESTORABLE, scratch_root, users_network

SESSION = """
    import time


    def test_vms(engine, host0):
        for vm, other in ((engine, host0), (host0, engine)):
            assert vm.ssh("hostname", check=True).stdout.strip() == vm.role
            # a restored guest's clock stopped at the save: it is set again
            assert abs(float(vm.ssh("date +%s.%N", check=True).stdout) - time.time()) < 3
            assert f"inet {vm.ip}/" in vm.ssh("ip -4 addr show eth0", check=True).stdout
            addresses6 = vm.ssh("ip -6 addr show eth0 scope global", check=True).stdout
            assert f"inet6 {vm.ip6}/" in addresses6 and addresses6.count("inet6 ") == 1  # the old lease is gone
            assert vm.mac in vm.ssh("cat /sys/class/net/eth0/address", check=True).stdout
            # reach each other by name, at this session's addresses
            assert vm.ssh(f"getent ahostsv4 {other.hostname}", check=True).stdout.split()[0] == str(other.ip)
            assert vm.ssh(f"ping -c1 -W5 {other.role}").returncode == 0
        print("BOOT_ID", engine.role, engine.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip(),
              engine.ip)


    def test_clean_vm_reverts_a_restored_vm_too(clean_vm):
        clean_vm.ssh("touch /root/dirty && sync", check=True)
        clean_vm.revert()
        assert clean_vm.ssh("test -e /root/dirty").returncode == 1
"""


@pytest.fixture
def warm_workdir() -> Iterator[Path]:
    """A work directory root of its own, whose warm cache starts empty and is removed after."""
    with scratch_root("ost-warm-") as folder:
        yield folder


def boot_id(output: str) -> tuple[str, str]:
    [line] = [line for line in output.splitlines() if line.startswith("BOOT_ID ")]
    _, _, boot, ip = line.split()
    return boot, ip


def test_sessions_restore_saved_vms(pytester: pytest.Pytester, warm_workdir: Path, unchanged: None) -> None:
    pytester.makepyfile(SESSION)
    own = ["-s", "-p", "no:cacheprovider", "--ost-memory=512", "--ost-vcpus=2", "--ost-hosts=1",
           "--ost-warm=on", f"--ost-workdir={warm_workdir}", f"--ost-distro={DISTRO}"]
    args = [*own, *RESTORABLE]
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=2)
    # booted and saved, restored, or booted while another session saved the same state first
    first_is_saved = re.search(r"engine: (state saved for warm starts|restored \S+ from saved state) ",
                               first.stdout.str())
    booted, _ = boot_id(first.stdout.str())

    # two sessions at once, from the same saved states, each on its own network
    command = [sys.executable, "-m", "pytest", *args]
    runs = [subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output
        assert f"engine: restored {DISTRO}-engine-installed from saved state" in output, output
        assert f"host0: restored {DISTRO}-host-installed from saved state" in output, output
        assert f"clean: restored {DISTRO}-base from saved state" in output, output
        assert "2 passed" in output, output
        assert ": booting " not in output, output
    restored = [boot_id(output) for output in outputs]
    assert restored[0][0] == restored[1][0]  # the saved guest, not rebooted
    if first_is_saved:
        assert restored[0][0] == booted
    assert restored[0][1] != restored[1][1]  # each session's own address

    # a changed input (one VM is enough) boots, into the test's own cache, on a pool of the test's own whose
    # first /24 a network of the user's holds
    pool = "--ost-subnet-pool=192.168.248.0/22"
    with users_network(ipaddress.IPv4Network("192.168.248.0/24")):
        changed = pytester.runpytest_subprocess(*own, pool, "--ost-memory=640", "-k", "clean_vm")
    changed.assert_outcomes(passed=1, deselected=1)
    changed.stdout.fnmatch_lines(["*management): 192.168.249.0/24*", "*clean: booting *640 MiB*",
                                  "*clean: state saved for warm starts*"])
    # the next session takes the /24 its state was saved on (free now, though not the pool's first) and
    # restores the guest with its NIC kept
    again = pytester.runpytest_subprocess(*own, pool, "--ost-memory=640", "-k", "clean_vm")
    again.assert_outcomes(passed=1, deselected=1)
    again.stdout.fnmatch_lines(["*management): 192.168.249.0/24*",
                                "*clean: restored * from saved state *addresses kept*"])

    cleanup = pytester.runpytest_subprocess("--ost-cleanup", "--ost-warm-cache", f"--ost-workdir={warm_workdir}")
    cleanup.stdout.fnmatch_lines(["removed saved state *"])
    assert not [p for p in (warm_workdir / "warm").iterdir()]
