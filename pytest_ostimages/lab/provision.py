"""Where a session's VMs come from, and where they go at its end.

A session boots its VMs; or, with ``--ost-share``, the first xdist worker boots
them and the others attach (share.py); or, with ``--ost-reuse``, it attaches to
the VMs an earlier session kept, if nothing that shaped them changed (reuse.py).
At the end the last worker of a share removes them, a reusing session keeps
them, and any other session removes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from . import reuse
from .artifacts import collect_artifacts
from .inputs import VMSpec
from .lab import Lab

if TYPE_CHECKING:
    from ..state.share import Share


def provision(lab: Lab, specs: list[VMSpec], boot: Callable[[], object], share: Optional["Share"],
              reusing: bool) -> None:
    """Give `lab` the VMs of `specs`: `boot` makes them (boot, and deploy for an OST suite)."""
    if share is not None:
        share.join(lab, boot)
    elif reusing:
        if not reuse.attach_kept(lab, specs):
            boot()
    else:
        reuse.drop(lab)  # kept VMs nobody reuses now
        boot()


def finish(lab: Lab, share: Optional["Share"], kept_specs: Optional[list[VMSpec]],
           artifacts: Optional[Path]) -> None:
    """Collect the artifacts into `artifacts` (given when something failed); then leave the
    share, keep the VMs for the next session (`kept_specs`), or remove them."""
    try:
        if artifacts is not None and lab.network:
            lab.progress(f"artifacts in {collect_artifacts(lab, artifacts)}")
    except Exception as exc:  # noqa: BLE001 - the teardown below must run whatever happens
        lab.progress(f"could not collect the artifacts: {exc.__class__.__name__}: {exc}")
    finally:
        if share is not None and share.joined:
            share.leave(lab)
        elif kept_specs and lab.vms:
            reuse.keep(lab, kept_specs)
        else:
            lab.close()
