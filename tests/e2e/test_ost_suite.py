"""OST suites as they are: the example topology, a failing deploy script, OST's names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import INNER, libvirt_objects, workdirs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ost_suite"


def test_example_ost_suite(pytester: pytest.Pytester) -> None:
    before = libvirt_objects(), workdirs()
    result = pytester.runpytest_subprocess(
        *INNER, f"--ost-init-config={EXAMPLE / 'basic-suite' / 'ost.json'}", f"--ost-root={EXAMPLE}",
        str(EXAMPLE / "basic-suite"))
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines([
        "*OST suite basic-suite: 2 networks, 4 VMs from *ost.json",
        "*network ost-*-1 (storage): 192.168.*.0/24, fd6f:7374:*::/64*",
        "*storage: deploy script common/deploy-scripts/setup_storage.sh done in *",
        "*deploy scripts of 4 VMs done in *",
    ])
    assert (libvirt_objects(), workdirs()) == before


def test_a_failing_deploy_script_stops_the_session(pytester: pytest.Pytester, tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "ok.sh").write_text("echo first script ran\n")
    (tmp_path / "scripts" / "broken.sh").write_text("echo about to fail; echo on stderr >&2; exit 3\n")
    suite = tmp_path / "mysuite"
    suite.mkdir()
    (suite / "ost.json").write_text(json.dumps({
        "networks": {"management": {"is_management": True, "nics": ["vm"]}},
        "vms": {"vm": {"nics": {"vm": {}}, "root_disk_var": "OST_IMAGES_BASE",
                       "deploy-scripts": ["scripts/ok.sh", "scripts/broken.sh"]}}}))
    (suite / "test_never.py").write_text("def test_never_runs():\n    pass\n")
    before = libvirt_objects(), workdirs()
    artifacts = tmp_path / "artifacts"
    result = pytester.runpytest_subprocess(*INNER, f"--ost-init-config={suite / 'ost.json'}",
                                           f"--ost-root={tmp_path}", f"--ost-artifacts={artifacts}", str(suite))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*vm: deploy script scripts/ok.sh done in *",
        "*pytest-ostimages could not provision OST suite mysuite: Deploy script scripts/broken.sh failed on "
        "VM vm (*-ost-mysuite-vm) with exit code 3. Its last 20 lines of output:",
        "about to fail",
        "on stderr",
    ])
    result.assert_outcomes()  # no test ran
    logs = sorted(p.name for p in artifacts.glob("*/deploy/*"))
    assert logs == ["vm.1.ok.sh.log", "vm.2.broken.sh.log"]
    assert (libvirt_objects(), workdirs()) == before
