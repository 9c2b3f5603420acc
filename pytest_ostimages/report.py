"""What a person sees of the plugin: progress lines, the report header, per-test VM sections.

Progress goes to the terminal as it happens (the one waiting for VMs wants to
know why) and always to the log. The first screen of a failed run should say what
went wrong: which images and hypervisor were used, and for a failed test the
console and journal tails of its VMs. Everything else goes to ``--ost-artifacts DIR``
(lab/artifacts.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

import pytest

from .guest.vm import JOURNAL
from .hypervisor import kvm_access
from .images.catalog import backing_name

if TYPE_CHECKING:
    from .config import OstConfig
    from .guest.vm import VM
    from .images.catalog import Catalog
    from .state.warmcache import WarmCache

log = logging.getLogger("pytest_ostimages")
WARNINGS_KEY = pytest.StashKey[list[str]]()  # shown again in the terminal summary

CONSOLE_TAIL = 30
JOURNAL_TAIL = 30


def header_lines(config: "OstConfig", catalog: "Catalog") -> list[str]:
    """Where the images come from and where the VMs will run (nothing is created)."""
    where = "" if catalog.host.local else f" on {catalog.host.name}"
    lines = [f"ost-images: {catalog.directory}{where} (found via {catalog.source}), libvirt "
             f"{config.libvirt_uri}, virt type {config.virt_type}, work dir {config.workdir}"]
    for distro in catalog.distros():
        for layer in catalog.layer_names(distro):
            entry = catalog.layers[(distro, layer)]
            package = f"{entry.package.name}-{entry.package.version}" if entry.package else "no package"
            backing = backing_name(entry.path)
            layout = f"on {backing}" if backing else "whole image"
            lines.append(f"ost-images:   {distro}-{layer} ({package}, {layout})")
    if not catalog.distros():
        lines.append("ost-images:   none installed")
    kvm_warning = kvm_access.warning(config.libvirt_uri)
    if kvm_warning is not None:
        lines.append(f"ost-images: {kvm_warning}")
    return lines


def vm_sections(vms: Iterable["VM"]) -> list[tuple[str, str]]:
    """(title, text) report sections for a failed test: console and journal tails."""
    sections = []
    for vm in vms:
        state = vm.state()
        sections.append((f"ost {vm.role}: serial console (last {CONSOLE_TAIL} lines, {state})",
                         vm.console_log(CONSOLE_TAIL) or "(empty)"))
        if state == "running" and vm.boot_seconds is not None:  # it answered SSH once
            journal = vm.diagnostic(f"{JOURNAL} -n {JOURNAL_TAIL}")
            if journal is not None:
                sections.append((f"ost {vm.role}: journal (last {JOURNAL_TAIL} lines)", journal))
    return sections


def warm_listing(cache: "WarmCache") -> list[str]:
    """What ``--ost-warm-list`` prints: each saved state, what it is, its inputs, size and age
    (a damaged one: why, and how to remove it)."""
    lines, damaged = [], 0
    for state, meta in cache.listing():
        size = f"{state.key}  {state.size() / 2**20:8.0f} MiB  "
        if isinstance(meta, str):
            damaged += 1
            lines.append(f"{size}damaged: {meta}")
            continue
        saved = meta.get("saved")
        age = (time.time() - saved) / 3600 if saved is not None else 0.0
        what = (f"{meta.get('name')} ({', '.join(map(str, meta.get('roles') or []))})"
                if meta.get("kind") == "environment" else f"VM {meta.get('role')} of {meta.get('image')}")
        inputs = "; ".join(f"{k}: {v}" for k, v in (meta.get("inputs") or {}).items() if v)
        lines.append(f"{size}{age:6.1f} h old  {what}"
                     + (f"  [{inputs}]" if inputs else "") + (f"  on {meta['parent']}" if meta.get("parent") else ""))
    if damaged:
        lines.append(f"{damaged} damaged state{'s' if damaged > 1 else ''}: no session can restore "
                     f"{'them' if damaged > 1 else 'it'}; `pytest --ost-cleanup --ost-warm-cache` removes every "
                     f"saved state not in use (sessions save the ones they need anew).")
    return lines or [f"no saved states in {cache.root}"]


def progress(config: pytest.Config) -> Callable[[str], None]:
    """Live lines on the terminal (not with -q), always in the log."""
    lock = threading.Lock()  # boots report from one thread per VM

    def report(message: str) -> None:
        log.info(message)
        # looked up now: made before pytest's own plugins are configured, they may be missing then
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or config.get_verbosity() < 0 or _live_log_shows_info(config):
            return
        with lock:
            # fixtures run with output captured; progress is for the person waiting
            suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
            with suspended:
                reporter.write_line(f"[ost] {message}")

    return report


def _live_log_shows_info(config: pytest.Config) -> bool:
    """Whether pytest's live log (log_cli) prints our INFO records on the terminal already."""
    level = config.getoption("log_cli_level", None) or config.getini("log_cli_level") or \
        config.getoption("log_level", None) or config.getini("log_level")
    enabled = config.getini("log_cli") or config.getoption("log_cli_level", None) is not None
    if not enabled:
        return False
    number = logging.getLevelName(str(level).upper()) if level else logging.WARNING
    return isinstance(number, int) and number <= logging.INFO


def warning(config: pytest.Config) -> Callable[[str], None]:
    """A progress line for what went wrong without failing anything, repeated in the summary."""
    show = progress(config)

    def warn(message: str) -> None:
        config.stash.setdefault(WARNINGS_KEY, []).append(message)
        show(f"WARNING: {message}")

    return warn


def summary(config: pytest.Config, terminal: "pytest.TerminalReporter") -> None:
    """The warnings of the session (cloud-init errors nobody asked about, ...), once more at the end."""
    found = config.stash.get(WARNINGS_KEY, [])
    if found:
        terminal.section("pytest-ostimages warnings", sep="-", yellow=True)
        for message in found:
            terminal.write_line(message)
