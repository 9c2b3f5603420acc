"""Errors a person can act on.

Every message says what was expected, what was found and what to do next. The
plugin turns an OstError into a short test error without a traceback from inside
the plugin.
"""


class OstError(Exception):
    """A problem with the images, the host or the VMs that the user can fix."""


class ImageError(OstError):
    """An image, its backing chain or its SSH key cannot be used."""


class VirtError(OstError):
    """libvirt is missing, unreachable or refused to create something."""


class BootError(OstError):
    """A VM did not become reachable over SSH."""


class VMError(OstError):
    """A running VM died or stopped answering during a test."""


class SSHCommandError(OstError):
    """A command run with ``check=True`` exited non-zero."""


class WarmStartError(OstError):
    """A saved state could not be restored; the VM is booted instead."""
