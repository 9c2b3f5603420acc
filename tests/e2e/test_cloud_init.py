"""cloud-init NoCloud: a layer with cloud-init gets its identity and the suite's user-data
from a seed made by the plugin, before its SSH first answers. cloud-init's errors in what
nobody asked of it (the test images have no locales, as real minimal images may not) are
warnings; a failure in what the suite asked for fails that VM's boot, saying so."""

from __future__ import annotations

import pytest

from pytest_ostimages import Lab, VMFactory, VMSpec
from pytest_ostimages.guest.keys import fingerprint
from pytest_ostimages.report import WARNINGS_KEY

from .helpers import libvirt_objects

GUEST_KEY = "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"
ANSWERS = {  # as hosted-engine-setup injects engine-setup's answer file
    "write_files": [{"path": "/etc/ost-answers.conf", "content": "[environment:default]\nOVESETUP=x\n"}],
    "runcmd": [["sh", "-c", "wc -l /etc/ost-answers.conf >/root/first-boot-command.out"]],
}


def test_clones_with_cloud_init_and_user_data(ost_vm_factory: VMFactory, ost_lab: Lab,
                                              request: pytest.FixtureRequest) -> None:
    # two clones (one with the suite's user-data as a dict, one with user-data that asks nothing, as text)
    # and a third whose user-data fails: three cloud-init guests booting at once cost minutes under TCG
    specs = [VMSpec("cloud0", "cloud-installed", user_data=ANSWERS),
             VMSpec("cloud1", "cloud-installed", user_data="#cloud-config\n{}\n"),
             VMSpec("broken", "cloud-installed", user_data={"runcmd": [["false"]]})]
    # booted together: the one whose runcmd fails is that VM's failed boot, the others are handed over
    with pytest.raises(pytest.fail.Exception, match=r"(?s)VM broken .* answers SSH, but cloud-init did not do what "
                                                     r"was asked of it: module scripts_user: .*runcmd"):
        ost_vm_factory.many(specs)
    vms = [ost_lab.vms[spec.role] for spec in specs[:2]]
    machine_ids = {vm.ssh("cat /etc/machine-id", check=True).stdout.strip() for vm in vms}
    keys = [vm.ssh(GUEST_KEY, check=True).stdout.split()[1] for vm in vms]
    assert len(machine_ids) == 2, machine_ids
    assert len(set(keys)) == 2
    assert keys == [fingerprint(vm.host_key) for vm in vms]  # injected by the seed, pinned
    assert [vm.ssh("hostname && hostname -f", check=True).stdout.split() for vm in vms] == \
        [[vm.role, vm.hostname] for vm in vms]
    # the suite's user-data: a file written and a first-boot command run, before hand-over
    assert vms[0].ssh("cat /etc/ost-answers.conf", check=True).stdout == "[environment:default]\nOVESETUP=x\n"
    assert vms[0].ssh("cat /root/first-boot-command.out", check=True).stdout.startswith("2 ")
    assert vms[1].ssh("test -e /etc/ost-answers.conf").returncode == 1
    # cloud-init says it failed (its locale module, on an image without locales); the VM is fine, and the
    # person is told, in the progress and again in the summary
    assert "status: error" in vms[1].ssh("cloud-init status").stdout
    warnings = request.config.stash.get(WARNINGS_KEY, [])
    for vm in vms:
        assert any(w.startswith(f"{vm.role}: cloud-init reported an error in what it was not asked to do: "
                                f"module locale: ") for w in warnings), warnings
    # done with them: removed now, not at the session's end (idle emulated guests cost CPU)
    for role in [spec.role for spec in specs if spec.role in ost_lab.vms]:
        ost_vm_factory.remove(ost_lab.vms[role])
    assert not {spec.role for spec in specs} & set(ost_lab.vms)
    assert not {f"domain {ost_lab.names(spec.role)[0]}" for spec in specs} & libvirt_objects()
