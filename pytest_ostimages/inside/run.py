"""``--ost-run-inside=LAYER``: run this pytest invocation inside a fresh VM, report it as local.

For functional tests that need a real host (root, loop devices, LVM, systemd):
the outer session collects nothing; it boots one VM of the layer, makes the
rootdir available in the guest (virtiofs, shared read-only, or a copy), runs an
optional setup script, then the same pytest arguments with the guest's own
Python and pytest. The guest's pytest loads reporter.py, which streams
every report back as JSON; the outer session replays each one through its own
hooks (as pytest-xdist does for its workers), so progress lines, ``-ra``,
``--junitxml`` and the exit status are those of a local run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tarfile
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Collection, Optional, Sequence

import pytest

from ..config import OstConfig
from ..errors import OstError
from ..guest.vm import BOOT_JOURNAL, VM
from ..lab.inputs import VMSpec
from ..lab.lab import Lab
from .reporter import PREFIX

TAG = "ost-tree"  # the virtiofs mount tag
SHARED_TREE = "/mnt/ost-tree"
COPIED_TREE = "/root/ost-tree"
TOOLS = "/root/ost-inside"  # the reporter plugin and the guest's pytest log
VIRTIOFSD = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
NOT_COPIED = {".git", ".venv", "venv", ".tox", "__pycache__", ".pytest_cache", ".mypy_cache", "node_modules"}
# Options of the outer session only, with whether they take a value.
OUTER_ONLY = {"-n": True, "--numprocesses": True, "--maxprocesses": True, "--dist": True, "--tx": True,
              "--junitxml": True, "--junit-xml": True, "--basetemp": True, "--rootdir": True}


def find_virtiofsd() -> Optional[Path]:
    found = shutil.which("virtiofsd")
    for candidate in ([found] if found else []) + list(VIRTIOFSD):
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def inner_args(args: Sequence[str], rootdir: Path, cwd: Path, value_options: set[str],
               positionals: Collection[str]) -> list[str]:
    """The outer invocation's arguments for the guest's pytest (which runs in the tree's root).

    Drops the plugin's own options and those of the outer session only (xdist, junit
    XML: the outer session writes it). The test paths (`positionals`, as pytest parsed
    them) become relative to the rootdir; so does any other argument that is an
    absolute path inside it (an option's value); every other value passes as it is.
    """
    out: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name.startswith("--ost-") or name in OUTER_ONLY:
            skip_value = "=" not in arg and (name in value_options or OUTER_ONLY.get(name, False))
            continue
        if arg in positionals:
            out.append(_test_path(arg, rootdir, cwd))
        elif name.startswith("-") and "=" in arg:
            out.append(f"{name}={_in_tree(arg.split('=', 1)[1], rootdir)}")
        else:
            out.append(_in_tree(arg, rootdir))
    return out


def _test_path(arg: str, rootdir: Path, cwd: Path) -> str:
    """A test path or node id, relative to the rootdir (the tree the guest sees)."""
    path, sep, rest = arg.partition("::")
    target = (cwd / path).resolve()
    if not target.exists():
        return arg  # the guest's pytest says it is not found
    try:
        return str(target.relative_to(rootdir)) + sep + rest
    except ValueError:
        raise OstError(f"{arg} is outside the rootdir {rootdir}, the tree the guest "
                       f"sees; run from a rootdir that contains it.") from None


def _in_tree(value: str, rootdir: Path) -> str:
    """An option's value: an absolute path inside the rootdir made relative to it, else as it is."""
    path = Path(value)
    if path.is_absolute() and path.resolve().is_relative_to(rootdir):
        return str(path.resolve().relative_to(rootdir)) or "."
    return value


def tree_archive(rootdir: Path, archive: Path) -> list[str]:
    """The rootdir as a gzipped tarball for the guest, without what NOT_COPIED names and without
    virtual environments under any name (a folder with a pyvenv.cfg): the host's Python packages
    are of no use to the guest's Python, and unpacking them under TCG costs tens of seconds. Returns
    the virtual environments left out, relative to the rootdir."""
    venvs: list[str] = []

    def keep(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
        path = Path(info.name)
        if path.name in NOT_COPIED:
            return None
        if info.isdir() and (rootdir / path / "pyvenv.cfg").is_file():
            venvs.append(str(path))  # "./sub/env" is Path("sub/env")
            return None
        return info

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(rootdir, arcname=".", filter=keep)
    return venvs


class InsideRun:
    """The outer session's plugin: no local tests; one VM that runs them."""

    def __init__(self, config: pytest.Config, settings: OstConfig, progress: Callable[[str], None],
                 value_options: set[str]) -> None:
        self.config = config
        self.settings = settings
        self.progress = progress
        self.value_options = value_options
        self.first_result: Optional[float] = None  # seconds from start to the first inner result
        self._start = time.monotonic()
        self._log_tail = ""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> bool:
        return True  # the tests are collected in the guest

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        positionals = self.config.args if self.config.args_source == pytest.Config.ArgsSource.ARGS else []
        lab = Lab(self.settings, self.progress)
        vm: Optional[VM] = None
        try:
            args = inner_args(self.config.invocation_params.args, self.config.rootpath,
                              self.config.invocation_params.dir, self.value_options, positionals)
            share = self._share_choice(lab)
            vm = lab.boot([VMSpec("inside", str(self.settings.run_inside),
                                  shares=((self.config.rootpath, TAG, share),) if share else ())])[0]
            tree = self._tree(vm, lab, shared=share is not None)
            self._check_pytest(vm)
            self._run_setup(vm, tree)
            status = self._run(vm, tree, args, session, lab.workdir.client)
        except OstError as exc:
            raise pytest.UsageError(str(exc)) from None
        finally:
            try:
                if vm is not None and self.settings.artifacts is not None:
                    self._collect(vm, self.settings.artifacts / lab.run_id)
            except Exception as exc:  # noqa: BLE001 - the teardown below must run whatever happens
                self.progress(f"inside: could not collect the artifacts: {exc.__class__.__name__}: {exc}")
            try:
                lab.close()
            except OstError as exc:
                self.progress(f"inside: {exc}")
        if status in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR,
                      pytest.ExitCode.USAGE_ERROR):
            pytest.exit(f"the tests inside the VM ended with exit status {status}; the guest's "
                        f"pytest output:\n{self._log_tail}", returncode=status)
        return True

    # --- the tree in the guest ---------------------------------------------------------

    def _share_choice(self, lab: Lab) -> Optional[Path]:
        """virtiofsd for a shared tree, or None to copy it."""
        mode = self.settings.inside_share
        if mode == "copy":
            return None
        if not lab.host.local:  # virtiofsd shares a folder of the hypervisor: this tree is not there
            if mode == "virtiofs":
                raise OstError(f"--ost-inside-share=virtiofs shares a folder of the hypervisor, and the VM runs on "
                               f"{lab.host.name}, which does not have this tree. Use --ost-inside-share=copy.")
            self.progress(f"inside: the VM runs on {lab.host.name}: the tree will be copied")
            return None
        binary = find_virtiofsd()
        if binary is None:
            if mode == "virtiofs":
                raise OstError("--ost-inside-share=virtiofs needs virtiofsd (QEMU's, e.g. "
                               f"{VIRTIOFSD[0]} from qemu-system-common); none was found. Install "
                               "it, or use --ost-inside-share=copy.")
            self.progress("inside: no virtiofsd on this host: the tree will be copied")
        return binary

    def _tree(self, vm: VM, lab: Lab, shared: bool) -> str:
        """Where the rootdir is in the guest: mounted read-only, else copied."""
        if shared:
            mounted = vm.ssh(f"mkdir -p {SHARED_TREE} && mount -t virtiofs -o ro {TAG} {SHARED_TREE}")
            if mounted.returncode == 0:
                self.progress(f"inside: {self.config.rootpath} shared read-only at {SHARED_TREE} (virtiofs)")
                return SHARED_TREE
            if self.settings.inside_share == "virtiofs":
                raise OstError(f"The guest cannot mount the tree over virtiofs: {mounted.stderr.strip()}. "
                               f"Use --ost-inside-share=copy.")
            self.progress(f"inside: virtiofs mount failed ({mounted.stderr.strip()}): copying the tree")
        start = time.monotonic()
        archive = lab.workdir.client / "tree.tar.gz"  # made here, sent to the guest
        venvs = tree_archive(self.config.rootpath, archive)
        vm.ssh(f"rm -rf {COPIED_TREE} && mkdir -p {COPIED_TREE}", check=True)
        vm.put(archive, "/root/ost-tree.tar.gz")
        vm.ssh(f"tar xzf /root/ost-tree.tar.gz -C {COPIED_TREE} && rm /root/ost-tree.tar.gz", check=True)
        left_out = f"; not the virtual environments {', '.join(venvs)}" if venvs else ""
        self.progress(f"inside: {self.config.rootpath} copied to {COPIED_TREE} "
                      f"({archive.stat().st_size // 1024} KiB in {time.monotonic() - start:.1f} s{left_out})")
        return COPIED_TREE

    def _check_pytest(self, vm: VM) -> None:
        found = vm.ssh("python3 -c 'import pytest; print(pytest.__version__)'")
        if found.returncode != 0:
            raise OstError(
                f"The guest ({vm.image.label}) has no pytest for python3, so the tests cannot run "
                f"inside it: {(found.stderr.strip().splitlines() or ['python3 failed'])[-1]}\n"
                f"Use a layer that has python3 and pytest (e.g. a custom layer built with "
                f"ost_layer_factory), or install them with --ost-inside-setup=SCRIPT.")
        self.progress(f"inside: the guest's pytest {found.stdout.strip()}")

    def _run_setup(self, vm: VM, tree: str) -> None:
        script = self.settings.inside_setup
        if script is None:
            return
        if not script.is_file():
            raise OstError(f"--ost-inside-setup: {script} does not exist or is not a file.")
        vm.ssh(f"mkdir -p {TOOLS}", check=True)
        vm.put(script, f"{TOOLS}/setup.sh")
        self.progress(f"inside: running {script.name} in the guest")
        result = vm.ssh(f"cd {tree} && OST_TREE={tree} bash {TOOLS}/setup.sh", timeout=3600)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise OstError(f"The setup script {script} exited with {result.returncode} in the guest:\n{tail}")

    # --- the run ---------------------------------------------------------------------

    def _run(self, vm: VM, tree: str, args: list[str], session: pytest.Session, workdir: Path) -> int:
        reporter = workdir / "ost_inside_reporter.py"
        reporter.write_bytes(resources.files("pytest_ostimages.inside").joinpath("reporter.py").read_bytes())
        vm.ssh(f"mkdir -p {TOOLS}", check=True)
        vm.put(reporter, f"{TOOLS}/ost_inside_reporter.py")
        command = (f"cd {tree} && PYTHONPATH={TOOLS} PYTHONDONTWRITEBYTECODE=1 OST_INSIDE_FD=3 "
                   # -p no:ostimages: the tree may hold this plugin's own entry point (an egg-info)
                   f"python3 -m pytest -p ost_inside_reporter -p no:ostimages -p no:cacheprovider "
                   f"--rootdir={tree} "
                   f"{' '.join(shlex.quote(a) for a in args)} 3>&1 >{TOOLS}/pytest.log 2>&1")
        self.progress(f"inside: pytest {' '.join(args)}")
        status: list[int] = []
        result = vm.stream(command, lambda line: self._event(line, session, status), timeout=None)
        self._log_tail = vm.ssh(f"tail -n 40 {TOOLS}/pytest.log").stdout
        if not status:  # it never got to the end of a session
            raise OstError(f"The guest's pytest stopped (exit status {result.returncode}) before it "
                           f"finished a session; its output:\n{self._log_tail}")
        return status[0]

    def _event(self, line: str, session: pytest.Session, status: list[int]) -> None:
        if not line.startswith(PREFIX):
            return
        event = json.loads(line[len(PREFIX):])
        hook = self.config.hook
        kind = event["event"]
        if kind == "collected":
            session.testscollected = event["count"]
            self.progress(f"inside: collected {event['count']} items in the guest")
        elif kind == "logstart":
            hook.pytest_runtest_logstart(nodeid=event["nodeid"], location=tuple(event["location"]))
        elif kind == "logfinish":
            hook.pytest_runtest_logfinish(nodeid=event["nodeid"], location=tuple(event["location"]))
        elif kind == "report":
            report = hook.pytest_report_from_serializable(config=self.config, data=event["data"])
            if self.first_result is None:
                self.first_result = time.monotonic() - self._start
            if isinstance(report, pytest.CollectReport):
                hook.pytest_collectreport(report=report)
            else:
                hook.pytest_runtest_logreport(report=report)
        elif kind == "finish":
            status.append(event["exitstatus"])

    def _collect(self, vm: VM, dest: Path) -> None:
        """The guest's journal, pytest log and the files the suite named, under dest/inside/."""
        folder = dest / "inside"
        folder.mkdir(parents=True, exist_ok=True)
        journal = vm.ssh(BOOT_JOURNAL, timeout=120)
        (folder / "journal.txt").write_text(journal.stdout)
        if vm.ssh(f"test -e {TOOLS}/pytest.log").returncode == 0:
            vm.get(f"{TOOLS}/pytest.log", folder / "pytest.log")
        if self.settings.inside_artifacts:
            paths = " ".join(shlex.quote(p) for p in self.settings.inside_artifacts)
            vm.ssh(f"tar czf /root/ost-inside-files.tar.gz --ignore-failed-read {paths}", timeout=600)
            vm.get("/root/ost-inside-files.tar.gz", folder / "files.tar.gz")
        self.progress(f"inside: artifacts in {folder}")
