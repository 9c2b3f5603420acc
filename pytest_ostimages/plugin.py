"""pytest-ostimages: the pytest entry point (options and hooks; the fixtures are in fixtures.py).

How ``pytest --ost-image=engine-installed`` becomes a booted VM:

1. :func:`pytest_configure` resolves the options into an :class:`OstConfig`.
2. :func:`pytest_collection_modifyitems` (after deselection) plans the VMs the
   selected tests use (lab/plan.py), so that all of them are booted together.
3. The ``ost_vm`` fixture asks the session's :class:`~pytest_ostimages.lab.lab.Lab`,
   which finds the layer (images/), makes an overlay, renders the network and
   domain XML and creates them (hypervisor/), and waits for SSH (guest/), handing
   back a :class:`~pytest_ostimages.guest.vm.VM`.
4. At the end of the session the lab removes everything it made (state/ledger.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from typing import Any, Optional

import pytest

from . import config as ostconfig
from . import fixtures, report
from .config import OstConfig
from .errors import OstError
from .hypervisor import connection as virt
from .hypervisor.host import is_local
from .images.catalog import Catalog
from .inside.run import InsideRun
from .lab.lab import Lab
from .lab.plan import Plan
from .ost import initconfig
from .ost.suite import OstSuite
from .checkpoints import is_checkpoint
from .session import CATALOG_KEY, CONFIG_KEY, ITEM_KEY, LAB_KEY, PLAN_KEY, make_lab, reusing, user_errors
from .state import kept, ledger
from .state.warmcache import WarmCache


def pytest_addoption(parser: pytest.Parser) -> None:
    ostconfig.add_options(parser)
    parser.getgroup("ostimages").addoption(
        "--ost-cleanup", action="store_true", default=False,
        help="remove every leftover of the plugin whose run is gone (VMs, networks, work "
             "directories), the VMs kept by --ost-reuse too, then exit without running tests")
    parser.getgroup("ostimages").addoption(
        "--ost-warm-cache", action="store_true", default=False,
        help="with --ost-cleanup: also remove the saved states of warm start (--ost-warm)")
    parser.getgroup("ostimages").addoption(
        "--ost-warm-list", action="store_true", default=False,
        help="list the saved states of warm start (VMs, deployed OST suites, checkpoint fixtures) with "
             "their inputs, size and age, then exit without running tests")


def pytest_cmdline_main(config: pytest.Config) -> Optional[int]:
    if not (config.getoption("ost_warm_list") or config.getoption("ost_cleanup")):
        return None
    settings = ostconfig.from_pytest(config)
    try:
        for uri in settings.hypervisors:
            lab = Lab(dataclasses.replace(settings, libvirt_uri=uri))  # only for its roots and connections
            try:
                where = f"hypervisor {uri}: " if len(settings.hypervisors) > 1 else ""
                if config.getoption("ost_warm_list"):
                    for line in report.warm_listing(WarmCache(lab.roots.warm, 0, host=lab.host)):
                        print(where + line)
                else:
                    _cleanup(lab, config.getoption("ost_warm_cache"))
            finally:
                lab.release()
    except OstError as exc:
        print(f"ERROR: {exc}")
        return int(pytest.ExitCode.USAGE_ERROR)
    return int(pytest.ExitCode.OK)


def _cleanup(lab: Lab, warm_cache: bool) -> None:
    """--ost-cleanup on one hypervisor: what dead runs left (and the kept VMs) go; what stays, and why."""
    roots = lab.roots
    with kept.locked(roots.hypervisor, lab.host):
        kept.forget(roots.hypervisor)  # the kept VMs are leftovers too now
    removed = ledger.reap(lab.conn, roots.hypervisor, lab.host, roots.local)
    for leftover in removed:
        print(f"removed {leftover}")
    _, spared = ledger.find(lab.conn, roots.hypervisor, lab.host, roots.local)
    for item in spared:
        print(f"left {item}")
    if warm_cache:
        for key in WarmCache(roots.warm, 0, host=lab.host).clear():
            print(f"removed saved state {key}")
    print(f"pytest-ostimages: removed {len(removed)} leftovers at {lab.config.libvirt_uri} and in {roots.hypervisor}"
          + (f" on {lab.host.name}" if not lab.host.local else "") + f"; left {len(spared)} of other sessions")


def pytest_configure(config: pytest.Config) -> None:
    settings = config.stash[CONFIG_KEY] = ostconfig.from_pytest(config)
    if settings.reuse and config.getoption("numprocesses", None):
        # each worker is a session of its own: they would take each other's kept VMs
        raise pytest.UsageError("--ost-reuse keeps one session's VMs for the next session; with "
                                "-n/--numprocesses each xdist worker is a session of its own. Drop one of them "
                                "(--ost-share gives the workers one environment for the run).")
    if settings.run_inside is not None and not hasattr(config, "workerinput"):
        if config.getoption("numprocesses", None):
            raise pytest.UsageError("--ost-run-inside runs the tests in one VM; drop -n/--numprocesses.")
        value_options = {s.option for s in ostconfig.SETTINGS if not s.flag}
        config.pluginmanager.register(InsideRun(config, settings, report.progress(config), value_options),
                                      "ostimages-inside")
    if settings.init_config is not None:
        config.pluginmanager.register(_ost_suite(config, settings), "ostimages-ost")
    if not config.pluginmanager.is_registered(fixtures):  # the default fixtures
        config.pluginmanager.register(fixtures, "ostimages-fixtures")
    config.pluginmanager.register(_Interrupts(config), "ostimages-interrupts")
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
    return OstSuite(config, topology, root, lambda: make_lab(config, list(topology.vms)), reusing(config))


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGTERM) is _interrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash[CONFIG_KEY]
    if settings.hypervisors == (settings.libvirt_uri,) and is_local(settings.libvirt_uri):
        try:
            catalog = Catalog.discover(settings.images_dir)
        except OSError as exc:  # the header must never stop a run; the fixtures will explain
            return [f"ost-images: cannot read {settings.images_dir}: {exc.strerror}"]
        config.stash[CATALOG_KEY] = catalog  # the session's lab uses it: one RPM query per run
        return report.header_lines(settings, catalog)
    return [line for uri in settings.hypervisors for line in _hypervisor_header(settings, uri)]


def _hypervisor_header(settings: OstConfig, uri: str) -> list[str]:
    """A hypervisor of several, or a remote one: its libvirt, virt type and images (asked over SSH)."""
    lab = Lab(dataclasses.replace(settings, libvirt_uri=uri))
    try:
        lines = [f"hypervisor {uri}: libvirt {virt.libvirt_version(lab.conn)}, {lab.virt_type} guests"]
        return lines + report.header_lines(settings, Catalog.discover(settings.images_dir, host=lab.host))
    except OstError as exc:  # the header must never stop a run; the fixtures will explain
        return [f"hypervisor {uri}: cannot be asked: {str(exc).splitlines()[0]}"]
    finally:
        lab.release()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    report.summary(config, terminalreporter)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that used VMs gets their console and journal tails in its report."""
    outcome = yield
    lab = item.config.stash.get(LAB_KEY, None)
    # Only for a failing test body: a failed boot already says what the console showed.
    # An OST suite's tests use every VM, through fixtures of their own.
    if (outcome.when == "call" and outcome.failed and lab is not None and lab.vms
            and ("ost_lab" in getattr(item, "fixturenames", ()) or lab.ost is not None)):
        for title, text in report.vm_sections(lab.vms.values()):
            outcome.sections.append((title, text))
    return outcome


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have removed their items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[PLAN_KEY] = Plan.of(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    item.config.stash[ITEM_KEY] = item
    return (yield)


def _settle(config: pytest.Config, session: pytest.Session) -> None:
    """The VMs are about to be used: restore the saved state checkpoint fixtures chose for them."""
    lab = config.stash.get(LAB_KEY, None)
    if lab is not None and lab.pending_environment is not None:
        with user_errors(config, session):
            lab.settle()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    if not is_checkpoint(fixturedef.func):  # a checkpoint restored may be followed by a deeper one
        _settle(request.config, request.session)
    return (yield)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _settle(item.config, item.session)


class _Interrupts:
    """Ctrl-C or SIGTERM: the teardown that follows removes everything at once (no warm saves)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        lab = self.config.stash.get(LAB_KEY, None)
        if lab is not None:
            lab.interrupted = True
