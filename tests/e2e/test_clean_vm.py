"""clean_vm: every test gets the VM as it was right after boot (snapshot revert).

Each test holds in any order, alone or under -n: none relies on another having run.
"""

import time

import pytest

from pytest_ostimages import VM

MARKERS = "ls /root/ost-marker-* /dev/shm/ost-marker-* 2>/dev/null"


@pytest.mark.parametrize("n", range(2))
def test_each_test_gets_the_clean_state(clean_vm: VM, n: int) -> None:
    # whichever of these runs second finds nothing the first one left
    assert clean_vm.ssh(MARKERS).stdout == ""
    clean_vm.ssh(f"mkdir -p /dev/shm && touch /root/ost-marker-{n} /dev/shm/ost-marker-{n} && sync",
                 check=True)
    assert clean_vm.ssh("cat /etc/ost-layer").stdout.strip() == "base"


def test_revert_restores_disk_and_memory_without_a_reboot(clean_vm: VM) -> None:
    boot_id = clean_vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout
    clean_vm.ssh("mkdir -p /dev/shm && touch /root/ost-marker-r /dev/shm/ost-marker-r && sync", check=True)
    clean_vm.revert()
    # disk (/root) and RAM (/dev/shm) are back to the snapshot, and SSH reconnected by itself
    assert clean_vm.ssh(MARKERS).stdout == ""
    assert clean_vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout == boot_id  # not rebooted
    # its clock went back to the snapshot's time with its memory (seconds to minutes ago): it is set again
    before = time.time()
    guest = float(clean_vm.ssh("date +%s.%N", check=True).stdout)
    assert before - 1 < guest < time.time() + 1, (before, guest)
