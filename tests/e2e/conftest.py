"""End-to-end tests: real VMs from the installed test images under real libvirt.

Run them inside the lab namespace (see README); they boot the engine and two
hosts once for the whole session, plus a few short inner sessions.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pytest_ostimages import vm_fixture

from .helpers import IMAGES, INNER, LOCKS, RESTORABLE, WORKER, image_state, libvirt_objects, workdirs


# Under pytest-xdist (.ci/run: -n 2) every e2e module goes to one worker whole (its module fixtures set
# up once), the modules whose tests use the session's own engine and hosts (below) to one worker together
# (so that only one boots them); unit tests go one by one.
SESSION_ENVIRONMENT = {"test_clean_vm", "test_environment", "test_identity"}
# The longest modules (about 3-6 minutes each on a cold 2-core CI machine), handed out first, after the
# modules with exclusive tests, so that no worker is left with one of them at the end.
LONGEST = ["test_uefi", "test_warm_environments", "test_remote", "test_warm", "test_faults", "test_cloud_init"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    e2e = {item for item in items if Path(__file__).parent in Path(item.path).parents}
    for item in e2e:
        item.add_marker(pytest.mark.e2e)
    if not WORKER:
        return
    exclusive = {Path(item.path).stem for item in e2e if item.get_closest_marker("exclusive")}

    def order(item: pytest.Item) -> tuple[int, int, int]:
        if item not in e2e:  # unit tests last: they fill the workers' gaps at the end
            return (3, 0, 0)
        module = Path(item.path).stem
        turn = 0 if module in exclusive else 1 if module in LONGEST else 2
        return (turn, LONGEST.index(module) if module in LONGEST else 0,
                0 if item.get_closest_marker("exclusive") else 1)

    items.sort(key=order)  # stable: modules and tests otherwise as collected


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the order of pytest_collection_modifyitems, not by test count

    class Modules(LoadScopeScheduling):
        """Units of work: an e2e module, the session environment's modules, a unit test."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if not path.startswith("tests/e2e/"):
                return nodeid
            return "session-environment" if Path(path).stem in SESSION_ENVIRONMENT else path

    return Modules(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Iterator[None]:
    """Under xdist, an e2e test marked `exclusive` (it kills sessions, whose leftovers any other session's
    reaper would remove first, or reads what --ost-cleanup finds on the host) runs alone; the others run
    side by side. The turn spans the test's whole protocol: module fixtures set up or torn down with it too."""
    if not WORKER or not item.get_closest_marker("e2e"):
        return (yield)
    with turn(exclusive=item.get_closest_marker("exclusive") is not None):
        return (yield)


@contextlib.contextmanager
def turn(exclusive: bool) -> Iterator[None]:
    """A readers-writer lock across processes: `gate` lets no new test in while an exclusive one waits
    (flock alone would let the others' next tests overtake it for ever), `room` holds the tests running."""
    LOCKS.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(LOCKS / "gate", "a") as gate, open(LOCKS / "room", "a") as room:
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(room, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(room, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases their locks


@pytest.fixture(scope="session")
def engine_vm_saved(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The run's saved state of the VM that most inner sessions ask for (`--ost-image=engine-installed`,
    INNER's size, RESTORABLE), booted and saved before the first of them starts. Sessions with
    --ost-reuse keep their VMs and save none, so on a cold machine each of them booted it. One seeding
    session for the run (both workers: the controller's pid marks it done); the tests pass without it."""
    LOCKS.mkdir(mode=0o755, parents=True, exist_ok=True)
    run = str(os.getppid()) if WORKER else str(os.getpid())  # the xdist controller: one per run
    with open(LOCKS / "engine-vm-saved", "a+") as marker:
        fcntl.flock(marker, fcntl.LOCK_EX)
        marker.seek(0)
        if marker.read() == run:
            return
        folder = tmp_path_factory.mktemp("engine-vm")
        (folder / "test_vm.py").write_text("def test_vm(ost_vm):\n    pass\n")
        done = subprocess.run([sys.executable, "-m", "pytest", *INNER, *RESTORABLE, "-s",
                               "--ost-image=engine-installed", "test_vm.py"], cwd=folder, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=900)
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
        marker.truncate(0)
        marker.write(run)


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
