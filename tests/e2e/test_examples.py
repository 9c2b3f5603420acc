"""The example suites in examples/ are documentation: they must pass as shipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import libvirt_objects, workdirs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_basic_suite(pytester: pytest.Pytester) -> None:
    before = libvirt_objects(), workdirs()
    result = pytester.runpytest_subprocess(str(EXAMPLES / "basic_suite"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*3 VMs ready in *"])
    assert (libvirt_objects(), workdirs()) == before
