"""The /dev/kvm check of the report header, on a qemu.conf and a /dev/kvm stand-in of the
test's own. The stand-in is a regular file owned by whoever runs the tests; the qemu user
is a numeric id with no passwd entry, so only the stand-in's mode decides."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from typing import Callable

import pytest

from pytest_ostimages.hypervisor import kvm_access
from pytest_ostimages.hypervisor.kvm_access import QemuUser, can_open


def unused_id(lookup: Callable[[int], object]) -> int:
    """An id that no passwd/group entry has (and that is not the test runner's)."""
    for candidate in range(54321, 65000):
        try:
            lookup(candidate)
        except KeyError:
            if candidate not in (os.getuid(), os.getgid()):
                return candidate
    raise LookupError("no unused id")


QEMU_UID = unused_id(pwd.getpwuid)
QEMU_GID = unused_id(grp.getgrgid)


@pytest.fixture
def kvm(tmp_path: Path) -> Callable[[int], Path]:
    """A /dev/kvm stand-in with the given mode, owned by the test runner."""
    def make(mode: int) -> Path:
        path = tmp_path / "kvm"
        path.touch()
        path.chmod(mode)
        return path
    return make


@pytest.fixture
def conf(tmp_path: Path) -> Callable[[str], Path]:
    """A qemu.conf with the given text."""
    def make(text: str) -> Path:
        path = tmp_path / "qemu.conf"
        path.write_text(text)
        return path
    return make


# --- the permission rule ---------------------------------------------------------


@pytest.mark.parametrize("mode, uid, gids, expected", [
    (0o600, 0, [0], True),             # root opens anything
    (0o000, 0, [], True),
    (0o600, 500, [500], True),         # owner bits
    (0o400, 500, [500], False),        # read is not enough: qemu opens O_RDWR
    (0o060, 500, [36], False),         # the owner bits apply to the owner, even if the group could
    (0o660, 600, [36], True),          # group bits through the node's group
    (0o660, 600, [600, 36], True),     # ... a supplementary one too
    (0o640, 600, [36], False),
    (0o660, 600, [600], False),        # neither owner nor group: other bits
    (0o666, 600, [600], True),
    (0o606, 600, [36], False),         # in the group, so the other bits do not apply
])
def test_can_open(mode: int, uid: int, gids: list[int], expected: bool) -> None:
    assert can_open(0o20000 | mode, 500, 36, uid, gids) is expected  # a char device owned 500:36


# --- qemu.conf -------------------------------------------------------------------


def test_parse_qemu_conf_set_commented_and_numeric() -> None:
    assert kvm_access.parse_qemu_conf('user = "libvirt-qemu"\ngroup = "kvm"\n') == ("libvirt-qemu", "kvm")
    assert kvm_access.parse_qemu_conf('#user = "libvirt-qemu"\n# group = "kvm"\n') == (None, None)
    assert kvm_access.parse_qemu_conf("  user='+64055'  # numeric\ngroup=\"+107\"\n") == ("+64055", "+107")
    assert kvm_access.parse_qemu_conf('#user = "root"\nuser = "qemu"\n') == ("qemu", None)
    assert kvm_access.parse_qemu_conf('dynamic_ownership = 1\nuser_namespace = "x"\n') == (None, None)


def test_qemu_user_by_name(conf) -> None:
    me = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(os.getgid()).gr_name
    user = kvm_access.qemu_user(conf(f'user = "{me.pw_name}"\ngroup = "{group}"\n'))
    assert (user.name, user.uid) == (me.pw_name, me.pw_uid)
    assert os.getgid() in user.gids and me.pw_gid in user.gids


def test_qemu_user_by_numeric_id_without_passwd_entry(conf) -> None:
    user = kvm_access.qemu_user(conf(f'user = "+{QEMU_UID}"\ngroup = "+{QEMU_GID}"\n'))
    assert user == QemuUser(f"+{QEMU_UID}", QEMU_UID, frozenset({QEMU_GID}))


def test_missing_qemu_conf_means_the_packaged_default(tmp_path: Path) -> None:
    try:
        default = kvm_access.resolve_user(None, None)
    except KeyError:
        pytest.skip("neither libvirt-qemu nor qemu exists here")
    assert default.name in kvm_access.DEFAULT_USERS
    assert kvm_access.qemu_user(tmp_path / "missing.conf") == default


# --- the warning -----------------------------------------------------------------


def test_warning_when_the_qemu_user_cannot_open_kvm(conf, kvm) -> None:
    qemu_conf = conf(f'# user = "root"\nuser = "+{QEMU_UID}"\ngroup = "+{QEMU_GID}"\n')
    node = kvm(0o600)
    text = kvm_access.warning("qemu:///system", qemu_conf, node)
    assert text is not None
    assert text.startswith(f"WARNING: libvirt's qemu user +{QEMU_UID} cannot open {node} (")
    assert " 0600): libvirt then re-probes QEMU at every call (about 4 s each" in text
    assert f"Fix: chgrp kvm {node} && chmod 0660 {node}" in text
    assert text.endswith("then restart libvirtd.")
    assert kvm_access.warning("qemu+unix:///system", qemu_conf, node) == text


def test_group_fix_is_offered_unless_the_group_is_roots(conf, kvm) -> None:
    text = kvm_access.warning("qemu:///system", conf(f'user = "+{QEMU_UID}"\ngroup = "+{QEMU_GID}"\n'),
                              kvm(0o660))
    assert text is not None
    assert (f"or add +{QEMU_UID} to group " in text) is (os.getgid() != 0)


@pytest.mark.parametrize("mode", [0o660, 0o666], ids=oct)
def test_no_warning_when_the_qemu_users_group_can_open_kvm(conf, kvm, mode: int) -> None:
    # the qemu user's group is the stand-in's group: 0660 is what udev gives /dev/kvm
    qemu_conf = conf(f'user = "+{QEMU_UID}"\ngroup = "+{os.getgid()}"\n')
    assert kvm_access.warning("qemu:///system", qemu_conf, kvm(mode)) is None


def test_no_warning_when_everyone_can_open_kvm(conf, kvm) -> None:
    qemu_conf = conf(f'user = "+{QEMU_UID}"\ngroup = "+{QEMU_GID}"\n')
    assert kvm_access.warning("qemu:///system", qemu_conf, kvm(0o606)) is None


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o606], ids=oct)
def test_warning_when_the_qemu_users_group_cannot_write(conf, kvm, mode: int) -> None:
    qemu_conf = conf(f'user = "+{QEMU_UID}"\ngroup = "+{os.getgid()}"\n')
    assert kvm_access.warning("qemu:///system", qemu_conf, kvm(mode)) is not None


@pytest.mark.parametrize("uri", ["test:///default", "qemu:///session", "qemu+ssh://root@lab1/system",
                                 "qemu://lab1/system", "qemu+tcp://lab1/system"])
def test_no_warning_for_other_hypervisors(conf, kvm, uri: str) -> None:
    qemu_conf = conf(f'user = "+{QEMU_UID}"\ngroup = "+{QEMU_GID}"\n')
    assert kvm_access.warning(uri, qemu_conf, kvm(0o600)) is None


def test_no_warning_without_kvm(conf, tmp_path: Path) -> None:
    qemu_conf = conf(f'user = "+{QEMU_UID}"\ngroup = "+{QEMU_GID}"\n')
    assert kvm_access.warning("qemu:///system", qemu_conf, tmp_path / "no-kvm") is None


@pytest.mark.parametrize("text", ['user = "no-such-user-ost"\n', 'user = "+0"\ngroup = "no-such-group-ost"\n',
                                  'user = "+abc"\n'])
def test_no_warning_when_the_qemu_user_is_unknown(conf, kvm, text: str) -> None:
    assert kvm_access.warning("qemu:///system", conf(text), kvm(0o600)) is None


def test_no_warning_when_qemu_conf_cannot_be_read(tmp_path: Path, kvm) -> None:
    unreadable = tmp_path / "qemu.conf"
    unreadable.mkdir()  # reading it fails with an OSError, even as root
    assert kvm_access.warning("qemu:///system", unreadable, kvm(0o600)) is None


def test_header_has_no_warning_for_the_test_driver(pytester: pytest.Pytester, images_dir: Path) -> None:
    result = pytester.runpytest_inprocess(f"--ost-images-dir={images_dir}",
                                          "--ost-libvirt-uri=test:///default")
    result.stdout.fnmatch_lines(["ost-images: *libvirt test:///default*"])
    result.stdout.no_fnmatch_line("*cannot open*")
