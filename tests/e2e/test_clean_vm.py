"""clean_vm: every test gets the VM as it was right after boot (snapshot revert)."""

from pytest_ostimages import VM


def test_a_test_changes_the_vm(clean_vm: VM) -> None:
    clean_vm.ssh("echo dirty > /root/marker && systemctl stop cron 2>/dev/null; sync", check=True)
    assert clean_vm.ssh("cat /root/marker").stdout == "dirty\n"


def test_the_next_test_gets_it_clean(clean_vm: VM) -> None:
    # the file is gone (disk reverted) and SSH reconnected by itself
    assert clean_vm.ssh("test -e /root/marker").returncode == 1
    assert clean_vm.ssh("cat /etc/ost-layer").stdout.strip() == "base"


def test_memory_state_is_reverted_too(clean_vm: VM) -> None:
    clean_vm.ssh("mkdir -p /dev/shm && echo in-memory > /dev/shm/flag", check=True)


def test_after_memory_change(clean_vm: VM) -> None:
    # /dev/shm is RAM only: it is gone because the memory state was reverted, not rebooted
    assert clean_vm.ssh("test -e /dev/shm/flag").returncode == 1
    boot_id_now = clean_vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout
    clean_vm.revert()
    assert clean_vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout == boot_id_now  # no reboot
