"""A shared host: another user's kept VMs are never removed, no secret is readable by other users,
and an interrupt during the end-of-session saves still removes everything."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import INNER, RESTORABLE, libvirt_objects, read_until, scratch_root

VM_TEST = "def test_vm(ost_vm):\n    assert ost_vm.ssh('true').returncode == 0\n"
ANOTHER_USER = 12345  # owns a work root, as a second person on the host would
WARM = Path(RESTORABLE[1].split("=", 1)[1])  # the run's warm cache


def session(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *INNER, "-s", *args], cwd=folder, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=900)


def chown_tree(root: Path, uid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.lchown(path, uid, uid)


@pytest.mark.skipif(os.getuid() != 0, reason="makes a work root of another user (needs root)")
# runs alone: EXCLUSIVE in conftest.py
def test_another_users_kept_vms_survive_cleanup_and_other_sessions(tmp_path: Path, engine_vm_saved: None) -> None:
    (tmp_path / "test_it.py").write_text(VM_TEST)
    (tmp_path / "test_net.py").write_text("def test_net(ost_network):\n    pass\n")
    with scratch_root("ost-theirs-") as theirs, scratch_root("ost-mine-") as mine:
        kept = session(tmp_path, "--ost-image=engine-installed", *RESTORABLE, "--ost-reuse",
                       f"--ost-workdir={theirs}", "test_it.py")
        assert kept.returncode == 0 and "keeping 1 VMs" in kept.stdout, kept.stdout + kept.stderr
        objects = libvirt_objects() - libvirt_objects(os.getpid())
        chown_tree(theirs, ANOTHER_USER)  # from now on another user's work root and kept VMs
        try:
            cleanup = session(tmp_path, "--ost-cleanup")  # the default work root's
            assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
            other = session(tmp_path, f"--ost-workdir={mine}", "test_net.py")  # its reaper runs first
            assert other.returncode == 0, other.stdout + other.stderr
            names = {o.split()[1] for o in objects}
            for output in (cleanup.stdout, other.stdout):
                removed = [line for line in output.splitlines() if "removed" in line]
                assert not [name for name in names if any(name in line for line in removed)], output
            # --ost-cleanup says what it left and why
            for name in names:
                assert f"{name} (run " in cleanup.stdout and "is another user's" in cleanup.stdout, cleanup.stdout
            assert objects <= libvirt_objects()
        finally:
            chown_tree(theirs, os.getuid())
            removed = session(tmp_path, "--ost-cleanup", f"--ost-workdir={theirs}")
            assert removed.returncode == 0, removed.stdout + removed.stderr
        assert not objects & libvirt_objects()


# what may be readable by others in a work directory: names and public keys, no secret
PUBLIC = {"owner.json", "ssh_config", "known_hosts", "inventory", "hosts", "kept.json", "meta.json"}


def readable_by_others(root: Path) -> list[str]:
    """Files of `root` other users may read (beyond PUBLIC) and folders they may list."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode) and mode & stat.S_IROTH:
            found.append(f"{path} (folder {stat.filemode(mode)})")
        elif stat.S_ISREG(mode) and mode & stat.S_IROTH and path.name not in PUBLIC:
            found.append(f"{path} ({stat.filemode(mode)})")
    return found


def test_no_key_guest_memory_or_disk_is_readable_by_other_users(tmp_path: Path) -> None:
    # kept work directory (--ost-keep): overlays, console logs, the key copy, clean_vm's snapshot;
    # warm start: the saved states (memory, disk) of the run's cache that its VMs were restored from, or
    # that it saved them into (the first session of a run that needs them)
    (tmp_path / "test_it.py").write_text(VM_TEST + "\n\ndef test_clean(clean_vm):\n    clean_vm.ssh('true')\n")
    with scratch_root("ost-modes-") as root:
        done = session(tmp_path, "--ost-image=base", "--ost-keep", *RESTORABLE, f"--ost-workdir={root}",
                       "test_it.py")
        assert done.returncode == 0, done.stdout + done.stderr
        [run] = [p for p in root.iterdir() if p.name != "warm"]
        assert {p.suffix for p in run.iterdir()} >= {".qcow2", ".log"}
        # its states (the kept run uses those it was restored from: none goes while the test reads them)
        states = set(re.findall(r"from saved state (\w+) ", done.stdout)) | \
            {Path(folder).name for folder in re.findall(r"state saved for warm starts in .* MiB, (\S+)\)", done.stdout)}
        assert states, done.stdout
        for state in (WARM / key for key in states):
            assert (state / "memory.save").is_file() and (state / "disk.qcow2").is_file()
            assert readable_by_others(state) == []
        assert readable_by_others(root) == []


def test_an_interrupt_during_the_end_of_session_saves_removes_everything(pytester: pytest.Pytester,
                                                                           unchanged: None) -> None:
    pytester.makepyfile("def test_x(ost_vm, clean_vm):\n    pass\n")
    with scratch_root("ost-saves-") as root:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "--ost-image=base", *INNER, "--ost-warm=on",
                                 f"--ost-workdir={root}"], cwd=pytester.path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen = read_until(proc, "saving its ready state for warm starts")  # the session is ending
        proc.send_signal(signal.SIGTERM)
        output = seen + proc.communicate(timeout=120)[0]
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
        assert "[ost] removing the VMs, networks and work directory of run" in output
        assert [p.name for p in root.iterdir()] in ([], ["warm"])
        warm = root / "warm"
        # every state there is whole (saved before the interrupt), none half-saved
        assert not warm.exists() or all((state / "meta.json").is_file() for state in warm.iterdir()), \
            list(warm.rglob("*"))
