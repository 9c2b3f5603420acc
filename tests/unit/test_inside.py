"""--ost-run-inside without a VM: which arguments reach the guest's pytest, and how."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_ostimages.config import SETTINGS
from pytest_ostimages.errors import OstError
from pytest_ostimages.inside.run import inner_args

VALUE_OPTIONS = {s.option for s in SETTINGS if not s.flag}


def test_plugin_and_outer_only_options_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    args = ["--ost-run-inside=host-installed", "--ost-memory", "512", "--ost-keep", "-n", "2",
            "--junitxml=out.xml", "--junit-xml", "x.xml", "-k", "lvm", "-m", "not slow", "-x", "tests"]
    assert inner_args(args, tmp_path, tmp_path, VALUE_OPTIONS) == ["-k", "lvm", "-m", "not slow", "-x", "tests"]


def test_paths_become_relative_to_the_rootdir(tmp_path: Path) -> None:
    (tmp_path / "tests" / "functional").mkdir(parents=True)
    (tmp_path / "tests" / "functional" / "test_a.py").write_text("")
    cwd = tmp_path / "tests"
    assert inner_args(["functional/test_a.py::test_x", "functional"], tmp_path, cwd, VALUE_OPTIONS) == \
        ["tests/functional/test_a.py::test_x", "tests/functional"]


def test_a_path_outside_the_rootdir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    with pytest.raises(OstError, match="outside the rootdir"):
        inner_args([str(tmp_path / "elsewhere")], tmp_path / "root", tmp_path, VALUE_OPTIONS)


def test_inside_refuses_xdist(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--ost-run-inside=host-installed", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ost-run-inside runs the tests in one VM; drop -n*"])
