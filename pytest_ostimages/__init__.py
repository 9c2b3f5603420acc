"""pytest-ostimages: disposable VMs booted from installed, layered ost-images."""

from .checkpoints import checkpoint
from .config import OstConfig
from .errors import BootError, ImageError, OstError, SessionError, SSHCommandError, VirtError, VMError
from .fixtures import LayerFactory, VMFactory, clean_vm_fixture, vm_fixture, vm_group_fixture, vm_member_fixture
from .guest.ssh import CommandResult
from .guest.vm import VM
from .images.catalog import Catalog, Image
from .lab.inputs import VMSpec
from .lab.lab import Lab
from .lab.networks import Network
from .layers import LayerRecipe, build_layer
from .state.environment import Environment

__all__ = [
    "BootError", "Catalog", "CommandResult", "Environment", "Image", "ImageError", "Lab", "LayerFactory",
    "LayerRecipe", "Network", "build_layer",
    "OstConfig", "OstError", "SessionError", "SSHCommandError", "VM", "VMFactory", "VMSpec", "VirtError", "VMError",
    "checkpoint", "clean_vm_fixture", "vm_fixture", "vm_group_fixture", "vm_member_fixture",
]
