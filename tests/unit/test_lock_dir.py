"""Unit tests keep the plugin's host-wide locks to themselves (tests/unit/conftest.py: own_lock_dir)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_ostimages.state import files


def lock_files(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


def test_a_session_s_locks_stay_out_of_the_real_lock_dir(pytester: pytest.Pytester, workdir: Path,
                                                         own_lock_dir: Path) -> None:
    real = files.LOCK_DIR
    before = lock_files(real)
    # --ost-cleanup boots nothing but locks the work root (a name of its own: reuse-<hash>);
    # in a subprocess, as the inner sessions of most unit tests run
    result = pytester.runpytest_subprocess("--ost-libvirt-uri=test:///default", f"--ost-workdir={workdir}",
                                           "--ost-cleanup")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    taken = lock_files(own_lock_dir)
    assert taken, f"the session took no lock in the test's own directory {own_lock_dir}"
    assert (lock_files(real) - before) & taken == set(), f"the session left lock files in {real}"
