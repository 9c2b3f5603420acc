"""OST suites as they are: failing and hung deploy scripts, a suite reused whole, shared by xdist
workers (the example topology itself runs in test_warm_environments.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from .helpers import INNER, RESTORABLE, libvirt_objects, workdirs



def test_failing_and_hung_deploy_scripts_stop_the_session(pytester: pytest.Pytester, tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "ok.sh").write_text("echo first script ran\n")
    (tmp_path / "scripts" / "broken.sh").write_text("echo about to fail; echo on stderr >&2; exit 3\n")
    (tmp_path / "scripts" / "hang.sh").write_text("echo about to hang; sleep 3600\n")
    suite = tmp_path / "mysuite"
    suite.mkdir()
    (suite / "ost.json").write_text(json.dumps({
        "networks": {"management": {"is_management": True, "nics": ["vm", "vm-hung"]}},
        "vms": {"vm": {"nics": {"vm": {}}, "root_disk_var": "OST_IMAGES_BASE",
                       "deploy-scripts": ["scripts/ok.sh", "scripts/broken.sh"]},
                "vm-hung": {"nics": {"vm-hung": {}}, "root_disk_var": "OST_IMAGES_BASE",
                            "deploy-scripts": ["scripts/hang.sh"]}}}))
    (suite / "test_never.py").write_text("def test_never_runs():\n    pass\n")
    before = libvirt_objects(), workdirs()
    artifacts = tmp_path / "artifacts"
    result = pytester.runpytest_subprocess(*INNER, f"--ost-init-config={suite / 'ost.json'}",
                                           f"--ost-root={tmp_path}", f"--ost-artifacts={artifacts}",
                                           "--ost-deploy-timeout=15", str(suite))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*vm: deploy script scripts/ok.sh done in *",
        "*pytest-ostimages could not provision OST suite mysuite: 2 deploy scripts failed:",
        "Deploy script scripts/broken.sh failed on VM vm (*-ost-mysuite-vm) with exit code 3. Its last 20 "
        "lines of output:",
        "about to fail",
        "on stderr",
        "Deploy script scripts/hang.sh timed out on VM vm-hung (*-ost-mysuite-vm-hung) after 15 s "
        "(--ost-deploy-timeout). Its last 20 lines of output:",
        "about to hang",
    ])
    result.assert_outcomes()  # no test ran
    logs = sorted(p.name for p in artifacts.glob("*/deploy/*"))
    assert logs == ["vm-hung.1.hang.sh.log", "vm.1.ok.sh.log", "vm.2.broken.sh.log"]
    assert (libvirt_objects(), workdirs()) == before


MINI_SUITE = '''
    import os
    from pathlib import Path

    import pytest

    @pytest.fixture(autouse=True, scope="session")
    def seen(ost_lab):
        """What this session (or xdist worker) sees: its deployment and the guest's boot."""
        boot_id = ost_lab.vms["engine"].ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(f"seen-{worker}").write_text(f"{os.environ['OST_DEPLOYMENT']} {boot_id}")

    def test_deployed_once(ost_lab):
        assert ost_lab.vms["engine"].ssh("cat /root/deployed").stdout == os.environ["OST_E2E_DEPLOYED"]

    def test_deployment_is_the_environments(ost_lab):
        deployment = os.environ["OST_DEPLOYMENT"]  # as OST's fixtures read it
        engine = ost_lab.vms["engine"]
        assert f"<ost-working-dir comment=\\"{deployment}\\"/>" in engine.domain.XMLDesc()
        assert "ost-mini-engine" in Path(deployment, "hosts").read_text()
        assert [role for role, _ in engine.nics] == ["management", "storage"]
        storage_ip = engine.addresses("storage")[0]
        assert f"{storage_ip}/24" in engine.ssh("ip -4 -o addr show eth1").stdout

    def test_third(ost_lab):  # three tests: two xdist workers both get one
        assert ost_lab.vms["engine"].ssh("true").returncode == 0
'''


@pytest.fixture
def mini_suite(pytester: pytest.Pytester) -> Path:
    """An OST suite of one VM with a NIC on each of two networks and a deploy script that
    counts its runs."""
    (pytester.path / "scripts").mkdir()
    (pytester.path / "scripts" / "deploy.sh").write_text("echo deployed v1 >> /root/deployed\n")
    suite = pytester.path / "mini"
    suite.mkdir()
    (suite / "ost.json").write_text(json.dumps({
        "networks": {"management": {"is_management": True, "nics": ["engine"]},
                     "storage": {"nics": ["engine-storage"]}},
        "vms": {"engine": {"nics": {"engine": {}, "engine-storage": {}}, "root_disk_var": "OST_IMAGES_BASE",
                           "deploy-scripts": ["scripts/deploy.sh"]}}}))
    (suite / "test_mini.py").write_text(textwrap.dedent(MINI_SUITE))
    return suite


def seen(path: Path) -> dict[str, list[str]]:
    """What each session (or xdist worker) saw: its OST_DEPLOYMENT and the guest's boot id."""
    return {p.name: p.read_text().split() for p in sorted(path.glob("seen-*"))}


def test_an_ost_suite_is_reused_whole_without_deploying_again(pytester: pytest.Pytester, mini_suite: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    before = libvirt_objects(), workdirs()
    args = [*INNER, f"--ost-init-config={mini_suite / 'ost.json'}", f"--ost-root={pytester.path}",
            "--ost-reuse", str(mini_suite)]
    monkeypatch.setenv("OST_E2E_DEPLOYED", "deployed v1\n")
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=3)
    first.stdout.fnmatch_lines(["*engine: deploy script scripts/deploy.sh done in *",
                                "*keeping 1 VMs for the next run*"])
    booted = seen(pytester.path)["seen-main"]

    # attached: the same guest and deployment directory, its scripts not run again
    second = pytester.runpytest_subprocess(*args)
    second.assert_outcomes(passed=3)
    second.stdout.fnmatch_lines(["*reusing the VMs kept by an earlier run*"])
    second.stdout.no_fnmatch_line("*deploy script*")
    assert seen(pytester.path)["seen-main"] == booted

    # a changed deploy script is a changed environment: booted and deployed afresh
    (pytester.path / "scripts" / "deploy.sh").write_text("echo deployed v2 >> /root/deployed\n")
    monkeypatch.setenv("OST_E2E_DEPLOYED", "deployed v2\n")
    changed = pytester.runpytest_subprocess(*args)
    changed.assert_outcomes(passed=3)
    changed.stdout.fnmatch_lines(["*the kept VMs cannot be reused (images, templates or settings changed): "
                                  "removing them*",
                                  "*engine: deploy script scripts/deploy.sh done in *"])
    deployment, boot_id = seen(pytester.path)["seen-main"]
    assert deployment != booted[0] and boot_id != booted[1]

    cleanup = pytester.runpytest_subprocess("--ost-cleanup", *INNER)
    cleanup.stdout.fnmatch_lines(["removed domain *-ost-mini-engine *", "removed network ost-*-1 *"])
    assert (libvirt_objects(), workdirs()) == before


def test_xdist_workers_share_one_ost_deployment(pytester: pytest.Pytester, mini_suite: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    before = libvirt_objects(), workdirs()
    monkeypatch.setenv("OST_E2E_DEPLOYED", "deployed v1\n")  # deployed once, by one worker
    result = pytester.runpytest_subprocess(*INNER, *RESTORABLE, "-n", "2", "--ost-share",
                                           f"--ost-init-config={mini_suite / 'ost.json'}",
                                           f"--ost-root={pytester.path}", str(mini_suite))
    result.assert_outcomes(passed=3)
    views = seen(pytester.path)
    assert sorted(views) == ["seen-gw0", "seen-gw1"]
    assert views["seen-gw0"] == views["seen-gw1"]  # one deployment directory, one guest
    assert (libvirt_objects(), workdirs()) == before
