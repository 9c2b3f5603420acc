"""pytest-ostimages: disposable VMs booted from installed, layered ost-images."""

from .catalog import Catalog, Image
from .config import OstConfig
from .errors import BootError, ImageError, OstError, SSHCommandError, VirtError, VMError
from .environment import Environment
from .inputs import VMSpec
from .lab import Lab, Network
from .layers import LayerRecipe, build_layer
from .plugin import LayerFactory, VMFactory, clean_vm_fixture, vm_fixture, vm_group_fixture, vm_member_fixture
from .ssh import CommandResult
from .vm import VM

__all__ = [
    "BootError", "Catalog", "CommandResult", "Environment", "Image", "ImageError", "Lab", "LayerFactory",
    "LayerRecipe", "Network", "build_layer",
    "OstConfig", "OstError", "SSHCommandError", "VM", "VMFactory", "VMSpec", "VirtError", "VMError",
    "clean_vm_fixture", "vm_fixture", "vm_group_fixture", "vm_member_fixture",
]
