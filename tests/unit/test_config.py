"""Settings: precedence, parsing and the messages of bad values."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from pytest_ostimages.config import OstConfig, PerRole, resolve


def resolved(cli: Optional[dict] = None, ini: Optional[dict] = None, env: Optional[dict] = None) -> OstConfig:
    return resolve((cli or {}).get, (ini or {}).get, env or {})


def test_defaults() -> None:
    config = resolved()
    assert config == OstConfig()
    assert config.images_dir == Path("/usr/share/ost-images")
    assert (config.virt_type, config.hosts, config.boot_timeout) == ("auto", 2, 600.0)


def test_precedence_command_line_over_ini_over_environment() -> None:
    env = {"OST_HOSTS": "5", "OST_VIRT_TYPE": "qemu", "OST_DISTRO": "el9stream"}
    ini = {"ost_hosts": "4", "ost_virt_type": "kvm"}
    cli = {"ost_hosts": "3"}
    config = resolved(cli, ini, env)
    assert (config.hosts, config.virt_type, config.distro) == (3, "kvm", "el9stream")


def test_zero_is_a_value_not_unset() -> None:
    assert resolved(cli={"ost_hosts": "0"}, env={"OST_HOSTS": "3"}).hosts == 0


def test_per_role_numbers() -> None:
    memory = resolved(cli={"ost_memory": "1024,engine=4096,host1=3000"}).memory
    assert memory == PerRole(1024, {"engine": 4096, "host1": 3000})
    assert [memory.for_role(r) for r in ("engine", "host0", "host1", "vm")] == [4096, 1024, 3000, 1024]
    # only role overrides: the other roles keep the default
    assert resolved(ini={"ost_vcpus": "engine=4"}).vcpus.for_role("host0") == 2


@pytest.mark.parametrize("source", ["cli", "ini", "env"])
@pytest.mark.parametrize("name, raw, expected", [
    ("boot_timeout", "soon", "expected a number of seconds"),
    ("hosts", "two", "expected a whole number"),
    ("virt_type", "xen", "expected one of auto, kvm, qemu"),
    ("memory", "lots", "'lots' is not a number"),
    ("subnet_pool", "192.168.1.0/28", "expected a prefix of /24 or larger"),
    ("keep", "maybe", "expected true or false"),
])
def test_bad_values_name_their_source(source: str, name: str, raw: str, expected: str) -> None:
    where = {"cli": f"--ost-{name.replace('_', '-')}", "ini": f"ini ost_{name}",
             "env": f"$OST_{name.upper()}"}[source]
    key = f"OST_{name.upper()}" if source == "env" else f"ost_{name}"
    with pytest.raises(pytest.UsageError) as err:
        resolved(**{source: {key: raw}})
    assert str(err.value).startswith(f"{where}={raw!r}: {expected}")


def test_command_line_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--ost-virt-type=xen")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --ost-virt-type='xen': expected one of auto, kvm, qemu"])


def test_ini_and_environment_reach_the_fixture(pytester: pytest.Pytester,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nost_hosts = 4\nost_memory = 512,engine=1024\n")
    monkeypatch.setenv("OST_HOSTS", "9")
    monkeypatch.setenv("OST_DISTRO", "from-env")
    pytester.makepyfile("""
        def test_config(ost_config):
            assert ost_config.hosts == 4
            assert ost_config.distro == "from-env"
            assert ost_config.memory.for_role("engine") == 1024
    """)
    pytester.runpytest().assert_outcomes(passed=1)


def test_help_works_without_libvirt(pytester: pytest.Pytester) -> None:
    # the binding is imported lazily: block it and --help still lists our options
    pytester.makeconftest("import sys\nsys.modules['libvirt'] = None\n")
    result = pytester.runpytest("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*--ost-image=IMAGE*", "*--ost-virt-type=VIRT_TYPE*"])
