"""pytest-ostimages: the pytest entry point (options, hooks and fixtures).

How ``pytest --ost-image=engine-installed`` becomes a booted VM:

1. :func:`pytest_configure` resolves the options into an :class:`OstConfig`.
2. :func:`pytest_collection_modifyitems` (after deselection) plans the VMs the
   selected tests use, so that all of them are booted together.
3. The ``ost_vm`` fixture asks the session's :class:`~pytest_ostimages.lab.Lab`,
   which finds the layer (catalog.py), makes an overlay (overlay.py), renders
   the network and domain XML (render.py), creates them (virt.py) and waits
   for SSH (ssh.py), handing back a :class:`~pytest_ostimages.vm.VM`.
4. At the end of the session the lab removes everything it made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest

from . import config as ostconfig
from . import diagnostics, initconfig, reaper, reuse, virt
from .catalog import Catalog
from .config import OstConfig
from .errors import BootError, OstError, SSHCommandError, VMError
from .inputs import VMSpec
from .inside import InsideRun
from .lab import Lab, Network
from .layers import LayerRecipe, build_layer
from .ost import OstSuite
from .plan import Plan, vm_fixture_specs
from .provision import finish, provision
from .seed import UserData
from .share import Share
from .vm import VM
from .warm import WarmCache

log = logging.getLogger("pytest_ostimages")

CONFIG_KEY = pytest.StashKey[OstConfig]()
PLAN_KEY = pytest.StashKey[Plan]()
LAB_KEY = pytest.StashKey[Lab]()
SHARE_KEY = pytest.StashKey[Optional[Share]]()
CATALOG_KEY = pytest.StashKey[Catalog]()  # found for the report header, reused by the lab
REUSE_KEY = pytest.StashKey[list[VMSpec]]()  # the VMs to keep for --ost-reuse
FAILED_KEY = pytest.StashKey[str]()  # the input error that makes every VM of the session impossible
ITEM_KEY = pytest.StashKey[pytest.Item]()  # the test being set up (xdist workers plan per test)


def pytest_addoption(parser: pytest.Parser) -> None:
    ostconfig.add_options(parser)
    parser.getgroup("ostimages").addoption(
        "--ost-cleanup", action="store_true", default=False,
        help="remove every leftover of the plugin whose run is gone (VMs, networks, work "
             "directories), the VMs kept by --ost-reuse too, then exit without running tests")
    parser.getgroup("ostimages").addoption(
        "--ost-warm-cache", action="store_true", default=False,
        help="with --ost-cleanup: also remove the saved states of warm start (--ost-warm)")


def pytest_cmdline_main(config: pytest.Config) -> Optional[int]:
    if not config.getoption("ost_cleanup"):
        return None
    settings = ostconfig.from_pytest(config)
    try:
        conn = virt.connect(settings.libvirt_uri)
        try:
            reuse.forget(settings.workdir)  # the kept VMs are leftovers too now
            leftovers = reaper.reap(conn, settings.workdir)
        finally:
            conn.close()
    except OstError as exc:
        print(f"ERROR: {exc}")
        return int(pytest.ExitCode.USAGE_ERROR)
    for leftover in leftovers:
        print(f"removed {leftover}")
    if config.getoption("ost_warm_cache"):
        for key in WarmCache(settings.workdir / "warm", 0).clear():
            print(f"removed saved state {key}")
    print(f"pytest-ostimages: removed {len(leftovers)} leftovers at {settings.libvirt_uri} "
          f"and in {settings.workdir}")
    return int(pytest.ExitCode.OK)


def pytest_configure(config: pytest.Config) -> None:
    settings = config.stash[CONFIG_KEY] = ostconfig.from_pytest(config)
    if settings.run_inside is not None and not hasattr(config, "workerinput"):
        if config.getoption("numprocesses", None):
            raise pytest.UsageError("--ost-run-inside runs the tests in one VM; drop -n/--numprocesses.")
        value_options = {s.option for s in ostconfig.SETTINGS if not s.flag}
        config.pluginmanager.register(InsideRun(config, settings, _progress(config), value_options),
                                      "ostimages-inside")
    if settings.init_config is not None:
        config.pluginmanager.register(_ost_suite(config, settings), "ostimages-ost")
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so fixtures tear down.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, _interrupt)


def _ost_suite(config: pytest.Config, settings: OstConfig) -> OstSuite:
    """--ost-init-config: the topology, checked now; booted once the tests are collected."""
    assert settings.init_config is not None
    if settings.run_inside:
        raise pytest.UsageError("--ost-init-config cannot be combined with --ost-run-inside (yet): "
                                "run the OST suite without it.")
    root = (settings.root or config.rootpath).resolve()  # exported as $OST_REPO_ROOT
    try:
        topology = initconfig.load(settings.init_config, root, settings.images_dir, os.environ, settings.suite)
    except OstError as exc:
        raise pytest.UsageError(str(exc)) from None
    # --ost-memory/--ost-vcpus given explicitly win over the file (small VMs in CI)
    topology = dataclasses.replace(topology, vms=tuple(
        dataclasses.replace(vm, memory=None if "memory" in settings.given else vm.memory,
                            vcpus=None if "vcpus" in settings.given else vm.vcpus) for vm in topology.vms))
    return OstSuite(config, topology, root, lambda: _make_lab(config), _reusing(config))


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGTERM) is _interrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash[CONFIG_KEY]
    try:
        catalog = Catalog.discover(settings.images_dir)
    except OSError as exc:  # the header must never stop a run; the fixtures will explain
        return [f"ost-images: cannot read {settings.images_dir}: {exc.strerror}"]
    config.stash[CATALOG_KEY] = catalog  # the session's lab uses it: one RPM query per run
    return diagnostics.header_lines(settings, catalog)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that used VMs gets their console and journal tails in its report."""
    report = yield
    lab = item.config.stash.get(LAB_KEY, None)
    # Only for a failing test body: a failed boot already says what the console showed.
    # An OST suite's tests use every VM, through fixtures of their own.
    if (report.when == "call" and report.failed and lab is not None and lab.vms
            and ("ost_lab" in getattr(item, "fixturenames", ()) or lab.ost is not None)):
        for title, text in diagnostics.vm_sections(lab.vms.values()):
            report.sections.append((title, text))
    return report


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have removed their items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[PLAN_KEY] = Plan.of(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    item.config.stash[ITEM_KEY] = item
    return (yield)


def _planned(config: pytest.Config) -> list[VMSpec]:
    """The VMs to boot together: for every selected test, or (an xdist worker that
    does not share) for the test being set up: the others may run elsewhere."""
    plan = config.stash.get(PLAN_KEY, Plan())
    settings = config.stash[CONFIG_KEY]
    if hasattr(config, "workerinput") and not settings.share and ITEM_KEY in config.stash:
        return plan.specs(settings, [config.stash[ITEM_KEY]])
    return plan.specs(settings)


@contextlib.contextmanager
def user_errors(config: pytest.Config, session: pytest.Session) -> Iterator[None]:
    """Report an OstError as a short failure, without the plugin's traceback.

    An input error (images, key, templates, libvirt) makes every VM of the session
    impossible: it is reported in full once and stops the session.
    """
    if FAILED_KEY in config.stash:
        pytest.fail(f"pytest-ostimages cannot boot VMs in this session: {config.stash[FAILED_KEY]} "
                    f"(reported in full above)", pytrace=False)
    try:
        yield
    except (BootError, VMError, SSHCommandError) as exc:  # this VM's trouble, not the session's
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    except OstError as exc:
        first_line = str(exc).splitlines()[0]
        config.stash[FAILED_KEY] = first_line
        session.shouldstop = f"pytest-ostimages: {first_line}"
        # "from None": the plugin's own exception would only repeat the message
        raise pytest.fail.Exception(str(exc), pytrace=False) from None


def _progress(config: pytest.Config) -> Callable[[str], None]:
    """Live lines on the terminal (not with -q), always in the log."""
    lock = threading.Lock()  # boots report from one thread per VM

    def report(message: str) -> None:
        log.info(message)
        # looked up now: made before pytest's own plugins are configured, they may be missing then
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or config.get_verbosity() < 0:
            return
        with lock:
            # fixtures run with output captured; progress is for the person waiting
            suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
            with suspended:
                reporter.write_line(f"[ost] {message}")

    return report


def _make_lab(config: pytest.Config) -> tuple[Lab, Optional[Share]]:
    """The session's lab, and the environment it shares with the other xdist workers (--ost-share)."""
    settings = config.stash[CONFIG_KEY]
    worker = getattr(config, "workerinput", None)  # set by pytest-xdist in its workers
    share = None
    if settings.share and worker is not None:
        # what the tmp_path_factory fixture returns (an OST suite's lab is made before fixtures);
        # its parent is shared by the workers of this run
        base = config._tmp_path_factory.getbasetemp().parent  # type: ignore[attr-defined]
        share = Share(base / f"ost-share-{worker['testrunuid']}")
    # A shared environment belongs to the xdist controller, which outlives every worker.
    lab = Lab(settings, _progress(config), owner_pid=os.getppid() if share else None,
              catalog=config.stash.get(CATALOG_KEY, None))
    config.stash[LAB_KEY] = lab
    config.stash[SHARE_KEY] = share
    return lab, share


def _reusing(config: pytest.Config) -> bool:
    """--ost-reuse, which xdist workers ignore: they would take each other's kept VMs."""
    return config.stash[CONFIG_KEY].reuse and not hasattr(config, "workerinput")


# --- fixtures -------------------------------------------------------------------------


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
    lab, share = _make_lab(pytestconfig)
    try:
        yield lab
    finally:
        del pytestconfig.stash[LAB_KEY]
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
        unique = [s for s in _planned(config) if s.role not in ost_lab.vms]
        if unique:
            ost_lab.inputs.check(unique)  # every input of the plan, before anything is made
        share = config.stash.get(SHARE_KEY, None)
        if share is not None or unique:
            reusing = _reusing(config)
            if reusing:
                config.stash[REUSE_KEY] = unique
            provision(ost_lab, unique, lambda: ost_lab.boot(unique), share, reusing)
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
        role = role or f"vm{len(self._lab.vms)}"
        return self.many([VMSpec(role, image, memory, vcpus, user_data=user_data)])[0]

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
    return pytest.fixture(scope="session", name=name or role)(vm_fixture_specs(the_vm, lambda _: [spec]))


def vm_group_fixture(prefix: str, image: str, *, name: str,
                     count: Optional[int] = None) -> Any:
    """A session fixture with a list of VMs ``<prefix>0..N-1`` (N: `count` or --ost-hosts)."""

    def specs(config: OstConfig) -> list[VMSpec]:
        return [VMSpec(f"{prefix}{i}", image) for i in range(count if count is not None else config.hosts)]

    def the_vms(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab) -> list[VM]:
        return _booted(request, ost_vms, ost_lab, specs(ost_lab.config))

    the_vms.__doc__ = f"VMs {prefix}0.. from {image!r} (session scope, list of :class:`VM`)."
    return pytest.fixture(scope="session", name=name)(vm_fixture_specs(the_vms, specs))


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
    saved in a snapshot; each later test gets it reverted to that snapshot, which
    takes seconds instead of a boot. `image` defaults to ``--ost-image``, else base.
    Not with --ost-share: a revert would pull the VM from under the other workers.
    """

    def specs(config: OstConfig) -> list[VMSpec]:
        return [VMSpec(role, image or config.image or "base")]

    def clean(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
        if request.config.stash.get(SHARE_KEY, None) is not None:
            pytest.fail(f"{name or role + '_vm'} reverts its VM before every test, which would "
                        f"revert it under the other xdist workers that share it (--ost-share). "
                        f"Run the tests that use it without --ost-share.", pytrace=False)
        vm = _booted(request, ost_vms, ost_lab, specs(ost_lab.config))[0]
        if vm.dirty is None:  # first use: save the just-booted state
            ost_lab.progress(f"{role}: clean state saved in {vm.snapshot():.1f} s")
        elif vm.dirty:
            log.info("%s: reverted to its clean state in %.1f s", role, vm.revert())
        vm.dirty = True
        return vm

    clean.__doc__ = f"VM {role!r}, reverted to its just-booted state for each test (function scope, :class:`VM`)."
    return pytest.fixture(name=name or f"{role}_vm")(vm_fixture_specs(clean, specs))


def _ost_vm_specs(config: OstConfig) -> list[VMSpec]:
    return [VMSpec("vm", config.image)] if config.image else []


def ost_vm(request: pytest.FixtureRequest, ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
    """A VM from ``--ost-image=LAYER`` (session scope, :class:`VM`)."""
    if ost_lab.config.image is None:
        pytest.fail("The ost_vm fixture boots the image given with --ost-image=LAYER "
                    "(a layer such as engine-installed, or a qcow2 path); none was given.",
                    pytrace=False)
    return _booted(request, ost_vms, ost_lab, _ost_vm_specs(ost_lab.config))[0]


ost_vm = pytest.fixture(scope="session")(vm_fixture_specs(ost_vm, _ost_vm_specs))

# Default fixtures, as an OST suite expects them. A suite redefines any of them
# in its conftest.py with the same factories.
engine = vm_fixture("engine", "engine-installed")
hosts = vm_group_fixture("host", "host-installed", name="hosts")
host0 = vm_member_fixture("hosts", 0)
host1 = vm_member_fixture("hosts", 1)
clean_vm = clean_vm_fixture("clean")
