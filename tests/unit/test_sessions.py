"""Whole sessions on libvirt's test driver: what they plan, how they fail, what they leave.

The test driver "starts" domains without running anything: a VM never answers SSH,
so these sessions use a 1 s boot timeout and a loopback subnet pool (connections
are refused at once and no traffic leaves the machine). Progress lines show which
VMs a session boots.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from pytest_ostimages.config import OstConfig
from pytest_ostimages.errors import OstError
from pytest_ostimages.lab.inputs import VMSpec
from pytest_ostimages.lab.lab import Lab
from pytest_ostimages.state.share import Share

DISTRO = "testos"



@pytest.fixture
def session(pytester: pytest.Pytester, images: Path, workdir: Path):
    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_inprocess(
            f"--ost-images-dir={images}", f"--ost-workdir={workdir}", "--ost-libvirt-uri=test:///default",
            "--ost-virt-type=qemu", "--ost-subnet-pool=127.100.0.0/24", "--ost-boot-timeout=1",
            "--ost-max-boots=0", *args)
    return run


def booted(result: pytest.RunResult) -> list[str]:
    return sorted(line.split("[ost] ")[1].split(":")[0] for line in result.outlines
                  if "[ost] " in line and ": booting " in line)


def test_plan_follows_deselection(pytester: pytest.Pytester, session) -> None:
    pytester.makepyfile("""
        def test_engine(engine): pass
        def test_hosts(host0, host1): pass
        def test_clean(clean_vm): pass
    """)
    assert booted(session("-k", "test_engine")) == ["engine"]
    assert booted(session("--deselect", "test_plan_follows_deselection.py::test_engine",
                          "-k", "not clean")) == ["host0", "host1"]


def test_each_test_gets_its_own_directory_s_vm_fixture(pytester: pytest.Pytester, session) -> None:
    for folder, layer in (("a", "engine-installed"), ("b", "host-installed")):
        pytester.mkpydir(folder)
        (pytester.path / folder / "conftest.py").write_text(
            f"from pytest_ostimages import vm_fixture\nengine = vm_fixture('engine', '{layer}')\n")
        (pytester.path / folder / f"test_{folder}.py").write_text("def test_x(engine):\n    pass\n")
    only_b = session("b")
    only_b.stdout.fnmatch_lines(["*engine: booting testos-host-installed*"])
    both = session("a", "b")
    both.assert_outcomes(errors=1)
    both.stdout.fnmatch_lines(["*Two VM fixtures give the role 'engine' different VMs in one session*"])


def test_a_vm_error_fails_only_the_tests_that_need_it(pytester: pytest.Pytester, session) -> None:
    # a VM that does not boot, or one asked for wrongly, is that test's failure; the session goes on
    pytester.makepyfile("""
        from pytest_ostimages import VMSpec

        def test_same_role_twice(ost_vm_factory):
            ost_vm_factory.many([VMSpec("a", "engine-installed"), VMSpec("a", "base")])

        def test_never_answers(ost_vm_factory):
            ost_vm_factory("base", role="b")

        def test_goes_on(ost_network):
            pass
    """)
    result = session()
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*VM roles must be unique in a session; got ?'a', 'a'?*",
                                 "*VM b (ost-*-b, image testos-base) * within 1 s*"])
    assert "Interrupted" not in result.stdout.str()


@pytest.mark.parametrize("logging", [[], ["-o", "log_cli=true", "-o", "log_cli_level=INFO"], ["--log-cli-level=DEBUG"]])
def test_each_progress_line_is_shown_once(pytester: pytest.Pytester, session, logging: list[str]) -> None:
    # with pytest's live log on, the log record is the line: the progress is not written again
    pytester.makepyfile("def test_net(ost_network):\n    pass\n")
    output = session(*logging).stdout.str()
    assert output.count("removing the VMs, networks and work directory of run") == 1, output


def test_an_input_error_is_reported_once_and_stops_the_session(pytester: pytest.Pytester, session) -> None:
    pytester.makepyfile("""
        def test_1(ost_vm): pass
        def test_2(ost_vm): pass
        def test_3(ost_vm): pass
    """)
    result = session("--ost-image=storage-installed")
    result.assert_outcomes(errors=1)  # test_2 and test_3 never ran
    assert result.stdout.str().count("ERROR at setup of") == 1
    result.stdout.fnmatch_lines(["*ERROR at setup of test_1*",
                                 "Layer 'storage-installed' of testos is not installed in *",
                                 "*Interrupted: pytest-ostimages: Layer 'storage-installed'*"])


def test_the_only_distro_with_the_planned_layers_is_chosen(pytester: pytest.Pytester, session,
                                                            images: Path) -> None:
    other = images / "other-base.qcow2"
    shutil.copy(images / f"{DISTRO}-base.qcow2", other)
    pytester.makepyfile("def test_x(engine):\n    pass\n")
    session().stdout.fnmatch_lines(["*engine: booting testos-engine-installed*"])
    shutil.copy(images / f"{DISTRO}-engine-installed.qcow2", images / "other-engine-installed.qcow2")
    result = session()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Several distros are installed*2 of them have all of those layers*"
                                 "--ost-distro*", "*other: base, engine-installed*"])


def test_teardown_runs_when_artifact_collection_fails(pytester: pytest.Pytester, session,
                                                      workdir: Path, tmp_path: Path) -> None:
    pytester.makepyfile("def test_fails(ost_network):\n    assert False\n")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = session(f"--ost-artifacts={not_a_folder}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*could not collect the artifacts*", "*removing the VMs, network*"])
    assert [p for p in workdir.iterdir() if p.is_dir()] == []


def test_keep_is_honoured_by_an_attached_lab(images: Path, workdir: Path) -> None:
    config = OstConfig(images_dir=images, libvirt_uri="test:///default", workdir=workdir,
                       subnet_pool=__import__("ipaddress").IPv4Network("127.101.0.0/24"))
    booter = Lab(config)
    booter.ensure_network()
    try:
        env = booter.environment()
        attached = Lab(OstConfig(**{**config.__dict__, "keep": True}))
        attached.attach(env)
        assert attached.environment().networks == env.networks
        attached.close()
        assert (workdir / env.run_id).is_dir()  # kept, and no longer labelled for the reaper
        assert not (workdir / env.run_id / "owner.json").exists()
    finally:
        booter.close()


def test_a_sessions_network_gives_a_restored_guest_what_it_knew(images: Path, workdir: Path) -> None:
    """On the same addresses, a network of a later session is what a saved guest knew (lab/warm.py keeps
    its NICs): the host's MAC on it is made of its address (the gateway's), as a VM's is, and the
    leases never expire (a restored guest's clock jumps ahead by the state's age), as libvirt reads it."""
    from lxml import etree

    config = OstConfig(images_dir=images, libvirt_uri="test:///default", workdir=workdir,
                       subnet_pool=__import__("ipaddress").IPv4Network("127.102.0.0/23"))
    lab = Lab(config)
    lab.ensure_network()
    try:
        network = lab.networks[lab.management_role]
        root = etree.fromstring(network.handle.XMLDesc())
        o = network.subnet.network_address.packed
        assert root.find("mac").get("address") == f"52:54:00:{o[1]:02x}:{o[2]:02x}:01"
        ranges = root.findall("ip/dhcp/range")
        assert len(ranges) == 2 and [r.find("lease").get("expiry") for r in ranges] == ["0", "0"]
    finally:
        lab.close()


def test_a_failed_shared_boot_reaches_every_worker_at_once(images: Path, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # qemu's user cannot reach a work directory in here
    config = OstConfig(images_dir=images, libvirt_uri="test:///default", workdir=private / "work")
    share = Share(tmp_path / "share")
    first = Lab(config)
    with pytest.raises(OstError, match="cannot traverse"):
        share.join(first, lambda: first.boot([VMSpec("engine", "engine-installed")]))
    first.close()
    with pytest.raises(OstError, match=textwrap.dedent("""\
            (?s)could not be booted by another worker:.*cannot traverse""")):
        second = Lab(config)
        share.join(second, lambda: second.boot([VMSpec("engine", "engine-installed")]))


def test_an_init_configs_management_network_may_have_any_name(pytester: pytest.Pytester, session,
                                                              tmp_path: Path) -> None:
    # ost_utils needs "management" in the role's name, not the name itself: "is_management" decides
    config = tmp_path / "suite" / "ost.json"
    config.parent.mkdir()
    config.write_text(json.dumps({
        "networks": {"ost-management": {"is_management": True, "nics": ["vm"]}, "storage": {"nics": ["vm-s"]}},
        "vms": {"vm": {"nics": {"vm": {}, "vm-s": {}}, "root_disk_var": "OST_IMAGES_BASE"}}}))
    pytester.makepyfile("def test_x():\n    pass\n")
    result = session(f"--ost-init-config={config}", "--ost-subnet-pool=127.100.0.0/23")  # two networks
    result.stdout.fnmatch_lines(["*network ost-* (ost-management): 127.100.0.0/24*",
                                 "*network ost-*-1 (storage)*", "*vm: booting testos-base as *-ost-suite-vm *"])
    result.stdout.no_fnmatch_line("*no NIC on the management network*")


def test_the_plan_knows_the_first_tests_checkpoints_in_setup_order(pytester: pytest.Pytester) -> None:
    # what the session restores before anything boots (lab/chain.py): the checkpoints the first test
    # that uses VMs sets up, each after those it builds on, whatever order the test names them in
    from pytest_ostimages.lab.plan import Plan

    pytester.makeconftest("""
        from pytest_ostimages import checkpoint, vm_fixture

        box = vm_fixture("box", "base")

        @checkpoint
        def configured(box):
            return 1

        @checkpoint
        def deeper(configured):
            return 2

        @checkpoint
        def elsewhere(box):
            return 3
    """)
    pytester.makepyfile("""
        def test_no_vm():
            pass

        def test_first(deeper, box):
            pass

        def test_later(elsewhere):
            pass
    """)
    items, _ = pytester.inline_genitems()
    assert [checkpoint.name for checkpoint in Plan.of(items).checkpoints] == ["configured", "deeper"]
