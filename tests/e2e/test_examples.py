"""The example suites in examples/ are documentation: they must pass as shipped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers import DISTRO, RESTORABLE, libvirt_objects, workdirs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_basic_suite(pytester: pytest.Pytester) -> None:
    before = libvirt_objects(), workdirs()
    result = pytester.runpytest_subprocess(str(EXAMPLES / "basic_suite"), "-p", "no:cacheprovider", *RESTORABLE)
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*3 VMs ready in *"])
    assert (libvirt_objects(), workdirs()) == before


def test_example_suite_runs_beside_another_distros_images(pytester: pytest.Pytester, linked_images: Path) -> None:
    # an OST host has el9stream (or centos9) images with engine and host layers too
    for layer in ("base", "engine-installed", "host-installed"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(linked_images / f"el9stream-{layer}.qcow2"),
                        "16M"], check=True)
    shutil.copy(linked_images / f"{DISTRO}_id_rsa", linked_images / "el9stream_id_rsa")
    result = pytester.runpytest_subprocess(str(EXAMPLES / "basic_suite"), "-p", "no:cacheprovider",
                                           f"--ost-images-dir={linked_images}", "-k", "test_engine_has_its_layer",
                                           *RESTORABLE)
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines([f"*engine: * {DISTRO}-engine-installed *"])  # booted or restored
