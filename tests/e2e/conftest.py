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
# The longest modules (about 3-6 minutes each on a cold 2-core CI machine), handed out first after the
# exclusive tests and the unit tests, so that no worker is left with one of them at the end.
LONGEST = ["test_uefi", "test_warm_environments", "test_remote", "test_warm", "test_faults", "test_cloud_init"]
# The e2e tests (a module: all of its tests) that run while no other e2e test does, and why: they kill
# sessions whose leftovers any other session's reaper would remove first, or read what --ost-cleanup finds
# on the host. Under xdist they are the run's first unit of work, one after the other on one worker, which
# holds its turn from the first to the last of them while the other worker runs the unit tests: no long
# test is then running for an exclusive one to wait for, nor the other worker left waiting meanwhile.
EXCLUSIVE = {
    "tests/e2e/test_lab.py": ".ci/lab's down runs --ost-cleanup",
    "tests/e2e/test_interrupts.py::test_sigkill_leftovers_are_reaped": "its leftovers are its next session's to reap",
    "tests/e2e/test_remote.py::test_a_killed_client_session_is_reaped_by_the_clients_next_one":
        "its leftovers are the client's next session's to reap",
    "tests/e2e/test_shared_host.py::test_another_users_kept_vms_survive_cleanup_and_other_sessions":
        "--ost-cleanup of the default work root: what it finds on the host",
}


def exclusive(nodeid: str) -> bool:
    test = nodeid.split("[", 1)[0]
    return test in EXCLUSIVE or test.split("::", 1)[0] in EXCLUSIVE


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    e2e = {item for item in items if Path(__file__).parent in Path(item.path).parents}
    modules = {}
    for item in e2e:
        item.add_marker(pytest.mark.e2e)
        modules[item.nodeid.split("::", 1)[0]] = item.module
    for entry in EXCLUSIVE:  # a renamed test would silently run beside the others
        path, _, name = entry.partition("::")
        if path in modules and name and not hasattr(modules[path], name):
            raise pytest.UsageError(f"EXCLUSIVE in {__file__} names {entry}, which {path} does not define")
    if not WORKER:
        return

    def order(item: pytest.Item) -> tuple[int, int]:
        if exclusive(item.nodeid):
            return (0, 0)
        if item not in e2e:  # beside the exclusive tests, which no other e2e test can run beside
            return (1, 0)
        module = Path(item.path).stem
        return (2, LONGEST.index(module)) if module in LONGEST else (3, 0)

    items.sort(key=order)  # stable: modules and tests otherwise as collected


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the order of pytest_collection_modifyitems, not by test count

    class Modules(LoadScopeScheduling):
        """Units of work: the exclusive tests, an e2e module, the session environment's modules, a unit test."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if not path.startswith("tests/e2e/"):
                return nodeid
            if exclusive(nodeid):
                return "exclusive"
            return "session-environment" if Path(path).stem in SESSION_ENVIRONMENT else path

    return Modules(config, log)


class Turn:
    """This worker's turn among the e2e tests of every run on the host: a readers-writer lock across
    processes. `gate` lets no new test in while an exclusive one waits (flock alone would let the others'
    next tests overtake it for ever), `room` holds the tests running. An exclusive turn is kept from one
    exclusive test to the next of this worker, so that no other test starts in between."""

    held: Optional[contextlib.ExitStack] = None

    @classmethod
    def take(cls, alone: bool) -> None:
        if cls.held is not None:  # kept by the exclusive test before
            return
        LOCKS.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            gate, room = (stack.enter_context(open(LOCKS / name, "a")) for name in ("gate", "room"))
            if alone:
                fcntl.flock(gate, fcntl.LOCK_EX)
                fcntl.flock(room, fcntl.LOCK_EX)
            else:
                fcntl.flock(gate, fcntl.LOCK_SH)
                fcntl.flock(room, fcntl.LOCK_SH)
                fcntl.flock(gate, fcntl.LOCK_UN)
            cls.held = stack.pop_all()

    @classmethod
    def end(cls) -> None:
        if cls.held is not None:
            cls.held.close()  # closing the files releases their locks
            cls.held = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Iterator[None]:
    """Under xdist, an exclusive e2e test runs alone; the others run side by side. The turn spans the
    test's whole protocol: module fixtures set up or torn down with it too."""
    if not WORKER or not item.get_closest_marker("e2e"):
        return (yield)
    alone = exclusive(item.nodeid)
    Turn.take(alone)
    try:
        return (yield)
    finally:
        if not (alone and nextitem is not None and exclusive(nextitem.nodeid)):
            Turn.end()


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
