"""pytest-ostimages: the pytest entry point (options, hooks and fixtures).

How ``pytest --ost-image=engine-installed`` becomes a booted VM:

1. :func:`pytest_configure` resolves the options into an :class:`OstConfig`.
2. :func:`pytest_collection_modifyitems` notes which VM fixtures the tests use,
   so that all of them are booted together.
3. The ``ost_vm`` fixture asks the session's :class:`~pytest_ostimages.lab.Lab`,
   which finds the layer (catalog.py), makes an overlay (overlay.py), renders
   the network and domain XML (render.py), creates them (virt.py) and waits
   for SSH (ssh.py), handing back a :class:`~pytest_ostimages.vm.VM`.
4. At the end of the session the lab removes everything it made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest

from . import config as ostconfig
from . import diagnostics, reaper, reuse, virt
from .catalog import Catalog
from .config import OstConfig
from .errors import OstError
from .lab import Lab, Network, VMSpec
from .layers import LayerRecipe, build_layer
from .share import Share
from .vm import VM

log = logging.getLogger("pytest_ostimages")

CONFIG_KEY = pytest.StashKey[OstConfig]()
PLAN_KEY = pytest.StashKey[list[str]]()
LAB_KEY = pytest.StashKey[Lab]()
SHARE_KEY = pytest.StashKey[Optional[Share]]()
CATALOG_KEY = pytest.StashKey[Catalog]()  # found for the report header, reused by the lab
REUSE_KEY = pytest.StashKey[list[VMSpec]]()  # the VMs to keep for --ost-reuse

# fixture name -> the VMs it needs, for booting every VM of a session together
VM_FIXTURES: dict[str, Callable[[OstConfig], list[VMSpec]]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    ostconfig.add_options(parser)
    parser.getgroup("ostimages").addoption(
        "--ost-cleanup", action="store_true", default=False,
        help="remove every leftover of the plugin whose run is gone (VMs, networks, work "
             "directories), the VMs kept by --ost-reuse too, then exit without running tests")


def pytest_cmdline_main(config: pytest.Config) -> Optional[int]:
    if not config.getoption("ost_cleanup"):
        return None
    settings = ostconfig.from_pytest(config)
    try:
        conn = virt.connect(settings.libvirt_uri)
        try:
            leftovers = reaper.reap(conn, settings.workdir, kept_too=True)
        finally:
            conn.close()
    except OstError as exc:
        print(f"ERROR: {exc}")
        return int(pytest.ExitCode.USAGE_ERROR)
    for leftover in leftovers:
        print(f"removed {leftover}")
    print(f"pytest-ostimages: removed {len(leftovers)} leftovers at {settings.libvirt_uri} "
          f"and in {settings.workdir}")
    return int(pytest.ExitCode.OK)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[CONFIG_KEY] = ostconfig.from_pytest(config)
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so fixtures tear down.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, _interrupt)


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
    if (report.when == "call" and report.failed and lab is not None and lab.vms
            and "ost_lab" in getattr(item, "fixturenames", ())):
        for title, text in diagnostics.vm_sections(lab.vms.values()):
            report.sections.append((title, text))
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    used = {name for item in items for name in getattr(item, "fixturenames", ())}
    config.stash[PLAN_KEY] = [name for name in VM_FIXTURES if name in used]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report an OstError as a short failure, without the plugin's traceback."""
    try:
        yield
    except OstError as exc:
        # "from None": the plugin's own exception would only repeat the message
        raise pytest.fail.Exception(str(exc), pytrace=False) from None


def _progress(config: pytest.Config) -> Callable[[str], None]:
    """Live lines on the terminal (not with -q), always in the log."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    lock = threading.Lock()  # boots report from one thread per VM

    def report(message: str) -> None:
        log.info(message)
        if reporter is None or config.get_verbosity() < 0:
            return
        with lock:
            # fixtures run with output captured; progress is for the person waiting
            suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
            with suspended:
                reporter.write_line(f"[ost] {message}")

    return report


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ost_config(pytestconfig: pytest.Config) -> OstConfig:
    """The resolved settings (session scope, :class:`OstConfig`)."""
    return pytestconfig.stash[CONFIG_KEY]


@pytest.fixture(scope="session")
def ost_lab(request: pytest.FixtureRequest, pytestconfig: pytest.Config, ost_config: OstConfig,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The session's lab; everything it makes is removed when the session ends."""
    worker = getattr(pytestconfig, "workerinput", None)  # set by pytest-xdist in its workers
    share = None
    if ost_config.share and worker is not None:
        base = tmp_path_factory.getbasetemp().parent  # shared by the workers of this run
        share = Share(base / f"ost-share-{worker['testrunuid']}")
    # A shared environment belongs to the xdist controller, which outlives every worker.
    lab = Lab(ost_config, _progress(pytestconfig), owner_pid=os.getppid() if share else None,
              catalog=pytestconfig.stash.get(CATALOG_KEY, None))
    pytestconfig.stash[LAB_KEY] = lab
    pytestconfig.stash[SHARE_KEY] = share
    try:
        yield lab
    finally:
        session = request.session
        if ost_config.artifacts is not None and session.testsfailed and lab.vms:
            lab.progress(f"artifacts in {diagnostics.collect_artifacts(lab, ost_config.artifacts)}")
        del pytestconfig.stash[LAB_KEY]
        kept_specs = pytestconfig.stash.get(REUSE_KEY, None)
        if share is not None and share.joined:
            share.leave(lab)
        elif kept_specs and lab.vms:
            reuse.keep(lab, kept_specs)
        else:
            lab.close()


@pytest.fixture(scope="session")
def ost_images(ost_lab: Lab) -> Catalog:
    """The installed ost-images (session scope, :class:`Catalog`)."""
    return ost_lab.catalog


@pytest.fixture(scope="session")
def ost_network(ost_lab: Lab) -> Network:
    """The session's management network (session scope, :class:`Network`)."""
    with user_errors():
        return ost_lab.ensure_network()


@pytest.fixture(scope="session")
def ost_vms(pytestconfig: pytest.Config, ost_lab: Lab) -> dict[str, VM]:
    """Every VM the session's tests use, booted together (session scope, role -> VM)."""
    planned = pytestconfig.stash.get(PLAN_KEY, [])
    specs = [spec for name in planned for spec in VM_FIXTURES[name](ost_lab.config)]
    # one spec per role, leaving out roles already booted (e.g. by ost_vm_factory)
    unique = [spec for role, spec in {s.role: s for s in specs}.items() if role not in ost_lab.vms]
    share = pytestconfig.stash.get(SHARE_KEY, None)
    with user_errors():
        if share is not None:
            share.join(ost_lab, unique)
        elif ost_lab.config.reuse and unique and not hasattr(pytestconfig, "workerinput"):
            pytestconfig.stash[REUSE_KEY] = unique
            if not reuse.attach_kept(ost_lab, unique):
                ost_lab.boot(unique)
        elif unique:
            reuse.drop(ost_lab)  # kept VMs nobody reuses now
            ost_lab.boot(unique)
    return ost_lab.vms


class VMFactory:
    """Boot a VM from any layer: ``ost_vm_factory("host-installed", role="extra")``."""

    def __init__(self, lab: Lab, shared: bool = False) -> None:
        self._lab = lab
        self._shared = shared

    def __call__(self, image: str, role: Optional[str] = None, memory: Optional[int] = None,
                 vcpus: Optional[int] = None) -> VM:
        role = role or f"vm{len(self._lab.vms)}"
        return self.many([VMSpec(role, image, memory, vcpus)])[0]

    def many(self, specs: list[VMSpec]) -> list[VM]:
        """Boot several VMs together."""
        if self._shared:
            pytest.fail("ost_vm_factory cannot add VMs to an environment shared by xdist workers "
                        "(--ost-share). Declare them with vm_fixture() in conftest.py so that they "
                        "boot with the shared environment, or run without --ost-share.",
                        pytrace=False)
        with user_errors():
            return self._lab.boot(specs)


@pytest.fixture(scope="session")
def ost_vm_factory(pytestconfig: pytest.Config, ost_lab: Lab) -> VMFactory:
    """Boots VMs from any layer for the rest of the session (session scope, :class:`VMFactory`)."""
    return VMFactory(ost_lab, shared=pytestconfig.stash.get(SHARE_KEY, None) is not None)


class LayerFactory:
    """Build a layer of your own: ``ost_layer_factory("base", "myapp", script=..., files=[...])``.

    Returns the layer's qcow2 path, for ``ost_vm_factory`` or ``vm_fixture``.
    """

    def __init__(self, lab: Lab) -> None:
        self._lab = lab

    def __call__(self, parent: str, name: str, script: Optional[Path] = None,
                 files: Sequence[Path] = (), squash_above: Optional[int] = None) -> str:
        with user_errors():
            return str(build_layer(self._lab.config, LayerRecipe(parent, name, script, tuple(files),
                                                                 squash_above), self._lab.progress))


@pytest.fixture(scope="session")
def ost_layer_factory(ost_lab: Lab) -> LayerFactory:
    """Builds custom layers, cached between runs (session scope, :class:`LayerFactory`)."""
    return LayerFactory(ost_lab)


def _booted(ost_vms: dict[str, VM], ost_lab: Lab, specs: list[VMSpec]) -> list[VM]:
    """The VMs of `specs`, booting any the plan missed (e.g. getfixturevalue)."""
    missing = [s for s in specs if s.role not in ost_vms]
    if missing:
        with user_errors():
            ost_lab.boot(missing)
    return [ost_lab.vms[s.role] for s in specs]


def vm_fixture(role: str, image: str, *, name: Optional[str] = None,
               memory: Optional[int] = None, vcpus: Optional[int] = None) -> Any:
    """A session fixture with one VM of `image` (a layer or a qcow2 path).

    ``engine = vm_fixture("engine", "engine-installed")`` in a conftest.py gives
    a suite its own variant; the fixture is named `name` (default: `role`).
    """
    fixture_name = name or role
    VM_FIXTURES[fixture_name] = lambda config: [VMSpec(role, image, memory, vcpus)]

    @pytest.fixture(scope="session", name=fixture_name)
    def the_vm(ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
        return _booted(ost_vms, ost_lab, VM_FIXTURES[fixture_name](ost_lab.config))[0]

    the_vm.__doc__ = f"VM {role!r} from {image!r} (session scope, :class:`VM`)."
    return the_vm


def vm_group_fixture(prefix: str, image: str, *, name: str,
                     count: Optional[int] = None) -> Any:
    """A session fixture with a list of VMs ``<prefix>0..N-1`` (N: `count` or --ost-hosts)."""

    def specs(config: OstConfig) -> list[VMSpec]:
        return [VMSpec(f"{prefix}{i}", image) for i in range(count if count is not None else config.hosts)]

    VM_FIXTURES[name] = specs

    @pytest.fixture(scope="session", name=name)
    def the_vms(ost_vms: dict[str, VM], ost_lab: Lab) -> list[VM]:
        return _booted(ost_vms, ost_lab, specs(ost_lab.config))

    the_vms.__doc__ = f"VMs {prefix}0.. from {image!r} (session scope, list of :class:`VM`)."
    return the_vms


def vm_member_fixture(group: str, index: int) -> Any:
    """A session fixture with VM number `index` of the group fixture `group`."""
    name = f"{group.rstrip('s')}{index}"
    VM_FIXTURES[name] = lambda config: VM_FIXTURES[group](config)

    @pytest.fixture(scope="session", name=name)
    def the_vm(request: pytest.FixtureRequest) -> VM:
        vms: list[VM] = request.getfixturevalue(group)
        if index >= len(vms):
            pytest.fail(f"{name} needs at least {index + 1} {group}, but --ost-hosts is "
                        f"{len(vms)}. Raise it (--ost-hosts={index + 1}).", pytrace=False)
        return vms[index]

    the_vm.__doc__ = f"VM number {index} of {group!r} (session scope, :class:`VM`)."
    return the_vm


def clean_vm_fixture(role: str = "clean", image: Optional[str] = None, *,
                     name: Optional[str] = None) -> Any:
    """A function-scoped fixture: a VM in its just-booted state for every test.

    The VM boots once per session (with the others) and its memory and disk are
    saved in a snapshot; each later test gets it reverted to that snapshot, which
    takes seconds instead of a boot. `image` defaults to ``--ost-image``, else base.
    """
    fixture_name = name or f"{role}_vm"
    VM_FIXTURES[fixture_name] = lambda config: [VMSpec(role, image or config.image or "base")]

    @pytest.fixture(name=fixture_name)
    def clean(ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
        vm = _booted(ost_vms, ost_lab, VM_FIXTURES[fixture_name](ost_lab.config))[0]
        if vm.dirty is None:  # first use: save the just-booted state
            ost_lab.progress(f"{role}: clean state saved in {vm.snapshot():.1f} s")
        elif vm.dirty:
            log.info("%s: reverted to its clean state in %.1f s", role, vm.revert())
        vm.dirty = True
        return vm

    clean.__doc__ = f"VM {role!r}, reverted to its just-booted state for each test (function scope, :class:`VM`)."
    return clean


VM_FIXTURES["ost_vm"] = lambda config: [VMSpec("vm", config.image)] if config.image else []


@pytest.fixture(scope="session")
def ost_vm(ost_vms: dict[str, VM], ost_lab: Lab) -> VM:
    """A VM from ``--ost-image=LAYER`` (session scope, :class:`VM`)."""
    if ost_lab.config.image is None:
        pytest.fail("The ost_vm fixture boots the image given with --ost-image=LAYER "
                    "(a layer such as engine-installed, or a qcow2 path); none was given.",
                    pytrace=False)
    return _booted(ost_vms, ost_lab, VM_FIXTURES["ost_vm"](ost_lab.config))[0]


# Default fixtures, as an OST suite expects them. A suite redefines any of them
# in its conftest.py with the same factories.
engine = vm_fixture("engine", "engine-installed")
hosts = vm_group_fixture("host", "host-installed", name="hosts")
host0 = vm_member_fixture("hosts", 0)
host1 = vm_member_fixture("hosts", 1)
clean_vm = clean_vm_fixture("clean")
