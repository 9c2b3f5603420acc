"""What the plugin's hooks and fixtures share about one pytest session: its lab, and its error policy."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import pytest

from .config import OstConfig
from .errors import OstError, SessionError
from .images.catalog import Catalog
from .lab.inputs import VMSpec
from .lab.lab import Lab
from .lab.placement import place, share_name
from .lab.plan import Plan
from .report import progress, warning
from .state.share import Share

CONFIG_KEY = pytest.StashKey[OstConfig]()
PLAN_KEY = pytest.StashKey[Plan]()
LAB_KEY = pytest.StashKey[Lab]()
SHARE_KEY = pytest.StashKey[Optional[Share]]()
CATALOG_KEY = pytest.StashKey[Catalog]()  # found for the report header, reused by the lab
REUSE_KEY = pytest.StashKey[list[VMSpec]]()  # the VMs to keep for --ost-reuse, once all were ready
FAILED_KEY = pytest.StashKey[str]()  # the input error that makes every VM of the session impossible
ITEM_KEY = pytest.StashKey[pytest.Item]()  # the test being set up (xdist workers plan per test)


def make_lab(config: pytest.Config, specs: Optional[list[VMSpec]] = None) -> tuple[Lab, Optional[Share]]:
    """The session's lab, on the hypervisor it is placed on (lab/placement.py: `specs`, default the
    planned VMs, decide how much room it needs), and the environment it shares with the other xdist
    workers of that hypervisor (--ost-share)."""
    settings = config.stash[CONFIG_KEY]
    worker = getattr(config, "workerinput", None)  # set by pytest-xdist in its workers
    run_folder = None
    if worker is not None:
        # xdist gives each worker the basetemp <controller's basetemp>/popen-gwN: the parent is the run's
        basetemp = config.getoption("basetemp")
        run_folder = (Path(basetemp).parent if basetemp else settings.workdir / "shares") / f"ost-run-{worker['testrunuid']}"
    wanted = specs if specs is not None else planned(config)
    settings = place(settings, sum(spec.size(settings)[0] for spec in wanted), run_folder)
    share = None
    if settings.share and run_folder is not None:
        share = Share(run_folder / f"share-{share_name(settings)}")
    # A shared environment belongs to the xdist controller, which outlives every worker.
    lab = Lab(settings, progress(config), owner_pid=os.getppid() if share else None,
              catalog=config.stash.get(CATALOG_KEY, None) if len(settings.hypervisors) == 1 else None,
              warn=warning(config))
    config.stash[LAB_KEY] = lab
    config.stash[SHARE_KEY] = share
    return lab, share


def reusing(config: pytest.Config) -> bool:
    """--ost-reuse (never in an xdist worker: plugin.pytest_configure refuses the two together)."""
    return config.stash[CONFIG_KEY].reuse


def planned(config: pytest.Config) -> list[VMSpec]:
    """The VMs to boot together: for every selected test, or (an xdist worker that
    does not share) for the test being set up: the others may run elsewhere."""
    plan = config.stash.get(PLAN_KEY, Plan())
    settings = config.stash[CONFIG_KEY]
    if hasattr(config, "workerinput") and not settings.share and ITEM_KEY in config.stash:
        return plan.specs(settings, [config.stash[ITEM_KEY]])
    return plan.specs(settings)


@contextlib.contextmanager
def user_errors(config: pytest.Config, session: pytest.Session, teardown: bool = False) -> Iterator[None]:
    """Report an OstError as a short failure, without the plugin's traceback.

    A SessionError (images, key, templates, libvirt, the host) makes every VM of the
    session impossible: it is reported in full once and stops the session (a `teardown`
    runs anyway). Any other OstError fails the test that needed what failed.
    """
    if FAILED_KEY in config.stash and not teardown:
        pytest.fail(f"pytest-ostimages cannot boot VMs in this session: {config.stash[FAILED_KEY]} "
                    f"(reported in full above)", pytrace=False)
    try:
        yield
    except SessionError as exc:
        first_line = str(exc).splitlines()[0]
        config.stash[FAILED_KEY] = first_line
        session.shouldstop = f"pytest-ostimages: {first_line}"
        # "from None": the plugin's own exception would only repeat the message
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    except OstError as exc:  # this VM's or this request's trouble, not the session's
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
