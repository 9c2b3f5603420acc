"""End-to-end tests: real VMs from the installed test images under real libvirt.

Run them inside the lab namespace (see README); they boot the engine and two
hosts once for the whole session, plus a few short inner sessions.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from pytest_ostimages import vm_fixture

from .helpers import IMAGES, image_state, libvirt_objects, workdirs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(__file__).parent in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """pytester with the real HOME: Debian's rpm keeps its database in ~/.rpmdb."""
    monkeypatch.setenv("HOME", pwd.getpwuid(os.getuid()).pw_dir)
    return pytester


@pytest.fixture
def linked_images() -> Iterator[Path]:
    """A folder qemu's user can reach, with links to every installed image file.

    Tests change it (another key, an extra image) without touching the real ones.
    """
    folder = Path(tempfile.mkdtemp(prefix="ost-images-", dir="/var/tmp"))
    folder.chmod(0o755)
    for path in IMAGES.iterdir():
        (folder / path.name).symlink_to(path)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def unchanged():
    """Assert that a test leaves no libvirt object, work dir or image change behind."""
    before = libvirt_objects(), workdirs(), image_state()
    yield
    assert (libvirt_objects(), workdirs(), image_state()) == before


# A third VM of the hosts' layer, booted with the session's others (identity tests).
host2 = vm_fixture("host2", "host-installed")
