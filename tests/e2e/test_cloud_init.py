"""cloud-init NoCloud: a layer with cloud-init gets its identity and the suite's user-data
from a seed made by the plugin, before its SSH first answers."""

from __future__ import annotations

from pytest_ostimages import VMFactory, VMSpec
from pytest_ostimages.guest.keys import fingerprint

from .helpers import libvirt_objects

GUEST_KEY = "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"
ANSWERS = {  # as hosted-engine-setup injects engine-setup's answer file
    "write_files": [{"path": "/etc/ost-answers.conf", "content": "[environment:default]\nOVESETUP=x\n"}],
    "runcmd": [["sh", "-c", "wc -l /etc/ost-answers.conf >/root/first-boot-command.out"]],
}


def test_three_clones_with_cloud_init_and_user_data(ost_vm_factory: VMFactory) -> None:
    vms = ost_vm_factory.many([VMSpec("cloud0", "cloud-installed", user_data=ANSWERS),
                               VMSpec("cloud1", "cloud-installed"),
                               VMSpec("cloud2", "cloud-installed", user_data="#cloud-config\n{}\n")])
    machine_ids = {vm.ssh("cat /etc/machine-id", check=True).stdout.strip() for vm in vms}
    keys = [vm.ssh(GUEST_KEY, check=True).stdout.split()[1] for vm in vms]
    assert len(machine_ids) == 3, machine_ids
    assert len(set(keys)) == 3
    assert keys == [fingerprint(vm.host_key) for vm in vms]  # injected by the seed, pinned
    assert [vm.ssh("hostname && hostname -f", check=True).stdout.split() for vm in vms] == \
        [[vm.role, vm.hostname] for vm in vms]
    # the suite's user-data: a file written and a first-boot command run, before hand-over
    assert vms[0].ssh("cat /etc/ost-answers.conf", check=True).stdout == "[environment:default]\nOVESETUP=x\n"
    assert vms[0].ssh("cat /root/first-boot-command.out", check=True).stdout.startswith("2 ")
    assert vms[1].ssh("test -e /etc/ost-answers.conf").returncode == 1
    assert "status: done" in vms[1].ssh("cloud-init status", check=True).stdout
    # done with them: removed now, not at the session's end (idle emulated guests cost CPU)
    for vm in vms:
        ost_vm_factory.remove(vm)
    assert not {vm.name for vm in vms} & {o.split()[1] for o in libvirt_objects()}
