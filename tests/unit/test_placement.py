"""Several hypervisors: sessions and xdist workers placed by free capacity, not by position."""

from __future__ import annotations

import pytest

from pytest_ostimages.config import resolve
from pytest_ostimages.lab.placement import Capacity, choose


def test_a_list_of_uris_is_every_hypervisor_and_the_first_until_placed() -> None:
    config = resolve(lambda name: "qemu+ssh://root@a/system, qemu+ssh://root@b/system" if name == "ost_libvirt_uri"
                     else None, lambda _: None, {})
    assert config.hypervisors == ("qemu+ssh://root@a/system", "qemu+ssh://root@b/system")
    assert config.libvirt_uri == "qemu+ssh://root@a/system"
    ini_list = resolve(lambda _: None, lambda name: "qemu:///system\nqemu+ssh://h/system" if name == "ost_libvirt_uri"
                       else None, {})
    assert ini_list.hypervisors == ("qemu:///system", "qemu+ssh://h/system")


def test_not_a_uri_is_a_usage_error() -> None:
    with pytest.raises(pytest.UsageError, match="'host-a' is not a libvirt URI"):
        resolve(lambda name: "qemu:///system,host-a" if name == "ost_libvirt_uri" else None, lambda _: None, {})


def test_workers_go_where_there_is_room() -> None:
    small, big = Capacity("qemu+ssh://small/system", 3000, 2), Capacity("qemu+ssh://big/system", 9000, 2)
    placed: dict[str, list[int]] = {}
    order = []
    for _ in range(4):  # each worker needs 2048 MiB
        uri = choose([small, big], placed, 2048)
        order.append(uri.split("/")[2])
        mib, sessions = placed.get(uri, [0, 0])
        placed[uri] = [mib + 2048, sessions + 1]
    # spread by free boot slots (CPUs + 1) where the memory fits, the one with more memory first; the
    # small one has room for one worker only, and the big one takes the rest
    assert order == ["big", "small", "big", "big"]


def test_the_first_listed_wins_a_tie() -> None:
    a, b = Capacity("qemu+ssh://a/system", 8000, 4), Capacity("qemu+ssh://b/system", 8000, 4)
    assert choose([a, b], {}, 1024) == a.uri and choose([b, a], {}, 1024) == b.uri
