"""OST init-configs: the topology as lagofy.sh reads it, and one clear error per bad file."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

import pytest

from pytest_ostimages.lab import reuse
from pytest_ostimages.config import OstConfig
from pytest_ostimages.ost.initconfig import InitConfigError, load
from pytest_ostimages.lab.inputs import Disk
from pytest_ostimages.lab.lab import Lab, OstDeployment
from pytest_ostimages.hypervisor.render import HostEntry
from pytest_ostimages.guest.vm import VM

# The shape of ovirt-system-tests' common/init-configs/1_engine_2_hosts.json, with
# OST's comment lines and template paths (which the plugin ignores).
TOPOLOGY = {
    "networks": {
        "management": {"comment": "DNS names ost-$suite-$nic", "is_management": True,
                       "template": "common/libvirt-templates/net_template",
                       "nics": ["engine", "host-0", "storage"]},
        "storage": {"nics": ["engine-storage", "host-0-storage", "storage-storage"]},
        "bonding": {"nics": ["host-0-eth2", "host-0-eth3"]},
    },
    "vms": {
        "engine": {"memory": "3584", "deploy-scripts": ["common/deploy-scripts/setup_engine.sh"],
                   "nics": {"engine": {"template": "x"}, "engine-storage": {}},
                   "root_disk_var": "OST_IMAGES_ENGINE_INSTALLED", "disks": {}},
        "host-0": {"memory": 4096, "vcpu_num": "3",
                   "nics": {"host-0": {}, "host-0-storage": {}, "host-0-eth2": {}, "host-0-eth3": {}},
                   "root_disk_var": "OST_IMAGES_HOST_INSTALLED"},
        "storage": {"nics": {"storage": {}, "storage-storage": {}}, "root_disk_var": "OST_IMAGES_BASE",
                    "disks": {"sdb": {"size": "191G"}, "sda": {"comment": "NFS", "size": "101G"}}},
    },
}


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    """An OST checkout: <root>/basic-suite-master/ost.json and a deploy script."""
    (tmp_path / "common/deploy-scripts").mkdir(parents=True)
    (tmp_path / "common/deploy-scripts/setup_engine.sh").write_text("true\n")
    (tmp_path / "basic-suite-master").mkdir()
    return tmp_path / "basic-suite-master" / "ost.json"


def write(path: Path, data: object, comment: bool = False) -> Path:
    text = json.dumps(data, indent=1)
    path.write_text(("# a comment, as lagofy.sh allows\n" if comment else "") + text)
    return path


def test_topology_as_lagofy_reads_it(suite: Path) -> None:
    topo = load(write(suite, TOPOLOGY, comment=True), suite.parent.parent, Path("/nonexistent"), {})
    assert topo.suite == "basic-suite-master"
    assert [n.role for n in topo.networks] == ["management", "bonding", "storage"]  # management first
    vms = {vm.role: vm for vm in topo.vms}
    assert list(vms) == ["engine", "host-0", "storage"]
    # NICs in jq's sorted key order: eth0 host-0, eth1 host-0-eth2, eth2 host-0-eth3, eth3 host-0-storage
    assert vms["host-0"].nics == ("management", "bonding", "bonding", "storage")
    assert (vms["engine"].image, vms["host-0"].image, vms["storage"].image) == (
        "engine-installed", "host-installed", "base")
    assert (vms["engine"].memory, vms["engine"].vcpus, vms["host-0"].memory, vms["host-0"].vcpus) == (
        3584, None, 4096, 3)
    assert vms["storage"].disks == (Disk("sda", 101 * 2**30, "2"), Disk("sdb", 191 * 2**30, "3"))
    assert vms["engine"].deploy_scripts == (suite.parent.parent / "common/deploy-scripts/setup_engine.sh",)


def test_an_exported_variable_overrides_the_layer_with_a_path(suite: Path, tmp_path: Path) -> None:
    image = tmp_path / "my-engine.qcow2"
    image.write_bytes(b"")
    topo = load(write(suite, TOPOLOGY), suite.parent.parent, Path("/x"),
                {"OST_IMAGES_ENGINE_INSTALLED": str(image)}, suite="custom")
    assert (topo.suite, topo.vms[0].image) == ("custom", str(image))


def broken(**change: object) -> dict:
    data = json.loads(json.dumps(TOPOLOGY))
    for path, value in change.items():
        *parents, last = path.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return data


@pytest.mark.parametrize("data, key, problem", [
    (broken(vms__engine__nics={"engine": {}, "engine-nowhere": {}}), "vms.engine.nics.engine-nowhere",
     "no network lists this NIC"),
    (broken(vms__engine__root_disk_var=None), "vms.engine.root_disk_var", "missing"),
    (broken(vms__engine__root_disk_var="OST_IMAGES_UNHEARD_OF"), "vms.engine.root_disk_var",
     "names no known image"),
    (broken(vms__storage__root_disk_var="OST_IMAGES_STORAGE_BASE"), "vms.storage.root_disk_var",
     "storage-base.qcow2, which does not exist"),
    (broken(vms__storage__disks={"sda": {"size": "lots"}}), "vms.storage.disks.sda.size", "not a disk size"),
    (broken(vms__engine__memory="3.5G"), "vms.engine.memory", "not a whole number"),
    (broken(networks__storage__is_management=True), "networks", "exactly one may"),
    (broken(networks__management__is_management=None), "networks", "no network has"),
    (broken(vms__engine__nics={"host-0": {}}), "vms.host-0.nics.host-0", "also a NIC of VM 'engine'"),
    (broken(**{"vms__engine__deploy-scripts": ["nope.sh"]}),
     "vms.engine.deploy-scripts", "nope.sh does not exist"),
    (broken(networks__bonding__nics=["host-0-eth2", "host-0"]), "networks.management.nics",
     "NIC 'host-0' is also on network 'bonding'"),
])
def test_bad_files_name_the_file_and_the_key(suite: Path, data: dict, key: str, problem: str) -> None:
    with pytest.raises(InitConfigError) as error:
        load(write(suite, data), suite.parent.parent, suite.parent, {})
    assert str(error.value).startswith(f"init-config {suite}: {key}: ")
    assert problem in str(error.value)


def test_duplicate_names_and_broken_json(suite: Path) -> None:
    text = json.dumps(TOPOLOGY).replace('"host-0": {"memory"', '"engine": {}, "host-0": {"memory"')
    suite.write_text(text)
    with pytest.raises(InitConfigError, match=f"init-config {suite}: engine: the name is given twice"):
        load(suite, suite.parent.parent, suite.parent, {})
    suite.write_text("{\"networks\": ")
    with pytest.raises(InitConfigError, match="is not valid JSON"):
        load(suite, suite.parent.parent, suite.parent, {})
    with pytest.raises(InitConfigError, match="cannot be read"):
        load(suite.parent / "missing.json", suite.parent.parent, suite.parent, {})


def test_bad_init_config_is_one_usage_error_and_leaves_nothing(pytester: pytest.Pytester, images_dir: Path,
                                                              workdir: Path, suite: Path) -> None:
    write(suite, broken(vms__engine__nics={"engine": {}, "engine-nowhere": {}}))
    pytester.makepyfile("def test_x(): pass\n")
    result = pytester.runpytest_inprocess(f"--ost-init-config={suite}", f"--ost-images-dir={images_dir}",
                                          f"--ost-workdir={workdir}", "--ost-libvirt-uri=test:///default")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert errors == [f"ERROR: init-config {suite}: vms.engine.nics.engine-nowhere: no network lists this "
                      f"NIC; the networks list ['engine', 'engine-storage', 'host-0', 'host-0-eth2', "
                      f"'host-0-eth3', 'host-0-storage', 'storage', 'storage-storage']."]
    assert not workdir.exists()


def test_ost_mode_refuses_run_inside(pytester: pytest.Pytester, suite: Path, images_dir: Path) -> None:
    write(suite, TOPOLOGY)
    result = pytester.runpytest_inprocess(f"--ost-init-config={suite}", "--ost-run-inside=base",
                                          f"--ost-images-dir={images_dir}", f"--ost-root={suite.parent.parent}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --ost-init-config cannot be combined with --ost-run-inside*"])


def test_a_directory_that_is_no_suite_name_needs_ost_suite(suite: Path) -> None:
    odd = suite.parent.parent / "my suite" / "ost.json"
    odd.parent.mkdir()
    with pytest.raises(InitConfigError, match="'my suite' is not a suite name.*--ost-suite"):
        load(write(odd, TOPOLOGY), suite.parent.parent, Path("/x"), {})
    assert load(odd, suite.parent.parent, Path("/x"), {}, suite="mine").suite == "mine"


def test_reuse_fingerprint_covers_topology_deploy_scripts_and_ip_version(suite: Path, images_dir: Path,
                                                                         workdir: Path) -> None:
    def fingerprint(topology: dict, **settings: object) -> str:
        topo = load(write(suite, topology), suite.parent.parent, images_dir, {})
        lab = Lab(OstConfig(images_dir=images_dir, workdir=workdir, **settings))  # type: ignore[arg-type]
        lab.ost = OstDeployment(topo.suite, suite.parent.parent, topo.networks)
        return reuse.fingerprint(lab, list(topo.vms))

    first = fingerprint(TOPOLOGY)
    assert fingerprint(TOPOLOGY) == first
    # the kept VMs ran the deploy scripts: a changed one must boot afresh
    (suite.parent.parent / "common/deploy-scripts/setup_engine.sh").write_text("echo changed\n")
    changed_script = fingerprint(TOPOLOGY)
    assert changed_script != first
    assert fingerprint(TOPOLOGY, ip_version="4") != changed_script
    assert fingerprint(broken(vms__storage__disks__sda__size="1G")) != changed_script
    assert fingerprint(broken(vms__engine__nics={"engine": {}})) != changed_script
    assert not workdir.exists()  # a fingerprint makes nothing


def test_size_suffixes_are_qemu_img_s(suite: Path, tmp_path: Path) -> None:
    sizes = {"a": "1k", "b": "512M", "c": "2048", "d": "1T"}
    data = broken(vms__storage__disks={dev: {"size": size} for dev, size in sizes.items()})
    disks = {d.name: d.size for d in load(write(suite, data), suite.parent.parent, Path("/x"), {}).vms[2].disks}
    for dev, size in sizes.items():  # what qemu-img create makes of the same size
        made = tmp_path / f"{dev}.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(made), size], check=True)
        assert made.stat().st_size == disks[dev]


def test_ost_variables_are_set_for_the_session_only(pytester: pytest.Pytester, suite: Path, images_dir: Path,
                                                    workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(suite, broken(vms__engine__root_disk_var="OST_IMAGES_BASE", **{"vms__engine__deploy-scripts": []}))
    monkeypatch.delenv("OST_DEPLOYMENT", raising=False)
    pytester.makeconftest("""
        import os
        def pytest_collection_finish(session):
            for name in ("OST_DEPLOYMENT", "SUITE", "OST_REPO_ROOT", "OST_IMAGES_DISTRO"):
                print(name, os.environ[name])
    """)
    relative_root = os.path.relpath(suite.parent.parent, pytester.path)
    result = pytester.runpytest_inprocess(f"--ost-init-config={suite}", f"--ost-root={relative_root}",
                                          "--collect-only", "-s",
                                          f"--ost-images-dir={images_dir}", f"--ost-workdir={workdir}",
                                          "--ost-libvirt-uri=test:///default")
    result.stdout.fnmatch_lines([f"OST_DEPLOYMENT {workdir}/*", "SUITE basic-suite-master",
                                 f"OST_REPO_ROOT {suite.parent.parent}",  # absolute, whatever was given
                                 "OST_IMAGES_DISTRO testos"])
    assert "OST_DEPLOYMENT" not in os.environ
    assert not workdir.exists()  # --collect-only boots nothing


def test_vm_addresses_default_to_the_management_network_whatever_its_name() -> None:
    mgmt = HostEntry("engine", "52:54:00:00:00:0a", ipaddress.IPv4Address("192.0.2.10"), ipaddress.IPv6Address("fd00::a"))
    storage = HostEntry("engine-eth0", "52:54:00:00:01:0a", ipaddress.IPv4Address("198.51.100.10"))
    # "engine-storage" sorts before "engine": eth0 is on storage, the management NIC is eth1
    engine = VM("x-ost-s-engine", "engine", "ost-s-engine.ost.test", mgmt.ip, mgmt.mac, None, Path("/o"),  # type: ignore[arg-type]
                Path("/c"), None, None, nics=(("storage", storage), ("ost-management", mgmt)))  # type: ignore[arg-type]
    assert engine.addresses() == [mgmt.ip, mgmt.ip6]
    assert engine.addresses("storage") == [storage.ip]
