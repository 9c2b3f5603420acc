"""The plugin's fixtures, and the factories a suite uses to declare its own VM fixtures.

The default fixtures at the bottom are made by the same factories a suite's
conftest.py uses (``engine = vm_fixture("engine", "engine-installed")``), so a suite
declares its own variant in one line. Every VM fixture carries the VMs it needs
(lab/plan.py), so that the VMs of a session's selected tests boot together.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pytest

from .images.catalog import Catalog
from .config import OstConfig
from .guest.seed import UserData
from .guest.vm import VM
from .lab.inputs import VMSpec
from .lab.lab import Lab
from .lab.networks import Network
from .lab.chain import boot_reached
from .lab.plan import Plan, vm_fixture_specs
from .lab.provision import finish, provision
from .layers import LayerRecipe, build_layer
from .session import (CONFIG_KEY, LAB_KEY, PLAN_KEY, REUSE_KEY, SHARE_KEY, make_lab, planned, reusing,
                      user_errors)

log = logging.getLogger("pytest_ostimages")


@pytest.fixture(scope="session")
def ost_config(pytestconfig: pytest.Config) -> OstConfig:
    """The resolved settings (session scope, :class:`OstConfig`)."""
    return pytestconfig.stash[CONFIG_KEY]


@pytest.fixture(scope="session")
def ost_lab(request: pytest.FixtureRequest, pytestconfig: pytest.Config, ost_config: OstConfig) -> Iterator[Lab]:
    """The session's lab; everything it makes is removed when the session ends."""
    booted = pytestconfig.stash.get(LAB_KEY, None)
    if booted is not None:  # an OST suite's, booted after collection and removed at the end
        yield booted
        return
    with user_errors(pytestconfig, request.session):
        lab, share = make_lab(pytestconfig)  # a hypervisor that is down or lacks the images says so here
    try:
        yield lab
    finally:
        del pytestconfig.stash[LAB_KEY]
        with user_errors(pytestconfig, request.session, teardown=True):
            finish(lab, share, pytestconfig.stash.get(REUSE_KEY, None),
                   ost_config.artifacts if request.session.testsfailed else None)


@pytest.fixture(scope="session")
def ost_images(ost_lab: Lab) -> Catalog:
    """The installed ost-images (session scope, :class:`Catalog`)."""
    return ost_lab.inputs.catalog


@pytest.fixture(scope="session")
def ost_network(request: pytest.FixtureRequest, ost_lab: Lab) -> Network:
    """The session's management network (session scope, :class:`Network`)."""
    with user_errors(request.config, request.session):
        return ost_lab.ensure_network()


@pytest.fixture(scope="session")
def ost_vms(request: pytest.FixtureRequest, ost_lab: Lab) -> dict[str, VM]:
    """Every VM the selected tests use, booted together (session scope, role -> VM)."""
    config = request.config
    with user_errors(config, request.session):
        # one spec per role, leaving out roles already booted (e.g. by ost_vm_factory)
        unique = [s for s in planned(config) if s.role not in ost_lab.vms]
        if unique:
            ost_lab.inputs.check(unique)  # every input of the plan, before anything is made
        share = config.stash.get(SHARE_KEY, None)
        if share is not None or unique:
            # in the deepest checkpoint state the first test reaches, if saved: nothing boots then
            chain = config.stash.get(PLAN_KEY, Plan()).checkpoints

            def boot() -> list[VM]:
                restored = boot_reached(ost_lab, unique, chain)
                return restored if restored is not None else ost_lab.boot(unique)

            provision(ost_lab, unique, boot, share, reusing(config))
            if reusing(config):
                config.stash[REUSE_KEY] = unique  # provisioned whole: kept at the end
    return ost_lab.vms


@pytest.fixture(scope="session")
def ost_ansible_inventory(ost_vms: dict[str, VM], ost_lab: Lab) -> Path:
    """An ansible inventory of the session's VMs (session scope, its path): a group per role
    family (``engine``, ``hosts``, ...), root with the session key, pinned host keys; kept up
    to date as VMs are added. E.g. ``ansible_runner.run(inventory=str(it), host_pattern="hosts",
    module="ping")``."""
    return ost_lab.inventory


class VMFactory:
    """Boot a VM from any layer: ``ost_vm_factory("host-installed", role="extra")``."""

    def __init__(self, lab: Lab, request: pytest.FixtureRequest, shared: bool = False) -> None:
        self._lab = lab
        self._request = request
        self._shared = shared

    def __call__(self, image: str, role: Optional[str] = None, memory: Optional[int] = None,
                 vcpus: Optional[int] = None, user_data: Optional[UserData] = None) -> VM:
        """`user_data`: cloud-config (a dict or text) for a layer with cloud-init."""
        # the first free one: a VM removed before leaves a gap, and a role must be unique
        role = role or next(f"vm{n}" for n in itertools.count() if f"vm{n}" not in self._lab.vms)
        return self.many([VMSpec(role, image, memory, vcpus, user_data=user_data)])[0]

    def remove(self, vm: VM) -> None:
        """Remove a VM before the session ends (one a test booted for itself)."""
        if self._shared:
            pytest.fail("ost_vm_factory cannot remove VMs of an environment shared by xdist workers "
                        "(--ost-share).", pytrace=False)
        with user_errors(self._request.config, self._request.session):
            self._lab.remove_vm(vm)

    def many(self, specs: list[VMSpec]) -> list[VM]:
        """Boot several VMs together."""
        if self._shared:
            pytest.fail("ost_vm_factory cannot add VMs to an environment shared by xdist workers "
                        "(--ost-share). Declare them with vm_fixture() in conftest.py so that they "
                        "boot with the shared environment, or run without --ost-share.",
                        pytrace=False)
        with user_errors(self._request.config, self._request.session):
            return self._lab.boot(specs)


@pytest.fixture(scope="session")
def ost_vm_factory(request: pytest.FixtureRequest, ost_lab: Lab) -> VMFactory:
    """Boots VMs from any layer for the rest of the session (session scope, :class:`VMFactory`)."""
    return VMFactory(ost_lab, request, shared=request.config.stash.get(SHARE_KEY, None) is not None)


class LayerFactory:
    """Build a layer of your own: ``ost_layer_factory("base", "myapp", script=..., files=[...])``.

    Returns the layer's qcow2 path, for ``ost_vm_factory`` or ``vm_fixture``.
    """

    def __init__(self, lab: Lab, request: pytest.FixtureRequest) -> None:
        self._lab = lab
        self._request = request

    def __call__(self, parent: str, name: str, script: Optional[Path] = None,
                 files: Sequence[Path] = (), squash_above: Optional[int] = None) -> str:
        with user_errors(self._request.config, self._request.session):
            return str(build_layer(self._lab.config, LayerRecipe(parent, name, script, tuple(files),
                                                                 squash_above), self._lab.progress))


@pytest.fixture(scope="session")
def ost_layer_factory(request: pytest.FixtureRequest, ost_lab: Lab) -> LayerFactory:
    """Builds custom layers, cached between runs (session scope, :class:`LayerFactory`)."""
    return LayerFactory(ost_lab, request)


def _booted(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab,
            specs: list[VMSpec]) -> list[VM]:
    """The VMs of `specs`, booting any the plan missed (e.g. getfixturevalue)."""
    missing = [s for s in specs if s.role not in ost_vms]
    if missing:
        with user_errors(request.config, request.session):
            ost_lab.boot(missing)
    return [ost_lab.vms[s.role] for s in specs]


def vm_fixture(role: str, image: str, *, name: Optional[str] = None,
               memory: Optional[int] = None, vcpus: Optional[int] = None,
               user_data: Optional[UserData] = None) -> Any:
    """A session fixture with one VM of `image` (a layer or a qcow2 path).

    ``engine = vm_fixture("engine", "engine-installed")`` in a conftest.py gives
    a suite its own variant; the fixture is named `name` (default: `role`).
    `user_data`: cloud-config for a layer with cloud-init (a dict or text).
    """
    spec = VMSpec(role, image, memory, vcpus, user_data=user_data)

    def the_vm(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
        return _booted(request, ost_vms, ost_lab, [spec])[0]

    the_vm.__doc__ = f"VM {role!r} from {image!r} (session scope, :class:`VM`)."
    return vm_fixture_specs(pytest.fixture(scope="session", name=name or role)(the_vm), lambda _: [spec])


def vm_group_fixture(prefix: str, image: str, *, name: str,
                     count: Optional[int] = None) -> Any:
    """A session fixture with a list of VMs ``<prefix>0..N-1`` (N: `count` or --ost-hosts)."""

    def specs(config: OstConfig) -> list[VMSpec]:
        return [VMSpec(f"{prefix}{i}", image) for i in range(count if count is not None else config.hosts)]

    def the_vms(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab) -> list[VM]:
        return _booted(request, ost_vms, ost_lab, specs(ost_lab.config))

    the_vms.__doc__ = f"VMs {prefix}0.. from {image!r} (session scope, list of :class:`VM`)."
    return vm_fixture_specs(pytest.fixture(scope="session", name=name)(the_vms), specs)


def vm_member_fixture(group: str, index: int) -> Any:
    """A session fixture with VM number `index` of the group fixture `group`."""
    name = f"{group.rstrip('s')}{index}"

    def the_vm(**group_fixture: list[VM]) -> VM:
        vms = group_fixture[group]
        if index >= len(vms):
            pytest.fail(f"{name} needs at least {index + 1} {group}, but --ost-hosts is "
                        f"{len(vms)}. Raise it (--ost-hosts={index + 1}).", pytrace=False)
        return vms[index]

    # It asks for the group fixture by name, so the plan boots the group in use.
    the_vm.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(group, inspect.Parameter.KEYWORD_ONLY)])
    the_vm.__doc__ = f"VM number {index} of {group!r} (session scope, :class:`VM`)."
    return pytest.fixture(scope="session", name=name)(the_vm)


def clean_vm_fixture(role: str = "clean", image: Optional[str] = None, *,
                     name: Optional[str] = None) -> Any:
    """A function-scoped fixture: a VM in its just-booted state for every test.

    The VM boots once per session (with the others) and its memory and disk are
    saved once; each later test gets it back in that state, which takes seconds
    instead of a boot. `image` defaults to ``--ost-image``, else base. Not with
    --ost-share: going back would pull the VM from under the other workers.
    """

    def specs(config: OstConfig) -> list[VMSpec]:
        return [VMSpec(role, image or config.image or "base")]

    def clean(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
        if request.config.stash.get(SHARE_KEY, None) is not None:
            pytest.fail(f"{name or role + '_vm'} reverts its VM before every test, which would "
                        f"revert it under the other xdist workers that share it (--ost-share). "
                        f"Run the tests that use it without --ost-share.", pytrace=False)
        vm = _booted(request, ost_vms, ost_lab, specs(ost_lab.config))[0]
        with user_errors(request.config, request.session):
            done = ost_lab.clean(vm)
        (ost_lab.progress if done.startswith("clean state saved") else log.info)(f"{role}: {done}")
        return vm

    clean.__doc__ = f"VM {role!r}, reverted to its just-booted state for each test (function scope, :class:`VM`)."
    return vm_fixture_specs(pytest.fixture(name=name or f"{role}_vm")(clean), specs)


def _ost_vm_specs(config: OstConfig) -> list[VMSpec]:
    return [VMSpec("vm", config.image)] if config.image else []


def ost_vm(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
    """A VM from ``--ost-image=LAYER`` (session scope, :class:`VM`)."""
    if ost_lab.config.image is None:
        pytest.fail("The ost_vm fixture boots the image given with --ost-image=LAYER "
                    "(a layer such as engine-installed, or a qcow2 path); none was given.",
                    pytrace=False)
    return _booted(request, ost_vms, ost_lab, _ost_vm_specs(ost_lab.config))[0]


ost_vm = vm_fixture_specs(pytest.fixture(scope="session")(ost_vm), _ost_vm_specs)

# Default fixtures, as an OST suite expects them. A suite redefines any of them
# in its conftest.py with the same factories.
engine = vm_fixture("engine", "engine-installed")
hosts = vm_group_fixture("host", "host-installed", name="hosts")
host0 = vm_member_fixture("hosts", 0)
host1 = vm_member_fixture("hosts", 1)
clean_vm = clean_vm_fixture("clean")
