"""--ost-run-inside without a VM: which arguments reach the guest's pytest, and how."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pytest_ostimages.config import SETTINGS
from pytest_ostimages.errors import OstError
from pytest_ostimages.inside.run import inner_args, tree_archive

VALUE_OPTIONS = {s.option for s in SETTINGS if not s.flag}


def test_plugin_and_outer_only_options_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    args = ["--ost-run-inside=host-installed", "--ost-memory", "512", "--ost-keep", "-n", "2",
            "--junitxml=out.xml", "--junit-xml", "x.xml", "-k", "lvm", "-m", "not slow", "-x", "tests"]
    assert inner_args(args, tmp_path, tmp_path, VALUE_OPTIONS, ["tests"]) == ["-k", "lvm", "-m", "not slow", "-x", "tests"]


def test_paths_become_relative_to_the_rootdir(tmp_path: Path) -> None:
    (tmp_path / "tests" / "functional").mkdir(parents=True)
    (tmp_path / "tests" / "functional" / "test_a.py").write_text("")
    cwd = tmp_path / "tests"
    assert inner_args(["functional/test_a.py::test_x", "functional"], tmp_path, cwd, VALUE_OPTIONS,
                      ["functional/test_a.py::test_x", "functional"]) == \
        ["tests/functional/test_a.py::test_x", "tests/functional"]


def test_a_path_outside_the_rootdir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    with pytest.raises(OstError, match="outside the rootdir"):
        inner_args([str(tmp_path / "elsewhere")], tmp_path / "root", tmp_path, VALUE_OPTIONS, [str(tmp_path / "elsewhere")])


def test_inside_refuses_xdist(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--ost-run-inside=host-installed", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ost-run-inside runs the tests in one VM; drop -n*"])


def test_values_of_options_are_not_test_paths(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "conf").mkdir()
    args = ["-c", "/dev/null", "--confcutdir", str(tmp_path / "conf"), f"--rootdir={tmp_path}",
            "--basetemp=/tmp/x", "-k", "tests", "tests"]
    assert inner_args(args, tmp_path, tmp_path, VALUE_OPTIONS, ["tests"]) == \
        ["-c", "/dev/null", "--confcutdir", "conf", "-k", "tests", "tests"]


def test_a_bad_inner_argument_is_a_usage_error_not_a_traceback(pytester: pytest.Pytester, images: Path,
                                                              workdir: Path) -> None:
    pytester.mkdir("tests")
    result = pytester.runpytest_subprocess(
        "-c", "/dev/null", "--ost-run-inside=base", f"--ost-images-dir={images}", f"--ost-workdir={workdir}",
        "--ost-libvirt-uri=test:///default", "--ost-virt-type=qemu", "--ost-subnet-pool=127.106.0.0/24",
        "--ost-boot-timeout=1", "--ost-max-boots=0", "tests")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output and "Traceback" not in output, output
    # it got as far as booting (the test driver's VMs never answer)
    result.stderr.fnmatch_lines(["ERROR: VM inside (ost-*-inside, image testos-base) not reachable over SSH within 1 s*"])


def test_the_copied_tree_leaves_out_virtual_environments_under_any_name(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for folder, files in {"tests": ["test_a.py"], ".venv-floor": ["pyvenv.cfg", "lib/site.py"],
                          "sub/env311": ["pyvenv.cfg", "bin/python"], ".git": ["HEAD"],
                          "data": ["pyvenv.cfg.example"]}.items():
        for name in files:
            (tree / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / folder / name).write_text("x")
    left_out = tree_archive(tree, tmp_path / "tree.tar.gz")
    assert sorted(left_out) == [".venv-floor", "sub/env311"]
    with tarfile.open(tmp_path / "tree.tar.gz") as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert files == ["./data/pyvenv.cfg.example", "./tests/test_a.py"]
