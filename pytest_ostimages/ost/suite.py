"""OST suites as they are (--ost-init-config): what ``ost.sh``/``lagofy.sh`` provisioned.

An OST suite reaches its VMs through OST's own ``ost_utils``, whose fixtures depend
on none of ours: ``backend`` lists libvirt domains named ``<run8>-ost-<suite>-<vm>``
whose ``OST:metadata`` names ``$OST_DEPLOYMENT``, networks starting with ``ost``
with their roles, and the ``hosts`` inventory in that directory. So in this mode
the whole topology is booted once the tests are collected (before any fixture),
its deploy scripts run, and OST's variables are set in the session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import pytest

from ..errors import OstError
from ..lab.access import write_ost_hosts
from ..lab.chain import boot_reached
from ..lab.lab import Lab, OstDeployment
from ..lab.plan import Plan
from ..lab.provision import finish, provision
from ..session import PLAN_KEY
from .deploy import deploy
from .initconfig import Topology

if TYPE_CHECKING:
    from ..state.share import Share


class OstSuite:
    """The plugin object of an OST session: provisions the topology after collection (boots it
    and runs its deploy scripts, or attaches to a shared or kept one), ends it at the end."""

    def __init__(self, config: pytest.Config, topology: Topology, root: Path,
                 make_lab: Callable[[], tuple[Lab, Optional["Share"]]], reusing: bool) -> None:
        self.config = config
        self.topology = topology
        self.root = root
        self.make_lab = make_lab
        self.reusing = reusing  # --ost-reuse: attach to the kept VMs, keep them at the end
        self.lab: Optional[Lab] = None
        self.share: Optional["Share"] = None
        self.provisioned = False
        self.failed = False  # provisioning failed: collect the artifacts
        self._saved_environ: dict[str, Optional[str]] = {}

    def _export(self, **variables: str) -> None:
        for name, value in variables.items():
            self._saved_environ.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    @pytest.hookimpl(trylast=True)  # after the report header found the images
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        try:  # placed on a hypervisor, its images looked at, its deployment directory named
            lab, self.share = self.make_lab()
            self.lab = lab
            lab.ost = OstDeployment(self.topology.suite, self.root, self.topology.networks)
            distro = lab.inputs.choose_distro(vm.image for vm in self.topology.vms)
            deployment = lab.workdir.client
        except OstError as exc:
            raise pytest.UsageError(str(exc)) from None
        # what OST's fixtures read (ost_utils/pytest/fixtures/env.py), before any conftest runs them
        self._export(OST_DEPLOYMENT=str(deployment), SUITE=self.topology.suite,
                     OST_REPO_ROOT=str(self.root), OST_IMAGES_DISTRO=distro,
                     # OST's VirshBackend runs plain virsh: the hypervisor this session's VMs are on
                     LIBVIRT_DEFAULT_URI=lab.config.libvirt_uri)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not session.items or self.config.option.collectonly:
            return  # nothing will run here (an xdist controller, --collect-only, all deselected)
        assert self.lab is not None
        lab = self.lab
        try:
            provision(lab, list(self.topology.vms), self._boot_and_deploy, self.share, self.reusing)
        except OstError as exc:
            self.failed = True
            pytest.exit(f"pytest-ostimages could not provision OST suite {self.topology.suite}: {exc}",
                        returncode=pytest.ExitCode.TESTS_FAILED)
        self.provisioned = True
        # an attached environment is another run's: its directory is the deployment
        self._export(OST_DEPLOYMENT=str(lab.workdir.client), OST_IMAGES_SSH_KEY=str(lab.ssh_key))

    def _boot_and_deploy(self) -> None:
        """Boot the topology and run its deploy scripts, or (warm start) restore it deployed, as an
        earlier session saved it right after its deploy scripts."""
        assert self.lab is not None
        lab, specs, suite = self.lab, list(self.topology.vms), self.topology.suite
        lab.progress(f"OST suite {suite}: {len(self.topology.networks)} networks, "
                     f"{len(specs)} VMs from {self.topology.path}")
        key = lab.environment_key(specs) if lab.warm_cache is not None else None
        saved = lab.warm_cache.state(key) if lab.warm_cache is not None and key is not None else None
        # deployed and further, in the deepest checkpoint state the first test reaches, if saved
        chain = self.config.stash.get(PLAN_KEY, Plan()).checkpoints
        vms = boot_reached(lab, specs, chain, parent=key) if key is not None else None
        if vms is None:
            vms = lab.boot(specs, environment=saved if saved is not None and saved.exists() else None)
        assert lab.ssh_key is not None
        write_ost_hosts(lab.workdir.client / "hosts", lab.vms.values(), lab.ssh_key, lab.workdir.client / "known_hosts",
                        lab.host.jump)
        if lab.reached:
            lab.current_environment = key  # where the checkpoints start from
            lab.progress(f"OST suite {suite}: restored deployed and at checkpoint state {lab.reached[-1]}: its "
                         f"deploy scripts did not run again")
            return
        if all(vm.origin != "booted" for vm in vms) and saved is not None and saved.exists():
            lab.current_environment = saved.key
            lab.progress(f"OST suite {suite}: restored deployed from saved environment {saved.key}: "
                         f"its deploy scripts did not run again")
            return
        deploy(lab, specs, self.root)
        if key is not None:
            lab.save_environment(key, {"name": f"OST suite {suite} deployed", "inputs": {
                "init-config": str(self.topology.path),
                "deploy scripts": sorted({str(s) for spec in specs for s in spec.deploy_scripts})}})

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        lab, self.lab = self.lab, None
        try:
            if lab is not None:
                # only a whole deployment is kept: the next session does not run its scripts
                finish(lab, self.share, list(self.topology.vms) if self.reusing and self.provisioned else None,
                       lab.config.artifacts if session.testsfailed or self.failed else None)
        finally:
            for name, value in self._saved_environ.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
