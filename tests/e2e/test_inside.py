"""--ost-run-inside: the example suite runs in a real VM, its tests reported as local."""

from __future__ import annotations

import shutil
import venv
from pathlib import Path
from xml.etree import ElementTree

import pytest

from .helpers import DISTRO, RESTORABLE, libvirt_objects, workdirs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inside"
SMALL = ["-p", "no:cacheprovider", "--ost-memory=512", "--ost-vcpus=2", f"--ost-distro={DISTRO}"]


def test_example_passes_inside_and_lists_each_test(pytester: pytest.Pytester, tmp_path: Path) -> None:
    before = libvirt_objects(), workdirs()
    junit = tmp_path / "junit.xml"
    artifacts = tmp_path / "artifacts"
    result = pytester.runpytest_subprocess("--ost-run-inside=host-installed", str(EXAMPLE), "-v", "-ra",
                                           f"--junitxml={junit}", f"--ost-artifacts={artifacts}",
                                           "--ost-inside-artifacts=/etc/ost-layer", *SMALL)
    result.assert_outcomes(passed=3)
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "*inside: * shared read-only at /mnt/ost-tree (virtiofs)*",
        "*inside: collected 3 items in the guest*",
        "*examples/inside/test_storage.py::test_root_on_a_real_kernel_with_systemd PASSED*",
        "*examples/inside/test_storage.py::test_logical_volume_with_a_filesystem PASSED*",
    ])
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    assert sorted(c.get("name") for c in cases) == [
        "test_logical_volume_with_a_filesystem", "test_loop_device_is_a_block_device",
        "test_root_on_a_real_kernel_with_systemd"]
    [run] = artifacts.iterdir()
    assert "systemd" in (run / "inside" / "journal.txt").read_text()
    assert (run / "inside" / "files.tar.gz").stat().st_size > 0
    assert (libvirt_objects(), workdirs()) == before


def test_an_inner_failure_keeps_its_traceback(pytester: pytest.Pytester) -> None:
    suite = pytester.path / "suite"  # in the rootdir (the tree copied to the guest), with a virtualenv in it
    shutil.copytree(EXAMPLE, suite)
    venv.create(suite / "env", with_pip=False)
    result = pytester.runpytest_subprocess("--ost-run-inside=host-installed", "--ost-inside-share=copy",
                                           str(suite), "-m", "demo_fail", *SMALL, *RESTORABLE)
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        f"*inside: {pytester.path} copied to /root/ost-tree (* KiB in * s; not the virtual environments suite/env)",
        "*_ test_fails_on_purpose _*",
        "*assert sizes[[]\"lv\"[]] == sizes[[]\"pv\"[]], \"this test fails on purpose (-m demo_fail)\"*",
        "*AssertionError: this test fails on purpose*",
        "FAILED *test_storage.py::test_fails_on_purpose*",
    ])


def test_a_guest_without_pytest_is_one_clear_error(pytester: pytest.Pytester) -> None:
    before = libvirt_objects(), workdirs()
    # engine-installed has python3 but no pytest; its VM need not boot
    result = pytester.runpytest_subprocess("--ost-run-inside=engine-installed", "--ost-inside-share=copy", str(EXAMPLE),
                                           *SMALL, *RESTORABLE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: The guest ({DISTRO}-engine-installed) has no pytest for python3*"])
    assert (libvirt_objects(), workdirs()) == before
